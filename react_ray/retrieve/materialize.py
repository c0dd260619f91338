"""Materializing a retrieved set into labeled webdataset training shards, on Ray tasks.

Images come either from the corpus shards themselves (``source: corpus``, when the corpus
holds image bytes) or from their URLs (``source: download``, the real LAION case) with
timeouts, retries with backoff, a size limit, safe decoding and img2dataset's resize modes.
The output is ``formats.training_shards``. A rerun skips shards marked done; ``retry_failed:
true`` fetches only the samples an earlier run failed, keeps the ones it already had, and
rewrites those shards.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from react_ray.config import MaterializeConfig
from react_ray.formats import ids, shard_writer, storage, training_shards
from react_ray.formats.embedding_set import (
    EmbeddingSetInfo,
    read_parquet,
    read_stats,
    shard_name,
    write_parquet,
)
from react_ray.formats.readers import IMAGE_FORMATS, InputShard, read_shard
from react_ray.formats.retrieved_set import pairs_uri
from react_ray.formats.shard_writer import PartWritten, ShardRead, ShardTally
from react_ray.formats.training_shards import ShardStats, shard_uri
from react_ray.retrieve.fetch import FetchPolicy, download, resize


def corpus_bytes(embeddings: str, id_list) -> dict[int, tuple[bytes | None, str | None]]:
    """Image bytes per id from the corpus input shards recorded in the embedding set's stats."""
    info = EmbeddingSetInfo.read(embeddings)
    if info.input_format not in IMAGE_FORMATS:
        raise ValueError(
            f"source=corpus: the corpus behind {embeddings} holds no image bytes "
            f"({info.input_format}); use source=download"
        )
    wanted = set(int(i) for i in id_list)
    found: dict[int, tuple[bytes | None, str | None]] = {}
    _, shards, _ = ids.decode(list(wanted))
    for shard in sorted(set(shards.tolist())):
        source = read_stats(embeddings, shard_name(shard)).input
        for block in read_shard(InputShard(source, shard, info.input_format), info.source_id):
            found.update({r["id"]: (r["image"], None) for r in block if r["id"] in wanted})
    return found


def _fetch_all(
    rows: pd.DataFrame, config: MaterializeConfig, corpus: dict | None
) -> list[tuple[bytes | None, str | None, str | None]]:
    """Each row's JPEG (or None, reason, message): from ``corpus`` (``corpus_bytes``, read once
    per shard) or downloaded."""
    policy = FetchPolicy(
        timeout=config.timeout,
        deadline=config.deadline,
        allowed_networks=tuple(config.allowed_networks),
        retries=config.retries,
        backoff=config.backoff,
        max_bytes=config.max_bytes,
        max_pixels=config.max_image_pixels,
    )
    if corpus is not None:
        raw = [
            (corpus[i][0], None, None)
            if i in corpus
            else (None, "not_in_corpus", "id not found in its shard")
            for i in rows["id"]
        ]
    else:
        with ThreadPoolExecutor(max_workers=config.threads) as pool:
            raw = list(
                pool.map(
                    lambda url: download(url, policy) if url else (None, "no_url", "empty url"),
                    rows["url"],
                )
            )
    out = []
    for data, reason, message in raw:
        if data is None:
            out.append((None, reason, message))
            continue
        jpg, reason, message, _ = resize(
            data,
            config.resize_mode,
            config.image_size,
            config.resize_only_if_bigger,
            config.max_image_pixels,
            config.skip_reencode,
        )
        out.append((jpg, reason, message))
    return out


# Samples per tar part: what one task holds in memory, however large its shard.
PART_SAMPLES = 256


