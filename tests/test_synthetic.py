"""The LAION-style corpus generator: formats, determinism, ground truth, visual signal, s3://."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from react_ray.config import CorpusConfig, GenerateConfig
from react_ray.formats import storage
from react_ray.synthetic.corpus import COLORS, SHAPES, SYNONYMS, generate_corpus

SMALL = CorpusConfig(num_shards=2, samples_per_shard=60, image_size=48, eval_samples_per_class=3)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus"))
    generate_corpus(GenerateConfig(output=out, corpus=SMALL), progress=False)
    return out


def _tar_members(path: str) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(path))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_webdataset_shards_have_img2dataset_layout(corpus_dir):
    members = _tar_members(f"{corpus_dir}/webdataset/00001.tar")
    keys = sorted({name.split(".")[0] for name in members})
    assert keys == [f"00001{row:04d}" for row in range(60)]
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        assert set(meta) >= {"key", "url", "caption", "width", "height", "sha256"}
        assert meta["caption"] == members[f"{key}.txt"].decode() and meta["key"] == key
        image = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        assert image.size == (meta["width"], meta["height"]) == (48, 48) and image.format == "JPEG"


def test_parquet_laion_metadata_and_truth_agree(corpus_dir):
    images = pq.read_table(f"{corpus_dir}/parquet/00000.parquet").to_pylist()
    laion = pq.read_table(f"{corpus_dir}/laion-metadata/part-00000.parquet")
    assert {"URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark"} <= set(
        laion.column_names
    )
    truth = {r["key"]: r for r in pq.read_table(f"{corpus_dir}/ground_truth.parquet").to_pylist()}
    assert len(truth) == 120
    for row, url, text in zip(images, laion["URL"].to_pylist(), laion["TEXT"].to_pylist()):
        assert row["url"] == url and row["caption"] == text == truth[row["key"]]["caption"]
    wds = _tar_members(f"{corpus_dir}/webdataset/00000.tar")
    assert images[5]["jpg"] == wds[f"{images[5]['key']}.jpg"]


def test_captions_follow_ground_truth(corpus_dir):
    rows = pq.read_table(f"{corpus_dir}/ground_truth.parquet").to_pylist()
    kinds = {r["caption_kind"] for r in rows}
    assert {"descriptive", "short", "alt-text", "noise"} <= kinds
    for r in rows:
        named = [s for s in SHAPES if any(syn in r["caption"] for syn in SYNONYMS[s])]
        if r["caption_kind"] in ("short", "alt-text") or (
            r["caption_kind"] == "descriptive" and r["shape"]
        ):
            assert r["shape"] in named, r
        if r["caption_kind"] == "wrong":
            assert r["shape"] not in named, r


def test_images_carry_the_captioned_colour(corpus_dir):
    """Visual signal: the main object's colour covers a real part of the image."""
    images = pq.read_table(f"{corpus_dir}/parquet/00000.parquet").to_pylist()
    truth = {r["key"]: r for r in pq.read_table(f"{corpus_dir}/ground_truth.parquet").to_pylist()}
    fractions = []
    for row in images:
        t = truth[row["key"]]
        if t["shape"] is None:
            continue
        pixels = np.asarray(Image.open(io.BytesIO(row["jpg"])).convert("RGB"), dtype=float)
        close = np.linalg.norm(pixels - np.array(COLORS[t["color"]]), axis=-1) < 60
        fractions.append(close.mean())
    assert np.median(fractions) > 0.08


def test_eval_set_is_labeled_and_balanced(corpus_dir):
    task = json.loads(storage.read_bytes(f"{corpus_dir}/eval/task.json"))
    assert task["classnames"] == list(SHAPES) and task["num_samples"] == 30
    members = _tar_members(f"{corpus_dir}/eval/eval-00000.tar")
    labels = [int(v) for k, v in members.items() if k.endswith(".cls")]
    assert np.bincount(labels).tolist() == [3] * len(SHAPES)


