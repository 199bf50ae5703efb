"""RTP for paging: a paced G.711 µ-law sender (:class:`RtpStream`) and a checking receiver
(:class:`RtpReceiver`) for the phone simulator, tests and benchmarks.

What Cisco phones take (``/work/shared/cisco-notes.md``): RTP/AVP, payload type 0 (PCMU), 8 kHz,
20 ms packets, i.e. 160-byte payloads, sent to the port the phone was told in ``RTPRx:`` (unicast,
to the phone's own address) or ``RTPMRx:`` (multicast group).

Sender choices:

* **Header.** Version 2, no padding/extension/CSRC, payload type 0, a random SSRC and random first
  sequence number and timestamp (RFC 3550 §5.1) unless given; sequence +1 and timestamp +160 per
  packet; the marker bit on the first packet of each :meth:`RtpStream.play` (start of a talkspurt).
  A later ``play`` on the same stream continues the sequence; its timestamp advances by the time
  that passed since the previous packet, so the receiver sees a silence, not a jump back.
* **Padding.** The last payload is filled up to 160 bytes with µ-law silence (0xFF).
* **Pacing.** Packet *n* is due at ``t0 + n × 20 ms`` on the injected monotonic clock; the sender
  sleeps until each deadline (never a fixed 20 ms sleep, which drifts by the loop's overhead every
  packet). It aims ``wake_early`` (0.5 ms) before the deadline: asyncio's epoll selector rounds
  timeouts *up* to whole milliseconds, so an exact aim wakes 0–1 ms late, a centred one ±0.5 ms.
  A packet found late is sent at once and the grid kept, so a brief stall is caught up by the
  next few packets; when more than ``max_late_packets`` intervals late (the process was
  suspended, the loop blocked) the grid is moved to "now" instead of bursting the backlog at the
  phones (``SendStats.resyncs`` counts those).
* **One socket** per stream, bound to ``source``; each packet is ``sendto`` every destination in
  turn (unicast), or once to the group (multicast: one stream serves every phone). With
  ``multicast_if`` the socket sets ``IP_MULTICAST_IF`` to that local address, ``IP_MULTICAST_TTL``
  to ``ttl`` and ``IP_MULTICAST_LOOP`` on — which is also what makes multicast work on loopback
  (``multicast_if="127.0.0.1"``) with no system change. Datagrams carry DSCP EF (``IP_TOS`` 0xB8),
  as phones' own voice does.
* **Send errors** (a full socket buffer, an unreachable network) are counted per datagram, not
  raised: one bad destination must not silence the others.

Receiver (:class:`RtpReceiver`) checks what a phone would care about: payload type, payload size,
sequence continuity (loss, duplicates, reordering), timestamp continuity (+160 per packet; a marker
allows a forward jump), RFC 3550 interarrival jitter, and keeps the audio's duration and level.
It binds ``(host, port)`` for unicast, or ``(group, port)`` and joins ``group`` on the interface of
the local address ``host`` for multicast (so simulated phones on 127.0.0.2, 127.0.0.3, ... each
join on their own address).

Use (simulator, later)::

    async with RtpReceiver(phone.host, 20480) as rx:                  # on RTPRx:<src>:20480
    async with RtpReceiver(phone.host, 20480, group="239.10.0.1") as rx:  # on RTPMRx:...
        ...
        rx.stats.packets, rx.stats.lost, rx.stats.jitter_ms, rx.stats.level_dbfs
        rx.reset()                                                     # a new stream starts

    async with RtpStream(source=("192.0.2.5", 0)) as stream:          # daemon / CLI
        stats = await stream.play(ulaw, [("10.1.2.3", 20480), ("10.1.2.4", 20480)])
"""

from __future__ import annotations

import asyncio
import math
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

from phonepush.audio.clips import SAMPLE_RATE, ULAW_SILENCE, energy
from phonepush.errors import AudioError

__all__ = [
    "PACKET_INTERVAL",
    "PACKET_SAMPLES",
    "PAYLOAD_PCMU",
    "ReceiveStats",
    "RtpPacket",
    "RtpReceiver",
    "RtpStream",
    "SendStats",
    "packetize",
    "parse_packet",
]

