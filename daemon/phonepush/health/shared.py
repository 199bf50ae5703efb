"""The phones' health shared by the instances of one PostgreSQL store (``[spool] url``).

The leader alone probes the phones, and each instance sees only its own pushes: without sharing,
``/api/phones``, ``phonepush_phone_up``/``phonepush_phone_info`` and Home Assistant's
connectivity sensors would say something else on every instance behind a balancer. So every
instance writes what it learns to one table (:mod:`phonepush.store.health`), reads what the
others wrote, and merges it into its :class:`~phonepush.health.monitor.Health`.

Writes stay off the push path: :meth:`SharedHealth.changed` only notes the phone; the phones
noted are written together, one statement at most every :data:`WRITE_EVERY`. What is noted: a
probe's result (the leader's round then costs one statement a second for the phones it probed
in that second, not one per phone), a push that changed a phone's reachability or error, new
device information, a delivery's outcome (the last push ``/api/phones`` shows).

Reads every :data:`READ_EVERY`, of the rows written since the last read. The same read carries
the leader's last measure of the store's size to the others (``phonepush_spool_bytes``). A read
or write that fails is logged once, until one succeeds again; the phones noted meanwhile are
written then. Nothing here holds up deliveries or the daemon.

On SQLite there is none of this: one instance knows everything itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import Final, Protocol, TypeVar

from phonepush.errors import SpoolError
from phonepush.health.monitor import Health, PhoneHealth
from phonepush.store.health import PhoneRecord, Seen

__all__ = ["READ_EVERY", "WRITE_EVERY", "HealthStore", "SharedHealth", "record_of"]

log = logging.getLogger("phonepush.health")

#: Seconds between reads of what the other instances wrote. A read of nothing new is one short
#: indexed query; at 2 s a phone that goes down shows on every instance (and in Home Assistant)
#: within about 3 s of the instance that saw it, well inside the shortest ``[health] interval``
#: (1 s of probing plus the phone's timeout) an operator would notice, at one query per instance
#: every 2 s whatever the number of phones.
READ_EVERY: Final = 2.0
#: Writes are coalesced: at most one statement per this many seconds per instance, however many
#: phones changed and however many pushes finished.
WRITE_EVERY: Final = 1.0
#: Rows are read again from this long before the previous read's time: a row's ``updated_at`` is
#: taken by its statement, whose commit lands a moment later, possibly after a read that should
#: have found it. Reading a row twice changes nothing (the newer part wins).
_OVERLAP: Final = 5.0
#: A statement stuck on a connection lost mid-way must not hold the loop back for ever.
_TIMEOUT: Final = 10.0

T = TypeVar("T")


class _Failed(Enum):
    FAILED = "failed"


_FAILED: Final = _Failed.FAILED


class HealthStore(Protocol):
    """The shared table (:class:`phonepush.store.health.PostgresHealth`)."""

    async def write(self, records: Sequence[PhoneRecord]) -> None: ...

    async def read(self, after: float) -> Seen: ...

    async def publish_bytes(self) -> None: ...

    def heard_bytes(self, size: int) -> None: ...


def record_of(state: PhoneHealth) -> PhoneRecord:
    """What the table holds of ``state``."""
    info = state.info
    push = state.last_push
    return PhoneRecord(
        phone=state.name,
        host=state.host,
        reachable=state.reachable,
        since=state.since,
        checked_at=state.checked_at,
        error=state.error,
        model=info.model if info is not None else "",
        firmware=info.firmware if info is not None else "",
        mac=info.mac if info is not None else "",
        host_name=info.host_name if info is not None else "",
        info_at=state.info_at if info is not None else None,
        push_result=push[0] if push is not None else "",
        push_at=push[1] if push is not None else None,
    )


class SharedHealth:
    """Writes what ``health`` learns, merges what the others wrote; :meth:`load` once at start,
    then ``await run()`` as a task of the daemon's. ``leading`` says whether this instance leads
    the cluster (it then publishes the store's size instead of taking the leader's)."""

    def __init__(
        self,
        store: HealthStore,
        health: Health,
        *,
        leading: Callable[[], bool],
        read_every: float = READ_EVERY,
        write_every: float = WRITE_EVERY,
    ) -> None:
        self._store = store
        self._health = health
        self._leading = leading
        self._read_every = read_every
        self._write_every = write_every
        self._noted: set[str] = set()
        self._wake = asyncio.Event()
        self._after = -math.inf
        self._failing = False

    def changed(self, state: PhoneHealth) -> None:
        """Health's ``on_share``: ``state`` is written with the next batch."""
        self._noted.add(state.name)
        self._wake.set()

    def reread(self) -> None:
        """Read the whole table next time: a phone a reload added (or moved) is known to the
        other instances already, and its row may not be written again for a while."""
        self._after = -math.inf

    async def load(self) -> None:
        """Read the whole table once (at start, before serving): a new instance answers with
        what the others know from its first request."""
        await self._read()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._writes(), name="health:share")
            tg.create_task(self._reads(), name="health:merge")

    async def _writes(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()
            await asyncio.sleep(self._write_every)

    async def _reads(self) -> None:
        while True:
            await asyncio.sleep(self._read_every)
            await self._read()

    async def flush(self) -> None:
        """Write the phones noted since the last write, in one statement."""
        names, self._noted = self._noted, set()
        states = [s for s in map(self._health.get, sorted(names)) if s is not None]
        if not states:
            return
        records = [record_of(s) for s in states]
        if await self._attempt(lambda: self._store.write(records)) is not _FAILED:
            return
        # Written once the database answers again (with what is known then).
        self._noted.update(s.name for s in states)
        self._wake.set()

    async def _read(self) -> None:
        leading = self._leading()
        if leading and await self._attempt(self._store.publish_bytes) is _FAILED:
            return
        found = await self._attempt(lambda: self._store.read(self._after))
        if isinstance(found, _Failed):
            return
        self._after = found.now - _OVERLAP
        if not leading and found.live_bytes is not None:
            self._store.heard_bytes(found.live_bytes)
        self._health.merge(found.records)

    async def _attempt(self, work: Callable[[], Awaitable[T]]) -> T | _Failed:
        """``work()``'s result, or :data:`_FAILED` (logged once per outage)."""
        try:
            async with asyncio.timeout(_TIMEOUT):
                result = await work()
        except (SpoolError, TimeoutError) as exc:
            if not self._failing:
                log.warning(
                    "health: phone health not shared with the other instances: %s",
                    str(exc) or "timed out",
                )
            self._failing = True
            return _FAILED
        if self._failing:
            log.info("health: phone health shared with the other instances again")
        self._failing = False
        return result
