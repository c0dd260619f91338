"""Wiring the embedding stage on Ray Data: read shards -> decode + tokenize on CPU -> embed on an
actor pool.

```
shards (one task each) --read--> records --decode, tokenize (CPU tasks; or in the actors:
    decode_in_actor)--> uint8 pixels + tokens
    --ClipEmbedder (ActorPoolStrategy(min, max), num_gpus from config)--> parts + PartWritten
readers --ShardRead (rows per shard)--> ReadLedger actor
driver: ShardTally of both -> commit each complete shard (Ray task: merge parts, stats, marker)
```
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass

import ray
from tqdm.auto import tqdm

from react_ray.config import EmbedConfig, ModelConfig
from react_ray.embed.embedder import ClipEmbedder, decode_and_tokenize
from react_ray.formats import embedding_set, shard_writer, storage
from react_ray.formats.embedding_set import EmbeddingSetInfo
from react_ray.formats.readers import (
    SUFFIX,
    InputShard,
    list_input_shards,
    read_blocks,
    shard_items,
)
from react_ray.formats.shard_writer import PartWritten, ReadLedger, ShardRead, ShardTally
from react_ray.models.factory import embed_dim, image_preprocess

log = logging.getLogger(__name__)


def embedding_info(config: EmbedConfig) -> EmbeddingSetInfo:
    """What every vector of this embedding set is made with (the later stages check it)."""
    return EmbeddingSetInfo(
        model=config.model.name,
        pretrained=config.model.pretrained,
        checkpoint=config.model.checkpoint,
        dim=embed_dim(config.model.name),
        precision=config.precision,
        source_id=config.source_id,
        input=config.input,
        input_format=config.input_format,
    )


def check_embedding_info(config: EmbedConfig) -> EmbeddingSetInfo:
    """Write ``_embedding.json`` on the first run; refuse to add vectors of another model, or of
    another input, later."""
    info = embedding_info(config)
    if not EmbeddingSetInfo.exists(config.output):
        info.write(config.output)
        return info
    existing = EmbeddingSetInfo.read(config.output)
    if existing.input != info.input:
        # Shard numbers come from file names: another crawl's 00000.tar would pass as "already
        # done".
        raise ValueError(
            f"{config.output} holds the embeddings of {existing.input}; this run reads "
            f"{info.input}. Embed each input into its own output (with its own source_id, "
            "so that ids never collide when indices combine them)."
        )
    for field in ("model", "pretrained", "checkpoint", "dim", "source_id", "input_format"):
        if getattr(existing, field) != getattr(info, field):
            raise ValueError(
                f"{config.output} holds embeddings with {field}={getattr(existing, field)!r}; this "
                f"run has {field}={getattr(info, field)!r}. Use another output or the same {field}."
            )
    return info


def input_sizes(config: EmbedConfig) -> dict[str, int]:
    """{input shard URI: bytes}: what a resumed run compares (image folders have no shard files)."""
    if config.input_format == "image-folder":
        return {}
    folder = (
        storage.join(config.input, "img_emb")
        if config.input_format == "laion-embeddings"
        else config.input
    )
    return storage.file_sizes(folder, SUFFIX[config.input_format])


def check_inputs_unchanged(
    config: EmbedConfig, shards: list[InputShard], sizes: dict[str, int]
) -> dict:
    """The input sizes recorded by earlier runs (``_inputs.json``); refuse when a shard embedded
    before has another size now: a marker says "done" for content that is gone."""
    uri = storage.join(config.output, "_inputs.json")
    recorded = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}
    changed = [
        f"{s.name} ({s.uri}: {recorded[s.name]['bytes']:,} bytes then, {sizes[s.uri]:,} now)"
        for s in shards
        if s.name in recorded and s.uri in sizes and recorded[s.name]["bytes"] != sizes[s.uri]
    ]
    if changed:
        raise ValueError(
            f"embed: {len(changed)} input shard(s) changed since they were "
            f"embedded: {'; '.join(changed[:5])}. Their embeddings describe "
            "the old files: embed the new data into another output, or "
            f"delete those shards' files from {config.output} to redo them."
        )
    return recorded


def record_inputs(
    config: EmbedConfig, recorded: dict, shards: list[InputShard], sizes: dict[str, int]
) -> None:
    recorded |= {s.name: {"uri": s.uri, "bytes": sizes[s.uri]} for s in shards if s.uri in sizes}
    storage.write_text_atomic(
        storage.join(config.output, "_inputs.json"), json.dumps(recorded, indent=1)
    )


@ray.remote(num_cpus=0.25)
def _commit(
    output: str, name: str, parts: list[str], stats: embedding_set.ShardStats
) -> embedding_set.ShardStats:
    return embedding_set.commit_shard(output, name, parts, stats)


def decode_settings(model: ModelConfig) -> dict:
    """How CPU tasks resize images for ``model``: as its weights' eval transform does."""
    preprocess = image_preprocess(model)
    if preprocess.resize_mode not in ("shortest", "squash"):
        raise ValueError(
            f"model: {model.name} resizes with {preprocess.resize_mode!r}, which the embedding "
            "decoder does not reproduce (shortest, squash)"
        )
    return {
        "image_size": preprocess.size if isinstance(preprocess.size, int) else preprocess.size[0],
        "resize_mode": preprocess.resize_mode,
        "interpolation": preprocess.interpolation,
    }


