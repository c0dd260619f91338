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
import pyarrow.parquet as pq
import ray
from tqdm.auto import tqdm

from react_ray import storage
from react_ray.config import IndexConfig
from react_ray.embed.outputs import column_matrix, is_done, read_metadata, read_parquet
from react_ray.index.plan import format_bytes, plan_index
from react_ray.index.sharded import (
    MANIFEST,
    MetadataStore,
    ShardedIndex,
    read_manifest,
    write_metadata_file,
)
from react_ray.index.tune import exact_ground_truth, tune_search_params
from react_ray.leases import holds_lease
from react_ray.ray_utils import connect

KEY_COLUMNS = {"image": "img_emb", "text": "txt_emb"}


@dataclass(frozen=True)
class EmbeddingFile:
    uri: str
    rows: int

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1].removesuffix(".parquet")


def embedding_set(uri: str) -> tuple[dict, list[EmbeddingFile]]:
    """The set's ``_embedding.json`` and its committed files (those with a completion marker)."""
    info_uri = storage.join(uri, "_embedding.json")
    if not storage.exists(info_uri):
        raise FileNotFoundError(f"embeddings: {uri} has no _embedding.json (not written by `react-ray embed`)")
    info = json.loads(storage.read_bytes(info_uri))
    files = []
    for file_uri in storage.list_files(uri, ".parquet"):
        name = file_uri.rsplit("/", 1)[-1].removesuffix(".parquet")
        if is_done(uri, name):
            with storage.open_uri(file_uri) as f:
                files.append(EmbeddingFile(file_uri, pq.ParquetFile(f).metadata.num_rows))
    if not files:
        raise FileNotFoundError(f"embeddings: no committed embedding files in {uri}")
    return info, files


