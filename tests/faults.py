"""Shards with every kind of bad input, for the embedding tests."""

from __future__ import annotations

import io
import json
import tarfile

from PIL import Image


def jpeg(color: str = "red", size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "JPEG")
    return buffer.getvalue()


def bomb_png(side: int = 12_000) -> bytes:
    """A decompression bomb: 144M pixels in ~20 KB."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, "PNG")
    return buffer.getvalue()


def tar_bytes(samples: list[dict[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sample(key: str, image: bytes | None, caption: str | None) -> dict[str, bytes]:
    out = {"__key__": key, "json": json.dumps({"key": key, "url": f"http://x/{key}.jpg"}).encode()}
    if image is not None:
        out["jpg"] = image
    if caption is not None:
        out["txt"] = caption.encode()
    return out


def strip_png(width: int = 100_000) -> bytes:
    """An aspect-ratio bomb: 1 x 100,000 pixels in a few hundred bytes; scaling its short side to
    the model's size would make 224 x 22.4M pixels."""
    buffer = io.BytesIO()
    Image.new("1", (width, 1)).save(buffer, "PNG")
    return buffer.getvalue()


def gif(color: str = "green", size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (size, size), 3).save(buffer, "GIF")
    return buffer.getvalue()


GOOD = jpeg()
# key -> (image bytes, caption, the reason the stage must count, or None when it embeds)
FAULTY_SHARD = {
    "000010000": (GOOD, "a red square", None),
    "000010001": (b"\xff\xd8 this is not a jpeg", "corrupt", "corrupt_image"),
    "000010002": (GOOD[: len(GOOD) // 2], "truncated", "truncated_image"),
    "000010003": (GOOD, "", "missing_caption"),
    "000010004": (GOOD, None, "missing_caption"),
    "000010005": (None, "no image member", "missing_image"),
    "000010006": (b"", "zero bytes", "zero_size_image"),
    "000010007": (bomb_png(), "a bomb", "oversize_image"),
    "000010008": (jpeg("blue"), "a blue square", None),
    "000010009": (strip_png(), "a 1 x 100,000 strip", "oversize_image"),
    "000010010": (gif(), "a palette gif", None),  # stored as KEY.gif (MEMBERS below)
    "000010011": (GOOD, "its json is a list", "bad_json"),
    "000010012": (GOOD, None, "bad_caption"),  # the json's caption is a number
}
# Members that replace or join a sample's defaults (None: the member is left out).
MEMBERS = {
    "000010010": {"jpg": None, "gif": gif()},
    "000010011": {"json": b"[1, 2, 3]"},
    "000010012": {"json": json.dumps({"key": "000010012", "caption": 12345}).encode()},
}


def faulty_shard() -> bytes:
    samples = []
    for key, (image, caption, _) in FAULTY_SHARD.items():
        members = sample(key, image, caption) | MEMBERS.get(key, {})
        samples.append({k: v for k, v in members.items() if v is not None})
    return tar_bytes(samples)


def read_whole(shard, **kwargs) -> tuple[list[dict], object]:
    """All records of a shard, and its ShardRead (what ``read_shard`` returns at its end)."""
    from react_ray.formats.readers import read_shard

    blocks, records = read_shard(shard, **kwargs), []
    while True:
        try:
            records.extend(next(blocks))
        except StopIteration as end:
            return records, end.value
