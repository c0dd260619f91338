"""Building a sharded FAISS index on Ray from an embedding set.

```
embedding files --(uniform random sample across ALL files)--> train the quantizer once
   --(Ray tasks: add groups of files with their stable ids)--> partial indices
   --(one merge task per shard)--> shard-00000.index (+ .json: count, size, sha256; written last)
   --> tune search params on text queries
   --> manifest.json (written last)
index/metadata/part-NNNNNN.arrow   id -> key/url/caption in O(1) (dense by row, memory-mapped)
```
Every file is written atomically; a rerun reuses the trained quantizer, the partials and the
shards already written, so a killed build continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import faiss
import numpy as np
import ray
from tqdm.auto import tqdm

from react_ray.config import IndexConfig
from react_ray.fields import Resources
from react_ray.formats import storage
from react_ray.formats.embedding_set import (
    EmbeddingFile,
    EmbeddingSetInfo,
    committed_files,
    read_metadata,
    read_vectors,
)
from react_ray.formats.index_manifest import IndexAppend, IndexManifest, IndexShard
from react_ray.index.plan import plan_index, training_size
from react_ray.index.sharded import ShardedIndex, merge_into, refine_of, write_metadata_file
from react_ray.index.tune import exact_ground_truth, file_top_k, tune_search_params

KEY_COLUMNS = {"image": "img_emb", "text": "txt_emb"}


@ray.remote
def _sample_file(uri: str, column: str, positions: np.ndarray) -> np.ndarray:
    return read_vectors(uri, column, positions)[1]


def training_sample(
    files: list[EmbeddingFile], column: str, size: int, seed: int, tasks: Resources | None = None
) -> np.ndarray:
    """A uniform random sample across all files (never the first N rows), read in parallel."""
    total = sum(f.rows for f in files)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    bounds = np.cumsum([0] + [f.rows for f in files])
    refs = []
    for i, f in enumerate(files):
        local = picks[(picks >= bounds[i]) & (picks < bounds[i + 1])] - bounds[i]
        if len(local):
            refs.append(
                _sample_file.options(**(tasks or Resources()).ray_options()).remote(
                    f.uri, column, local
                )
            )
    return np.concatenate(ray.get(refs))


# The coarse quantizer's k-means iterations; faiss's default for IVF is 10. Five reach the same
# lists: recall@10 of caption queries at nprobe 8-512 within 0.002 of ten's, list sizes as even,
# in 30 s instead of 71 s (1M x 512, 4,096 lists, 262,144 points; 12 vs 25 s at 128-d).
COARSE_KMEANS_ITERATIONS = 5


def train(factory: str, sample: np.ndarray, use_gpu: bool) -> faiss.Index:
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return index
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.niter = COARSE_KMEANS_ITERATIONS
        if use_gpu:  # the coarse k-means on every GPU; the rest trains on CPU
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    index.train(sample)
    return index


@ray.remote
def _build_partial(
    trained: bytes, files: list[str], column: str, out_uri: str, metadata_dir: str
) -> int:
    """Add whole embedding files (with their stable ids) to a copy of the trained index."""
    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
    for uri in files:
        table = read_metadata(uri)
        ids_, vectors = read_vectors(uri, column)
        index.add_with_ids(vectors, ids_)
        name = uri.rsplit("/", 1)[-1].removesuffix(".parquet")
        write_metadata_file(storage.join(metadata_dir, f"{name}.arrow"), table)
    storage.write_bytes_atomic(out_uri, faiss.serialize_index(index).tobytes())
    return index.ntotal


@ray.remote
def _merge_shard(partial_uris: list[str], shard_uri: str) -> dict:
    """Merge a shard's partial indices into one file; return its count, size and checksum."""
    merged = None
    for uri in partial_uris:
        index = faiss.deserialize_index(np.frombuffer(storage.read_bytes(uri), np.uint8))
        if merged is None:
            merged = index
        else:
            merge_into(merged, index)
    data = faiss.serialize_index(merged).tobytes()
    storage.write_bytes_atomic(shard_uri, data)
    described = {
        "count": int(merged.ntotal),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    # written last: the shard is done
    storage.write_text_atomic(f"{shard_uri}.json", json.dumps(described))
    return described


def _top_k_on_tasks(config: IndexConfig):
    """Each embedding file's exact top-k on a Ray task; results merged as they complete."""

    def results(queries: np.ndarray, files, column: str, k: int):
        shared = ray.put(queries)
        remote = ray.remote(file_top_k).options(**config.tasks.ray_options())
        pending = [remote.remote(shared, f.uri, column, k) for f in files]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])

    return results


