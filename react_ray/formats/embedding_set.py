"""The embedding set on disk: one parquet per input shard, committed atomically, then marked done.

```
OUTPUT/_embedding.json             EmbeddingSetInfo: model, dim, precision, input (versioned)
OUTPUT/part-000012.parquet         id, key, url, caption, img_emb, txt_emb (float16, L2-normalised),
                                   meta (JSON of the source's LAION columns: punsafe, ...)
OUTPUT/part-000012.stats.json      rows in / embedded / skipped by reason (+ the skipped records)
OUTPUT/part-000012.done            written last: the shard is complete
OUTPUT/_parts/part-000012/*.parquet  the batches' parts, merged and removed at commit
                                   (formats.shard_writer)
OUTPUT/_summary.json               all shards' stats added up
OUTPUT/_inputs.json                each input shard's URI and size: a rerun refuses a changed one
```
A shard without its ``.done`` marker is redone from scratch on the next run, so a run killed
at any point and rerun yields exactly the ids of an uninterrupted run; one whose input file has
changed size since is refused, not silently kept.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from react_ray.formats import ids, shard_writer, storage
from react_ray.formats.contract import read_contract
from react_ray.formats.shard_writer import PartWritten, is_done

INFO_FILE = "_embedding.json"


class EmbeddingSetInfo(BaseModel):
    """``_embedding.json``: what every vector of the set was made with. Written once by the
    embedding stage; the index, retrieval, decontamination and materialization stages read it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model", "pretrained", "checkpoint", "dim")

    version: Literal[1] = 1
    model: str
    pretrained: str | None = None
    checkpoint: str | None = None
    dim: int
    precision: str = "fp32"
    normalized: bool = True
    metric: Literal["inner_product"] = "inner_product"
    id_layout: str = ids.LAYOUT
    source_id: int = 0
    input: str
    input_format: str

    @staticmethod
    def exists(folder: str) -> bool:
        return storage.exists(storage.join(folder, INFO_FILE))

    @classmethod
    def read(cls, folder: str) -> EmbeddingSetInfo:
        missing = "not an embedding set (one written by `react-ray embed`)"
        return read_contract(cls, storage.join(folder, INFO_FILE), missing)

    def write(self, folder: str) -> None:
        storage.write_text_atomic(storage.join(folder, INFO_FILE), self.model_dump_json(indent=1))

    def model_mismatch(self, other: EmbeddingSetInfo) -> str | None:
        """The first of the model fields in which two sets differ; None when their vectors
        compare."""
        for name in self.MODEL_FIELDS:
            if getattr(self, name) != getattr(other, name):
                return name
        return None


def shard_name(shard: int) -> str:
    """The output name of input shard number ``shard`` (``00042.tar`` -> ``part-000042``)."""
    return f"part-{shard:06d}"


def shard_uri(output: str, name: str) -> str:
    return storage.join(output, f"{name}.parquet")


def embedding_table(
    ids, keys, urls, captions, img_emb: np.ndarray | None, txt_emb: np.ndarray | None, meta=None
) -> pa.Table:
    """The output schema. Embeddings are fixed-size lists of float16."""

    def vectors(array: np.ndarray | None, n: int) -> pa.Array:
        if array is None:
            return pa.nulls(n, pa.list_(pa.float16()))
        array = np.ascontiguousarray(array, np.float16)
        return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])

    n = len(ids)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "key": pa.array(keys, pa.string()),
            "url": pa.array(urls, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "img_emb": vectors(img_emb, n),
            "txt_emb": vectors(txt_emb, n),
            "meta": pa.array(
                [m or None for m in meta] if meta is not None else [None] * n, pa.string()
            ),
        }
    )


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (float32), as the set's vectors are; a zero row stays zero."""
    norms = np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return (vectors / norms).astype(np.float32)


