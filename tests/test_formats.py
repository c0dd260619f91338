"""The on-disk contracts between stages: one writer, one reader, a version, precise refusals;
and the shared config pieces (resources, half precision) checked at load time."""

from __future__ import annotations

import json

import pytest
from faults import faulty_shard

from react_ray.config import (
    ConfigError,
    DecontaminateConfig,
    IndexConfig,
    TrainConfig,
    build_config,
)
from react_ray.fields import ActorPool, Resources
from react_ray.formats import shard_writer, storage, training_shards
from react_ray.formats.embedding_set import EmbeddingSetInfo
from react_ray.formats.index_manifest import IndexManifest, IndexShard
from react_ray.formats.retrieved_set import RetrievalRecord, RetrievalStep
from react_ray.formats.shard_writer import PartWritten, ShardRead, ShardTally


def _info(**changes) -> EmbeddingSetInfo:
    return EmbeddingSetInfo(
        model="ViT-B-32", dim=512, input="s3://b/laion", input_format="webdataset"
    ).model_copy(update=changes)


def test_embedding_set_info_round_trips_and_refuses_what_it_does_not_know(tmp_path):
    info = _info(pretrained="laion2b_s34b_b79k", source_id=3)
    info.write(str(tmp_path))
    assert EmbeddingSetInfo.read(str(tmp_path)) == info and info.version == 1
    assert json.loads((tmp_path / "_embedding.json").read_text())["version"] == 1
    with pytest.raises(FileNotFoundError, match="not an embedding set"):
        EmbeddingSetInfo.read(str(tmp_path / "elsewhere"))
    for bad, named in (
        ({"version": 2}, "version"),  # a future layout is refused, not misread
        ({"colour": "red"}, "colour"),  # so is a key nobody writes
        ({"dim": "wide"}, "dim"),
    ):
        (tmp_path / "_embedding.json").write_text(
            json.dumps(json.loads(info.model_dump_json()) | bad)
        )
        with pytest.raises(ValueError, match=f"(?s)not a valid EmbeddingSetInfo.*{named}"):
            EmbeddingSetInfo.read(str(tmp_path))


def test_only_model_fields_decide_whether_vectors_compare():
    assert _info().model_mismatch(_info(input="s3://b/other", source_id=1)) is None
    assert _info().model_mismatch(_info(pretrained="openai")) == "pretrained"
    assert _info().model_mismatch(_info(dim=768)) == "dim"
    assert (
        _info().model_mismatch(_info(model="ViT-L-14", dim=768)) == "model"
    )  # the first that differs


def test_index_manifest_publishes_both_files_and_reads_either(tmp_path):
    shard = IndexShard(
        file="shard-00000.index",
        count=10,
        bytes=100,
        sha256="ab",
        embedding_files=["e/part-000000.parquet"],
    )
    manifest = IndexManifest(
        model="m",
        dim=4,
        keys="image",
        key_column="img_emb",
        factory="IDMap,Flat",
        plan="from config",
        ntotal=10,
        shards=[shard],
        ids={"layout": "x", "source_id": 0},
        embeddings="e",
        train_samples=10,
    )
    manifest.model_copy(update={"version": 2}).publish(str(tmp_path))
    assert IndexManifest.read(str(tmp_path)).version == 2
    assert IndexManifest.read(str(tmp_path / "manifest-v2.json")) == IndexManifest.read(
        str(tmp_path)
    )
    assert IndexManifest.read(str(tmp_path)).shards[0] == shard
    with pytest.raises(FileNotFoundError, match="no index manifest"):
        IndexManifest.read(str(tmp_path / "none"))
    (tmp_path / "manifest.json").write_text('{"format": "faiss-something/9"}')
    with pytest.raises(ValueError, match="not a valid IndexManifest"):
        IndexManifest.read(str(tmp_path))


def test_retrieval_record_reads_from_the_folder_or_the_file(tmp_path):
    record = RetrievalRecord(
        task={"name": "t"}, steps=[RetrievalStep(step="hits", pairs=5)], pairs=5
    )
    storage.write_text_atomic(str(tmp_path / "retrieval.json"), record.model_dump_json())
    assert (
        RetrievalRecord.read(str(tmp_path))
        == record
        == RetrievalRecord.read(str(tmp_path / "retrieval.json"))
    )
    assert record.decontamination is None
    with pytest.raises(FileNotFoundError, match="no retrieval record"):
        RetrievalRecord.read(str(tmp_path / "other"))


def test_a_shard_is_done_only_after_its_parts_merge_and_its_stats_and_marker(tmp_path):
    out = str(tmp_path)
    stats = training_shards.ShardStats(
        shard=3, rows=4, success=3, failed={"http_error": 1}, fetched_this_run=4, bytes=9, seconds=0
    )
    parts = [shard_writer.part_uri(out, "00003", "run", first, ".bin") for first in (2, 0)]
    for part in parts:
        storage.write_bytes_atomic(part, part.encode())
    merged = []

    def merge(uris: list[str]) -> None:
        assert not training_shards.is_done(out, 3)  # not before its data is whole
        merged.extend(uris)

    assert not training_shards.is_done(out, 3)
    training_shards.commit(out, stats, parts, merge)
    assert merged == sorted(parts)  # in row order
    assert (
        training_shards.is_done(out, 3)
        and shard_writer.read_stats(out, "00003", training_shards.ShardStats) == stats
        and not storage.exists(shard_writer.parts_dir(out, "00003"))
    )
    assert json.loads((tmp_path / "00003.done").read_text())["success"] == 3

    def killed(uris: list[str]) -> None:
        raise RuntimeError("killed mid-merge")

    with pytest.raises(RuntimeError):  # a shard redone loses its marker before its files change
        training_shards.commit(out, stats, parts, killed)
    assert not training_shards.is_done(out, 3)