class _EarlierShard:
    """An earlier run's shard, for ``retry_failed``: each sample's status, and the members of its
    tar streamed in key order (the order every run writes them in)."""

    def __init__(self, config: MaterializeConfig, k: int):
        status_uri = shard_uri(config.output, k, ".status.parquet")
        self.status = read_parquet(status_uri).to_pandas() if storage.exists(status_uri) else None
        self.tar_uri = shard_uri(config.output, k, ".tar")
        # each sample's earlier status by id, looked up once per kept sample
        self._by_id = (
            {}
            if self.status is None
            else dict(zip(self.status["id"], self.status.to_dict("records")))
        )
        self._members = self._stream() if self.status is not None else iter(())
        self._next = next(self._members, None)

    def _stream(self):
        if not storage.exists(self.tar_uri):
            return
        with storage.open_uri(self.tar_uri) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                yield member.name, tar.extractfile(member).read()

    def succeeded(self) -> set:
        if self.status is None:
            return set()
        return set(self.status.loc[self.status["status"] == "success", "id"])

    def status_of(self, sample_id) -> dict:
        return self._by_id[sample_id]

    def members_up_to(self, last_key: str) -> dict[str, bytes]:
        """The members of samples with keys up to ``last_key`` not taken yet."""
        taken = {}
        while self._next is not None and self._next[0].partition(".")[0] <= last_key:
            taken[self._next[0]] = self._next[1]
            self._next = next(self._members, None)
        return taken


def _sample_members(row: dict, jpg: bytes) -> dict[str, bytes]:
    """A fetched sample's members: image, caption, metadata (and label for a retrieved set)."""
    key = row["key_out"]
    meta = {"id": int(row["id"]), "key": key, "url": row["url"], "caption": row["caption"]}
    members = {f"{key}.jpg": jpg, f"{key}.txt": (row["caption"] or "").encode()}
    # a retrieved set of ours; a plain URL list (REACT's file) has no labels
    if "label" in row:
        meta |= {
            "source_key": row["key"],
            "class": row["class"],
            "label": int(row["label"]),
            "score": float(row["score"]),
        }
        members[f"{key}.cls"] = str(int(row["label"])).encode()
    members[f"{key}.json"] = json.dumps(meta).encode()
    return members


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    return buffer.getvalue()


def merge_tars(parts: list[str], uri: str) -> int:
    """The parts' members, in order, streamed into one tar at ``uri``; -> its size in bytes."""
    with storage.atomic_writer(uri) as out:
        with tarfile.open(fileobj=out, mode="w|") as merged:
            for part in parts:
                with storage.open_uri(part) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                    for member in tar:
                        merged.addfile(member, tar.extractfile(member))
    return storage.file_size(uri)


def materialize_shard(
    k: int, rows: pd.DataFrame, config: MaterializeConfig, corpus: dict | None = None
) -> ShardStats:
    """Write output shard ``k`` for ``rows`` (position i gets key kkkkkiiii) in parts of
    PART_SAMPLES samples (``formats.shard_writer``); return its stats. ``corpus``: the image bytes
    by id (``corpus_bytes``) when the caller read them for several shards at once."""
    start, run_id, name = time.perf_counter(), uuid.uuid4().hex[:8], shard_name(k)
    rows = rows.reset_index(drop=True)
    rows["key_out"] = [f"{k:05d}{i:04d}" for i in range(len(rows))]
    earlier = _EarlierShard(config, k) if config.retry_failed else None
    kept = earlier.succeeded() if earlier else set()
    todo = rows[~rows["id"].isin(kept)]
    if config.source == "corpus" and corpus is None:
        corpus = corpus_bytes(config.embeddings, todo["id"])
    tally, statuses = ShardTally(), []
    tally.add(ShardRead(k, len(rows)))
    for first in range(0, len(rows), PART_SAMPLES):
        chunk = rows.iloc[first : first + PART_SAMPLES]
        fetched = chunk[~chunk["id"].isin(kept)]
        results = dict(zip(fetched["id"], _fetch_all(fetched, config, corpus)))
        members = earlier.members_up_to(chunk["key_out"].iloc[-1]) if earlier else {}
        skipped = []
        for row in chunk.to_dict("records"):
            if row["id"] not in results:  # kept from the earlier run
                statuses.append(earlier.status_of(row["id"]))
                continue
            jpg, reason, message = results[row["id"]]
            statuses.append(
                {
                    "id": row["id"],
                    "key": row["key_out"],
                    "status": "success" if jpg else "failed",
                    "reason": reason or "",
                    "message": message or "",
                }
            )
            if jpg:
                members |= _sample_members(row, jpg)
            else:
                skipped.append(statuses[-1] | {"id": int(row["id"])})
        part = shard_writer.part_uri(config.output, name, run_id, first, ".tar")
        storage.write_bytes_atomic(part, _tar_bytes(members))
        tally.add(PartWritten(k, len(chunk), len(chunk) - len(skipped), part, skipped))
    assert tally.completed == {k}, "every row of the shard is in a part"
    status_table = pd.DataFrame(statuses)
    failed = Counter(status_table.loc[status_table["status"] != "success", "reason"])
    stats = ShardStats(
        shard=k,
        rows=len(rows),
        success=int((status_table["status"] == "success").sum()),
        failed=dict(failed),
        fetched_this_run=len(todo),
        bytes=0,  # the merged tar's, set by merge
        seconds=0.0,
    )

    def merge(parts: list[str]) -> None:
        stats.bytes = merge_tars(parts, shard_uri(config.output, k, ".tar"))
        write_parquet(
            shard_uri(config.output, k, ".status.parquet"),
            pa.Table.from_pandas(status_table, preserve_index=False),
        )
        stats.seconds = round(time.perf_counter() - start, 3)

    training_shards.commit(config.output, stats, tally.part_uris(k), merge)
    return stats