def build_dataset(
    config: EmbedConfig, shards: list[InputShard], run_id: str, ledger: ray.actor.ActorHandle
) -> ray.data.Dataset:
    items = shard_items(shards)
    device = config.pool.device or ("cuda" if config.pool.num_gpus > 0 else "cpu")
    # Reading and decoding spread over all (CPU) nodes as tasks; the model actors pack by default.
    # The differing strategies also keep Ray Data from fusing decode into the model actors.
    cpu_task = config.decode.ray_options() | {"scheduling_strategy": "SPREAD"}
    read = {
        "source": config.source_id,
        "block_rows": config.read_block_rows,
        "caption_required": config.caption_required,
        "on_read": _recorder(ledger),
    }
    prepare = {
        "max_pixels": config.max_image_pixels,
        "model_name": config.model.name,
    } | decode_settings(config.model)
    if not config.decode_in_actor:
        read |= {"then": decode_and_tokenize, **prepare}
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(read_blocks, batch_size=1, fn_kwargs=read, **cpu_task)
        .map_batches(
            ClipEmbedder,
            fn_constructor_kwargs={
                "model": config.model.model_dump(),
                "precision": config.precision,
                "device": device,
                "output": config.output,
                "run_id": run_id,
                # On CPU an actor uses its share of cores (a simulated GPU node's too)
                "threads": None if device == "cuda" else math.ceil(config.pool.num_cpus),
                "prepare": prepare if config.decode_in_actor else None,
            },
            compute=ray.data.ActorPoolStrategy(
                min_size=config.pool.min_actors, max_size=config.pool.max_actors
            ),
            batch_size=config.batch_size,
            scheduling_strategy="DEFAULT",
            **config.pool.ray_options(),
        )
    )


def _recorder(ledger: ray.actor.ActorHandle):
    """``read_blocks``' callback: each shard's size to the ledger, before its last block leaves."""

    def record(read: ShardRead) -> None:
        try:
            ray.get(ledger.record.remote(read))
        except ray.exceptions.RayActorError as lost:
            raise LedgerLost(f"shard {read.shard}'s size could not be recorded: {lost}") from None

    return record


@dataclass
class EmbeddingPlan:
    """What a run will do: the set's description, its input shards, those not committed yet."""

    info: EmbeddingSetInfo
    shards: list[InputShard]
    pending: list[InputShard]
    sizes: dict[str, int]  # input shard URI -> bytes
    recorded: dict  # what earlier runs recorded of their inputs


def plan_embedding(config: EmbedConfig) -> EmbeddingPlan:
    """The input shards without a completion marker; refuses an output that holds another model's
    or another input's vectors, or whose inputs changed since they were embedded."""
    shards = list_input_shards(config.input, config.input_format)
    info = check_embedding_info(config)
    sizes = input_sizes(config)
    recorded = check_inputs_unchanged(config, shards, sizes)
    pending = [s for s in shards if not embedding_set.is_done(config.output, s.name)]
    return EmbeddingPlan(info, shards, pending[: config.max_shards], sizes, recorded)


def embed_pending(config: EmbedConfig, plan: EmbeddingPlan, progress: bool) -> RunTiming:
    """Embed (or ingest) the plan's pending shards on the connected Ray cluster, committing each
    shard as it completes."""
    timing = RunTiming(time.perf_counter())
    if plan.pending and config.input_format == "laion-embeddings":
        from react_ray.embed.ingest import ingest_laion_embeddings

        timing.rows = ingest_laion_embeddings(config, plan.pending, plan.info.dim, progress)
    elif plan.pending:
        _embed_resuming(config, plan.pending, timing, progress)
    record_inputs(config, plan.recorded, plan.pending, plan.sizes)  # all committed by now
    return timing


