"""Softkeys that act: a doorbell page with an "Open" action on a simulated phone; pressing it
publishes on the daemon's own MQTT connection (a real mosquitto) or calls a real local HTTP
server; one-time tokens, confirmation, expiry, dial softkeys; every press on the event, counted.
Softkeys are pressed the way a person would: the simulator fetches the softkey's URL."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from _mqtt_fixtures import Broker, Watcher
from phonepush.config import parse_config
from phonepush.errors import ConfigError
from phonepush.sim.simulator import Fleet, SimPhone
from phonepush.store.spool import Spool

OPEN = {
    "label": "Open",
    "mqtt": {"topic": "zigbee2mqtt/{{ payload.lock }}/set", "payload": '{"state": "UNLOCK"}'},
}


def config(fleet: Fleet, *actions: dict[str, Any], **rule: Any) -> dict[str, Any]:
    doorbell: dict[str, Any] = {
        "name": "doorbell",
        "on": "webhook:door",
        "to": ["desk"],
        "message": {"title": "Doorbell", "text": "Someone is at the {{ payload.door }}"},
        "actions": list(actions),
    }
    doorbell.update(rule)
    return {
        "phones": [{"name": "desk", "host": fleet.phones[0].address}],
        "rules": [doorbell],
    }


async def ring(runner: DaemonRunner, **payload: Any) -> str:
    async with httpx.AsyncClient(base_url=runner.url) as client:
        answer = await client.post(
            "/hooks/door", json={"door": "front door", "lock": "front_lock", **payload}
        )
    assert answer.status_code == 202, answer.text
    event_id: str = answer.json()["event"]
    return event_id


async def status(runner: DaemonRunner, event_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=runner.url) as client:
        answer = await client.get(f"/api/events/{event_id}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def shows(phone: SimPhone, label: str) -> None:
    await eventually(lambda: any(k.name == label for k in phone.state.screen.softkeys))


async def nothing_published(broker: Broker, watcher: Watcher) -> None:
    """No action message arrived: the daemon answers the phone only once its publish is
    PUBACKed, so one sent before this marker would reach the watcher first."""
    await asyncio.to_thread(broker.publish, "zigbee2mqtt/marker", b"-")
    assert (await watcher.next()).topic == "zigbee2mqtt/marker"


@pytest.fixture
async def fleet(make_fleet: Any) -> Fleet:
    made: Fleet = await make_fleet(phones=1, names=["desk"], tone_ms=20)
    return made


def with_mqtt(data: dict[str, Any], broker: Broker) -> dict[str, Any]:
    data["mqtt"] = {"url": broker.url, "client_id": "actions-test"}
    return data


async def test_open_publishes_once_and_a_second_press_is_already_done(
    daemon_runner: DaemonRunner, fleet: Fleet, mosquitto: Broker
) -> None:
    await daemon_runner.start(with_mqtt(config(fleet, OPEN), mosquitto))
    event_id = await ring(daemon_runner)
    desk = fleet.phone("desk")
    await shows(desk, "Open")
    assert desk.state.screen.text == "Someone is at the front door"
    assert [k.name for k in desk.state.screen.softkeys] == ["Open", "Close"]
    page = desk.state.screen
    open_key = page.softkeys[0]
    assert "/act/" in open_key.url and open_key.position == 1

    with mosquitto.watch("zigbee2mqtt/#") as watcher:
        # A HEAD (a link checker, a proxy) does nothing.
        async with httpx.AsyncClient() as client:
            assert (await client.head(open_key.url)).status_code == 405
        # Pressed through the simulator's control endpoint, as a test harness or person would.
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{fleet.control_url}/phones/desk/press", json={"name": "Open"}
            )
        assert answer.status_code == 200, answer.text
        message = await watcher.next()
        assert message.topic == "zigbee2mqtt/front_lock/set"
        assert json.loads(message.payload) == {"state": "UNLOCK"}
        assert desk.state.screen.text == "Open: done"

        # Back on the page (a real phone's Exit returns to it), the same softkey again:
        # nothing is published.
        desk.state.screen = page
        await desk.press(name="Open")
        assert desk.state.screen.text == "Open: already done."
        await nothing_published(mosquitto, watcher)

    body = await status(daemon_runner, event_id)
    results = [(a["phone"], a["action"], a["result"]) for a in body["actions"]]
    assert results == [("desk", "Open", "ok"), ("desk", "Open", "already_done")]
    assert "CP-" in body["actions"][0]["from"] and "127.0.0.1" in body["actions"][0]["from"]
    labels = {"rule": "doorbell", "action": "Open"}
    assert daemon_runner.metric("phonepush_actions_total", **labels, result="ok") == 1
    assert daemon_runner.metric("phonepush_actions_total", **labels, result="already_done") == 1


async def test_confirm_needs_yes(
    daemon_runner: DaemonRunner, fleet: Fleet, mosquitto: Broker
) -> None:
    await daemon_runner.start(with_mqtt(config(fleet, {**OPEN, "confirm": True}), mosquitto))
    await ring(daemon_runner)
    desk = fleet.phone("desk")
    await shows(desk, "Open")
    with mosquitto.watch("zigbee2mqtt/#") as watcher:
        await desk.press(name="Open")
        assert desk.state.screen.text == "Open?"
        assert [k.name for k in desk.state.screen.softkeys] == ["Yes", "No"]
        await nothing_published(mosquitto, watcher)
        await desk.press(name="Yes")
        message = await watcher.next()
    assert message.topic == "zigbee2mqtt/front_lock/set"
    assert desk.state.screen.text == "Open: done"


async def test_a_confirmed_action_done_already_does_not_ask_again(
    daemon_runner: DaemonRunner, fleet: Fleet, mosquitto: Broker
) -> None:
    await daemon_runner.start(with_mqtt(config(fleet, {**OPEN, "confirm": True}), mosquitto))
    await ring(daemon_runner)
    desk = fleet.phone("desk")
    await shows(desk, "Open")
    page = desk.state.screen
    await desk.press(name="Open")
    await desk.press(name="Yes")
    desk.state.screen = page
    await desk.press(name="Open")
    assert desk.state.screen.text == "Open: already done."


async def test_no_leaves_without_acting(
    daemon_runner: DaemonRunner, fleet: Fleet, mosquitto: Broker
) -> None:
    await daemon_runner.start(with_mqtt(config(fleet, {**OPEN, "confirm": True}), mosquitto))
    event_id = await ring(daemon_runner)
    desk = fleet.phone("desk")
    await shows(desk, "Open")
    await desk.press(name="Open")
    await desk.press(name="No")
    assert desk.state.screen.title == ""
    assert (await status(daemon_runner, event_id))["actions"] == []


async def test_expired_token_shows_a_clear_page(
    daemon_runner: DaemonRunner, fleet: Fleet, mosquitto: Broker
) -> None:
    data = with_mqtt(config(fleet, OPEN, action_ttl="200ms"), mosquitto)
    await daemon_runner.start(data)
    event_id = await ring(daemon_runner)
    desk = fleet.phone("desk")
    await shows(desk, "Open")
    await asyncio.sleep(0.3)  # past action_ttl, whatever the push took
    with mosquitto.watch("zigbee2mqtt/#") as watcher:
        await desk.press(name="Open")
        await nothing_published(mosquitto, watcher)
    assert desk.state.screen.title == "Expired"
    assert desk.state.screen.text == "Open: this action has expired."
    assert [a["result"] for a in (await status(daemon_runner, event_id))["actions"]] == ["expired"]


async def test_unknown_token_shows_a_page_not_a_raw_404(
    daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    await daemon_runner.start(config(fleet, {"label": "Call", "dial": "1234"}))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        answer = await client.get("/act/not-a-token")
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("text/xml")
    assert "<Title>Not found</Title>" in answer.text


async def test_webhook_action_reaches_a_local_server_and_a_failure_is_shown(
    daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    received: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    status_line = [b"HTTP/1.1 204 No Content"]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        received.put_nowait((head, await reader.readexactly(length)))
        writer.write(status_line[0] + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    action = {
        "label": "Open",
        "webhook": {
            "url": f"http://127.0.0.1:{port}/doors/{{{{ payload.lock }}}}/open",
            "method": "PUT",
            "body": '{"by": "desk", "door": {{ payload.door | tojson }}}',
            "headers": {"Content-Type": "application/json"},
        },
    }
    try:
        await daemon_runner.start(config(fleet, action))
        event_id = await ring(daemon_runner)
        desk = fleet.phone("desk")
        await shows(desk, "Open")
        page = desk.state.screen
        status_line[0] = b"HTTP/1.1 500 Internal Server Error"
        await desk.press(name="Open")
        assert desk.state.screen.text == "Open failed: HTTP 500"
        head, body = await asyncio.wait_for(received.get(), 5)
        assert head.startswith(b"PUT /doors/front_lock/open HTTP/1.1")
        assert json.loads(body) == {"by": "desk", "door": "front door"}
        # A failed one-time action may be pressed again; this time the server takes it.
        status_line[0] = b"HTTP/1.1 204 No Content"
        desk.state.screen = page
        await desk.press(name="Open")
        assert desk.state.screen.text == "Open: done"
        await asyncio.wait_for(received.get(), 5)
    finally:
        server.close()
        await server.wait_closed()
    results = [a["result"] for a in (await status(daemon_runner, event_id))["actions"]]
    assert results == ["failed", "ok"]
    assert (await status(daemon_runner, event_id))["actions"][0]["error"] == "HTTP 500"
    labels = {"rule": "doorbell", "action": "Open"}
    assert daemon_runner.metric("phonepush_actions_total", **labels, result="failed") == 1


async def test_dial_action_softkey_dials_and_sits_beside_ack(
    daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    data = config(fleet, {"label": "Call", "dial": "0441234567"}, ack=True)
    await daemon_runner.start(data)
    await ring(daemon_runner)
    desk = fleet.phone("desk")
    await shows(desk, "Call")
    keys = [(k.name, k.position) for k in desk.state.screen.softkeys]
    assert keys == [("Ack", 1), ("Call", 2), ("Close", 3)]
    call = desk.state.screen.softkeys[1]
    assert call.url == "Dial:0441234567"
    await desk.press(name="Call")
    assert list(desk.state.dialled) == ["0441234567"]


async def test_page_without_ack_refuses_an_ack(daemon_runner: DaemonRunner, fleet: Fleet) -> None:
    await daemon_runner.start(config(fleet, {"label": "Call", "dial": "1234"}))
    await ring(daemon_runner)
    desk = fleet.phone("desk")
    await shows(desk, "Call")
    token = desk.state.screen.url.rsplit("/", 1)[1]
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        answer = await client.get(f"/ack/{token}")
    assert answer.status_code == 404


async def test_a_spool_made_before_actions_opens_and_gains_their_tables(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path):
        pass
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE alert_actions")
        db.execute("DROP TABLE action_presses")
    async with Spool(path) as spool:
        assert await spool.alerts.presses_of("nothing") == []
        assert await spool.alerts.action("nothing") is None


# --- configuration ------------------------------------------------------------------------------


def rule_with(*actions: dict[str, Any], **rule: Any) -> dict[str, Any]:
    return {
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
        "webhook": {"allow_anonymous": True},
        "phones": [{"name": "desk", "host": "127.0.0.1"}],
        "rules": [
            {
                "name": "doorbell",
                "on": "webhook:door",
                "to": "desk",
                "message": {"title": "Doorbell"},
                "actions": list(actions),
                **rule,
            }
        ],
    }


@pytest.mark.parametrize(
    ("action", "key"),
    [
        ({"label": "Open"}, "rules[doorbell].actions[0]: give exactly one of"),
        (
            {"label": "Open", "dial": "1", "mqtt": {"topic": "a"}},
            "rules[doorbell].actions[0]: give exactly one of mqtt, webhook or dial"
            " (got mqtt, dial)",
        ),
        ({"label": "Open", "mqtt": {"topic": "a/{{ x"}}, "rules[doorbell].actions[0].mqtt.topic"),
        ({"label": "Open", "mqtt": {"topic": "a/#"}}, "rules[doorbell].actions[0].mqtt.topic"),
        (
            {"label": "Open", "webhook": {"url": "ftp://x"}},
            "rules[doorbell].actions[0].webhook.url",
        ),
        (
            {"label": "Open", "webhook": {"url": "http://x/", "body": "{% if %}"}},
            "rules[doorbell].actions[0].webhook.body",
        ),
        ({"label": "Call", "dial": "12<34"}, "rules[doorbell].actions[0].dial"),
        ({"label": "Call", "dial": "41+44"}, "rules[doorbell].actions[0].dial"),
        ({"label": "Call", "dial": "++41"}, "rules[doorbell].actions[0].dial"),
        ({"label": "Call", "dial": "+41446681800"}, "rules[doorbell].actions[0].dial"),
        ({"label": "", "dial": "1"}, "rules[doorbell].actions[0].label"),
    ],
)
def test_bad_action_config_names_the_key(action: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(rule_with(action), environ={})
    assert key in str(caught.value)


@pytest.mark.parametrize("number", ["0041446681800", "*86", "#31#", "1234:1:Cisco/Dialer"])
def test_a_dial_action_takes_what_a_phone_dials(number: str) -> None:
    config = parse_config(rule_with({"label": "Call", "dial": number}), environ={})
    assert config.rules[0].actions[0].dial == number


def test_at_most_four_actions_and_they_need_a_message() -> None:
    five = [{"label": f"K{i}", "dial": str(i)} for i in range(5)]
    with pytest.raises(ConfigError, match=r"rules\[doorbell\]\.actions"):
        parse_config(rule_with(*five), environ={})
    data = rule_with({"label": "Call", "dial": "1"})
    del data["rules"][0]["message"]
    data["rules"][0]["execute"] = ["Key:Speaker"]
    with pytest.raises(ConfigError, match=r"actions: needs a message"):
        parse_config(data, environ={})


def test_mqtt_action_needs_an_mqtt_section() -> None:
    data = rule_with(OPEN)
    del data["mqtt"]
    with pytest.raises(ConfigError, match=r"rules\[doorbell\]\.actions\[0\]\.mqtt: publishes"):
        parse_config(data, environ={})


def test_check_lists_actions_and_fails_on_a_bad_one(tmp_path: Path, capsys: Any) -> None:
    from phonepush.cli import main

    path = tmp_path / "phonepush.toml"
    path.write_text(
        """
