"""A page: tell phones to listen, stream the announcement, tell them to stop.

:func:`page` pushes the start URI to every target at once — ``RTPRx:<source>:<port>[:<volume>]``
(unicast: ``source`` is the address the stream comes from, ``port`` the one the phone listens on)
or ``RTPMRx:<group>:<port>[:<volume>]`` (multicast) — then streams the µ-law audio with one
:class:`~phonepush.audio.rtp.RtpStream` to the phones that accepted (each phone's own address and
``port``; or once to the group), then pushes ``RTPRx:Stop`` (which ends unicast and multicast
reception alike) to every phone the start may have reached (it was written, even if unanswered).
A phone that could not be told to listen is reported and left out; the others still hear the
page. The stops are pushed even if streaming fails or the page is cancelled (TTL, shutdown):
they run shielded from the cancellation, which goes on once they are done.

How pushes are made is the caller's: ``push(target, uri)`` must send one ExecuteItem and raise a
:class:`~phonepush.errors.PhonepushError` if the phone did not accept it (an error object, an HTTP
error, or a ResponseItem with a non-zero Status). The CLI (``phonepush page``) passes a function
over :class:`~phonepush.phone.client.PhoneClient`; the daemon passes one over its phone lanes
(:mod:`phonepush.phone.lanes`), so pushes to a phone stay one at a time. A start that raises
:class:`~phonepush.errors.PhoneNotSent` or :class:`~phonepush.errors.PhoneRejected` is taken as
not reaching the phone (no stop). Extra exceptions are not swallowed.

Choices (not settled by Cisco's notes; ours):

* URIs are checked with :func:`phonepush.wire.uri.validate_uri` before any push, so a bad
  port, volume or group (``InvalidURI``) fails the whole page up front.
* ``lead_in_s`` (default 0.2 s) passes between the last start answer and the first packet: a
  phone answers the push before its audio path is open, and the first words would be clipped.
* Unicast phone addresses may be host names; they are resolved (IPv4) first, and a phone whose
  name does not resolve is reported failed without being pushed. Phones sharing an address get
  one copy of the stream.
* The socket binds to ``source`` so packets come from the address the phones were told; if that
  address is not local (the public URL's host is a NAT or proxy address), the socket falls back
  to the wildcard address and the kernel picks the source.
* For multicast, ``multicast_if`` (default: ``source``) picks the outgoing interface.

Daemon wiring (rule action ``audio = {...}``), for whoever adds it::

    settings = PageSettings(source=audio_address, port=audio_port, multicast=group, volume=80)
    targets = [PageTarget(phone.name, phone.host) for phone in phones]
    report = await page(targets, audio, push=dispatcher_push, settings=settings)
    for result in report.failed: log / count result.target.name, result.error
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from phonepush.audio.rtp import RtpStream, SendStats
from phonepush.errors import AudioError, PhoneNotSent, PhonepushError, PhoneRejected
from phonepush.wire.uri import validate_uri

__all__ = [
    "DEFAULT_PORT",
    "STOP_URI",
    "PageReport",
    "PageSettings",
    "PageTarget",
    "Push",
    "TargetResult",
    "local_address_for",
    "page",
    "start_uri",
]

logger = logging.getLogger("phonepush.paging")

_T = TypeVar("_T")

#: The port phones listen on unless told otherwise (the lowest RTP port phones accept).
DEFAULT_PORT = 20480
STOP_URI = "RTPRx:Stop"


@dataclass(frozen=True, slots=True)
class PageTarget:
    """A phone to page: ``name`` for reports (and the push callable), ``host`` its address (IPv4
    or a name), where unicast RTP is sent."""

    name: str
    host: str


@dataclass(frozen=True, slots=True)
class PageSettings:
    """Where the stream comes from and goes.

    ``source``: IPv4 address phones are told the stream comes from (unicast) and the socket binds
    to. ``port``: the phones' listening port (unicast) or the group's port (multicast), even,
    20480–32768. ``multicast``: a group (239.x) for one stream to all phones, else unicast.
    ``volume``: 0–100 or ``None`` (the phone's own). ``ttl``: multicast hops.
    ``concurrency``: pushes in flight at once.
    """

    source: str
    port: int = DEFAULT_PORT
    multicast: str | None = None
    volume: int | None = None
    ttl: int = 1
    multicast_if: str | None = None
    lead_in_s: float = 0.2
    concurrency: int = 64


@dataclass(frozen=True, slots=True)
class TargetResult:
    """One phone's part in a page. ``address`` is where RTP went (unicast)."""

    target: PageTarget
    started: bool
    error: str = ""
    address: str | None = None
    stopped: bool = False
    stop_error: str = ""


@dataclass(frozen=True)
class PageReport:
    """What a page did: the start URI, one result per target (in the targets' order), the
    stream's statistics (``None`` if nothing was streamed) and a stream error, if any."""

    uri: str
    results: tuple[TargetResult, ...]
    stream: SendStats | None = None
    error: str = ""
    destinations: tuple[tuple[str, int], ...] = field(default=())

    @property
    def started(self) -> list[TargetResult]:
        return [r for r in self.results if r.started]

    @property
    def failed(self) -> list[TargetResult]:
        return [r for r in self.results if not r.started]

    @property
    def ok(self) -> bool:
        """Every phone listened, the whole stream was sent, every phone was stopped."""
        return (
            not self.error
            and self.stream is not None
            and all(r.started and r.stopped for r in self.results)
        )


#: ``await push(target, uri)``: one ExecuteItem to one phone; raises PhonepushError if refused.
Push = Callable[[PageTarget, str], Awaitable[None]]


def start_uri(settings: PageSettings) -> str:
    """The URI that makes a phone listen (validated; raises InvalidURI)."""
    volume = f":{settings.volume}" if settings.volume is not None else ""
    if settings.multicast is not None:
        uri = f"RTPMRx:{settings.multicast}:{settings.port}{volume}"
    else:
        uri = f"RTPRx:{settings.source}:{settings.port}{volume}"
    return validate_uri(uri)


def local_address_for(host: str, port: int = DEFAULT_PORT) -> str:
    """The local IPv4 address this machine would send from to reach ``host`` (an IPv4 address),
    found with a connected UDP socket: no packet is sent. Raises :class:`AudioError`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
        except OSError as exc:
            raise AudioError(f"No route to {host}: {exc.strerror or exc}") from exc
        return str(probe.getsockname()[0])


async def _resolve(host: str) -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise AudioError(f"Cannot resolve {host}: {exc.strerror or exc}") from exc
    if not infos:
        raise AudioError(f"Cannot resolve {host}: no IPv4 address")
    return str(infos[0][4][0])


async def page(
    targets: Sequence[PageTarget],
    audio: bytes,
    *,
    push: Push,
    settings: PageSettings,
    stream: RtpStream | None = None,
) -> PageReport:
    """Page ``targets`` with µ-law 8 kHz ``audio``; see the module docstring.

    ``settings.source`` may be a host name (the daemon's default is the host of its public URL);
    it is resolved to IPv4 first. ``stream`` is an unopened :class:`RtpStream` to use instead of
    one made from ``settings`` (tests inject clocks through it). Raises
    :class:`~phonepush.errors.InvalidURI` (settings) or :class:`~phonepush.errors.AudioError`
    (``source`` does not resolve) before anything is sent; every other failure is in the report.
    """
    if settings.multicast is None or settings.multicast_if is None:
        settings = replace(settings, source=await _resolve(settings.source))
    uri = start_uri(settings)
    validate_uri(STOP_URI)
    limit = asyncio.Semaphore(max(1, settings.concurrency))
    multicast = settings.multicast is not None
    results: list[TargetResult | None] = [None] * len(targets)
    # Phones whose start may have reached them: each is stopped, whatever else happens.
    reached: dict[int, TargetResult] = {}

    async def start(i: int, target: PageTarget) -> None:
        address: str | None = None
        try:
            if not multicast:
                address = await _resolve(target.host)
            async with limit:
                reached[i] = TargetResult(target, started=False, address=address)
                await push(target, uri)
        except PhonepushError as exc:
            failed = TargetResult(target, started=False, error=str(exc), address=address)
            results[i] = failed
            if isinstance(exc, PhoneNotSent | PhoneRejected | AudioError):
                reached.pop(i, None)  # it cannot be listening: it refused, or never got it
            else:
                reached[i] = failed
            return
        results[i] = reached[i] = TargetResult(target, started=True, address=address)

    stats: SendStats | None = None
    error = ""
    destinations: list[tuple[str, int]] = []
    try:
        async with asyncio.TaskGroup() as group:
            for i, target in enumerate(targets):
                group.create_task(start(i, target))
        listening = [r for r in results if r is not None and r.started]
        if listening:
            if settings.multicast is not None:
                destinations = [(settings.multicast, settings.port)]
            else:
                # Phones sharing an address (several simulated phones on one host) hear one copy.
                addresses = (str(r.address) for r in listening)
                destinations = list(dict.fromkeys((a, settings.port) for a in addresses))
            try:
                stats = await _stream(audio, destinations, settings, stream)
            except AudioError as exc:
                error = str(exc)
    finally:
        order = sorted(reached)
        stopped = await _shielded(_stop([reached[i] for i in order], push, limit))
        for i, result in zip(order, stopped, strict=True):
            results[i] = result
    final = tuple(
        r if r is not None else TargetResult(t, started=False, error="not started")
        for t, r in zip(targets, results, strict=True)
    )
    return PageReport(uri, final, stats, error, tuple(destinations))


async def _shielded(work: Awaitable[_T]) -> _T:
    """Run ``work`` to its end even if the caller is cancelled meanwhile (then the cancellation
    goes on once ``work`` is done): stop pushes must not be lost to a TTL or a shutdown."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result


async def _stream(
    audio: bytes,
    destinations: list[tuple[str, int]],
    settings: PageSettings,
    stream: RtpStream | None,
) -> SendStats:
    if stream is None:
        try:
            stream = await _make_stream(settings, (settings.source, 0)).__aenter__()
        except AudioError:
            logger.warning(
                "cannot bind the RTP socket to %s; sending from the wildcard address",
                settings.source,
            )
            stream = await _make_stream(settings, ("0.0.0.0", 0)).__aenter__()
    else:
        stream = await stream.__aenter__()
    try:
        if settings.lead_in_s > 0:
            await asyncio.sleep(settings.lead_in_s)
        return await stream.play(audio, destinations)
    finally:
        await stream.__aexit__(None, None, None)


def _make_stream(settings: PageSettings, source: tuple[str, int]) -> RtpStream:
    multicast_if = None
    if settings.multicast is not None:
        multicast_if = settings.multicast_if or settings.source
    return RtpStream(source=source, multicast_if=multicast_if, ttl=settings.ttl)


async def _stop(
    listening: list[TargetResult], push: Push, limit: asyncio.Semaphore
) -> list[TargetResult]:
    async def stop(result: TargetResult) -> TargetResult:
        try:
            async with limit:
                await push(result.target, STOP_URI)
        except PhonepushError as exc:
            return _replace(result, stopped=False, stop_error=str(exc))
        return _replace(result, stopped=True)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(stop(r)) for r in listening]
    return [task.result() for task in tasks]


def _replace(result: TargetResult, *, stopped: bool, stop_error: str = "") -> TargetResult:
    return TargetResult(
        result.target, result.started, result.error, result.address, stopped, stop_error
    )
