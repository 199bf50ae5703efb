"""RTP/PCMU: the paced sender and the checking receiver, on real loopback sockets."""

from __future__ import annotations

import asyncio
import math
import socket
import struct
import time
from collections.abc import AsyncIterator

import pytest

from phonepush.audio.clips import level_dbfs, pcm16_to_ulaw
from phonepush.audio.rtp import (
    PACKET_SAMPLES,
    RtpReceiver,
    RtpStream,
    packetize,
    parse_packet,
)
from phonepush.errors import AudioError

GROUP = "239.10.0.1"


def _tone(seconds: float, amplitude: float = 0.5) -> bytes:
    return pcm16_to_ulaw(
        [
            round(amplitude * 32767 * math.sin(2 * math.pi * 440 * n / 8000))
            for n in range(round(8000 * seconds))
        ]
    )


class _FakeTime:
    """A monotonic clock that only moves when the sender sleeps (plus injected lateness)."""

    def __init__(self, oversleep: float = 0.0) -> None:
        self.now = 1000.0
        self.oversleep = oversleep
        self.stalls: dict[int, float] = {}
        self.sleeps = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds + self.oversleep + self.stalls.pop(self.sleeps, 0.0)


class _Sink:
    """A plain UDP socket collecting raw datagrams, to look at the packets themselves."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.address: tuple[str, int] = self.sock.getsockname()

    def drain(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                return out


@pytest.fixture
def sink() -> AsyncIterator[_Sink]:
    sink = _Sink()
    yield sink
    sink.sock.close()


def test_packetize_pads_the_last_packet_with_ulaw_silence() -> None:
    payloads = packetize(b"\x01" * 161)
    assert [len(p) for p in payloads] == [160, 160]
    assert payloads[1] == b"\x01" + b"\xff" * 159
    assert packetize(b"\x02" * 320) == [b"\x02" * 160] * 2
    assert packetize(b"") == []


async def test_packets_have_pcmu_headers_and_continuous_numbering(sink: _Sink) -> None:
    fake = _FakeTime()
    audio = _tone(0.25)[:1930]  # 12 full packets and 10 bytes
    async with RtpStream(
        clock=fake.clock,
        sleep=fake.sleep,
        ssrc=0xDEADBEEF,
        sequence=65530,
        timestamp=2**32 - 480,
    ) as stream:
        stats = await stream.play(audio, [sink.address])
    datagrams = sink.drain()
    assert len(datagrams) == stats.packets == 13
    packets = [parse_packet(d) for d in datagrams]
    assert all(d[0] == 0x80 for d in datagrams)  # V=2, no padding, extension or CSRC
    assert [p.payload_type for p in packets] == [0] * 13
    assert [p.marker for p in packets] == [True] + [False] * 12
    assert {p.ssrc for p in packets} == {0xDEADBEEF}
    assert [p.sequence for p in packets] == [(65530 + n) % 65536 for n in range(13)]
    assert [p.timestamp for p in packets] == [(2**32 - 480 + 160 * n) % 2**32 for n in range(13)]
    assert all(len(p.payload) == PACKET_SAMPLES for p in packets)
    assert b"".join(p.payload for p in packets) == audio + b"\xff" * 150


async def test_a_second_play_continues_numbering_and_marks_a_new_talkspurt(sink: _Sink) -> None:
    fake = _FakeTime()
    async with RtpStream(clock=fake.clock, sleep=fake.sleep, sequence=10, timestamp=0) as stream:
        await stream.play(_tone(0.1), [sink.address])
        fake.now += 1.0  # a second of silence between the plays
        await stream.play(_tone(0.1), [sink.address])
    packets = [parse_packet(d) for d in sink.drain()]
    assert [p.sequence for p in packets] == list(range(10, 20))
    assert [p.marker for p in packets] == [True, False, False, False, False] * 2
    # Media time went on during the silence: about 50 packets' worth, never backwards.
    jump = packets[5].timestamp - packets[4].timestamp
    assert jump == pytest.approx(8000 + 160, abs=160)


async def test_pacing_keeps_the_grid_when_sleeps_overshoot(sink: _Sink) -> None:
    # Every sleep wakes 5 ms late: a fixed 20 ms sleep would drift to 25 ms per packet.
    fake = _FakeTime(oversleep=0.005)
    start = fake.now
    async with RtpStream(clock=fake.clock, sleep=fake.sleep) as stream:
        stats = await stream.play(_tone(1.0), [sink.address])
    assert stats.packets == 50
    # Each sleep aims half a millisecond early (see RtpStream), so each packet leaves 4.5 ms late.
    assert fake.now - start == pytest.approx(49 * 0.020 + 0.0045)
    assert stats.offsets_ms[1:] == pytest.approx([4.5] * 49)
    assert stats.resyncs == 0


async def test_a_long_stall_moves_the_grid_instead_of_bursting(sink: _Sink) -> None:
    fake = _FakeTime()
    fake.stalls[10] = 0.5  # the 10th sleep takes half a second longer
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await fake.sleep(seconds)

    async with RtpStream(clock=fake.clock, sleep=sleep, max_late_packets=3) as stream:
        stats = await stream.play(_tone(1.0), [sink.address])
    assert stats.packets == 50
    assert stats.resyncs == 1
    # Bursting the 25 overdue packets would send them without sleeping in between; instead
    # every packet after the first still waits its 20 ms.
    assert len(slept) == 49
    assert all(0.0195 - 1e-9 <= seconds <= 0.020 + 1e-9 for seconds in slept)
    assert fake.now - 1000.0 == pytest.approx(49 * 0.020 + 0.5, abs=0.0011)


async def test_a_one_second_stream_takes_about_a_second(sink: _Sink) -> None:
    async with RtpStream() as stream:
        began = time.monotonic()
        stats = await stream.play(_tone(1.0), [sink.address])
        elapsed = time.monotonic() - began
    assert stats.packets == 50
    # Behaviour, not a benchmark: paced, not sent in a burst, and not drifting far.
    assert 0.9 < elapsed < 1.5


async def test_unicast_reaches_every_destination() -> None:
    audio = _tone(1.0)
    async with (
        RtpReceiver("127.0.0.2", 0) as first,
        RtpReceiver("127.0.0.3", 0) as second,
        RtpStream(source=("127.0.0.1", 0)) as stream,
    ):
        stats = await stream.play(audio, [("127.0.0.2", first.port), ("127.0.0.3", second.port)])
        async with asyncio.timeout(2):
            await first.wait_for(50)
            await second.wait_for(50)
        for receiver in (first, second):
            received = receiver.stats
            assert received.packets == 50
            assert received.clean
            assert received.markers == 1
            assert received.duration_s == pytest.approx(1.0)
            assert received.level_dbfs == pytest.approx(level_dbfs(audio), abs=0.01)
            assert received.sender == stream.local_address
            assert receiver.audio == audio
    assert stats.datagrams == 100
    assert stats.send_errors == 0


async def test_multicast_on_loopback_reaches_two_receivers() -> None:
    port = _free_port()
    async with (
        RtpReceiver("127.0.0.2", port, group=GROUP) as first,
        RtpReceiver("127.0.0.3", port, group=GROUP) as second,
        RtpStream(source=("127.0.0.1", 0), multicast_if="127.0.0.1") as stream,
    ):
        stats = await stream.play(_tone(1.0), [(GROUP, port)])
        async with asyncio.timeout(2):
            await first.wait_for(50)
            await second.wait_for(50)
        assert stats.datagrams == 50  # one stream for every listener
        assert first.stats.packets == second.stats.packets == 50
        assert first.stats.clean and second.stats.clean


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _datagram(
    sequence: int, timestamp: int, *, pt: int = 0, size: int = 160, marker: bool = False
) -> bytes:
    header = struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, sequence, timestamp, 7)
    return header + b"\xff" * size


async def test_receiver_reports_what_a_phone_would_mind() -> None:
    async with RtpReceiver("127.0.0.1", 0) as receiver:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            destination = ("127.0.0.1", receiver.port)
            script = [
                _datagram(100, 0, marker=True),
                _datagram(101, 160),
                _datagram(103, 480),  # 102 lost
                _datagram(103, 480),  # duplicate
                _datagram(104, 640, pt=8),  # PCMA, not PCMU
                _datagram(105, 800, size=80),  # 10 ms payload
                _datagram(106, 999),  # timestamp should be 960
                _datagram(107, 1159),
                _datagram(110, 9000, marker=True),  # new talkspurt may jump; 108, 109 lost
                _datagram(109, 8840),  # ...one of them arrives late
                b"\x00\x01",  # not RTP
            ]
            for datagram in script:
                sender.sendto(datagram, destination)
        async with asyncio.timeout(2):
            await receiver.wait_for(10)
            while receiver.stats.malformed == 0:
                await asyncio.sleep(0.01)
        stats = receiver.stats
    assert stats.packets == 10
    assert stats.lost == 2  # 102 and 108
    assert stats.duplicates == 1
    assert stats.out_of_order == 1
    assert stats.payload_type_errors == 1
    assert stats.size_errors == 1
    assert stats.timestamp_errors == 1
    assert stats.malformed == 1
    assert stats.markers == 2
    assert not stats.clean


async def test_receiver_reset_forgets_the_previous_stream(sink: _Sink) -> None:
    async with RtpReceiver("127.0.0.1", 0) as receiver, RtpStream() as stream:
        await stream.play(_tone(0.1), [("127.0.0.1", receiver.port)])
        async with asyncio.timeout(2):
            await receiver.wait_for(5)
        receiver.reset()
        assert receiver.stats.packets == 0
        assert receiver.audio == b""


async def test_sockets_that_cannot_be_opened_are_audio_errors() -> None:
    with pytest.raises(AudioError, match="Cannot open the RTP socket"):
        async with RtpStream(source=("192.0.2.1", 0)):
            pass
    async with RtpReceiver("127.0.0.1", 0) as taken:
        with pytest.raises(AudioError, match="Cannot listen for RTP"):
            async with RtpReceiver("127.0.0.1", taken.port):
                pass
