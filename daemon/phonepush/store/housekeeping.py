"""Housekeeping: keep the spool bounded in time (``spool.retention``) and size (``spool.max_size``).

Every tick the spool's live size is measured (three ``PRAGMA`` reads). Over ``max_size``, the
oldest finished events (every delivery done, nothing waiting in a group, no repeat to come) are
evicted, with their deliveries, pages and alerts, until the spool is back under
:data:`LOW_WATER` of the limit. If pending work alone keeps it over, :attr:`Spool.full
<phonepush.store.interface.Store.full>` is set: intake refuses events the way it does at
``spool.max_pending`` (webhooks 503, MQTT messages left unacknowledged) until deliveries finish
and can be evicted. Pending work is never dropped. Once a minute, events finished and older than
``retention`` are purged, and cooldowns that ended before then.

All of it runs on the event loop, in transactions of at most :attr:`Housekeeper.batch` events,
with the loop given back between them. The batch size adapts so that one transaction takes
about :data:`TARGET_BATCH_SECONDS`: a few milliseconds, so ``/healthz``, intake and
dispatch go on while a large spool is purged (``docs/performance.md``, section "Spool").
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Final

from phonepush.errors import SpoolError
from phonepush.logs import counted
from phonepush.store.interface import Store

__all__ = ["LOW_WATER", "TARGET_BATCH_SECONDS", "Housekeeper"]

log = logging.getLogger("phonepush.housekeeping")

#: Eviction goes on until the spool is this fraction of ``max_size``, so that it does not start
#: again at the next few events.
LOW_WATER: Final = 0.9
#: What one purge transaction may take, about; the batch size is halved above it, doubled well
#: below it.
TARGET_BATCH_SECONDS: Final = 0.004
_MIN_BATCH: Final = 1
_MAX_BATCH: Final = 2048
_FIRST_BATCH: Final = 64
_RETENTION_EVERY: Final = 60.0


class Housekeeper:
    """Runs :meth:`run` as a daemon task; :meth:`tidy` is one tick, for tests."""

    def __init__(
        self,
        spool: Store,
        *,
        retention: float,
        max_size: int | None,
        interval: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.retention = retention
        self.max_size = max_size
        self.interval = interval
        self._clock = clock
        #: Events per purge transaction now (adapted to :data:`TARGET_BATCH_SECONDS`).
        self.batch = _FIRST_BATCH
        #: The longest single purge transaction so far, in seconds (for benchmarks and logs).
        self.longest_batch = 0.0
        self._next_retention = 0.0
        self._failing = False
        #: Told ``spool.full`` after each size check (a cluster's leader tells the other
        #: instances, which do not check the size themselves).
        self.on_full: Callable[[bool], None] | None = None

    async def run(self) -> None:
        while True:
            try:
                await self.tidy()
            except SpoolError as exc:
                # The readiness probe and intake report a failing spool; say it once here.
                if not self._failing:
                    log.warning("housekeeping: %s", exc)
                self._failing = True
            else:
                self._failing = False
            await asyncio.sleep(self.interval)

    async def tidy(self) -> None:
        """One tick: enforce ``max_size``, and ``retention`` when a minute has passed."""
        now = time.monotonic()
        if now >= self._next_retention:
            self._next_retention = now + _RETENTION_EVERY
            before = self._clock() - self.retention
            removed = await self.purge(before)
            while True:
                limit = self.batch
                if await self.spool.events.purge_cooldowns(before, limit) < limit:
                    break
                await asyncio.sleep(0)
            if removed:
                log.info(
                    "purged %s older than %s",
                    counted(removed, "finished event"),
                    _days(self.retention),
                )
        await self.enforce_size()
        if self.max_size is not None and self.on_full is not None:
            self.on_full(self.spool.full)

    async def enforce_size(self) -> None:
        """Evict finished events while the spool is over ``max_size``; set ``spool.full`` when
        pending work alone keeps it over, clear it once it is under again."""
        limit = self.max_size
        if limit is None:
            return
        spool = self.spool
        live = await spool.live_bytes()
        if live <= limit:
            if spool.full:
                spool.full = False
                log.warning(
                    "spool %s back under spool.max_size (%d of %d bytes): taking events again",
                    spool.location,
                    live,
                    limit,
                )
            return
        target = int(limit * LOW_WATER)

        async def small_enough() -> bool:
            return await spool.live_bytes() <= target

        removed = await self.purge(math.inf, until=small_enough)
        live = await spool.live_bytes()
        if removed:
            log.info(
                "spool over spool.max_size (%d bytes): evicted the %s, now %d bytes",
                limit,
                "oldest finished event" if removed == 1 else f"{removed} oldest finished events",
                live,
            )
        if live > limit and not spool.full:
            spool.full = True
            log.warning(
                "spool %s: pending work alone is over spool.max_size (%d of %d bytes);"
                " refusing events until deliveries finish",
                spool.location,
                live,
                limit,
            )

    async def purge(self, before: float, until: Callable[[], Awaitable[bool]] | None = None) -> int:
        """Delete finished events received before ``before``, oldest first, in short batches,
        until none are left or ``until()`` says enough. Returns how many were deleted."""
        total = 0
        cursor = (-math.inf, 0)
        while True:
            limit = self.batch
            started = time.perf_counter()
            removed, cursor = await self.spool.events.purge_batch(before, limit, cursor)
            self._adapt(time.perf_counter() - started)
            total += removed
            if removed < limit or (until is not None and await until()):
                return total
            # Give the loop back: requests, intake and dispatch run between batches.
            await asyncio.sleep(0)

    def _adapt(self, elapsed: float) -> None:
        self.longest_batch = max(self.longest_batch, elapsed)
        if elapsed > TARGET_BATCH_SECONDS:
            self.batch = max(_MIN_BATCH, self.batch // 2)
        elif elapsed < TARGET_BATCH_SECONDS / 4:
            self.batch = min(_MAX_BATCH, self.batch * 2)


def _days(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:g} days" if days >= 1 else f"{seconds:g} s"
