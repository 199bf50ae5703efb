"""``phonepush silence add|list|expire``: the running daemon's silences, as ``amtool silence``.

``add MATCHER... --comment TEXT [--duration 1h] [--author NAME]`` creates a silence and prints
its id alone, so ``id=$(phonepush silence add ...)`` works. A matcher is ``name=value``,
``name!=value``, ``name=~regex`` or ``name!~regex`` (a regex matches the whole value, RE2
syntax), with ``name`` one of ``rule``, ``phone``, ``source``, ``topic`` or ``label.<path>``;
all matchers must hold. A value may be wrapped in double quotes, as amtool prints them. The
comment is required, as the API requires it (and amtool by default): whoever finds pages missing
reads why. ``--duration`` takes the config's durations (``30m``, ``2h``, ``1d``).

``list`` prints the silences in force or scheduled (``--json``: the API's list; ``-q``: the ids
alone, one a line). Ended silences are not listed: the daemon forgets a silence once it ends and
keeps only the log line of who made it and why.

``expire ID...`` ends each silence now and prints ``expired ID``.

All three talk to ``/api/silences`` on the daemon's ``server.listen`` address from ``--config``
(a wildcard address is reached on loopback, as ``fire`` and ``phones`` do), or on ``--url``, with
the configuration's ``webhook.token`` (read from ``token_file`` if set that way) as bearer token.
The token is never printed.

Exit status: 0 done; 1 the daemon did not do it (not reachable, token refused, unknown silence
id, any other error answer); 2 bad usage (invalid configuration, a bad matcher or duration, an
empty comment, or input the daemon refused as invalid).
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx

from phonepush.commands import CONFIG_EXIT, add_config_option, daemon_url, load_or_report
from phonepush.config import Config, parse_duration
from phonepush.silence.silences import Matcher

__all__ = ["FAILED", "USAGE", "main", "parse_matcher"]

#: The daemon did not do what was asked.
FAILED: Final = 1
#: The command line or the configuration is wrong.
USAGE: Final = CONFIG_EXIT

_MATCHER: Final = re.compile(r"(?P<name>[^=!~\s]+)(?P<op>=~|!~|!=|=)(?P<value>.*)", re.DOTALL)
_TIMEOUT: Final = 10.0


class _Failed(Exception):
    """One line for stderr, and the exit status."""

    def __init__(self, message: str, status: int = FAILED) -> None:
        super().__init__(message)
        self.status = status


def parse_matcher(text: str) -> dict[str, Any]:
    """``name=value``, ``name!=value``, ``name=~regex``, ``name!~regex`` -> the API's matcher
    object; ``ValueError`` says what is wrong (checked as the daemon checks it)."""
    found = _MATCHER.fullmatch(text)
    if found is None:
        raise ValueError("expected name=value, name!=value, name=~regex or name!~regex")
    value = found["value"]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    op = found["op"]
    matcher = {
        "name": found["name"],
        "value": value,
        "isRegex": op.endswith("~"),
        "isEqual": op.startswith("="),
    }
    Matcher.parse(matcher)
    return matcher


def _shown(matcher: dict[str, Any]) -> str:
    op = ("=" if matcher["isEqual"] else "!") + ("~" if matcher["isRegex"] else "=")
    op = "=" if op == "==" else op
    value = str(matcher["value"])
    if not value or any(c.isspace() for c in value):
        value = f'"{value}"'  # as parse_matcher reads it back
    return f"{matcher['name']}{op}{value}"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Add, list or expire silences in the running daemon (GET/POST/DELETE "
        "/api/silences with the configuration's webhook.token).",
        epilog="'phonepush silence COMMAND --help' for one command's options. Exit status: 0 "
        "done, 1 the daemon did not do it (not reachable, token refused, unknown id), 2 bad "
        "usage (configuration, matcher, duration).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_config_option(sub)
        sub.add_argument(
            "--url",
            metavar="URL",
            help="the daemon's address, such as http://10.0.0.5:8080 (default: server.listen)",
        )
        return sub

    add = command("add", "silence the pages that match every MATCHER; prints the new id")
    add.add_argument(
        "matchers",
        metavar="MATCHER",
        nargs="+",
        help="name=value, name!=value, name=~regex or name!~regex; name is rule, phone, "
        "source, topic or label.<path>",
    )
    add.add_argument("--comment", required=True, help="why (required; shown in list)")
    add.add_argument(
        "--duration", default="1h", help="how long, such as 30m, 2h, 1d (default: %(default)s)"
    )
    add.add_argument("--author", help="who (default: your user name)")

    listing = command("list", "list the silences in force or scheduled")
    shown = listing.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the API's JSON list")
    shown.add_argument("-q", "--quiet", action="store_true", help="print only the ids")

    expire = command("expire", "end silences now")
    expire.add_argument("ids", metavar="ID", nargs="+", help="a silence id (from list)")
    return parser


def main(argv: Sequence[str], prog: str = "phonepush silence") -> int:
    args = _parser(prog).parse_args(list(argv))
    config = load_or_report(args.config)
    if config is None:
        return CONFIG_EXIT
    name = f"{prog} {args.command}"
    try:
        api = _Api.of(config, args.config, args.url)
        if args.command == "add":
            return _add(api, args)
        if args.command == "list":
            return _list(api, json_out=args.json, quiet=args.quiet)
        return _expire(api, args.ids, name)
    except _Failed as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return exc.status


def _add(api: _Api, args: argparse.Namespace) -> int:
    matchers = []
    for text in args.matchers:
        try:
            matchers.append(parse_matcher(text))
        except ValueError as exc:
            raise _Failed(f"bad matcher {text!r}: {exc}", USAGE) from None
    try:
        duration = parse_duration(args.duration)
    except ValueError as exc:
        raise _Failed(f"bad --duration {args.duration!r}: {exc}", USAGE) from None
    if duration <= 0:
        raise _Failed(f"bad --duration {args.duration!r}: must be more than 0s", USAGE)
    if not args.comment.strip():
        raise _Failed("--comment: say why (it cannot be empty)", USAGE)
    author = args.author if args.author is not None else _user()
    body = {
        "matchers": matchers,
        "duration": args.duration,
        "comment": args.comment,
        "createdBy": author,
    }
    answer = api.request("POST", "/api/silences", json=body)
    if answer.status_code == 400:
        raise _Failed(f"the daemon refused the silence: {_error(answer)}", USAGE)
    api.expect(answer, 201)
    print(answer.json()["id"])
    return 0


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no $USER and no passwd entry (some containers)
        return "phonepush silence"


def _list(api: _Api, *, json_out: bool, quiet: bool) -> int:
    answer = api.request("GET", "/api/silences")
    api.expect(answer, 200)
    silences: list[dict[str, Any]] = answer.json()
    if json_out:
        print(json.dumps(silences, indent=2, ensure_ascii=False))
    elif quiet:
        for silence in silences:
            print(silence["id"])
    elif not silences:
        print("no silences in force or scheduled")
    else:
        print(table(silences))
    return 0


def _expire(api: _Api, ids: Sequence[str], name: str) -> int:
    status = 0
    for silence_id in ids:
        answer = api.request("DELETE", f"/api/silences/{_path_part(silence_id)}")
        if answer.status_code == 404:
            print(f"{name}: no silence {silence_id!r} in force or scheduled", file=sys.stderr)
            status = FAILED
            continue
        api.expect(answer, 200)
        print(f"expired {silence_id}")
    return status


def _path_part(text: str) -> str:
    # An id is a UUID; anything else must stay one path segment (and so becomes a 404).
    return quote(text, safe="")


def _when(text: str) -> str:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return text
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table(silences: Sequence[dict[str, Any]]) -> str:
    """``list``'s table, one silence a line (the API's objects in, ending soonest first)."""
    header = ("ID", "MATCHERS", "STARTS", "ENDS", "CREATED BY", "COMMENT")
    rows: list[tuple[str, ...]] = [header]
    for silence in silences:
        rows.append(
            (
                str(silence["id"]),
                " ".join(_shown(m) for m in silence["matchers"]),
                _when(str(silence["startsAt"])),
                _when(str(silence["endsAt"])),
                str(silence["createdBy"]),
                " ".join(str(silence["comment"]).split()),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _error(answer: httpx.Response) -> str:
    try:
        data = answer.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return f"HTTP {answer.status_code} {answer.text[:200]}".strip()


@dataclass(frozen=True)
class _Api:
    """The daemon's silences API at ``base``, with the token the configuration holds."""

    base: str
    token: str | None
    token_key: str
    config_path: Path

    @classmethod
    def of(cls, config: Config, path: Path, url: str | None) -> _Api:
        if url is not None:
            if not url.startswith(("http://", "https://")):
                raise _Failed(f"--url {url!r}: expected http://HOST:PORT or https://...", USAGE)
            base = url.rstrip("/")
        else:
            base = daemon_url(config)
        webhook = config.webhook
        key = "webhook.token"
        if webhook.token_file:
            key = f"webhook.token_file ({webhook.token_file})"
        token = webhook.token.get_secret_value() if webhook.token is not None else None
        return cls(base, token, key, path)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {} if self.token is None else {"Authorization": f"Bearer {self.token}"}
        try:
            with httpx.Client(timeout=_TIMEOUT, trust_env=False) as client:
                return client.request(method, self.base + path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            # The exception's text never holds the headers, so the token cannot leak here.
            reason = str(exc) or type(exc).__name__
            raise _Failed(f"cannot reach the daemon at {self.base}: {reason}") from None

    def expect(self, answer: httpx.Response, status: int) -> None:
        if answer.status_code == status:
            return
        where = f"the daemon at {self.base}"
        if answer.status_code == 401:
            if self.token is None:
                raise _Failed(
                    f"{where} wants a bearer token, and {self.config_path} sets no webhook.token"
                )
            raise _Failed(
                f"{where} refused the token (401): {self.token_key} in {self.config_path} is "
                "not the daemon's"
            )
        if answer.status_code == 403:
            raise _Failed(f"{where}: {_error(answer)}")
        raise _Failed(f"{where} answered {answer.status_code}: {_error(answer)}")
