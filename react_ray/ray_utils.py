"""Connecting to Ray: the one place jobs and stages start or join a cluster."""

from __future__ import annotations

import os

import ray

# Raylet settings for every Ray this project starts (cluster manifests set the same on their
# nodes). Ray keeps about num_cpus workers and kills any other worker idle for 1 s, but actors
# count too: a pool of one CPU actor per core leaves no room, so each read or commit task
# started a fresh Python worker (import ray, pyarrow: ~1.5 s of CPU, every few seconds; a
# quarter of a 2-core machine, measured). Idle task workers now live for a minute.
RAYLET_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}


def connect(address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``, or start a local Ray) unless this process already did.

    Tests call :func:`start_local` first, so library code never attaches to a stray cluster on
    the machine.
    """
    if not ray.is_initialized():
        _apply_raylet_env()
        ray.init(address=address, log_to_driver=True)


def start_local(num_cpus: int | None = None, **options) -> None:
    """A new local Ray (never a cluster already on the machine) for tests and benchmarks."""
    _apply_raylet_env()
    ray.init(address="local", num_cpus=num_cpus, **({"include_dashboard": False, "log_to_driver": False} | options))


def _apply_raylet_env() -> None:
    """Only a raylet this process starts reads these; an explicit environment wins."""
    for name, value in RAYLET_ENV.items():
        os.environ.setdefault(name, value)
