"""The statements of the cluster's coordination (:mod:`phonepush.cluster`) on a PostgreSQL store.

:class:`PostgresCluster` implements the small interface the cluster declares for itself
(``phonepush.cluster.interface.ClusterStore``) over a :class:`PostgresStore`'s pool, plus one
connection of its own for LISTEN. The tables (``cluster_instances``, ``cluster_claims``) are
schema version 2 of :mod:`phonepush.store.postgres`; SQLite has none (a daemon on SQLite has no
cluster).

Every time compared here is the database's (``clock_timestamp()``, in epoch seconds): instances'
clocks may disagree, the database is the one clock they share. An owner is *live* while its
instance row's ``expires_at`` is after that clock.

Why the release cannot strand work
    A phone's claim is released only by :meth:`PostgresCluster.release`, in one transaction that
    first locks the claim rows (``FOR UPDATE``) and only then, in a second statement with a
    snapshot of its own, deletes it if the phone has no pending delivery. Another instance that
    committed a delivery for that phone tries to claim the phone *after* its commit, with an
    upsert on the same row. Either that upsert reaches the row first (it was already committed,
    and so was the delivery, when the release locks the row: the delete's snapshot sees the
    delivery and keeps the claim; the owner then loads it), or the release holds the lock first
    (the upsert waits; if the delete's snapshot missed the delivery, the row is gone when the
    upsert goes on, which then inserts it: the committer owns the phone and pushes). A single
    ``DELETE … NOT EXISTS`` would not do: after waiting for the upsert's row lock it keeps the
    snapshot it started with, which can predate the delivery's commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Collection, Sequence
from typing import Final

import psycopg

from phonepush.errors import SpoolError
from phonepush.store.postgres import PostgresStore
from phonepush.store.records import Delivery, PushRequest
from phonepush.store.tables import DELIVERY_COLUMNS, delivery_of_row

__all__ = ["CHANNEL", "PostgresCluster"]

log = logging.getLogger("phonepush.cluster")

#: The LISTEN/NOTIFY channel the instances of one database share.
CHANNEL: Final = "phonepush"

_NOW: Final = "extract(epoch from clock_timestamp())"
# An owner is live while its lease has not run out by the database's clock.
_LIVE: Final = (
    "EXISTS (SELECT 1 FROM cluster_instances i"
    f" WHERE i.id = cluster_claims.owner AND i.expires_at > {_NOW})"
)
_ME_LIVE: Final = (
    f"EXISTS (SELECT 1 FROM cluster_instances me WHERE me.id = %s AND me.expires_at > {_NOW})"
)
_REGISTER: Final = (
    "INSERT INTO cluster_instances (id, host, started_at, expires_at)"
    f" VALUES (%s, %s, {_NOW}, {_NOW} + %s)"
    " ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at"
)
_LEAD: Final = (
    "INSERT INTO cluster_claims (kind, name, owner, since)"
    f" VALUES ('timer', 'leader', %s, {_NOW})"
    " ON CONFLICT (kind, name) DO UPDATE SET owner = excluded.owner,"
    " since = CASE WHEN cluster_claims.owner = excluded.owner THEN cluster_claims.since"
    " ELSE excluded.since END"
    f" WHERE cluster_claims.owner = excluded.owner OR NOT {_LIVE}"
)
_LEADER: Final = "SELECT owner FROM cluster_claims WHERE kind = 'timer' AND name = 'leader'"
_LIVE_COUNT: Final = f"SELECT count(*) AS n FROM cluster_instances WHERE expires_at > {_NOW}"
# Rows of instances long gone that hold nothing any more: the table stays small.
_FORGET_GONE: Final = (
    f"DELETE FROM cluster_instances i WHERE i.expires_at < {_NOW} - %s"
    " AND NOT EXISTS (SELECT 1 FROM cluster_claims c WHERE c.owner = i.id)"
)
_CLAIM: Final = (
    "WITH prev AS (SELECT name, owner FROM cluster_claims"
    " WHERE kind = 'phone' AND name = ANY(%s)),"
    " claimed AS ("
    "INSERT INTO cluster_claims (kind, name, owner, since)"
    f" SELECT 'phone', p, %s, {_NOW} FROM unnest(%s::text[]) AS p WHERE {_ME_LIVE}"
    " ON CONFLICT (kind, name) DO UPDATE SET owner = excluded.owner, since = excluded.since"
    f" WHERE cluster_claims.owner = excluded.owner OR NOT {_LIVE}"
    " RETURNING name)"
    # The owner it was taken from, only if that owner is not live: a live one released the
    # phone while this waited (its snapshot still showed it), which is no takeover.
    " SELECT claimed.name, CASE WHEN prev.owner IS NULL OR EXISTS (SELECT 1"
    f" FROM cluster_instances i WHERE i.id = prev.owner AND i.expires_at > {_NOW})"
    " THEN '' ELSE prev.owner END AS previous"
    " FROM claimed LEFT JOIN prev USING (name)"
)
# (a) phones whose owner is not live: locked SKIP LOCKED, so survivors scanning at once take
# different phones instead of waiting for each other.
_ADOPT_ORPHANS: Final = (
    "WITH dead AS (SELECT name, owner FROM cluster_claims"
    f" WHERE kind = 'phone' AND owner <> %s AND NOT {_LIVE} AND {_ME_LIVE}"
    " FOR UPDATE SKIP LOCKED)"
    f" UPDATE cluster_claims c SET owner = %s, since = {_NOW}"
    " FROM dead WHERE c.kind = 'phone' AND c.name = dead.name"
    " RETURNING c.name, dead.owner AS previous"
)
# (b) phones with pending pushes and no claim at all (an instance died between its commit and
# its claim, or a claim failed). Audio-page rows (requests '[]') are the announcer's, pushed
# outside the dispatcher: they never make a phone someone's work.
_ADOPT_UNCLAIMED: Final = (
    "INSERT INTO cluster_claims (kind, name, owner, since)"
    f" SELECT 'phone', p.phone, %s, {_NOW} FROM (SELECT DISTINCT phone FROM deliveries"
    " WHERE state = 'pending' AND requests <> '[]') AS p"
    " WHERE NOT EXISTS (SELECT 1 FROM cluster_claims c"
    f" WHERE c.kind = 'phone' AND c.name = p.phone) AND {_ME_LIVE}"
    " ON CONFLICT (kind, name) DO NOTHING"
    " RETURNING name, '' AS previous"
)
# (c) phones this instance owns with pending pushes: compared with what it acts on.
_OWNED_PENDING: Final = (
    "SELECT c.name FROM cluster_claims c WHERE c.kind = 'phone' AND c.owner = %s"
    " AND EXISTS (SELECT 1 FROM deliveries d"
    " WHERE d.phone = c.name AND d.state = 'pending' AND d.requests <> '[]')"
    " ORDER BY c.name"
)
_LOCK_CLAIMS: Final = (
    "SELECT name FROM cluster_claims WHERE kind = 'phone' AND owner = %s AND name = ANY(%s)"
    " ORDER BY name FOR UPDATE"
)
_RELEASE: Final = (
    "DELETE FROM cluster_claims c WHERE c.kind = 'phone' AND c.owner = %s AND c.name = ANY(%s)"
    " AND NOT EXISTS (SELECT 1 FROM deliveries d"
    " WHERE d.phone = c.name AND d.state = 'pending' AND d.requests <> '[]')"
    " RETURNING c.name"
)
_PENDING_OF: Final = (
    f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE state = 'pending' AND phone = ANY(%s)"
    " AND (requests <> '[]' OR phone = ANY(%s)) ORDER BY id"
)
_PENDING_AUDIO: Final = (
    f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE state = 'pending' AND requests = '[]'"
    " ORDER BY id"
)
_NOTIFY: Final = "SELECT pg_notify(%s, %s)"

#: Reconnecting the listener: full jitter up to a cap that doubles from the first.
_LISTEN_BACKOFF: Final = (0.5, 10.0)


class PostgresCluster:
    """The cluster's statements on ``store``'s pool; :meth:`listen` on a connection of its own."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def heartbeat(
        self, instance: str, host: str, lease: float, *, rejoin: bool
    ) -> tuple[int, str]:
        """Renew ``instance``'s lease (registering it the first time) and take or keep the
        leadership if its holder is not live; (live instances, the leader's id). ``rejoin``
        first drops every claim the instance still has (it was fenced and forgot them)."""
        store = self._store
        async with store.atomic("cluster heartbeat"):
            if rejoin:
                await store.write(
                    "DELETE FROM cluster_claims WHERE owner = %s", (instance,), "cluster rejoin"
                )
            await store.write(_REGISTER, (instance, host, lease), "cluster heartbeat")
            await store.write(_LEAD, (instance,), "cluster leadership")
            leader = await store.row(_LEADER, (), "cluster leadership")
            live = await store.row(_LIVE_COUNT, (), "cluster heartbeat")
            await store.write(_FORGET_GONE, (max(3600.0, 10 * lease),), "cluster heartbeat")
        return (0 if live is None else int(live["n"])), ("" if leader is None else leader["owner"])

    async def claim(self, instance: str, phones: Sequence[str]) -> list[tuple[str, str]]:
        """Claim ``phones`` for ``instance`` where it holds them or their owner is not live;
        (phone, the owner it was taken from when that one was not live, else '') of each it
        now holds."""
        unique = sorted(set(phones))
        rows = await self._store.rows(
            _CLAIM, (unique, instance, unique, instance), "cannot claim phones"
        )
        return [(row["name"], row["previous"]) for row in rows]

    async def adopt(self, instance: str) -> list[tuple[str, str]]:
        """Take over the phones of owners that are not live, then the phones with pending
        pushes and no claim; (phone, previous owner or '') of each."""
        store = self._store
        orphans = await store.rows(
            _ADOPT_ORPHANS, (instance, instance, instance), "cannot adopt phones"
        )
        unclaimed = await store.rows(_ADOPT_UNCLAIMED, (instance, instance), "cannot adopt phones")
        return [(row["name"], row["previous"]) for row in (*orphans, *unclaimed)]

    async def owned(self, instance: str) -> list[str]:
        """The phones ``instance`` has claimed that have pending pushes."""
        rows = await self._store.rows(_OWNED_PENDING, (instance,), "cannot read claims")
        return [row["name"] for row in rows]

    async def release(self, instance: str, phones: Sequence[str]) -> dict[str, str]:
        """Give up each of ``phones`` that has no pending push, in one transaction: phone ->
        ``released``, ``kept`` (pending work is there: load it), or ``lost`` (not this
        instance's any more)."""
        store = self._store
        unique = sorted(set(phones))
        async with store.atomic("cluster release"):
            # Locked in name order, as claims lock them: no deadlock with a claim of many.
            held = await store.rows(_LOCK_CLAIMS, (instance, unique), "cannot release phones")
            released = await store.rows(_RELEASE, (instance, unique), "cannot release phones")
        results = dict.fromkeys(unique, "lost")
        results.update(dict.fromkeys((row["name"] for row in held), "kept"))
        results.update(dict.fromkeys((row["name"] for row in released), "released"))
        return results

    async def pending_of(
        self, phones: Collection[str], *, audio_of: Collection[str] = ()
    ) -> list[Delivery]:
        """The pending deliveries of ``phones``, oldest first; audio-page rows only for the
        phones in ``audio_of``."""
        if not phones:
            return []
        rows = await self._store.rows(
            _PENDING_OF, (sorted(phones), sorted(audio_of)), "cannot read deliveries"
        )
        decoded: dict[str, tuple[PushRequest, ...]] = {}
        return [delivery_of_row(row, decoded) for row in rows]

    async def pending_audio(self) -> list[Delivery]:
        """Every pending audio-page row (a cluster of one at start-up finishes them)."""
        rows = await self._store.rows(_PENDING_AUDIO, (), "cannot read deliveries")
        return [delivery_of_row(row) for row in rows]

    async def leave(self, instance: str) -> None:
        """Drop ``instance``'s claims and row; the others hear ``work`` at the commit."""
        store = self._store
        async with store.atomic("cluster leave"):
            await store.write(
                "DELETE FROM cluster_claims WHERE owner = %s", (instance,), "cluster leave"
            )
            await store.write(
                "DELETE FROM cluster_instances WHERE id = %s", (instance,), "cluster leave"
            )
            await store.rows(_NOTIFY, (CHANNEL, "work"), "cluster leave")

    async def notify(self, payload: str) -> None:
        """Send ``payload`` to every listening instance (this one included)."""
        await self._store.rows(_NOTIFY, (CHANNEL, payload), "cannot notify")

    async def listen(
        self, on_payload: Callable[[str], None], on_connect: Callable[[], None]
    ) -> None:
        """Hand every notification's payload to ``on_payload``, until cancelled; reconnect with
        capped, jittered backoff. ``on_connect`` is called at each (re)connect: what was sent
        while no connection listened is lost, so the caller looks again."""
        first, cap = _LISTEN_BACKOFF
        delay = first
        failing = False
        while True:
            try:
                conn = await self._store.dedicated_connection()
                try:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if failing:
                        log.info("cluster: listening for notifications again")
                    failing = False
                    delay = first
                    on_connect()
                    async for notification in conn.notifies():
                        on_payload(notification.payload)
                finally:
                    with contextlib.suppress(psycopg.Error):
                        await conn.close()
            except (psycopg.Error, SpoolError, OSError) as exc:
                if not failing:
                    log.warning("cluster: not listening for notifications: %s", exc)
                failing = True
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(cap, delay * 2)