def column_matrix(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size-list embedding column -> (N, D) float16 array (no copy per row)."""
    chunked = table.column(column).combine_chunks()
    return chunked.values.to_numpy(zero_copy_only=False).reshape(len(chunked), -1)


METADATA_FIELDS = ("id", "key", "url", "caption", "meta")


def read_metadata(uri: str) -> pa.Table:
    """An embedding file's non-vector columns (``meta`` is absent from files of older versions)."""
    with storage.open_uri(uri) as f:
        parquet = pq.ParquetFile(f)
        present = [c for c in METADATA_FIELDS if c in parquet.schema_arrow.names]
        return parquet.read(columns=present)


def fetch_vectors(embeddings: str, id_list: np.ndarray, column: str = "img_emb") -> np.ndarray:
    """Embeddings of the given ids, read file by file (rows are sorted by id in each file). Only
    committed shards (``.done``) are read; an id that is not there is a KeyError, never a wrong
    row."""
    id_list = np.asarray(id_list, np.int64)
    out = np.zeros((len(id_list), 0), np.float32)
    _, shards, _ = ids.decode(id_list)
    for shard in np.unique(shards):
        name = shard_name(int(shard))
        if not is_done(embeddings, name):
            raise KeyError(
                f"{embeddings}: shard {name} is not committed "
                "(no .done marker); its ids cannot be read"
            )
        table = read_parquet(storage.join(embeddings, f"{name}.parquet"), ["id", column])
        file_ids = table["id"].to_numpy()
        vectors = column_matrix(table, column)
        where = np.flatnonzero(shards == shard)
        pos = np.minimum(np.searchsorted(file_ids, id_list[where]), max(len(file_ids) - 1, 0))
        missing = (
            id_list[where][file_ids[pos] != id_list[where]] if len(file_ids) else id_list[where]
        )
        if len(missing):
            raise KeyError(
                f"{embeddings}/{name}.parquet holds no row for ids {missing[:5].tolist()}"
            )
        if out.shape[1] == 0:
            out = np.zeros((len(id_list), vectors.shape[1]), np.float32)
        out[where] = vectors[pos]
    return out


VECTOR_COLUMNS = ("img_emb", "txt_emb")


def parquet_options(schema: pa.Schema) -> dict:
    """Writer options: parquet's dictionary encoding for every column but the embeddings. A
    float16 vector column holds thousands of distinct values a page, so the dictionary saves
    ~5% of the file and costs every reader: 10,000 x 512 read in 0.116 s with it, 0.022 s
    without; a 1M x 512 index build, which reads the vectors four times, 84.7 -> 65.3 s."""
    return {"use_dictionary": [name for name in schema.names if name not in VECTOR_COLUMNS]}


def write_parquet(uri: str, table: pa.Table) -> None:
    with storage.atomic_writer(uri) as f:
        pq.write_table(table, f, **parquet_options(table.schema))


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    with storage.open_uri(uri) as f:
        return pq.read_table(f, columns=columns)


@dataclass
class ShardStats:
    """What happened to one input shard; the ``.stats.json`` file."""

    input: str
    shard: int
    rows_in: int = 0
    rows_embedded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_records: list[dict] = field(default_factory=list)  # id, key, reason, message
    shard_error: str | None = None
    seconds: float = 0.0
    # Ray node ids that decoded / embedded it
    nodes: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, input_uri: str, total: PartWritten, shard_error: str | None) -> ShardStats:
        """The stats of a shard whose parts add up to ``total``."""
        return cls(
            input=input_uri,
            shard_error=shard_error,
            shard=total.shard,
            rows_in=total.rows,
            rows_embedded=total.written,
            skipped=total.skipped_by_reason(),
            skipped_records=total.skipped,
            seconds=total.seconds,
            nodes=total.nodes,
        )

    def check(self) -> None:
        if self.rows_embedded + sum(self.skipped.values()) != self.rows_in:
            raise RuntimeError(
                f"{self.input}: {self.rows_in} rows in but {self.rows_embedded} embedded + "
                f"{sum(self.skipped.values())} skipped; refusing to commit"
            )


def read_stats(output: str, name: str) -> ShardStats:
    return shard_writer.read_stats(output, name, ShardStats)


def commit_shard(output: str, name: str, part_uris: list[str], stats: ShardStats) -> ShardStats:
    """Merge a shard's batch parts into its final file (sorted by id), then stats, then the
    marker."""
    stats.check()

    def merge(parts: list[str]) -> None:
        tables = [read_parquet(uri) for uri in parts]
        table = pa.concat_tables(tables) if tables else embedding_table([], [], [], [], None, None)
        table = table.sort_by("id")
        unique = len(np.unique(table["id"].to_numpy()))
        if table.num_rows != stats.rows_embedded or unique != table.num_rows:
            raise RuntimeError(
                f"{stats.input}: parts hold {table.num_rows} rows ({unique} unique ids), "
                f"expected {stats.rows_embedded}; refusing to commit"
            )
        write_parquet(shard_uri(output, name), table)

    shard_writer.commit_parts(output, name, part_uris, merge, stats, {"rows": stats.rows_embedded})
    return stats


