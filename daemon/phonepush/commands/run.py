"""``phonepush run --config F``: the daemon in the foreground, logging to stdout."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from phonepush.app.limits import raise_open_files_limit
from phonepush.commands import (
    CONFIG_EXIT,
    add_config_option,
    load_or_report,
    report_config_error,
)
from phonepush.errors import ConfigError
from phonepush.logs import setup_logging

__all__ = ["main"]


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the phonepush daemon: MQTT and webhook events through rules to phones.",
    )
    add_config_option(parser)
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="log line format on stdout (default: [log] format, else text)",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        help="debug, info, warning or error (default: [log] level, else info)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, how long requests on the wire may finish (default 10)",
    )
    return parser


def main(argv: Sequence[str], prog: str = "phonepush run") -> int:
    args = _parser(prog).parse_args(argv)
    config = load_or_report(args.config)
    if config is None:
        return CONFIG_EXIT
    setup_logging(args.log_format or config.log.format, args.log_level or config.log.level)
    raise_open_files_limit()
    # Imported here so that a config error is reported without paying for the daemon's imports.
    from phonepush.app.daemon import Daemon

    daemon = Daemon(
        config, config_path=args.config, handle_signals=True, drain_timeout=args.drain_timeout
    )
    try:
        asyncio.run(daemon.run())
    except ConfigError as exc:
        report_config_error(args.config, exc)
        return CONFIG_EXIT
    return 0
