"""Retrieval as a Ray Data job: the steps of ``retrieval.py`` over the cluster, the driver seeing
counts only.

    prompts -> PromptEncoder actors -> IndexSearcher actors (a pool per shard group) -> hits
    hits, grouped by the embedding file their id names -> FileSteps actors: score threshold,
        within-class merge, blocklist, metadata filters, cross-class rule, vectors,
        decontamination; each pair row carries the step that dropped it, or none
    kept pairs -> their home IVF list and the lists they probe -> grouped by list -> close pairs
        (range search) -> one task: keep-the-best over the close-pair graph -> ids dropped
    kept pairs, grouped by class -> sorted and capped, a file per class -> retrieved.parquet

Every hit of a pair lands in the group of the embedding file its id names, so each step up to
decontamination sees all of a pair's claims and gives ``retrieve``'s answer exactly. Near-
duplicates are exact up to ``NEAR_DUP_EXACT_UP_TO`` kept pairs (one list) and an IVF search
above (``NEAR_DUP_NPROBE`` lists per pair), as in ``close_pairs``; the keep-the-best rule is the
same. The per-class counts of the report come from one aggregation over the pair rows.
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from react_ray.config import ModelConfig, RetrieveConfig
from react_ray.fields import ActorPool
from react_ray.formats import ids, storage
from react_ray.formats.embedding_set import fetch_vectors, read_parquet
from react_ray.formats.index_manifest import IndexManifest
from react_ray.formats.retrieved_set import pairs_uri
from react_ray.index.sharded import MetadataStore, ShardedIndex, index_root
from react_ray.retrieve.decontaminate import Decontaminator, EvalImages
from react_ray.retrieve.retrieval import (
    NEAR_DUP_EXACT_UP_TO,
    NEAR_DUP_NPROBE,
    SOURCES,
    StepLog,
    across_classes_keep,
    filters_keep,
    keep_best_first,
    merge_within_class,
    read_blocklist,
    search_prompts,
    with_metadata,
)
from react_ray.retrieve.task import TaskSpec

PROMPTS_PER_BLOCK = 256
HITS_PER_SEARCH = 2_000_000  # prompts x k per search call: bounds a searcher's memory
# The steps that drop a pair in its file's group, in order ("" = kept).
SCORE, BLOCKLIST, FILTERS, ACROSS, DECONTAMINATED = (
    "score",
    "blocklist",
    "filters",
    "across classes",
    "decontaminated",
)
DROP_ORDER = (SCORE, BLOCKLIST, FILTERS, ACROSS, DECONTAMINATED)
OUTPUT_SCHEMA = pa.schema(
    [
        ("label", pa.int64()),
        ("id", pa.int64()),
        ("class", pa.string()),
        ("score", pa.float32()),
        ("best_query", pa.string()),
        ("queries", pa.list_(pa.string())),
        ("source", pa.string()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("meta", pa.string()),
    ]
)
PAIR_SCHEMA = pa.schema(
    [
        *OUTPUT_SCHEMA,
        ("hits", pa.int64()),
        ("hits_above", pa.int64()),
        ("dropped_by", pa.string()),
        ("vector", pa.binary()),  # float32 bytes of the pair's image embedding, when needed
        ("cosine", pa.float32()),  # decontamination: its closest eval image ...
        ("reason", pa.string()),
        ("eval_row", pa.int64()),
        ("eval_set", pa.string()),
        ("eval_id", pa.int64()),
        ("eval_key", pa.string()),
    ]
)
EDGE_SCHEMA = pa.schema(  # a close pair: each end's id, score and label
    [
        (f"{end}_{column}", kind)
        for end in "ab"
        for column, kind in (("id", pa.int64()), ("score", pa.float32()), ("label", pa.int64()))
    ]
)


class PromptEncoder:
    """Ray Data actor: a batch of prompts -> their L2-normalised text embeddings."""

    def __init__(self, model: ModelConfig, dim: int):
        from react_ray.models import build_model

        self.clip = build_model(model)
        if self.clip.embed_dim != dim:
            raise ValueError(
                f"model {model.name!r} embeds in {self.clip.embed_dim} dims; the index holds "
                f"{dim}-d vectors"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.clip.encode_texts([str(q) for q in batch["query"]]).numpy()
        return batch | {"vector": np.asarray(vectors, np.float32)}


class IndexSearcher:
    """Ray Data actor: encoded prompts -> one row per hit, searched in every index of the mode
    (its shard group of each); ``file`` names the embedding file of the hit's id."""

    def __init__(self, index_uris: dict[str, str], k: int, group: tuple[int, int] | None):
        self.k = k
        self.indices = {
            source: ShardedIndex(uri, group=group) for source, uri in index_uris.items()
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        prompts = list(zip(batch["label"].tolist(), [str(q) for q in batch["query"]]))
        hits = pd.concat(
            [
                search_prompts(index, batch["vector"], prompts, self.k, source)
                for source, index in self.indices.items()
            ],
            ignore_index=True,
        )
        return hits.assign(file=hits["id"].to_numpy() >> ids.ROW_BITS)


def top_k_per_prompt(hits: pd.DataFrame, k: int) -> pd.DataFrame:
    """The hits of several shard groups (one class's) -> each prompt's best ``k`` per source."""
    ordered = hits.sort_values(
        ["query", "source", "score", "id"], ascending=[True, True, False, True]
    )
    return ordered.groupby(["query", "source"], sort=False).head(k)


class FileSteps:
    """Ray Data actor: the hits of one embedding file's pairs -> one row per (class, pair) with
    the step that dropped it (``dropped_by``, "" when kept), its corpus metadata, and, while
    kept, its image embedding (``vector``) and decontamination columns."""

    def __init__(
        self,
        spec: TaskSpec,
        index_uri: str,
        vectors: bool,
        decontaminate: tuple | None,  # (DecontaminateConfig, ref to EvalImages)
    ):
        import ray

        self.spec, self.vectors = spec, vectors
        manifest = IndexManifest.read(index_uri)
        self.embeddings, self.key_column = manifest.embeddings, manifest.key_column
        self.metadata = MetadataStore(storage.join(index_root(index_uri), "metadata"))
        self.blocked = read_blocklist(spec.blocklist)
        self.decontaminator = (
            Decontaminator(decontaminate[0], ray.get(decontaminate[1]), spec.classes)
            if decontaminate
            else None
        )

    def __call__(self, hits: pd.DataFrame) -> pa.Table:
        spec = self.spec
        above = (
            hits if spec.score_threshold is None else hits[hits["score"] >= spec.score_threshold]
        )
        counts = pd.DataFrame(
            {
                "hits": hits.groupby(["label", "id"]).size(),
                "hits_above": above.groupby(["label", "id"]).size(),
            }
        )
        pairs = counts.fillna(0).astype(np.int64).reset_index()
        if len(above):
            pairs = pairs.merge(merge_within_class(above), on=["label", "id"], how="left")
        dropped = np.where(pairs["hits_above"].to_numpy() > 0, "", SCORE).astype(object)

        def drop(keep: np.ndarray, step: str) -> np.ndarray:
            """Mark the kept rows that ``keep`` (over them) rejects; -> the rows kept now."""
            alive = np.flatnonzero(dropped == "")
            dropped[alive[~keep]] = step
            return alive[keep]

        alive = np.flatnonzero(dropped == "")
        if self.blocked:
            alive = drop(~pairs["id"].iloc[alive].isin(self.blocked).to_numpy(), BLOCKLIST)
        metadata: list[dict | None] = [None] * len(pairs)
        for row, record in zip(alive, self.metadata.lookup(pairs["id"].to_numpy()[alive])):
            metadata[row] = record
        if spec.filters:
            alive = drop(filters_keep([metadata[r] for r in alive], spec), FILTERS)
        alive = drop(across_classes_keep(pairs.iloc[alive], spec.cross_class), ACROSS)
        vectors = np.zeros((len(pairs), 0), np.float32)
        if self.vectors and len(alive):
            found = fetch_vectors(self.embeddings, pairs["id"].to_numpy()[alive], self.key_column)
            vectors = np.zeros((len(pairs), found.shape[1]), np.float32)
            vectors[alive] = found
        out = with_metadata(pairs, metadata, spec.classes)
        if self.decontaminator is not None and len(alive):
            judged = self.decontaminator.judge(
                out.iloc[alive][["label", "id", "score"]],
                vectors[alive],
                [(metadata[r] or {}).get("caption") for r in alive],
            )
            for column in ("cosine", "reason", "eval_row", "eval_set", "eval_id", "eval_key"):
                out.loc[out.index[alive], column] = judged[column].to_numpy()
            alive = drop(judged["reason"].to_numpy() == "", DECONTAMINATED)
        out["dropped_by"] = dropped
        out["vector"] = None
        if vectors.shape[1]:
            out.loc[out.index[alive], "vector"] = pd.Series(
                [v.tobytes() for v in vectors[alive]], index=out.index[alive], dtype=object
            )
        return pa.Table.from_pandas(  # no pandas metadata: it names dtypes pandas then refuses
            out.reindex(columns=PAIR_SCHEMA.names), schema=PAIR_SCHEMA, preserve_index=False
        ).replace_schema_metadata(None)


def vector_matrix(column: pd.Series) -> np.ndarray:
    """A ``vector`` column (float32 bytes) -> (n, dim) float32."""
    return np.frombuffer(b"".join(column), np.float32).reshape(len(column), -1)


def train_lists(sample, nlist: int) -> np.ndarray:
    """k-means centroids of a (materialized) sample of the kept pairs' vectors, on a Ray task:
    the lists near-duplicates are bucketed by."""
    import faiss

    matrix = vector_matrix(sample.to_pandas()["vector"])
    kmeans = faiss.Kmeans(matrix.shape[1], nlist, niter=10, seed=0, spherical=True)
    kmeans.train(matrix)
    return kmeans.centroids


def list_rows(rows: pd.DataFrame, centroids, probes: int) -> pd.DataFrame:
    """Each kept pair once per list it probes; ``home`` on its nearest list, where it is stored."""
    if centroids is None:
        return rows.assign(list=0, home=True)
    import faiss
    import ray

    centroids = ray.get(centroids)  # a reference: Ray Data passes fn_kwargs as they are

    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(centroids)
    _, lists = quantizer.search(vector_matrix(rows["vector"]), probes)
    spread = rows.loc[rows.index.repeat(probes)].reset_index(drop=True)
    return spread.assign(list=lists.ravel(), home=np.tile(np.arange(probes) == 0, len(rows)))


def close_pairs_in_list(rows: pd.DataFrame, threshold: float) -> pa.Table:
    """One list: every pair probing it against those stored in it; (a, b) with cosine above
    ``threshold``, a != b."""
    import faiss

    stored = rows[rows["home"].to_numpy()]
    queries = vector_matrix(rows["vector"])
    index = faiss.IndexFlatIP(queries.shape[1])
    index.add(vector_matrix(stored["vector"]))
    limits, _, found = index.range_search(queries, threshold)
    a = rows.iloc[np.repeat(np.arange(len(rows)), np.diff(limits).astype(np.int64))]
    b = stored.iloc[found]
    distinct = a["id"].to_numpy() != b["id"].to_numpy()
    return pa.table(
        {
            f"{end}_{column}": frame[column].to_numpy()[distinct]
            for end, frame in (("a", a), ("b", b))
            for column in ("id", "score", "label")
        },
        schema=EDGE_SCHEMA,
    )


def _keep_best(edges, dropped_uri: str, classes: int) -> list[int]:
    """Ray task: the close-pair graph -> the ids the keep-the-best rule drops (written to
    ``dropped_uri``), counted per class. Only pairs with a close neighbour are vertices."""
    table = pa.concat_tables(
        [b.cast(EDGE_SCHEMA) for b in edges.iter_batches(batch_format="pyarrow")]
        or [EDGE_SCHEMA.empty_table()]
    )
    ends = [{c: table[f"{end}_{c}"].to_numpy() for c in ("id", "score", "label")} for end in "ab"]
    every = {c: np.concatenate([ends[0][c], ends[1][c]]) for c in ("id", "score", "label")}
    vertex, first = np.unique(every["id"], return_index=True)
    a, b = np.searchsorted(vertex, ends[0]["id"]), np.searchsorted(vertex, ends[1]["id"])
    source, target = np.concatenate([a, b]), np.concatenate([b, a])
    limits = np.concatenate([[0], np.cumsum(np.bincount(source, minlength=len(vertex)))]).astype(
        np.int64
    )
    neighbours = target[np.argsort(source, kind="stable")]
    order = np.lexsort((vertex, -every["score"][first]))
    kept = keep_best_first(order, limits, neighbours)
    with storage.atomic_writer(dropped_uri) as f:
        pq.write_table(pa.table({"id": vertex[~kept]}), f)
    return np.bincount(every["label"][first][~kept], minlength=classes).tolist()


def _kept(rows: pa.Table) -> pa.Table:
    return rows.filter(pc.equal(rows["dropped_by"], ""))


def _non_empty(dataset):
    """A materialized dataset without its empty blocks: ``map_groups`` leaves a block without
    columns for each shuffle partition that held no group, and a later shuffle refuses to
    concatenate it with the others (Ray 2.60)."""
    import ray

    return ray.data.from_arrow_refs(
        [
            entry.ref
            for bundle in dataset.iter_internal_ref_bundles()
            for entry in bundle.blocks
            if entry.metadata.num_rows
        ]
    )


@functools.cache
def _ids_in(uri: str) -> np.ndarray:
    return read_parquet(uri)["id"].to_numpy()


def _without(rows: pa.Table, dropped_uri: str) -> pa.Table:
    """Arrow in, Arrow out: the pair schema stays as it is (pandas would guess types per block)."""
    return rows.filter(pc.invert(pc.is_in(rows["id"], value_set=pa.array(_ids_in(dropped_uri)))))


def _write_class(rows: pd.DataFrame, folder: str, cap: int | None) -> pd.DataFrame:
    """One class's kept pairs, best first (score, then id), capped -> ``folder/LABEL.parquet``."""
    rows = rows.sort_values(["score", "id"], ascending=[False, True])
    rows = rows if cap is None else rows.head(cap)
    label = int(rows["label"].iloc[0])
    with storage.atomic_writer(storage.join(folder, f"{label:06d}.parquet")) as f:
        pq.write_table(
            pa.Table.from_pandas(
                rows[OUTPUT_SCHEMA.names], schema=OUTPUT_SCHEMA, preserve_index=False
            ).replace_schema_metadata(None),
            f,
        )
    return pd.DataFrame({"label": [label], "pairs": [len(rows)]})


def _concatenate(folder: str, labels: list[int], output: str) -> None:
    """Ray task: the class files, in class order, streamed into one parquet file."""
    with storage.atomic_writer(output) as f, pq.ParquetWriter(f, OUTPUT_SCHEMA) as writer:
        for label in labels:
            writer.write_table(read_parquet(storage.join(folder, f"{label:06d}.parquet")))
        if not labels:
            writer.write_table(OUTPUT_SCHEMA.empty_table())


def _decontamination_rows(rows: pd.DataFrame, report_pairs: int) -> pd.DataFrame:
    """Every pair decontamination removed, and the ``report_pairs`` closest it kept."""
    judged = rows[rows["reason"].notna()]
    removed = judged["reason"] != ""
    closest = judged[~removed].sort_values(["cosine", "id"], ascending=[False, True])
    return pd.concat([judged[removed], closest.head(report_pairs)]).drop(columns="vector")


@dataclass
class RetrievedOnRay:
    """What the driver learns of a retrieval: counts, the gallery's few pairs per class."""

    log: StepLog
    pairs: int
    gallery: pd.DataFrame
    seconds: dict[str, float]


def shuffle_partitions() -> int:
    """Partitions of each grouping: two per CPU of the cluster. Ray Data's default (200) costs a
    reduce task each, most of them empty on a small cluster."""
    import ray

    return max(2, int(2 * ray.cluster_resources().get("CPU", 1)))


def _actors(pool: ActorPool) -> dict:
    import ray

    compute = ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors)
    return {"compute": compute, **pool.ray_options()}