def test_the_tally_names_each_shard_once_when_every_row_it_held_is_accounted_for():
    tally = ShardTally()
    part = PartWritten(shard=1, rows=3, written=2, part="p1", skipped=[{"reason": "bad_image"}])
    assert tally.add(part) is None and not tally.knows_size(1)  # its size is not known yet
    assert tally.add(ShardRead(1, 5)) is None  # 3 of 5 rows
    last = PartWritten(shard=1, rows=2, written=2, part="p0", nodes={"embed": ["n"]})
    assert tally.add(last) == 1
    assert tally.add(PartWritten(shard=1, rows=0, written=0)) is None  # named once
    assert tally.add(ShardRead(2, 0, "corrupt")) == 2  # a shard without rows: its read says so
    assert tally.add(PartWritten(shard=3, rows=4, written=4)) is None
    assert tally.add(ShardRead(3, 5)) is None and tally.incomplete([1, 2, 3]) == [3]
    total = tally.total(1)
    assert (total.rows, total.written, total.skipped_by_reason(), total.nodes) == (
        5,
        4,
        {"bad_image": 1},
        {"embed": ["n"]},
    )
    assert tally.part_uris(1) == ["p0", "p1"] and tally.skipped == 1
    assert PartWritten.decode(part.encode()) == part


def test_a_shards_size_is_reported_before_its_last_block_leaves_the_reader(tmp_path):
    """The tally downstream must know a shard's size by the time its last rows arrive."""
    from react_ray.formats.readers import read_blocks

    (tmp_path / "00005.tar").write_bytes(faulty_shard())
    events = []
    batch = {"uri": [str(tmp_path / "00005.tar")], "number": [5], "format": ["webdataset"]}
    for block in read_blocks(batch, 0, 4, on_read=lambda read: events.append(read)):
        events.append(len(block["id"]))
    *blocks, read, last = events
    assert read == ShardRead(5, sum(blocks) + last, None) and len(blocks) >= 2


def test_training_shards_summary_adds_every_shard_up(tmp_path):
    out = str(tmp_path)
    for k, (success, failed) in enumerate(
        [(3, {"http_error": 1}), (2, {"http_error": 1, "corrupt_image": 2})]
    ):
        training_shards.commit(
            out,
            training_shards.ShardStats(k, 5, success, failed, 5 * (k == 1), 10, 0.1),
            [],
            lambda parts: None,
        )
    summary = training_shards.summarize(out, shards=2, pairs=10, this_run={1}, seconds=1.0)
    assert (summary.success, summary.failed) == (5, {"http_error": 2, "corrupt_image": 2})
    assert (summary.this_run_shards, summary.this_run_fetched, summary.bytes) == (1, 5, 20)
    assert json.loads((tmp_path / "_summary.json").read_text())["success"] == 5
    assert "5 of 10 pairs in 2 shards" in str(summary)


def test_resources_go_to_ray_as_given():
    assert Resources().ray_options() == {"num_cpus": 1, "num_gpus": 0}
    decode = Resources(num_cpus=0.5, custom={"cpu_node": 1})
    assert decode.ray_options() == {"num_cpus": 0.5, "num_gpus": 0, "resources": {"cpu_node": 1}}
    assert Resources(num_cpus=8, num_gpus=1, custom={"a100": 1}).train_resources() == {
        "CPU": 8,
        "GPU": 1,
        "a100": 1,
    }
    pool = ActorPool(num_gpus=1, min_actors=2, max_actors=8)
    assert pool.ray_options() == {
        "num_cpus": 1,
        "num_gpus": 1,
    }  # min/max size the pool, not each actor
    with pytest.raises(ValueError, match=r"max_actors \(1\) must be >= min_actors \(2\)"):
        ActorPool(min_actors=2, max_actors=1)


@pytest.mark.parametrize(
    ("config_type", "data", "field"),
    [
        (DecontaminateConfig, {"eval_sets": ["e"], "precision": "bf16"}, "pool.num_gpus"),
        (TrainConfig, {"data": "d", "output": "o", "precision": "fp16"}, "worker.num_gpus"),
    ],
    ids=["decontaminate", "train"],
)
def test_half_precision_on_cpus_is_refused_at_load_time(config_type, data, field):
    with pytest.raises(ConfigError, match=f"precision: got '(bf16|fp16)' with {field}=0"):
        build_config(config_type, data)
    build_config(config_type, data | {field.split(".")[0]: {"num_gpus": 1}})  # on GPUs it loads


def test_the_old_resource_spellings_are_refused_with_the_field_named():
    with pytest.raises(ConfigError, match="task_num_cpus"):
        build_config(IndexConfig, {"embeddings": "e", "output": "o", "task_num_cpus": 2})
