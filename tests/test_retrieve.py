"""Retrieval for a task: task specs, the dedup rules, determinism, outputs (real indices, real Ray
build)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from react_ray.config import ConfigError, IndexConfig, build_config
from react_ray.formats import ids
from react_ray.formats.embedding_set import (
    EmbeddingSetInfo,
    ShardStats,
    embedding_table,
    finish_shard,
    write_parquet,
)
from react_ray.index.sharded import ShardedIndex
from react_ray.jobs.index import build_index
from react_ray.retrieve.retrieval import (
    cap_per_class,
    merge_within_class,
    remove_near_duplicates,
    resolve_across_classes,
    retrieve,
    summary_table,
    write_outputs,
)
from react_ray.retrieve.task import TaskSpec, shipped


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "t", "classnames": []}, "classnames: empty class list"),
        ({"name": "t", "classnames": ["a", "a"]}, r"duplicate class names \['a'\]"),
        (
            {"name": "t", "classnames": ["a"], "templates": ["a photo of a dog"]},
            r"exactly one '\{\}'",
        ),
        (
            {"name": "t", "classnames": ["a"], "templates": "imagenet81"},
            "unknown template set 'imagenet81'",
        ),
        (
            {"name": "t", "classnames": ["a"], "mode": "image-to-text"},
            "mode: got 'image-to-text'; Input should be 'text-to-image', 'text-to-text' or 'both'",
        ),
        ({"name": "t"}, "give exactly one of classnames"),
        (
            {"name": "t", "classnames_from": "imagenet2k"},
            "classnames_from: unknown set 'imagenet2k'",
        ),
    ],
)
def test_bad_task_specs_fail_precisely(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_config(TaskSpec, spec)


def test_shipped_prompt_sets():
    assert (
        len(shipped("templates")["imagenet80"]) == 80
        and len(shipped("classnames")["imagenet1k"]) == 1000
    )
    spec = TaskSpec(name="in1k", classnames_from="imagenet1k", templates="imagenet80")
    prompts = spec.prompts()
    assert len(prompts) == 80_000 and prompts[0] == (0, "a bad photo of a tench.")
    assert all("{}" in t for ts in shipped("templates").values() for t in ts)


ELEVATER_SIZES = {
    "cifar10": 10,
    "cifar100": 100,
    "food101": 101,
    "dtd": 47,
    "fgvc_aircraft": 100,
    "cars": 196,
    "resisc45": 45,
    "sun397": 397,
    "hateful_memes": 2,
    "eurosat": 10,
    "pets": 37,
    "flowers": 102,
    "caltech101": 102,
    "country211": 211,
    "gtsrb": 43,
    "mnist": 10,
    "fer2013": 7,
    "voc2007": 20,
    "pcam": 2,
    "renderedsst2": 2,
    "kitti_closest_vehicle_distance": 4,
}


@pytest.mark.parametrize("dataset", sorted(ELEVATER_SIZES))
def test_elevater_sets_ship_names_and_templates(dataset):
    """Every ELEVATER dataset is one `classnames_from:` away, with its own templates."""
    spec = TaskSpec(
        name=dataset,
        classnames_from=dataset,
        templates=dataset if dataset in shipped("templates") else "simple",
    )
    names = spec.classes
    assert len(names) == ELEVATER_SIZES[dataset] and len(set(names)) == len(names)
    assert all(name.strip() == name and name for name in names)
    assert len(spec.prompts()) == len(names) * len(spec.template_list)


def test_demo_task_names_the_generator_shapes():
    from pathlib import Path

    from react_ray.retrieve.task import load_task
    from react_ray.synthetic.corpus import SHAPES

    task = load_task(
        str(Path(__file__).resolve().parents[1] / "react_ray" / "resources" / "shapes.yaml")
    )
    assert task.classes == list(SHAPES)


def _hits(rows):
    return pd.DataFrame(rows, columns=["label", "query", "id", "score", "source"])


def test_within_class_keeps_best_query_and_lists_all():
    pairs = merge_within_class(
        _hits(
            [
                (0, "q1", 7, 0.5, "image"),
                (0, "q2", 7, 0.8, "image"),
                (0, "q3", 7, 0.6, "text"),
                (1, "q1", 7, 0.4, "image"),
            ]
        )
    )
    row = pairs[pairs["label"] == 0].iloc[0]
    assert (row["score"], row["best_query"], row["queries"], row["source"]) == (
        pytest.approx(0.8),
        "q2",
        ["q1", "q2", "q3"],
        "image+text",
    )
    assert len(pairs) == 2  # one row per (class, pair)


def test_across_classes_best_or_drop():
    pairs = pd.DataFrame({"label": [0, 1, 1], "id": [7, 7, 8], "score": [0.5, 0.9, 0.3]})
    assert resolve_across_classes(pairs, "best")[["label", "id"]].values.tolist() == [
        [1, 7],
        [1, 8],
    ]
    assert resolve_across_classes(pairs, "drop")[["label", "id"]].values.tolist() == [[1, 8]]


def test_near_duplicates_keep_the_best_scoring_copy():
    base = np.eye(4, dtype=np.float32)
    near = base[0] * 0.999 + base[1] * 0.045
    vectors = np.stack([base[0], near / np.linalg.norm(near), base[2], base[3]])
    pairs = pd.DataFrame({"label": [0, 0, 1, 1], "id": [1, 2, 3, 4], "score": [0.4, 0.7, 0.5, 0.5]})
    kept = remove_near_duplicates(pairs, vectors, threshold=0.95)
    assert kept["id"].tolist() == [2, 3, 4]  # id 1 is a near-copy of the better-scoring id 2


def test_near_duplicates_above_the_exact_size_are_found_by_ivf_with_measured_recall():
    """Clustered vectors (CLIP-like: many near neighbours that are not copies) with planted
    near-copies: the IVF path finds >= 95% of the close pairs the exact search finds and keeps
    nearly the same pairs."""
    from react_ray.retrieve.retrieval import close_pairs
    from react_ray.synthetic.embeddings import clustered_vectors

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(200, 64)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    base = clustered_vectors(rng, 20_000, centres, spread=0.35 / 8)
    copies = base[:2_000] + rng.normal(0, 0.02, (2_000, 64)).astype(np.float32)
    vectors = np.concatenate([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    pairs = pd.DataFrame({"id": np.arange(len(vectors)), "score": rng.random(len(vectors))})

    def pair_set(limits, neighbours):
        return {
            (i, int(j))
            for i in range(len(limits) - 1)
            for j in neighbours[limits[i] : limits[i + 1]]
            if i < j
        }

    exact = pair_set(*close_pairs(vectors, 0.95, exact_up_to=len(vectors)))
    found = pair_set(*close_pairs(vectors, 0.95, exact_up_to=0))
    recall = len(found & exact) / len(exact)
    assert len(exact) >= 2_000 and found <= exact and recall >= 0.95, (len(exact), recall)
    kept_exact = remove_near_duplicates(pairs, vectors, 0.95, exact_up_to=len(vectors))
    kept_ivf = remove_near_duplicates(pairs, vectors, 0.95, exact_up_to=0)
    agree = len(set(kept_exact["id"]) & set(kept_ivf["id"])) / len(kept_exact)
    print(f"\nnear-duplicates, IVF vs exact: pair recall {recall:.4f}, kept sets agree {agree:.4f}")
    assert agree >= 0.99


def test_filters_column_wise_keep_exactly_what_a_per_row_check_keeps():
    """Each bound, a missing value, a None, a value of the wrong type: the same verdict per pair
    as the rule written out per row."""
    from react_ray.retrieve.retrieval import apply_filters
    from react_ray.retrieve.task import ColumnFilter

    rng = np.random.default_rng(2)
    choices = [None, 0.05, 0.2, 0.5, 0.9, "0.2", "high", "NSFW", "UNLIKELY", True]
    metadata = [
        None if i % 17 == 0 else {k: choices[rng.integers(len(choices))] for k in ("p", "tag")}
        for i in range(400)
    ]
    filters = {
        "p": ColumnFilter(min=0.1, max=0.6),
        "tag": ColumnFilter(not_contains="nsfw"),
    }
    spec = TaskSpec(name="t", classnames=["a"], filters=filters)
    pairs = pd.DataFrame({"id": range(400)})

    def passes(record: dict | None) -> bool:
        p, tag = (record or {}).get("p"), (record or {}).get("tag")
        number = (
            p
            if isinstance(p, float)
            else float(p)
            if isinstance(p, str) and p[0].isdigit()
            else None
        )
        return (
            number is not None
            and 0.1 <= number <= 0.6
            and tag is not None
            and "nsfw" not in str(tag).lower()
        )

    expected = [i for i, m in enumerate(metadata) if passes(m)]
    assert apply_filters(pairs, metadata, spec)["id"].tolist() == expected and 20 < len(expected)
    equals = TaskSpec(name="t", classnames=["a"], filters={"tag": ColumnFilter(equals="high")})
    assert apply_filters(pairs, metadata, equals)["id"].tolist() == [
        i for i, m in enumerate(metadata) if m and m["tag"] == "high"
    ]


def test_cap_and_balance():
    pairs = pd.DataFrame({"label": [0, 0, 0, 1], "id": [1, 2, 3, 4], "score": [0.1, 0.3, 0.2, 0.9]})
    assert cap_per_class(pairs, 2, False)["id"].tolist() == [2, 3, 4]
    assert cap_per_class(pairs, None, True)["id"].tolist() == [2, 4]


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """An embedding set whose images sit around 3 class prototypes (+ exact duplicates), indexed
    twice."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    dim, classes = 32, ["cat", "dog", "fish"]
    prototypes = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:3].astype(np.float32)
    emb = str(root / "emb")
    EmbeddingSetInfo(model="synthetic", dim=dim, input="synthetic", input_format="synthetic").write(
        emb
    )
    truth = {}
    for shard in range(2):
        labels = rng.integers(3, size=300)
        img = prototypes[labels] + 0.5 * rng.normal(size=(300, dim)).astype(np.float32) / np.sqrt(
            dim
        )
        img[10] = img[11]  # an exact duplicate image
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        row_ids = ids.encode(shard, np.arange(300))
        truth.update(zip(row_ids.tolist(), labels.tolist()))
        name = f"part-{shard:06d}"
        punsafe = rng.uniform(size=300).round(3)
        meta = [json.dumps({"punsafe": p, "NSFW": "UNLIKELY"}) for p in punsafe]
        meta[5] = None  # a pair whose source had no scores: a filter on them must drop it
        write_parquet(
            f"{emb}/{name}.parquet",
            embedding_table(
                row_ids,
                [str(i) for i in row_ids],
                [f"http://x/{i}" for i in row_ids],
                [f"a {classes[label]} photo" for label in labels],
                img,
                img,
                meta,
            ),
        )
        finish_shard(
            emb, name, ShardStats(input="synthetic", shard=shard, rows_in=300, rows_embedded=300)
        )
    for keys in ("image", "text"):
        build_index(
            IndexConfig(
                embeddings=emb,
                output=str(root / keys),
                keys=keys,
                factory="IDMap,Flat",
                train_samples=600,
                tune_queries=20,
            ),
            progress=False,
        )
    indices = {k: ShardedIndex(str(root / k)) for k in ("image", "text")}

    def encode(texts):
        return np.stack([prototypes[[c in t for c in classes].index(True)] for t in texts])

    return classes, indices, encode, truth, root


