"""REACT stage 1 for one task: class names x templates -> a deduplicated, labeled set of pairs.

Steps, each reported with counts before/after:
1. encode every prompt with the index's own model (a different model is an error);
2. search each prompt separately for ``k_per_prompt`` hits (image keys, caption keys or both);
3. score threshold, id blocklist, metadata filters;
4. within a class, one row per pair (best score and query kept, every matching query listed);
5. across classes, a pair claimed by several goes to the best-scoring class, or is dropped;
6. decontamination (optional): near-copies of evaluation images removed (see decontaminate.py);
7. near-duplicates (image embeddings closer than the threshold) removed, best score first;
8. per-class cap or balance.
All sorting is total (score, then id), so the same task gives the same output every time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from react_ray.formats import storage
from react_ray.formats.embedding_set import fetch_vectors
from react_ray.formats.retrieved_set import (
    DecontaminationRecord,
    RetrievalRecord,
    RetrievalStep,
    write_retrieved_set,
)
from react_ray.index.sharded import ShardedIndex
from react_ray.retrieve.decontaminate import Decontaminator
from react_ray.retrieve.task import TaskSpec

# the rest of a metadata record is the source's columns
BASE_FIELDS = (
    "id",
    "key",
    "url",
    "caption",
)
SOURCES = {"text-to-image": ("image",), "text-to-text": ("text",), "both": ("image", "text")}


@dataclass
class StepLog:
    """Counts per class after each step, for the report."""

    classes: list[str]
    steps: list[tuple[str, int, list[int]]] = field(default_factory=list)

    def record(self, step: str, frame: pd.DataFrame) -> None:
        counts = (
            np.bincount(frame["label"].to_numpy(int), minlength=len(self.classes))
            if len(frame)
            else np.zeros(len(self.classes), int)
        )
        self.steps.append((step, len(frame), counts.tolist()))

    def add(self, step: str, counts: list[int]) -> None:
        """A step counted elsewhere: pairs per class after it."""
        self.steps.append((step, int(sum(counts)), [int(c) for c in counts]))

    def __str__(self) -> str:
        return "\n".join(f"  {step:<34s} {total:>9,} pairs" for step, total, _ in self.steps)


def search_prompts(
    index: ShardedIndex,
    prompt_vectors: np.ndarray,
    prompts: list[tuple[int, str]],
    k: int,
    source: str,
    batch: int = 1024,
) -> pd.DataFrame:
    """One row per (prompt, hit): label, query, id, score, source."""
    frames = []
    for start in range(0, len(prompts), batch):
        scores, found = index.search(prompt_vectors[start : start + batch], k)
        chunk = prompts[start : start + batch]
        valid = found >= 0
        rows = np.repeat(np.arange(len(chunk)), valid.sum(1))
        frames.append(
            pd.DataFrame(
                {
                    "label": [chunk[r][0] for r in rows],
                    "query": [chunk[r][1] for r in rows],
                    "id": found[valid],
                    "score": scores[valid].astype(np.float32),
                    "source": source,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def merge_within_class(hits: pd.DataFrame) -> pd.DataFrame:
    """One row per (class, pair): its best score and query; all queries that found it, sorted;
    its sources joined by "+". Vectorized: a million pairs take seconds, not a Python call each."""
    keys = ["label", "id"]
    hits = hits.sort_values([*keys, "score", "query"], ascending=[True, True, False, True])
    best = hits.drop_duplicates(keys).reset_index(drop=True)
    distinct = hits.drop_duplicates([*keys, "query"]).sort_values([*keys, "query"])
    starts = np.flatnonzero(~distinct.duplicated(keys).to_numpy())
    queries = [q.tolist() for q in np.split(distinct["query"].to_numpy(object), starts[1:])]
    queries = queries if len(best) else []
    sources = pd.Series("", index=pd.MultiIndex.from_frame(best[keys]))
    for name in sorted(hits["source"].unique()):
        has = hits.assign(has=hits["source"] == name).groupby(keys)["has"].any()
        has = has.reindex(sources.index).to_numpy()
        sources = sources.where(~has, sources.where(sources == "", sources + "+") + name)
    return pd.DataFrame(
        {
            "label": best["label"].to_numpy(),
            "id": best["id"].to_numpy(),
            "score": best["score"].to_numpy(),
            "best_query": best["query"].to_numpy(object),
            "queries": queries,
            "source": sources.to_numpy(object),
        }
    )


def across_classes_keep(pairs: pd.DataFrame, rule: str) -> np.ndarray:
    """The mask of pairs the cross-class rule keeps: a pair claimed by several classes is kept
    for its best-scoring class (``best``, ties to the lower label) or dropped (``drop``)."""
    pairs = pairs.reset_index(drop=True)
    if rule == "drop":
        return (pairs.groupby("id")["label"].transform("size") == 1).to_numpy()
    ordered = pairs.sort_values(["id", "score", "label"], ascending=[True, False, True])
    keep = np.zeros(len(pairs), bool)
    keep[ordered.index[~ordered["id"].duplicated()].to_numpy()] = True
    return keep


def resolve_across_classes(pairs: pd.DataFrame, rule: str) -> pd.DataFrame:
    """A pair claimed by several classes: kept for its best-scoring class (``best``) or dropped."""
    return pairs[across_classes_keep(pairs, rule)].reset_index(drop=True)


# Up to this many pairs the close pairs come from an exact search; above it, from an IVF index
# over the retrieved vectors (each pair searched in the NEAR_DUP_NPROBE lists nearest to it):
# cost about N * N * nprobe / nlist instead of N * N. Duplicates sit close together, so they
# share lists; tests/test_retrieve.py measures the pairs found vs exact on planted duplicates.
NEAR_DUP_EXACT_UP_TO = 50_000
NEAR_DUP_NPROBE = 8


def close_pairs(
    vectors: np.ndarray, threshold: float, exact_up_to: int = NEAR_DUP_EXACT_UP_TO
) -> tuple[np.ndarray, np.ndarray]:
    """faiss range search of every vector against all: (limits, neighbours) with cosine above
    ``threshold``; exact up to ``exact_up_to`` vectors, approximate (IVF) above."""
    import faiss

    vectors = np.ascontiguousarray(vectors, np.float32)
    dim = vectors.shape[1]
    if len(vectors) <= exact_up_to:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(4 * np.sqrt(len(vectors)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), 64 * nlist), False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = NEAR_DUP_NPROBE
    index.add(vectors)
    limits, _, neighbours = index.range_search(vectors, threshold)
    return limits, neighbours


def keep_best_first(order: np.ndarray, limits: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Greedy, in ``order`` (best first): keep a vertex unless a kept one is among its neighbours
    (CSR: ``neighbours[limits[i]:limits[i + 1]]``, which may list ``i`` itself)."""
    kept = np.zeros(len(limits) - 1, bool)
    for i in order:
        close = neighbours[limits[i] : limits[i + 1]]
        kept[i] = not kept[close[close != i]].any()
    return kept


