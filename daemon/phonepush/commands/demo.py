"""``phonepush demo``: the whole daemon on embedded defaults, with simulated phones.

No broker, no phone, no config file: three simulated phones start in this process, the daemon
serves webhooks on 127.0.0.1:8080 (``--port``; when 8080 is taken and no port was asked for, a
free one, and it says so) with its spool in a temporary directory, a sample
doorbell event is fired through the real HTTP path, and what each phone received is printed.
Then it keeps running, printing each push the phones get, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from phonepush.config import Config, parse_config
from phonepush.console import PhoneScreen, ShownSoftKey
from phonepush.errors import ConfigError
from phonepush.logs import setup_logging
from phonepush.sim.http import FetchError
from phonepush.sim.phone import PageRefused
from phonepush.sim.simulator import Fleet, SimPhone

__all__ = ["FleetScreens", "demo_config", "main"]

DEFAULT_PORT = 8080
TOKEN = "demo-token"  # noqa: S105 - printed for the user to copy; loopback only
_PHONES = (("lobby", ["frontdesk"]), ("office", ["frontdesk", "it"]), ("server-room", ["it"]))


def demo_config(port: int, phones: Sequence[SimPhone], spool: Path) -> Config:
    """The demo's configuration: the example config's rules, pointed at simulated phones."""
    groups = dict(_PHONES)
    data: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{port}"},
        "spool": {"path": str(spool)},
        "webhook": {"token": TOKEN},
        "dispatch": {"retry_initial": "200ms", "retry_max": "5s"},
        "phones": [
            {"name": p.name, "host": p.address, "groups": groups.get(p.name, [])} for p in phones
        ],
        "rules": [
            {
                "name": "doorbell",
                "on": "webhook:doorbell",
                "when": "payload.action in ['single', 'double']",
                "to": ["frontdesk"],
                "execute": ["Play:Chime.raw", "Display:On:10"],
                "message": {
                    "title": "Doorbell",
                    "text": "Someone is at the {{ payload.door or 'front door' }}",
                },
                "cooldown": "2s",
                "ttl": "60s",
                # Ack and Close softkeys on the page: something to press in the console's
                # Screens view (an ack with no repeat just records who saw it).
                "ack": True,
            },
            {
                "name": "alerts",
                "on": "webhook:alertmanager",
                "when": "payload.status == 'firing'",
                "to": ["it"],
                "execute": ["Play:Alarm.raw"],
                "message": {
                    "title": "{{ payload.commonLabels.alertname }}",
                    "text": "{{ payload.commonAnnotations.summary }}",
                },
                "dedupe": "{{ payload.groupKey }}",
                "ttl": "5m",
            },
        ],
    }
    return parse_config(data, environ={})


class FleetScreens:
    """The console's :class:`~phonepush.console.Screens` over simulated phones: what each one
    shows, and its softkeys pressed as a person at the phone would."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def screens(self) -> list[PhoneScreen]:
        shown = []
        for phone in self._fleet.phones:
            screen = phone.state.screen
            shown.append(
                PhoneScreen(
                    phone.name,
                    screen.title,
                    screen.prompt,
                    screen.text,
                    tuple(ShownSoftKey(k.position, k.name) for k in screen.softkeys),
                )
            )
        return shown

    async def press(self, phone: str, position: int) -> str:
        try:
            await self._fleet.phone(phone).press(position=position)
        except KeyError:
            return f"no phone {phone!r}"
        except LookupError:
            return f"{phone} shows no softkey at position {position}"
        except (FetchError, PageRefused) as exc:
            return f"{phone}: the softkey's page failed: {exc}"
        return ""


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run phonepush with three simulated phones and fire a sample event.",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"daemon port (default {DEFAULT_PORT}, or a free one when that is taken)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="exit after the sample event instead of running until Ctrl-C",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    return parser


