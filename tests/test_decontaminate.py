"""Decontamination: exact nearest-eval search, removal by image and caption, records and
statements."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from react_ray.config import DecontaminateConfig
from react_ray.formats import storage
from react_ray.formats.embedding_set import EmbeddingSetInfo
from react_ray.formats.retrieved_set import DecontaminationRecord, RetrievalRecord
from react_ray.index.sharded import ShardedIndex
from react_ray.retrieve.decontaminate import (
    Decontaminator,
    EvalImages,
    decontamination_statement,
    eval_input_format,
    nearest_eval_image,
    normalized_text,
)

CLASSES = ["cat", "dog", "fish"]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _world(seed: int = 0, dim: int = 32):
    """30 eval images around 3 class centres; per eval image one near-copy (cos ~0.98) and one
    unrelated image of the same class (cos ~0.6 to it)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(3, dim)))
    eval_labels = np.repeat(np.arange(3), 10)
    eval_vectors = _unit(centres[eval_labels] + 1.0 * _unit(rng.normal(size=(30, dim))))
    copies = _unit(eval_vectors + 0.2 * _unit(rng.normal(size=(30, dim))))
    unrelated = _unit(centres[eval_labels] + 1.0 * _unit(rng.normal(size=(30, dim))))
    images = EvalImages(
        ["s3://bench/eval"],
        ["s3://bench/eval-emb"],
        np.zeros(30, int),
        np.arange(100, 130),
        [f"e{i}" for i in range(30)],
        ["a red star on striped paper"] + ["image"] * 29,
        eval_vectors,
        {"decode_error": 2},
    )
    pairs = pd.DataFrame(
        {
            "id": np.arange(60),
            "label": np.concatenate([eval_labels, eval_labels]),
            "score": rng.uniform(0.2, 0.3, 60).astype(np.float32),
        }
    )
    return images, pairs, np.concatenate([copies, unrelated])


def test_nearest_eval_image_is_exact_in_batches():
    images, _, vectors = _world()
    cosine, row = nearest_eval_image(vectors, images.vectors, batch=7)
    brute = vectors @ images.vectors.T
    np.testing.assert_array_equal(row, brute.argmax(1))
    np.testing.assert_allclose(cosine, brute.max(1), atol=1e-5)


def test_copies_are_removed_and_unrelated_pairs_of_the_class_kept():
    images, pairs, vectors = _world()
    brute = vectors @ images.vectors.T
    # the world is what it claims
    assert brute[np.arange(30), np.arange(30)].min() > 0.9 > brute[30:].max()
    decontaminate = Decontaminator(
        DecontaminateConfig(eval_sets=images.sets, report_pairs=5), images, CLASSES
    )
    untouched = decontaminate.record()  # nothing retrieved: an empty record and page, not an error
    assert untouched.removed == 0 and untouched.removed_per_class == {"cat": 0, "dog": 0, "fish": 0}
    assert decontaminate.html("t", "unused").count("<p>none</p>") == 2
    keep = decontaminate(pairs, vectors, [f"caption {i}" for i in range(60)])
    assert keep.tolist() == [False] * 30 + [True] * 30
    removed = decontaminate.removed
    assert sorted(removed["id"]) == list(range(30)) and (removed["reason"] == "image").all()
    assert (removed["eval_id"] == removed["id"] + 100).all() and (
        removed["eval_key"] == "e" + removed["id"].astype(str)
    ).all()
    assert removed["cosine"].is_monotonic_decreasing
    assert len(decontaminate.closest_kept) == 5 and decontaminate.closest_kept["cosine"].max() < 0.9
    record = decontaminate.record()
    assert record.removed == 30 and record.removed_per_class == {"cat": 10, "dog": 10, "fish": 10}
    assert record.removed_by_reason == {"image": 30, "caption": 0} and record.eval_images == 30
    assert (
        record.eval_images_not_embedded == {"decode_error": 2} and record.closest_kept_cosine < 0.9
    )
    table = decontaminate.removed_table()
    assert table.num_rows == 30 and {"eval_key", "cosine", "reason", "class"} <= set(
        table.column_names
    )


