"""``react-ray index``: build a sharded index from an embedding set, or append to one."""

from __future__ import annotations

import time

from react_ray.config import IndexConfig
from react_ray.formats.index_manifest import IndexManifest
from react_ray.index.build import (
    DRIFT_WARNING,
    append_planned,
    build_planned,
    drift_over_limits,
    plan_append,
    plan_build,
)
from react_ray.index.plan import format_bytes
from react_ray.leases import holds_lease
from react_ray.ray_utils import connect


@holds_lease("index")
def build_index(config: IndexConfig, progress: bool = True) -> IndexManifest:
    """Build (or finish building) the index; return its manifest."""
    plan = plan_build(config)
    fewer = (
        f" ({config.num_shards} asked; fewer files)" if plan.num_shards < config.num_shards else ""
    )
    print(
        f"index: {plan.vectors:,} x {plan.info.dim} {plan.column} vectors in {len(plan.files)} "
        f"files -> {plan.factory} ({plan.reason}), {plan.num_shards} shards{fewer}"
    )
    connect(config.ray_address)
    manifest = build_planned(config, plan, progress)
    tuning = manifest.tuning
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in manifest.seconds.items())
    print(
        f"index: {manifest.ntotal:,} vectors in {len(manifest.shards)} "
        f"shards ({format_bytes(sum(s.bytes for s in manifest.shards))}); "
        f"search params {manifest.search_params or 'none (exact)'} give "
        f"recall@{config.recall_k} {tuning['recall']:.3f} on "
        f"{tuning['queries']}; built in {manifest.build_seconds:.1f}s ({phases})"
    )
    return manifest


@holds_lease("index --append")
def append_to_index(config: IndexConfig, progress: bool = True) -> IndexManifest:
    """Add the committed embedding files the index does not hold yet as new shards; publish the
    next manifest version. Rerunning after a crash resumes; one build or append per index at a
    time (``leases``)."""
    start = time.perf_counter()
    plan = plan_append(config)
    if not plan.new:
        print(
            f"index --append: all {len(plan.files)} embedding files "
            f"are indexed already (version {plan.manifest.version})"
        )
        return plan.manifest
    if plan.resumed:
        print(
            "index --append: resuming the interrupted append to "
            f"version {plan.manifest.version + 1} ({len(plan.new)} "
            f"files in {len(plan.shard_files)} shards, as planned)"
        )
    connect(config.ray_address)
    updated = append_planned(config, plan, progress)
    print(
        f"index --append: {updated.appends[-1].vectors:,} vectors from {len(plan.new)} files in "
        f"{len(plan.shard_files)} new shards; {updated.ntotal:,} in all, version "
        f"{updated.version} ({time.perf_counter() - start:.1f}s)"
    )
    if over := drift_over_limits(updated.appends[-1].drift):
        print(
            f"index --append: WARNING the new vectors drift from the build's: {over} (limits "
            f"{DRIFT_WARNING}); their codes are less accurate than the original's; rebuilding "
            "into a new output would retrain"
        )
    return updated
