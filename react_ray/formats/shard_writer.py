"""One shard written in parts and committed once: the unit every stage that writes shards uses
(embedding sets, training shards).

```
FOLDER/_parts/NAME/RUN-FIRST.EXT   a part: some of the shard's rows, each written atomically
FOLDER/NAME.<data>                 the parts merged (parquet, tar, ...), at commit
FOLDER/NAME.stats.json             what happened to it: rows in, written, skipped by reason
FOLDER/NAME.done                   written last: the shard is complete
```
Control data is typed and travels beside the rows, never as rows: whoever writes a part says so
with a ``PartWritten``; whoever reads a shard says how many rows it held with a ``ShardRead``.
``ShardTally`` puts the two together and names each shard once every row it held is accounted
for. A shard without its marker is redone from scratch on the next run, so a run killed at any
point and rerun writes exactly what an uninterrupted run would.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from react_ray.formats import storage

S = TypeVar("S")


@dataclass(frozen=True)
class ShardRead:
    """A shard read to its end: how many rows it held, and why it ended early if it did."""

    shard: int
    rows: int
    error: str | None = None


@dataclass
class PartWritten:
    """Some rows of one shard accounted for: ``written`` of them in ``part`` (no file when none),
    the others skipped, each with its id, key, reason and message."""

    shard: int
    rows: int
    written: int
    part: str = ""
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    nodes: dict[str, list[str]] = field(default_factory=dict)  # stage -> Ray node ids

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str) -> PartWritten:
        return cls(**json.loads(text))

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(record["reason"] for record in self.skipped))


class ShardTally:
    """Which shards are complete: every row their reader counted is in a part or skipped."""

    def __init__(self):
        self.reads: dict[int, ShardRead] = {}
        self.parts: dict[int, list[PartWritten]] = {}
        self.rows: Counter = Counter()  # accounted for, per shard
        self.skipped = 0  # rows, all shards
        self.completed: set[int] = set()

    def knows_size(self, shard: int) -> bool:
        return shard in self.reads

    def add(self, item: ShardRead | PartWritten) -> int | None:
        """Account ``item``; return its shard if that shard just became complete."""
        if isinstance(item, ShardRead):
            self.reads[item.shard] = item
        else:
            self.parts.setdefault(item.shard, []).append(item)
            self.rows[item.shard] += item.rows
            self.skipped += item.rows - item.written
        shard = item.shard
        read = self.reads.get(shard)
        if shard in self.completed or read is None or read.rows != self.rows[shard]:
            return None
        self.completed.add(shard)
        return shard

    def total(self, shard: int) -> PartWritten:
        """The shard's parts added up (``part`` empty: see ``part_uris``)."""
        parts = self.parts.get(shard, [])
        nodes: dict[str, set[str]] = {}
        for part in parts:
            for stage, ids in part.nodes.items():
                nodes.setdefault(stage, set()).update(ids)
        return PartWritten(
            shard=shard,
            rows=sum(p.rows for p in parts),
            written=sum(p.written for p in parts),
            skipped=[record for p in parts for record in p.skipped],
            seconds=sum(p.seconds for p in parts),
            nodes={stage: sorted(ids) for stage, ids in nodes.items()},
        )

    def part_uris(self, shard: int) -> list[str]:
        return sorted({p.part for p in self.parts.get(shard, []) if p.part})

    def incomplete(self, shards: list[int]) -> list[int]:
        return [s for s in shards if s not in self.completed]


class ReadLedger:
    """Where shard readers leave their ``ShardRead`` for the process that tallies (run it as a
    Ray actor; readers record before they hand over their last rows, so the tally learns a
    shard's size before the last of its parts arrives)."""

    def __init__(self):
        self.new: list[ShardRead] = []

    def record(self, read: ShardRead) -> None:
        self.new.append(read)

    def drain(self) -> list[ShardRead]:
        new, self.new = self.new, []
        return new


def parts_dir(folder: str, name: str) -> str:
    return storage.join(folder, "_parts", name)


def part_uri(folder: str, name: str, run_id: str, first: int, suffix: str) -> str:
    """A part's file: the run that wrote it, then its first row (id or position)."""
    return storage.join(parts_dir(folder, name), f"{run_id}-{first:020d}{suffix}")


def stats_uri(folder: str, name: str) -> str:
    return storage.join(folder, f"{name}.stats.json")


def done_uri(folder: str, name: str) -> str:
    return storage.join(folder, f"{name}.done")


def is_done(folder: str, name: str) -> bool:
    return storage.exists(done_uri(folder, name))


def commit(folder: str, name: str, stats: Any, marker: dict) -> None:
    """After the shard's data files are written: its stats (a dataclass), then its marker."""
    storage.write_text_atomic(stats_uri(folder, name), json.dumps(asdict(stats), indent=1))
    storage.write_text_atomic(done_uri(folder, name), json.dumps(marker | {"at": time.time()}))


def commit_parts(
    folder: str,
    name: str,
    parts: list[str],
    merge: Callable[[list[str]], None],
    stats: Any,
    marker: dict,
) -> None:
    """``merge(parts)`` writes the shard's data files; then its stats and marker; then its parts
    go. A shard redone (``retry_failed``) loses its old marker first: it is not done until its
    new files are."""
    storage.remove(done_uri(folder, name))
    merge(sorted(set(parts)))
    commit(folder, name, stats, marker)
    storage.remove(parts_dir(folder, name), recursive=True)


def remove_leftover_parts(folder: str) -> None:
    """Parts of killed runs (each shard's own go when it commits)."""
    storage.remove(storage.join(folder, "_parts"), recursive=True)


def read_stats(folder: str, name: str, stats_type: type[S]) -> S:
    return stats_type(**json.loads(storage.read_bytes(stats_uri(folder, name))))
