"""Acknowledging a page from the phone: softkeys on the page, the Ack press recorded, answered,
counted, published to MQTT and to the ack webhook; the daemon runs for real against simulated
phones, and Ack is pressed the way a person would (the simulator fetches the softkey's URL)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from _mqtt_fixtures import Broker
from _pg_fixtures import OpenStore
from phonepush.sim.simulator import Fleet, SimPhone

TOKEN = "t0ken-for-acks"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def config(fleet: Fleet, **rule: Any) -> dict[str, Any]:
    lobby, office, server_room = fleet.phones
    alert: dict[str, Any] = {
        "name": "disk",
        "on": "webhook:alert",
        "to": ["it"],
        "execute": ["Play:Alarm.raw"],
        "message": {"title": "DiskFull", "text": "{{ payload.text }}"},
        "ack": True,
    }
    alert.update(rule)
    return {
        "webhook": {"token": TOKEN},
        "phones": [
            {"name": "lobby", "host": lobby.address},
            {"name": "office", "host": office.address, "groups": ["it"]},
            {"name": "server-room", "host": server_room.address, "groups": ["it"]},
        ],
        "rules": [alert],
    }


@pytest.fixture
async def phones(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=3, names=["lobby", "office", "server-room"], tone_ms=20)
    return fleet


async def fire(runner: DaemonRunner, text: str = "/srv is 97% full") -> str:
    async with httpx.AsyncClient(base_url=runner.url, headers=AUTH) as client:
        answer = await client.post("/hooks/alert", json={"text": text})
    assert answer.status_code == 202, answer.text
    event_id: str = answer.json()["event"]
    return event_id


async def status(runner: DaemonRunner, event_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=runner.url, headers=AUTH) as client:
        answer = await client.get(f"/api/events/{event_id}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def shows_page(phone: SimPhone) -> None:
    await eventually(lambda: any(k.name == "Ack" for k in phone.state.screen.softkeys))


async def test_page_carries_ack_and_close_and_each_phone_its_own_token(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    await fire(daemon_runner)
    office, server_room = phones.phone("office"), phones.phone("server-room")
    await shows_page(office)
    await shows_page(server_room)

    keys = {k.name: k for k in office.state.screen.softkeys}
    assert office.state.screen.title == "DiskFull"
    assert office.state.screen.text == "/srv is 97% full"
    assert set(keys) == {"Ack", "Close"}
    assert keys["Close"].url == "SoftKey:Exit"
    assert keys["Ack"].url.startswith(f"{daemon_runner.url}/ack/")
    other = next(k for k in server_room.state.screen.softkeys if k.name == "Ack")
    # Each phone's Ack names that phone: an unguessable token, not a counter.
    assert other.url != keys["Ack"].url
    token = keys["Ack"].url.rsplit("/", 1)[1]
    assert len(token) >= 22
    for phone in (office, server_room):
        assert len(phone.state.screen.url) <= 256
    assert phones.phone("lobby").state.pushes == 0


async def test_ack_pressed_on_the_phone_is_recorded_answered_and_counted(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    event_id = await fire(daemon_runner)
    office = phones.phone("office")
    await shows_page(office)

    # Pressed through the simulator's control endpoint, as a test harness outside would.
    async with httpx.AsyncClient() as control:
        answer = await control.post(
            f"{phones.control_url}/phones/office/press", json={"name": "Ack"}
        )
    assert answer.status_code == 200, answer.text
    assert office.state.screen.title == "Acknowledged"
    assert "Acknowledged on office" in office.state.screen.text
    assert [k.name for k in office.state.screen.softkeys] == ["Close"]
    assert daemon_runner.metric("phonepush_acks_total", rule="disk", phone="office") == 1

    body = await status(daemon_runner, event_id)
    mine = [d for d in body["deliveries"] if d["phone"] == "office"]
    assert [d["state"] for d in mine] == ["acknowledged"]
    assert mine[0]["acknowledged_at"] >= mine[0]["created_at"]
    # Who: the phone, and the model and address its request came from.
    assert "CP-8841" in mine[0]["acknowledged_from"]
    assert "127.0.0.1" in mine[0]["acknowledged_from"]
    (alert,) = body["alerts"]
    assert alert["state"] == "acknowledged" and alert["ended_by"] == "office"

    # Pressing Ack again (the same URL, fetched again) changes nothing and says so.
    ack_url = next(p["url"] for p in office.state.presses if p["name"] == "Ack")
    async with httpx.AsyncClient() as phone_side:
        again = await phone_side.get(ack_url)
    assert again.status_code == 200
    assert "Already acknowledged on office" in again.text
    assert daemon_runner.metric("phonepush_acks_total", rule="disk", phone="office") == 1


async def test_unknown_token_and_wrong_page_are_refused(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    await fire(daemon_runner)
    office = phones.phone("office")
    await shows_page(office)
    page_url = office.state.screen.url
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.get("/ack/not-a-real-token-at-all")).status_code == 404
        page_id, _, token = page_url.removeprefix(f"{daemon_runner.url}/pages/").partition("/")
        assert (await client.get(f"/pages/{page_id}/guessed{token[7:]}")).status_code == 404
        assert (await client.get(f"/pages/{page_id}0/{token}")).status_code == 404
    assert daemon_runner.metric("phonepush_acks_total", rule="disk", phone="office") == 0


async def test_close_leaves_the_page_without_acknowledging(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    event_id = await fire(daemon_runner)
    office = phones.phone("office")
    await shows_page(office)
    await office.press(name="Close")
    assert office.state.screen.title == ""
    body = await status(daemon_runner, event_id)
    assert body["alerts"][0]["state"] == "active"
    assert {d["state"] for d in body["deliveries"]} <= {"pending", "delivered"}


async def test_ack_is_published_to_mqtt(
    daemon_runner: DaemonRunner, phones: Fleet, mosquitto: Broker
) -> None:
    data = config(phones)
    data["mqtt"] = {"url": mosquitto.url, "client_id": "acks-test"}
    await daemon_runner.start(data)
    event_id = await fire(daemon_runner)
    office = phones.phone("office")
    await shows_page(office)
    with mosquitto.watch("phonepush/ack/#") as watcher:
        await office.press(name="Ack")
        message = await watcher.next()
    assert message.topic == "phonepush/ack/disk"
    body = json.loads(message.payload)
    assert body["rule"] == "disk" and body["event"] == event_id and body["phone"] == "office"
    assert isinstance(body["at"], float)


async def test_ack_webhook_is_called(daemon_runner: DaemonRunner, phones: Fleet) -> None:
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        received.put_nowait(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        data = config(phones)
        data["ack"] = {"webhook": f"http://127.0.0.1:{port}/acked"}
        await daemon_runner.start(data)
        event_id = await fire(daemon_runner)
        server_room = phones.phone("server-room")
        await shows_page(server_room)
        await server_room.press(name="Ack")
        body = await asyncio.wait_for(received.get(), 5)
    finally:
        server.close()
        await server.wait_closed()
    assert body["rule"] == "disk" and body["event"] == event_id
    assert body["phone"] == "server-room" and "CP-8841" in body["by"]


def test_ack_needs_a_message() -> None:
    from phonepush.config import parse_config
    from phonepush.errors import ConfigError

    data = {
        "webhook": {"allow_anonymous": True},
        "phones": [{"name": "office", "host": "127.0.0.1:9"}],
        "rules": [{"name": "r", "on": "webhook:x", "to": "office", "execute": ["Play:Chime.raw"]}],
    }
    data["rules"][0]["ack"] = True  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"rules\[r\]\.ack: needs a message"):
        parse_config(data, environ={})


@pytest.mark.parametrize(
    ("status_topic", "prefix"),
    [("phonepush/status", "phonepush"), ("site/a/phonepush", "site/a"), ("status", "status")],
)
def test_ack_topic_prefix_is_the_status_topics_parent(status_topic: str, prefix: str) -> None:
    from phonepush.alerting.acks import ack_prefix
    from phonepush.config import MqttConfig

    mqtt = MqttConfig(url="mqtt://127.0.0.1", status_topic=status_topic)
    assert ack_prefix(mqtt) == prefix
    assert ack_prefix(MqttConfig(url="mqtt://127.0.0.1", status_topic="")) == ""


async def test_purge_forgets_old_acknowledgements_with_their_events(
    open_store: OpenStore,
) -> None:
    from phonepush.alerting.ledger import acknowledge
    from phonepush.app.builder import Services, build
    from phonepush.config import parse_config
    from phonepush.events import Event
    from phonepush.metrics import Metrics
    from phonepush.pipeline.intake import Intake
    from phonepush.store.spool import Delivery

    data = {
        "webhook": {"allow_anonymous": True},
        "phones": [{"name": "office", "host": "127.0.0.1:9"}],
        "rules": [
            {
                "name": "disk",
                "on": "webhook:alert",
                "to": "office",
                "message": {"title": "DiskFull"},
                "ack": True,
            }
        ],
    }
    cfg = parse_config(data, environ={})
    metrics = Metrics()
    sent: list[Delivery] = []
    async with open_store() as spool:
        built = build(cfg, Services(spool, metrics, sent.extend))
        intake = Intake(built.pipeline, spool, metrics=metrics, submit=sent.extend)
        accepted = await intake.accept(Event("webhook", "alert", b"{}", received_at=1000.0))
        (delivery,) = sent
        await spool.deliveries.finish(delivery.id, "delivered")
        (phone,) = await spool.alerts.phones_of(accepted.event.id)
        assert phone.token is not None
        result = await acknowledge(spool, phone.token, 1001.0, "CP-8841 127.0.0.1")
        assert result is not None and result.first and result.alert.state == "acknowledged"

        assert await spool.events.purge(before=2000.0) == 1
        assert await spool.alerts.by_token(phone.token) is None
        assert await spool.alerts.of_event(accepted.event.id) == []
        assert await acknowledge(spool, phone.token, 1002.0, "") is None
