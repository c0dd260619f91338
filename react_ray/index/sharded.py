"""Searching a sharded index: load a manifest, search its shards as one (IVF shards of a build
joined under their shared coarse quantizer; others side by side, merged into the exact global
top-k), and look ids up in O(1) without loading all metadata.

The manifest (:class:`~react_ray.formats.index_manifest.IndexManifest`, written last by the
build) names the model, dim, factory, search parameters and, per shard, its file, count and sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pyarrow as pa
from faiss import swig_ptr

from react_ray.formats import ids, storage
from react_ray.formats.embedding_set import fetch_vectors
from react_ray.formats.index_manifest import IndexManifest, IndexShard


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def index_root(index_uri: str) -> str:
    return index_uri.rsplit("/", 1)[0] if index_uri.endswith(".json") else index_uri


def load_shard(
    uri: str, expected: IndexShard | None = None, verify: bool = True, memory_map: bool = True
) -> faiss.Index:
    """Read one shard, memory-mapped where asked and the index type allows; errors name the file."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"index shard missing: {uri}")
    path = storage.local_copy(uri)
    if expected and verify:
        size = os.path.getsize(path)
        if size != expected.bytes or sha256_file(path) != expected.sha256:
            raise ValueError(
                f"index shard {uri} is corrupt: {size} bytes, checksum differs from the manifest "
                f"({expected.bytes} bytes, sha256 {expected.sha256[:12]}...)"
            )
    if memory_map:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            pass  # this index type cannot be memory-mapped: read it whole
    try:
        return faiss.read_index(path)
    except RuntimeError as error:
        raise ValueError(
            f"index shard {uri} cannot be read by faiss: {str(error).splitlines()[0]}"
        ) from None


def is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def refine_of(index: faiss.Index) -> faiss.IndexRefine | None:
    """The re-ranking layer of an ``IDMap,IVF..,PQ..x4fs,RFlat`` index (fast-scan codes find
    candidates, the raw vectors re-rank them), or None for any other layout."""
    if isinstance(index, faiss.IndexIDMap):
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexRefine):
            return inner
    return None


# Candidates one query re-ranks, whatever k: REACT's retrieval asks for up to 100,000 hits per
# prompt in batches of 1,024, and 10,000 x k_factor 64 would ask the codes for 7.9 GB of them.
MAX_CANDIDATES = 32_768


def refine_params(refine: faiss.IndexRefine | None, k: int) -> faiss.SearchParameters | None:
    """Per-search parameters that keep ``k * k_factor_rf`` within ``MAX_CANDIDATES`` (never below
    k), or None where the index's own apply (``refine``: :func:`refine_of` the index)."""
    if refine is None or k * refine.k_factor <= MAX_CANDIDATES:
        return None
    return faiss.IndexRefineSearchParameters(k_factor=max(1.0, MAX_CANDIDATES / k))


def candidates(refine: faiss.IndexRefine | None, k: int) -> int:
    """Hits a search of ``k`` asks the codes for: ``k``, or ``k * k_factor_rf`` to re-rank, within
    ``MAX_CANDIDATES`` (as :func:`refine_params` keeps it)."""
    return k if refine is None else max(k, min(int(k * refine.k_factor), MAX_CANDIDATES))


def fast_scan_implem(queries: int, dim: int, nprobe: int, wanted: int) -> int:
    """Which of faiss's fast-scan search routines (``IndexIVFFastScan.implem``) serves ``queries``
    ``dim``-d queries probing ``nprobe`` lists for ``wanted`` hits each. faiss's own choice (0)
    scans a single query's lists on one thread and gives each thread a slice of a batch, each
    slice coarse-quantized on its own; 14 (heap) and 15 (reservoir, faiss's own pick past 20
    hits) quantize a batch at once and spread its (query, list) pairs over the threads. Measured
    side by side on 1M x 128 and x 512, 2 cores: one query, x 512 from 16 lists on 1.1-1.7x
    faster (nprobe 1024: 6.80 -> 3.89 ms), x 128 from 128 on 1.2-1.5x and even at 16-64; batches
    of 256 at 512-d, up to 64 lists and 100 hits, 1.1-2.0x (nprobe 1: 0.071 -> 0.035 ms a
    query), where at 128-d faiss's choice stays faster."""
    spread = 14 if wanted <= 20 else 15
    if queries == 1:
        return spread if nprobe >= 16 else 0
    return spread if dim >= 256 and nprobe <= 64 and wanted <= 100 else 0


