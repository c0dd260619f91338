"""Input shards -> streams of records, each with its stable id. Pure Python, no Ray.

Every record read from a shard comes out, good or bad: a bad one carries an ``error``
reason so that the stage counts it. Every row is a record: how many records a shard had and its
shard-level error (a truncated or corrupt file) are its ``ShardRead``, which ``read_shard``
returns and ``read_blocks`` hands to a callback, so the driver knows when a shard is complete
without holding the shard in memory (``formats.shard_writer``).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from react_ray.formats import ids, storage
from react_ray.formats.embedding_set import shard_name
from react_ray.formats.shard_writer import ShardRead

SUFFIX = {"webdataset": ".tar", "parquet": ".parquet", "laion-embeddings": ".npy"}
IMAGE_FORMATS = ("webdataset", "parquet", "image-folder")  # the input formats that hold image bytes
# what PIL decodes safely
IMAGE_EXTENSIONS = (
    "jpg",
    "jpeg",
    "png",
    "webp",
    "gif",
    "bmp",
    "tif",
    "tiff",
)
# a tar member larger than this is not read into memory (counted: oversize_member)
MAX_MEMBER_BYTES = 64 * 2**20
# An image folder (any depth, e.g. CLASS/*.jpg) is read as shards of this many files in sorted
# path order; its ids are stable while the folder's contents are.
IMAGE_FOLDER_SHARD_FILES = 1000
IMAGE_COLUMNS = ("jpg", "image", "img", "image_bytes", "bytes", "png")
CAPTION_COLUMNS = ("caption", "TEXT", "txt", "text")
URL_COLUMNS = ("url", "URL")
# Source columns kept (as one JSON object, ``meta``) so that retrieval can filter on them.
METADATA_COLUMNS = (
    "punsafe",
    "pwatermark",
    "similarity",
    "NSFW",
    "LICENSE",
    "language",
    "width",
    "height",
    "original_width",
    "original_height",
    "WIDTH",
    "HEIGHT",
    "sha256",
    "hash",
)


@dataclass(frozen=True)
class InputShard:
    uri: str
    number: int  # from the file name; with the source id it fixes every id of the shard
    format: str

    @property
    def name(self) -> str:
        return shard_name(self.number)


def list_input_shards(input_uri: str, input_format: str) -> list[InputShard]:
    """All input shards, by shard number; raises if there are none or two share a number."""
    if input_format == "image-folder":
        count = len(image_folder_files(input_uri))
        if not count:
            raise FileNotFoundError(
                f"input: no {'/'.join(IMAGE_EXTENSIONS)} files under {input_uri}"
            )
        return [
            InputShard(input_uri, k, input_format)
            for k in range(-(-count // IMAGE_FOLDER_SHARD_FILES))
        ]
    folder = storage.join(input_uri, "img_emb") if input_format == "laion-embeddings" else input_uri
    files = storage.list_files(folder, SUFFIX[input_format])
    if not files:
        raise FileNotFoundError(
            f"input: no *{SUFFIX[input_format]} files in {folder} for input_format={input_format!r}"
        )
    shards = sorted(
        (InputShard(uri, ids.shard_number(uri), input_format) for uri in files),
        key=lambda s: s.number,
    )
    for a, b in zip(shards, shards[1:]):
        if a.number == b.number:
            raise ValueError(
                f"input: {a.uri} and {b.uri} have the same "
                f"shard number {a.number}; ids would collide"
            )
    return shards


# Text fields are never None ("" means absent): all-null columns would lose their type in Ray Data.
# Every row is a record; how many a shard held, and why it ended early, is its ShardRead.
_EMPTY = dict.fromkeys(("key", "url", "caption", "meta", "error", "message"), "") | {"image": b""}


def _record(shard: InputShard, row: int, source: int, **fields) -> dict:
    fields = {k: ("" if v is None else v) for k, v in fields.items()}
    return (
        _EMPTY
        | {
            "id": int(ids.encode(shard.number, row, source)),
            "shard": shard.number,
        }
        | fields
    )


def metadata_json(source: dict, columns: tuple[str, ...] = METADATA_COLUMNS) -> str:
    """The source's metadata columns that are present and not null, as JSON ("" if none)."""
    picked = {c: source[c] for c in columns if source.get(c) is not None}
    return json.dumps(picked, default=str) if picked else ""


def image_folder_files(uri: str) -> list[str]:
    return storage.find_files(uri, tuple("." + e for e in IMAGE_EXTENSIONS))