def _taken(port: int) -> bool:
    # Bound the way the daemon binds (SO_REUSEADDR), so a port in TIME_WAIT counts as free.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def main(argv: Sequence[str], prog: str = "phonepush demo") -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.port is not None and not 0 < args.port <= 65535:
        parser.error("--port must be 1-65535")
    port = DEFAULT_PORT if args.port is None else args.port
    if _taken(port):
        if args.port is not None:
            print(f"{prog}: port {port} is taken; choose another with --port", file=sys.stderr)
            return 1
        port = _free_port()
        print(f"{prog}: port {DEFAULT_PORT} is taken; using {port} (choose one with --port)")
    setup_logging(args.log_format, "warning")
    try:
        asyncio.run(_demo(port, once=args.once))
    except KeyboardInterrupt:
        pass
    except ConfigError:
        # Only the listen port can be wrong in the demo's own configuration: taken since the
        # check above.
        print(f"{prog}: port {port} is taken; choose another with --port", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0


def _show(phone: SimPhone) -> str:
    state = phone.state
    screen = state.screen
    parts = [f"  {phone.name:<12}"]
    if screen.title or screen.text:
        parts.append(f"screen [{screen.title}] {screen.text!r}")
    if state.last_tone:
        parts.append(f"tone {state.last_tone}")
    if state.backlight.minutes is not None:
        parts.append(f"backlight {state.backlight.state}:{state.backlight.minutes}")
    if len(parts) == 1:
        parts.append("(nothing: not a target of this rule)")
    return "  ".join(parts)


async def _demo(port: int, *, once: bool) -> None:
    # Imported late so that `phonepush --help` and the other commands stay light.
    from phonepush.app.daemon import Daemon

    names = [name for name, _ in _PHONES]

    def on_push(phone: SimPhone, record: dict[str, Any]) -> None:
        if ready.is_set():
            items = " ".join(i["url"] for i in record.get("items", [])) or record.get("xml", "")
            answer = record.get("answer", {}).get("status")
            print(f"[{phone.name}] pushed {items} -> HTTP {answer}", flush=True)

    ready = asyncio.Event()
    with tempfile.TemporaryDirectory(prefix="phonepush-demo-") as tmp:
        async with Fleet(len(names), names=names, tone_ms=300, on_push=on_push) as fleet:
            config = demo_config(port, fleet.phones, Path(tmp) / "spool.db")
            daemon = Daemon(
                config, handle_signals=True, drain_timeout=2, screens=FleetScreens(fleet)
            )
            task = asyncio.create_task(daemon.run(), name="daemon")
            await _until(daemon.ready, task)
            url = f"http://127.0.0.1:{port}"
            print(f"phonepush demo: daemon on {url}, spool in {tmp}")
            for phone in fleet.phones:
                groups = ", ".join(dict(_PHONES)[phone.name])
                print(f"  simulated phone {phone.name:<12} {phone.url}  groups: {groups}")
            print(f"  simulator control: {fleet.control_url}/phones")
            print(f"  console: {url}/ (sign in with the token {TOKEN}; Screens shows the phones)\n")

            sample = {"action": "single", "door": "front door"}
            print(f"Firing a sample doorbell event: POST {url}/hooks/doorbell {json.dumps(sample)}")
            async with httpx.AsyncClient() as client:
                answer = await client.post(
                    f"{url}/hooks/doorbell",
                    json=sample,
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
            print(f"  -> {answer.status_code} {answer.text}")
            running = daemon.running
            assert running is not None
            await running.dispatcher.wait_idle()
            print("\nWhat each phone received:")
            for phone in fleet.phones:
                print(_show(phone))
            another = json.dumps({"action": "double", "door": "back door"})
            curl = shlex.join(
                [
                    "curl",
                    "-X",
                    "POST",
                    f"{url}/hooks/doorbell",
                    "-H",
                    f"Authorization: Bearer {TOKEN}",
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    another,
                ]
            )
            print(f"\nSend another (a 2 s cooldown drops quick repeats):\n  {curl}")
            print(f"Metrics: curl {url}/metrics | grep ^phonepush_")
            if once:
                daemon.stop()
            else:
                print("Ctrl-C to stop.\n")
                ready.set()
            await task


async def _until(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Wait for ``event``, surfacing the daemon task's failure (e.g. the port is taken)."""
    waiter = asyncio.ensure_future(event.wait())
    done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
        raise OSError("the daemon stopped during start-up")