def test_generation_is_deterministic(tmp_path):
    config = CorpusConfig(num_shards=1, samples_per_shard=20, eval_samples_per_class=1)
    for name in ("a", "b"):
        generate_corpus(GenerateConfig(output=str(tmp_path / name), corpus=config), progress=False)
    for rel in ("webdataset/00000.tar", "parquet/00000.parquet", "eval/eval-00000.tar"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    other = config.model_copy(update={"seed": 1})
    generate_corpus(GenerateConfig(output=str(tmp_path / "c"), corpus=other), progress=False)
    assert (tmp_path / "a/webdataset/00000.tar").read_bytes() != (
        tmp_path / "c/webdataset/00000.tar"
    ).read_bytes()


@pytest.mark.s3
def test_generates_all_formats_to_s3(s3_bucket):
    out = f"{s3_bucket}/laion-like"
    summary = generate_corpus(
        GenerateConfig(output=out, corpus=SMALL.model_copy(update={"write_images": True})),
        progress=False,
    )
    assert summary.num_pairs == 120
    assert storage.list_files(f"{out}/webdataset", ".tar") == [
        f"{out}/webdataset/00000.tar",
        f"{out}/webdataset/00001.tar",
    ]
    assert len(storage.list_files(f"{out}/parquet", ".parquet")) == 2
    assert len(storage.list_files(f"{out}/laion-metadata", ".parquet")) == 2
    assert len(storage.list_files(f"{out}/images", ".jpg")) == 120
    table = pq.read_table(storage.open_uri(f"{out}/parquet/00001.parquet"))
    assert table.num_rows == 60 and table["key"][0].as_py() == "000010000"


def test_planted_eval_copies_are_near_copies_and_change_nothing_else(tmp_path):
    """planted_eval_copies: N corpus rows become re-encoded / resized / cropped eval images; the
    rest is unchanged."""
    planted = SMALL.model_copy(update={"planted_eval_copies": 6})
    generate_corpus(GenerateConfig(output=str(tmp_path / "p"), corpus=planted), progress=False)
    generate_corpus(GenerateConfig(output=str(tmp_path / "c"), corpus=SMALL), progress=False)
    truth = pq.read_table(tmp_path / "p" / "ground_truth.parquet").to_pandas()
    copies = truth[truth["planted_from"].notna()]
    assert len(copies) == 6 and sorted(copies["plant_transform"]) == sorted(
        ["reencoded", "resized", "cropped"] * 2
    )
    assert copies["planted_from"].is_unique and set(copies["key"].str[:5]) == {"00000", "00001"}
    evals = _tar_members(str(tmp_path / "p" / "eval" / "eval-00000.tar"))
    for shard in ("00000", "00001"):
        with_copies, without = (
            _tar_members(str(tmp_path / d / "webdataset" / f"{shard}.tar")) for d in "pc"
        )
        changed = {name.split(".")[0] for name in with_copies if with_copies[name] != without[name]}
        assert changed == set(copies.loc[copies["key"].str.startswith(shard), "key"])

    def pixels(data):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((48, 48)), np.float32)

    eval_keys = sorted({name.split(".")[0] for name in evals})
    eval_pixels = np.stack([pixels(evals[f"{k}.jpg"]) for k in eval_keys])
    for row in copies.itertuples():
        data = _tar_members(f"{tmp_path}/p/webdataset/{row.key[:5]}.tar")[f"{row.key}.jpg"]
        assert data != evals[f"{row.planted_from}.jpg"]
        assert (Image.open(io.BytesIO(data)).size == (72, 72)) == (row.plant_transform == "resized")
        distance = np.abs(eval_pixels - pixels(data)).mean(axis=(1, 2, 3))
        # of all eval images, closest to its source
        assert eval_keys[int(np.argmin(distance))] == row.planted_from
        assert row.shape == SHAPES[int(evals[f"{row.planted_from}.cls"])]