def _caption_error(caption, required: bool) -> tuple[str, str]:
    if caption is not None and not isinstance(caption, str):
        return "bad_caption", f"the caption is a {type(caption).__name__}, not text"
    if required and (caption is None or not caption.strip()):
        return "missing_caption", "empty or absent caption"
    return "", ""


class _TailTracker:
    """A read-only file wrapper that counts the bytes read and keeps the last 1 KiB."""

    def __init__(self, fileobj):
        self.fileobj, self.total, self.tail = fileobj, 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        self.total += len(data)
        self.tail = (self.tail + data)[-1024:]
        return data


def webdataset_samples(fileobj) -> Iterator[dict[str, bytes]]:
    """Group consecutive tar members by key (webdataset convention: ``KEY.ext``). A member over
    MAX_MEMBER_BYTES is not read: its sample gets ``__oversize__`` (the member's name). A tar
    whose end-of-archive blocks are missing (cut at a 512-byte boundary, which tarfile reads as
    complete) raises ``tarfile.ReadError`` after its last sample."""
    current_key, sample, end_of_members = None, {}, 0
    tracked = _TailTracker(fileobj)
    with tarfile.open(fileobj=tracked, mode="r|") as tar:
        for member in tar:
            end_of_members = (
                member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            )
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if key != current_key and sample:
                yield {"__key__": current_key, **sample}
                sample = {}
            current_key = key
            if member.size > MAX_MEMBER_BYTES:
                sample["__oversize__"] = (
                    f"{base} ({member.size:,} bytes > {MAX_MEMBER_BYTES:,})".encode()
                )
                continue
            sample[ext.lower()] = tar.extractfile(member).read()
    while tracked.read(2**20):  # to the end of the file, to see what follows the last member
        pass
    if sample:
        yield {"__key__": current_key, **sample}
    after = tracked.total - end_of_members
    if end_of_members and (
        after < tarfile.BLOCKSIZE or tracked.tail[-min(after, 1024) :].strip(b"\0")
    ):
        raise tarfile.ReadError(
            f"no end-of-archive blocks after the member ending at byte {end_of_members:,}: "
            "the file was cut there, and what followed is lost"
        )


def _sidecar(sample: dict) -> tuple[dict, str, str]:
    """The sample's ``.json`` as a dict, or ({}, reason, message) when it is not a JSON object."""
    if "json" not in sample:
        return {}, "", ""
    try:
        meta = json.loads(sample["json"])
    except ValueError as error:
        return {}, "bad_json", f"{sample['__key__']}.json: {error}"
    if not isinstance(meta, dict):
        return {}, "bad_json", f"{sample['__key__']}.json is a {type(meta).__name__}, not an object"
    return meta, "", ""


# Each format's reader yields the shard's records and returns why it ended early (None: it did not).
Records = Generator[dict, None, str | None]