PAYLOAD_PCMU: Final = 0
#: Samples (= µ-law bytes) per packet: 20 ms at 8 kHz.
PACKET_SAMPLES: Final = 160
PACKET_INTERVAL: Final = PACKET_SAMPLES / SAMPLE_RATE
_HEADER: Final = struct.Struct("!BBHII")
_VERSION_BYTE: Final = 0x80  # V=2, P=0, X=0, CC=0
_TOS_EF: Final = 0xB8
_MAX_DATAGRAM: Final = 2048
_SEQ_MOD: Final = 1 << 16
_TS_MOD: Final = 1 << 32
# Sequence numbers remembered for duplicate detection; older ones count as reordered, not dups.
_SEEN_WINDOW: Final = 2048

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def packetize(audio: bytes) -> list[bytes]:
    """Cut µ-law audio into 160-byte payloads, the last padded with µ-law silence."""
    payloads = [audio[i : i + PACKET_SAMPLES] for i in range(0, len(audio), PACKET_SAMPLES)]
    if payloads and len(payloads[-1]) < PACKET_SAMPLES:
        last = payloads[-1]
        payloads[-1] = last + bytes([ULAW_SILENCE]) * (PACKET_SAMPLES - len(last))
    return payloads


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """One parsed RTP packet (CSRCs and header extension skipped, padding removed)."""

    marker: bool
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes


def parse_packet(data: bytes) -> RtpPacket:
    """Parse an RTP datagram; :class:`ValueError` if it is not RTP version 2."""
    if len(data) < _HEADER.size:
        raise ValueError(f"{len(data)} bytes is shorter than an RTP header")
    first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
    if first >> 6 != 2:
        raise ValueError(f"RTP version {first >> 6}")
    offset = _HEADER.size + 4 * (first & 0x0F)
    if first & 0x10:  # header extension: 16-bit profile, 16-bit length in 32-bit words
        if len(data) < offset + 4:
            raise ValueError("truncated header extension")
        offset += 4 + 4 * struct.unpack_from("!H", data, offset + 2)[0]
    end = len(data)
    if first & 0x20:
        end -= data[-1]
    if end < offset:
        raise ValueError("truncated RTP packet")
    return RtpPacket(
        marker=bool(second & 0x80),
        payload_type=second & 0x7F,
        sequence=sequence,
        timestamp=timestamp,
        ssrc=ssrc,
        payload=bytes(data[offset:end]),
    )


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass(frozen=True)
class SendStats:
    """What one :meth:`RtpStream.play` did.

    ``offsets_ms`` holds, per packet, how far its send time was from its place on the 20 ms grid
    (after resyncs; negative: early); ``datagrams`` counts successful ``sendto`` calls over all
    destinations. Percentiles are of the absolute deviation.
    """

    packets: int
    destinations: int
    datagrams: int
    send_errors: int
    resyncs: int
    duration_s: float
    ssrc: int
    first_sequence: int
    first_timestamp: int
    offsets_ms: tuple[float, ...] = field(repr=False)

    def percentile_ms(self, fraction: float) -> float:
        """A percentile of ``offsets_ms`` (``fraction`` 0–1, nearest rank)."""
        return _percentile(sorted(map(abs, self.offsets_ms)), fraction)

    @property
    def max_offset_ms(self) -> float:
        return max(map(abs, self.offsets_ms), default=0.0)