[mqtt]
url = "mqtt://127.0.0.1:1883"
[webhook]
allow_anonymous = true
[[phones]]
name = "desk"
host = "127.0.0.1"
[[rules]]
name = "doorbell"
on = "webhook:door"
to = "desk"
message = { title = "Doorbell" }
actions = [
  { label = "Open", confirm = true, mqtt = { topic = "zigbee2mqtt/lock/set", payload = "x" } },
  { label = "Call", dial = "1234" },
]
"""
    )
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "action Open (confirm): mqtt zigbee2mqtt/lock/set" in out
    assert "action Call: dial 1234" in out
    path.write_text(path.read_text().replace('dial = "1234"', 'dial = "12<34"'))
    assert main(["check", "--config", str(path)]) != 0
    assert "rules[doorbell].actions[1].dial" in capsys.readouterr().err


def test_fire_dry_run_shows_the_softkeys_of_each_phones_page(tmp_path: Path, capsys: Any) -> None:
    from phonepush.cli import main

    path = tmp_path / "phonepush.toml"
    path.write_text(
        """
[server]
public_url = "http://192.0.2.10:8080"
[spool]
path = "spool.db"
[webhook]
allow_anonymous = true
[[phones]]
name = "desk"
host = "127.0.0.1"
[[rules]]
name = "doorbell"
on = "webhook:door"
to = "desk"
ack = true
message = { title = "Doorbell" }
[[rules.actions]]
label = "Open"
webhook = { url = "http://door.lan/open/{{ payload.door }}", method = "PUT" }
[[rules.actions]]
label = "Call"
dial = "1234"
"""
    )
    argv = ["fire", "--config", str(path), "--hook", "door", '{"door": "front"}', "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "softkeys added to each phone's page" in out
    lines = [line.strip() for line in out.splitlines()]
    assert "Ack -> http://192.0.2.10:8080/ack/<token>" in lines
    assert "Open -> http://192.0.2.10:8080/act/<token>: PUT http://door.lan/open/front" in lines
    assert "Call -> Dial:1234" in lines
    assert lines[-1] == "Close -> SoftKey:Exit"
