"""The contract config (config/phonepush.toml, as shipped) end to end: a real mosquitto with
credentials, a plain-HTTP phone and a pinned-HTTPS phone (both simulated, both with Basic auth),
real-shaped zigbee2mqtt, Frigate and Alertmanager events."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from _daemon_fixtures import DaemonRunner, eventually
from _mqtt_fixtures import Broker, StartMosquitto
from phonepush.app.daemon import Daemon
from phonepush.app.systemd import Notifier
from phonepush.config import parse_config
from phonepush.sim.simulator import Fleet

EXAMPLE = Path(__file__).parent.parent / "config" / "phonepush.toml"


@pytest.fixture
async def lobby(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(names=["lobby"], username="push", password="secret", tone_ms=20)
    return fleet


@pytest.fixture
async def office(make_fleet: Any, tmp_path: Path) -> Fleet:
    fleet: Fleet = await make_fleet(
        names=["office"],
        username="push",
        password="secret",
        tls=True,
        cert_dir=tmp_path / "office-cert",
        tone_ms=20,
    )
    return fleet


@pytest.fixture
def broker(start_mosquitto: StartMosquitto) -> Broker:
    return start_mosquitto(users={"phonepush": "secret"})


def example_config(
    runner: DaemonRunner,
    broker: Broker,
    lobby: Fleet,
    office: Fleet,
    extra_rules: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The shipped example, changed only where it must point at this machine's parts."""
    data: dict[str, Any] = tomllib.loads(EXAMPLE.read_text())
    data["server"]["listen"] = f"127.0.0.1:{runner.port}"
    data["server"]["public_url"] = runner.url
    data["spool"]["path"] = str(runner.spool)
    data["mqtt"]["url"] = broker.url
    data["phones"][0]["host"] = lobby.phones[0].address
    data["phones"][1]["host"] = office.phones[0].address
    assert office.certificate is not None
    data["phones"][1]["certificate"] = str(office.certificate)
    data["dispatch"] = {"retry_initial": "50ms", "retry_max": "200ms"}
    data["rules"].extend(extra_rules or [])
    return data


async def publish(broker: Broker, topic: str, payload: Any) -> None:
    body = payload if isinstance(payload, str | bytes) else json.dumps(payload)
    await asyncio.to_thread(broker.publish, topic, body)


async def test_example_config_zigbee2mqtt_doorbell(
    daemon_runner: DaemonRunner, broker: Broker, lobby: Fleet, office: Fleet
) -> None:
    running = await daemon_runner.start(example_config(daemon_runner, broker, lobby, office))
    assert running.mqtt is not None and running.mqtt.connected
    lobby_phone, office_phone = lobby.phones[0], office.phones[0]

    # The /action copy of a press, as zigbee2mqtt publishes it: bare text.
    await publish(broker, "zigbee2mqtt/door/action", "single")
    for phone in (lobby_phone, office_phone):
        await eventually(lambda p=phone: p.state.last_tone == "Chime.raw", timeout=3)
        await eventually(lambda p=phone: p.state.screen.text == "Someone is at the door")
        assert p_backlight(phone) == ("On", 10)
        assert phone.state.screen.title == "Doorbell"

    # The empty action zigbee2mqtt sends after each press (HA integration) does not page, and a
    # second press inside the 15 s cooldown is dropped.
    await publish(broker, "zigbee2mqtt/door/action", "")
    await publish(broker, "zigbee2mqtt/door/action", "double")
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="lobby", result="suppressed")
            == 1
        )
    )
    assert lobby_phone.state.pushes == 1 and office_phone.state.pushes == 1
    # /metrics agree with the phones.
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="office", result="delivered")
            == 1
        )
    )
    assert daemon_runner.metric("phonepush_events_total", source="mqtt", rule="doorbell") == 2
    assert daemon_runner.metric("phonepush_mqtt_connected") == 1


def p_backlight(phone: Any) -> tuple[str, int | None]:
    return phone.state.backlight.state, phone.state.backlight.minutes


FRIGATE_RULE = {
    "name": "person",
    "on": "mqtt:frigate/events",
    "when": "payload.type == 'new' and payload.after.label == 'person'",
    "to": ["frontdesk"],
    "execute": ["Play:Chime.raw"],
    "message": {"title": "{{ payload.after.camera }}", "text": "Person detected"},
    "dedupe": "{{ payload.after.id }}",
    "cooldown": "10m",
    "ttl": "2m",
}


def frigate(kind: str, object_id: str) -> dict[str, Any]:
    after = {
        "id": object_id,
        "camera": "front_door",
        "label": "person",
        "top_score": 0.95,
        "current_zones": ["driveway"],
    }
    return {"type": kind, "before": after, "after": after}


