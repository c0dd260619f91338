"""Property-based tests (hypothesis): random corruptions of valid tars, parquet files and images
never crash a reader or the decoder; every record comes out embedded-able or skipped with a
reason; the ledger adds up. Then one embedding job over such shards, on a real Ray cluster."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import GOOD, faulty_shard, gif, jpeg, read_whole, strip_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from react_ray.formats.decode import decode_batch, decode_image
from react_ray.formats.readers import InputShard

REASONS = {"corrupt_image", "truncated_image", "zero_size_image", "oversize_image"}
RECORD_REASONS = {
    "missing_caption",
    "missing_image",
    "bad_json",
    "bad_caption",
    "oversize_member",
    "unreadable_file",
}
EXAMPLES = {"max_examples": 300, "deadline": None, "suppress_health_check": list(HealthCheck)}
COUNTED: dict[str, int] = {}


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (37, 23), (10, 200, 30, 128)).save(buffer, "PNG")
    return buffer.getvalue()


SEEDS = [GOOD, jpeg("blue", 64), _png(), gif(), strip_png(3000)]


def corrupt(original: bytes, rng: random.Random) -> bytes:
    """``original`` cut, with bytes flipped, spliced with garbage, or a span repeated (1-4
    times)."""
    data = bytearray(original)
    for _ in range(rng.randint(1, 4)):
        if not data:
            break
        at, kind = rng.randrange(len(data)), rng.choice(["cut", "flip", "splice", "repeat"])
        if kind == "cut":
            del data[at:]
        elif kind == "flip":
            data[at] ^= rng.randint(1, 255)
        elif kind == "splice":
            data[at:at] = rng.randbytes(rng.randint(1, 64))
        else:
            data[at:at] = data[at : at + rng.randint(1, 512)]
    return bytes(data)


def corrupted(original: bytes) -> st.SearchStrategy[bytes]:
    return st.randoms(use_true_random=False).map(lambda rng: corrupt(original, rng))


def _count(name: str) -> None:
    COUNTED[name] = COUNTED.get(name, 0) + 1


@settings(**EXAMPLES)
@given(
    st.sampled_from(SEEDS).flatmap(corrupted),
    st.sampled_from([16, 224]),
    st.sampled_from(["shortest", "squash", "whole"]),
)
def test_decoding_any_bytes_gives_pixels_or_a_reason(data, size, mode):
    _count("decode")
    pixels, reason, message = decode_image(data, size, 1_000_000, mode)
    if pixels is None:
        assert reason in REASONS and message
    else:
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        assert pixels.shape[0] * pixels.shape[1] <= 1_000_000
        if mode != "whole":
            assert pixels.shape[:2] == (size, size)


def _ledger(records: list[dict], end) -> None:
    """Every record is clean or carries a known reason, and so is every decode; the shard's
    ShardRead counts them all."""
    assert end.rows == len(records) and len({r["id"] for r in records}) == len(records)
    assert all(r["error"] in RECORD_REASONS | {""} for r in records)
    if records:
        decoded = decode_batch(
            {k: np.array([r[k] for r in records], dtype=object) for k in records[0]}, 16, 10**6
        )
        assert all(e in REASONS | RECORD_REASONS | {""} for e in decoded["error"])


@settings(**EXAMPLES)
@given(st.binary(min_size=0, max_size=1) | st.just(faulty_shard()).flatmap(corrupted))
def test_reading_a_corrupted_tar_never_raises_and_counts_every_record(tmp_path_factory, data):
    _count("tar")
    path = tmp_path_factory.mktemp("tar") / "00007.tar"
    path.write_bytes(data)
    _ledger(*read_whole(InputShard(str(path), 7, "webdataset")))


def _parquet_bytes() -> bytes:
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(6)],
            "url": [f"http://x/{i}.jpg" for i in range(6)],
            "caption": ["a", "b", None, "d", "e", "f"],
            "jpg": [GOOD, b"junk", GOOD, None, GOOD, GOOD],
            "punsafe": [0.1] * 6,
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=2)
    return buffer.getvalue()


@settings(**EXAMPLES)
@given(st.just(_parquet_bytes()).flatmap(corrupted))
def test_reading_a_corrupted_parquet_never_raises_and_counts_every_record(tmp_path_factory, data):
    _count("parquet")
    path = tmp_path_factory.mktemp("pq") / "00008.parquet"
    path.write_bytes(data)
    _ledger(*read_whole(InputShard(str(path), 8, "parquet")))


def test_the_examples_ran():
    """The properties above really ran their examples (hypothesis can stop early only on
    failure)."""
    print(f"\nhypothesis examples: {json.dumps(COUNTED)}")
    assert all(COUNTED.get(k, 0) >= EXAMPLES["max_examples"] for k in ("decode", "tar", "parquet"))


@pytest.mark.ray
def test_an_embedding_job_over_corrupted_shards_accounts_for_every_record(ray_local, tmp_path):
    """Twelve shards, each a seeded random corruption of the faulty shard: the job finishes, and
    rows in = embedded + skipped, per shard and in total."""
    from react_ray.config import EmbedConfig, ModelConfig
    from react_ray.formats.storage import read_bytes
    from react_ray.jobs.embed import run_embedding

    inputs = tmp_path / "wds"
    inputs.mkdir()
    for seed in range(12):
        (inputs / f"{seed:05d}.tar").write_bytes(corrupt(faulty_shard(), random.Random(seed)))
    summary = run_embedding(
        EmbedConfig(
            input=str(inputs),
            output=str(tmp_path / "emb"),
            model=ModelConfig(name="react-micro"),
            batch_size=16,
            decode={"num_cpus": 0.5},
            pool={"num_cpus": 0.5},
        ),
        progress=False,
    )
    assert summary.rows_in == summary.rows_embedded + sum(summary.skipped.values())
    for seed in range(12):
        stats = json.loads(read_bytes(str(tmp_path / "emb" / f"part-{seed:06d}.stats.json")))
        assert stats["rows_in"] == stats["rows_embedded"] + sum(stats["skipped"].values())
    print(
        f"\ncorrupted shards: {summary.rows_in} records in, {summary.rows_embedded} embedded, "
        f"skipped {summary.skipped}, {len(summary.shard_errors)} shard errors"
    )