def _fingerprint(config: IndexConfig, factory: str, files: list[EmbeddingFile]) -> dict:
    return {
        "factory": factory,
        "keys": config.keys,
        "num_shards": config.num_shards,
        "seed": config.seed,
        "train_samples": config.train_samples,
        "files": [f.uri for f in files],
    }


def _check_fingerprint(output: str, fingerprint: dict) -> None:
    uri = storage.join(output, "_build.json")
    if storage.exists(uri):
        existing = json.loads(storage.read_bytes(uri))
        if existing != fingerprint:
            changed = sorted(k for k in fingerprint if existing.get(k) != fingerprint[k])
            hint = (
                "; to add new embedding files to it, run with --append"
                if changed == ["files"]
                else ""
            )
            raise ValueError(
                f"index output {output} holds another build (differs in {', '.join(changed)}); "
                f"use a new output directory{hint}"
            )
    else:
        storage.write_text_atomic(uri, json.dumps(fingerprint, indent=1))


def _text_queries(
    files: list[EmbeddingFile], count: int, seed: int, tasks: Resources
) -> tuple[np.ndarray, str]:
    """Caption embeddings of random pairs: the text queries retrieval really sends."""
    try:
        return training_sample(
            files, "txt_emb", count, seed + 1, tasks
        ), "caption embeddings (txt_emb)"
    except ValueError:
        return training_sample(
            files, "img_emb", count, seed + 1, tasks
        ), "image embeddings (no captions were embedded)"


def _trained_index(
    config: IndexConfig, files: list[EmbeddingFile], column: str, factory: str
) -> bytes:
    """The empty trained index, from the output when a previous run already trained it."""
    trained_uri = storage.join(config.output, "_trained.index")
    if storage.exists(trained_uri):
        return storage.read_bytes(trained_uri)
    size = training_size(factory, sum(f.rows for f in files), config.train_samples)
    sample = training_sample(files, column, size, config.seed, config.tasks)
    trained = faiss.serialize_index(train(factory, sample, config.use_gpu)).tobytes()
    storage.write_bytes_atomic(trained_uri, trained)
    return trained


def _build_shards(
    config: IndexConfig,
    shard_files: list[list[EmbeddingFile]],
    column: str,
    factory: str,
    trained: bytes,
    progress: bool,
    first: int = 0,
) -> list[str]:
    """Partial indices (groups of files) on Ray tasks, then one merge task per shard; skips what
    exists."""
    trained_ref = ray.put(trained)
    # an HNSW graph cannot merge: one task per shard
    mergeable = "HNSW" not in factory.split(",")[-1]
    metadata_dir = storage.join(config.output, "metadata")
    merges, shard_names = [], []
    for k, assigned in enumerate(shard_files, start=first):
        shard_names.append(f"shard-{k:05d}.index")
        shard_uri = storage.join(config.output, shard_names[-1])
        if storage.exists(f"{shard_uri}.json"):
            continue
        group = config.files_per_task if mergeable else max(1, len(assigned))
        tasks, uris = [], []
        for g in range(0, len(assigned), group):
            uris.append(
                storage.join(config.output, "_partials", f"shard-{k:05d}-{g // group:05d}.index")
            )
            if not storage.exists(uris[-1]):
                tasks.append(
                    _build_partial.options(**config.tasks.ray_options()).remote(
                        trained_ref,
                        [f.uri for f in assigned[g : g + group]],
                        column,
                        uris[-1],
                        metadata_dir,
                    )
                )
        merges.append((tasks, uris, shard_uri))
    with tqdm(total=len(merges), desc="build shards", unit="shard", disable=not progress) as bar:
        pending = []
        for tasks, uris, shard_uri in merges:  # every partial task is already running
            ray.get(tasks)
            pending.append(
                _merge_shard.options(**config.tasks.ray_options()).remote(uris, shard_uri)
            )
        while pending:
            done, pending = ray.wait(pending)
            ray.get(done)
            bar.update(len(done))
    return shard_names


