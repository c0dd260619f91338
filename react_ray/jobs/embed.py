"""``react-ray embed``: embed every input shard not committed yet; one run per output at a time."""

from __future__ import annotations

import time

from react_ray.config import EmbedConfig
from react_ray.embed.pipeline import embed_pending, plan_embedding
from react_ray.formats import embedding_set
from react_ray.leases import holds_lease
from react_ray.ray_utils import connect


@holds_lease("embed")
def run_embedding(config: EmbedConfig, progress: bool = True) -> embedding_set.RunSummary:
    """Embed the pending shards, then add up every committed shard's stats into the set's
    ``_summary.json``; return that summary."""
    start = time.perf_counter()
    plan = plan_embedding(config)
    print(
        f"embed: {len(plan.shards)} input shards, {len(plan.shards) - len(plan.pending)} "
        f"already done, {len(plan.pending)} to do "
        f"({plan.info.model}, dim {plan.info.dim}, {config.precision})"
    )
    if plan.pending:
        connect(config.ray_address)
    timing = embed_pending(config, plan, progress)
    summary = embedding_set.summarize(config.output)
    summary.this_run_shards, summary.this_run_rows = len(plan.pending), timing.rows
    summary.this_run_seconds = time.perf_counter() - start
    if timing.first_at is not None:
        summary.this_run_startup_seconds = timing.first_at - start
        steady = time.perf_counter() - timing.first_at
        rows = timing.rows - timing.first_rows
        summary.this_run_steady_rows_per_s = rows / steady if steady > 0 else 0.0
    embedding_set.save_summary(config.output, summary)
    return summary
