"""Loopback ports for the servers the tests start (moto, Ray heads, Serve)."""

from __future__ import annotations

import random
import socket

_given: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1, never the same twice in one session.

    Drawn below Linux's ephemeral range (32768-60999) and above Ray's worker ports (10002-19999):
    a port handed out by ``bind(0)`` could be taken by any process binding port 0 (Ray's own
    agents and clients do) between this check and the server's bind: a dashboard once lost its
    port that way.
    """
    draw = random.SystemRandom()
    for _ in range(1000):
        port = draw.randrange(20000, 32768)
        if port in _given:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError("no free loopback port in 20000-32767")
