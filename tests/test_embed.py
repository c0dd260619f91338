"""Embedding stage: decoding, readers, and the Ray Data pipeline end to end (real local Ray)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from faults import FAULTY_SHARD, GOOD, faulty_shard, read_whole, sample, tar_bytes
from PIL import Image

from react_ray.config import CorpusConfig, EmbedConfig, GenerateConfig, ModelConfig
from react_ray.formats import ids, storage
from react_ray.formats.decode import decode_image
from react_ray.formats.embedding_set import (
    VECTOR_COLUMNS,
    column_matrix,
    load_embeddings,
    read_parquet,
)
from react_ray.formats.readers import InputShard, list_input_shards, read_shard
from react_ray.formats.shard_writer import ShardRead
from react_ray.jobs.embed import run_embedding
from react_ray.models import build_model
from react_ray.synthetic.corpus import generate_corpus, shard_samples

MODEL = ModelConfig(name="react-micro")
CORPUS = CorpusConfig(num_shards=2, samples_per_shard=40, image_size=40, eval_samples_per_class=1)


def _config(input_uri: str, output: str, **kw) -> EmbedConfig:
    return EmbedConfig(
        input=input_uri, output=output, model=MODEL, batch_size=16, read_block_rows=16, **kw
    )


def vector_encodings(path: str) -> set[str]:
    """The parquet encodings of a file's embedding columns' data pages."""
    metadata = pq.ParquetFile(path).metadata
    return {
        encoding
        for group in range(metadata.num_row_groups)
        for c in range(metadata.num_columns)
        if (column := metadata.row_group(group).column(c)).path_in_schema.split(".")[0]
        in VECTOR_COLUMNS
        for encoding in column.encodings
        if encoding != "RLE"  # the definition levels'
    }


# ---------------------------------------------------------------- no Ray


def test_decode_matches_open_clip_preprocess():
    clip = build_model(MODEL)
    image = Image.new("RGB", (90, 51))
    image.paste(Image.new("RGB", (30, 51), "red"), (10, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    pixels, reason, _ = decode_image(buffer.getvalue(), 32, 10**6)
    pixels = pixels.copy()
    assert reason is None and pixels.shape == (32, 32, 3)
    cfg = clip.model.visual.preprocess_cfg
    ours = (
        torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
        - torch.tensor(cfg["mean"])[:, None, None]
    ) / torch.tensor(cfg["std"])[:, None, None]
    assert torch.allclose(ours, clip.preprocess(image), atol=1e-5)


DECODE_FAULTS = [
    k
    for k, (_, _, reason) in FAULTY_SHARD.items()
    if reason not in ("missing_caption", "missing_image", "bad_json", "bad_caption")
]


@pytest.mark.parametrize("key", DECODE_FAULTS)
def test_every_image_fault_gets_its_reason(key):
    image, _, reason = FAULTY_SHARD[key]
    assert decode_image(image, 32, 40_000_000)[1] == reason


def test_reader_counts_records_and_reports_truncated_tars(tmp_path):
    (tmp_path / "00001.tar").write_bytes(faulty_shard())
    records, end = read_whole(InputShard(str(tmp_path / "00001.tar"), 1, "webdataset"))
    assert [r["key"] for r in records] == list(FAULTY_SHARD)
    assert [r["id"] for r in records] == [int(ids.encode(1, i)) for i in range(len(FAULTY_SHARD))]
    assert {r["key"]: r["error"] for r in records if r["error"]} == {
        k: reason for k, (_, _, reason) in FAULTY_SHARD.items() if reason and k not in DECODE_FAULTS
    }
    assert end == ShardRead(1, len(FAULTY_SHARD), None)

    whole = faulty_shard()
    (tmp_path / "00002.tar").write_bytes(whole[: len(whole) // 3])
    records, end = read_whole(InputShard(str(tmp_path / "00002.tar"), 2, "webdataset"))
    assert 0 < len(records) < len(FAULTY_SHARD)
    assert end.rows == len(records) and "00002.tar: truncated or corrupt tar" in end.error

    # Cut exactly where a member's header starts (a 512-byte boundary): tarfile reads that as a
    # complete archive; the missing end-of-archive blocks give the loss away.
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        cut = next(m.offset for m in tar.getmembers() if m.name.startswith("000010006."))
    (tmp_path / "00003.tar").write_bytes(whole[:cut])
    records, end = read_whole(InputShard(str(tmp_path / "00003.tar"), 3, "webdataset"))
    assert [r["key"] for r in records] == list(FAULTY_SHARD)[:6]
    assert "no end-of-archive blocks after the member ending at byte" in end.error


def test_listing_rejects_empty_inputs_and_colliding_shard_numbers(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"no \*.tar files in .* for input_format='webdataset'"
    ):
        list_input_shards(str(tmp_path), "webdataset")
    (tmp_path / "a-0001.tar").write_bytes(b"")
    (tmp_path / "b-1.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="same shard number 1"):
        list_input_shards(str(tmp_path), "webdataset")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_image_folders_are_read_in_sorted_shards_with_optional_captions(
    tmp_path, monkeypatch, request, where
):
    """An image folder (CLASS/*.jpg, any depth; local or s3://): shards of N files in path order,
    keys are
    the paths inside it, no caption needed when ``caption_required`` is off; the zero-shot loader
    reads the
    same folder."""
    from react_ray.evaluate.zeroshot import labeled_samples
    from react_ray.formats import readers

    root = str(tmp_path) if where == "local" else f"{request.getfixturevalue('s3_bucket')}/eval"
    monkeypatch.setattr(readers, "IMAGE_FOLDER_SHARD_FILES", 3)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(jpeg, format="JPEG")
    names = ["cat/a.jpg", "cat/b.JPG", "dog/c.png", "dog/deeper/d.jpeg", "fish/e.webp"]
    for name in names:
        storage.write_bytes_atomic(f"{root}/{name}", jpeg.getvalue())
    storage.write_text_atomic(f"{root}/notes.txt", "not an image")
    shards = list_input_shards(root, "image-folder")
    assert [(s.number, s.uri) for s in shards] == [(0, root), (1, root)]
    records = [r for s in shards for block in read_shard(s, caption_required=False) for r in block]
    assert [r["key"] for r in records] == names and not any(r["error"] for r in records)
    assert [r["id"] for r in records] == [int(ids.encode(k // 3, k % 3)) for k in range(5)]
    assert all(r["image"] == jpeg.getvalue() for r in records)
    strict = [r for block in read_shard(shards[0]) for r in block]
    assert {r["error"] for r in strict} == {"missing_caption"}
    labels = [label for _, _, (label,) in labeled_samples(root, ["cat", "dog", "fish", "deeper"])]
    assert labels == [0, 0, 1, 3, 2]  # the folder holding each image names its class
    with pytest.raises(
        FileNotFoundError, match="no jpg/jpeg/png/webp/gif/bmp/tif/tiff files under"
    ):
        list_input_shards(f"{root}/cat/missing", "image-folder")


def test_config_rejects_half_precision_on_cpu_actors():
    from react_ray.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"precision: got 'fp16' with pool.num_gpus=0"):
        build_config(EmbedConfig, {"input": "x", "output": "y", "precision": "fp16"})
    with pytest.raises(ConfigError, match=r"max_actors \(1\) must be >= min_actors \(3\)"):
        build_config(EmbedConfig, {"input": "x", "output": "y", "pool": {"min_actors": 3}})


# ---------------------------------------------------------------- real local Ray


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus"))
    generate_corpus(GenerateConfig(output=out, corpus=CORPUS), progress=False)
    return out


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_readers_keep_the_sources_laion_columns(corpus, fmt):
    """img2dataset keeps LAION's scores (punsafe, ...) in the json / parquet; the reader carries
    them as ``meta``."""
    shard = list_input_shards(f"{corpus}/{fmt}", fmt)[0]
    records = [r for block in read_shard(shard) for r in block]
    truth = shard_samples(CORPUS, shard.number)
    assert len(records) == len(truth) > 0
    for record, expected in zip(records, truth):
        meta = json.loads(record["meta"])
        assert meta["punsafe"] == expected["punsafe"]
        assert meta["similarity"] == expected["similarity"]
        assert (meta["width"], meta["height"]) == (expected["width"], expected["height"])


@pytest.mark.ray
@pytest.mark.parametrize("decode_in_actor", [False, True], ids=["decode-tasks", "decode-in-actor"])
def test_pipeline_counts_every_fault_and_embeds_the_rest(
    ray_local, tmp_path, corpus, decode_in_actor
):
    inputs = tmp_path / "wds"
    inputs.mkdir()
    (inputs / "00000.tar").write_bytes(storage.read_bytes(f"{corpus}/webdataset/00000.tar"))
    (inputs / "00001.tar").write_bytes(faulty_shard())
    whole = faulty_shard()
    (inputs / "00002.tar").write_bytes(whole[: len(whole) // 3])  # truncated mid-file
    (inputs / "00003.tar").write_bytes(b"garbage, not a tar at all" * 40)
    out = str(tmp_path / "emb")
    summary = run_embedding(
        _config(
            str(inputs),
            out,
            pool={"min_actors": 1, "max_actors": 2},
            decode_in_actor=decode_in_actor,
        ),
        progress=False,
    )

    faulty = json.loads(storage.read_bytes(f"{out}/part-000001.stats.json"))
    expected = Counter(reason for _, _, reason in FAULTY_SHARD.values() if reason)
    clean = sum(reason is None for _, _, reason in FAULTY_SHARD.values())  # the gif among them
    assert faulty["skipped"] == dict(expected) and faulty["rows_embedded"] == clean == 3
    assert {r["key"]: r["reason"] for r in faulty["skipped_records"]} == {
        k: reason for k, (_, _, reason) in FAULTY_SHARD.items() if reason
    }
    garbage = json.loads(storage.read_bytes(f"{out}/part-000003.stats.json"))
    assert (
        garbage["rows_in"] == 0 and "00003.tar: truncated or corrupt tar" in garbage["shard_error"]
    )
    assert summary.rows_in == summary.rows_embedded + sum(summary.skipped.values())
    assert len(summary.shard_errors) == 2 and summary.shards == 4

    # Embeddings equal the model called directly on the same images and captions.
    table = read_parquet(f"{out}/part-000000.parquet")
    assert table["id"].to_pylist() == [int(ids.encode(0, r)) for r in range(40)]
    members = {}
    with tarfile.open(f"{corpus}/webdataset/00000.tar") as tar:
        for m in tar.getmembers():
            members[m.name] = tar.extractfile(m).read()
    clip = build_model(MODEL)
    keys, captions = table["key"].to_pylist()[:8], table["caption"].to_pylist()[:8]
    images = torch.stack(
        [clip.preprocess(Image.open(io.BytesIO(members[f"{k}.jpg"]))) for k in keys]
    )
    np.testing.assert_allclose(
        column_matrix(table, "img_emb")[:8].astype(np.float32),
        clip.encode_images(images).numpy(),
        atol=3e-3,
    )
    np.testing.assert_allclose(
        column_matrix(table, "txt_emb")[:8].astype(np.float32),
        clip.encode_texts(captions).numpy(),
        atol=3e-3,
    )
    assert table.schema.field("img_emb").type == pa.list_(pa.float16(), 32)
    assert vector_encodings(f"{out}/part-000000.parquet") == {"PLAIN"}  # no dictionary to decode

    again = run_embedding(_config(str(inputs), out), progress=False)  # resume: nothing left to do
    assert again.this_run_shards == 0 and again.rows_embedded == summary.rows_embedded


@pytest.mark.ray
def test_parquet_input_and_model_mismatch(ray_local, tmp_path, corpus):
    out = str(tmp_path / "emb")
    summary = run_embedding(
        _config(f"{corpus}/parquet", out, input_format="parquet"), progress=False
    )
    assert (summary.rows_in, summary.rows_embedded) == (80, 80)
    ids_, vectors = load_embeddings(out)
    assert len(np.unique(ids_)) == 80 and np.allclose(
        np.linalg.norm(vectors.astype(np.float32), axis=1), 1, atol=2e-3
    )
    table = read_parquet(f"{out}/part-000001.parquet", ["id", "meta"])
    punsafe = {
        int(ids.encode(1, row)): s["punsafe"] for row, s in enumerate(shard_samples(CORPUS, 1))
    }
    assert {i: json.loads(m)["punsafe"] for i, m in zip(*table.to_pydict().values())} == punsafe
    other = EmbedConfig(
        input=f"{corpus}/parquet",
        output=out,
        input_format="parquet",
        model=ModelConfig(name="react-tiny"),
    )
    with pytest.raises(
        ValueError,
        match="holds embeddings with model='react-micro'; this run has model='react-tiny'",
    ):
        run_embedding(other, progress=False)
    # Another crawl whose files also start at 00000: refused, not skipped as "already done".
    crawl = other.model_copy(
        update={
            "input": f"{corpus}/webdataset",
            "input_format": "webdataset",
            "model": ModelConfig(name="react-micro"),
        }
    )
    with pytest.raises(
        ValueError,
        match=rf"holds the embeddings of {corpus}/parquet; this run reads "
        rf"{corpus}/webdataset\. Embed each input into its own output",
    ):
        run_embedding(crawl, progress=False)


@pytest.mark.ray
@pytest.mark.s3
def test_s3_in_and_out(ray_local, s3_bucket):
    corpus = f"{s3_bucket}/corpus"
    generate_corpus(
        GenerateConfig(output=corpus, corpus=CORPUS.model_copy(update={"formats": ["webdataset"]})),
        progress=False,
    )
    out = f"{s3_bucket}/embeddings"
    summary = run_embedding(_config(f"{corpus}/webdataset", out), progress=False)
    assert (summary.shards, summary.rows_embedded) == (2, 80)
    assert storage.exists(f"{out}/part-000001.done") and storage.exists(f"{out}/_summary.json")
    ids_, _ = load_embeddings(out)
    assert sorted(ids_) == sorted(int(ids.encode(s, r)) for s in (0, 1) for r in range(40))


@pytest.mark.ray
def test_laion_embedding_ingestion_keeps_ids_aligned(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    for number, rows in ((0, 50), (7, 30)):
        vectors = rng.normal(size=(rows, 32)).astype(np.float16)
        vectors[3] = 0  # an invalid vector is counted, not silently dropped
        for folder, prefix, data in (
            ("img_emb", "img_emb", vectors),
            ("text_emb", "text_emb", -vectors),
        ):
            (tmp_path / folder).mkdir(exist_ok=True)
            np.save(tmp_path / folder / f"{prefix}_{number:04d}.npy", data)
        (tmp_path / "metadata").mkdir(exist_ok=True)
        pq.write_table(
            pa.table(
                {
                    "url": [f"http://x/{number}/{i}.jpg" for i in range(rows)],
                    "caption": [f"caption {number}-{i}" for i in range(rows)],
                    "punsafe": [i / 100 for i in range(rows)],
                }
            ),
            tmp_path / "metadata" / f"metadata_{number:04d}.parquet",
        )
    out = str(tmp_path / "emb")
    summary = run_embedding(
        _config(str(tmp_path), out, input_format="laion-embeddings"), progress=False
    )
    assert (summary.rows_in, summary.rows_embedded, summary.skipped) == (
        80,
        78,
        {"invalid_embedding": 2},
    )
    table = read_parquet(f"{out}/part-000007.parquet")
    for id_, url, caption, meta in zip(
        *(table[c].to_pylist() for c in ("id", "url", "caption", "meta"))
    ):
        _, shard, row = ids.decode(id_)
        assert url == f"http://x/7/{row}.jpg" and caption == f"caption 7-{row}" and shard == 7
        assert json.loads(meta) == {"punsafe": row / 100}
    img, txt = column_matrix(table, "img_emb"), column_matrix(table, "txt_emb")
    np.testing.assert_allclose(img.astype(np.float32), -txt.astype(np.float32), atol=1e-3)
    assert vector_encodings(f"{out}/part-000007.parquet") == {"PLAIN"}  # read fast, like the rest


@pytest.mark.s3
def test_a_write_that_fails_leaves_no_object_on_s3(s3_bucket):
    """The atomic writer on S3: a body that raises aborts the upload (small: never sent; large: the
    multipart upload is aborted), where closing the file would have committed what was written."""
    # under and over s3fs's 50 MiB block: one part already uploaded
    for size in (
        5_000,
        60 * 2**20,
    ):
        uri = f"{s3_bucket}/partial/{size}.bin"
        with pytest.raises(RuntimeError, match="killed mid-write"):
            with storage.atomic_writer(uri) as f:
                f.write(b"x" * size)
                raise RuntimeError("killed mid-write")
        assert not storage.exists(uri)
    storage.write_bytes_atomic(f"{s3_bucket}/partial/whole.bin", b"whole")
    assert storage.read_bytes(f"{s3_bucket}/partial/whole.bin") == b"whole"


def test_vectors_are_read_only_from_committed_shards_and_only_for_ids_they_hold(tmp_path):
    from react_ray.formats.embedding_set import embedding_table, fetch_vectors, write_parquet
    from react_ray.formats.shard_writer import done_uri

    out = str(tmp_path)
    rows = np.array([0, 2, 5])
    vectors = np.eye(3, 4, dtype=np.float32)
    table = embedding_table(
        [int(ids.encode(3, r)) for r in rows], ["k"] * 3, ["u"] * 3, ["c"] * 3, vectors, None
    )
    write_parquet(f"{out}/part-000003.parquet", table)
    wanted = np.array([int(ids.encode(3, 5)), int(ids.encode(3, 0))])
    with pytest.raises(KeyError, match="shard part-000003 is not committed"):
        fetch_vectors(out, wanted)
    storage.write_text_atomic(done_uri(out, "part-000003"), "{}")
    np.testing.assert_array_equal(fetch_vectors(out, wanted), vectors[[2, 0]])
    with pytest.raises(KeyError, match=r"holds no row for ids \[" + str(int(ids.encode(3, 4)))):
        # between rows 2 and 5: never a neighbour's vector
        fetch_vectors(out, np.array([int(ids.encode(3, 4))]))
    assert len(load_embeddings(out)[0]) == 3


@pytest.mark.ray
def test_a_changed_input_shard_is_refused_not_kept_as_done(ray_local, tmp_path, corpus):
    inputs = tmp_path / "wds"
    inputs.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (inputs / name).write_bytes(storage.read_bytes(f"{corpus}/webdataset/{name}"))
    out = str(tmp_path / "emb")
    run_embedding(_config(str(inputs), out), progress=False)
    recorded = json.loads(storage.read_bytes(f"{out}/_inputs.json"))
    assert {name: entry["bytes"] for name, entry in recorded.items()} == {
        "part-000000": (inputs / "00000.tar").stat().st_size,
        "part-000001": (inputs / "00001.tar").stat().st_size,
    }
    # unchanged: all done
    assert run_embedding(_config(str(inputs), out), progress=False).this_run_shards == 0
    before = (inputs / "00001.tar").stat().st_size
    with open(
        inputs / "00001.tar", "ab"
    ) as tar:  # a re-crawl wrote other content under the same name
        tar.write(b"\0" * 1024)
    with pytest.raises(
        ValueError,
        match=rf"1 input shard\(s\) changed since they were embedded: part-000001 "
        rf"\(.*00001.tar: {before:,} bytes then, {before + 1024:,} now\)",
    ):
        run_embedding(_config(str(inputs), out), progress=False)


def test_a_tar_member_over_the_cap_is_counted_not_read(tmp_path, monkeypatch):
    from react_ray.formats import readers

    monkeypatch.setattr(readers, "MAX_MEMBER_BYTES", 10_000)
    big = GOOD + b"\0" * 20_000  # a member of 20 KB where the cap is 10 KB
    (tmp_path / "00004.tar").write_bytes(
        tar_bytes([sample("a", GOOD, "ok"), sample("b", big, "too big")])
    )
    records, end = read_whole(InputShard(str(tmp_path / "00004.tar"), 4, "webdataset"))
    assert [(r["key"], r["error"]) for r in records] == [("a", ""), ("b", "oversize_member")]
    assert (
        "b.jpg (" in records[1]["message"]
        and "> 10,000)" in records[1]["message"]
        and end.error is None
    )