def _describe_shard(output: str, name: str, files: list[EmbeddingFile]) -> IndexShard:
    """The manifest entry, from what the merge task recorded (no second read of the shard)."""
    described = json.loads(storage.read_bytes(storage.join(output, f"{name}.json")))
    return IndexShard(file=name, **described, embedding_files=[f.uri for f in files])


@dataclass(frozen=True)
class BuildPlan:
    info: EmbeddingSetInfo
    files: list[EmbeddingFile]
    column: str
    factory: str
    reason: str  # why this factory
    num_shards: int

    @property
    def vectors(self) -> int:
        return sum(f.rows for f in self.files)


def plan_build(config: IndexConfig) -> BuildPlan:
    """The committed embedding files, the factory (given or planned) and the shard count; refuses
    a GPU build without a GPU and an output holding another build's partial files."""
    info, files = committed_files(config.embeddings)
    total = sum(f.rows for f in files)
    if config.factory:
        factory, reason = config.factory, "from config"
    else:
        # image keys are searched with captions: text-to-image, a cross-modal search
        planned = plan_index(
            total, info.dim, config.memory_budget_gb * 2**30, cross_modal=config.keys == "image"
        )
        factory, reason = planned.factory, f"planned: {planned}"
    if config.use_gpu and faiss.get_num_gpus() == 0:
        raise ValueError(
            "use_gpu: this faiss build sees no GPU (faiss-cpu, or no device); "
            "install react-ray[gpu] on a GPU node or set use_gpu=false"
        )
    _check_fingerprint(config.output, _fingerprint(config, factory, files))
    num_shards = min(config.num_shards, len(files))  # a shard holds whole embedding files
    return BuildPlan(info, files, KEY_COLUMNS[config.keys], factory, reason, num_shards)


def build_planned(config: IndexConfig, plan: BuildPlan, progress: bool) -> IndexManifest:
    """Train, add, merge and tune on the connected Ray cluster; publish the manifest (version 1)."""
    start, timings = time.perf_counter(), {}
    files, column, factory = plan.files, plan.column, plan.factory
    t = time.perf_counter()
    trained = _trained_index(config, files, column, factory)
    timings["train"] = time.perf_counter() - t
    t = time.perf_counter()
    shard_files = [files[k :: plan.num_shards] for k in range(plan.num_shards)]
    names = _build_shards(config, shard_files, column, factory, trained, progress)
    shards = [
        _describe_shard(config.output, name, assigned) for name, assigned in zip(names, shard_files)
    ]
    timings["add_and_merge"] = time.perf_counter() - t

    info = plan.info
    manifest = IndexManifest(
        model=info.model,
        pretrained=info.pretrained,
        checkpoint=info.checkpoint,
        dim=info.dim,
        keys=config.keys,
        key_column=column,
        factory=factory,
        plan=plan.reason,
        ntotal=sum(s.count for s in shards),
        shards=shards,
        ids={"layout": info.id_layout, "source_id": info.source_id},
        embeddings=config.embeddings,
        train_samples=training_size(factory, plan.vectors, config.train_samples),
    )
    t = time.perf_counter()
    index = ShardedIndex(config.output, manifest=manifest, verify=False)
    queries, query_kind = _text_queries(files, config.tune_queries, config.seed, config.tasks)
    truth = exact_ground_truth(
        queries, files, column, config.recall_k, file_results=_top_k_on_tasks(config)
    )
    tuning = tune_search_params(
        index, factory, queries, truth, config.recall_k, config.target_recall
    )
    tuning["queries"] = f"{len(queries)} {query_kind} against {column} keys"
    timings["tune"] = time.perf_counter() - t
    manifest = manifest.model_copy(
        update={
            "search_params": tuning["params"],
            "tuning": tuning,
            "build_seconds": round(time.perf_counter() - start, 2),
            "seconds": {k: round(v, 2) for k, v in timings.items()},
        }
    )
    manifest.publish(config.output)
    storage.remove(storage.join(config.output, "_partials"), recursive=True)
    return manifest


