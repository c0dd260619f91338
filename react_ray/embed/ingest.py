"""Ingest embeddings LAION already released (``img_emb/*.npy`` + row-aligned ``metadata/*.parquet``,
optional ``text_emb/*.npy``) into our embedding-set format, without recomputing anything.

Each ``.npy`` is streamed in chunks through its header (local or ``s3://``), so a 1M x 768
file never sits in memory whole. Ids follow the same layout as embedded shards.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import ray
from tqdm.auto import tqdm

from react_ray.config import EmbedConfig
from react_ray.formats import embedding_set, ids, storage
from react_ray.formats.readers import (
    CAPTION_COLUMNS,
    METADATA_COLUMNS,
    URL_COLUMNS,
    InputShard,
    metadata_json,
)

CHUNK_ROWS = 65_536


def iter_npy(uri: str, chunk_rows: int = CHUNK_ROWS):
    """Yield (rows, D) chunks of a 2-d ``.npy`` file, reading only its header and each chunk."""
    with storage.open_uri(uri) as f:
        version = np.lib.format.read_magic(f)
        reader = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = reader(f)
        if len(shape) != 2 or fortran_order:
            raise ValueError(f"{uri}: expected a C-ordered 2-d array, got shape {shape}")
        yield shape
        for start in range(0, shape[0], chunk_rows):
            n = min(chunk_rows, shape[0] - start)
            data = f.read(n * shape[1] * dtype.itemsize)
            if len(data) != n * shape[1] * dtype.itemsize:
                raise ValueError(f"{uri}: truncated at row {start} of {shape[0]}")
            yield np.frombuffer(data, dtype).reshape(n, shape[1])


def _companion(
    config: EmbedConfig, folder: str, prefix: str, shard: InputShard, suffix: str
) -> str | None:
    name = shard.uri.rsplit("/", 1)[-1].replace("img_emb", prefix).removesuffix(".npy") + suffix
    uri = storage.join(config.input, folder, name)
    return uri if storage.exists(uri) else None


def _normalize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = vectors.astype(np.float32)
    norms = np.linalg.norm(v, axis=1)
    valid = np.isfinite(norms) & (norms > 0)
    v[valid] /= norms[valid, None]
    return v.astype(np.float16), valid


def ingest_file(config: EmbedConfig, shard: InputShard, dim: int) -> embedding_set.ShardStats:
    start = time.perf_counter()
    stats = embedding_set.ShardStats(input=shard.uri, shard=shard.number)
    meta_uri = _companion(config, "metadata", "metadata", shard, ".parquet")
    if meta_uri is None:
        raise FileNotFoundError(
            f"{shard.uri}: no row-aligned metadata/{shard.name}.parquet beside it"
        )
    text_uri = _companion(config, "text_emb", "text_emb", shard, ".npy")
    images = iter_npy(shard.uri)
    texts = iter_npy(text_uri) if text_uri else None
    (rows, width), text_shape = next(images), next(texts) if texts else None
    with storage.open_uri(meta_uri) as f:
        metadata = pq.ParquetFile(f)
        if (
            metadata.metadata.num_rows != rows
            or (text_shape and text_shape[0] != rows)
            or width != dim
        ):
            raise ValueError(
                f"{shard.uri}: {rows} x {width} vectors, {metadata.metadata.num_rows} "
                f"metadata rows{f', {text_shape[0]} text vectors' if text_shape else ''}; "
                f"expected aligned rows and dim {dim}"
            )
        names = metadata.schema_arrow.names
        url_col = next((c for c in URL_COLUMNS if c in names), None)
        caption_col = next((c for c in CAPTION_COLUMNS if c in names), None)
        meta_cols = tuple(c for c in METADATA_COLUMNS if c in names)
        with storage.atomic_writer(embedding_set.shard_uri(config.output, shard.name)) as out:
            writer, row = None, 0
            for batch, image_chunk in zip(metadata.iter_batches(batch_size=CHUNK_ROWS), images):
                data = batch.to_pydict()
                img, valid = _normalize(image_chunk)
                txt = None
                if texts:
                    txt, text_valid = _normalize(next(texts))
                    valid &= text_valid
                n = len(img)
                row_ids = ids.encode(shard.number, np.arange(row, row + n), config.source_id)
                keys = data.get("key") or [
                    f"{shard.number:05d}{r:04d}" for r in range(row, row + n)
                ]
                table = embedding_set.embedding_table(
                    row_ids[valid],
                    np.asarray(keys, object)[valid],
                    np.asarray(data[url_col] if url_col else [None] * n, object)[valid],
                    np.asarray(data[caption_col] if caption_col else [None] * n, object)[valid],
                    img[valid],
                    None if txt is None else txt[valid],
                    np.asarray(
                        [
                            metadata_json({c: data[c][i] for c in meta_cols}, meta_cols)
                            for i in range(n)
                        ],
                        object,
                    )[valid],
                )
                writer = writer or pq.ParquetWriter(
                    out, table.schema, **embedding_set.parquet_options(table.schema)
                )
                writer.write_table(table)
                for i in np.flatnonzero(~valid):
                    stats.skipped_records.append(
                        {
                            "id": int(row_ids[i]),
                            "key": keys[i],
                            "reason": "invalid_embedding",
                            "message": "zero, NaN or infinite vector",
                        }
                    )
                stats.rows_in += n
                stats.rows_embedded += int(valid.sum())
                row += n
            if writer:
                writer.close()
            else:  # an empty input file still gets a valid (empty) parquet file
                pq.write_table(embedding_set.embedding_table([], [], [], [], None, None), out)
    if stats.skipped_records:
        stats.skipped = {"invalid_embedding": len(stats.skipped_records)}
    stats.seconds = time.perf_counter() - start
    embedding_set.finish_shard(config.output, shard.name, stats)
    return stats


def ingest_laion_embeddings(
    config: EmbedConfig, shards: list[InputShard], dim: int, progress: bool
) -> int:
    task = ray.remote(num_cpus=1)(ingest_file)
    pending = [task.remote(config, shard, dim) for shard in shards]
    rows = 0
    with tqdm(
        total=len(pending), desc="ingest embeddings", unit="file", disable=not progress
    ) as bar:
        while pending:
            done, pending = ray.wait(pending)
            rows += sum(stats.rows_in for stats in ray.get(done))
            bar.update(len(done))
    return rows
