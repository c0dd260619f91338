"""Stable sample ids: where a pair lives, packed in one int64, identical on every rerun.

``id = source << 52 | shard << 24 | row``: ``source`` tells corpora apart (0-2047), ``shard``
is the number in the input file's name (``00042.tar`` -> 42, up to 268M shards), ``row`` the
record's position inside that file (up to 16.7M rows). An index hit decodes to its metadata
file and row without any lookup table, and ids never depend on which files a run listed.
"""

from __future__ import annotations

import os
import re

import numpy as np

SOURCE_BITS, SHARD_BITS, ROW_BITS = 11, 28, 24
MAX_SOURCE, MAX_SHARD, MAX_ROW = (1 << SOURCE_BITS) - 1, (1 << SHARD_BITS) - 1, (1 << ROW_BITS) - 1
LAYOUT = "source<<52 | shard<<24 | row"
_DIGITS = re.compile(r"(\d+)")


def encode(shard: int, row, source: int = 0):
    """Works on ints and on numpy arrays of rows."""
    if not 0 <= source <= MAX_SOURCE:
        raise ValueError(f"source: got {source}; must be in 0..{MAX_SOURCE}")
    if not 0 <= shard <= MAX_SHARD:
        raise ValueError(f"shard number: got {shard}; must be in 0..{MAX_SHARD}")
    if np.any(np.asarray(row) > MAX_ROW) or np.any(np.asarray(row) < 0):
        raise ValueError(
            f"row: must be in 0..{MAX_ROW} (a shard holds at most {MAX_ROW + 1:,} rows)"
        )
    return (
        (np.int64(source) << (SHARD_BITS + ROW_BITS))
        | (np.int64(shard) << ROW_BITS)
        | np.asarray(row, np.int64)
    )


def decode(ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids -> (source, shard, row) arrays."""
    ids = np.asarray(ids, np.int64)
    return ids >> (SHARD_BITS + ROW_BITS), (ids >> ROW_BITS) & MAX_SHARD, ids & MAX_ROW


def shard_number(uri: str) -> int:
    """The shard number in a file name: the last run of digits (``part-00012.parquet`` -> 12,
    ``img_emb_0003.npy`` -> 3)."""
    stem = os.path.basename(uri.rstrip("/")).split(".")[0]
    runs = _DIGITS.findall(stem)
    if not runs:
        raise ValueError(
            f"{uri}: input file names must carry a shard number (e.g. 00012.tar) for stable ids"
        )
    return int(runs[-1])
