"""One writer per output: a lease file that a running stage holds and renews.

``OUTPUT/_lease.json`` names the run that writes OUTPUT (host, pid, stage, when it started) and
until when its lease holds; a heartbeat thread extends it while the run lives. A second run
finds a live lease and is refused with those facts (a concurrent embed would delete the first
run's ``_parts``; two appends would publish the same version). A run that died leaves a lease
that the next run takes over, saying so: at once when the holder was a process of this host that
no longer exists, else once it expired (``ttl_s``, default 120 s; ``REACT_RAY_LEASE_TTL_S``).

Acquiring is exclusive on a local or shared POSIX filesystem (``O_EXCL``). Object stores have no
such primitive in every implementation; there the lease is written, then read back after a
pause, and the later of two simultaneous writers backs off (a narrow window, stated here).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from react_ray.formats import storage

LEASE_FILE = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another live run writes this output."""


def _describe(lease: dict) -> str:
    age = time.time() - lease["started"]
    return (
        f"the {lease['stage']} run {lease['owner'][:8]} (host {lease['host']}, pid {lease['pid']}, "
        f"started {age:.0f} s ago; its lease holds until "
        f"{time.strftime('%H:%M:%S', time.localtime(lease['expires']))})"
    )


def _read(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, ValueError):  # absent, or caught half-written on a local disk
        return None


def _holder_died(lease: dict) -> bool:
    """The lease's process is gone: it ran on this host and its pid no longer exists."""
    if lease["host"] != socket.gethostname():
        return False
    try:
        os.kill(int(lease["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _create_exclusive(uri: str, text: str) -> bool:
    """Write ``uri`` only if it does not exist; False if it does."""
    if storage.is_remote(uri):
        if storage.exists(uri):
            return False
        storage.write_text_atomic(uri, text)
        return True
    path = storage.local_path(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


@contextmanager
def output_lease(
    output: str, stage: str, ttl_s: float | None = None, settle_s: float = 1.0
) -> Iterator[dict]:
    """Hold the lease of ``output`` for the block; LeaseHeld if a live run holds it."""
    ttl_s = ttl_s or float(os.environ.get("REACT_RAY_LEASE_TTL_S", "120"))
    uri = storage.join(output, LEASE_FILE)
    mine = {
        "owner": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "stage": stage,
        "started": time.time(),
        "expires": time.time() + ttl_s,
    }
    held = _read(uri)
    if held is not None:
        died = _holder_died(held)
        if not died and held["expires"] > time.time():
            raise LeaseHeld(
                f"{output} is being written by {_describe(held)}; wait for it to finish, or, if "
                f"that run died on another host, for its lease to expire"
            )
        print(
            f"{stage}: taking over the lease of {_describe(held)}: "
            f"{'that process is gone' if died else 'its lease expired'}"
        )
        storage.remove(uri)
    if not _create_exclusive(uri, json.dumps(mine)):
        raise LeaseHeld(f"{output} is being written by another run that took its lease just now")
    if storage.is_remote(uri):  # no exclusive create: the last writer of a simultaneous pair wins
        time.sleep(settle_s)
        current = _read(uri)
        if current is None or current["owner"] != mine["owner"]:
            raise LeaseHeld(
                f"{output} is being written by another run that took its lease just now"
            )
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(ttl_s / 4):
            current = _read(uri)
            if current is None or current["owner"] != mine["owner"]:
                return  # taken over (we were presumed dead): the other run owns the output now
            storage.write_text_atomic(uri, json.dumps(mine | {"expires": time.time() + ttl_s}))

    thread = threading.Thread(target=heartbeat, name="lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield mine
    finally:
        stop.set()
        thread.join()
        current = _read(uri)
        if current is not None and current["owner"] == mine["owner"]:
            storage.remove(uri)


def holds_lease(stage: str):
    """Decorator: the stage function (``config`` first, with an ``output``) runs under the lease of
    ``config.output``."""

    def wrap(run):
        @functools.wraps(run)
        def leased(config, *args, **kwargs):
            with output_lease(config.output, stage):
                return run(config, *args, **kwargs)

        return leased

    return wrap