class RtpStream:
    """One RTP/PCMU sender over one UDP socket; an async context manager.

    ``source`` is the local address and port to bind (the address phones are told the stream
    comes from, for unicast). ``clock`` and ``sleep`` are injectable for tests (``clock`` must
    be monotonic, and ``sleep`` must wait on the same clock). ``max_late_packets`` and
    ``wake_early`` tune pacing (see the module docstring). Raises
    :class:`~phonepush.errors.AudioError` when the socket cannot be opened or bound.
    """

    def __init__(
        self,
        *,
        source: tuple[str, int] = ("0.0.0.0", 0),
        multicast_if: str | None = None,
        ttl: int = 1,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        ssrc: int | None = None,
        sequence: int | None = None,
        timestamp: int | None = None,
        max_late_packets: int = 3,
        wake_early: float = 0.0005,
    ) -> None:
        if not 0 <= ttl <= 255:
            raise ValueError("ttl must be 0-255")
        self.source = source
        self.multicast_if = multicast_if
        self.ttl = ttl
        self.ssrc = secrets.randbits(32) if ssrc is None else ssrc & 0xFFFFFFFF
        self._sequence = secrets.randbits(16) if sequence is None else sequence % _SEQ_MOD
        self._timestamp = secrets.randbits(32) if timestamp is None else timestamp % _TS_MOD
        self._clock = clock
        self._sleep = sleep
        self._max_late = max_late_packets * PACKET_INTERVAL
        self._wake_early = wake_early
        self._socket: socket.socket | None = None
        self._last_sent: float | None = None
        self._lock = asyncio.Lock()

    @property
    def local_address(self) -> tuple[str, int]:
        """The bound address and port (after entering)."""
        if self._socket is None:
            raise RuntimeError("RtpStream is not open")
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    async def __aenter__(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, _TOS_EF)
            if self.multicast_if is not None:
                sock.setsockopt(
                    socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self.multicast_if)
                )
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, self.ttl)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            sock.bind(self.source)
        except OSError as exc:
            sock.close()
            where = f"{self.source[0]}:{self.source[1]}"
            if self.multicast_if is not None:
                where += f" (multicast via {self.multicast_if})"
            raise AudioError(
                f"Cannot open the RTP socket on {where}: {exc.strerror or exc}"
            ) from exc
        self._socket = sock
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    async def play(self, audio: bytes, destinations: Sequence[tuple[str, int]]) -> SendStats:
        """Stream µ-law 8 kHz ``audio`` to every destination, paced at 20 ms per packet; return
        when the last packet has been sent. Plays on one stream run one after another.

        Destinations are ``(IPv4 address, port)``; resolve names first (``sendto`` would resolve
        them on every packet, blocking the loop) — :func:`phonepush.audio.paging.page` does."""
        async with self._lock:
            return await self._play(audio, list(destinations))

    async def _play(self, audio: bytes, destinations: list[tuple[str, int]]) -> SendStats:
        sock = self._socket
        if sock is None:
            raise RuntimeError("RtpStream is not open")
        clock = self._clock
        payloads = packetize(audio)
        ssrc = self.ssrc
        start = clock()
        if self._last_sent is not None:
            # Media time moves on while nothing is sent: advance by the silence, in packets.
            gap = max(1, round((start - self._last_sent) / PACKET_INTERVAL))
            self._timestamp = (self._timestamp + (gap - 1) * PACKET_SAMPLES) % _TS_MOD
        first_sequence, first_timestamp = self._sequence, self._timestamp
        offsets: list[float] = []
        datagrams = errors = resyncs = 0
        origin = start
        now = start
        for n, payload in enumerate(payloads):
            deadline = origin + n * PACKET_INTERVAL
            now = clock()
            if now < deadline - self._wake_early:
                await self._sleep(deadline - self._wake_early - now)
                now = clock()
            if now - deadline > self._max_late:
                origin += now - deadline
                deadline = now
                resyncs += 1
            datagram = (
                _HEADER.pack(
                    _VERSION_BYTE,
                    (0x80 if n == 0 else 0) | PAYLOAD_PCMU,
                    self._sequence,
                    self._timestamp,
                    ssrc,
                )
                + payload
            )
            for destination in destinations:
                try:
                    sock.sendto(datagram, destination)
                except OSError:
                    errors += 1
                else:
                    datagrams += 1
            offsets.append((now - deadline) * 1000)
            self._sequence = (self._sequence + 1) % _SEQ_MOD
            self._timestamp = (self._timestamp + PACKET_SAMPLES) % _TS_MOD
        if payloads:
            self._last_sent = now
        return SendStats(
            packets=len(payloads),
            destinations=len(destinations),
            datagrams=datagrams,
            send_errors=errors,
            resyncs=resyncs,
            duration_s=now - start,
            ssrc=ssrc,
            first_sequence=first_sequence,
            first_timestamp=first_timestamp,
            offsets_ms=tuple(offsets),
        )


