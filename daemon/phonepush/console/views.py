"""What each console view shows, read from the health monitor, the spool, the rule book and the
silences; plain data for the templates (no HTTP here)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from phonepush.rules.book import RuleBook
from phonepush.store.interface import Store
from phonepush.store.records import EventRecord

__all__ = [
    "EVENTS_SHOWN",
    "EventRow",
    "RuleRow",
    "TimelineEntry",
    "ago",
    "event_rows",
    "groups_of",
    "local_time",
    "parse_matchers",
    "rule_rows",
    "timeline",
    "until",
]

#: Events the events view lists at most (newest first, after filtering).
EVENTS_SHOWN: Final = 50
#: How many of the newest events the filters look through.
_EVENTS_SCANNED: Final = 500


def local_time(at: float | None, now: float | None = None) -> str:
    """``at`` as a local time: the time alone today, with the date otherwise."""
    if at is None:
        return "never"
    moment = datetime.fromtimestamp(at).astimezone()
    today = datetime.fromtimestamp(time.time() if now is None else now).astimezone()
    if moment.date() == today.date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M")


def ago(at: float | None, now: float | None = None) -> str:
    """How long ago ``at`` was, in the largest unit that fits."""
    if at is None:
        return ""
    seconds = max(0, int((time.time() if now is None else now) - at))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def until(at: float | None, now: float | None = None) -> str:
    """How long until ``at``, in the largest unit that fits."""
    if at is None:
        return ""
    seconds = max(0, int(at - (time.time() if now is None else now)))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"in {seconds // size} {unit}"
    return f"in {seconds} s"


def groups_of(phones: Iterable[Mapping[str, Any]]) -> list[str]:
    """The group names the phones have, sorted."""
    return sorted({group for phone in phones for group in phone.get("groups", ())})


@dataclass(frozen=True, slots=True)
class DeliveryCell:
    phone: str
    rule: str
    state: str
    reason: str


@dataclass(frozen=True, slots=True)
class EventRow:
    id: str
    received_at: float
    source: str
    topic: str
    rules: tuple[str, ...]
    deliveries: tuple[DeliveryCell, ...]


def _row(record: EventRecord) -> EventRow:
    return EventRow(
        record.id,
        record.received_at,
        record.source,
        record.topic,
        record.rules,
        tuple(
            # ``error`` is the reason: a suppressed delivery's cooldown, silence or quiet
            # hours, a failed one's error text, a pending one's last failed attempt.
            DeliveryCell(d.phone, d.rule, d.state, d.error)
            for d in record.deliveries
        ),
    )


async def event_rows(spool: Store, *, rule: str = "", state: str = "") -> list[EventRow]:
    """The newest events, those of ``rule`` and with a delivery in ``state`` when given."""
    rows = []
    for record in await spool.events.recent(_EVENTS_SCANNED if rule or state else EVENTS_SHOWN):
        if rule and rule not in record.rules:
            continue
        if state and not any(d.state == state for d in record.deliveries):
            continue
        rows.append(_row(record))
        if len(rows) == EVENTS_SHOWN:
            break
    return rows


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    at: float | None
    kind: str
    text: str


_PUSHED: Final = {"delivered": "pushed to", "acknowledged": "pushed to", "unconfirmed": "pushed to"}
_ROUND_WORDS: Final = {
    "repeat": "repeated",
    "escalation": "escalated",
    "resolved": "resolve notice",
}


def timeline(status: Mapping[str, Any]) -> list[TimelineEntry]:
    """One event's story from the status API's answer for it (``http.api.event_status``):
    accepted, pushed (or held back, and why), acknowledged, repeated, resolved, actions."""
    rules = ", ".join(status["rules"]) or "no rule"
    entries = [
        TimelineEntry(
            status["received_at"],
            "accepted",
            f"accepted from {status['source']} {status['topic']}; matched {rules}",
        )
    ]
    for d in status["deliveries"]:
        state, phone, kind = d["state"], d["phone"], d["kind"]
        word = _ROUND_WORDS.get(kind)
        if word is not None:
            round_part = f" (round {d['round']})" if d["round"] else ""
            text = f"{word}{round_part} to {phone}: {state}"
            entry_kind = "repeated" if kind != "resolved" else "resolved"
        elif state in _PUSHED:
            text, entry_kind = f"pushed to {phone} ({d['rule']}): {state}", "pushed"
        elif state == "pending":
            text, entry_kind = f"queued for {phone} ({d['rule']}), not pushed yet", "pending"
        else:
            text, entry_kind = f"{state} for {phone} ({d['rule']})", state
        if d["error"]:
            text += f" — {d['error']}"
        entries.append(TimelineEntry(d["created_at"], entry_kind, text))
        if d.get("acknowledged_at") is not None:
            who = f" from {d['acknowledged_from']}" if d.get("acknowledged_from") else ""
            entries.append(
                TimelineEntry(d["acknowledged_at"], "acknowledged", f"acknowledged on {phone}{who}")
            )
    for alert in status["alerts"]:
        if alert["ended_at"] is not None and alert["state"] == "resolved":
            by = f" by {alert['ended_by']}" if alert["ended_by"] else ""
            entries.append(
                TimelineEntry(alert["ended_at"], "resolved", f"{alert['rule']} resolved{by}")
            )
    for press in status["actions"]:
        error = f" — {press['error']}" if press["error"] else ""
        entries.append(
            TimelineEntry(
                press["at"],
                "action",
                f"{press['action']} pressed on {press['phone']}: {press['result']}{error}",
            )
        )
    return sorted(entries, key=lambda e: (e.at is None, e.at or 0.0))


@dataclass(slots=True)
class RuleRow:
    name: str
    trigger: str
    targets: tuple[str, ...]
    last_matched: float | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def rule_rows(book: RuleBook, spool: Store) -> list[RuleRow]:
    """Every configured rule with its trigger, phones, and its deliveries in the spool by
    state (the newest one's time is when it last matched)."""
    rows = {
        rule.name: RuleRow(rule.name, f"{rule.source}:{rule.pattern}", rule.phones)
        for rule in book.rules
    }
    for name, state, count, newest in await spool.deliveries.by_rule():
        row = rows.get(name)
        if row is None:
            continue
        row.counts[state] = row.counts.get(state, 0) + count
        if row.last_matched is None or newest > row.last_matched:
            row.last_matched = newest
    return list(rows.values())


#: (operator, isEqual, isRegex), the two-character ones first.
_OPERATORS: Final = (
    ("!~", False, True),
    ("=~", True, True),
    ("!=", False, False),
    ("=", True, False),
)


def parse_matchers(text: str) -> list[dict[str, Any]]:
    """Matchers typed one a line as amtool takes them: ``name=value``, ``name!=value``,
    ``name=~regex``, ``name!~regex``; ``ValueError`` names the line that is wrong."""
    matchers = []
    lines: Sequence[str] = [line.strip() for line in text.splitlines()]
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        for operator, is_equal, is_regex in _OPERATORS:
            name, found, value = line.partition(operator)
            if found and name.strip():
                matchers.append(
                    {
                        "name": name.strip(),
                        "value": value.strip().strip('"'),
                        "isEqual": is_equal,
                        "isRegex": is_regex,
                    }
                )
                break
        else:
            raise ValueError(
                f"matchers, line {number}: expected name=value, name!=value, name=~regex "
                f"or name!~regex, got {line[:64]!r}"
            )
    return matchers
