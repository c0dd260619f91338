"""Shards committed one at a time, the way every stage that writes shards does it.

```
FOLDER/NAME.<data>         the shard's data (parquet, tar, ...), each file written atomically
FOLDER/NAME.stats.json     what happened to it: rows in, written, skipped by reason
FOLDER/NAME.done           written last: the shard is complete
```
A shard without its marker is redone from scratch on the next run, so a run killed at any
point and rerun writes exactly what an uninterrupted run would.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any, TypeVar

from react_ray.formats import storage

S = TypeVar("S")


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


def read_stats(folder: str, name: str, stats_type: type[S]) -> S:
    return stats_type(**json.loads(storage.read_bytes(stats_uri(folder, name))))
