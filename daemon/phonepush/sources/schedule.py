"""The schedule source: ``[[schedules]]`` firings → events, through the intake like MQTT's.

Each firing is an :class:`~phonepush.events.Event` with source ``schedule``, topic the schedule's
name and a JSON payload (``name``, ``scheduled_at`` in the schedule's local time with its
offset, ``timezone``, ``timestamp``, ``made_up``). The schedule's own rule (listening on
``schedule:<name>``) pages it, so the spool, silences, quiet hours, metrics and ``/api/events``
treat it like any other event.

Once per firing, also with several daemons on one spool: before firing, a firing is claimed in
the store (:class:`~phonepush.store.interface.ScheduleRepository`, a compare-and-set on the
newest firing per schedule); the instance that loses the claim does nothing. A crash between the
claim and the event's commit loses that firing: a bell rung twice is worse than one missed.

Missed firings: at start, the newest firing due since the last one claimed is made up once if it
is at most ``catch_up`` old, otherwise skipped (logged at INFO with its time); older ones are
never made up. While running, a firing reached late (the host was suspended, the loop was held)
is made if it is at most ``catch_up`` or :data:`_GRACE` late, and skipped otherwise, the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

from phonepush.config import ScheduleConfig
from phonepush.config.timetable import Timetable
from phonepush.errors import PhonepushError, SpoolError, SpoolFull
from phonepush.events import Event
from phonepush.metrics import Metrics
from phonepush.store.interface import Store

__all__ = ["Clock", "Scheduler", "firing_event"]

log = logging.getLogger("phonepush.schedules")

#: How late the running loop may reach a firing and still make it (beyond ``catch_up``).
_GRACE: Final = 60.0
#: The longest sleep: the wall clock is looked at again at least this often, so a clock set
#: right (NTP stepping it) moves the next firing with it.
_MAX_SLEEP: Final = 300.0


@dataclass(frozen=True, slots=True)
class Clock:
    """Wall time and a way to wait: tests drive the scheduler through a clock of their own."""

    now: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep)


@dataclass(frozen=True, slots=True)
class _Entry:
    config: ScheduleConfig
    timetable: Timetable


def firing_event(schedule: ScheduleConfig, at: float, *, made_up: bool = False) -> Event:
    """The event of ``schedule``'s firing due at ``at``."""
    timetable = schedule.timetable
    payload = {
        "name": schedule.name,
        "scheduled_at": timetable.local(at).split(" ")[0],
        "timezone": schedule.timezone or "UTC",
        "timestamp": at,
        "made_up": made_up,
    }
    return Event("schedule", schedule.name, json.dumps(payload).encode())


class Scheduler:
    """Fires the configured schedules. ``async with`` it, then ``await run()`` as a task;
    :meth:`update` on a reload.

    ``accept`` is the intake (an async callable taking an event, committing it before it
    returns); ``store`` holds the newest firing claimed per schedule. A firing the intake
    refuses is logged and counted in ``phonepush_events_rejected_total{source="schedule"}``,
    not retried (the next firing is the retry).
    """

    def __init__(
        self,
        schedules: Sequence[ScheduleConfig],
        *,
        store: Store,
        accept: Callable[[Event], Awaitable[object]],
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._accept = accept
        self._clock = clock if clock is not None else Clock()
        self._entries: dict[str, _Entry] = {}
        #: Per schedule, the due time of the newest firing handled (made, skipped or lost to
        #: another instance); the next one is the first after it.
        self._last: dict[str, float] = {}
        self._woken = asyncio.Event()
        self._started = False
        self.update(schedules)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._entries.clear()

    def update(self, schedules: Sequence[ScheduleConfig]) -> None:
        """Take a (re)loaded configuration's schedules.

        A schedule whose timing is unchanged keeps its place; a new or changed one starts from
        now (nothing to make up). No firing can happen twice either way: claims only move on.
        """
        now = self._clock.now()
        entries: dict[str, _Entry] = {}
        for schedule in schedules:
            old = self._entries.get(schedule.name)
            timetable = schedule.timetable
            entries[schedule.name] = _Entry(schedule, timetable)
            if old is None or old.timetable != timetable:
                self._last[schedule.name] = now
        for name in set(self._last) - set(entries):
            del self._last[name]
        self._entries = entries
        self._woken.set()

    def upcoming(self, count: int = 3) -> dict[str, list[float]]:
        """The next ``count`` firings of each schedule, for tests and status."""
        out: dict[str, list[float]] = {}
        for name, entry in self._entries.items():
            at = self._last[name]
            times: list[float] = []
            for _ in range(count):
                at = entry.timetable.next_after(at)
                times.append(at)
            out[name] = times
        return out

    async def catch_up(self) -> None:
        """Make up what was missed while no daemon ran (once, within ``catch_up``)."""
        now = self._clock.now()
        for name, entry in list(self._entries.items()):
            try:
                stored = await self._store.schedules.last(name)
            except SpoolError as exc:
                log.error("schedule %s: cannot read its last firing: %s", name, exc)
                continue
            latest = entry.timetable.latest_at_or_before(now)
            if stored is not None and latest > stored:
                await self._due(entry, latest, now, entry.config.catch_up, made_up=True)
            self._last[name] = max(self._last.get(name, now), latest)

    async def run(self) -> None:
        """Catch up, then fire schedules as they fall due, until cancelled."""
        if not self._started:
            self._started = True
            await self.catch_up()
        while True:
            self._woken.clear()
            now = self._clock.now()
            for name, entry in list(self._entries.items()):
                if name not in self._entries:
                    continue  # removed by a reload while an earlier one fired
                if entry.timetable.next_after(self._last[name]) <= now:
                    latest = entry.timetable.latest_at_or_before(now)
                    self._last[name] = latest
                    await self._due(entry, latest, now, max(entry.config.catch_up, _GRACE))
            await self._wait(self._next_due())

    def _next_due(self) -> float | None:
        due = [e.timetable.next_after(self._last[n]) for n, e in self._entries.items()]
        return min(due) if due else None

    async def _wait(self, due: float | None) -> None:
        if self._woken.is_set():
            return
        waits: set[asyncio.Future[object]] = {asyncio.ensure_future(self._woken.wait())}
        if due is not None:
            delay = min(max(0.0, due - self._clock.now()), _MAX_SLEEP)
            waits.add(asyncio.ensure_future(self._clock.sleep(delay)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _due(
        self, entry: _Entry, at: float, now: float, window: float, *, made_up: bool = False
    ) -> None:
        name = entry.config.name
        when = entry.timetable.local(at)
        if now - at > window:
            log.info(
                "schedule %s: the firing due at %s was missed (%.0f s ago, catch_up %.0f s):"
                " skipped",
                name,
                when,
                now - at,
                entry.config.catch_up,
            )
            return
        try:
            if not await self._store.schedules.claim(name, at, now):
                log.debug("schedule %s: the firing due at %s was made elsewhere", name, when)
                return
            await self._accept(firing_event(entry.config, at, made_up=made_up))
        except PhonepushError as exc:  # the spool failing or full: the task keeps running
            log.error("schedule %s: the firing due at %s was not paged: %s", name, when, exc)
            if self._metrics is not None:
                reason = (
                    "spool_full"
                    if isinstance(exc, SpoolFull)
                    else "spool_error"
                    if isinstance(exc, SpoolError)
                    else "error"
                )
                self._metrics.events_rejected.labels("schedule", reason).inc()
            return
        log.info("schedule %s: fired for %s%s", name, when, " (made up)" if made_up else "")
