"""``phonepush page``: a one-off spoken or recorded announcement on phones, without a config.

    phonepush page -h 10.1.2.3,10.1.2.4 --say "Evacuate the building" --volume 80
    phonepush page -h 10.1.2.3:8080 --file evacuate.wav --multicast 239.10.0.1:20480

Each phone is pushed ``RTPRx:<source>:<port>[:<volume>]`` (or ``RTPMRx:<group>:<port>...``), the
audio is streamed over RTP, then each phone is pushed ``RTPRx:Stop`` (see
:mod:`phonepush.audio.paging`). The connection options are ``phonepush send``'s (``-u``, ``-p`` or
``$PHONEPUSH_PASSWORD``, ``-c``, ``-t``) and apply to every phone. ``--source`` defaults to the
local address this machine uses to reach the first phone (found without sending anything).

Prints one line per phone (``HOST: listening`` or ``HOST: failed: REASON``), then what was
streamed; exits 0 when every phone listened and was stopped, else 1 (the phones that listened
still heard the page).
"""

from __future__ import annotations

import asyncio
import contextlib
import getopt
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from phonepush.audio.clips import Speech, announcement, load_file
from phonepush.audio.paging import (
    DEFAULT_PORT,
    PageReport,
    PageSettings,
    PageTarget,
    local_address_for,
    page,
)
from phonepush.commands.send import getopt_message
from phonepush.errors import PhoneError, PhonepushError
from phonepush.phone.client import DEFAULT_TIMEOUT, PhoneClient, PhoneTarget, parse_host
from phonepush.wire.uri import ExecuteItem

__all__ = ["main"]

PASSWORD_ENV: Final = "PHONEPUSH_PASSWORD"  # noqa: S105 - the name of a variable
_SHORT: Final = "h:t:u:p:c:H"
_LONG: Final = [
    "host=",
    "timeout=",
    "username=",
    "password=",
    "certificate=",
    "help",
    "say=",
    "file=",
    "voice=",
    "multicast=",
    "volume=",
    "port=",
    "source=",
    "repeat=",
    "chime=",
    "ttl=",
]

_HELP: Final = f"""\
Usage: {{prog}} -h HOST[,HOST...] (--say TEXT | --file FILE) [OPTIONS]
Speak or play an announcement on Cisco IP Phones over RTP.

  -h, --host HOST[:PORT][,...] phones (repeatable); RTP goes to each HOST's address
      --say TEXT               speak TEXT (text-to-speech with espeak-ng)
      --voice VOICE            espeak-ng voice for --say (default en)
      --file FILE              play a WAV file (PCM, any rate) or raw µ-law 8 kHz file
      --chime FILE             play FILE once before the announcement
      --repeat N               say or play the announcement N times (default 1)
      --volume N               phone speaker volume 0-100 (default: the phone's own)
      --multicast GROUP:PORT   one multicast stream (239.x) instead of one per phone
      --port PORT              port the phones listen on, even, 20480-32768 (default {DEFAULT_PORT})
      --source ADDR            address the stream comes from (default: the local address
                               used to reach the first phone)
      --ttl N                  multicast hops (default 1)
  -t, --timeout TIMEOUT        push timeout in seconds (default {DEFAULT_TIMEOUT:g})
  -u, --username USERNAME      authentication username
  -p, --password PASSWORD      authentication password (default: ${PASSWORD_ENV})
  -c, --certificate CERT-FILE  connect using SSL and verify using certificate
  -H, --help                   print this help and exit

Prints HOST: listening or HOST: failed: REASON per phone; exits 1 if any phone failed.
"""


class _Abort(Exception):
    """A message for stderr, and exit status 1."""


@dataclass
class _Options:
    hosts: list[tuple[str, int | None]] = field(default_factory=list)
    timeout: int = int(DEFAULT_TIMEOUT)
    username: str = ""
    password: str | None = None
    certificate: str | None = None
    help: bool = False
    say: str | None = None
    voice: str = "en"
    file: str | None = None
    chime: str | None = None
    repeat: int = 1
    volume: int | None = None
    multicast: tuple[str, int] | None = None
    port: int = DEFAULT_PORT
    source: str | None = None
    ttl: int = 1


