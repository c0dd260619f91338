"""Clustered synthetic embedding sets in the embedding stage's format, for index tests and
benchmarks.

Uniformly random vectors make recall meaningless (every neighbour is as far as any other);
these are drawn around ``num_clusters`` centres, like real CLIP embeddings of a web corpus.
Each pair's caption vector is its image vector plus noise, so text queries have the right
neighbourhood structure. Captions encode the id, so a lookup can be checked against it.
"""

from __future__ import annotations

import numpy as np

from react_ray.formats import ids, storage
from react_ray.formats.embedding_set import (
    EmbeddingSetInfo,
    ShardStats,
    embedding_table,
    finish_shard,
    shard_name,
    write_parquet,
)


def clustered_vectors(
    rng: np.random.Generator, n: int, centres: np.ndarray, spread: float
) -> np.ndarray:
    labels = rng.integers(len(centres), size=n)
    vectors = centres[labels] + spread * rng.normal(size=(n, centres.shape[1])).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_clustered_embedding_set(
    output: str,
    num_files: int,
    rows_per_file: int,
    dim: int = 64,
    num_clusters: int = 100,
    seed: int = 0,
    model: str = "synthetic",
    skip_every: int = 0,
    text_noise: float = 0.6,
    spread: float = 0.35,
    centres: np.ndarray | None = None,
    near_copies: float = 0.0,
) -> int:
    """Write ``num_files`` committed embedding files; every ``skip_every``-th row is left out
    (as skipped records are). ``centres``: given ones instead of ``num_clusters`` random ones;
    ``near_copies``: this fraction of each file's images are re-encoded copies of others in it
    (cosine ~0.99, as web crawls hold). Returns the number of vectors written."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.normal(size=(num_clusters, dim)).astype(np.float32)
    centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
    EmbeddingSetInfo(model=model, dim=dim, input="synthetic", input_format="synthetic").write(
        output
    )
    written = 0
    for shard in range(num_files):
        rows = np.arange(rows_per_file)
        if skip_every:
            rows = rows[rows % skip_every != skip_every - 1]
        row_ids = ids.encode(shard, rows)
        img = clustered_vectors(rng, len(rows), centres, spread=spread)
        copies = int(near_copies * len(rows))
        if copies:
            noisy = img[rng.choice(len(rows), copies, replace=False)]
            noisy = noisy + 0.1 * rng.normal(size=noisy.shape).astype(np.float32) / np.sqrt(dim)
            img[len(rows) - copies :] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
        txt = img + text_noise * rng.normal(size=img.shape).astype(np.float32) / np.sqrt(dim)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
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