def read_vectors(uri: str, column: str, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of one embedding file, optionally only the rows at ``positions``."""
    table = read_parquet(uri, ["id", column])
    if positions is not None:
        table = table.take(positions)
    if table.num_rows and table[column].null_count == table.num_rows:
        raise ValueError(f"{uri}: column {column!r} is empty (ingested without text embeddings?); "
                         "index keys=image instead")
    return table["id"].to_numpy(), np.ascontiguousarray(column_matrix(table, column), np.float32)


@ray.remote
def _sample_file(uri: str, column: str, positions: np.ndarray) -> np.ndarray:
    return read_vectors(uri, column, positions)[1]


def training_sample(files: list[EmbeddingFile], column: str, size: int, seed: int, num_cpus: float = 1) -> np.ndarray:
    """A uniform random sample across all files (never the first N rows), read in parallel."""
    total = sum(f.rows for f in files)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    bounds = np.cumsum([0] + [f.rows for f in files])
    refs = []
    for i, f in enumerate(files):
        local = picks[(picks >= bounds[i]) & (picks < bounds[i + 1])] - bounds[i]
        if len(local):
            refs.append(_sample_file.options(num_cpus=num_cpus).remote(f.uri, column, local))
    return np.concatenate(ray.get(refs))


def train(factory: str, sample: np.ndarray, use_gpu: bool) -> faiss.Index:
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return index
    if use_gpu:  # k-means of the coarse quantizer on every GPU; the rest trains on CPU
        ivf = faiss.extract_index_ivf(index)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    index.train(sample)
    return index


@ray.remote
def _build_partial(trained: bytes, files: list[str], column: str, out_uri: str, metadata_dir: str) -> int:
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
            merged.merge_from(index, 0)  # 0: keep the stable ids as they are
    data = faiss.serialize_index(merged).tobytes()
    storage.write_bytes_atomic(shard_uri, data)
    described = {"count": int(merged.ntotal), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    storage.write_text_atomic(f"{shard_uri}.json", json.dumps(described))  # written last: the shard is done
    return described


def _fingerprint(config: IndexConfig, factory: str, files: list[EmbeddingFile]) -> dict:
    return {"factory": factory, "keys": config.keys, "num_shards": config.num_shards, "seed": config.seed,
            "train_samples": config.train_samples, "files": [f.uri for f in files]}


def _check_fingerprint(output: str, fingerprint: dict) -> None:
    uri = storage.join(output, "_build.json")
    if storage.exists(uri):
        existing = json.loads(storage.read_bytes(uri))
        if existing != fingerprint:
            changed = sorted(k for k in fingerprint if existing.get(k) != fingerprint[k])
            hint = "; to add new embedding files to it, run with --append" if changed == ["files"] else ""
            raise ValueError(f"index output {output} holds another build (differs in {', '.join(changed)}); "
                             f"use a new output directory{hint}")
    else:
        storage.write_text_atomic(uri, json.dumps(fingerprint, indent=1))


def _text_queries(files: list[EmbeddingFile], count: int, seed: int, num_cpus: float) -> tuple[np.ndarray, str]:
    """Caption embeddings of random pairs: the text queries retrieval really sends."""
    try:
        return training_sample(files, "txt_emb", count, seed + 1, num_cpus), "caption embeddings (txt_emb)"
    except ValueError:
        return training_sample(files, "img_emb", count, seed + 1, num_cpus), "image embeddings (no captions were embedded)"


def _trained_index(config: IndexConfig, files: list[EmbeddingFile], column: str, factory: str) -> bytes:
    """The empty trained index, from the output when a previous run already trained it."""
    trained_uri = storage.join(config.output, "_trained.index")
    if storage.exists(trained_uri):
        return storage.read_bytes(trained_uri)
    sample = training_sample(files, column, config.train_samples, config.seed, config.task_num_cpus)
    trained = faiss.serialize_index(train(factory, sample, config.use_gpu)).tobytes()
    storage.write_bytes_atomic(trained_uri, trained)
    return trained


def _build_shards(config: IndexConfig, shard_files: list[list[EmbeddingFile]], column: str, factory: str,
                  trained: bytes, progress: bool, first: int = 0) -> list[str]:
    """Partial indices (groups of files) on Ray tasks, then one merge task per shard; skips what exists."""
    trained_ref = ray.put(trained)
    mergeable = "HNSW" not in factory.split(",")[-1]  # an HNSW graph cannot merge: one task per shard
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
            uris.append(storage.join(config.output, "_partials", f"shard-{k:05d}-{g // group:05d}.index"))
            if not storage.exists(uris[-1]):
                tasks.append(_build_partial.options(num_cpus=config.task_num_cpus).remote(
                    trained_ref, [f.uri for f in assigned[g:g + group]], column, uris[-1], metadata_dir))
        merges.append((tasks, uris, shard_uri))
    with tqdm(total=len(merges), desc="build shards", unit="shard", disable=not progress) as bar:
        pending = []
        for tasks, uris, shard_uri in merges:  # every partial task is already running
            ray.get(tasks)
            pending.append(_merge_shard.options(num_cpus=config.task_num_cpus).remote(uris, shard_uri))
        while pending:
            done, pending = ray.wait(pending)
            ray.get(done)
            bar.update(len(done))
    return shard_names


def _describe_shard(output: str, name: str, files: list[EmbeddingFile]) -> dict:
    """The manifest entry, from what the merge task recorded (no second read of the shard)."""
    described = json.loads(storage.read_bytes(storage.join(output, f"{name}.json")))
    return {"file": name, **described, "embedding_files": [f.uri for f in files]}


@holds_lease("index")
def build_index(config: IndexConfig, progress: bool = True) -> dict:
    """Build (or finish building) the index; return its manifest."""
    start = time.perf_counter()
    info, files = embedding_set(config.embeddings)
    column = KEY_COLUMNS[config.keys]
    total = sum(f.rows for f in files)
    if config.factory:
        factory, reason = config.factory, "from config"
    else:
        plan = plan_index(total, info["dim"], config.memory_budget_gb * 2**30)
        factory, reason = plan.factory, f"planned: {plan}"
    num_shards = min(config.num_shards, len(files))  # a shard holds whole embedding files
    print(f"index: {total:,} x {info['dim']} {column} vectors in {len(files)} files -> {factory} ({reason}), "
          f"{num_shards} shards" + (f" ({config.num_shards} asked; fewer files)" if num_shards < config.num_shards else ""))
    if config.use_gpu and faiss.get_num_gpus() == 0:
        raise ValueError("use_gpu: this faiss build sees no GPU (faiss-cpu, or no device); "
                         "install react-ray[gpu] on a GPU node or set use_gpu=false")
    _check_fingerprint(config.output, _fingerprint(config, factory, files))
    connect(config.ray_address)
    timings = {}

    t = time.perf_counter()
    trained = _trained_index(config, files, column, factory)
    timings["train"] = time.perf_counter() - t
    t = time.perf_counter()
    shard_files = [files[k::num_shards] for k in range(num_shards)]
    names = _build_shards(config, shard_files, column, factory, trained, progress)
    shards = [_describe_shard(config.output, name, assigned) for name, assigned in zip(names, shard_files)]
    timings["add_and_merge"] = time.perf_counter() - t

    manifest = {
        "format": "react-ray-index/1", "model": info["model"], "pretrained": info.get("pretrained"),
        "checkpoint": info.get("checkpoint"), "dim": info["dim"], "metric": "inner_product", "keys": config.keys,
        "key_column": column, "factory": factory, "plan": reason, "ntotal": sum(s["count"] for s in shards),
        "shards": shards, "ids": {"layout": info.get("id_layout"), "source_id": info.get("source_id")},
        "metadata": "metadata/", "embeddings": config.embeddings, "train_samples": min(config.train_samples, total),
        "search_params": {},
    }
    t = time.perf_counter()
    index = ShardedIndex(config.output, manifest=manifest, verify=False)
    queries, query_kind = _text_queries(files, config.tune_queries, config.seed, config.task_num_cpus)
    truth = exact_ground_truth(queries, files, column, config.recall_k)
    tuning = tune_search_params(index, factory, queries, truth, config.recall_k, config.target_recall)
    tuning["queries"] = f"{len(queries)} {query_kind} against {column} keys"
    timings["tune"] = time.perf_counter() - t
    manifest["search_params"], manifest["tuning"] = tuning["params"], tuning
    manifest["build_seconds"] = round(time.perf_counter() - start, 2)
    manifest["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    manifest["version"] = 1
    publish_manifest(config.output, manifest)
    storage.remove(storage.join(config.output, "_partials"), recursive=True)
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    print(f"index: {manifest['ntotal']:,} vectors in {len(shards)} shards "
          f"({format_bytes(sum(s['bytes'] for s in shards))}); search params {tuning['params'] or 'none (exact)'} "
          f"give recall@{config.recall_k} {tuning['recall']:.3f} on {tuning['queries']}; "
          f"built in {manifest['build_seconds']:.1f}s ({phases})")
    return manifest


__all__ = ["MetadataStore", "build_index", "embedding_set", "read_vectors", "training_sample"]


def publish_manifest(output: str, manifest: dict) -> None:
    """Keep ``manifest-vN.json``, then swap ``manifest.json`` in one atomic write: a reader sees the
    previous version or this one, never a mix (shard files are immutable once listed)."""
    text = json.dumps(manifest, indent=1)
    storage.write_text_atomic(storage.join(output, f"manifest-v{manifest['version']}.json"), text)
    storage.write_text_atomic(storage.join(output, MANIFEST), text)


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
    figures = {}
    for name, x in (("old", old), ("new", new)):
        codes = np.sum((x - index.sa_decode(index.sa_encode(x))) ** 2, axis=1)
        if isinstance(index, faiss.IndexPreTransform):  # the coarse quantizer sees transformed vectors
            for i in range(index.chain.size()):
                x = faiss.downcast_VectorTransform(index.chain.at(i)).apply(x)
        _, lists = ivf.quantizer.search(np.ascontiguousarray(x, np.float32), 1)
        counts = np.bincount(lists.ravel(), minlength=ivf.nlist).astype(np.float64)
        figures[name] = {"coarse_error": float(np.mean(np.sum((x - centroids[lists.ravel()]) ** 2, axis=1))),
                         "imbalance": float(ivf.nlist * np.sum(counts ** 2) / np.sum(counts) ** 2),
                         "code_error": float(np.mean(codes))}
    drift = {"old": figures["old"], "new": figures["new"]}
    for key in ("coarse_error", "imbalance", "code_error"):
        before = figures["old"][key]
        drift[f"{key}_ratio"] = figures["new"][key] / before if before > 1e-9 else None
    return drift


DRIFT_WARNING = {"coarse_error_ratio": 1.2, "code_error_ratio": 1.2, "imbalance_ratio": 1.5}  # retrain above


APPEND_PLAN = "_append_plan.json"


def _append_plan(config: IndexConfig, manifest: dict, files: list[EmbeddingFile], indexed: set[str]
                 ) -> list[list[EmbeddingFile]]:
    """Which new files go into which new shard. Fixed when an append starts (``_append_plan.json``)
    and kept by a rerun after a crash: files committed meanwhile, or another num_shards, would
    otherwise describe shards built from other files (listed-but-absent files, duplicate ids).
    They wait for the next append."""
    uri = storage.join(config.output, APPEND_PLAN)
    by_uri = {f.uri: f for f in files}
    if storage.exists(uri):
        plan = json.loads(storage.read_bytes(uri))
        if plan["version"] == manifest.get("version", 1) + 1:
            missing = [u for shard in plan["shards"] for u in shard if u not in by_uri]
            if missing:
                raise FileNotFoundError(f"index --append: the interrupted append planned {missing[:3]}, which are "
                                        f"gone from {config.embeddings}; restore them to finish it")
            print(f"index --append: resuming the interrupted append to version {plan['version']} "
                  f"({sum(map(len, plan['shards']))} files in {len(plan['shards'])} shards, as planned)")
            return [[by_uri[u] for u in shard] for shard in plan["shards"]]
    new = [f for f in files if f.uri not in indexed]
    count = min(config.num_shards, len(new))
    shard_files = [new[k::count] for k in range(count)]
    if shard_files:
        storage.write_text_atomic(uri, json.dumps({"version": manifest.get("version", 1) + 1,
                                                   "shards": [[f.uri for f in shard] for shard in shard_files]}))
    return shard_files


@holds_lease("index --append")
def append_to_index(config: IndexConfig, progress: bool = True) -> dict:
    """Add the committed embedding files the index does not hold yet, as new shards encoded with the
    same trained quantizer; publish the next manifest version. Rerunning after a crash resumes;
    one build or append per index at a time (``leases``)."""
    start = time.perf_counter()
    manifest = read_manifest(config.output)
    info, files = embedding_set(config.embeddings)
    for field in ("model", "dim"):
        if info[field] != manifest[field]:
            raise ValueError(f"index --append: the embeddings have {field}={info[field]!r}; the index at "
                             f"{config.output} was built with {field}={manifest[field]!r}")
    if config.keys != manifest["keys"]:
        raise ValueError(f"index --append: keys={config.keys!r}, the index holds {manifest['keys']!r} keys")
    indexed = {uri for shard in manifest["shards"] for uri in shard["embedding_files"]}
    shard_files = _append_plan(config, manifest, files, indexed)
    new = [f for shard in shard_files for f in shard]
    if not new:
        print(f"index --append: all {len(files)} embedding files are indexed already (version {manifest['version']})")
        return manifest
    connect(config.ray_address)
    column, factory = manifest["key_column"], manifest["factory"]
    trained = storage.read_bytes(storage.join(config.output, "_trained.index"))
    old_files = [f for f in files if f.uri in indexed]
    sample = min(config.train_samples, 20_000)
    drift = quantization_drift(trained, training_sample(old_files, column, sample, config.seed, config.task_num_cpus),
                               training_sample(new, column, sample, config.seed, config.task_num_cpus))
    names = _build_shards(config, shard_files, column, factory, trained, progress, first=len(manifest["shards"]))
    added = [_describe_shard(config.output, name, assigned) for name, assigned in zip(names, shard_files)]
    rows = sum(s["count"] for s in added)
    updated = manifest | {
        "shards": manifest["shards"] + added, "ntotal": manifest["ntotal"] + rows,
        "version": manifest.get("version", 1) + 1,
        "appends": [*manifest.get("appends", []), {"files": len(new), "vectors": rows, "drift": drift,
                                                   "seconds": round(time.perf_counter() - start, 2)}],
    }
    publish_manifest(config.output, updated)
    storage.remove(storage.join(config.output, "_partials"), recursive=True)
    storage.remove(storage.join(config.output, APPEND_PLAN))
    print(f"index --append: {rows:,} vectors from {len(new)} files in {len(added)} new shards; "
          f"{updated['ntotal']:,} in all, version {updated['version']} ({time.perf_counter() - start:.1f}s)")
    over = {k: round(drift[k], 2) for k, limit in DRIFT_WARNING.items() if drift and (drift[k] or 0) > limit}
    if over:
        print(f"index --append: WARNING the new vectors drift from the build's: {over} (limits {DRIFT_WARNING}); "
              f"their codes are less accurate than the original's; rebuilding into a new output would retrain")
    return updated
