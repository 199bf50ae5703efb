"""What the cluster tests share: two stores on one PostgreSQL database, the real cluster
statements with faults put in at chosen points, and short ways to make work and read claims."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from phonepush.cluster import Cluster
from phonepush.errors import SpoolError
from phonepush.store.cluster import PostgresCluster
from phonepush.store.postgres import PostgresStore
from phonepush.store.records import Delivery, PushRequest

__all__ = ["PAGE", "Faulty", "SlowRelease", "claimed", "owner", "pending", "running", "stores"]

PAGE = (PushRequest("execute", "<CiscoIPPhoneExecute/>"),)


class Faulty(PostgresCluster):
    """The real statements, with heartbeats that fail while ``down`` (a database out of reach
    for this instance only)."""

    down = False

    async def heartbeat(self, *args: Any, **kwargs: Any) -> tuple[int, str]:
        if self.down:
            raise SpoolError("database out of reach (test)")
        return await super().heartbeat(*args, **kwargs)


class SlowRelease(PostgresCluster):
    """The real statements, with a release that waits at its start until ``go`` is set."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__(store)
        self.entered = asyncio.Event()
        self.go = asyncio.Event()
        self.released: list[str] = []

    async def release(self, instance: str, phones: Sequence[str]) -> dict[str, str]:
        self.entered.set()
        await self.go.wait()
        result = await super().release(instance, phones)
        self.released.extend(result.values())
        return result


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two instances' stores on one database."""
    async with PostgresStore(pg_url) as one, PostgresStore(pg_url) as two:
        yield one, two


@contextlib.asynccontextmanager
async def running(cluster: Cluster) -> AsyncIterator[Cluster]:
    """``cluster`` joined and running its loops, as the daemon runs it."""
    await cluster.start()
    task = asyncio.create_task(cluster.run())
    try:
        yield cluster
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def pending(
    store: PostgresStore, phone: str, *, audio: bool = False, held_by: str | None = None
) -> Delivery:
    """A pending delivery to ``phone`` (an audio page's row, with no requests, if ``audio``).

    ``held_by``: the phone's claim is that instance's first. A test that submits the delivery
    through one instance and expects that one to push it needs this: between the commit and the
    submit's claim, another instance's scan may find the phone unclaimed with pending work and
    take it, which is right, but not what such a test looks at (under load it happens)."""
    if held_by is not None:
        await claimed(store, phone, held_by)
    return await store.deliveries.add_pending("ev", "rule", phone, () if audio else PAGE, 0.0, 4e9)


async def claimed(store: PostgresStore, phone: str, by: str) -> None:
    """``phone``'s claim is ``by``'s in the database (an instance that need not exist: one
    that died holding it)."""
    await store.write(
        "INSERT INTO cluster_claims (kind, name, owner, since) VALUES ('phone', %s, %s, 0)"
        " ON CONFLICT (kind, name) DO UPDATE SET owner = excluded.owner",
        (phone, by),
        "test",
    )


async def owner(store: PostgresStore, phone: str) -> str | None:
    """The instance whose claim ``phone`` is, in the database."""
    row = await store.row(
        "SELECT owner FROM cluster_claims WHERE kind = 'phone' AND name = %s", (phone,), "test"
    )
    return None if row is None else str(row["owner"])
