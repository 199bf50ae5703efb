"""``phonepush phones [--config FILE] [--probe] [--json]``: the configured phones and their health.

Without ``--probe`` it asks the running daemon (``GET /api/phones`` on its listen address, with
the webhook token, as ``fire`` reaches its webhooks); when no daemon answers it lists the
configured phones, their health unknown. With ``--probe`` it probes every phone itself, as the
daemon's health check does (``GET /DeviceInformationX``, else a TCP connect), at most 64 at once
and over at most ``dispatch.max_connections`` connections; no daemon is needed. Exit 0, or 2 for
a bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from phonepush.commands import CONFIG_EXIT, add_config_option, bearer, daemon_url, load_or_report
from phonepush.config import Config
from phonepush.health.monitor import Health
from phonepush.metrics import Metrics
from phonepush.phone.lanes import DEFAULT_MAX_CONNECTIONS, PhoneLanes

__all__ = ["configured", "from_daemon", "main", "probe_phones", "table"]


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="List the configured phones: reachable or not, model, last push."
    )
    add_config_option(parser)
    parser.add_argument(
        "--probe", action="store_true", help="probe every phone now (no daemon needed)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON, as GET /api/phones")
    return parser


def main(argv: Sequence[str], prog: str = "phonepush phones") -> int:
    args = _parser(prog).parse_args(list(argv))
    config = load_or_report(args.config)
    if config is None:
        return CONFIG_EXIT
    phones: list[dict[str, Any]] | None
    if args.probe:
        phones = asyncio.run(probe_phones(config))
    else:
        phones = asyncio.run(from_daemon(config))
        if phones is None:
            print(
                "phones: no daemon answered; listing the configuration (--probe to check them)",
                file=sys.stderr,
            )
            phones = configured(config)
    if args.json:
        print(json.dumps(phones, indent=2))
    else:
        print(table(phones))
    return 0


async def probe_phones(config: Config) -> list[dict[str, Any]]:
    """Probe every configured phone once, as the daemon's health check does; its
    ``/api/phones`` entries, each with the ``error`` that made a phone unreachable."""
    max_connections = config.dispatch.max_connections or DEFAULT_MAX_CONNECTIONS
    with _quiet_health_log():
        async with PhoneLanes(config.phone_targets(), max_connections=max_connections) as lanes:
            health = Health(config, lanes, metrics=Metrics(CollectorRegistry()))
            await health.probe_all()
            return health.phones()


@contextlib.contextmanager
def _quiet_health_log() -> Iterator[None]:
    # The monitor warns when a phone turns unreachable, which the daemon's log needs; here the
    # command prints that very fact as its own output, and logging's last-resort handler would
    # repeat it on stderr. Errors still get through.
    logger = logging.getLogger("phonepush.health")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


async def from_daemon(config: Config) -> list[dict[str, Any]] | None:
    """The running daemon's ``GET /api/phones``; None when none answers there."""
    url = f"{daemon_url(config)}/api/phones"
    headers = bearer(config)
    try:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            answer = await client.get(url, headers=headers)
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        print(f"phones: GET {url} -> {answer.status_code} {answer.text[:200]}", file=sys.stderr)
        return None
    phones: list[dict[str, Any]] = answer.json()
    return phones


def configured(config: Config) -> list[dict[str, Any]]:
    """The configured phones in ``/api/phones``'s shape, nothing known of their health."""
    return [
        {
            "name": phone.name,
            "host": phone.host,
            "groups": list(phone.groups),
            "reachable": None,
            "since": None,
            "model": "",
            "firmware": "",
            "mac": "",
            "last_push": None,
            "pending": 0,
            "error": "",
        }
        for phone in config.phones
    ]


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table(phones: Sequence[dict[str, Any]]) -> str:
    """One line per phone; an unreachable one's reason on the line after it."""
    header = (
        "NAME",
        "HOST",
        "GROUPS",
        "STATE",
        "SINCE",
        "MODEL",
        "FIRMWARE",
        "LAST PUSH",
        "PENDING",
    )
    rows: list[tuple[str, ...]] = [header]
    reasons: dict[int, str] = {}
    for phone in phones:
        reachable = phone.get("reachable")
        state = "up" if reachable is True else "down" if reachable is False else "?"
        last = phone.get("last_push")
        pushed = f"{last['result']} {_when(last['at'])}" if last else "-"
        rows.append(
            (
                str(phone["name"]),
                str(phone["host"]),
                ",".join(phone.get("groups", [])) or "-",
                state,
                _when(phone.get("since")),
                phone.get("model") or "-",
                phone.get("firmware") or "-",
                pushed,
                str(phone.get("pending", 0)),
            )
        )
        if reachable is False and phone.get("error"):
            reasons[len(rows) - 1] = str(phone["error"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines: list[str] = []
    for index, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if index in reasons:
            lines.append(f"  {reasons[index]}")
    return "\n".join(lines)