def _integer(option: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise _Abort(f"Invalid {option}: {value}") from None
    if not low <= number <= high:
        raise _Abort(f"Invalid {option}: {value} (must be {low}-{high})")
    return number


def _parse(argv: Sequence[str], prog: str) -> _Options:
    try:
        pairs, arguments = getopt.gnu_getopt(list(argv), _SHORT, _LONG)
    except getopt.GetoptError as exc:
        raise _Abort(getopt_message(exc, prog)) from None
    options = _Options()
    for option, value in pairs:
        name = option.lstrip("-")
        if option in ("-h", "--host"):
            options.hosts += [parse_host(part) for part in value.split(",") if part]
        elif option in ("-t", "--timeout"):
            options.timeout = _integer("timeout", value, 1, 3600)
        elif option in ("-u", "--username"):
            options.username = value
        elif option in ("-p", "--password"):
            options.password = value
        elif option in ("-c", "--certificate"):
            options.certificate = value
        elif option in ("-H", "--help"):
            options.help = True
        elif name in ("say", "voice", "file", "chime", "source"):
            setattr(options, name, value)
        elif name == "repeat":
            options.repeat = _integer("repeat", value, 1, 100)
        elif name == "volume":
            options.volume = _integer("volume", value, 0, 100)
        elif name == "port":
            options.port = _integer("port", value, 1, 65535)
        elif name == "ttl":
            options.ttl = _integer("ttl", value, 0, 255)
        elif name == "multicast":
            group, _, port = value.rpartition(":")
            if not group:
                raise _Abort(f"Invalid multicast address: {value} (expected GROUP:PORT)")
            options.multicast = (group, _integer("multicast port", port, 1, 65535))
    if arguments:
        raise _Abort(f"Unexpected argument: {arguments[0]}. Try '{prog} --help'")
    return options


def _check(options: _Options) -> None:
    if not options.hosts:
        raise _Abort("No host specified")
    if (options.say is None) == (options.file is None):
        raise _Abort("Give exactly one of --say TEXT or --file FILE")


def _targets(options: _Options) -> list[tuple[PageTarget, PhoneTarget]]:
    password = options.password
    if password is None:
        password = os.environ.get(PASSWORD_ENV, "")
    pairs = []
    for host, port in options.hosts:
        name = host if port is None else f"{host}:{port}"
        phone = PhoneTarget(
            name=name,
            host=host,
            port=port,
            username=options.username,
            password=password,
            certificate=options.certificate or None,
            timeout=float(options.timeout),
        )
        pairs.append((PageTarget(name, host), phone))
    return pairs


async def _audio(options: _Options) -> bytes:
    if options.file is not None:
        body = await asyncio.to_thread(load_file, options.file)
    else:
        body = await Speech(voice=options.voice).render(options.say or "")
    chime = await asyncio.to_thread(load_file, options.chime) if options.chime else None
    return announcement(body, chime=chime, repeat=options.repeat)


async def _source(options: _Options, first_host: str) -> str:
    if options.source is not None:
        return options.source
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            first_host, None, family=socket.AF_INET, type=socket.SOCK_DGRAM
        )
    except OSError as exc:
        raise _Abort(f"Cannot resolve {first_host}: {exc.strerror or exc}") from exc
    return local_address_for(str(infos[0][4][0]), options.port)


async def _run(options: _Options) -> PageReport:
    pairs = _targets(options)
    audio = await _audio(options)
    settings = PageSettings(
        source=await _source(options, pairs[0][1].host),
        port=options.multicast[1] if options.multicast else options.port,
        multicast=options.multicast[0] if options.multicast else None,
        volume=options.volume,
        ttl=options.ttl,
    )
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, PhoneClient] = {}
        for target, phone in pairs:
            if target.name not in clients:
                clients[target.name] = await stack.enter_async_context(PhoneClient(phone))

        async def push(target: PageTarget, uri: str) -> None:
            items = await clients[target.name].execute([ExecuteItem(uri)])
            for item in items:
                if not item.ok:
                    raise PhoneError(
                        f"{item.url}: {item.data} (Status {item.status})", phone=target.name
                    )

        return await page([t for t, _ in pairs], audio, push=push, settings=settings)


def _lines(report: PageReport) -> tuple[list[str], list[str]]:
    out: list[str] = []
    err: list[str] = []
    for result in report.results:
        name = result.target.name
        if not result.started:
            err.append(f"{name}: failed: {result.error}")
            continue
        out.append(f"{name}: listening ({report.uri})")
        if not result.stopped:
            err.append(f"{name}: could not be stopped: {result.stop_error}")
    if report.error:
        err.append(f"Streaming failed: {report.error}")
    elif not report.started:
        err.append("No phone listened; nothing was streamed")
    if report.stream is not None:
        stream = report.stream
        phones = len(report.started)
        out.append(
            f"Streamed {stream.packets * 0.02:.2f} s ({stream.packets} packets) to "
            f"{phones} phone{'s' if phones != 1 else ''}"
            + (f"; {stream.send_errors} send errors" if stream.send_errors else "")
        )
    return out, err


def main(argv: Sequence[str], prog: str = "phonepush page") -> int:
    try:
        options = _parse(argv, prog)
        if options.help:
            print(_HELP.format(prog=prog))
            return 0
        _check(options)
        report = asyncio.run(_run(options))
    except (_Abort, PhonepushError) as exc:
        print(exc, file=sys.stderr)
        return 1
    out, err = _lines(report)
    for line in out:
        print(line)
    for line in err:
        print(line, file=sys.stderr)
    return 0 if report.ok else 1