def merge_into(target: faiss.Index, other: faiss.Index) -> None:
    """Append ``other``'s vectors, stable ids kept, to ``target``: two indices of one trained build.
    faiss merges IVF and flat indices itself, not a re-ranked one: its codes, raw vectors (both
    numbered by row) and id map are appended one by one."""
    refine, other_refine = refine_of(target), refine_of(other)
    if refine is None:
        target.merge_from(other, 0)  # 0: keep the stable ids as they are
        return
    # the other's rows 0..n-1 follow the target's
    faiss.downcast_index(refine.base_index).merge_from(
        faiss.downcast_index(other_refine.base_index), refine.ntotal
    )
    faiss.downcast_index(refine.refine_index).merge_from(
        faiss.downcast_index(other_refine.refine_index), 0
    )
    refine.ntotal += other_refine.ntotal
    id_map = np.concatenate([faiss.vector_to_array(m) for m in (target.id_map, other.id_map)])
    faiss.copy_array_to_vector(id_map, target.id_map)
    target.ntotal = len(id_map)


def merged_ivf(parts: list[tuple[tuple[str, ...], faiss.Index, bool]]) -> faiss.Index:
    """IVF shards of one build (they share its trained coarse quantizer) as one index: their
    inverted lists joined, so a query is coarse-quantized once and scanned once, as if never
    sharded. ``parts``: (files, index, owned); an index not owned (another ShardedIndex searches
    it) is copied, never changed."""
    (_, first, owned), *rest = parts
    merged = first if owned else faiss.clone_index(first)
    for _, other, owned in rest:
        merge_into(merged, other if owned else faiss.clone_index(other))
    return merged