@dataclass(frozen=True)
class ReceiveStats:
    """What an :class:`RtpReceiver` saw since it opened or was last reset.

    ``lost`` = packets expected from the sequence numbers seen minus distinct packets received;
    ``timestamp_errors`` counts consecutive packets whose timestamps do not differ by 160 (a
    marker may jump forward); ``jitter_ms`` is RFC 3550's interarrival jitter estimate;
    ``duration_s`` and ``level_dbfs`` describe the payload received; arrivals are ``clock``
    readings.
    """

    packets: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    malformed: int = 0
    payload_type_errors: int = 0
    size_errors: int = 0
    timestamp_errors: int = 0
    ssrc_changes: int = 0
    markers: int = 0
    jitter_ms: float = 0.0
    duration_s: float = 0.0
    level_dbfs: float = -math.inf
    first_arrival: float | None = None
    last_arrival: float | None = None
    ssrc: int | None = None
    sender: tuple[str, int] | None = None

    @property
    def clean(self) -> bool:
        """Every packet arrived, in order, well-formed and continuous."""
        return not (
            self.lost
            or self.duplicates
            or self.out_of_order
            or self.malformed
            or self.payload_type_errors
            or self.size_errors
            or self.timestamp_errors
        )

    def to_dict(self) -> dict[str, object]:
        level = None if math.isinf(self.level_dbfs) else round(self.level_dbfs, 2)
        return {
            "packets": self.packets,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "malformed": self.malformed,
            "payload_type_errors": self.payload_type_errors,
            "size_errors": self.size_errors,
            "timestamp_errors": self.timestamp_errors,
            "ssrc_changes": self.ssrc_changes,
            "markers": self.markers,
            "jitter_ms": round(self.jitter_ms, 3),
            "duration_s": round(self.duration_s, 3),
            "level_dbfs": level,
            "first_arrival": self.first_arrival,
            "last_arrival": self.last_arrival,
            "ssrc": self.ssrc,
            "sender": list(self.sender) if self.sender else None,
        }


class _Tracker:
    """The receiver's running counters (reset by replacing the object)."""

    def __init__(self, keep_audio: int) -> None:
        self.packets = self.lost_base = self.duplicates = self.out_of_order = 0
        self.malformed = self.payload_type_errors = self.size_errors = 0
        self.timestamp_errors = self.ssrc_changes = self.markers = 0
        self.samples = 0
        self.square_sum = 0
        self.jitter = 0.0  # in timestamp units
        self.first_arrival: float | None = None
        self.last_arrival: float | None = None
        self.sender: tuple[str, int] | None = None
        self.ssrc: int | None = None
        self.base = self.highest = 0  # extended sequence numbers
        self.distinct = 0
        self.seen: set[int] = set()
        self.last_timestamp = 0
        self.last_transit: float | None = None
        self.audio = bytearray()
        self.keep_audio = keep_audio

    def expected(self) -> int:
        return self.highest - self.base + 1 if self.ssrc is not None else 0