def test_repeated_captions_are_removed_only_when_asked_and_long_enough():
    images, pairs, vectors = _world()
    captions = [f"caption {i}" for i in range(60)]
    # the first eval caption; a short one
    captions[40], captions[41] = (
        "A Red-Star on  striped paper!",
        "Image",
    )
    config = DecontaminateConfig(eval_sets=images.sets, captions=True)
    decontaminate = Decontaminator(config, images, CLASSES)
    keep = decontaminate(pairs, vectors, captions)
    assert not keep[40] and keep[41] and keep[30:].sum() == 29
    by_caption = decontaminate.removed[decontaminate.removed["reason"] == "caption"]
    assert by_caption["id"].tolist() == [40] and by_caption["eval_key"].tolist() == ["e0"]
    assert Decontaminator(config.model_copy(update={"captions": False}), images, CLASSES)(
        pairs, vectors, captions
    )[40]
    assert normalized_text(" A Red-Star!\n") == "a red star"


def test_evaluation_statement_says_whether_the_eval_set_was_covered(tmp_path):
    retrieved = tmp_path / "retrieved"
    write = lambda decontamination: storage.write_text_atomic(  # noqa: E731
        str(retrieved / "retrieval.json"),
        RetrievalRecord(
            task={}, steps=[], pairs=0, decontamination=decontamination
        ).model_dump_json(),
    )
    write(None)
    assert "was NOT decontaminated" in decontamination_statement(str(retrieved), "/data/eval")
    write(
        DecontaminationRecord(
            eval_sets=["/data/eval/"],
            embedding_sets=["/work/eval"],
            eval_images=400,
            eval_images_not_embedded={},
            threshold=0.95,
            captions=True,
            removed=12,
            removed_by_reason={"image": 12, "caption": 0},
            removed_per_class={},
            closest_kept_cosine=None,
        )
    )
    covered = decontamination_statement(str(retrieved), "/data/eval/eval-00000.tar")
    assert (
        "decontaminated against this eval set: 12 pairs removed" in covered
        and "cosine >= 0.95" in covered
    )
    assert "NOT against this eval set" in decontamination_statement(str(retrieved), "/data/other")


def test_eval_set_formats_are_recognised(tmp_path):
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "00000.tar").write_bytes(b"")
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "00000.parquet").write_bytes(b"")
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "_embedding.json").write_text("{}")
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    formats = {
        name: eval_input_format(str(tmp_path / name)) for name in ("wds", "pq", "emb", "folder")
    }
    assert formats == {
        "wds": "webdataset",
        "pq": "parquet",
        "emb": "embeddings",
        "folder": "image-folder",
    }
    with pytest.raises(ValueError, match="is a file; give the folder"):
        eval_input_format(str(tmp_path / "wds" / "00000.tar"))


