"""Ports for the servers tests start (daemons, mosquitto, PostgreSQL, stand-in webhooks).

A port taken with ``bind(port 0)`` and handed to a server that binds it a moment later is the
kernel's ephemeral range (32768-60999 by default): in between, any outgoing connection of any
test on the machine may get it as its source port, or another port-0 listener may, and the
server fails with "Address already in use" (seen under xdist, a few times in a thousand starts).
These come from below that range, where the kernel hands out nothing by itself, each xdist
worker from its own span, one after another, so two servers of one test run never get the same
port either. A port still taken by something else is skipped.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
from collections.abc import Iterator

__all__ = ["free_port"]

#: Below the kernel's default ephemeral range (``net.ipv4.ip_local_port_range``).
_LOW, _HIGH = 12_000, 32_000


def _span() -> tuple[int, int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (_HIGH - _LOW) // max(1, count)
    return _LOW + index * size, _LOW + (index + 1) * size


def _cycle() -> Iterator[int]:
    low, high = _span()
    # A random start: two test runs on one machine (two checkouts) rarely walk the same ports.
    start = random.randrange(low, high)
    return itertools.chain(range(start, high), itertools.cycle(range(low, high)))


_ports = _cycle()


def free_port() -> int:
    """A loopback TCP port nothing listens on, for a server to bind."""
    for _ in range(_HIGH - _LOW):
        port = next(_ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port between {_LOW} and {_HIGH}")