@pytest.mark.ray
def test_retrieval_is_precise_deduplicated_and_deterministic(world, tmp_path):
    classes, indices, encode, truth, _ = world
    spec = TaskSpec(
        name="pets",
        classnames=classes,
        templates=["a photo of a {}.", "a {}."],
        k_per_prompt=60,
        mode="both",
        near_duplicate_threshold=0.999,
    )
    pairs, log = retrieve(spec, indices, encode)
    assert pairs["id"].is_unique  # across-class dedup
    precision = np.mean([truth[i] == label for i, label in zip(pairs["id"], pairs["label"])])
    assert precision > 0.95
    steps = {name: n for name, n, _ in log.steps}
    assert steps["hits (all prompts, all indices)"] == 3 * 2 * 60 * 2
    assert steps["deduplicated within class"] < steps["hits (all prompts, all indices)"]
    dup_a, dup_b = int(ids.encode(0, 10)), int(ids.encode(0, 11))
    assert not {dup_a, dup_b} <= set(pairs["id"])  # the duplicate image is kept at most once
    assert set(pairs.columns) >= {
        "id",
        "key",
        "url",
        "caption",
        "class",
        "best_query",
        "score",
        "queries",
    }
    assert all(
        c == f"a {classes[label]} photo" for c, label in zip(pairs["caption"], pairs["label"])
    )
    again, _ = retrieve(spec, indices, encode)
    pd.testing.assert_frame_equal(pairs, again)
    write_outputs(str(tmp_path), spec, pairs, log)
    assert summary_table(log).shape == (3, len(log.steps))
    assert (tmp_path / "retrieved.parquet").exists() and (
        tmp_path / "summary.csv"
    ).read_text().startswith("class,")