# ---------------------------------------------------------------- end to end on generated data
@pytest.mark.ray
def test_planted_copies_of_eval_images_are_removed_and_the_rest_kept(ray_local, tmp_path, capsys):
    """Copies of eval images (re-encoded, resized, cropped) planted in a generated corpus are all
    removed at
    the default threshold; the other pairs stay. The eval set goes through the embedding stage
    twice, as its
    webdataset shards and as an image folder. The model is react-thumbnail: its random image tower
    is a
    random projection of an 8x8 thumbnail, so copies are close and distinct images are not, as for a
    trained CLIP (the tiny CLIPs trained here do not tell copies from look-alikes; see docs)."""

    import pyarrow.parquet as pq
    import yaml

    from react_ray.config import (
        CorpusConfig,
        EmbedConfig,
        GenerateConfig,
        IndexConfig,
        ModelConfig,
        RetrieveConfig,
    )
    from react_ray.evaluate.zeroshot import labeled_samples
    from react_ray.jobs.embed import run_embedding
    from react_ray.jobs.index import build_index
    from react_ray.jobs.retrieve import run_retrieval
    from react_ray.report import data_uri
    from react_ray.synthetic.corpus import SHAPES, generate_corpus

    model = ModelConfig(name="react-thumbnail")
    corpus = tmp_path / "corpus"
    generate_corpus(
        GenerateConfig(
            output=str(corpus),
            corpus=CorpusConfig(
                num_shards=4,
                samples_per_shard=100,
                eval_samples_per_class=2,
                planted_eval_copies=20,
                formats=["webdataset"],
            ),
        ),
        progress=False,
    )
    folder = tmp_path / "eval-folder"  # the same eval images as CLASS/KEY.jpg
    for key, image, (label,) in labeled_samples(str(corpus / "eval"), list(SHAPES)):
        storage.write_bytes_atomic(
            str(folder / SHAPES[label] / f"{key.rsplit(':', 1)[1]}.jpg"), image
        )
    run_embedding(
        EmbedConfig(
            input=str(corpus / "webdataset"),
            output=str(tmp_path / "emb"),
            model=model,
            batch_size=100,
            decode={"num_cpus": 0.5},
        ),
        progress=False,
    )
    build_index(
        IndexConfig(
            embeddings=str(tmp_path / "emb"),
            output=str(tmp_path / "index"),
            factory="IDMap,Flat",
            tune_queries=10,
            tasks={"num_cpus": 0.5},
        ),
        progress=False,
    )
    task = tmp_path / "task.yaml"
    task.write_text(
        yaml.safe_dump(
            {
                "name": "shapes",
                "classnames": list(SHAPES),
                "templates": ["a photo of a {}."],
                "k_per_prompt": 400,
                "near_duplicate_threshold": None,
            }
        )
    )
    config = RetrieveConfig(
        task=str(task),
        image_index=str(tmp_path / "index"),
        model=model,
        output=str(tmp_path / "retrieved"),
        decontaminate=DecontaminateConfig(
            eval_sets=[str(corpus / "eval"), str(folder)], batch_size=64, report_pairs=30
        ),
    )
    run_retrieval(config)
    kept = pq.read_table(tmp_path / "retrieved" / "retrieved.parquet").to_pandas()

    truth = pq.read_table(corpus / "ground_truth.parquet").to_pandas().set_index("key")
    removed = pq.read_table(tmp_path / "retrieved" / "decontamination.parquet").to_pandas()
    key_of = {
        m["id"]: m["key"]
        for m in ShardedIndex(str(tmp_path / "index")).lookup(removed["id"].to_numpy())
    }
    removed["key"] = removed["id"].map(key_of)
    planted = set(truth.index[truth["planted_from"].notna()])
    assert len(kept) + len(removed) == 400  # every pair was retrieved, then kept or removed
    assert planted <= set(removed["key"])  # all 20 planted copies removed: rate 1.0
    for row in removed[
        removed["key"].isin(planted)
    ].itertuples():  # each beside the eval image it copies
        assert (
            truth.loc[row.key, "planted_from"] in row.eval_key
            and row.reason == "image"
            and row.cosine >= 0.95
        )
    kept_rate = len(kept) / (400 - len(planted))
    print(
        "planted copies removed 20/20; other pairs kept "
        f"{len(kept)}/{400 - len(planted)} ({kept_rate:.3f})"
    )
    assert kept_rate >= 0.98  # measured 378/380: two generated look-alikes are as close as copies

    record = RetrievalRecord.read(str(tmp_path / "retrieved")).decontamination
    assert record.eval_images == 40 and record.threshold == 0.95 and record.removed == len(removed)
    assert sum(record.removed_per_class.values()) == len(removed)
    assert record.closest_kept_cosine < 0.95
    page = (tmp_path / "retrieved" / "decontamination.html").read_text()
    # each removed and closest kept pair, both images
    assert page.count("<img") == 2 * (min(len(removed), 30) + 30)
    evals = {
        key.rsplit(":", 1)[1]: image
        for key, image, _ in labeled_samples(str(corpus / "eval"), list(SHAPES))
    }
    # shown beside the very image it copies
    for source in truth.loc[sorted(planted), "planted_from"]:
        assert f"<img src='{data_uri(evals[source])}' width=128><br><small>" in page
    assert f"<b>{len(removed)} pairs removed</b>" in page
    assert "decontaminated (eval sets)" in capsys.readouterr().out
    statement = decontamination_statement(
        str(tmp_path / "retrieved"), str(corpus / "eval" / "eval-00000.tar")
    )
    assert "decontaminated against this eval set" in statement

    # A rerun reuses the eval embeddings; an eval embedding set of another model is refused.
    marker = next((tmp_path / "retrieved" / "eval-embeddings").glob("*/part-000000.done"))
    stamp = marker.stat().st_mtime_ns
    run_retrieval(config)
    assert marker.stat().st_mtime_ns == stamp
    other = tmp_path / "other-model"
    EmbeddingSetInfo(
        model="react-tiny", dim=128, input="elsewhere", input_format="webdataset"
    ).write(str(other))
    with pytest.raises(
        ValueError,
        match="embedded with model='react-tiny' but the corpus with "
        "model='react-thumbnail'; cosines across models mean nothing",
    ):
        run_retrieval(
            config.model_copy(update={"decontaminate": DecontaminateConfig(eval_sets=[str(other)])})
        )
