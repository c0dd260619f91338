"""Retrieval as a Ray Data job (``retrieve/on_ray.py``) against the single-process reference
(``retrieve/retrieval.py``): the same pairs, the same counts, on a real model and real indices."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from react_ray.config import IndexConfig, ModelConfig, RetrieveConfig
from react_ray.formats import ids
from react_ray.formats.embedding_set import (
    EmbeddingSetInfo,
    ShardStats,
    embedding_table,
    finish_shard,
    write_parquet,
)
from react_ray.formats.retrieved_set import RetrievalRecord
from react_ray.index.sharded import ShardedIndex
from react_ray.jobs.index import build_index
from react_ray.models import build_model
from react_ray.retrieve import on_ray
from react_ray.retrieve.retrieval import retrieve
from react_ray.retrieve.task import TaskSpec

pytestmark = pytest.mark.ray

MODEL = ModelConfig(name="react-micro")
CLASSES = ["cat", "dog", "fish", "bird"]
SMALL_POOLS = {
    "encoders": {"num_cpus": 0.25},
    "searchers": {"num_cpus": 0.25},
    "workers": {"num_cpus": 0.25, "max_actors": 2},
    "tasks": {"num_cpus": 0.25},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_local):
    """Image vectors around each class's prompt embedding by the real (random-weight) model, with
    exact and near copies planted across files; a 2-shard image index and a text index."""
    root = tmp_path_factory.mktemp("on-ray")
    clip = build_model(MODEL)
    prototypes = clip.encode_texts([f"a photo of a {c}." for c in CLASSES]).detach().numpy()
    dim, rng = prototypes.shape[1], np.random.default_rng(1)
    emb = str(root / "emb")
    EmbeddingSetInfo(model=MODEL.name, dim=dim, input="synthetic", input_format="synthetic").write(
        emb
    )
    first_file = None
    for shard in range(3):
        labels = rng.integers(len(CLASSES), size=400)
        img = prototypes[labels] + 0.6 * rng.normal(size=(400, dim)) / np.sqrt(dim)
        if first_file is None:
            first_file = img.copy()
        else:  # copies of the first file's images: exact and near, in other files
            img[:20] = first_file[:20] + 0.01 * rng.normal(size=(20, dim)) / np.sqrt(dim)
            labels[:20] = 0
        img = (img / np.linalg.norm(img, axis=1, keepdims=True)).astype(np.float32)
        row_ids = ids.encode(shard, np.arange(400))
        meta = [json.dumps({"punsafe": p}) for p in rng.uniform(size=400).round(3)]
        write_parquet(
            f"{emb}/part-{shard:06d}.parquet",
            embedding_table(
                row_ids,
                [f"k{i}" for i in row_ids],
                [f"http://x/{i}" for i in row_ids],
                [
                    f"a {CLASSES[label]} photo {'fishy' * (i % 7 == 0)}"
                    for i, label in enumerate(labels)
                ],
                img,
                img,
                meta,
            ),
        )
        finish_shard(
            emb,
            f"part-{shard:06d}",
            ShardStats(input="synthetic", shard=shard, rows_in=400, rows_embedded=400),
        )
    for keys, shards in (("image", 2), ("text", 1)):
        build_index(
            IndexConfig(
                embeddings=emb,
                output=str(root / keys),
                keys=keys,
                factory="IDMap,Flat",
                num_shards=shards,
                tune_queries=10,
                tasks={"num_cpus": 0.5},
            ),
            progress=False,
        )
    return root, clip


def _both(corpus, tmp_path, spec: TaskSpec, **config):
    """(reference pairs and steps, on-Ray pairs and steps)."""
    root, clip = corpus
    indices = {k: ShardedIndex(str(root / k)) for k in ("image", "text")}
    reference, log = retrieve(
        spec, indices, lambda texts: clip.encode_texts(texts).detach().numpy()
    )
    task = tmp_path / "task.json"
    task.write_text(spec.model_dump_json())
    retrieve_config = RetrieveConfig.model_validate(
        {
            "task": str(task),
            "image_index": str(root / "image"),
            "text_index": str(root / "text"),
            "model": MODEL.model_dump(),
            "output": str(tmp_path / "out"),
        }
        | SMALL_POOLS
        | config
    )
    result = on_ray.retrieve_on_ray(spec, retrieve_config, gallery_per_class=3)
    pairs = pd.read_parquet(tmp_path / "out" / "retrieved.parquet")
    assert not list((tmp_path / "out").glob("_work-*"))  # the work files are gone
    assert result.pairs == len(pairs)
    assert (result.gallery.groupby("label").size() <= 3).all()
    return (reference, log.steps), (pairs, result.log.steps)


SPECS = {
    "every step": dict(
        mode="both",
        templates=["a photo of a {}.", "a {}."],
        k_per_prompt=150,
        score_threshold=0.2,
        filters={"punsafe": {"max": 0.9}, "caption": {"not_contains": "fishy"}},
        near_duplicate_threshold=0.97,
        per_class_cap=120,
    ),
    "drop rule, balance": dict(
        templates=["a photo of a {}.", "itap of a {}."],
        k_per_prompt=200,
        cross_class="drop",
        balance=True,
        near_duplicate_threshold=0.95,
    ),
    "no near-duplicate step": dict(k_per_prompt=100, near_duplicate_threshold=None),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_on_ray_gives_the_single_process_pairs_and_counts(corpus, tmp_path, name):
    spec = TaskSpec(name="t", classnames=CLASSES, **SPECS[name])
    (reference, steps), (pairs, steps_on_ray) = _both(corpus, tmp_path, spec)
    assert len(reference) > 50
    assert steps_on_ray == steps
    pd.testing.assert_frame_equal(pairs, reference, check_dtype=False)


def test_blocklist_and_a_second_shard_group_change_nothing_but_the_blocked(corpus, tmp_path):
    spec = TaskSpec(name="t", classnames=CLASSES, templates=["a {}."], k_per_prompt=120)
    blocked = tmp_path / "block.txt"
    blocked.write_text("\n".join(str(int(ids.encode(s, r))) for s in range(3) for r in range(40)))
    spec = spec.model_copy(update={"blocklist": str(blocked)})
    (reference, steps), (pairs, steps_on_ray) = _both(corpus, tmp_path, spec, search_groups=2)
    assert steps_on_ray == steps and any(s.startswith("blocklist (120 ids)") for s, _, _ in steps)
    pd.testing.assert_frame_equal(pairs, reference, check_dtype=False)


def test_near_duplicates_by_ivf_lists_agree_with_the_exact_rule(corpus, tmp_path, monkeypatch):
    """Above the exact size the kept pairs are bucketed by IVF list: the planted copies still go,
    and the kept set is (nearly) the exact one."""
    spec = TaskSpec(
        name="t",
        classnames=CLASSES,
        templates=["a {}."],
        k_per_prompt=300,
        near_duplicate_threshold=0.97,
    )
    monkeypatch.setattr(on_ray, "NEAR_DUP_EXACT_UP_TO", 100)
    (reference, steps), (pairs, steps_on_ray) = _both(corpus, tmp_path, spec)
    exact, bucketed = set(reference["id"]), set(pairs["id"])
    assert len(exact) > 200 and len(exact ^ bucketed) <= 0.01 * len(exact), len(exact ^ bucketed)
    assert steps_on_ray[:-1] == steps[:-1]


def test_the_job_writes_a_complete_retrieved_set(corpus, tmp_path):
    from react_ray.jobs.retrieve import run_retrieval

    root, _ = corpus
    task = tmp_path / "task.yaml"
    task.write_text(f"name: t\nclassnames: {CLASSES}\nk_per_prompt: 50\n")
    run_retrieval(
        RetrieveConfig.model_validate(
            {
                "task": str(task),
                "image_index": str(root / "image"),
                "model": MODEL.model_dump(),
                "output": str(tmp_path / "out"),
            }
            | SMALL_POOLS
        )
    )
    record = RetrievalRecord.read(str(tmp_path / "out"))
    pairs = pd.read_parquet(tmp_path / "out" / "retrieved.parquet")
    assert record.pairs == len(pairs) == record.steps[-1].pairs > 0
    assert (tmp_path / "out" / "gallery.html").read_text().count("pairs</h2>") == len(CLASSES)
    with pytest.raises(ValueError, match="was built with model 'react-micro', not 'react-tiny'"):
        run_retrieval(
            RetrieveConfig(
                task=str(task),
                image_index=str(root / "image"),
                model=ModelConfig(name="react-tiny"),
                output=str(tmp_path / "other"),
            )
        )
