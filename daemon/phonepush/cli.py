"""``phonepush COMMAND ...``: finds the command's module and hands it the rest of the line.

Each command lives in ``phonepush.commands.<name>`` with ``main(argv, prog) -> int``; modules are
imported on use, so ``phonepush send`` does not pay for the daemon's imports.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from phonepush import __version__

__all__ = ["COMMANDS", "main"]

#: command -> (module, one-line summary). Module ``send`` serves send, background and ringtone.
COMMANDS: dict[str, tuple[str, str]] = {
    "send": ("send", "push up to 3 CGI Execute URLs to a phone (like cgiexecute)"),
    "background": ("send", "push a setBackground (icon and image URLs) to a phone"),
    "ringtone": ("send", "push a setRingTone URL to a phone"),
    "simulate": ("simulate", "run simulated phones for tests and dry runs"),
    "run": ("run", "run the daemon"),
    "check": ("check", "validate a config file and print a summary"),
    "config-schema": ("config_schema", "print the config file's JSON Schema or reference page"),
    "fire": ("fire", "show what an event would do, or inject it"),
    "demo": ("demo", "run the daemon on embedded defaults with simulated phones"),
    "page": ("page", "speak or play an announcement on phones over RTP"),
    "status": ("status", "list the recent events in the spool and their deliveries"),
    "phones": ("phones", "list the phones: reachable or not, model, firmware, last push"),
    "silence": ("silence", "add, list or expire silences in the running daemon"),
    "migrate": ("migrate", "copy an SQLite spool into an empty PostgreSQL database"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "Usage: phonepush COMMAND [ARGS]...",
        "Turn MQTT and webhook events into pushes to Cisco IP phones.",
        "",
        "Commands:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()),
        "",
        "  phonepush COMMAND --help   help for one command",
        "  phonepush --version        print the version",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("--help", "-H", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"phonepush {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(
            f"Unknown command: {name}. Try 'phonepush --help' for more information", file=sys.stderr
        )
        return 2
    module = importlib.import_module(f"phonepush.commands.{COMMANDS[name][0]}")
    try:
        result: int = module.main(rest, prog=f"phonepush {name}")
    except BrokenPipeError:
        # `phonepush check ... | head`: the reader left; say nothing more, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result