def retrieve_on_ray(
    spec: TaskSpec,
    config: RetrieveConfig,
    decontaminator: Decontaminator | None = None,
    eval_images: EvalImages | None = None,
    gallery_per_class: int = 0,
) -> RetrievedOnRay:
    """Run the steps on the connected Ray cluster; write ``retrieved.parquet`` to
    ``config.output``; ``decontaminator`` is given what it removed and the closest it kept."""
    import ray
    from ray.data.aggregate import Count, Sum

    index_uris = {
        source: uri
        for source, uri in (("image", config.image_index), ("text", config.text_index))
        if uri and source in SOURCES[spec.mode]
    }
    missing = [s for s in SOURCES[spec.mode] if s not in index_uris]
    if missing:
        raise ValueError(f"mode {spec.mode!r} needs a {' and a '.join(missing)} index")
    manifests = {s: IndexManifest.read(uri) for s, uri in index_uris.items()}
    for source, manifest in manifests.items():
        if manifest.model != config.model.name:
            raise ValueError(
                f"index {index_uris[source]} was built with model {manifest.model!r}, "
                f"not {config.model.name!r}: its vectors are not comparable to this model's"
            )
    first_uri, manifest = next(iter(index_uris.values())), next(iter(manifests.values()))
    work = storage.join(config.output, f"_work-{uuid.uuid4().hex[:8]}")
    seconds, started = {}, time.monotonic()

    def lap(stage: str) -> None:
        nonlocal started
        seconds[stage] = round(time.monotonic() - started, 2)
        started = time.monotonic()

    prompts = pd.DataFrame(spec.prompts(), columns=["label", "query"])
    batch = max(1, min(PROMPTS_PER_BLOCK, HITS_PER_SEARCH // spec.k_per_prompt))
    encoded = ray.data.from_pandas(
        [prompts.iloc[i : i + batch] for i in range(0, len(prompts), batch)]
    ).map_batches(
        PromptEncoder,
        batch_size=batch,
        fn_constructor_kwargs={"model": config.model, "dim": manifest.dim},
        **_actors(config.encoders),
    )
    groups = config.search_groups
    partitions = shuffle_partitions()
    searched = [
        encoded.map_batches(
            IndexSearcher,
            batch_size=batch,
            batch_format="numpy",
            fn_constructor_kwargs={
                "index_uris": index_uris,
                "k": spec.k_per_prompt,
                "group": (g, groups) if groups > 1 else None,
            },
            **_actors(config.searchers),
        )
        for g in range(groups)
    ]
    hits = searched[0]
    if groups > 1:
        hits = (
            hits.union(*searched[1:])
            .groupby("label", num_partitions=partitions)
            .map_groups(
                top_k_per_prompt,
                batch_format="pandas",
                fn_kwargs={"k": spec.k_per_prompt},
                **config.tasks.ray_options(),
            )
        )
    near_dups = spec.near_duplicate_threshold is not None
    shared_eval = (config.decontaminate, ray.put(eval_images)) if decontaminator else None
    pairs = (
        hits.groupby("file", num_partitions=partitions)
        .map_groups(
            FileSteps,
            batch_format="pandas",
            fn_constructor_kwargs={
                "spec": spec,
                "index_uri": first_uri,
                "vectors": near_dups or decontaminator is not None,
                "decontaminate": shared_eval,
            },
            **_actors(config.workers),
        )
        .materialize()
    )
    lap("search + per-file steps")
    pairs = _non_empty(pairs)

    counted = (
        pairs.groupby(["label", "dropped_by"], num_partitions=partitions)
        .aggregate(Count(), Sum("hits"), Sum("hits_above"))
        .to_pandas()
    )
    log = _step_log(spec, counted, decontaminator is not None, len(read_blocklist(spec.blocklist)))
    if decontaminator is not None:
        decontaminator.note(
            pairs.map_batches(
                _decontamination_rows,
                batch_format="pandas",
                fn_kwargs={"report_pairs": config.decontaminate.report_pairs},
            ).to_pandas()
        )
    kept = pairs.map_batches(_kept, batch_format="pyarrow")
    n = log.steps[-1][1]
    if near_dups and n:
        dropped_uri = storage.join(work, "near-duplicates.parquet")
        dropped = _near_duplicates(kept, spec, config, n, dropped_uri, partitions)
        kept = kept.map_batches(
            _without, batch_format="pyarrow", fn_kwargs={"dropped_uri": dropped_uri}
        )
        log.add(
            f"near-duplicates (cos >= {spec.near_duplicate_threshold})",
            (np.array(log.steps[-1][2]) - dropped).tolist(),
        )
        lap("near-duplicates")

    counts = np.array(log.steps[-1][2])
    cap = spec.per_class_cap
    if spec.balance and counts.any():
        smallest = int(counts[counts > 0].min())
        cap = min(cap or smallest, smallest)
    folder = storage.join(work, "classes")
    written = (
        kept.groupby("label", num_partitions=partitions)
        .map_groups(
            _write_class,
            batch_format="pandas",
            fn_kwargs={"folder": folder, "cap": cap},
            **config.tasks.ray_options(),
        )
        .to_pandas()
    )
    if spec.per_class_cap or spec.balance:
        per_class = np.zeros(len(spec.classes), np.int64)
        per_class[written["label"].to_numpy(int)] = written["pairs"].to_numpy()
        log.add("per-class cap / balance", per_class.tolist())
    labels = sorted(written["label"].astype(int).tolist())
    ray.get(
        ray.remote(_concatenate)
        .options(**config.tasks.ray_options())
        .remote(folder, labels, pairs_uri(config.output))
    )
    gallery = pd.concat(
        [
            read_parquet(storage.join(folder, f"{label:06d}.parquet"))
            .slice(0, gallery_per_class)
            .to_pandas()
            for label in labels
        ]
        or [OUTPUT_SCHEMA.empty_table().to_pandas()],
        ignore_index=True,
    )
    storage.remove(work, recursive=True)
    lap("class files + retrieved.parquet")
    return RetrievedOnRay(log, int(written["pairs"].sum()), gallery, seconds)


def _near_duplicates(
    kept, spec: TaskSpec, config: RetrieveConfig, n: int, dropped_uri: str, partitions: int
):
    """Write the ids the near-duplicate rule drops; -> how many per class."""
    import ray

    options = config.tasks.ray_options()
    nlist = 1 if n <= NEAR_DUP_EXACT_UP_TO else int(4 * np.sqrt(n))
    vectors = kept.select_columns(["id", "label", "score", "vector"])
    centroids = None
    if nlist > 1:  # the tasks below run on datasets already computed: none waits for a CPU
        sample = vectors.random_sample(min(1.0, 64 * nlist / n), seed=0).limit(64 * nlist)
        centroids = ray.remote(train_lists).options(**options).remote(sample.materialize(), nlist)
        ray.wait([centroids], fetch_local=False)
    edges = (
        vectors.map_batches(
            list_rows,
            batch_format="pandas",
            fn_kwargs={"centroids": centroids, "probes": min(NEAR_DUP_NPROBE, nlist)},
        )
        .groupby("list", num_partitions=partitions)
        .map_groups(
            close_pairs_in_list,
            batch_format="pandas",
            fn_kwargs={"threshold": spec.near_duplicate_threshold},
            **options,
        )
        .materialize()
    )
    return np.array(
        ray.get(
            ray.remote(_keep_best).options(**options).remote(edges, dropped_uri, len(spec.classes))
        )
    )


def _step_log(spec: TaskSpec, counted: pd.DataFrame, decontaminated: bool, blocked: int) -> StepLog:
    """The per-class counts after each step, from (label, dropped_by) -> count, hits sums."""
    log = StepLog(spec.classes)

    def per_class(column: str, rows: pd.Series) -> list[int]:
        sums = counted[rows].groupby("label")[column].sum()
        out = np.zeros(len(spec.classes), np.int64)
        out[sums.index.to_numpy(int)] = sums.to_numpy()
        return out.tolist()

    everything = pd.Series(True, index=counted.index)
    log.add("hits (all prompts, all indices)", per_class("sum(hits)", everything))
    if spec.score_threshold is not None:
        log.add(f"score >= {spec.score_threshold}", per_class("sum(hits_above)", everything))
    steps = [
        ("deduplicated within class", SCORE, True),
        (f"blocklist ({blocked:,} ids)", BLOCKLIST, blocked > 0),
        ("metadata filters", FILTERS, bool(spec.filters)),
        (f"across classes ({spec.cross_class})", ACROSS, True),
        ("decontaminated (eval sets)", DECONTAMINATED, decontaminated),
    ]
    for name, step, shown in steps:
        later = set(DROP_ORDER[DROP_ORDER.index(step) + 1 :]) | {""}
        if shown:
            log.add(name, per_class("count()", counted["dropped_by"].isin(later)))
    return log