def read_rows(uri: str, start: int, stop: int) -> pd.DataFrame:
    """Rows [start, stop) of a parquet file, reading only the row groups that hold them."""
    tables, offset = [], 0
    with storage.open_uri(uri) as f:
        parquet = pq.ParquetFile(f)
        for group in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(group).num_rows
            if offset < stop and offset + n > start:
                lo = max(start, offset)
                tables.append(
                    parquet.read_row_group(group).slice(lo - offset, min(stop, offset + n) - lo)
                )
            offset += n
    return pa.concat_tables(tables).to_pandas()


def standard_rows(rows: pd.DataFrame, start: int, config: MaterializeConfig) -> pd.DataFrame:
    """``url`` and ``caption`` from the configured columns; a file without ids (a plain URL list
    such as REACT's imagenet_10m.parquet) gets each row's position in the file as its id."""
    rows = rows.rename(columns={config.url_col: "url", config.caption_col: "caption"})
    if "id" not in rows.columns:
        rows.insert(0, "id", range(start, start + len(rows)))
    return rows


def _materialize_batch(batch: dict, config: MaterializeConfig) -> dict:
    """Ray Data UDF: one output shard per row of ``batch`` (its number and row range)."""
    stats = [
        materialize_shard(
            int(k),
            standard_rows(read_rows(pairs_uri(config.retrieved), int(a), int(b)), int(a), config),
            config,
        )
        for k, a, b in zip(batch["shard"], batch["start"], batch["stop"])
    ]
    return {"shard": [s.shard for s in stats]}


def plan_shards(config: MaterializeConfig) -> tuple[int, list[dict]]:
    """(pairs, every output shard): download: ``{shard, start, stop}``, rows of the pairs file in
    its order; corpus: ``{shard, pack, offset, count}``, see ``_corpus_packs``. Refuses a pairs
    file without the columns the source needs."""
    with storage.open_uri(pairs_uri(config.retrieved)) as f:
        metadata = pq.ParquetFile(f).metadata
    total, columns = metadata.num_rows, metadata.schema.names
    wanted = (config.url_col, config.caption_col) if config.source == "download" else ("id",)
    if missing := [c for c in wanted if c not in columns]:
        raise ValueError(
            f"materialize: {pairs_uri(config.retrieved)} has no column {missing[0]!r} (columns: "
            f"{', '.join(columns)}); set url_col / caption_col"
        )
    if config.source == "corpus":
        return total, _corpus_packs(config)
    step = config.samples_per_shard
    return total, [
        {"shard": k, "start": a, "stop": min(a + step, total)}
        for k, a in enumerate(range(0, total, step))
    ]