class RtpReceiver:
    """Listens for one RTP stream on ``(host, port)``, or on multicast ``group`` joined on the
    interface of local address ``host``; an async context manager.

    ``port=0`` binds an ephemeral port (see :attr:`port`). ``keep_audio`` bounds how many bytes
    of payload :attr:`audio` keeps (default: ten minutes). Raises
    :class:`~phonepush.errors.AudioError` when the socket cannot be bound or the group joined.
    """

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        group: str | None = None,
        clock: Clock = time.monotonic,
        payload_type: int = PAYLOAD_PCMU,
        payload_size: int = PACKET_SAMPLES,
        keep_audio: int = 600 * SAMPLE_RATE,
    ) -> None:
        self.host = host
        self.port = port
        self.group = group
        self.payload_type = payload_type
        self.payload_size = payload_size
        self._clock = clock
        self._keep_audio = keep_audio
        self._tracker = _Tracker(keep_audio)
        self._transport: asyncio.DatagramTransport | None = None
        self._arrived = asyncio.Event()

    async def __aenter__(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if self.group is not None:
                # Several phones listen on the same group and port: each needs its own copy.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.group, self.port))
                membership = socket.inet_aton(self.group) + socket.inet_aton(self.host)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            else:
                sock.bind((self.host, self.port))
            sock.setblocking(False)
            self.port = sock.getsockname()[1]
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _ReceiverProtocol(self), sock=sock
            )
        except OSError as exc:
            sock.close()
            where = f"{self.group or self.host}:{self.port}"
            if self.group is not None:
                where += f" on {self.host}"
            raise AudioError(f"Cannot listen for RTP on {where}: {exc.strerror or exc}") from exc
        self._transport = transport
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()

    def reset(self) -> None:
        """Forget everything received (a new stream begins)."""
        self._tracker = _Tracker(self._keep_audio)

    @property
    def audio(self) -> bytes:
        """The payloads received, in arrival order (bounded by ``keep_audio``)."""
        return bytes(self._tracker.audio)

    @property
    def stats(self) -> ReceiveStats:
        t = self._tracker
        mean_square = t.square_sum / t.samples if t.samples else 0
        return ReceiveStats(
            packets=t.packets,
            lost=t.lost_base + max(0, t.expected() - t.distinct),
            duplicates=t.duplicates,
            out_of_order=t.out_of_order,
            malformed=t.malformed,
            payload_type_errors=t.payload_type_errors,
            size_errors=t.size_errors,
            timestamp_errors=t.timestamp_errors,
            ssrc_changes=t.ssrc_changes,
            markers=t.markers,
            jitter_ms=t.jitter / SAMPLE_RATE * 1000,
            duration_s=t.samples / SAMPLE_RATE,
            level_dbfs=10 * math.log10(mean_square / 32768**2) if mean_square else -math.inf,
            first_arrival=t.first_arrival,
            last_arrival=t.last_arrival,
            ssrc=t.ssrc,
            sender=t.sender,
        )

    async def wait_for(self, packets: int) -> ReceiveStats:
        """Wait until at least ``packets`` packets arrived (bound it with ``asyncio.timeout``)."""
        while self._tracker.packets < packets:
            self._arrived.clear()
            await self._arrived.wait()
        return self.stats

    def _datagram(self, data: bytes, sender: tuple[str, int]) -> None:
        now = self._clock()
        t = self._tracker
        self._arrived.set()
        try:
            packet = parse_packet(data)
        except ValueError:
            t.malformed += 1
            return
        t.packets += 1
        t.sender = (str(sender[0]), int(sender[1]))
        if t.first_arrival is None:
            t.first_arrival = now
        t.last_arrival = now
        if packet.payload_type != self.payload_type:
            t.payload_type_errors += 1
        if len(packet.payload) != self.payload_size:
            t.size_errors += 1
        if packet.marker:
            t.markers += 1
        payload = packet.payload
        t.samples += len(payload)
        t.square_sum += energy(payload)
        room = t.keep_audio - len(t.audio)
        if room > 0:
            t.audio += payload[:room]
        self._sequence(t, packet, now)

    def _sequence(self, t: _Tracker, packet: RtpPacket, now: float) -> None:
        if packet.ssrc != t.ssrc:
            if t.ssrc is not None:
                t.ssrc_changes += 1
                # A new source starts its own numbering; what the old one lost stays counted.
                t.lost_base += max(0, t.expected() - t.distinct)
            t.ssrc = packet.ssrc
            t.base = t.highest = packet.sequence
            t.distinct = 1
            t.seen = {packet.sequence}
            t.last_timestamp = packet.timestamp
            t.last_transit = now * SAMPLE_RATE - packet.timestamp
            return
        extended = (t.highest & ~0xFFFF) | packet.sequence
        if extended < t.highest - 0x8000:
            extended += _SEQ_MOD
        elif extended > t.highest + 0x8000:
            extended -= _SEQ_MOD
        if extended in t.seen:
            t.duplicates += 1
            return
        t.seen.add(extended)
        t.distinct += 1
        if len(t.seen) > 2 * _SEEN_WINDOW:
            floor = t.highest - _SEEN_WINDOW
            t.seen = {s for s in t.seen if s >= floor}
        if extended < t.highest:
            t.out_of_order += 1
            return
        step = (packet.timestamp - t.last_timestamp) % _TS_MOD
        expected_step = (extended - t.highest) * PACKET_SAMPLES
        if step != expected_step and not (packet.marker and 0 < step < _TS_MOD // 2):
            t.timestamp_errors += 1
        t.highest = extended
        t.last_timestamp = packet.timestamp
        # RFC 3550 A.8: jitter from the difference in relative transit times, in sample units.
        transit = now * SAMPLE_RATE - packet.timestamp
        if t.last_transit is not None:
            t.jitter += (abs(transit - t.last_transit) - t.jitter) / 16
        t.last_transit = transit


class _ReceiverProtocol(asyncio.DatagramProtocol):
    def __init__(self, receiver: RtpReceiver) -> None:
        self._receiver = receiver

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._receiver._datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on a listening socket say nothing about the stream arriving here.
        return