def finish_shard(output: str, name: str, stats: ShardStats) -> None:
    """Commit a shard whose file was written whole (``shard_uri``), without parts."""
    shard_writer.commit(output, name, stats, {"rows": stats.rows_embedded})


@dataclass
class RunSummary:
    """All committed shards of an embedding set added up (this run's and earlier ones')."""

    shards: int
    rows_in: int
    rows_embedded: int
    skipped: dict[str, int]
    shard_errors: list[str]
    this_run_shards: int = 0
    this_run_rows: int = 0
    this_run_seconds: float = 0.0
    this_run_startup_seconds: float = 0.0  # until the first embedded batch came back
    this_run_steady_rows_per_s: float = 0.0  # after that first batch

    def __str__(self) -> str:
        rate = self.this_run_rows / self.this_run_seconds if self.this_run_seconds else 0.0
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        lines = [
            f"embedding set: {self.shards} shards, {self.rows_in:,} rows in, "
            f"{self.rows_embedded:,} embedded",
            f"skipped: {skipped}",
            f"this run: {self.this_run_shards} shards, {self.this_run_rows:,} "
            f"rows in {self.this_run_seconds:.1f}s ({rate:,.1f} rows/s; "
            f"first batch after {self.this_run_startup_seconds:.1f}s, "
            f"{self.this_run_steady_rows_per_s:,.1f} rows/s from then on)",
        ]
        lines += [f"shard error: {e}" for e in self.shard_errors]
        return "\n".join(lines)


def summarize(output: str) -> RunSummary:
    stats_files = storage.list_files(output, ".stats.json")
    skipped: Counter = Counter()
    rows_in = embedded = 0
    errors = []
    for uri in stats_files:
        stats = read_stats(output, uri.rsplit("/", 1)[-1].removesuffix(".stats.json"))
        rows_in += stats.rows_in
        embedded += stats.rows_embedded
        skipped.update(stats.skipped)
        if stats.shard_error:
            errors.append(stats.shard_error)
    return RunSummary(len(stats_files), rows_in, embedded, dict(skipped), errors)


def save_summary(output: str, summary: RunSummary) -> None:
    storage.write_text_atomic(
        storage.join(output, "_summary.json"), json.dumps(asdict(summary), indent=1)
    )


def load_embeddings(output: str, column: str = "img_emb") -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a whole (small) embedding set's committed shards; for tests, benchmarks and
    small indices."""
    tables = [
        read_parquet(uri, ["id", column])
        for uri in storage.list_files(output, ".parquet")
        if is_done(output, uri.rsplit("/", 1)[-1].removesuffix(".parquet"))
    ]
    table = pa.concat_tables(tables)
    return table["id"].to_numpy(), column_matrix(table, column)


@dataclass(frozen=True)
class EmbeddingFile:
    """One committed embedding file and its row count."""

    uri: str
    rows: int

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1].removesuffix(".parquet")


def committed_files(uri: str) -> tuple[EmbeddingSetInfo, list[EmbeddingFile]]:
    """The set's description and its committed files (those with a completion marker)."""
    info = EmbeddingSetInfo.read(uri)
    files = []
    for file_uri in storage.list_files(uri, ".parquet"):
        name = file_uri.rsplit("/", 1)[-1].removesuffix(".parquet")
        if is_done(uri, name):
            with storage.open_uri(file_uri) as f:
                files.append(EmbeddingFile(file_uri, pq.ParquetFile(f).metadata.num_rows))
    if not files:
        raise FileNotFoundError(f"embeddings: no committed embedding files in {uri}")
    return info, files


def read_vectors(
    uri: str, column: str, positions: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of one embedding file, optionally only the rows at ``positions``."""
    table = read_parquet(uri, ["id", column])
    if positions is not None:
        table = table.take(positions)
    if table.num_rows and table[column].null_count == table.num_rows:
        raise ValueError(
            f"{uri}: column {column!r} is empty (ingested "
            "without text embeddings?); index keys=image instead"
        )
    return table["id"].to_numpy(), np.ascontiguousarray(column_matrix(table, column), np.float32)
