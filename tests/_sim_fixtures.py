"""Fixtures for simulated phones (:mod:`phonepush.simulator`), on real sockets."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from phonepush.simulator import Fleet

__all__ = ["MakeFleet", "fleet", "make_fleet"]

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