def remove_near_duplicates(
    pairs: pd.DataFrame,
    vectors: np.ndarray,
    threshold: float,
    exact_up_to: int = NEAR_DUP_EXACT_UP_TO,
) -> pd.DataFrame:
    """Best score first, drop a pair whose vector has cosine >= threshold with an already kept one.

    The close pairs come from one faiss range search (``close_pairs``), so this is not a Python
    double loop."""
    limits, neighbours = close_pairs(vectors, threshold, exact_up_to)
    order = np.lexsort((pairs["id"].to_numpy(), -pairs["score"].to_numpy()))
    return pairs[keep_best_first(order, limits, neighbours)].reset_index(drop=True)


def cap_per_class(pairs: pd.DataFrame, cap: int | None, balance: bool) -> pd.DataFrame:
    if balance and len(pairs):
        counts = pairs["label"].value_counts()
        cap = min(cap or counts.min(), counts.min())
    if cap is None:
        return pairs
    ordered = pairs.sort_values(["label", "score", "id"], ascending=[True, False, True])
    return ordered.groupby("label", sort=False).head(cap).reset_index(drop=True)


def filters_keep(metadata: list[dict | None], spec: TaskSpec) -> np.ndarray:
    """The mask of pairs whose metadata passes every filter; a pair without the column, or with a
    value of another type than the bound's, fails it (counted, not kept). Column-wise (pandas),
    not per row."""
    table = pd.DataFrame.from_records([m or {} for m in metadata], index=range(len(metadata)))
    keep = pd.Series(True, index=table.index)
    for column, bounds in spec.filters.items():
        if metadata and column not in table.columns:
            raise ValueError(
                f"filters: unknown metadata column {column!r}; this index has "
                f"{sorted(table.columns)}"
            )
        values = table[column] if column in table.columns else pd.Series(None, index=table.index)
        keep &= values.notna()
        if bounds.min is not None or bounds.max is not None:
            numbers = pd.to_numeric(values, errors="coerce")
            keep &= numbers.notna()
            if bounds.min is not None:
                keep &= numbers >= bounds.min
            if bounds.max is not None:
                keep &= numbers <= bounds.max
        if bounds.equals is not None:
            keep &= values == bounds.equals
        if bounds.not_contains is not None:
            text = values.astype(str).str.lower()
            keep &= ~text.str.contains(bounds.not_contains.lower(), regex=False)
    return keep.to_numpy(bool)


def apply_filters(pairs: pd.DataFrame, metadata: list[dict | None], spec: TaskSpec) -> pd.DataFrame:
    """The pairs :func:`filters_keep` keeps."""
    return pairs[filters_keep(metadata, spec)].reset_index(drop=True)


