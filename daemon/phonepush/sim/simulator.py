"""Simulated Cisco IP phones: our test partner, a dry-run target, and the benchmarks' phone fleet.

A :class:`Fleet` runs N :class:`SimPhone` s, each listening on its own port and answering
``POST /CGI/Execute`` the way a phone does (see ``/work/shared/cisco-notes.md`` for the facts),
plus a control endpoint serving every phone's state as JSON and taking fault modes, models and
softkey presses. HTTP is hand-written on raw asyncio (:mod:`phonepush.sim.http`) so one core
serves thousands of pushes a second.

The phone is an independent model: what it reads and writes (the pushed objects, the URI
grammar, its tables of ``Key:``/``SoftKey:``/``Init:`` names and ``Play:`` files, fetched pages,
its answers) lives in :mod:`phonepush.sim.phone`, written from the phone's side of the notes and
importing nothing from phonepush's client (``uri``, ``cisco``), so the client cannot pass its
tests by agreeing with itself. The choices behind that grammar are in that module's docstring.

Choices where real phones vary or the notes leave room:

* **Authentication.** With ``username``/``password`` the phone checks HTTP Basic itself; with
  ``auth_url`` it asks that URL instead (GET with ``UserID``, ``Password``, ``devicename``) and
  accepts only a 200 whose body is exactly ``AUTHORIZED``; an unreachable auth server denies. A
  push without an ``Authorization`` header is denied without asking. Basic credentials are
  decoded as UTF-8, the one encoding phonepush uses everywhere; a header that is not valid
  UTF-8 (a Latin-1 client's non-ASCII password) is denied. Denial is
  ``CiscoIPPhoneError Number="4"`` with HTTP **200** (phones vary between 200 and 401; clients
  must accept both, and 200 is the case that needs the body parsed).
* **One push at a time.** A phone is busy from the moment a push is received until its answer
  is written, or would have been had the client hung up (the phone finishes what it began). A
  push that arrives meanwhile is answered ``CiscoIPPhoneError Number="6"`` at once, executes
  nothing, and is counted in ``overlaps``. (What real firmware does with a concurrent push is
  not documented; refusing it makes a client that overlaps pushes visible in tests.)
* **Execution log.** ``executed`` lists every ExecuteItem URI the phone carried out, in the order
  it did (a ``Play:`` when its tone starts; failed items are not listed), so tests can count
  how often an action really happened.
* **Late answers.** ``answer_after_ms`` (or the fault mode ``answer-after`` with ``delay_ms``)
  makes the phone execute, then answer that much later; the phone stays busy meanwhile, and an
  answer the client gave up on is lost while the execution stands.
* **Models.** ``8800`` (the default) is described here. ``multiplatform`` (3PCC firmware)
  executes the same way but answers neither Cisco object: ``200 text/html`` with a short page
  on success, 400 for a request it cannot parse, 401 (``WWW-Authenticate``) for bad
  credentials and 503 while busy. ``7900`` speaks only TLS 1.0 when the fleet serves HTTPS (at
  OpenSSL security level 0, which a client must allow too) and fetches as a CP-7965 (298x168
  screen); its text limits are modelled as the 8800's, which the notes give for both. The
  model can be changed per phone at run time (the TLS versions stay the fleet's).
* **Transport quirks.** A chunked upload gets HTTP 404 (a phone's web server does that), ``Expect:
  100-continue`` gets error 6, a POST without ``Content-Length`` gets HTTP 411. All three close the
  connection. Other paths: 404; other methods on ``/CGI/Execute``: 405. Bodies that are not
  ``application/x-www-form-urlencoded`` with a field named exactly ``XML`` get error 1. The XML
  is at most 512 bytes and holds at most 3 items; an object the phone cannot read is error 1,
  one it reads but cannot act on error 2 (details in :mod:`phonepush.sim.phone`).
* **Items** run in request order. A URI outside the grammar is ``Status="1" Data="Invalid
  URI"``; a ``Play:`` file the phone does not have (``play_files``, by default
  :data:`~phonepush.sim.phone.DEFAULT_PLAY_FILES`) is ``Status="6" Data="URI not found"``.
  ``Play:<file>`` starts a tone and its ResponseItem comes when the tone ends (``tone_ms``), so
  the answer is held and lists the Play after items that finished meanwhile: completion order,
  as phones do. ``Play:Stop`` ends a tone at once. While a tone plays, the phone is busy: an
  http item with Priority 2 ("only if idle") is dropped and answered ``Status="6" Data="Phone
  busy"``; Priority 1 ("when idle") runs after the tone. Otherwise the phone is idle (one push
  at a time never sees another push's tone).
* **Fetches.** ``http(s)`` items are fetched with a phone's headers; a CiscoIPPhoneText answer is
  shown on the screen. Failure to fetch (refused, timeout, HTTP error) is ``Status="6"
  Data="URI not found"``; an answer that is not a valid CiscoIPPhoneText is ``Status="6"
  Data="Parse error"`` and leaves the screen as it was.
* **Internal URIs** change the state a test reads: ``Dial:``/``EditDial:``/``SendDigits:`` add
  their digits to ``dialled``; ``Key:``, ``SoftKey:`` and ``Init:`` are listed in ``keys``
  (``SoftKey:Exit`` also clears the screen); ``Display:`` sets the backlight.
* **setBackground / setRingTone** set state and answer a CiscoIPPhoneResponse with one Success
  item whose URL is the image (background) or the ring tone URL.
* **Counters.** ``pushes`` counts requests to ``POST /CGI/Execute``; ``errors`` counts those not
  answered with success (a CiscoIPPhoneResponse, or a multiplatform phone's 200): error objects,
  HTTP errors, fault answers, busy answers.
* **Reset** clears a phone's state, its fault mode and its model (back to the fleet's), and
  closes its RTP listener.
* **RTP reception.** ``RTPRx:<source>:<port>[:<volume>]`` makes the phone listen for RTP on its
  *own* address and ``port`` (unicast; ``source`` is where the stream is said to come from: it is
  recorded, and ``from_source`` says whether the packets came from it; none are dropped);
  ``RTPMRx:<group>:<port>[:<volume>]`` joins ``group`` on the interface of the phone's own
  address. Each phone can have its own loopback address (``Fleet(hosts=[...])``), so several
  phones listen on the same port as on a LAN. Phones of one fleet that share an address (the
  default: all on 127.0.0.1) share one socket for a unicast port instead, and each hears every
  packet that arrives on it: a pager sends phones on one address one copy, and each phone hears
  it, as if each had its own address. A new RTPRx/RTPMRx replaces the listener (the old
  one is closed first, so the same port can be taken again); ``RTPRx:Stop`` and ``RTPMRx:Stop``
  both close it. What arrives is checked by :class:`phonepush.audio.rtp.RtpReceiver` (payload type
  0, 160-byte payloads, sequence and timestamp continuity, RFC 3550 jitter) and the audio's
  duration and level kept; the state's ``rtp`` object shows the current (or last) stream and a
  ``history`` of finished ones. A port that cannot be taken (in use outside the fleet, or an
  address the phone cannot bind) is answered ``Status="6" Data="RTP port unavailable"`` and
  leaves the phone not listening. ``Fleet(rtp=False)`` only records the URIs (for tests that
  run receivers of their own on the phones' ports). ``RTPTx``/``RTPMTx`` are only recorded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import shutil
import socket
import ssl
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import unquote_plus, urlencode
from xml.sax.saxutils import escape as xml_escape

from phonepush.audio.rtp import ReceiveStats, RtpReceiver
from phonepush.errors import AudioError
from phonepush.sim.http import FetchError, HTTPServerProtocol, Request, Response, http_get
from phonepush.sim.phone import (
    DEFAULT_PLAY_FILES,
    Background,
    DialUri,
    DisplayUri,
    Execute,
    FetchUri,
    Item,
    KeyUri,
    ObjectRefused,
    PageRefused,
    PlayUri,
    Result,
    RtpUri,
    SoftKey,
    error_body,
    form_field,
    html_body,
    read_object,
    read_page,
    read_uri,
    response_body,
    ring_files,
)

__all__ = [
    "FAULT_MODES",
    "MAX_RTP_HISTORY",
    "MODELS",
    "PHONE_HEADERS",
    "Backlight",
    "Fault",
    "Fleet",
    "PhoneState",
    "PushLog",
    "Screen",
    "SimPhone",
    "SoftKey",
]

logger = logging.getLogger("phonepush.simulator")

FAULT_MODES: Final = (
    "none",
    "refuse",
    "hang",
    "slow",
    "http500",
    "http401",
    "garbage",
    "error",
    "flap",
    "answer-after",
)
#: Phone families the simulator models (see the module docstring).
MODELS: Final = ("7900", "8800", "multiplatform")
#: What a CP-8841 sends when it fetches a page.
PHONE_HEADERS: Final = {
    "x-CiscoIPPhoneModelName": "CP-8841",
    "x-CiscoIPPhoneDisplay": "800,480,24,C",
    "Accept": "x-CiscoIPPhone/*",
    "User-Agent": "Allegro-Software-WebClient/4.34",
}
#: What each model sends when it fetches a page or asks the authentication URL.
MODEL_HEADERS: Final = {
    "8800": PHONE_HEADERS,
    "7900": {
        **PHONE_HEADERS,
        "x-CiscoIPPhoneModelName": "CP-7965",
        "x-CiscoIPPhoneDisplay": "298,168,16,C",
    },
    "multiplatform": {**PHONE_HEADERS, "x-CiscoIPPhoneModelName": "CP-8841-3PCC"},
}
#: What each model's ``GET /DeviceInformationX`` says (modelNumber, appLoadID, versionID);
#: multiplatform firmware has no such page (404).
DEVICE_INFORMATION: Final = {
    "8800": ("CP-8841", "sip88xx.14-2-1-0001-14", "14.2(1)"),
    "7900": ("CP-7965G", "SCCP45.9-4-2SR4-3S", "9.4(2SR4.3)"),
}
_DEVICE_INFORMATION_PATH: Final = "/DeviceInformationX"
MAX_RECORDS: Final = 1000
#: Finished RTP receptions a phone remembers.
MAX_RTP_HISTORY: Final = 100
_EXECUTE_PATH: Final = "/CGI/Execute"
_FORM: Final = "application/x-www-form-urlencoded"
_INTERESTING: Final = (
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "expect",
    "connection",
    "user-agent",
)
_GARBAGE: Final = b"\x00\xff<<<this is not XML\x1b[0m&&&\xfe"
_CERT_FILE: Final = "phone-cert.pem"
_KEY_FILE: Final = "phone-key.pem"

#: Called after each answered push with the phone and the request's record (CLI logging).
PushLog = Callable[["SimPhone", dict[str, Any]], None]


@dataclass
class Fault:
    """A phone's fault mode. ``number`` is for ``error``; ``delay_ms`` for ``slow`` (extra delay
    before executing), ``answer-after`` (the answer comes this long after executing) and ``flap``
    (time up and time down, default 1000 ms)."""

    mode: str = "none"
    number: int = 6
    delay_ms: float = 0

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "number": self.number, "delay_ms": self.delay_ms}


@dataclass
class Screen:
    title: str = ""
    prompt: str = ""
    text: str = ""
    softkeys: list[SoftKey] = field(default_factory=list)
    #: The URL the page came from.
    url: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "prompt": self.prompt,
            "text": self.text,
            "softkeys": [
                {"name": k.name, "url": k.url, "position": k.position} for k in self.softkeys
            ],
            "url": self.url,
        }


@dataclass
class Backlight:
    state: str = "Default"
    minutes: int | None = None


def _capped() -> deque[Any]:
    return deque(maxlen=MAX_RECORDS)


@dataclass
class PhoneState:
    """What a phone did, for tests to assert on; lists keep the last :data:`MAX_RECORDS`."""

    screen: Screen = field(default_factory=Screen)
    backlight: Backlight = field(default_factory=Backlight)
    #: The last tone played (``Play:Stop`` is listed in ``tones`` but is not a tone).
    last_tone: str | None = None
    tones: deque[str] = field(default_factory=_capped)
    dialled: deque[str] = field(default_factory=_capped)
    keys: deque[str] = field(default_factory=_capped)
    background: dict[str, str] | None = None
    ringtone: str | None = None
    rtp: dict[str, str | None] = field(default_factory=lambda: {"receive": None, "transmit": None})
    #: Finished RTP receptions (oldest first), as in the state JSON's ``rtp.history``.
    rtp_streams: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=MAX_RTP_HISTORY)
    )
    presses: deque[dict[str, Any]] = field(default_factory=_capped)
    pushes: int = 0
    errors: int = 0
    #: Pushes that arrived while the phone was serving another (answered error 6 at once).
    overlaps: int = 0
    #: Every ExecuteItem URI the phone carried out, in the order it did.
    executed: deque[str] = field(default_factory=_capped)
    requests: deque[dict[str, Any]] = field(default_factory=_capped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "screen": self.screen.to_dict(),
            "backlight": {"state": self.backlight.state, "minutes": self.backlight.minutes},
            "last_tone": self.last_tone,
            "tones": list(self.tones),
            "dialled": list(self.dialled),
            "keys": list(self.keys),
            "background": self.background,
            "ringtone": self.ringtone,
            "rtp": dict(self.rtp),
            "presses": list(self.presses),
            "pushes": self.pushes,
            "errors": self.errors,
            "overlaps": self.overlaps,
            "executed": list(self.executed),
            "requests": list(self.requests),
        }


@dataclass(frozen=True, slots=True)
class _Settings:
    username: str
    password: str
    auth_url: str | None
    delay_ms: float
    tone_ms: float
    fetch_timeout: float
    answer_after_ms: float
    model: str
    play_files: frozenset[str]
    fetch_ssl: ssl.SSLContext | None
    rtp: bool = True


class _UnicastShare(asyncio.DatagramProtocol):
    """One bound socket for ``(host, port)`` and the receivers of the phones listening on it."""

    def __init__(self) -> None:
        self.receivers: list[RtpReceiver] = []
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        for receiver in list(self.receivers):
            # The receiver's own socket is never opened: it checks what this one hands it.
            receiver._datagram(data, addr)


class RtpPorts:
    """The unicast RTP sockets of one fleet's phones, shared by phones on one address.

    Real phones each have an address, so each gets its own copy of a stream; simulated phones
    often share 127.0.0.1, where only one socket can have a port. One socket per address and
    port, handing every packet to each phone listening there, makes a page to several of them
    work as it does on a LAN.
    """

    def __init__(self) -> None:
        self._shares: dict[tuple[str, int], _UnicastShare] = {}

    async def listen(self, receiver: RtpReceiver) -> None:
        """Start handing ``receiver`` what arrives on its host and port (binding on first use);
        :class:`AudioError` if the port cannot be taken."""
        key = (receiver.host, receiver.port)
        share = self._shares.get(key)
        if share is None:
            # Bound before any await: phones told at once to listen must find the one socket.
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind(key)
            except OSError as exc:
                sock.close()
                where = f"{receiver.host}:{receiver.port}"
                raise AudioError(
                    f"Cannot listen for RTP on {where}: {exc.strerror or exc}"
                ) from exc
            sock.setblocking(False)
            created = _UnicastShare()
            self._shares[key] = share = created
            share.receivers.append(receiver)
            loop = asyncio.get_running_loop()
            try:
                await loop.create_datagram_endpoint(lambda: created, sock=sock)
            except OSError as exc:
                self._shares.pop(key, None)
                sock.close()
                raise AudioError(f"Cannot listen for RTP: {exc.strerror or exc}") from exc
            return
        share.receivers.append(receiver)

    async def leave(self, receiver: RtpReceiver) -> None:
        """Stop handing ``receiver`` packets; the last phone to leave closes the socket."""
        key = (receiver.host, receiver.port)
        share = self._shares.get(key)
        if share is None or receiver not in share.receivers:
            return
        share.receivers.remove(receiver)
        if not share.receivers:
            del self._shares[key]
            if share.transport is not None:
                share.transport.close()


@dataclass(frozen=True, slots=True)
class _Reception:
    """An RTP listener opened by ``RTPRx``/``RTPMRx``: what the phone was told, and its
    receiver."""

    uri: str
    multicast: bool
    address: str  # the phone's own address (unicast) or the group (multicast)
    port: int
    source: str | None  # unicast: the address the stream is announced from
    volume: int | None
    started_at: float
    receiver: RtpReceiver

    def describe(
        self, *, active: bool, stopped_at: float | None = None, ended_by: str | None = None
    ) -> dict[str, Any]:
        stats = self.receiver.stats
        sender = stats.sender
        data: dict[str, Any] = {
            "active": active,
            "uri": self.uri,
            "mode": "multicast" if self.multicast else "unicast",
            "address": self.address,
            "port": self.port,
            "source": self.source,
            "volume": self.volume,
            "started_at": self.started_at,
            "stopped_at": stopped_at,
            "ended_by": ended_by,
            "clean": stats.clean,
            "from_source": (None if self.multicast or sender is None else sender[0] == self.source),
        }
        data.update(_stats_dict(stats))
        return data


def _stats_dict(stats: ReceiveStats) -> dict[str, Any]:
    data = stats.to_dict()
    # Arrival times are monotonic-clock readings, meaningless outside this process: say how
    # long packets kept arriving instead.
    del data["first_arrival"], data["last_arrival"]
    first, last = stats.first_arrival, stats.last_arrival
    data["receiving_s"] = round(last - first, 3) if first is not None and last is not None else 0.0
    return data


def _idle_rtp() -> dict[str, Any]:
    data: dict[str, Any] = {
        "active": False,
        "uri": None,
        "mode": None,
        "address": None,
        "port": None,
        "source": None,
        "volume": None,
        "started_at": None,
        "stopped_at": None,
        "ended_by": None,
        "clean": True,
        "from_source": None,
    }
    data.update(_stats_dict(ReceiveStats()))
    return data


class _Tone:
    """The tone a push is playing: its item, and when it ends."""

    def __init__(self, url: str, ends_at: float) -> None:
        self.url = url
        self.ends_at = ends_at


class SimPhone:
    """One simulated phone. Create through :class:`Fleet`; use ``state``, ``set_fault``,
    ``press`` and ``reset`` from tests."""

    def __init__(
        self,
        index: int,
        name: str,
        host: str,
        port: int,
        settings: _Settings,
        *,
        server_ssl: ssl.SSLContext | None = None,
        on_push: PushLog | None = None,
        clock: Callable[[], float] = time.time,
        rtp_ports: RtpPorts | None = None,
    ) -> None:
        self.index = index
        self.name = name
        self.host = host
        self.port = port
        self.state = PhoneState()
        self.fault = Fault()
        self._settings = settings
        self._server_ssl = server_ssl
        self._on_push = on_push
        self._clock = clock
        self._server: asyncio.Server | None = None
        self._connections: set[HTTPServerProtocol] = set()
        self.model = settings.model
        # Set from the moment a push is received until its answer is written (or would have
        # been, had the client not hung up): a real phone's single worker.
        self._busy = False
        self._work: set[asyncio.Task[Response | None]] = set()
        self._flapper: asyncio.Task[None] | None = None
        self._running = False
        self._reception: _Reception | None = None
        self._rtp_ports = rtp_ports if rtp_ports is not None else RtpPorts()

    def use_tls(self, context: ssl.SSLContext) -> None:
        """Serve HTTPS with ``context`` from the next start on."""
        self._server_ssl = context

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        scheme = "https" if self._server_ssl else "http"
        return f"{scheme}://{self.address}{_EXECUTE_PATH}"

    def to_dict(self, *, requests: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "index": self.index,
            "host": self.host,
            "port": self.port,
            "url": self.url,
            "model": self.model,
            "fault": self.fault.to_dict(),
        }
        data.update(self.state.to_dict())
        data["rtp"] = self.rtp_status()
        if not requests:
            data["requests"] = []
        return data

    def rtp_status(self) -> dict[str, Any]:
        """The state JSON's ``rtp``: the URIs last accepted (``receive``, ``transmit``), the
        current stream's reception (or the last one's, with ``active`` false) and ``history``,
        the finished receptions, oldest first."""
        state = self.state
        if self._reception is not None:
            current = self._reception.describe(active=True)
        elif state.rtp_streams:
            current = dict(state.rtp_streams[-1])
        else:
            current = _idle_rtp()
        return {
            "receive": state.rtp.get("receive"),
            "transmit": state.rtp.get("transmit"),
            **current,
            "history": list(state.rtp_streams),
        }

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._running = True
        await self._listen()

    async def stop(self) -> None:
        self._running = False
        await self._cancel_flapper()
        await self._unlisten()
        for task in list(self._work):
            task.cancel()
        for task in list(self._work):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._rtp_stop("shutdown")

    async def _listen(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HTTPServerProtocol(self._handle, self._connections),
            self.host,
            self.port,
            ssl=self._server_ssl,
            reuse_address=True,
            backlog=1024,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # Open keep-alive connections would otherwise keep answering a "refusing" phone.
        for connection in list(self._connections):
            connection.abort()
        if server is not None:
            await server.wait_closed()

    async def _cancel_flapper(self) -> None:
        task, self._flapper = self._flapper, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- faults and control -------------------------------------------------------------------

    async def set_fault(self, mode: str, *, number: int = 6, delay_ms: float = 0) -> None:
        """Set the fault mode (one of :data:`FAULT_MODES`); ``"none"`` heals the phone."""
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {', '.join(FAULT_MODES)}")
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        await self._cancel_flapper()
        self.fault = Fault(mode, number, delay_ms)
        if mode == "refuse":
            await self._unlisten()
        elif mode == "flap":
            period = (delay_ms or 1000) / 1000
            self._flapper = asyncio.get_running_loop().create_task(self._flap(period))
        elif self._running:
            await self._listen()

    async def _flap(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            await self._unlisten()
            await asyncio.sleep(period)
            await self._listen()

    def set_model(self, model: str) -> None:
        """Answer as a phone of ``model`` (one of :data:`MODELS`) from the next push on. The TLS
        versions a 7900 speaks are the fleet's, set when it starts."""
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; one of {', '.join(MODELS)}")
        self.model = model

    async def reset(self) -> None:
        """Forget everything the phone did and heal any fault."""
        await self.set_fault("none")
        self.model = self._settings.model
        await self._rtp_stop("reset")
        self.state = PhoneState()

    async def press(self, *, position: int | None = None, name: str | None = None) -> Screen:
        """Press a softkey of the current screen, by position or name, like a person would.

        An http(s) softkey URL is fetched and its CiscoIPPhoneText shown; ``SoftKey:Exit`` clears
        the screen; ``Dial:`` dials (``dialled``); other internal URIs are recorded in ``keys``.
        Raises :class:`LookupError` if no such softkey is shown,
        :class:`~phonepush.sim.http.FetchError` if the fetch fails and
        :class:`~phonepush.sim.phone.PageRefused` if what it fetched is no page.
        """
        key = next(
            (
                k
                for k in self.state.screen.softkeys
                if (position is not None and k.position == position)
                or (name is not None and k.name == name)
            ),
            None,
        )
        if key is None:
            raise LookupError(f"no softkey {position if position is not None else name!r} shown")
        record: dict[str, Any] = {
            "time": self._clock(),
            "name": key.name,
            "position": key.position,
            "url": key.url,
        }
        self.state.presses.append(record)
        uri = read_uri(key.url)
        if isinstance(uri, FetchUri):
            record["result"] = "fetched"
            screen = await self._fetch_screen(key.url)
            self.state.screen = screen
        elif key.url == "SoftKey:Exit":
            record["result"] = "exit"
            self.state.screen = Screen()
        elif isinstance(uri, DialUri):
            # A Dial: softkey (an action that calls someone): the phone dials, as pushed.
            record["result"] = "dialled"
            self.state.dialled.append(uri.digits)
        else:
            record["result"] = "key"
            self.state.keys.append(key.url)
        return self.state.screen

    # --- serving pushes -----------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response | None:
        # The phone's work goes on when the client hangs up (the connection's task is then
        # cancelled): a phone that has begun executing finishes, and stays busy until it would
        # have answered.
        task = asyncio.get_running_loop().create_task(self._serve(request))
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return await asyncio.shield(task)

    async def _serve(self, request: Request) -> Response | None:
        record: dict[str, Any] = {
            "time": self._clock(),
            "method": request.method,
            "path": request.target,
            "headers": {k: request.headers[k] for k in _INTERESTING if k in request.headers},
            "authorization": "authorization" in request.headers,
            "user": _basic_user(request.headers.get("authorization")),
            "xml": None,
            "items": [],
        }
        self.state.requests.append(record)
        is_push = request.path == _EXECUTE_PATH and request.method == "POST"
        if is_push:
            self.state.pushes += 1
        response = await self._answer(request, record)
        if response is None:
            record["answer"] = {"status": None, "fault": "hang"}
            return None
        if is_push and not response.success:
            self.state.errors += 1
        record["answer"] = {
            "status": response.status,
            "content_type": response.content_type,
            "body": response.body.decode("utf-8", "replace"),
        }
        if is_push and self._on_push is not None:
            self._on_push(self, record)
        return response

    async def _answer(self, request: Request, record: dict[str, Any]) -> Response | None:
        fault = self.fault.mode
        if fault == "hang":
            return None
        if fault == "http500":
            return Response(500, b"Internal Server Error\n", "text/plain")
        if fault == "http401":
            return Response(
                401,
                error_body(4, "Authentication error"),
                "text/xml",
                headers=(_CHALLENGE,),
            )
        if fault == "garbage":
            return Response(200, _GARBAGE, "text/xml")
        if fault == "error":
            return _error(self.fault.number, "simulated fault")
        if request.path == _DEVICE_INFORMATION_PATH and request.method == "GET":
            return self._device_information()
        if request.path != _EXECUTE_PATH:
            return Response(404, b"Not Found\n", "text/plain")
        if request.method != "POST":
            return Response(
                405, b"Method Not Allowed\n", "text/plain", headers=(("Allow", "POST"),)
            )
        if request.chunked:
            return Response(404, b"Not Found\n", "text/plain", close=True)
        if request.expect_continue:
            return _error(6, "Expect: 100-continue is not supported", close=True)
        if not request.has_length:
            return Response(411, b"Length Required\n", "text/plain", close=True)
        if self._busy:
            self.state.overlaps += 1
            return self._busy_answer()
        self._busy = True
        try:
            response = await self._push(request, record)
            answer_after = (
                self.fault.delay_ms
                if self.fault.mode == "answer-after"
                else self._settings.answer_after_ms
            )
            if answer_after > 0:
                await asyncio.sleep(answer_after / 1000)
            return response
        finally:
            self._busy = False

    def _device_information(self) -> Response:
        described = DEVICE_INFORMATION.get(self.model)
        if described is None:
            return Response(404, b"Not Found\n", "text/plain")
        model, load, version = described
        # SEP + MAC is how a phone names itself; other names get a MAC made from their index.
        mac = self.name[3:] if self.name.startswith("SEP") else f"0000AA{self.index + 1:06X}"
        fields = {
            "MACAddress": mac,
            "HostName": self.name,
            "phoneDN": "",
            "appLoadID": load,
            "versionID": version,
            "serialNumber": f"FCH{mac[-8:]}",
            "modelNumber": model,
        }
        body = "".join(f"<{k}>{xml_escape(v)}</{k}>" for k, v in fields.items())
        xml = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<DeviceInformation>{body}</DeviceInformation>'
        )
        return Response(200, xml.encode(), "text/xml")

    def _busy_answer(self) -> Response:
        if self.model == "multiplatform":
            return _html(503, "Busy", headers=(("Retry-After", "1"),))
        return _error(6, "Busy")

    async def _push(self, request: Request, record: dict[str, Any]) -> Response:
        settings = self._settings
        delay = settings.delay_ms + (self.fault.delay_ms if self.fault.mode == "slow" else 0)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        multiplatform = self.model == "multiplatform"
        if (settings.username or settings.auth_url) and not await self._authorized(request):
            if multiplatform:
                return _html(401, "Unauthorized", headers=(_CHALLENGE,))
            return _error(4, "Authentication error")
        content_type = request.headers.get("content-type", "")
        xml = form_field(request.body) if content_type[:33].lower() == _FORM else None
        if xml is None:
            if multiplatform:
                return _html(400, "Bad Request")
            return _error(1, "expected a form field named XML")
        record["xml"] = xml.decode("utf-8", "replace")
        try:
            pushed = read_object(xml)
        except ObjectRefused as exc:
            return _html(400, "Bad Request") if multiplatform else _error(exc.number, exc.text)
        if isinstance(pushed, Execute):
            record["items"] = [{"url": i.url, "priority": i.priority} for i in pushed.items]
            results = await self._execute(pushed.items)
        elif isinstance(pushed, Background):
            self.state.background = {"icon": pushed.icon, "image": pushed.image}
            results = [Result(pushed.image, "Success", 0)]
        else:
            self.state.ringtone = pushed.url
            results = [Result(pushed.url, "Success", 0)]
        # Multiplatform firmware executes but answers neither Cisco object: the status says it.
        return _html(200, "OK") if multiplatform else _ok(results)

    async def _authorized(self, request: Request) -> bool:
        credentials = _basic_credentials(request.headers.get("authorization"))
        if credentials is None:
            return False
        user, password = credentials
        settings = self._settings
        if settings.auth_url is None:
            return hmac.compare_digest(
                user.encode(), settings.username.encode()
            ) & hmac.compare_digest(password.encode(), settings.password.encode())
        query = urlencode({"UserID": user, "Password": password, "devicename": self.name})
        separator = "&" if "?" in settings.auth_url else "?"
        try:
            result = await http_get(
                f"{settings.auth_url}{separator}{query}",
                MODEL_HEADERS[self.model],
                timeout_s=settings.fetch_timeout,
                ssl_context=settings.fetch_ssl,
            )
        except FetchError as exc:
            logger.warning("%s: authentication URL failed: %s", self.name, exc)
            return False
        return result.status == 200 and result.body == b"AUTHORIZED"

    async def _execute(self, items: Sequence[Item]) -> list[Result]:
        """Carry out the items in order; the results come in completion order."""
        done: list[Result] = []
        tone: _Tone | None = None
        when_idle: list[str] = []
        loop = asyncio.get_running_loop()
        state = self.state
        for item in items:
            url = item.url
            uri = read_uri(url)
            if uri is None:
                done.append(Result(url, "Invalid URI", 1))
                continue
            if isinstance(uri, FetchUri):
                if tone is not None and item.priority == 2:
                    done.append(Result(url, "Phone busy", 6))
                elif tone is not None and item.priority == 1:
                    when_idle.append(url)
                else:
                    done.append(await self._show(url))
                continue
            if isinstance(uri, PlayUri):
                if uri.file != "Stop" and uri.file not in self._settings.play_files:
                    done.append(Result(url, "URI not found", 6))
                    continue
                if tone is not None:
                    # A new tone (or Stop) cuts the one playing; that Play completes now.
                    done.append(Result(tone.url, "Success", 0))
                    tone = None
                state.executed.append(url)
                state.tones.append(uri.file)
                if uri.file == "Stop":
                    done.append(Result(url, "Success", 0))
                else:
                    state.last_tone = uri.file
                    tone = _Tone(url, loop.time() + self._settings.tone_ms / 1000)
                continue
            if isinstance(uri, RtpUri) and not uri.transmit and self._settings.rtp:
                result = await self._rtp_receive(uri, url)
                if result.ok:
                    state.executed.append(url)
                done.append(result)
                continue
            self._act(uri, url)
            state.executed.append(url)
            done.append(Result(url, "Success", 0))
        if tone is not None:
            remaining = tone.ends_at - loop.time()
            if remaining > 0:
                await asyncio.sleep(remaining)
            done.append(Result(tone.url, "Success", 0))
        for url in when_idle:
            done.append(await self._show(url))
        return done

    def _act(self, uri: KeyUri | DialUri | DisplayUri | RtpUri, url: str) -> None:
        """What an instant internal URI changes on the phone."""
        state = self.state
        if isinstance(uri, DisplayUri):
            state.backlight = Backlight(uri.state, uri.minutes)
        elif isinstance(uri, DialUri):
            state.dialled.append(uri.digits)
        elif isinstance(uri, RtpUri):
            direction = "transmit" if uri.transmit else "receive"
            state.rtp[direction] = None if uri.address is None else url
        else:
            if uri.kind == "SoftKey" and uri.name == "Exit":
                state.screen = Screen()
            state.keys.append(url)

    async def _rtp_receive(self, uri: RtpUri, url: str) -> Result:
        """``RTPRx``/``RTPMRx``: stop listening, then listen anew unless told to stop."""
        await self._rtp_stop(url if uri.address is None else "replaced")
        self.state.rtp["receive"] = None
        if uri.address is None:
            return Result(url, "Success", 0)
        receiver = RtpReceiver(self.host, uri.port, group=uri.address if uri.multicast else None)
        try:
            if uri.multicast:
                await receiver.__aenter__()
            else:
                await self._rtp_ports.listen(receiver)
        except AudioError as exc:
            logger.info("%s: %s: %s", self.name, url, exc)
            return Result(url, "RTP port unavailable", 6)
        self._reception = _Reception(
            uri=url,
            multicast=uri.multicast,
            address=uri.address if uri.multicast else self.host,
            port=uri.port,
            source=None if uri.multicast else uri.address,
            volume=uri.volume,
            started_at=self._clock(),
            receiver=receiver,
        )
        self.state.rtp["receive"] = url
        return Result(url, "Success", 0)

    async def _rtp_stop(self, ended_by: str) -> None:
        reception, self._reception = self._reception, None
        if reception is None:
            return
        if reception.multicast:
            await reception.receiver.__aexit__(None, None, None)
        else:
            await self._rtp_ports.leave(reception.receiver)
        # The transport closes its socket from a callback on the next loop iteration; let it run,
        # so that the port is free when a new RTPRx for the same port is served.
        await asyncio.sleep(0)
        self.state.rtp_streams.append(
            reception.describe(active=False, stopped_at=self._clock(), ended_by=ended_by)
        )

    async def _show(self, url: str) -> Result:
        try:
            screen = await self._fetch_screen(url)
        except FetchError as exc:
            logger.info("%s: fetch of %s failed: %s", self.name, url, exc)
            return Result(url, "URI not found", 6)
        except PageRefused as exc:
            logger.info("%s: %s is not a CiscoIPPhoneText: %s", self.name, url, exc)
            return Result(url, "Parse error", 6)
        self.state.screen = screen
        self.state.executed.append(url)
        return Result(url, "Success", 0)

    async def _fetch_screen(self, url: str) -> Screen:
        result = await http_get(
            url,
            MODEL_HEADERS[self.model],
            timeout_s=self._settings.fetch_timeout,
            ssl_context=self._settings.fetch_ssl,
        )
        if result.status != 200:
            raise FetchError(f"HTTP status {result.status} from {url}")
        page = read_page(result.body, result.headers.get("content-type", ""))
        return Screen(page.title, page.prompt, page.text, list(page.softkeys), url)


