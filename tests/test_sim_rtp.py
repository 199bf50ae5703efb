"""Simulated phones hear RTP: ``RTPRx``/``RTPMRx`` open a real listener on the phone's own
loopback address, what arrives is checked and shown in the phone's state, and the stop URI (or a
new start URI) closes it."""

from __future__ import annotations

import math
import random
import socket
import struct
from typing import Any

import httpx

from _sim_fixtures import MakeFleet, free_rtp_port
from phonepush.audio.clips import pcm16_to_ulaw
from phonepush.audio.rtp import RtpStream
from phonepush.phone.client import PhoneClient, PhoneTarget
from phonepush.sim.simulator import Fleet, SimPhone
from phonepush.wire.cisco import ResponseItem
from phonepush.wire.uri import ExecuteItem

HOSTS = ("127.0.0.2", "127.0.0.3")
SOURCE = "127.0.0.1"


def _tone(seconds: float, amplitude: int = 8000) -> bytes:
    """µ-law 8 kHz, a 400 Hz sine: about -15 dBFS at 8000."""
    samples = [
        round(amplitude * math.sin(2 * math.pi * 400 * n / 8000))
        for n in range(int(8000 * seconds))
    ]
    return pcm16_to_ulaw(samples)


async def _execute(phone: SimPhone, uri: str) -> list[ResponseItem]:
    async with PhoneClient(PhoneTarget(phone.name, phone.host, phone.port)) as client:
        return await client.execute([ExecuteItem(uri)])


async def _control_rtp(fleet: Fleet, phone: SimPhone) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"{fleet.control_url}/phones/{phone.name}")
    answer.raise_for_status()
    rtp: dict[str, Any] = answer.json()["rtp"]
    return rtp


async def _packets(fleet: Fleet, phone: SimPhone, count: int) -> dict[str, Any]:
    await fleet.wait_for(lambda: phone.rtp_status()["packets"] >= count)
    return phone.rtp_status()


async def test_phones_on_their_own_addresses_listen_on_the_same_port(
    make_fleet: MakeFleet,
) -> None:
    fleet = await make_fleet(phones=2, hosts=HOSTS)
    port = free_rtp_port(HOSTS)
    for phone in fleet.phones:
        assert await _execute(phone, f"RTPRx:{SOURCE}:{port}:70") == [
            ResponseItem(f"RTPRx:{SOURCE}:{port}:70", "Success", 0)
        ]
    async with RtpStream(source=(SOURCE, 0)) as stream:
        sent = await stream.play(_tone(0.5), [(host, port) for host in HOSTS])
    assert sent.send_errors == 0
    for phone in fleet.phones:
        live = await _packets(fleet, phone, 25)
        assert live["active"] is True
        assert live["mode"] == "unicast"
        assert (live["address"], live["port"], live["source"]) == (phone.host, port, SOURCE)
        assert live["volume"] == 70
        assert live["receive"] == f"RTPRx:{SOURCE}:{port}:70"
        assert live["packets"] == 25 and live["lost"] == 0 and live["clean"] is True
        assert live["duration_s"] == 0.5
        assert -18 < live["level_dbfs"] < -12
        assert live["from_source"] is True
        assert live["ssrc"] == stream.ssrc

    first = fleet.phones[0]
    assert (await _execute(first, "RTPRx:Stop"))[0].ok
    stopped = await _control_rtp(fleet, first)
    assert stopped["active"] is False
    assert stopped["receive"] is None
    assert stopped["ended_by"] == "RTPRx:Stop"
    assert stopped["packets"] == 25 and stopped["duration_s"] == 0.5  # the final figures stay
    assert [h["uri"] for h in stopped["history"]] == [f"RTPRx:{SOURCE}:{port}:70"]
    # Stopped means the port is closed: it can be bound again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((first.host, port))
    # The other phone is still listening.
    assert (await _control_rtp(fleet, fleet.phones[1]))["active"] is True


