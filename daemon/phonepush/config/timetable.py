"""When a ``[[schedules]]`` entry fires: a cron expression in a time zone, or a fixed interval.

Parsed here so a bad expression fails loading with its key; the scheduler
(:mod:`phonepush.sources.schedule`) and ``phonepush check`` ask a :class:`Timetable` for firings.

Cron expressions are read by cronsim (the parser healthchecks.io runs), evaluated in local time
of the schedule's zone. Across a DST change that means cronsim's rules: a time the clock skips
(02:30 on a spring-forward night in Europe/Berlin) fires once at the moment the clock jumps
(03:00 local); a time the clock passes twice (01:30 on a fall-back night in America/New_York)
fires once, at its first occurrence, unless the hour field is a wildcard or a step (``*/30 * *
* *`` fires in both hours: they are different half-hours). ``every`` counts in real seconds from
the Unix epoch, so every instance and every restart agree on the firing times (``every = "1h"``
fires on the hour, UTC), and DST does not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Final
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

__all__ = ["Timetable", "parse_cron"]

#: A cron iteration never takes longer than this many candidates to pass a given time (cronsim
#: returns firings in order; the guard only matters for a fold where it goes back an hour).
_GUARD: Final = 8


def parse_cron(expr: str) -> str:
    """``expr`` if cronsim reads it; ValueError saying why otherwise."""
    try:
        CronSim(expr, datetime(2000, 1, 1, tzinfo=ZoneInfo("UTC")))
    except CronSimError as exc:
        raise ValueError(f"not a cron expression ({exc}): {expr!r}") from None
    if len(expr.split()) != 5:
        # cronsim also takes a seconds field; firings are whole minutes here.
        raise ValueError(f"expected 5 fields (minute hour day month weekday): {expr!r}")
    return expr


@dataclass(frozen=True, slots=True)
class Timetable:
    """The firing times of one schedule, as Unix timestamps."""

    cron: str | None = None
    zone: ZoneInfo | None = None
    every: float | None = None

    def next_after(self, at: float) -> float:
        """The first firing strictly after ``at``."""
        if self.every is not None:
            return (math.floor(at / self.every) + 1) * self.every
        assert self.cron is not None and self.zone is not None
        start = datetime.fromtimestamp(at, self.zone)
        for _, when in zip(range(_GUARD), CronSim(self.cron, start), strict=False):
            if when.timestamp() > at:
                return when.timestamp()
        # Unreachable for a valid expression; a year on is a safe answer nonetheless.
        return at + 366 * 86400.0

    def latest_at_or_before(self, at: float) -> float:
        """The last firing at or before ``at``."""
        if self.every is not None:
            return math.floor(at / self.every) * self.every
        assert self.cron is not None and self.zone is not None
        # cronsim's reverse iteration starts before its start time: start a second later so a
        # firing exactly at ``at`` counts.
        start = datetime.fromtimestamp(math.floor(at) + 1, self.zone)
        latest = at - 366 * 86400.0
        for _, when in zip(range(_GUARD), CronSim(self.cron, start, reverse=True), strict=False):
            if when.timestamp() <= at:
                latest = when.timestamp()
                break
        # Reverse iteration reads local times, so inside a repeated (fall-back) hour it can step
        # over a firing of the first pass: walk forward from what it found.
        for _ in range(_GUARD):
            following = self.next_after(latest)
            if following > at:
                break
            latest = following
        return latest

    def upcoming(self, at: float, count: int) -> list[datetime]:
        """The next ``count`` firings after ``at``, in the schedule's zone (UTC for ``every``)."""
        zone = self.zone or ZoneInfo("UTC")
        out: list[datetime] = []
        for _ in range(count):
            at = self.next_after(at)
            out.append(datetime.fromtimestamp(at, zone))
        return out

    def local(self, at: float) -> str:
        """``at`` as the schedule's local time with its zone, for logs and payloads."""
        zone = self.zone or ZoneInfo("UTC")
        when = datetime.fromtimestamp(at, zone)
        return f"{when.isoformat()} {when.tzname()}"
