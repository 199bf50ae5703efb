"""Simulated phones on one address (``phonepush simulate --phones 2``: both on 127.0.0.1) each
hear a page: ``phonepush page -h A,B`` sends one RTP copy to the shared address, and each phone's
own listener checks it, as two phones with their own addresses would."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from _sim_fixtures import MakeFleet, free_rtp_port, tone_wav
from phonepush import cli
from phonepush.sim.simulator import SimPhone


def _history(phone: SimPhone) -> list[dict[str, object]]:
    history: list[dict[str, object]] = phone.rtp_status()["history"]
    return history


async def test_page_to_two_simulated_phones_on_one_address(
    make_fleet: MakeFleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = await make_fleet(phones=2)  # both on 127.0.0.1
    assert {phone.host for phone in fleet.phones} == {"127.0.0.1"}
    port = free_rtp_port(("127.0.0.1",))
    audio = tone_wav(tmp_path / "page.wav", 0.4, hz=500, amplitude=12000)
    hosts = ",".join(phone.address for phone in fleet.phones)
    argv = ["page", "-h", hosts, "--file", str(audio), "--port", str(port), "--source", "127.0.0.1"]
    status = await asyncio.to_thread(cli.main, argv)
    out = capsys.readouterr().out
    assert status == 0, out
    for phone in fleet.phones:
        assert f"{phone.address}: listening (RTPRx:127.0.0.1:{port})" in out
        (stream,) = _history(phone)
        assert stream["packets"] == 20 and stream["clean"] is True, stream
        assert stream["ended_by"] == "RTPRx:Stop"
    assert "Streamed 0.40 s (20 packets) to 2 phones" in out


async def test_the_shared_port_is_free_once_the_last_phone_stops(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(phones=2)
    first, second = fleet.phones
    port = free_rtp_port(("127.0.0.1",))
    for phone in (first, second):
        await _push(phone, f"RTPRx:127.0.0.1:{port}")
    await _push(first, "RTPRx:Stop")
    # The other phone still listens: one packet reaches it.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(_packet(), ("127.0.0.1", port))
    await fleet.wait_for(lambda: second.rtp_status()["packets"] == 1)
    assert _history(first)[0]["packets"] == 0
    await _push(second, "RTPRx:Stop")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", port))  # nothing holds it any more


def _packet() -> bytes:
    # RTP v2, PCMU, sequence 1, timestamp 0, SSRC 1, 160 bytes of µ-law silence.
    return bytes([0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]) + b"\xff" * 160


async def _push(phone: SimPhone, url: str) -> None:
    status = await asyncio.to_thread(cli.main, ["send", "-h", phone.address, url])
    assert status == 0
