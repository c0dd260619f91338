"""The LAION kNN API's query options, honoured or refused, never ignored: the safety filter (the
index's own punsafe / NSFW metadata), the violence detector (two prompts, LAION's file or the
app's text tower) and aesthetic steering (LAION's rating embeddings)."""

from __future__ import annotations

import io

import numpy as np
from fastapi import HTTPException

from react_ray.config import SafetyConfig
from react_ray.formats import storage
from react_ray.formats.embedding_set import unit_rows

AESTHETIC_RATINGS = range(10)


def unsafe_mask(metas: list[dict | None], safety: SafetyConfig, index: str) -> np.ndarray:
    """True where a hit is unsafe: punsafe above the threshold, or an unsafe NSFW label. A hit
    with neither column is unknown and counts as unsafe; when no hit has one, the index cannot be
    filtered and the request is refused."""
    unsafe = np.ones(len(metas), bool)
    known = 0
    for i, meta in enumerate(metas):
        meta = meta or {}
        if meta.get("punsafe") is not None:
            unsafe[i] = float(meta["punsafe"]) > safety.unsafe_threshold
        elif meta.get("NSFW") is not None:
            unsafe[i] = meta["NSFW"] in safety.unsafe_labels
        else:
            continue
        known += 1
    if metas and not known:
        raise HTTPException(
            422,
            f"use_safety_model: the index {index!r} has no safety column (punsafe or NSFW) in its "
            "metadata, so its hits cannot be filtered; send use_safety_model=false",
        )
    return unsafe


class ViolenceDetector:
    """clip back's rule: a hit whose vector is nearer the violent prompt (row 1) than the neutral
    one (row 0) is dropped."""

    def __init__(self, prompts: np.ndarray):
        self.prompts = unit_rows(np.asarray(prompts, np.float32).reshape(2, -1))

    @classmethod
    def from_file(cls, uri: str, dim: int) -> ViolenceDetector:
        prompts = np.load(io.BytesIO(storage.read_bytes(uri)))
        if prompts.shape != (2, dim):
            raise ValueError(
                f"safety.violence_prompts {uri}: shape {prompts.shape}; the index holds "
                f"{dim}-d vectors, so (2, {dim}) is needed (LAION's file for this model)"
            )
        return cls(prompts)

    def violent(self, vectors: np.ndarray) -> np.ndarray:
        return np.argmax(unit_rows(vectors) @ self.prompts.T, axis=1) == 1


class AestheticSteering:
    """query + weight x the embedding of rating ``score`` (0-9), renormalized: clip back's
    steering, with LAION's per-model rating files."""

    def __init__(self, ratings: dict[int, np.ndarray]):
        self.ratings = ratings

    @classmethod
    def load(cls, folder: str, dim: int) -> AestheticSteering:
        ratings = {}
        for score in AESTHETIC_RATINGS:
            uri = storage.join(folder, f"rating{score}.npy")
            vector = np.load(io.BytesIO(storage.read_bytes(uri))).astype(np.float32).reshape(-1)
            if vector.shape != (dim,):
                raise ValueError(
                    f"aesthetic_embeddings {uri}: {vector.shape[0]} numbers; the index holds "
                    f"{dim}-d vectors (use the files for the app's model)"
                )
            ratings[score] = vector
        return cls(ratings)

    def steer(self, queries: np.ndarray, score: int, weight: float) -> np.ndarray:
        return unit_rows(queries + weight * self.ratings[score]).astype(np.float32)