def merge_topk(
    scores: np.ndarray, labels: np.ndarray, k: int, *more: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Per-shard top-k lists side by side (n, S*k) -> the exact global top-k (n, k), best first;
    arrays in ``more`` (e.g. the hits' vectors, (n, S*k, d)) are picked alongside."""
    scores = np.where(labels < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(order))[:, None]
    return (scores[rows, order], labels[rows, order], *(m[rows, order] for m in more))


def search_and_reconstruct(
    index: faiss.Index, queries: np.ndarray, k: int
) -> tuple[np.ndarray, ...]:
    """faiss's search_and_reconstruct (IVF decodes its own lists; Flat, HNSW, SQ reconstruct from
    storage), also through an IDMap, whose inner index numbers the vectors 0..n-1; a re-ranked
    index gives the raw vectors it re-ranked with. Fast-scan PQ alone cannot: see
    :func:`decodable`."""
    if isinstance(index, faiss.IndexIDMap):
        refine = refine_of(index)
        if refine is not None:
            scores, rows = refine.search(queries, k, params=refine_params(refine, k))
            raw = faiss.downcast_index(refine.refine_index)
            vectors = raw.reconstruct_batch(np.maximum(rows, 0).ravel()).reshape(*rows.shape, -1)
        else:
            inner = faiss.downcast_index(index.index)
            scores, rows, vectors = inner.search_and_reconstruct(queries, k)
        id_map = faiss.vector_to_array(index.id_map)
        return scores, np.where(rows >= 0, id_map[np.maximum(rows, 0)], -1), vectors
    return index.search_and_reconstruct(queries, k)


def decodable(index: faiss.Index) -> bool:
    """False for fast-scan PQ without raw vectors to re-rank with: it has no
    search_and_reconstruct, and faiss 1.15 crashes (segfault) when decoding the lists of a
    fast-scan index read back from a file, so its vectors come from elsewhere."""
    if refine_of(index) is not None:
        return True
    try:
        return not isinstance(
            faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFFastScan
        )
    except RuntimeError:  # not an IVF index
        return True


def set_search_params(index: faiss.Index, params: dict) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(
            index, ",".join(f"{k}={v}" for k, v in params.items())
        )


class MetadataStore:
    """id -> {key, url, caption, and the source's metadata columns} in O(1): one memory-mapped Arrow
    file per embedding file, dense by row."""

    def __init__(self, metadata_uri: str, max_open: int = 256, recheck_missing_s: float = 30.0):
        self.root, self.max_open, self.recheck_missing_s = metadata_uri, max_open, recheck_missing_s
        self._open: OrderedDict[int, pa.Table] = OrderedDict()
        self._missing: dict[
            int, float
        ] = {}  # shard -> when it was found absent (an append may add it later)

    @staticmethod
    def file_name(shard: int) -> str:
        return f"part-{shard:06d}.arrow"

    def _table(self, shard: int) -> pa.Table | None:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        if time.monotonic() - self._missing.get(shard, -math.inf) < self.recheck_missing_s:
            return None  # asked again soon: no second storage call
        uri = storage.join(self.root, self.file_name(shard))
        if not storage.exists(uri):
            self._missing[shard] = time.monotonic()
            return None
        self._missing.pop(shard, None)
        table = pa.ipc.open_file(pa.memory_map(storage.local_copy(uri))).read_all()
        self._open[shard] = table
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return table

    def lookup(self, id_list) -> list[dict | None]:
        """Metadata for each id (None for an id this index does not hold); each file is opened once
        per call, however many ids it holds."""
        id_array = np.asarray(id_list, np.int64).reshape(-1)
        _, shards, rows = ids.decode(id_array)
        out: list[dict | None] = [None] * len(id_array)
        for shard in np.unique(shards):
            table = self._table(int(shard))
            if table is None:
                continue
            where = np.flatnonzero(shards == shard)
            where = where[rows[where] < table.num_rows]
            found = table.take(pa.array(rows[where]))
            held = found["id"].to_numpy(zero_copy_only=False) == id_array[where]  # gaps: null ids
            where, found = where[held], found.filter(pa.array(held))
            records = found.select(["id", "key", "url", "caption"]).to_pylist()
            metas = (
                found["meta"].to_pylist() if "meta" in table.column_names else [None] * len(where)
            )
            for position, record, meta in zip(where, records, metas):
                out[position] = {**json.loads(meta), **record} if meta else record
        return out


def write_metadata_file(uri: str, table: pa.Table) -> None:
    """Embedding rows (id, key, url, caption, meta) -> an Arrow file where row r sits at position
    r."""
    _, _, rows = ids.decode(table["id"].to_numpy())
    size = int(rows.max()) + 1 if len(rows) else 0
    dense = {}
    for column, kind in (
        ("id", pa.int64()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("meta", pa.string()),
    ):
        values = [None] * size
        source = table[column].to_pylist() if column in table.column_names else [None] * len(rows)
        for row, value in zip(rows, source):
            values[row] = value
        dense[column] = pa.array(values, kind)
    buffer = io.BytesIO()
    dense_table = pa.table(dense)
    with pa.ipc.new_file(buffer, dense_table.schema) as writer:
        writer.write_table(dense_table)
    storage.write_bytes_atomic(uri, buffer.getvalue())


class ShardedIndex:
    """All shards of an index behind one ``search``; refuses a model or dim other than expected.

    IVF shards are read into memory and joined into one index (:func:`merged_ivf`): a sharded
    build searches exactly as fast as an unsharded one. ``memory_map=True`` maps the files instead
    (instant start, page cache shared by the processes of a node) and searches the shards side by
    side: measured 2-3x slower per single query (docs/performance.md). Graph (HNSW) and exact shards
    cannot join: they are searched side by side, on a thread each.
    """

    def __init__(
        self,
        index_uri: str,
        expect_model: str | None = None,
        expect_dim: int | None = None,
        verify: bool = True,
        manifest: IndexManifest | None = None,
        group: tuple[int, int] | None = None,
        loaded: dict[tuple[str, ...], faiss.Index] | None = None,
        memory_map: bool = False,
    ):
        self.index_uri, self.verify, self.group = index_uri, verify, group
        self.memory_map = memory_map
        self.root = index_root(index_uri)
        self.manifest = manifest or IndexManifest.read(index_uri)
        if expect_model is not None and self.manifest.model != expect_model:
            raise ValueError(
                f"index {self.root} was built with model {self.manifest.model!r}, "
                f"not {expect_model!r}: its vectors are not comparable to this model's"
            )
        if expect_dim is not None and self.manifest.dim != expect_dim:
            raise ValueError(
                f"index {self.root} holds {self.manifest.dim}-d "
                f"vectors; the queries are {expect_dim}-d"
            )
        # group (g, G): every G-th shard from the g-th, for one replica group of an index too large
        # for a node.
        # Appended shards go to the end of the list, so a shard keeps its group across versions.
        chosen = [
            s
            for i, s in enumerate(self.manifest.shards)
            if group is None or i % group[1] == group[0]
        ]
        # (files, index, owned): what an earlier version loaded is reused, the rest is read
        parts, wanted = [], {s.file for s in chosen}
        for files, index in (loaded or {}).items():
            if set(files) <= wanted:
                parts.append((files, index, False))
                wanted -= set(files)
        for s in chosen:
            if s.file in wanted:
                uri = storage.join(self.root, s.file)
                parts.append(((s.file,), load_shard(uri, s, verify, memory_map), True))
        if not memory_map and len(parts) > 1 and all(is_ivf(p[1]) for p in parts):
            parts = [(tuple(f for p in parts for f in p[0]), merged_ivf(parts), True)]
        self.parts = {files: index for files, index, _ in parts}
        # looked up once: a single query costs ~0.04 ms, and each SWIG lookup ~0.2 us
        self._shards = list(self.parts.values())
        self._refines = [refine_of(s) for s in self._shards]
        ivfs = [  # (its IVF, its refine_of) for each IVF shard
            (faiss.downcast_index(faiss.extract_index_ivf(shard)), refine)
            for shard, refine in zip(self._shards, self._refines)
            if is_ivf(shard)
        ]
        self._ivfs = [ivf for ivf, _ in ivfs]
        self._fast_scans = [(ivf, r) for ivf, r in ivfs if isinstance(ivf, faiss.IndexIVFFastScan)]
        self._threading = None
        self.params = dict(self.manifest.search_params)
        self.set_params(self.params)
        self.metadata = MetadataStore(storage.join(self.root, "metadata"))
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.parts)))

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def version(self) -> int:
        return self.manifest.version

    def reloaded(self) -> ShardedIndex | None:
        """The index at its current manifest version, sharing the shards already loaded; None if
        unchanged. Searches running on this object finish on it (shard files are immutable once
        listed)."""
        manifest = IndexManifest.read(self.index_uri)
        if manifest.version == self.version:
            return None
        return ShardedIndex(
            self.index_uri,
            self.manifest.model,
            self.dim,
            self.verify,
            manifest,
            self.group,
            self.parts,
            self.memory_map,
        )

    @property
    def files(self) -> list[str]:
        """The shard files this index searches."""
        return [file for files in self.parts for file in files]

    @property
    def shards(self) -> list[faiss.Index]:
        """The faiss indices a search runs on: one for joined IVF shards, else one per shard."""
        return list(self._shards)

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self._shards)

    def set_params(self, params: dict) -> None:
        self.params = dict(params)
        for shard in self._shards:
            set_search_params(shard, self.params)
        self._threading = None  # nprobe and k_factor_rf decide it too

    def _on_shards(self, search, queries: np.ndarray, k: int) -> list:
        """``search(shard, its refine_of, its search parameters)`` on every shard for ``k`` hits
        per query: inline for one, on a thread each for several."""
        self._prepare(len(queries), k)
        if len(self._shards) == 1:
            return [search(self._shards[0], self._refines[0], self._params[0])]
        return list(self._pool.map(search, self._shards, self._refines, self._params))

    def _prepare(self, n: int, k: int) -> None:
        """How each IVF shard spreads ``n`` queries of ``k`` hits over its threads (a single
        query's lists, a batch's queries otherwise) and each shard's per-search parameters; set
        only when they change (a few us each)."""
        threading = (n == 1, k)
        if threading == self._threading:
            return
        for ivf in self._ivfs:
            ivf.parallel_mode = 1 if n == 1 else 0
        for ivf, refine in self._fast_scans:
            ivf.implem = fast_scan_implem(n, ivf.d, ivf.nprobe, candidates(refine, k))
        self._params = [refine_params(refine, k) for refine in self._refines]
        self._threading = threading

    def _queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"queries are {queries.shape[1]}-d; index {self.root} holds {self.dim}-d vectors"
            )
        if k <= 0:
            raise ValueError(f"k: got {k}; must be >= 1")
        return queries

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) queries -> (scores, ids), each (n, k), best first; id -1 where fewer than k
        exist."""
        queries = self._queries(queries, k)

        def on(shard: faiss.Index, refine, params) -> tuple[np.ndarray, np.ndarray]:
            # faiss's own call, without its Python wrapper's second check of the queries that
            # _queries made (1.3 of a single query's ~35 us)
            scores = np.empty((len(queries), k), np.float32)
            labels = np.empty((len(queries), k), np.int64)
            shard.search_c(
                len(queries), swig_ptr(queries), k, swig_ptr(scores), swig_ptr(labels), params
            )
            return scores, labels

        results = self._on_shards(on, queries, k)
        if len(results) == 1:  # one index: already the top-k, best first
            scores, labels = results[0]
            # a row short of k hits ends in -1s: a single query's last one tells (~2 us saved)
            if len(labels) > 1 or labels[0, -1] < 0:
                scores = np.where(labels < 0, -np.inf, scores)
            return scores, labels
        scores = np.concatenate([r[0] for r in results], axis=1)
        labels = np.concatenate([r[1] for r in results], axis=1)
        return merge_topk(scores, labels, k)

    def search_with_vectors(
        self, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search`, plus each hit's vector as the index stores it (n, k, dim): exact for Flat
        and HNSW, decoded for PQ / SQ, read from the embedding files for fast-scan PQ; what
        near-duplicate removal among results compares."""
        queries = self._queries(queries, k)
        # exact vectors from the embedding files
        if not all(decodable(shard) for shard in self._shards):
            scores, labels = self.search(queries, k)
            vectors = np.zeros((*labels.shape, self.dim), np.float32)
            vectors[labels >= 0] = fetch_vectors(
                self.manifest.embeddings, labels[labels >= 0], self.manifest.key_column
            )
            return scores, labels, vectors
        results = self._on_shards(
            lambda shard, _refine, _params: search_and_reconstruct(shard, queries, k), queries, k
        )
        scores, labels, vectors = (
            np.concatenate([r[i] for r in results], axis=1) for i in range(3)
        )
        return merge_topk(scores, labels, k, vectors)

    def lookup(self, id_list) -> list[dict | None]:
        return self.metadata.lookup(id_list)