class LedgerLost(RuntimeError):
    """A reader found the run's ``ReadLedger`` gone. Raised in its place: Ray cannot bring the
    actor's own error back to the driver through Ray Data (``UnserializableException``)."""


# A node lost (a reclaimed spot instance) usually costs a retried task; now and then Ray Data gives
# up on the dataset instead (ActorUnavailableError). The committed shards stand: resume the rest.
NODE_LOSS = (
    LedgerLost,
    ray.exceptions.RayActorError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
)
RESUMES_AFTER_NODE_LOSS = 3


def _embed_resuming(
    config: EmbedConfig, pending: list[InputShard], timing: RunTiming, progress: bool
) -> None:
    for resumes_left in range(RESUMES_AFTER_NODE_LOSS, -1, -1):
        try:
            _embed_shards(config, pending, timing, progress)
            return
        except NODE_LOSS as lost:
            pending = [s for s in pending if not embedding_set.is_done(config.output, s.name)]
            if not resumes_left:
                raise
            # Its text only: the error's frames hold the failed run's actors (and their GPUs)
            # for as long as a log handler keeps the record.
            log.warning("embed: %s; resuming the %d shards not committed", str(lost), len(pending))
            if not pending:  # lost after the last commit
                return


class RunTiming:
    """Rows seen and when the first batch came back (start-up: Ray workers, model load)."""

    def __init__(self, start: float):
        self.start, self.rows, self.first_at, self.first_rows = start, 0, None, 0

    def add(self, rows: int) -> None:
        self.rows += rows
        if self.first_at is None:
            self.first_at, self.first_rows = time.perf_counter(), self.rows


def _embed_shards(
    config: EmbedConfig, pending: list[InputShard], timing: RunTiming, progress: bool
) -> None:
    run_id = uuid.uuid4().hex[:8]
    by_number = {s.number: s for s in pending}
    ledger = start_ledger()
    tally, commits = ShardTally(), []
    bar = tqdm(total=len(pending), desc="embed shards", unit="shard", disable=not progress)

    def commit(shard: int | None) -> None:
        if shard is None:
            return
        stats = embedding_set.ShardStats.of(
            by_number[shard].uri, tally.total(shard), tally.reads[shard].error
        )
        commits.append(
            _commit.remote(config.output, by_number[shard].name, tally.part_uris(shard), stats)
        )
        bar.update(1)

    def drain_ledger() -> None:
        for read in ray.get(ledger.drain.remote()):
            commit(tally.add(read))

    try:
        for batch in build_dataset(config, pending, run_id, ledger).iter_batches(
            batch_size=None, batch_format="numpy"
        ):
            for encoded in batch["part"]:
                part = PartWritten.decode(encoded)
                timing.add(part.rows)
                if not tally.knows_size(part.shard):
                    drain_ledger()
                commit(tally.add(part))
            bar.set_postfix(rows=timing.rows, skipped=tally.skipped)
        drain_ledger()  # shards without a single record
    finally:  # commits under way finish (or fail) before anything redoes their shards
        if commits:
            ray.wait(commits, num_returns=len(commits))
        bar.close()
    ray.get(commits)
    if incomplete := tally.incomplete(list(by_number)):
        raise RuntimeError(
            f"embed: {len(incomplete)} shards did not complete (rerun resumes them): "
            f"{[by_number[s].uri for s in incomplete[:5]]}"
        )
    shard_writer.remove_leftover_parts(config.output)


# The ledger's only reservation. An actor that reserves nothing is leased from a node the GCS picks
# at random, which may be a node being lost and not yet known dead: the actor then dies unborn
# (seen in CI, resuming after a lost GPU node). One that reserves anything is leased from its
# owner's node. Memory, not CPUs: a head is often started with --num-cpus 0.
LEDGER_MEMORY_BYTES = 2**20


def start_ledger() -> ray.actor.ActorHandle:
    """The run's ``ReadLedger``, beside the driver: readers leave each shard's size there before
    its last rows go downstream."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    driver_node = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(ReadLedger)
        .options(
            num_cpus=0,
            memory=LEDGER_MEMORY_BYTES,
            scheduling_strategy=NodeAffinitySchedulingStrategy(driver_node, soft=True),
        )
        .remote()
    )
