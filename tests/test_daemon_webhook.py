"""The daemon end to end over webhooks: real HTTP in, simulated phones out, metrics agreeing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from phonepush.sim.simulator import Fleet

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

ALERTMANAGER_FIRING: dict[str, Any] = {
    "version": "4",
    "groupKey": '{}:{alertname="DiskFull"}',
    "truncatedAlerts": 0,
    "status": "firing",
    "receiver": "phones",
    "groupLabels": {"alertname": "DiskFull"},
    "commonLabels": {"alertname": "DiskFull", "severity": "critical", "instance": "nas:9100"},
    "commonAnnotations": {"summary": "Disk /srv is 97% full on nas & <backup>"},
    "externalURL": "http://alertmanager:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "DiskFull", "instance": "nas:9100"},
            "annotations": {"summary": "Disk /srv is 97% full on nas & <backup>"},
            "startsAt": "2026-11-26T09:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph",
            "fingerprint": "c4b9f6e2a1d0b7e3",
        }
    ],
}


def config(fleet: Fleet, **rule_overrides: Any) -> dict[str, Any]:
    lobby, office, server_room = fleet.phones
    alerts: dict[str, Any] = {
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
    }
    alerts.update(rule_overrides)
    return {
        "webhook": {"token": TOKEN},
        "phones": [
            {"name": "lobby", "host": lobby.address, "groups": ["frontdesk"]},
            {"name": "office", "host": office.address, "groups": ["frontdesk", "it"]},
            {"name": "server-room", "host": server_room.address, "groups": ["it"]},
        ],
        "rules": [
            alerts,
            {
                "name": "ha-announce",
                "on": "webhook:home-assistant",
                "to": ["all"],
                "execute": ["Display:On:{{ payload.minutes | default(5) }}"],
                "message": {"title": "Home Assistant", "text": "{{ payload.message }}"},
                "ttl": "30s",
            },
        ],
    }


@pytest.fixture
async def phones(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=3, names=["lobby", "office", "server-room"], tone_ms=20)
    return fleet


async def test_alertmanager_firing_pages_it_phones_and_resolved_does_not(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        answer = await client.post("/hooks/alertmanager", json=ALERTMANAGER_FIRING)
        assert answer.status_code == 202
        body = answer.json()
        assert body["rules"] == ["alerts"] and body["event"]

        office, server_room, lobby = (phones.phone(n) for n in ("office", "server-room", "lobby"))
        await eventually(
            lambda: (
                office.state.last_tone == "Alarm.raw" and server_room.state.last_tone == "Alarm.raw"
            )
        )
        # The page shows the alert, with the markup characters intact, not broken XML.
        for phone in (office, server_room):
            await eventually(lambda p=phone: p.state.screen.title == "DiskFull")
            assert phone.state.screen.text == "Disk /srv is 97% full on nas & <backup>"
        assert lobby.state.pushes == 0

        resolved = dict(ALERTMANAGER_FIRING, status="resolved")
        answer = await client.post("/hooks/alertmanager", json=resolved)
        assert answer.status_code == 202 and answer.json()["rules"] == []

    # Each phone's answer is recorded as it arrives (the two Play: answers come apart): wait for
    # both before comparing.
    await eventually(
        lambda: all(
            daemon_runner.metric("phonepush_deliveries_total", phone=name, result="delivered") == 1
            for name in ("office", "server-room")
        )
    )
    # The metrics agree with what the phones received.
    assert office.state.pushes == 1 and server_room.state.pushes == 1
    assert (
        daemon_runner.metric("phonepush_deliveries_total", phone="lobby", result="delivered") == 0
    )
    assert daemon_runner.metric("phonepush_events_total", source="webhook", rule="alerts") == 1
    assert daemon_runner.metric("phonepush_events_total", source="webhook", rule="") == 1


async def test_repeat_with_same_group_key_is_deduplicated(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        for _ in range(3):
            answer = await client.post("/hooks/alertmanager", json=ALERTMANAGER_FIRING)
            assert answer.status_code == 202
    office = phones.phone("office")
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="office", result="suppressed")
            == 2
        )
    )
    assert office.state.pushes == 1


async def test_home_assistant_form_and_json_bodies(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        answer = await client.post(
            "/hooks/home-assistant", json={"message": "Washing machine finished", "minutes": 2}
        )
        assert answer.status_code == 202
        lobby = phones.phone("lobby")
        await eventually(lambda: lobby.state.screen.text == "Washing machine finished")
        assert lobby.state.backlight.state == "On" and lobby.state.backlight.minutes == 2

        answer = await client.post("/hooks/home-assistant", data={"message": "Dryer done"})
        assert answer.status_code == 202
        await eventually(lambda: lobby.state.screen.text == "Dryer done")
        assert lobby.state.backlight.minutes == 5


async def test_bad_requests_are_refused_with_clear_errors(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        answer = await client.post("/hooks/alertmanager", json=ALERTMANAGER_FIRING)
        assert answer.status_code == 401
        answer = await client.post(
            "/hooks/alertmanager", json={}, headers={"Authorization": "Bearer wrong"}
        )
        assert answer.status_code == 401
        answer = await client.post("/hooks/nosuchhook", json={}, headers=AUTH)
        assert answer.status_code == 404 and "nosuchhook" in answer.json()["error"]
        answer = await client.post(
            "/hooks/alertmanager",
            content=b'{"status": "firing",',
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert answer.status_code == 400 and "malformed JSON" in answer.json()["error"]
        answer = await client.post(
            "/hooks/alertmanager",
            content=json.dumps({"pad": "x" * 70_000}),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert answer.status_code == 413
    assert all(p.state.pushes == 0 for p in phones.phones)


async def test_phone_down_then_back_is_retried_and_delivered(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    office = phones.phone("office")
    await office.set_fault("refuse")
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        answer = await client.post("/hooks/alertmanager", json=ALERTMANAGER_FIRING)
        assert answer.status_code == 202
    server_room = phones.phone("server-room")
    await eventually(lambda: server_room.state.last_tone == "Alarm.raw")
    await eventually(
        lambda: daemon_runner.metric("phonepush_delivery_retries_total", phone="office") >= 2
    )
    assert daemon_runner.metric("phonepush_phone_up", phone="office") == 0
    await office.set_fault("none")
    await eventually(lambda: office.state.last_tone == "Alarm.raw")
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="office", result="delivered")
            == 1
        )
    )
    assert daemon_runner.metric("phonepush_phone_up", phone="office") == 1


async def test_phone_down_past_the_ttl_expires(daemon_runner: DaemonRunner, phones: Fleet) -> None:
    office = phones.phone("office")
    await office.set_fault("error", number=6)
    await daemon_runner.start(config(phones, ttl="500ms"))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        answer = await client.post("/hooks/alertmanager", json=ALERTMANAGER_FIRING)
        assert answer.status_code == 202
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="office", result="expired")
            == 1
        )
    )
    assert (
        daemon_runner.metric("phonepush_deliveries_total", phone="server-room", result="delivered")
        == 1
    )
    assert daemon_runner.metric("phonepush_spool_pending") == 0


async def test_permanent_errors_are_not_retried(daemon_runner: DaemonRunner, phones: Fleet) -> None:
    office = phones.phone("office")
    await office.set_fault("error", number=4)
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        await client.post("/hooks/alertmanager", json=ALERTMANAGER_FIRING)
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="office", result="failed") == 1
        )
    )
    assert daemon_runner.metric("phonepush_delivery_retries_total", phone="office") == 0


async def test_restart_resumes_pending_deliveries_from_the_spool(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    office = phones.phone("office")
    await office.set_fault("refuse")
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        answer = await client.post("/hooks/alertmanager", json=ALERTMANAGER_FIRING)
        assert answer.status_code == 202
    server_room = phones.phone("server-room")
    await eventually(lambda: server_room.state.last_tone == "Alarm.raw")
    await daemon_runner.stop()
    assert office.state.pushes == 0

    await office.set_fault("none")
    await daemon_runner.start(config(phones))
    await eventually(lambda: office.state.last_tone == "Alarm.raw")
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="office", result="delivered")
            == 1
        )
    )
    # What was delivered before the restart is not sent again.
    assert server_room.state.pushes == 1


async def test_health_readiness_metrics_and_pages(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["spool"] == "ok"
        metrics = (await client.get("/metrics")).text
        assert "phonepush_spool_pending 0.0" in metrics
        assert (await client.get("/pages/nope")).status_code == 404
        answer = await client.post("/hooks/alertmanager", json=ALERTMANAGER_FIRING, headers=AUTH)
        office = phones.phone("office")
        await eventually(lambda: office.state.screen.url != "")
        page = await client.get(office.state.screen.url.removeprefix(daemon_runner.url))
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/xml")
        assert "<Title>DiskFull</Title>" in page.text
        assert answer.json()["event"] in office.state.screen.url