@pytest.mark.ray
def test_threshold_blocklist_filters_and_caps(world, tmp_path):
    classes, indices, encode, _, _ = world
    first, _ = retrieve(
        TaskSpec(name="t", classnames=classes, templates=["{}"], k_per_prompt=30), indices, encode
    )
    blocked = first["id"].tolist()[:5]
    (tmp_path / "block.txt").write_text("\n".join(map(str, blocked)))
    spec = TaskSpec(
        name="t",
        classnames=classes,
        templates=["{}"],
        k_per_prompt=30,
        score_threshold=0.5,
        blocklist=str(tmp_path / "block.txt"),
        per_class_cap=10,
        filters={"caption": {"not_contains": "fish"}},
    )
    pairs, log = retrieve(spec, indices, encode)
    assert not set(blocked) & set(pairs["id"]) and (pairs["score"] >= 0.5).all()
    assert (
        not pairs["caption"].str.contains("fish").any()
        and pairs.groupby("label").size().max() <= 10
    )
    with pytest.raises(
        ValueError, match=r"filters: unknown metadata column 'pnsfw'; this index has \['NSFW', "
    ):
        retrieve(spec.model_copy(update={"filters": {"pnsfw": {"max": 0.1}}}), indices, encode)
    with pytest.raises(ValueError, match="mode 'text-to-text' needs a text index"):
        retrieve(
            spec.model_copy(update={"mode": "text-to-text"}), {"image": indices["image"]}, encode
        )
    assert yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json")))["per_class_cap"] == 10


@pytest.mark.ray
def test_filters_on_the_sources_laion_columns(world):
    """punsafe travels from the embedding files through the index metadata into filters and the
    output."""
    classes, indices, encode, _, _ = world
    spec = TaskSpec(
        name="t",
        classnames=classes,
        templates=["{}"],
        k_per_prompt=80,
        near_duplicate_threshold=None,
    )
    everything, _ = retrieve(spec, indices, encode)
    scores = {
        m["id"]: m.get("punsafe") for m in indices["image"].lookup(everything["id"].to_numpy())
    }
    safe, log = retrieve(
        TaskSpec.model_validate(spec.model_dump() | {"filters": {"punsafe": {"max": 0.3}}}),
        indices,
        encode,
    )
    expected = {i for i, p in scores.items() if p is not None and p <= 0.3}
    assert set(safe["id"]) == expected and 0 < len(expected) < len(everything)
    assert all(json.loads(m)["punsafe"] <= 0.3 for m in safe["meta"])
    assert [step for step, _, _ in log.steps].count("metadata filters") == 1
