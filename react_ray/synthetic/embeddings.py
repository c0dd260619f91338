"""Synthetic embedding sets in the embedding stage's format, for index tests and benchmarks.

Uniformly random vectors make recall meaningless (every neighbour is as far as any other), and an
index trained on image keys meets TEXT queries in REACT's retrieval and the served search. So the
default pairs have CLIP's geometry (:class:`ClipGeometry`): clustered concepts, image and caption
vectors in two separate cones (the modality gap), matched pairs only weakly similar. Captions
encode the id, so a lookup can be checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from react_ray.formats import ids, storage
from react_ray.formats.embedding_set import (
    EmbeddingSetInfo,
    ShardStats,
    embedding_table,
    finish_shard,
    shard_name,
    unit_rows,
    write_parquet,
)


@dataclass(frozen=True)
class ClipGeometry:
    """Image and caption embeddings shaped like CLIP's. A pair shares a concept ``s`` (its cluster's
    centre plus ``spread`` of its own); each side adds its modality's mean direction and
    modality-specific variation ``n``, then is normalised:

        image = concept_in_image * s + image_mean * m_image + rest * n_image
        text  = concept_in_text  * s + text_mean  * m_text  + rest * n_text

    Concepts and variation have a decaying spectrum (variance of the j-th principal direction
    ~ exp(-j / effective_rank)) in one shared basis, so the cosines and the gap do not depend on
    ``dim``. The defaults, measured by :func:`geometry_figures` on 5,000 pairs (512-d; 128-d within
    0.01), against CLIP's:

    - matched image-caption cosine 0.33; CLIP ~0.3: LAION-400M kept ViT-B/32 pairs above 0.3,
      LAION-5B above 0.28 (Schuhmann et al. 2021, 2022);
    - unmatched image-caption cosine 0.19; CLIP ~0.15-0.2, the tail those filters rejected;
    - modality gap (distance of the mean image and mean caption vectors) 0.81; CLIP 0.82
      (Liang et al. 2022, "Mind the Gap", on MSCOCO);
    - image-image 0.45 and caption-caption 0.59 mean cosine; CLIP's are positive, ~0.5: the
      "cone effect" (same source);
    - caption -> image R@1 / R@5 among 5,000: 0.20 / 0.42 at 512-d, 0.06 / 0.16 at 128-d (more
      dimensions tell pairs apart better); CLIP ViT-L/14 on MSCOCO 5k: 0.38 / 0.62 (Radford et
      al. 2021). Ours is harder: text queries' neighbourhoods are flatter.
    """

    concept_in_image: float = 0.47
    concept_in_text: float = 0.30
    image_mean: float = 0.67
    text_mean: float = 0.77
    means_cosine: float = 0.37  # cosine of the two modalities' mean directions
    spread: float = 0.6
    effective_rank: float = 64.0


class ClipSpace:
    """One embedding model's space: its principal basis, its modalities' mean directions and the
    concepts' cluster centres; :meth:`pairs` draws (image, caption) vectors in it."""

    def __init__(
        self,
        rng: np.random.Generator,
        dim: int,
        centres: np.ndarray | int,
        geometry: ClipGeometry = ClipGeometry(),
    ):
        self.dim, self.geometry = dim, geometry
        rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        variance = np.exp(-np.arange(dim) / geometry.effective_rank)
        self.basis = (rotation * np.sqrt(variance / variance.sum())).T.astype(np.float32)
        if isinstance(centres, int):
            centres = self.draw(rng, centres)
        self.centres = unit_rows(centres)
        image_mean, other = unit_rows(rng.normal(size=(2, dim)))
        other = unit_rows((other - (other @ image_mean) * image_mean)[None])[0]
        cos = geometry.means_cosine
        self.image_mean, self.text_mean = image_mean, cos * image_mean + np.sqrt(1 - cos**2) * other

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` unit vectors with the space's spectrum."""
        return unit_rows(rng.normal(size=(n, self.dim)).astype(np.float32) @ self.basis)

    def pairs(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        g = self.geometry
        labels = rng.integers(len(self.centres), size=n)
        concepts = unit_rows(self.centres[labels] + g.spread * self.draw(rng, n))

        def side(concept: float, mean_weight: float, mean: np.ndarray) -> np.ndarray:
            rest = np.sqrt(max(0.0, 1 - concept**2 - mean_weight**2))
            return unit_rows(concept * concepts + mean_weight * mean + rest * self.draw(rng, n))

        return (
            side(g.concept_in_image, g.image_mean, self.image_mean),
            side(g.concept_in_text, g.text_mean, self.text_mean),
        )


def geometry_figures(images: np.ndarray, texts: np.ndarray, sample: int = 5000) -> dict:
    """The figures :class:`ClipGeometry` is stated in, measured on the first ``sample`` pairs."""
    images, texts = np.asarray(images, np.float32), np.asarray(texts, np.float32)  # not fp16 sums
    img, txt = images[:sample], texts[:sample]
    n = len(img)
    sim = txt @ img.T
    off = n * n - n

    def mean_off_diagonal(m):
        return float((m.sum() - np.trace(m)) / off)

    ranks = (sim > np.diag(sim)[:, None]).sum(axis=1)  # how many images beat the matched one
    return {
        "matched_cosine": float(np.mean(np.diag(sim))),
        "unmatched_cosine": mean_off_diagonal(sim),
        "modality_gap": float(np.linalg.norm(images.mean(0) - texts.mean(0))),
        "image_image_cosine": mean_off_diagonal(img @ img.T),
        "text_text_cosine": mean_off_diagonal(txt @ txt.T),
        "text_to_image_r1": float(np.mean(ranks < 1)),
        "text_to_image_r5": float(np.mean(ranks < 5)),
    }


def clustered_vectors(
    rng: np.random.Generator, n: int, centres: np.ndarray, spread: float
) -> np.ndarray:
    """Isotropic clusters: ``centres`` plus Gaussian noise, normalised (no modality structure)."""
    labels = rng.integers(len(centres), size=n)
    return unit_rows(centres[labels] + spread * rng.normal(size=(n, centres.shape[1])))


def write_clustered_embedding_set(
    output: str,
    num_files: int,
    rows_per_file: int,
    dim: int = 64,
    num_clusters: int = 100,
    seed: int = 0,
    model: str = "synthetic",
    skip_every: int = 0,
    geometry: ClipGeometry | None = ClipGeometry(),
    text_noise: float = 0.6,
    spread: float = 0.35,
    centres: np.ndarray | None = None,
    near_copies: float = 0.0,
) -> int:
    """Write ``num_files`` committed embedding files; every ``skip_every``-th row is left out
    (as skipped records are). ``geometry``: CLIP's (the default), or None for the older isotropic
    clusters, whose caption vector is the image vector plus ``text_noise`` (matched cosine ~0.86)
    and whose clusters have ``spread``. ``centres``: given ones instead of ``num_clusters`` random
    ones; ``near_copies``: this fraction of each file's images are re-encoded copies of others in
    it (cosine ~0.99, as web crawls hold). Returns the number of vectors written."""
    rng = np.random.default_rng(seed)
    if geometry is not None:
        space = ClipSpace(rng, dim, num_clusters if centres is None else centres, geometry)
    elif centres is None:
        centres = unit_rows(rng.normal(size=(num_clusters, dim)))
    EmbeddingSetInfo(model=model, dim=dim, input="synthetic", input_format="synthetic").write(
        output
    )
    written = 0
    for shard in range(num_files):
        rows = np.arange(rows_per_file)
        if skip_every:
            rows = rows[rows % skip_every != skip_every - 1]
        row_ids = ids.encode(shard, rows)
        if geometry is not None:
            img, txt = space.pairs(rng, len(rows))
        else:
            img = clustered_vectors(rng, len(rows), unit_rows(centres), spread=spread)
        copies = int(near_copies * len(rows))
        if copies:
            noisy = img[rng.choice(len(rows), copies, replace=False)]
            noisy = noisy + 0.1 * rng.normal(size=noisy.shape).astype(np.float32) / np.sqrt(dim)
            img[len(rows) - copies :] = unit_rows(noisy)
        if geometry is None:
            txt = unit_rows(img + text_noise * rng.normal(size=img.shape) / np.sqrt(dim))
        name = shard_name(shard)
        write_parquet(
            storage.join(output, f"{name}.parquet"),
            embedding_table(
                row_ids,
                [f"{shard:05d}{r:04d}" for r in rows],
                [f"http://img/{i}.jpg" for i in row_ids],
                [f"caption of {i}" for i in row_ids],
                img,
                txt,
            ),
        )
        gap = rows_per_file - len(rows)
        finish_shard(
            output,
            name,
            ShardStats(
                input="synthetic",
                shard=shard,
                rows_in=rows_per_file,
                rows_embedded=len(rows),
                skipped={"left_out": gap} if gap else {},
            ),
        )
        written += len(rows)
    return written
