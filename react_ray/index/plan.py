"""Choosing a FAISS index from N, dim and a memory budget, the way autofaiss's rules do.

Exact ``Flat`` while it is small and fits; ``HNSW32`` while its graph fits, for queries of the
keys' own modality only; while raw vectors fit, IVF with 4-bit fast-scan PQ codes that pick
candidates and the raw vectors to re-rank them (``IDMap,IVF..,PQ{d/2}x4fs,RFlat``, 2 sqrt(N)
lists), else ``IVF,Flat`` (4 sqrt(N) lists, as autofaiss); then ``IVF,SQ8``, ``IVF,PQ`` with the
largest code that fits, and for very large N the ``OPQ+IVF_HNSW+PQ`` layout (HNSW coarse
quantizer over many lists). Sizes count the 8-byte id kept per vector and the coarse quantizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ID_BYTES = 8
FLAT_MAX_VECTORS = 200_000  # exact search stays fast enough below this
HNSW_MAX_VECTORS = 10_000_000
# Below this dim 4-bit codes of 2 dims each rank too coarsely for re-ranking to pay (32-d: recall@10
# stalled at 0.97 with 640 candidates; 64-d: no faster than IVF,Flat one query at a time)
REFINE_MIN_DIM = 128
OPQ_MIN_VECTORS = 50_000_000
# Lists per sqrt(N) for the re-ranked layout. A query reads every centroid to pick its lists
# (nlist x dim floats) and then scans them; fast-scan codes scan a list several times faster than
# raw vectors, so fewer, longer lists pay. 1M x 128 of CLIP's geometry, caption queries, one
# build each: 2,048 lists reached recall@10 0.95 at 0.89 ms a query where 4,096 needed 1.37 ms
# (batches 0.35 vs 0.42 ms), and their cheapest setting 0.128 at 0.041 ms (4,096: 0.079 at 0.052)
REFINED_LISTS_PER_ROOT = 2


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    estimated_bytes: int
    reason: str

    def __str__(self) -> str:
        return f"{self.factory} (~{format_bytes(self.estimated_bytes)}; {self.reason})"


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1024


def ivf_lists(n: int, per_root: float = 4) -> int:
    """A power of two near ``per_root`` * sqrt(N), with at least 39 training points per list."""
    target = 2 ** round(math.log2(max(per_root * math.sqrt(n), 1)))
    return int(max(1, min(target, n // 39 or 1, 2**20)))


def is_refined(factory: str) -> bool:
    """Whether the index re-ranks its candidates with raw vectors (``..,RFlat``)."""
    return factory.endswith(",RFlat")


def factory_nlist(factory: str) -> int | None:
    """The number of coarse lists of an IVF factory string (``OPQ..,IVF4096_HNSW32,PQ..``)."""
    coarse = next((p for p in factory.split(",") if p.startswith("IVF")), None)
    return int(coarse[3:].split("_")[0]) if coarse else None


POINTS_PER_LIST = 64  # k-means: faiss warns under 39 per centroid, autofaiss gives 100
MAX_TRAIN_SAMPLES = 2_000_000  # beyond, k-means on CPU takes hours: train on GPUs (use_gpu)


def training_size(factory: str, n: int, train_samples: int) -> int:
    """Vectors to train on: ``train_samples``, raised to ``POINTS_PER_LIST`` per coarse list for
    IVF (a thin sample leaves lists unbalanced and centroids off: lower recall at every nprobe,
    measured in docs/performance.md), up to ``MAX_TRAIN_SAMPLES``; never more than ``n``."""
    lists = factory_nlist(factory) or 0
    return min(n, max(train_samples, min(POINTS_PER_LIST * lists, MAX_TRAIN_SAMPLES)))


def pq_codes(dim: int) -> list[int]:
    """PQ code sizes (bytes per vector) below ``dim`` that divide it, largest first."""
    return [m for m in (256, 192, 128, 96, 64, 48, 32, 24, 16, 8) if m < dim and dim % m == 0]


def plan_index(
    n: int, dim: int, memory_budget_bytes: float, cross_modal: bool = False
) -> IndexPlan:
    """The most accurate index for ``n`` x ``dim`` vectors that fits ``memory_budget_bytes``.
    ``cross_modal``: the queries are of the other modality (captions against image keys, REACT's
    retrieval). A graph built on image neighbourhoods serves them poorly: HNSW32 reached recall@10
    0.95 at efSearch 512 (1.9 ms/query) where IVF,Flat reached 0.98 at 0.9 ms (200k x 128 of
    CLIP's geometry; jobs/bench_index.py measures it at 1M), so the planner goes to IVF."""
    if n <= 0:
        raise ValueError(f"index plan: got {n} vectors; nothing to index")
    flat = n * (dim * 4 + ID_BYTES)
    if n <= FLAT_MAX_VECTORS and flat <= memory_budget_bytes:
        return IndexPlan("IDMap,Flat", flat, "exact search: small enough to scan")
    hnsw = n * (dim * 4 + 32 * 2 * 4 + ID_BYTES)
    if n <= HNSW_MAX_VECTORS and hnsw <= memory_budget_bytes and not cross_modal:
        return IndexPlan("IDMap,HNSW32", hnsw, "graph search over raw vectors fits the budget")
    if n < OPQ_MIN_VECTORS:
        nlist, refined_nlist = ivf_lists(n), ivf_lists(n, REFINED_LISTS_PER_ROOT)
        coarse, quantizer, opq = f"IVF{nlist}", nlist * dim * 4, ""
        refined_coarse, refined_quantizer = f"IVF{refined_nlist}", refined_nlist * dim * 4
    else:  # billions: ~3k vectors per list, an HNSW graph over the list centroids, OPQ before PQ
        nlist = min(2 ** round(math.log2(n / 3000)), 2**18)
        coarse, quantizer, opq = f"IVF{nlist}_HNSW32", nlist * (dim * 4 + 32 * 2 * 4), "OPQ{m}_{d},"
        refined_coarse, refined_quantizer = coarse, quantizer
    # fast-scan codes of 2 dims per sub-quantizer, enough of them to rank candidates
    reranked = [
        (
            f"IDMap,{refined_coarse},PQ{dim // 2}x4fs,RFlat",
            # raw, codes, ids of the map and the lists
            n * (dim * 4 + dim // 4 + 2 * ID_BYTES) + refined_quantizer,
            "raw vectors fit: fast-scan codes pick candidates, raw vectors re-rank them "
            "(IVF,Flat's recall, 6-13x faster in batches, 1.6-4x one at a time)",
        )
    ]
    candidates = (reranked if dim % 2 == 0 and dim >= REFINE_MIN_DIM else []) + [
        (f"{coarse},Flat", flat + quantizer, "raw vectors fit; inverted lists prune the scan"),
        (f"{coarse},SQ8", n * (dim + ID_BYTES) + quantizer, "8-bit scalar codes fit"),
    ]
    candidates += [
        (
            opq.format(m=m, d=min(4 * m, dim)) + f"{coarse},PQ{m}x8",
            n * (m + ID_BYTES) + quantizer,
            f"{m}-byte PQ codes are the largest that fit" + (" (OPQ-rotated)" if opq else ""),
        )
        for m in pq_codes(dim)
    ]
    for factory, size, reason in candidates:
        if size <= memory_budget_bytes:
            return IndexPlan(factory, size, reason)
    smallest = n * (8 + ID_BYTES) + quantizer
    raise ValueError(
        f"index plan: {n:,} x {dim} vectors need at least "
        f"{format_bytes(smallest)} even with 8-byte PQ codes; the memory budget is "
        f"{format_bytes(memory_budget_bytes)}: raise it or add shards"
    )
