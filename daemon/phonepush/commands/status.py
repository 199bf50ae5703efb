"""``phonepush status --config FILE [--limit N] [--all] [--json] [--follow]``: the recent events and
what became of them.

Reads the spool file named in the configuration directly, read-only (SQLite's WAL lets a reader
in while the daemon writes), and prints one line per event, newest first: when it arrived, its
id, where it came from, the rules it matched and how many of its deliveries are in each state.
Under an event, one indented line per delivery that did not reach its phone (suppressed, failed,
unconfirmed, expired) says which phone and why: ``  lobby  suppressed  silenced by <id>``. Only
events with at least one delivery are listed unless ``--all``: a sensor that reports every minute
on a topic a rule listens to would otherwise hide the pages.

``--json`` prints a JSON list instead, newest first, each event with its deliveries, in the field
names of ``GET /api/events/<id>`` (``event``, ``rule``, ``rules``, ``source``, ``topic``,
``received_at``, ``deliveries: [{"id", "rule", "phone", "state", "attempts", "error",
"created_at", "expires_at"}]``); a delivery's ``error`` is the reason it was suppressed or
failed.

``--follow`` (``-f``) prints the same, then keeps reading the spool every half second and prints
each new event and each change of a delivery's state (``pending -> delivered``) as it happens,
until Ctrl-C. With ``--json`` it prints one JSON object a line: each event when first seen and
again, whole, whenever one of its deliveries changes. It watches the newest
:data:`WATCHED` events; a change to an older one is not shown.

Exit status 0 (``--follow`` also when ended with Ctrl-C), or 2 for a bad configuration or a
spool that cannot be read (at the start, or while following).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TextIO

from phonepush.commands import CONFIG_EXIT, add_config_option, load_or_report
from phonepush.config import SpoolConfig
from phonepush.errors import SpoolError
from phonepush.store.reader import DeliveryStatus, EventActivity, SpoolReader
from phonepush.store.records import DeliveryState

__all__ = [
    "POLL_INTERVAL",
    "STATE_ORDER",
    "WATCHED",
    "Follower",
    "event_json",
    "main",
    "recent_events",
]

#: The order delivery states are listed in.
STATE_ORDER: Final = tuple(s.value for s in DeliveryState)
#: How often ``--follow`` reads the spool, in seconds.
POLL_INTERVAL: Final = 0.5
#: How many of the newest events ``--follow`` watches for changes.
WATCHED: Final = 500
#: Deliveries whose reason is shown: those that did not reach their phone.
_EXPLAINED: Final = frozenset(
    {
        DeliveryState.SUPPRESSED,
        DeliveryState.FAILED,
        DeliveryState.UNCONFIRMED,
        DeliveryState.EXPIRED,
    }
)

Row = tuple[float, str, str, tuple[str, ...], dict[str, int]]


def recent_events(path: Path, limit: int, *, every: bool = True) -> list[Row]:
    """(received_at, id, source:topic, rules, {state: count}) of the ``limit`` newest events;
    with ``every=False``, of those with at least one delivery.

    Raises :class:`~phonepush.errors.SpoolError` when the file is missing or not a spool.
    """
    with SpoolReader(path) as reader:
        return [_row(e) for e in reader.recent(limit, every=every)]


def _row(event: EventActivity) -> Row:
    return (event.received_at, event.id, f"{event.source}:{event.topic}", event.rules, event.states)


def event_json(event: EventActivity) -> dict[str, Any]:
    """An event as ``--json`` prints it (``GET /api/events/<id>``'s names where they meet)."""
    return {
        "event": event.id,
        "rule": event.rules[0] if event.rules else None,
        "rules": list(event.rules),
        "source": event.source,
        "topic": event.topic,
        "received_at": event.received_at,
        "deliveries": [
            {
                "id": d.id,
                "rule": d.rule,
                "phone": d.phone,
                "state": d.state,
                "attempts": d.attempts,
                "error": d.error,
                "created_at": d.created_at,
                "expires_at": d.expires_at,
            }
            for d in event.deliveries
        ],
    }


def _counts(counts: dict[str, int]) -> str:
    ordered = [s for s in STATE_ORDER if s in counts] + sorted(set(counts) - set(STATE_ORDER))
    return " ".join(f"{state}={counts[state]}" for state in ordered) or "-"


def _when(at: float) -> str:
    return datetime.fromtimestamp(at).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _cells(event: EventActivity) -> tuple[str, ...]:
    received_at, event_id, origin, rules, counts = _row(event)
    return (_when(received_at), event_id, origin, ",".join(rules) or "-", _counts(counts))


def _reasons(event: EventActivity) -> list[str]:
    """The indented lines under an event: each delivery that did not reach its phone, and why."""
    several = len({d.rule for d in event.deliveries}) > 1
    return [
        f"  {d.phone}  {d.state}  {d.error or '-'}" + (f"  (rule {d.rule})" if several else "")
        for d in event.deliveries
        if d.state in _EXPLAINED
    ]


def _table(events: Sequence[EventActivity]) -> str:
    lines: list[tuple[str, ...]] = [("TIME", "EVENT", "SOURCE", "RULES", "DELIVERIES")]
    lines.extend(_cells(event) for event in events)
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = []
    for index, line in enumerate(lines):
        out.append(
            "  ".join(cell.ljust(width) for cell, width in zip(line[:4], widths, strict=True))
            + "  "
            + line[4]
        )
        if index:
            out.extend(_reasons(events[index - 1]))
    return "\n".join(out)


def open_reader(spool: SpoolConfig) -> tuple[SpoolReader, str]:
    """A reader of the store ``[spool]`` names, and how to name that store in messages."""
    if not spool.url:
        return SpoolReader(spool.path), str(spool.path)
    try:
        from phonepush.store.postgres import PostgresReader, redact_url
    except ImportError as exc:
        raise SpoolError(
            f"PostgreSQL needs psycopg ({exc.name} is not installed):"
            " pip install 'phonepush[postgres]'"
        ) from None
    password = None if spool.password is None else spool.password.get_secret_value()
    return PostgresReader(spool.url, password=password), redact_url(spool.url)


def _empty(path: Path | str, every: bool) -> str:
    if every:
        return f"{path}: no events"
    return f"{path}: no events with deliveries (--all lists every event)"


def main(argv: Sequence[str], prog: str = "phonepush status") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Print the recent events in the spool and their deliveries."
    )
    add_config_option(parser)
    parser.add_argument(
        "--limit", "-n", type=int, default=20, help="how many events (default: %(default)s)"
    )
    parser.add_argument(
        "--all",
        "-a",
        action="store_true",
        help="also events that made no delivery (matched no rule, or no phone)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON (with --follow: one object a line)"
    )
    parser.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="then print new events and delivery changes as they happen, until Ctrl-C",
    )
    args = parser.parse_args(list(argv))
    if args.limit < 1:
        parser.error("--limit must be at least 1")
    config = load_or_report(args.config)
    if config is None:
        return CONFIG_EXIT
    path: Path | str = config.spool.url or config.spool.path
    try:
        opened, path = open_reader(config.spool)
        with opened as reader:
            events = reader.recent(args.limit, every=args.all)
            if args.follow:
                follower = Follower(reader, sys.stdout, every=args.all, json_lines=args.json)
                follower.start(events, _empty(path, args.all))
                follower.run(time.sleep)
                return 0
    except SpoolError as exc:
        print(f"{path}: cannot read the spool: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not args.follow:
            raise
        return 0  # Ctrl-C is how --follow ends
    if args.json:
        print(json.dumps([event_json(e) for e in events], indent=2, ensure_ascii=False))
    elif not events:
        print(_empty(path, args.all))
    else:
        print(_table(events))
    return 0


class Follower:
    """``--follow``: what was printed of each watched event, and what changed since."""

    def __init__(
        self,
        reader: SpoolReader,
        out: TextIO,
        *,
        every: bool,
        json_lines: bool,
        watched: int = WATCHED,
    ) -> None:
        self._reader = reader
        self._watched = watched
        self._out = out
        self._every = every
        self._json = json_lines
        #: event id -> delivery id -> (state, error) as last printed.
        self._seen: dict[str, dict[int, tuple[str, str]]] = {}
        self._floor = 0

    def start(self, events: Sequence[EventActivity], empty: str) -> None:
        """Print the current events (as the table, or one JSON object a line)."""
        if self._json:
            for event in events:
                self._print(json.dumps(event_json(event), ensure_ascii=False))
        else:
            self._print(_table(events) if events else empty)
        for event in events:
            self._remember(event)
        self._floor = min((e.seq for e in events), default=self._reader.last_seq() + 1)

    def run(self, sleep: Callable[[float], None]) -> None:
        """Poll until interrupted (KeyboardInterrupt) or the spool cannot be read (SpoolError)."""
        while True:
            sleep(POLL_INTERVAL)
            self.poll()

    def poll(self) -> None:
        """Print what is new or changed since the last poll."""
        window = self._reader.since(self._floor, self._watched)
        if len(window) == self._watched:
            # Older events leave the watch: a burst must not make every poll heavier.
            self._floor = window[0].seq
        for event in window:
            self._show(event)
        watched = {e.id for e in window}
        for gone in set(self._seen) - watched:
            del self._seen[gone]

    def _show(self, event: EventActivity) -> None:
        before = self._seen.get(event.id)
        if before is None:
            if not event.deliveries and not self._every:
                return
            if self._json:
                self._print(json.dumps(event_json(event), ensure_ascii=False))
            else:
                self._print("  ".join(_cells(event)))
                for line in _reasons(event):
                    self._print(line)
            self._remember(event)
            return
        changed = [d for d in event.deliveries if before.get(d.id) != (d.state, d.error)]
        if not changed:
            return
        if self._json:
            self._print(json.dumps(event_json(event), ensure_ascii=False))
        else:
            for line in self._changes(event, before, changed):
                self._print(line)
        self._remember(event)

    @staticmethod
    def _changes(
        event: EventActivity, before: dict[int, tuple[str, str]], changed: Iterable[DeliveryStatus]
    ) -> list[str]:
        now = _when(time.time())
        lines = []
        for d in changed:
            was = before.get(d.id)
            if was is None:
                move = f"new {d.state}"  # a repeat round, an escalation, a resolve
            elif was[0] == d.state:
                move = f"{d.state}, retrying"  # only the error changed: an attempt failed
            else:
                move = f"{was[0]} -> {d.state}"
            reason = f"  {d.error}" if d.error else ""
            lines.append(f"{now}  {event.id}  {d.phone}  {d.rule}  {move}{reason}")
        return lines

    def _remember(self, event: EventActivity) -> None:
        self._seen[event.id] = {d.id: (d.state, d.error) for d in event.deliveries}

    def _print(self, line: str) -> None:
        print(line, file=self._out, flush=True)
