"""Phone health: ``/DeviceInformationX`` read safely, probes through the lanes (never during a
push), ``[health] interval``, ``GET /api/phones`` and the phone metrics, against the simulator
and a real daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from _sim_fixtures import MakeFleet
from phonepush.config import parse_config
from phonepush.errors import ConfigError, PhoneUnreachable
from phonepush.phone.lanes import PhoneLanes
from phonepush.wire.cisco import DeviceInfo, parse_device_information
from phonepush.wire.target import PhoneTarget, parse_host
from phonepush.wire.uri import ExecuteItem

TOKEN = "health-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# As a CP-8845 serves it (elements from Cisco's notes; values shortened).
CISCO_8845 = b"""<?xml version="1.0" encoding="utf-8"?>
<DeviceInformation><MACAddress>00562B0412AB</MACAddress><HostName>SEP00562B0412AB</HostName>
<phoneDN>2001</phoneDN><appLoadID>sip8845_65.14-1-1-0001-125</appLoadID>
<bootLoadID>lpkboot.1-0-0-0001</bootLoadID><versionID>14.1(1)</versionID>
<serialNumber>FCH2222ABCD</serialNumber><modelNumber>CP-8845</modelNumber></DeviceInformation>"""


def _target(name: str, address: str) -> PhoneTarget:
    host, port = parse_host(address)
    return PhoneTarget(name, host, port, timeout=2)


def test_device_information_gives_model_firmware_mac_and_host_name() -> None:
    info = parse_device_information(CISCO_8845, "text/xml")
    assert info == DeviceInfo(
        model="CP-8845", firmware="14.1(1)", mac="00562B0412AB", host_name="SEP00562B0412AB"
    )


def test_device_information_without_version_id_takes_the_load_name() -> None:
    body = CISCO_8845.replace(b"<versionID>14.1(1)</versionID>", b"")
    info = parse_device_information(body, "text/xml")
    assert info is not None and info.firmware == "sip8845_65.14-1-1-0001-125"


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"Not Found\n", "text/plain", 404),
        (CISCO_8845, "text/xml", 401),
        (b"<html><body>Device Information</body></html>", "text/html", 200),
        (b'<CiscoIPPhoneError Number="4"/>', "text/xml", 200),
        (b"<DeviceInformation><modelNumber>CP", "text/xml", 200),
        (
            b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x "boom">]>'
            b"<DeviceInformation><modelNumber>&x;</modelNumber></DeviceInformation>",
            "text/xml",
            200,
        ),
        (b"", "text/xml", 200),
    ],
)
def test_answers_that_describe_nothing_are_none(
    body: bytes, content_type: str, status: int
) -> None:
    assert parse_device_information(body, content_type, status) is None


def test_device_information_values_are_cleaned_and_bounded() -> None:
    body = (
        b"<DeviceInformation><modelNumber>CP-\xc2\x85\t88\n45</modelNumber>"
        + b"<versionID>"
        + b"9" * 500
        + b"</versionID></DeviceInformation>"
    )
    info = parse_device_information(body, "text/xml")
    assert info is not None
    assert info.model == "CP- 88 45"
    assert len(info.firmware) == 64 and info.mac == ""


def test_interval_is_validated_naming_the_key() -> None:
    assert parse_config({}, environ={}).health.interval == 60
    assert parse_config({"health": {"interval": 0}}, environ={}).health.interval == 0
    for bad in ("500ms", "-1s", "often"):
        with pytest.raises(ConfigError, match=r"^health\.interval: "):
            parse_config({"health": {"interval": bad}}, environ={})


async def test_probe_reads_each_model_and_fails_for_a_refusing_phone(
    make_fleet: MakeFleet,
) -> None:
    fleet = await make_fleet(phones=3, names=["SEP00562B000001", "old", "mpp"])
    new, old, mpp = fleet.phones
    old.set_model("7900")
    mpp.set_model("multiplatform")
    targets = {p.name: _target(p.name, p.address) for p in fleet.phones}
    async with PhoneLanes(targets) as lanes:
        info = await lanes.probe(new.name)
        assert info is not None
        assert (info.model, info.firmware, info.mac, info.host_name) == (
            "CP-8841",
            "14.2(1)",
            "00562B000001",
            "SEP00562B000001",
        )
        old_info = await lanes.probe("old")
        assert old_info is not None and old_info.model == "CP-7965G"
        # 3PCC firmware has no such page (404): it answered, so it is there, undescribed.
        assert await lanes.probe("mpp") is None
        # Garbage where HTTP should be: a fresh TCP connect decides, and it connects.
        await old.set_fault("garbage")
        assert await lanes.probe("old") is None
        await new.set_fault("refuse")
        with pytest.raises(PhoneUnreachable):
            await lanes.probe(new.name)


async def test_a_probe_waits_for_the_push_on_the_wire(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(phones=1, names=["desk"], delay_ms=300)
    desk = fleet.phones[0]
    async with PhoneLanes({"desk": _target("desk", desk.address)}) as lanes:
        push = asyncio.create_task(lanes.execute("desk", [ExecuteItem("Key:Headset")]))
        await eventually(lambda: len(desk.state.requests) == 1)
        info = await lanes.probe("desk")
        # Asked while the push was on the wire, it was sent only after the push was answered.
        assert push.done()
        await push
    assert info is not None
    assert [r["method"] for r in desk.state.requests] == ["POST", "GET"]


def _config(fleet: Any, interval: str = "1s") -> dict[str, Any]:
    lobby, office = fleet.phones
    return {
        "webhook": {"token": TOKEN},
        "health": {"interval": interval},
        "phones": [
            {"name": "lobby", "host": lobby.address, "groups": ["frontdesk"]},
            {
                "name": "office",
                "host": office.address,
                "groups": ["frontdesk", "it"],
                "timeout": "1s",
            },
        ],
        "rules": [
            {"name": "bell", "on": "webhook:bell", "to": ["lobby"], "execute": ["Key:Headset"]}
        ],
    }


async def test_api_phones_and_metrics_cover_every_phone_and_an_outage_within_an_interval(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=2, names=["lobby", "office"], tone_ms=10)
    await daemon_runner.start(_config(fleet))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.get("/api/phones")).status_code == 401

        async def phones() -> dict[str, Any]:
            answer = await client.get("/api/phones", headers=AUTH)
            assert answer.status_code == 200
            return {p["name"]: p for p in answer.json()}

        async def both_up() -> bool:
            return all(p["reachable"] is True for p in (await phones()).values())

        # Neither phone was pushed to: the probes alone find them.
        await eventually(both_up)
        listed = await phones()
        assert list(listed) == ["lobby", "office"]
        office = listed["office"]
        assert office["host"] == fleet.phones[1].address
        assert office["groups"] == ["frontdesk", "it"]
        assert (office["model"], office["firmware"]) == ("CP-8841", "14.2(1)")
        assert office["mac"] and office["since"] is not None
        assert office["last_push"] is None and office["pending"] == 0
        for name in ("lobby", "office"):
            assert daemon_runner.metric("phonepush_phone_up", phone=name) == 1
            assert (
                daemon_runner.metric(
                    "phonepush_phone_info", phone=name, model="CP-8841", firmware="14.2(1)"
                )
                == 1
            )

        # A push is recorded as the phone's last push, with its result.
        assert (await client.post("/hooks/bell", json={}, headers=AUTH)).status_code == 202
        await eventually(lambda: fleet.phones[0].state.pushes == 1)

        async def pushed() -> bool:
            return (await phones())["lobby"]["last_push"] is not None

        await eventually(pushed)
        last = (await phones())["lobby"]["last_push"]
        assert last["result"] == "delivered" and last["at"] > 0

        # The office goes away: within one interval (1 s, plus its 1 s timeout) it shows.
        await fleet.phones[1].set_fault("refuse")

        async def office_down() -> bool:
            return (await phones())["office"]["reachable"] is False

        await eventually(office_down, timeout=4)
        assert daemon_runner.metric("phonepush_phone_up", phone="office") == 0
        assert (await phones())["lobby"]["reachable"] is True
    # Probes go through the lanes: none overlapped the push.
    assert fleet.phones[0].state.overlaps == 0


async def test_interval_zero_probes_nothing(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=2, names=["lobby", "office"], tone_ms=10)
    await daemon_runner.start(_config(fleet, interval="0"))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        listed = (await client.get("/api/phones")).json()
        assert [p["reachable"] for p in listed] == [None, None]
        assert (await client.post("/hooks/bell", json={})).status_code == 202
        await eventually(lambda: fleet.phones[0].state.pushes == 1)
        await eventually(lambda: daemon_runner.metric("phonepush_phone_up", phone="lobby") == 1)

        async def pushed() -> bool:
            return (await client.get("/api/phones")).json()[0]["last_push"] is not None

        await eventually(pushed)
        # The push told the health what a probe would have: lobby is there, office unknown.
        listed = (await client.get("/api/phones")).json()
        assert [p["reachable"] for p in listed] == [True, None]
        assert listed[0]["model"] == "" and listed[0]["last_push"]["result"] == "delivered"
    # A push still tells the health; nothing asked the phones for their information.
    assert all(r["method"] == "POST" for p in fleet.phones for r in p.state.requests)


async def test_a_reload_probes_an_added_phone_and_drops_a_removed_ones_info(
    tmp_path: Path, daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=2, names=["lobby", "office"], tone_ms=10)
    lobby, office = fleet.phones
    path = tmp_path / "phonepush.toml"

    def write(phones: dict[str, str]) -> None:
        text = (
            f'[server]\nlisten = "127.0.0.1:{daemon_runner.port}"\n'
            f'[spool]\npath = "{daemon_runner.spool}"\n'
            '[webhook]\nallow_anonymous = true\n[health]\ninterval = "1s"\n'
        )
        for name, host in phones.items():
            text += f'[[phones]]\nname = "{name}"\nhost = "{host}"\n'
        path.write_text(text, encoding="utf-8")

    write({"lobby": lobby.address})
    await daemon_runner.start_file(path)
    info = {"model": "CP-8841", "firmware": "14.2(1)"}
    await eventually(
        lambda: daemon_runner.metric("phonepush_phone_info", phone="lobby", **info) == 1
    )
    write({"office": office.address})
    assert daemon_runner.daemon is not None
    daemon_runner.daemon.reload()
    await eventually(
        lambda: daemon_runner.metric("phonepush_phone_info", phone="office", **info) == 1
    )
    assert (
        daemon_runner.registry.get_sample_value("phonepush_phone_info", {"phone": "lobby", **info})
        is None
    )
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        listed = (await client.get("/api/phones")).json()
    assert [(p["name"], p["reachable"]) for p in listed] == [("office", True)]