async def test_frigate_new_events_deduplicated_on_their_id(
    daemon_runner: DaemonRunner, broker: Broker, lobby: Fleet, office: Fleet
) -> None:
    await daemon_runner.start(
        example_config(daemon_runner, broker, lobby, office, extra_rules=[FRIGATE_RULE])
    )
    phone = lobby.phones[0]
    await publish(broker, "frigate/events", frigate("new", "1607123955.475377-mxklsc"))
    await publish(broker, "frigate/events", frigate("update", "1607123955.475377-mxklsc"))
    await publish(broker, "frigate/events", frigate("new", "1607123955.475377-mxklsc"))
    await publish(broker, "frigate/events", frigate("end", "1607123955.475377-mxklsc"))
    await publish(broker, "frigate/events", frigate("new", "1607123999.000001-abcdef"))
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="lobby", result="delivered")
            == 2
        )
    )
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="lobby", result="suppressed")
            == 1
        )
    )
    assert phone.state.screen.title == "front_door"
    assert phone.state.pushes == 2


ALERT = {
    "version": "4",
    "groupKey": '{}:{alertname="UPSOnBattery"}',
    "status": "firing",
    "receiver": "phones",
    "groupLabels": {"alertname": "UPSOnBattery"},
    "commonLabels": {"alertname": "UPSOnBattery"},
    "commonAnnotations": {"summary": "UPS on battery, 12 min left"},
    "externalURL": "http://am:9093",
    "truncatedAlerts": 0,
    "alerts": [],
}


async def test_example_config_alertmanager_webhook_reaches_the_https_phone(
    daemon_runner: DaemonRunner, broker: Broker, lobby: Fleet, office: Fleet
) -> None:
    await daemon_runner.start(example_config(daemon_runner, broker, lobby, office))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        answer = await client.post(
            "/hooks/alertmanager", json=ALERT, headers={"Authorization": "Bearer change-me"}
        )
    assert answer.status_code == 202 and answer.json()["rules"] == ["alerts"]
    office_phone = office.phones[0]
    await eventually(lambda: office_phone.state.screen.title == "UPSOnBattery")
    assert office_phone.state.screen.text == "UPS on battery, 12 min left"
    assert office_phone.state.last_tone == "Alarm.raw"
    assert lobby.phones[0].state.pushes == 0


async def test_readyz_follows_the_broker(
    daemon_runner: DaemonRunner, broker: Broker, lobby: Fleet, office: Fleet
) -> None:
    await daemon_runner.start(example_config(daemon_runner, broker, lobby, office))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.get("/readyz")).status_code == 200
        await asyncio.to_thread(broker.stop)
        await eventually(lambda: daemon_runner.metric("phonepush_mqtt_connected") == 0)
        answer = await client.get("/readyz")
        assert answer.status_code == 503 and answer.json()["checks"]["mqtt"] != "ok"
        await asyncio.to_thread(broker.start)
        await eventually(lambda: daemon_runner.metric("phonepush_mqtt_connected") == 1, timeout=15)

        # Connected (the gauge, at CONNACK) comes just before subscribed (ready).
        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await eventually(ready)


async def test_with_the_broker_down_ready_is_logged_only_once_it_is_true(
    daemon_runner: DaemonRunner,
    start_mosquitto: StartMosquitto,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="phonepush")
    broker = start_mosquitto()
    await asyncio.to_thread(broker.stop)
    config = daemon_runner.config(
        {
            "mqtt": {"url": broker.url, "client_id": "late-broker"},
            "phones": [{"name": "desk", "host": "127.0.0.1:9"}],
            "rules": [
                {"name": "bell", "on": "mqtt:bell", "to": ["desk"], "execute": ["Key:Speaker"]}
            ],
        }
    )
    said = (
        f"listening on 127.0.0.1:{daemon_runner.port}, 1 phone, 1 rule, MQTT mqtt://127.0.0.1:"
        f"{broker.port}"
    )

    def daemon_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "phonepush.daemon"]

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        systemd.settimeout(5)
        daemon = Daemon(
            config,
            registry=CollectorRegistry(),
            notifier=Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}),
            mqtt_ready_wait=0.3,
        )
        task = asyncio.create_task(daemon.run())
        try:
            await asyncio.wait_for(daemon.ready.wait(), 10)
            # systemd hears READY=1 as before: the webhook side serves without the broker.
            notified = (await asyncio.to_thread(systemd.recv, 4096)).decode().split("\n")
            assert notified == ["READY=1", "STATUS=listening; MQTT not connected yet"]
            async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
                assert (await client.get("/readyz")).status_code == 503
                assert not [m for m in daemon_lines() if m.startswith("phonepush ready")]
                assert (
                    f"phonepush not ready: {said} not connected after 300ms (/readyz answers "
                    "503); still trying"
                ) in daemon_lines()

                await asyncio.to_thread(broker.start)

                async def ready() -> bool:
                    return (await client.get("/readyz")).status_code == 200

                await eventually(ready, timeout=15)
                await eventually(lambda: f"phonepush ready: {said}, connected" in daemon_lines())
            notified = (await asyncio.to_thread(systemd.recv, 4096)).decode().split("\n")
            assert notified == ["STATUS=listening; MQTT connected"]
        finally:
            daemon.stop()
            await asyncio.wait_for(task, 15)


def test_example_config_loads_as_shipped() -> None:
    config = parse_config(tomllib.loads(EXAMPLE.read_text()), environ={})
    assert [p.name for p in config.phones] == ["lobby", "office"]
    assert [r.name for r in config.rules] == ["doorbell", "alerts"]