def quantization_drift(trained: bytes, old: np.ndarray, new: np.ndarray) -> dict | None:
    """How much worse the trained index fits the new vectors than a sample of those it was built on
    (new / old): mean squared distance to the nearest coarse centroid, the coarse lists' imbalance
    factor, and the codes' mean squared reconstruction error (where codes are lossy). None for
    exact or graph indices, which have no trained quantizer."""
    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    ivf = faiss.downcast_index(ivf)
    refine = refine_of(index)  # re-ranked: the candidates come from the base index's codes
    codec = faiss.downcast_index(refine.base_index) if refine is not None else index
    figures = {}
    for name, raw in (("old", old), ("new", new)):
        x = raw
        if isinstance(index, faiss.IndexPreTransform):  # the quantizer sees transformed vectors
            for i in range(index.chain.size()):
                x = faiss.downcast_VectorTransform(index.chain.at(i)).apply(x)
        _, lists = ivf.quantizer.search(np.ascontiguousarray(x, np.float32), 1)
        if isinstance(ivf, faiss.IndexIVFPQFastScan):
            # its standalone codec crashes faiss 1.15: its product quantizer on the residuals
            r = np.ascontiguousarray(x - centroids[lists.ravel()] if ivf.by_residual else x)
            codes = np.sum((r - ivf.pq.decode(ivf.pq.compute_codes(r))) ** 2, axis=1)
        else:
            codes = np.sum((raw - codec.sa_decode(codec.sa_encode(raw))) ** 2, axis=1)
        counts = np.bincount(lists.ravel(), minlength=ivf.nlist).astype(np.float64)
        figures[name] = {
            "coarse_error": float(np.mean(np.sum((x - centroids[lists.ravel()]) ** 2, axis=1))),
            "imbalance": float(ivf.nlist * np.sum(counts**2) / np.sum(counts) ** 2),
            "code_error": float(np.mean(codes)),
        }
    drift = {"old": figures["old"], "new": figures["new"]}
    for key in ("coarse_error", "imbalance", "code_error"):
        before = figures["old"][key]
        drift[f"{key}_ratio"] = figures["new"][key] / before if before > 1e-9 else None
    return drift


# Drift ratios above these: retrain (rebuild into a new output).
DRIFT_WARNING = {"coarse_error_ratio": 1.2, "code_error_ratio": 1.2, "imbalance_ratio": 1.5}


APPEND_PLAN = "_append_plan.json"


def _append_plan(
    config: IndexConfig, manifest: IndexManifest, files: list[EmbeddingFile], indexed: set[str]
) -> tuple[list[list[EmbeddingFile]], bool]:
    """Which new files go into which new shard, and whether an interrupted append planned it.
    Fixed when an append starts (``_append_plan.json``) and kept by a rerun after a crash: files
    committed meanwhile, or another num_shards, would otherwise describe shards built from other
    files (listed-but-absent files, duplicate ids). They wait for the next append."""
    uri = storage.join(config.output, APPEND_PLAN)
    by_uri = {f.uri: f for f in files}
    if storage.exists(uri):
        plan = json.loads(storage.read_bytes(uri))
        if plan["version"] == manifest.version + 1:
            missing = [u for shard in plan["shards"] for u in shard if u not in by_uri]
            if missing:
                raise FileNotFoundError(
                    f"index --append: the interrupted append planned {missing[:3]}, which are "
                    f"gone from {config.embeddings}; restore them to finish it"
                )
            return [[by_uri[u] for u in shard] for shard in plan["shards"]], True
    new = [f for f in files if f.uri not in indexed]
    count = min(config.num_shards, len(new))
    shard_files = [new[k::count] for k in range(count)]
    if shard_files:
        storage.write_text_atomic(
            uri,
            json.dumps(
                {
                    "version": manifest.version + 1,
                    "shards": [[f.uri for f in shard] for shard in shard_files],
                }
            ),
        )
    return shard_files, False


