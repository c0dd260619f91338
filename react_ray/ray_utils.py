"""Connecting to Ray: the one place jobs and stages start or join a cluster, and what Ray prints.

The console tells the story of a run (stage headers, progress, summaries, warnings); Ray's own
INFO logs go to its session's log files (``/tmp/ray/session_latest/logs``).
``REACT_RAY_LOG_LEVEL=INFO`` brings them back to the console.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from importlib.resources import files

import ray

# Raylet settings for every Ray this project starts (cluster manifests set the same on their
# nodes). Ray keeps about num_cpus workers and kills any other worker idle for 1 s, but actors
# count too: a pool of one CPU actor per core leaves no room, so each read or commit task
# started a fresh Python worker (import ray, pyarrow: ~1.5 s of CPU, every few seconds; a
# quarter of a 2-core machine, measured). Idle task workers now live for a minute.
RAYLET_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}

LOG_LEVEL = os.environ.get("REACT_RAY_LOG_LEVEL", "WARNING").upper()
# Notices Ray logs at WARNING that tell a user of this project nothing (Ray's files keep them).
RAY_NOISE = (
    "Progress bars disabled",  # the training loop prints its own progress
    "`ExecutionOptions.exclude_resources` is deprecated",  # set by Ray itself, not by this project
)


class RayNoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(RAY_NOISE)


def connect(address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``, or start a local Ray) unless this process already did.

    Tests call :func:`start_local` first, so library code never attaches to a stray cluster on
    the machine.
    """
    if not ray.is_initialized():
        _apply_raylet_env()
        quiet_ray_console()
        ray.init(address=address, log_to_driver=True, logging_level=LOG_LEVEL)


def start_local(num_cpus: int | None = None, **options) -> None:
    """A new local Ray (never a cluster already on the machine) for tests and benchmarks."""
    _apply_raylet_env()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        **({"include_dashboard": False, "log_to_driver": False} | options),
    )


def quiet_ray_console() -> None:
    """Ray Data's console shows warnings and errors only, here and in the workers a local Ray starts
    from this process (they inherit the environment); Ray's deprecation notices about its own calls
    are dropped."""
    if LOG_LEVEL == "INFO":
        return
    os.environ.setdefault(
        "RAY_DATA_LOGGING_CONFIG", str(files("react_ray.resources") / "ray_data_logging.yaml")
    )
    if "ray.data" in sys.modules:  # already configured at its import: again, from the file
        from ray.data._internal.logging import configure_logging

        configure_logging()
    for notice in RAY_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(notice))


def _apply_raylet_env() -> None:
    """Only a raylet this process starts reads these; an explicit environment wins."""
    for name, value in RAYLET_ENV.items():
        os.environ.setdefault(name, value)