def read_blocklist(uri: str | None) -> set[int]:
    if not uri:
        return set()
    return {int(line) for line in storage.read_bytes(uri).decode().split() if line.strip()}


def retrieve(
    spec: TaskSpec,
    indices: dict[str, ShardedIndex],
    encode_texts,
    decontaminate: Decontaminator | None = None,
) -> tuple[pd.DataFrame, StepLog]:
    """Run the steps above. ``indices`` maps "image"/"text" to a loaded index; ``encode_texts``
    turns prompts into L2-normalised vectors with the indices' model."""
    missing = [s for s in SOURCES[spec.mode] if s not in indices]
    if missing:
        raise ValueError(f"mode {spec.mode!r} needs a {' and a '.join(missing)} index")
    log = StepLog(spec.classes)
    prompts = spec.prompts()
    vectors = np.concatenate(
        [
            np.asarray(encode_texts([p for _, p in prompts[i : i + 512]]), np.float32)
            for i in range(0, len(prompts), 512)
        ]
    )
    hits = pd.concat(
        [
            search_prompts(indices[s], vectors, prompts, spec.k_per_prompt, s)
            for s in SOURCES[spec.mode]
        ],
        ignore_index=True,
    )
    log.record("hits (all prompts, all indices)", hits)
    if spec.score_threshold is not None:
        hits = hits[hits["score"] >= spec.score_threshold].reset_index(drop=True)
        log.record(f"score >= {spec.score_threshold}", hits)
    pairs = merge_within_class(hits)
    log.record("deduplicated within class", pairs)
    blocked = read_blocklist(spec.blocklist)
    if blocked:
        pairs = pairs[~pairs["id"].isin(blocked)].reset_index(drop=True)
        log.record(f"blocklist ({len(blocked):,} ids)", pairs)
    index = next(iter(indices.values()))
    metadata = index.lookup(pairs["id"].to_numpy())
    if spec.filters:
        pairs = apply_filters(pairs, metadata, spec)
        log.record("metadata filters", pairs)
    pairs = resolve_across_classes(pairs, spec.cross_class)
    log.record(f"across classes ({spec.cross_class})", pairs)
    needs_vectors = len(pairs) and (
        decontaminate is not None or spec.near_duplicate_threshold is not None
    )
    vectors = (
        fetch_vectors(index.manifest.embeddings, pairs["id"].to_numpy()) if needs_vectors else None
    )
    if decontaminate is not None and len(pairs):
        captions = [(m or {}).get("caption") for m in index.lookup(pairs["id"].to_numpy())]
        keep = decontaminate(pairs, vectors, captions)
        pairs, vectors = pairs[keep].reset_index(drop=True), vectors[keep]
        log.record("decontaminated (eval sets)", pairs)
    if spec.near_duplicate_threshold is not None and len(pairs):
        pairs = remove_near_duplicates(pairs, vectors, spec.near_duplicate_threshold)
        log.record(f"near-duplicates (cos >= {spec.near_duplicate_threshold})", pairs)
    if spec.per_class_cap or spec.balance:
        pairs = cap_per_class(pairs, spec.per_class_cap, spec.balance)
        log.record("per-class cap / balance", pairs)
    pairs = pairs.sort_values(["label", "score", "id"], ascending=[True, False, True]).reset_index(
        drop=True
    )
    return with_metadata(pairs, index.lookup(pairs["id"].to_numpy()), spec.classes), log


def with_metadata(
    pairs: pd.DataFrame, metadata: list[dict | None], classes: list[str]
) -> pd.DataFrame:
    """``pairs`` with their class name and corpus metadata (row-aligned): key, url, caption, and
    the source's other columns as JSON in ``meta``."""
    records = [m or {} for m in metadata]
    pairs = pairs.copy()
    pairs.insert(2, "class", [classes[i] for i in pairs["label"]])
    for column in ("key", "url", "caption"):
        pairs[column] = [m.get(column) for m in records]
    pairs["meta"] = [
        json.dumps(extra)
        if (extra := {k: v for k, v in m.items() if k not in BASE_FIELDS})
        else None
        for m in records
    ]
    return pairs


def summary_table(log: StepLog) -> pd.DataFrame:
    """Classes x steps: how many pairs each class had after each step."""
    return pd.DataFrame({step: counts for step, _, counts in log.steps}, index=log.classes)


def write_outputs(
    output: str,
    spec: TaskSpec,
    pairs: pd.DataFrame,
    log: StepLog,
    decontamination: DecontaminationRecord | None = None,
) -> None:
    record = RetrievalRecord(
        task=spec.model_dump(mode="json"),
        steps=[RetrievalStep(step=s, pairs=n) for s, n, _ in log.steps],
        pairs=len(pairs),
        decontamination=decontamination,
    )
    write_retrieved_set(output, pairs, summary_table(log), record)