@dataclass(frozen=True)
class AppendPlan:
    manifest: IndexManifest
    files: list[EmbeddingFile]  # every committed file of the embedding set
    shard_files: list[list[EmbeddingFile]]  # the new files, by the new shard they go into
    resumed: bool  # finishing an interrupted append, as it planned

    @property
    def new(self) -> list[EmbeddingFile]:
        return [f for shard in self.shard_files for f in shard]

    @property
    def indexed(self) -> list[EmbeddingFile]:
        """The files the index holds already."""
        held = {uri for shard in self.manifest.shards for uri in shard.embedding_files}
        return [f for f in self.files if f.uri in held]


def plan_append(config: IndexConfig) -> AppendPlan:
    """The committed embedding files the index does not hold yet, by new shard; refuses another
    model's, dim's or key kind's embeddings."""
    manifest = IndexManifest.read(config.output)
    info, files = committed_files(config.embeddings)
    for field in ("model", "dim"):
        if getattr(info, field) != getattr(manifest, field):
            raise ValueError(
                f"index --append: the embeddings have {field}={getattr(info, field)!r}; the "
                f"index at {config.output} was built with {field}={getattr(manifest, field)!r}"
            )
    if config.keys != manifest.keys:
        raise ValueError(
            f"index --append: keys={config.keys!r}, the index holds {manifest.keys!r} keys"
        )
    indexed = {uri for shard in manifest.shards for uri in shard.embedding_files}
    shard_files, resumed = _append_plan(config, manifest, files, indexed)
    return AppendPlan(manifest, files, shard_files, resumed)


def append_planned(config: IndexConfig, plan: AppendPlan, progress: bool) -> IndexManifest:
    """Add the plan's new files as new shards encoded with the build's trained quantizer, on the
    connected Ray cluster; publish the next manifest version. A rerun after a crash resumes."""
    start, manifest, new = time.perf_counter(), plan.manifest, plan.new
    column, factory = manifest.key_column, manifest.factory
    trained = storage.read_bytes(storage.join(config.output, "_trained.index"))
    sample = min(config.train_samples, 20_000)
    drift = quantization_drift(
        trained,
        training_sample(plan.indexed, column, sample, config.seed, config.tasks),
        training_sample(new, column, sample, config.seed, config.tasks),
    )
    names = _build_shards(
        config, plan.shard_files, column, factory, trained, progress, first=len(manifest.shards)
    )
    added = [
        _describe_shard(config.output, name, assigned)
        for name, assigned in zip(names, plan.shard_files)
    ]
    rows = sum(s.count for s in added)
    appended = IndexAppend(
        files=len(new), vectors=rows, drift=drift, seconds=round(time.perf_counter() - start, 2)
    )
    updated = manifest.model_copy(
        update={
            "shards": manifest.shards + added,
            "ntotal": manifest.ntotal + rows,
            "version": manifest.version + 1,
            "appends": [*manifest.appends, appended],
        }
    )
    updated.publish(config.output)
    storage.remove(storage.join(config.output, "_partials"), recursive=True)
    storage.remove(storage.join(config.output, APPEND_PLAN))
    return updated


def drift_over_limits(drift: dict | None) -> dict[str, float]:
    """The drift ratios above ``DRIFT_WARNING``: the new vectors' codes are less accurate than
    the build's, and a rebuild would retrain."""
    return {
        k: round(drift[k], 2)
        for k, limit in DRIFT_WARNING.items()
        if drift and (drift[k] or 0) > limit
    }
