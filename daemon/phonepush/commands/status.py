"""``phonepush status --config FILE [--limit N] [--all]``: the recent events and what became of
them.

Reads the spool file named in the configuration directly, read-only (SQLite's WAL lets a reader
in while the daemon writes), and prints one line per event, newest first: when it arrived, its
id, where it came from, the rules it matched and how many of its deliveries are in each state.
Only events with at least one delivery are listed unless ``--all``: a sensor that reports every
minute on a topic a rule listens to would otherwise hide the pages. Exit status 0, or 2 for a
bad configuration or a spool that cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Final

from phonepush.commands import CONFIG_EXIT, add_config_option, load_or_report
from phonepush.errors import SpoolError
from phonepush.store.records import DeliveryState
from phonepush.store.spool import read_recent

__all__ = ["STATE_ORDER", "main", "recent_events"]

#: The order delivery states are listed in.
STATE_ORDER: Final = tuple(s.value for s in DeliveryState)

Row = tuple[float, str, str, tuple[str, ...], dict[str, int]]


def recent_events(path: Path, limit: int, *, every: bool = True) -> list[Row]:
    """(received_at, id, source:topic, rules, {state: count}) of the ``limit`` newest events;
    with ``every=False``, of those with at least one delivery.

    Raises :class:`~phonepush.errors.SpoolError` when the file is missing or not a spool.
    """
    return [
        (e.received_at, e.id, f"{e.source}:{e.topic}", e.rules, dict(e.states))
        for e in read_recent(path, limit, every=every)
    ]


def _counts(counts: dict[str, int]) -> str:
    ordered = [s for s in STATE_ORDER if s in counts] + sorted(set(counts) - set(STATE_ORDER))
    return " ".join(f"{state}={counts[state]}" for state in ordered) or "-"


def _table(rows: Sequence[Row]) -> str:
    lines = [("TIME", "EVENT", "SOURCE", "RULES", "DELIVERIES")]
    for received_at, event_id, origin, rules, counts in rows:
        when = datetime.fromtimestamp(received_at).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        lines.append((when, event_id, origin, ",".join(rules) or "-", _counts(counts)))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:4], widths, strict=True))
        + "  "
        + line[4]
        for line in lines
    )


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
    args = parser.parse_args(list(argv))
    if args.limit < 1:
        parser.error("--limit must be at least 1")
    config = load_or_report(args.config)
    if config is None:
        return CONFIG_EXIT
    try:
        rows = recent_events(config.spool.path, args.limit, every=args.all)
    except SpoolError as exc:
        print(f"{config.spool.path}: cannot read the spool: {exc}", file=sys.stderr)
        return 2
    if not rows:
        if args.all:
            print(f"{config.spool.path}: no events")
        else:
            print(f"{config.spool.path}: no events with deliveries (--all lists every event)")
        return 0
    print(_table(rows))
    return 0
