"""``phonepush simulate``: simulated Cisco phones to push to, for dry runs and tests."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phonepush.sim.phone import DEFAULT_PLAY_FILES
from phonepush.sim.simulator import MODELS, Fleet, SimPhone

__all__ = ["main"]

_ANSWER = re.compile(r'(?:Number|Status)="(\d+)"')
#: asyncio's "error while attempting to bind on address ('127.0.0.1', 8001): ..."
_BOUND_PORT = re.compile(r", (\d+)\)")
_PASSWORD_ENV = "PHONEPUSH_SIM_PASSWORD"  # noqa: S105 - the name of a variable


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Run simulated Cisco IP phones that answer CGI Execute pushes like real ones, "
            "with a control endpoint serving their state as JSON. Runs until Ctrl-C."
        ),
        epilog=f"The password may also come from the environment variable {_PASSWORD_ENV}.",
    )
    parser.add_argument(
        "--port", type=int, default=8001, help="port of the first phone (default 8001)"
    )
    parser.add_argument("--phones", type=int, default=1, help="how many phones (default 1)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--username", default="", help="HTTP Basic user the phones require")
    parser.add_argument("--password", default=None, help="HTTP Basic password")
    parser.add_argument(
        "--auth-url",
        default=None,
        help="authentication URL to ask (GET ?UserID=&Password=&devicename=; must say AUTHORIZED)",
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="time every push takes before the answer"
    )
    parser.add_argument(
        "--tone-ms", type=float, default=1000.0, help="how long Play: holds the answer (1000)"
    )
    parser.add_argument(
        "--answer-after",
        type=float,
        default=0.0,
        metavar="MS",
        help="execute, then answer this many ms later (a late phone; default 0)",
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="8800",
        help="phone family: 8800 (default), 7900 (TLS 1.0 only), multiplatform (200 text/html)",
    )
    parser.add_argument(
        "--play-file",
        action="append",
        default=[],
        metavar="NAME",
        help="a ring file the phones have besides the stock ones (Chime.raw, ...); repeatable",
    )
    parser.add_argument("--tls", action="store_true", help="HTTPS with a self-signed certificate")
    parser.add_argument(
        "--cert-dir",
        type=Path,
        default=None,
        help="where the certificate is kept (reused if present; default: a temporary dir)",
    )
    parser.add_argument(
        "--control-port", type=int, default=None, help="control port (default: after last phone)"
    )
    return parser


def _log_push(phone: SimPhone, record: dict[str, Any]) -> None:
    answer = record.get("answer", {})
    body = str(answer.get("body", ""))
    codes = _ANSWER.findall(body)
    if "CiscoIPPhoneError" in body:
        outcome = f"error {codes[0] if codes else '?'}"
    elif answer.get("status") != 200:
        outcome = f"HTTP {answer.get('status')}"
    else:
        outcome = "status " + ",".join(codes) if codes else "ok"
    what = " ".join(item["url"] for item in record.get("items", ())) or "-"
    user = record.get("user")
    stamp = time.strftime("%H:%M:%S", time.localtime(record["time"]))
    who = f" user={user}" if user else ""
    print(f"{stamp} {phone.name}{who} {what} -> {outcome}", flush=True)


async def _run(args: argparse.Namespace, password: str) -> None:
    fleet = Fleet(
        args.phones,
        host=args.host,
        port=args.port,
        control_port=args.control_port,
        username=args.username,
        password=password,
        auth_url=args.auth_url,
        delay_ms=args.delay_ms,
        tone_ms=args.tone_ms,
        answer_after_ms=args.answer_after,
        model=args.model,
        play_files=[*DEFAULT_PLAY_FILES, *args.play_file],
        tls=args.tls,
        cert_dir=args.cert_dir,
        on_push=_log_push,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with fleet:
        for phone in fleet.phones:
            print(f"{phone.name}  {phone.url}", flush=True)
        print(f"control  {fleet.control_url}/phones", flush=True)
        if fleet.certificate is not None:
            print(f"certificate  {fleet.certificate}", flush=True)
        await stop.wait()
    print("stopped", flush=True)


def _busy(args: argparse.Namespace, message: str) -> str:
    found = _BOUND_PORT.search(message)
    port = int(found.group(1)) if found else None
    last = args.port + args.phones - 1
    control = args.control_port if args.control_port is not None else last + 1
    if port is not None and port == control and args.control_port is not None:
        return f"port {port} is taken; choose another with --control-port"
    ports = f"{args.port}-{last}" if last > args.port else str(args.port)
    what = f"port {port}" if port is not None else "a port"
    # The phones take --port onwards and the control endpoint the port after them.
    return (
        f"{what} is taken (phones on {ports}, control on {control}); "
        "choose another with --port (or --control-port)"
    )


def main(argv: Sequence[str], prog: str = "phonepush simulate") -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.phones < 1:
        parser.error("--phones must be at least 1")
    if not 0 < args.port <= 65535:
        parser.error("--port must be 1-65535")
    if args.answer_after < 0:
        parser.error("--answer-after must be >= 0")
    password = args.password if args.password is not None else os.environ.get(_PASSWORD_ENV, "")
    if password and not args.username and not args.auth_url:
        parser.error("--password needs --username")
    try:
        asyncio.run(_run(args, password))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"{prog}: {_busy(args, str(exc))}", file=sys.stderr)
        else:
            print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0
