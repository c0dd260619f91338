"""``react-ray materialize``: a retrieved set -> labeled webdataset training shards."""

from __future__ import annotations

import time

from react_ray.config import MaterializeConfig
from react_ray.formats import training_shards
from react_ray.leases import holds_lease
from react_ray.ray_utils import connect
from react_ray.retrieve.materialize import materialize_shards, plan_shards


@holds_lease("materialize")
def run_materialize(config: MaterializeConfig, progress: bool = True) -> training_shards.Summary:
    """Materialize every shard not done yet (all of them again with ``retry_failed``, keeping
    what succeeded); return the summary of all shards."""
    start = time.perf_counter()
    total, shards = plan_shards(config)
    pending = [
        s
        for s in shards
        if config.retry_failed or not training_shards.is_done(config.output, s["shard"])
    ]
    if pending:
        connect(config.ray_address)
        materialize_shards(config, pending, progress)
    this_run = {s["shard"] for s in pending}
    seconds = time.perf_counter() - start
    summary = training_shards.summarize(config.output, len(shards), total, this_run, seconds)
    print(summary)
    return summary
