"""Fixtures for simulated phones (:mod:`phonepush.sim.simulator`), on real sockets."""

from __future__ import annotations

import array
import contextlib
import math
import random
import socket
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from phonepush.sim.simulator import Fleet

__all__ = ["MakeFleet", "fleet", "free_rtp_port", "make_fleet", "tone_wav"]

#: ``await make_fleet(phones=2, username="u", password="p")`` -> an entered Fleet.
MakeFleet = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    """Three phones on ephemeral ports, no authentication, real-phone defaults (1 s tones)."""
    async with Fleet(3) as running:
        yield running


@pytest.fixture
async def make_fleet() -> AsyncIterator[MakeFleet]:
    """A factory of entered fleets (``Fleet``'s keyword arguments), all closed after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(**kwargs: Any) -> Fleet:
            return await stack.enter_async_context(Fleet(**kwargs))

        yield factory


def free_rtp_port(hosts: tuple[str, ...]) -> int:
    """An even port phones accept for RTP (20480-32768) that is free on every address in
    ``hosts``, so several simulated phones can listen on the same port as on a LAN."""
    for _ in range(100):
        port = random.randrange(20480, 32768, 2)
        probes: list[socket.socket] = []
        try:
            for host in hosts:
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probes.append(probe)
                probe.bind((host, port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return port
    raise RuntimeError("no free RTP port")


def tone_wav(
    path: Path, seconds: float, *, rate: int = 8000, hz: int = 440, amplitude: int = 8000
) -> Path:
    """A 16-bit mono WAV file of a sine tone, for audio pages to play."""
    samples = array.array(
        "h",
        [
            round(amplitude * math.sin(2 * math.pi * hz * n / rate))
            for n in range(int(rate * seconds))
        ],
    )
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples.tobytes())
    return path