_CHALLENGE: Final = ("WWW-Authenticate", 'Basic realm="phone"')


def _ok(results: list[Result]) -> Response:
    return Response(200, response_body(results), "text/xml", success=True)


def _error(number: int, text: str = "", *, close: bool = False) -> Response:
    return Response(200, error_body(number, text), "text/xml", close=close)


def _html(status: int, title: str, *, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """A multiplatform phone's answer: a short HTML page, the HTTP status saying how it went."""
    return Response(status, html_body(title), "text/html", headers=headers, success=status == 200)


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def _basic_user(header: str | None) -> str | None:
    credentials = _basic_credentials(header)
    return credentials[0] if credentials else None


def _default_name(index: int) -> str:
    # SEP + a 12-hex-digit MAC, like a real phone's device name.
    return f"SEP0000AA{index + 1:06X}"


class Fleet:
    """N simulated phones and their control endpoint, as an async context manager.

    Phones listen on consecutive ports from ``port`` (``port=0``: each an ephemeral port), on
    ``host`` or, per phone, on ``hosts[i]``. The control endpoint listens on ``control_port``;
    by default the port after the last phone (ephemeral when ``port=0``). With ``rtp=False``
    phones record ``RTPRx``/``RTPMRx`` URIs without listening for RTP. ``model`` is one of
    :data:`MODELS`; ``answer_after_ms`` delays every answer after execution; ``play_files`` are
    the ring files the phones have (``Play:`` of another answers ``URI not found``).
    """

    def __init__(
        self,
        phones: int = 1,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        control_port: int | None = None,
        username: str = "",
        password: str = "",
        auth_url: str | None = None,
        delay_ms: float = 0,
        tone_ms: float = 1000,
        tls: bool = False,
        cert_dir: Path | None = None,
        names: Sequence[str] | None = None,
        hosts: Sequence[str] | None = None,
        fetch_timeout: float = 5.0,
        fetch_ssl: ssl.SSLContext | None = None,
        on_push: PushLog | None = None,
        rtp: bool = True,
        model: str = "8800",
        answer_after_ms: float = 0,
        play_files: Sequence[str] = DEFAULT_PLAY_FILES,
    ) -> None:
        if phones < 1:
            raise ValueError("a fleet has at least one phone")
        if names is not None and len(names) != phones:
            raise ValueError(f"{len(names)} names for {phones} phones")
        if hosts is not None and len(hosts) != phones:
            raise ValueError(f"{len(hosts)} hosts for {phones} phones")
        if names is not None and len(set(names)) != len(names):
            raise ValueError("phone names must be unique")
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; one of {', '.join(MODELS)}")
        if answer_after_ms < 0:
            raise ValueError("answer_after_ms must be >= 0")
        if port and port + phones - 1 > 65535:
            raise ValueError(f"{phones} phones from port {port} run past 65535")
        settings = _Settings(
            username=username,
            password=password,
            auth_url=auth_url or None,
            delay_ms=delay_ms,
            tone_ms=tone_ms,
            fetch_timeout=fetch_timeout,
            answer_after_ms=answer_after_ms,
            model=model,
            play_files=ring_files(play_files),
            fetch_ssl=fetch_ssl,
            rtp=rtp,
        )
        self._settings = settings
        self._host = host
        self._base_port = port
        self._control_port = control_port
        self._tls = tls
        self._cert_dir = cert_dir
        self._own_cert_dir: Path | None = None
        self._on_push = on_push
        self._names = (
            list(names) if names is not None else [_default_name(i) for i in range(phones)]
        )
        self._hosts = list(hosts) if hosts is not None else [host] * phones
        rtp_ports = RtpPorts()
        #: Exist before the fleet is entered (ports are known once it is, if ephemeral).
        self.phones: list[SimPhone] = [
            SimPhone(
                i,
                name,
                self._hosts[i],
                port + i if port else 0,
                settings,
                on_push=on_push,
                rtp_ports=rtp_ports,
            )
            for i, name in enumerate(self._names)
        ]
        self.certificate: Path | None = None
        self.control_url = ""
        self._control: asyncio.Server | None = None
        self._control_connections: set[HTTPServerProtocol] = set()

    async def __aenter__(self) -> Fleet:
        if self._tls:
            server_ssl = await self._server_ssl()
            for phone in self.phones:
                phone.use_tls(server_ssl)
        try:
            for phone in self.phones:
                await phone.start()
            control_port = self._control_port
            if control_port is None:
                control_port = self._base_port + len(self.phones) if self._base_port else 0
            loop = asyncio.get_running_loop()
            self._control = await loop.create_server(
                lambda: HTTPServerProtocol(self._control_handle, self._control_connections),
                self._host,
                control_port,
                reuse_address=True,
            )
        except BaseException:
            await self._close()
            raise
        bound = self._control.sockets[0].getsockname()[1]
        self.control_url = f"http://{_url_host(self._host)}:{bound}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        for phone in self.phones:
            await phone.stop()
        control, self._control = self._control, None
        if control is not None:
            control.close()
            for connection in list(self._control_connections):
                connection.abort()
            await control.wait_closed()
        if self._own_cert_dir is not None:
            shutil.rmtree(self._own_cert_dir, ignore_errors=True)
            self._own_cert_dir = None

    def phone(self, key: int | str) -> SimPhone:
        """A phone by index or by name (raises :class:`KeyError`)."""
        if isinstance(key, int):
            if 0 <= key < len(self.phones):
                return self.phones[key]
            raise KeyError(key)
        for phone in self.phones:
            if phone.name == key:
                return phone
        if key.isdigit():
            return self.phone(int(key))
        raise KeyError(key)

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - the tests' API: bounds a poll, not I/O
    ) -> None:
        """Poll ``predicate`` until it holds; :class:`TimeoutError` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            # Polling: the predicate may look at anything, so there is no event to wait on.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    # --- TLS ------------------------------------------------------------------------------------

    async def _server_ssl(self) -> ssl.SSLContext:
        cert_dir = self._cert_dir
        if cert_dir is None:
            cert_dir = self._own_cert_dir = Path(tempfile.mkdtemp(prefix="phonepush-sim-"))
        cert_dir.mkdir(parents=True, exist_ok=True)
        cert, key = cert_dir / _CERT_FILE, cert_dir / _KEY_FILE
        if not (cert.exists() and key.exists()):
            # Kept when it exists, so a certificate pinned by a client stays valid across runs.
            await _make_certificate(cert, key, self._names[0] if self._names else "SEP0000AA000000")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        if self._settings.model == "7900":
            _tls10_only(context)
        self.certificate = cert
        return context

    # --- control endpoint -------------------------------------------------------------------------

    async def _control_handle(self, request: Request) -> Response:
        parts = [p for p in request.path.split("/") if p]
        if request.method == "GET" and not parts:
            return _text(self.summary())
        if not parts or parts[0] != "phones" or len(parts) > 3:
            return _json({"error": "not found"}, 404)
        if len(parts) == 1:
            if request.method != "GET":
                return _json({"error": "method not allowed"}, 405)
            return _json([p.to_dict() for p in self.phones])
        try:
            phone = self.phone(unquote_plus(parts[1]))
        except KeyError:
            return _json({"error": f"no phone {parts[1]!r}"}, 404)
        if len(parts) == 2:
            if request.method != "GET":
                return _json({"error": "method not allowed"}, 405)
            return _json(phone.to_dict())
        if request.method != "POST":
            return _json({"error": "method not allowed"}, 405)
        try:
            body = json.loads(request.body) if request.body.strip() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _json({"error": "body must be JSON"}, 400)
        if not isinstance(body, dict):
            return _json({"error": "body must be a JSON object"}, 400)
        action = parts[2]
        try:
            if action == "fault":
                await phone.set_fault(
                    str(body.get("mode", "none")),
                    number=int(body.get("number", 6)),
                    delay_ms=float(body.get("delay_ms", 0)),
                )
            elif action == "model":
                phone.set_model(str(body.get("model", "")))
            elif action == "reset":
                await phone.reset()
            elif action == "press":
                position = body.get("position")
                await phone.press(
                    position=int(position) if position is not None else None,
                    name=str(body["name"]) if "name" in body else None,
                )
            else:
                return _json({"error": f"unknown action {action!r}"}, 404)
        except (ValueError, TypeError) as exc:
            return _json({"error": str(exc)}, 400)
        except LookupError as exc:
            return _json({"error": str(exc)}, 404)
        except (FetchError, PageRefused) as exc:
            return _json({"error": f"softkey fetch failed: {exc}"}, 502)
        return _json(phone.to_dict(requests=False))

    def summary(self) -> str:
        """A few lines a person can read: one per phone."""
        lines = [f"phonepush simulator: {len(self.phones)} phone(s)"]
        for p in self.phones:
            s = p.state
            screen = s.screen.title or s.screen.text[:30]
            lines.append(
                f"{p.index:>3} {p.name} {p.url} pushes={s.pushes} errors={s.errors} "
                f"overlaps={s.overlaps} fault={p.fault.mode} screen={screen!r}"
            )
        return "\n".join(lines) + "\n"


def _tls10_only(context: ssl.SSLContext) -> None:
    """Speak TLS 1.0 and nothing else, as 7900-series phones do. OpenSSL 3 allows TLS 1.0 only at
    security level 0; a client must lower its own level too, as it must for a real 7900."""
    with warnings.catch_warnings():
        # Python deprecates TLSVersion.TLSv1; modelling a phone that speaks only that is the point.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")


def _json(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode(), "application/json")


def _text(text: str) -> Response:
    return Response(200, text.encode(), "text/plain; charset=utf-8")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _make_certificate(cert: Path, key: Path, common_name: str) -> None:
    """A self-signed certificate named like a phone's (``CN=SEP<MAC>``), via the openssl CLI."""
    process = await asyncio.create_subprocess_exec(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        f"/CN={common_name}",
        "-addext",
        f"subjectAltName=DNS:{common_name}",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise OSError(f"openssl could not make a certificate: {stderr.decode(errors='replace')}")
    await asyncio.to_thread(key.chmod, 0o600)