async def test_multicast_join_on_each_phones_loopback_address(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(phones=2, hosts=HOSTS)
    group = f"239.10.{random.randrange(256)}.{random.randrange(1, 255)}"
    port = free_rtp_port(HOSTS)
    for phone in fleet.phones:
        assert (await _execute(phone, f"RTPMRx:{group}:{port}"))[0].ok
    async with RtpStream(source=(SOURCE, 0), multicast_if=SOURCE) as stream:
        await stream.play(_tone(0.4), [(group, port)])
    for phone in fleet.phones:
        live = await _packets(fleet, phone, 20)
        assert live["mode"] == "multicast"
        assert (live["address"], live["port"], live["volume"]) == (group, port, None)
        assert live["packets"] == 20 and live["clean"] is True
        assert live["from_source"] is None  # nothing announced for multicast
        # RTPRx:Stop ends multicast reception too.
        assert (await _execute(phone, "RTPRx:Stop"))[0].ok
        assert phone.rtp_status()["active"] is False


async def test_a_new_start_uri_replaces_the_listener(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(phones=1, hosts=HOSTS[:1])
    phone = fleet.phones[0]
    port, other = free_rtp_port(HOSTS), free_rtp_port(HOSTS)
    assert (await _execute(phone, f"RTPRx:{SOURCE}:{port}"))[0].ok
    async with RtpStream(source=(SOURCE, 0)) as stream:
        await stream.play(_tone(0.1), [(phone.host, port)])
        await _packets(fleet, phone, 5)
        # The same port again: the old listener is closed before the new one binds.
        assert (await _execute(phone, f"RTPRx:{SOURCE}:{port}:20"))[0].ok
        assert phone.rtp_status()["packets"] == 0
        assert (await _execute(phone, f"RTPMRx:239.10.0.9:{other}"))[0].ok
        await stream.play(_tone(0.1), [(phone.host, port)])  # nobody listens there any more
    status = phone.rtp_status()
    assert status["uri"] == f"RTPMRx:239.10.0.9:{other}" and status["packets"] == 0
    history = status["history"]
    assert [(h["uri"], h["ended_by"], h["packets"]) for h in history] == [
        (f"RTPRx:{SOURCE}:{port}", "replaced", 5),
        (f"RTPRx:{SOURCE}:{port}:20", "replaced", 0),
    ]
    assert (await _execute(phone, "RTPMRx:Stop"))[0].ok
    assert phone.rtp_status()["history"][-1]["ended_by"] == "RTPMRx:Stop"


async def test_bad_packets_are_counted(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(phones=1, hosts=HOSTS[:1])
    phone = fleet.phones[0]
    port = free_rtp_port(HOSTS[:1])
    assert (await _execute(phone, f"RTPRx:{SOURCE}:{port}"))[0].ok

    def packet(sequence: int, timestamp: int, payload_type: int = 0, size: int = 160) -> bytes:
        return struct.pack("!BBHII", 0x80, payload_type, sequence, timestamp, 7) + b"\xff" * size

    datagrams = [
        packet(1, 160),
        packet(2, 320),
        packet(4, 640),  # sequence 3 lost
        packet(5, 800, payload_type=8),  # PCMA, not PCMU
        packet(6, 960, size=80),  # 10 ms, not 20 ms
        packet(7, 5000),  # a timestamp jump without a marker
        b"\x00not rtp",
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.bind(("127.0.0.5", 0))  # not the announced source
        for datagram in datagrams:
            sender.sendto(datagram, (phone.host, port))
    await fleet.wait_for(lambda: phone.rtp_status()["malformed"] == 1)
    status = await _packets(fleet, phone, 6)
    assert status["packets"] == 6
    assert status["lost"] == 1
    assert status["payload_type_errors"] == 1
    assert status["size_errors"] == 1
    assert status["timestamp_errors"] == 1
    assert status["malformed"] == 1
    assert status["clean"] is False
    assert status["from_source"] is False
    assert status["sender"][0] == "127.0.0.5"


async def test_a_port_in_use_is_answered_status_6(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(phones=1, hosts=HOSTS[:1])
    phone = fleet.phones[0]
    port = free_rtp_port(HOSTS[:1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((phone.host, port))
        items = await _execute(phone, f"RTPRx:{SOURCE}:{port}")
    assert items == [ResponseItem(f"RTPRx:{SOURCE}:{port}", "RTP port unavailable", 6)]
    status = phone.rtp_status()
    assert status["active"] is False and status["receive"] is None and status["uri"] is None


async def test_reset_and_fleet_shutdown_close_the_listener() -> None:
    port = free_rtp_port(HOSTS[:1])
    async with Fleet(1, hosts=HOSTS[:1]) as fleet:
        phone = fleet.phones[0]
        assert (await _execute(phone, f"RTPRx:{SOURCE}:{port}"))[0].ok
        await phone.reset()
        assert phone.rtp_status()["active"] is False and phone.rtp_status()["history"] == []
        assert (await _execute(phone, f"RTPRx:{SOURCE}:{port}"))[0].ok
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((HOSTS[0], port))  # closed with the fleet


async def test_rtp_false_only_records_the_uri(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(phones=1, hosts=HOSTS[:1], rtp=False)
    phone = fleet.phones[0]
    port = free_rtp_port(HOSTS[:1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as own_receiver:
        own_receiver.bind((phone.host, port))  # a test's own receiver holds the port
        assert (await _execute(phone, f"RTPRx:{SOURCE}:{port}"))[0].ok
    status = phone.rtp_status()
    assert status["receive"] == f"RTPRx:{SOURCE}:{port}"
    assert status["active"] is False