def _corpus_packs(config: MaterializeConfig) -> list[dict]:
    """Output shards that read each corpus shard once: the pairs grouped by the corpus shard their
    id names, consecutive corpus shards packed together up to ``samples_per_shard`` pairs (a
    corpus shard with more fills several output shards of its own). Output shard k of pack p holds
    the pack's pairs, sorted by id, from ``offset`` for ``count``. Only the id column is read."""
    with storage.open_uri(pairs_uri(config.retrieved)) as f:
        id_column = pq.read_table(f, columns=["id"])["id"].to_numpy()
    corpus_shards, counts = np.unique(ids.decode(id_column)[1], return_counts=True)
    step, packs, shards = config.samples_per_shard, [], []
    for corpus_shard, count in zip(corpus_shards.tolist(), counts.tolist()):
        if packs and packs[-1]["pairs"] + count <= step:
            packs[-1]["corpus_shards"].append(corpus_shard)
            packs[-1]["pairs"] += count
        else:
            packs.append({"corpus_shards": [corpus_shard], "pairs": count})
    for p, pack in enumerate(packs):
        for offset in range(0, pack["pairs"], step):
            count = min(step, pack["pairs"] - offset)
            shards.append({"shard": len(shards), "pack": p, "offset": offset, "count": count})
            shards[-1]["corpus_shards"] = pack["corpus_shards"]
    return shards


def _materialize_pack(rows: pd.DataFrame, config: MaterializeConfig, shards: dict) -> pd.DataFrame:
    """Ray Data ``map_groups`` UDF: one pack's pairs -> its pending output shards, reading each of
    its corpus shards once."""
    rows = standard_rows(rows.sort_values("id", kind="stable").reset_index(drop=True), 0, config)
    pending = shards[int(rows["pack"].iloc[0])]
    images = corpus_bytes(config.embeddings, rows["id"])
    done = [
        materialize_shard(
            s["shard"], rows.iloc[s["offset"] : s["offset"] + s["count"]], config, images
        ).shard
        for s in pending
    ]
    return pd.DataFrame({"shard": done})


def materialize_shards(config: MaterializeConfig, shards: list[dict], progress: bool) -> None:
    """Write ``shards`` on Ray Data tasks of the connected cluster: download, one task per shard;
    corpus, one per pack (the pairs grouped by corpus shard, read once each)."""
    import ray

    if config.source == "corpus":
        by_pack: dict[int, list[dict]] = {}
        for s in shards:
            by_pack.setdefault(s["pack"], []).append(s)
        pack_of = {c: p for p, pack in by_pack.items() for c in pack[0]["corpus_shards"]}
        dataset = (
            ray.data.read_parquet(pairs_uri(config.retrieved))
            .map_batches(_tag_pack, batch_format="pandas", fn_kwargs={"pack_of": pack_of})
            .groupby("pack")
            .map_groups(
                _materialize_pack,
                batch_format="pandas",
                fn_kwargs={"config": config, "shards": by_pack},
                **config.tasks.ray_options(),
            )
        )
    else:
        dataset = ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
            _materialize_batch,
            batch_size=1,
            fn_kwargs={"config": config},
            **config.tasks.ray_options(),
        )
    with tqdm(
        total=len(shards), desc=f"materialize ({config.source})", unit="shard", disable=not progress
    ) as bar:
        for _ in dataset.iter_rows():
            bar.update(1)


def _tag_pack(rows: pd.DataFrame, pack_of: dict[int, int]) -> pd.DataFrame:
    """Each pair's pack (from the corpus shard its id names); pairs of done packs left out."""
    corpus_shards = pd.Series(ids.decode(rows["id"].to_numpy())[1])
    packs = corpus_shards.map(pack_of)
    return rows[packs.notna().to_numpy()].assign(pack=packs.dropna().astype(int).to_numpy())
