"""Training shards: a retrieved set materialized as labeled webdataset shards.

```
OUTPUT/00000.tar            KEY.jpg, KEY.txt (caption), KEY.cls (label), KEY.json (id, url, ...)
OUTPUT/00000.status.parquet every sample's status, reason and message (successes included)
OUTPUT/00000.stats.json     ShardStats: counts by status and reason, bytes, seconds
OUTPUT/00000.done           written last
OUTPUT/_parts/00000/*.tar   parts of PART_SAMPLES samples, merged at commit (formats.shard_writer)
OUTPUT/_summary.json        Summary: every shard added up
```
The training stage reads the tars as any webdataset corpus (``formats.readers``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from react_ray.formats import shard_writer, storage


def shard_name(k: int) -> str:
    return f"{k:05d}"


def shard_uri(output: str, k: int, suffix: str) -> str:
    return storage.join(output, f"{shard_name(k)}{suffix}")


@dataclass
class ShardStats:
    shard: int
    rows: int
    success: int
    failed: dict[str, int]  # by reason
    fetched_this_run: int
    bytes: int
    seconds: float


@dataclass
class Summary:
    """``_summary.json``."""

    pairs: int
    shards: int
    success: int
    failed: dict[str, int] = field(default_factory=dict)
    this_run_shards: int = 0
    this_run_fetched: int = 0
    seconds: float = 0.0
    bytes: int = 0
    version: int = 1  # of this layout

    def __str__(self) -> str:
        return (
            f"materialize: {self.success:,} of {self.pairs:,} pairs in "
            f"{self.shards} shards; failed {self.failed or 'none'}; this "
            f"run fetched {self.this_run_fetched:,} in {self.seconds:.1f}s"
        )


def is_done(output: str, k: int) -> bool:
    return shard_writer.is_done(output, shard_name(k))


def commit(
    output: str, stats: ShardStats, parts: list[str], merge: Callable[[list[str]], None]
) -> None:
    """``merge(parts)`` writes the shard's tar and status; then its stats and marker."""
    shard_writer.commit_parts(
        output, shard_name(stats.shard), parts, merge, stats, {"success": stats.success}
    )


def summarize(output: str, shards: int, pairs: int, this_run: set[int], seconds: float) -> Summary:
    """Every shard's stats added up, and written to ``_summary.json``."""
    stats = [shard_writer.read_stats(output, shard_name(k), ShardStats) for k in range(shards)]
    failed: Counter = Counter()
    for s in stats:
        failed.update(s.failed)
    summary = Summary(
        pairs=pairs,
        shards=shards,
        success=sum(s.success for s in stats),
        failed=dict(failed),
        this_run_shards=len(this_run),
        seconds=round(seconds, 2),
        bytes=sum(s.bytes for s in stats),
        this_run_fetched=sum(s.fetched_this_run for s in stats if s.shard in this_run),
    )
    storage.write_text_atomic(
        storage.join(output, "_summary.json"), json.dumps(asdict(summary), indent=1)
    )
    return summary
