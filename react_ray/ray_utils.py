"""Connecting to Ray: the one place jobs and stages start or join a cluster."""

from __future__ import annotations

import ray


def connect(address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``, or start a local Ray) unless this process already did.

    Tests call ``ray.init(address="local", num_cpus=...)`` first, so library code never
    attaches to a stray cluster on the machine.
    """
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)
