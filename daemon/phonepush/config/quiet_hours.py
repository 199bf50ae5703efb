"""Quiet hours as configured: daily time ranges in a named time zone, on some days.

Parsed here so a bad range fails loading with its key; :mod:`phonepush.silence` compiles them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["DAYS", "QuietHoursConfig", "parse_days", "parse_range", "parse_zone"]

#: Day names as ``days`` takes them; index = ``datetime.weekday()``.
DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE: Final = re.compile(r"([01][0-9]|2[0-4]):([0-5][0-9])-([01][0-9]|2[0-4]):([0-5][0-9])")


def _minutes(hours: str, minutes: str) -> int:
    value = int(hours) * 60 + int(minutes)
    if value > 24 * 60:
        raise ValueError("a time of day is 00:00-24:00")
    return value


def parse_range(text: str) -> tuple[int, int]:
    m = _RANGE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"expected HH:MM-HH:MM, got {text!r}")
    start, end = _minutes(m.group(1), m.group(2)), _minutes(m.group(3), m.group(4))
    if start == 24 * 60:
        raise ValueError(f"a range cannot start at 24:00: {text!r}")
    if start == end:
        raise ValueError(f"an empty range: {text!r} (a whole day is 00:00-24:00)")
    return start, end


def parse_days(values: Iterable[str]) -> frozenset[int]:
    days: set[int] = set()
    for value in values:
        first, sep, last = value.strip().lower().partition("-")
        if first not in DAYS or (sep and last not in DAYS):
            raise ValueError(
                f"expected day names {', '.join(DAYS)} or ranges like mon-fri: {value!r}"
            )
        start = DAYS.index(first)
        stop = DAYS.index(last) if sep else start
        # "fri-mon" wraps over the weekend.
        days.update((start + i) % 7 for i in range((stop - start) % 7 + 1))
    return frozenset(days)


def parse_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        # ValueError: a key zoneinfo refuses outright ("../etc/passwd", an absolute path).
        raise ValueError(
            f"unknown time zone {name!r} (an IANA name such as Europe/Berlin; on a system without"
            " /usr/share/zoneinfo install the tzdata package)"
        ) from exc


class QuietHoursConfig(BaseModel):
    """``quiet_hours`` of a rule or a phone:
    ``{ ranges = ["22:00-07:00"], days = ["mon-fri"], timezone = "Europe/Berlin" }``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ranges: list[str]
    days: list[str] = list(DAYS)
    timezone: str
    action: Literal["drop", "idle"] = "drop"

    @field_validator("ranges")
    @classmethod
    def _ranges(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one range such as 22:00-07:00")
        for text in value:
            parse_range(text)
        return value

    @field_validator("days")
    @classmethod
    def _days(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one day, or leave days out for every day")
        parse_days(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        parse_zone(value)
        return value
