"""Tuning search parameters for a target recall@k on TEXT queries, against exact search.

autofaiss tunes with image queries; retrieval for REACT sends text prompts, whose
neighbourhoods in image-key space look different. We measure recall with caption embeddings
against the index's keys and pick the cheapest nprobe / efSearch that reaches the target; for an
index that re-ranks with raw vectors, then the fewest candidates per hit (``k_factor_rf``) that
keep it.
"""

from __future__ import annotations

import time

import numpy as np

from react_ray.formats.embedding_set import read_vectors
from react_ray.index.plan import factory_nlist, is_refined

KNOBS = {
    "ivf": ("nprobe", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]),
    "hnsw": ("efSearch", [16, 32, 64, 128, 256, 512, 1024]),
}
# candidates re-ranked per hit: 4-bit codes rank coarsely, so high recall needs many (500k x 128
# of CLIP's geometry, every list probed: recall@10 0.918 / 0.993 / 1.000 at 16 / 64 / 256)
REFINE_KNOB = ("k_factor_rf", [1, 2, 4, 8, 16, 32, 64, 128, 256])


def file_top_k(
    queries: np.ndarray, uri: str, column: str, k: int, chunk_rows: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (queries, k), of the exact top-k inner products in one embedding file,
    over chunks of its rows (a file of millions of vectors never meets the queries whole)."""
    ids, vectors = read_vectors(uri, column)
    best = _empty_top_k(len(queries), k)
    for start in range(0, len(ids), chunk_rows):
        scores = queries @ vectors[start : start + chunk_rows].T
        keep = first_top_k(scores, k)
        chunk_ids = ids[start : start + chunk_rows][keep]
        best = merge_top_k([best, (np.take_along_axis(scores, keep, 1), chunk_ids)], k)
    return best


def first_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Each row's positions of its k best scores, ties at the k-th broken by the earlier position,
    in position order: what a stable full sort would keep, in linear time (sorting every chunk
    took most of an index build's tuning: 23 s for 200 queries over 1M vectors)."""
    if scores.shape[1] <= k:
        return np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    kth = np.partition(scores, -k, axis=1)[:, -k, None]
    above = scores > kth
    ties = scores == kth
    room = k - above.sum(axis=1, keepdims=True)
    keep = above | (ties & (np.cumsum(ties, axis=1) <= room))
    return np.nonzero(keep)[1].reshape(len(scores), k)


def _empty_top_k(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)


def merge_top_k(parts, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of several (scores, ids) results for the same queries, merged as they come (an
    iterable, so results of many files are never all held at once). Ties keep the earlier."""
    best = None
    for scores, ids in parts:
        if best is None:
            best = _empty_top_k(len(scores), k)
        all_scores = np.concatenate([best[0], scores], axis=1)
        all_ids = np.concatenate([best[1], ids], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_ids, order, 1)
    return best


def exact_ground_truth(
    queries: np.ndarray, files, column: str, k: int, file_results=None
) -> np.ndarray:
    """Exact top-k ids by inner product over the embedding files. ``file_results(queries, files,
    column, k)`` yields each file's ``file_top_k`` (the index wiring runs them as Ray tasks);
    by default they are computed here, one file at a time."""
    results = (
        file_results(queries, files, column, k)
        if file_results
        else (file_top_k(queries, f.uri, column, k) for f in files)
    )
    return merge_top_k(results, k)[1]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t[t >= 0])) / k for f, t in zip(found, truth)]))


def knob_for(factory: str) -> tuple[str, list[int]] | None:
    last = factory.split(",")
    if any(part.startswith("IVF") for part in last):
        return KNOBS["ivf"]
    if "HNSW" in factory:
        return KNOBS["hnsw"]
    return None


def tune_search_params(
    index, factory: str, queries: np.ndarray, truth: np.ndarray, k: int, target: float
) -> dict:
    """Try the knob's values from cheap to costly; keep the first whose recall@k >= target. A
    re-ranked index is swept with the most candidates, then given the fewest that keep the
    recall reached."""
    knob = knob_for(factory)
    if knob is None:  # exact index: nothing to tune
        found = index.search(queries, k)[1]
        return {"params": {}, "recall": recall_at_k(found, truth), "target": target, "curve": []}
    name, values = knob
    if name == "nprobe":
        nlist = factory_nlist(factory)
        values = [v for v in values if v <= nlist] or [nlist]
    params = {REFINE_KNOB[0]: REFINE_KNOB[1][-1]} if is_refined(factory) else {}
    curve = []

    def first_reaching(name: str, values: list[int], goal: float) -> dict:
        for value in values:
            index.set_params({**params, name: value})
            start = time.perf_counter()
            found = index.search(queries, k)[1]
            ms = 1000 * (time.perf_counter() - start) / len(queries)
            recall = recall_at_k(found, truth)
            curve.append(
                {**params, name: value, "recall": round(recall, 4), "ms_per_query": round(ms, 4)}
            )
            if recall >= goal:
                break
        # the goal was out of reach: the best we measured, stated as such
        return curve[-1]

    chosen = first_reaching(name, values, target)
    params[name] = chosen[name]
    if is_refined(factory):
        chosen = first_reaching(REFINE_KNOB[0], REFINE_KNOB[1], min(target, chosen["recall"]))
        params[REFINE_KNOB[0]] = chosen[REFINE_KNOB[0]]
    index.set_params(params)
    return {
        "params": params,
        "recall": chosen["recall"],
        "target": target,
        "reached": chosen["recall"] >= target,
        "curve": curve,
    }