def _read_webdataset(shard: InputShard, source: int, caption_required: bool) -> Records:
    row = 0
    try:
        with storage.open_uri(shard.uri) as f:
            for sample in webdataset_samples(f):
                meta, json_error, json_message = _sidecar(sample)
                caption = (
                    sample["txt"].decode("utf-8", "replace")
                    if "txt" in sample
                    else meta.get("caption")
                )
                image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
                error, message = _caption_error(caption, caption_required)
                if json_error:
                    error, message = json_error, json_message
                if "__oversize__" in sample:
                    error, message = "oversize_member", sample["__oversize__"].decode()
                elif image is None:
                    error, message = "missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} member"
                yield _record(
                    shard,
                    row,
                    source,
                    key=str(meta.get("key", sample["__key__"])),
                    url=_text(meta.get("url")),
                    caption=_text(caption),
                    image=image,
                    meta=metadata_json(meta),
                    error=error,
                    message=message,
                )
                row += 1
    except (tarfile.TarError, EOFError, OSError) as error:
        return f"{shard.uri}: truncated or corrupt tar after {row} samples ({error})"
    return None


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _pick(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _read_parquet(
    shard: InputShard, source: int, block_rows: int, caption_required: bool
) -> Records:
    row = 0
    try:
        with storage.open_uri(shard.uri) as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            image_col, caption_col = _pick(names, IMAGE_COLUMNS), _pick(names, CAPTION_COLUMNS)
            if image_col is None:
                raise ValueError(
                    f"no image column (one of {', '.join(IMAGE_COLUMNS)}); columns are {names}"
                )
            url_col = _pick(names, URL_COLUMNS)
            meta_cols = tuple(c for c in METADATA_COLUMNS if c in names)
            for batch in parquet.iter_batches(batch_size=block_rows):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    image = data[image_col][i]
                    # Hugging Face datasets store {"bytes": ..., "path": ...}
                    if isinstance(image, dict):
                        image = image.get("bytes")
                    caption = data[caption_col][i] if caption_col else None
                    error, message = _caption_error(caption, caption_required)
                    if image is None:
                        error, message = "missing_image", f"null {image_col!r} value"
                    key = data["key"][i] if "key" in data else f"{shard.number:05d}{row:04d}"
                    yield _record(
                        shard,
                        row,
                        source,
                        key=str(key),
                        url=_text(data[url_col][i]) if url_col else None,
                        caption=_text(caption),
                        image=image,
                        error=error,
                        message=message,
                        meta=metadata_json({c: data[c][i] for c in meta_cols}, meta_cols),
                    )
                    row += 1
    except (OSError, ValueError) as error:
        return f"{shard.uri}: unreadable parquet after {row} rows ({error})"
    return None


def _read_image_folder(shard: InputShard, source: int, caption_required: bool) -> Records:
    """Files [k * IMAGE_FOLDER_SHARD_FILES, ...) of the folder; the key is the path inside it."""
    start = shard.number * IMAGE_FOLDER_SHARD_FILES
    files = image_folder_files(shard.uri)[start : start + IMAGE_FOLDER_SHARD_FILES]
    root = shard.uri.rstrip("/") + "/"
    for row, path in enumerate(files):
        key = path.removeprefix(root)
        try:
            image, (error, message) = (
                storage.read_bytes(path),
                _caption_error(None, caption_required),
            )
        except OSError as failure:
            image, error, message = None, "unreadable_file", f"{path}: {failure}"
        yield _record(
            shard, row, source, key=key, url=path, image=image, error=error, message=message
        )
    return None


def read_shard(
    shard: InputShard, source: int = 0, block_rows: int = 1000, caption_required: bool = True
) -> Generator[list[dict], None, ShardRead]:
    """Blocks of at most ``block_rows`` records of one shard; returns its ``ShardRead`` (how many
    records, why it ended early). Without ``caption_required`` a record with no caption is embedded
    all the same (evaluation images)."""
    if shard.format == "webdataset":
        records = _read_webdataset(shard, source, caption_required)
    elif shard.format == "parquet":
        records = _read_parquet(shard, source, block_rows, caption_required)
    elif shard.format == "image-folder":
        records = _read_image_folder(shard, source, caption_required)
    else:
        raise ValueError(f"read_shard: {shard.format!r} shards are ingested, not read as images")
    block, rows = [], 0
    while True:
        try:
            block.append(next(records))
        except StopIteration as end:
            if block:
                yield block
            return ShardRead(shard.number, rows, end.value)
        rows += 1
        if len(block) >= block_rows:
            yield block
            block = []


def read_blocks(
    batch: dict,
    source: int,
    block_rows: int,
    caption_required: bool = True,
    on_read: Callable[[ShardRead], None] | None = None,
    then=None,
    **then_kwargs,
):
    """Ray Data generator UDF: a batch of shard descriptions (uri, number, format) -> record blocks,
    each passed through ``then(block, **then_kwargs)`` (decoding) before it leaves the task.

    ``on_read`` gets each shard's ``ShardRead`` before the shard's last block leaves, so a tally
    of the rows downstream knows the shard's size by the time its last rows arrive.
    Decoding here, not in a following ``map_batches(batch_size=N)``, keeps one shard per task:
    Ray Data fuses such a step into this one and would then hand N shards to every task."""
    for uri, number, fmt in zip(batch["uri"], batch["number"], batch["format"]):
        blocks = read_shard(
            InputShard(str(uri), int(number), str(fmt)), source, block_rows, caption_required
        )
        held = None  # the block last read, handed over once the next one shows it is not the last
        while True:
            try:
                block = next(blocks)
            except StopIteration as end:
                if on_read:
                    on_read(end.value)
                if held is not None:
                    yield held
                break
            if held is not None:
                yield held
            columns = {k: np.array([r[k] for r in block], dtype=object) for k in block[0]}
            held = then(columns, **then_kwargs) if then else columns


def shard_items(shards: list[InputShard]) -> list[dict]:
    """The Ray Data items that :func:`read_blocks` reads, one per shard."""
    return [{"uri": s.uri, "number": s.number, "format": s.format} for s in shards]
