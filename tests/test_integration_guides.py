"""The integration guides in docs/integrations/: each guide's TOML is the shipped example, loads as
written, and does what the guide says when the real daemon gets real-shaped events — over a real
mosquitto or over HTTP — and pushes to simulated phones."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from _mqtt_fixtures import Broker
from _sim_fixtures import MakeFleet
from phonepush.config import parse_config
from phonepush.sim.simulator import Fleet, SimPhone

ROOT = Path(__file__).resolve().parent.parent
GUIDES = ROOT / "docs" / "integrations"
EXAMPLES = ROOT / "config" / "examples"
NAMES = ["zigbee2mqtt", "frigate", "alertmanager", "grafana", "home-assistant", "shelly-tasmota"]
#: Examples of a feature rather than an integration with another tool: no guide here.
FEATURE_EXAMPLES = {"evacuation", "school-bells"}
TOKEN = "guide-test-token"
_TOML_BLOCK = re.compile(r"## phonepush config\n.*?```toml\n(.*?)```", re.S)
_client_ids = itertools.count()


def guide_toml(name: str) -> str:
    match = _TOML_BLOCK.search((GUIDES / f"{name}.md").read_text())
    assert match, f"docs/integrations/{name}.md has no ```toml block under 'phonepush config'"
    return match.group(1)


def _secret_files(directory: Path) -> Path:
    for name in ("webhook-token", "phone-password", "mqtt-password"):
        (directory / name).write_text(f"{name}-value\n")
    return directory


# --- the guides and the examples ---------------------------------------------------------------


def test_there_is_a_guide_for_every_example() -> None:
    assert sorted(p.stem for p in GUIDES.glob("*.md")) == sorted(NAMES)
    integrations = {p.stem for p in EXAMPLES.glob("*.toml")} - FEATURE_EXAMPLES
    assert sorted(integrations) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_guide_toml_is_the_example_file_and_loads_as_written(name: str, tmp_path: Path) -> None:
    text = guide_toml(name)
    assert text == (EXAMPLES / f"{name}.toml").read_text(), (
        f"docs/integrations/{name}.md and config/examples/{name}.toml have drifted apart"
    )
    config = parse_config(tomllib.loads(text), environ={}, base_dir=_secret_files(tmp_path))
    assert config.rules and config.phones


# --- running them --------------------------------------------------------------------------------


class Setup:
    """A guide's config, localized: simulated phones, this test's broker, spool and port."""

    def __init__(self, runner: DaemonRunner, fleet: Fleet, broker: Broker | None) -> None:
        self.runner = runner
        self.fleet = fleet
        self.broker = broker

    def phone(self, name: str) -> SimPhone:
        return self.fleet.phone(name)

    def metric(self, name: str, **labels: str) -> float:
        return self.runner.metric(name, **labels)

    async def publish(self, topic: str, payload: Any) -> None:
        assert self.broker is not None
        body = payload if isinstance(payload, str) else json.dumps(payload)
        await asyncio.to_thread(self.broker.publish, topic, body.encode())

    async def post(self, hook: str, payload: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient(
            base_url=self.runner.url, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as client:
            return await client.post(f"/hooks/{hook}", json=payload)

    async def shows(self, phone: str, title: str, text: str | None = None) -> None:
        sim = self.phone(phone)

        def screen() -> tuple[str, str | None]:
            shown = sim.state.screen
            return shown.title, None if text is None else shown.text.strip()

        try:
            await eventually(lambda: screen() == (title, text))
        except AssertionError:
            raise AssertionError(f"{phone} shows {screen()!r}, not {(title, text)!r}") from None

    async def events(self, count: int, source: str = "mqtt", rule: str = "") -> None:
        """Wait until ``count`` events were taken for ``rule`` ("" = matched no rule)."""
        await eventually(
            lambda: self.metric("phonepush_events_total", source=source, rule=rule) == count
        )

    async def delivered(self, phone: str, count: int, result: str = "delivered") -> None:
        await eventually(
            lambda: self.metric("phonepush_deliveries_total", phone=phone, result=result) == count
        )


async def _start(
    name: str,
    runner: DaemonRunner,
    make_fleet: MakeFleet,
    broker: Broker | None,
    uncomment: tuple[str, ...] = (),
) -> Setup:
    """Start the daemon on guide ``name``'s config, with its commented-out lines that begin with
    one of ``uncomment`` (``"repeat ="``) switched on."""
    text = guide_toml(name)
    for start in uncomment:
        text, count = re.subn(rf"^# ({re.escape(start)})", r"\1", text, flags=re.M)
        assert count, f"no commented '{start}' line in the {name} guide"
    data: dict[str, Any] = copy.deepcopy(tomllib.loads(text))
    for key in ("server", "spool"):
        data.pop(key, None)  # the runner's own port and spool
    if "webhook" in data:
        data["webhook"] = {"token": TOKEN}
    if "mqtt" in data:
        assert broker is not None
        data["mqtt"] = {"url": broker.url, "client_id": f"guide-{next(_client_ids)}"}
    names = [phone["name"] for phone in data["phones"]]
    fleet = await make_fleet(phones=len(names), names=names, tone_ms=10)
    for phone in data["phones"]:
        phone["host"] = fleet.phone(phone["name"]).address
        phone.pop("username", None)
        phone.pop("password_file", None)
    await runner.start(data)
    return Setup(runner, fleet, broker)


async def test_zigbee2mqtt_doorbell(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, mosquitto: Broker
) -> None:
    s = await _start("zigbee2mqtt", daemon_runner, make_fleet, mosquitto)
    # Both copies of one press, then Home Assistant's empty action.
    await s.publish("zigbee2mqtt/front_door", {"action": "single", "battery": 15, "linkquality": 9})
    await s.publish("zigbee2mqtt/front_door/action", "single")
    await s.publish("zigbee2mqtt/front_door/action", "")
    for phone in ("reception", "backoffice"):
        await s.shows(phone, "Doorbell", "front_door: single press")
        assert s.phone(phone).state.last_tone == "Chime.raw"
        await s.delivered(phone, 1)
    await s.events(1)  # the empty action matched nothing
    # The back door half a second later: its own cooldown, so it pages.
    await s.publish("zigbee2mqtt/back_door/action", "double")
    for phone in ("reception", "backoffice"):
        await s.shows(phone, "Doorbell", "back_door: double press")
        await s.delivered(phone, 2)
    # The front door again within its cooldown: noted, not paged.
    await s.publish("zigbee2mqtt/front_door/action", "single")
    await s.delivered("reception", 1, "suppressed")
    # A long press pages everyone with the alarm.
    await s.publish("zigbee2mqtt/panic/action", "long")
    await s.shows("backoffice", "ASSISTANCE NEEDED", "Long press on panic")
    await s.delivered("backoffice", 3)
    assert s.phone("backoffice").state.last_tone == "Alarm.raw"
    assert s.phone("reception").state.pushes == 3 and s.phone("backoffice").state.pushes == 3


async def test_zigbee2mqtt_door_lock(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, mosquitto: Broker
) -> None:
    s = await _start("zigbee2mqtt", daemon_runner, make_fleet, mosquitto)
    await s.publish("zigbee2mqtt/front_door/action", "single")
    await s.shows("reception", "Doorbell", "front_door: single press")
    reception = s.phone("reception")
    await eventually(lambda: [k.name for k in reception.state.screen.softkeys] == ["Open", "Close"])
    with mosquitto.watch("zigbee2mqtt/+/set") as watcher:
        await reception.press(name="Open")
        assert reception.state.screen.text == "Open?"
        await reception.press(name="Yes")
        message = await watcher.next()
    assert message.topic == "zigbee2mqtt/front_door_lock/set"
    assert json.loads(message.payload) == {"state": "UNLOCK"}
    assert reception.state.screen.text == "Open: done"
    assert s.metric("phonepush_actions_total", rule="doorbell", action="Open", result="ok") == 1


async def test_zigbee2mqtt_sensor_reports_are_not_taken_in(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, mosquitto: Broker
) -> None:
    s = await _start("zigbee2mqtt", daemon_runner, make_fleet, mosquitto)
    for i in range(20):
        await s.publish("zigbee2mqtt/hall_sensor", {"temperature": 21 + i / 10, "humidity": 40})
    await s.publish("zigbee2mqtt/bridge/state", {"state": "online"})
    # A press after them: once it is in, the reports before it would have been too.
    await s.publish("zigbee2mqtt/front_door/action", "single")
    await s.delivered("reception", 1)
    await s.events(1, rule="doorbell")
    # Messages on one subscription arrive in order: none of the reports was taken in.
    assert s.metric("phonepush_events_total", source="mqtt", rule="") == 0


async def test_frigate_person_at_the_door(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, mosquitto: Broker
) -> None:
    s = await _start("frigate", daemon_runner, make_fleet, mosquitto)
    person = {
        "id": "1607123955.475377-mxklsc",
        "camera": "front_door",
        "label": "person",
        "top_score": 0.95,
        "current_zones": ["driveway"],
    }
    car = dict(person, id="1607123960.1-abcdef", label="car")
    await s.publish("frigate/events", {"type": "new", "before": person, "after": person})
    await s.shows("reception", "Front Door", "Person detected (95%) in driveway")
    assert s.phone("reception").state.last_tone == "Chime.raw"
    # Updates, the end, another label, and the same object's "new" re-sent: no more pages.
    await s.publish("frigate/events", {"type": "update", "before": person, "after": person})
    await s.publish("frigate/events", {"type": "end", "before": person, "after": person})
    await s.publish("frigate/events", {"type": "new", "before": car, "after": car})
    await s.publish("frigate/events", {"type": "new", "before": person, "after": person})
    await s.events(3)
    await s.delivered("reception", 1, "suppressed")
    await s.delivered("reception", 1)
    assert s.phone("reception").state.pushes == 1
    assert s.phone("guardroom").state.pushes == 0
    # A review alert (newer Frigate) goes to the guard room.
    review = {"id": "1718.5-rev", "camera": "garage", "severity": "alert"}
    review["data"] = {"objects": ["person", "car"]}
    await s.publish("frigate/reviews", {"type": "new", "before": review, "after": review})
    await s.shows("guardroom", "Alert: garage", "person, car")
    assert s.phone("guardroom").state.last_tone == "Alarm.raw"


def _alertmanager(
    status: str, instances: tuple[str, ...] = ("nas", "nas2"), started: str = "09:00"
) -> dict[str, Any]:
    alerts = [
        {
            "status": status,
            "labels": {"alertname": "DiskFull", "instance": f"{name}:9100", "severity": "critical"},
            "annotations": {"summary": f"Disk /srv is 97% full on {name}:9100"},
            "startsAt": f"2026-11-26T{started}:00Z",
            "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-26T09:30:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
            "fingerprint": f"c4b9f6e2{name}",
        }
        for name in instances
    ]
    return {
        "version": "4",
        "groupKey": '{}:{alertname="DiskFull"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "desk-phones",
        "groupLabels": {"alertname": "DiskFull"},
        "commonLabels": {"alertname": "DiskFull", "severity": "critical"},
        # Empty when the summaries differ, as here: the pages list each alert's own.
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": alerts,
        # Newer Alertmanager versions add keys: ignored.
        "notification_reason": "new_alerts",
    }


def _disk_lines(*names: str) -> str:
    return "\n".join(f"{n}:9100: Disk /srv is 97% full on {n}:9100" for n in names)


async def test_alertmanager_firing_and_resolved(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    s = await _start("alertmanager", daemon_runner, make_fleet, None)
    answer = await s.post("alertmanager", _alertmanager("firing"))
    assert answer.status_code == 202 and answer.json()["rules"] == ["alert-firing"]
    for phone in ("noc-1", "noc-2"):
        await s.shows(phone, "DiskFull (2)", _disk_lines("nas", "nas2"))
        assert list(s.phone(phone).state.tones) == ["Alarm.raw"]
        assert s.phone(phone).state.backlight.state == "On"  # critical lights the screen
    # Alertmanager re-sends the group every repeat_interval: it does not ring again.
    assert (await s.post("alertmanager", _alertmanager("firing"))).status_code == 202
    await s.delivered("noc-1", 1, "suppressed")
    # A third alert joins the group: a new page showing all three.
    grown = ("nas", "nas2", "nas3")
    await s.post("alertmanager", _alertmanager("firing", grown))
    for phone in ("noc-1", "noc-2"):
        await s.shows(phone, "DiskFull (3)", _disk_lines(*grown))
        await s.delivered(phone, 2)
    # Resolved: one quiet page per phone, listing the alerts.
    answer = await s.post("alertmanager", _alertmanager("resolved", grown))
    assert answer.status_code == 202
    for phone in ("noc-1", "noc-2"):
        await s.shows(phone, "Resolved: DiskFull (3)", _disk_lines(*grown))
        await s.delivered(phone, 3)
        assert list(s.phone(phone).state.tones) == ["Alarm.raw"] * 2
    assert s.metric("phonepush_resolved_total", rule="alert-firing") == 1
    # The same alert fires again (a new start time): it pages at once.
    await s.post("alertmanager", _alertmanager("firing", ("nas",), started="09:31"))
    for phone in ("noc-1", "noc-2"):
        await s.shows(phone, "DiskFull (1)", _disk_lines("nas"))
        await s.delivered(phone, 4)
    assert s.phone("noc-1").state.pushes == 4 and s.phone("noc-2").state.pushes == 4


async def test_alertmanager_with_repeats_one_resolved_page_per_phone(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    s = await _start(
        "alertmanager",
        daemon_runner,
        make_fleet,
        None,
        uncomment=("repeat =", "max_repeats =", "escalate ="),
    )
    await s.post("alertmanager", _alertmanager("firing"))
    for phone in ("noc-1", "noc-2"):
        await s.shows(phone, "DiskFull (2)", _disk_lines("nas", "nas2"))
        assert [k.name for k in s.phone(phone).state.screen.softkeys][:1] == ["Ack"]
    await s.post("alertmanager", _alertmanager("resolved"))
    for phone in ("noc-1", "noc-2"):
        await s.shows(phone, "Resolved: DiskFull (2)", _disk_lines("nas", "nas2"))
        await s.delivered(phone, 2)
    await daemon_runner.stop()  # nothing else on its way: every delivery is finished
    for phone in ("noc-1", "noc-2"):
        # The page and one resolved page: no second "Resolved" from another rule.
        assert s.phone(phone).state.pushes == 2


async def test_grafana_firing_and_resolved(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    s = await _start("grafana", daemon_runner, make_fleet, None)
    firing = {
        "receiver": "desk-phones",
        "status": "firing",
        "orgId": 1,
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "HighCPU", "instance": "web-1"},
                "annotations": {"summary": "CPU over 90% on web-1"},
                "startsAt": "2026-11-26T09:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://grafana:3000/alerting/grafana/abc/view",
                "fingerprint": "57c6d9296de2ad39",
                "silenceURL": "http://grafana:3000/alerting/silence/new",
                "dashboardURL": "",
                "panelURL": "",
                "values": {"B": 93.5},
            }
        ],
        "groupLabels": {"alertname": "HighCPU"},
        "commonLabels": {"alertname": "HighCPU", "instance": "web-1"},
        "commonAnnotations": {"summary": "CPU over 90% on web-1"},
        "externalURL": "http://grafana:3000/",
        "version": "1",
        "groupKey": '{}/{}:{alertname="HighCPU"}',
        "truncatedAlerts": 0,
        "title": "[FIRING:1] HighCPU (web-1)",
        "state": "alerting",
        "message": "**Firing**\n\nCPU over 90% on web-1",
    }
    assert (await s.post("grafana", firing)).json()["rules"] == ["grafana-firing"]
    await s.shows("noc-1", "HighCPU", "CPU over 90% on web-1")
    assert s.phone("noc-1").state.last_tone == "Alarm.raw"
    resolved = dict(firing, status="resolved", state="ok", message="HighCPU is back to normal")
    resolved["alerts"] = [dict(firing["alerts"][0], status="resolved")]
    assert (await s.post("grafana", resolved)).json()["rules"] == ["grafana-resolved"]
    await s.shows("noc-1", "OK: HighCPU", "HighCPU is back to normal")
    assert list(s.phone("noc-1").state.tones) == ["Alarm.raw"]
    # It fires again a moment later (a new start time): a new page, not a cooldown.
    again = dict(firing)
    again["alerts"] = [dict(firing["alerts"][0], startsAt="2026-11-26T09:40:00Z")]
    assert (await s.post("grafana", again)).json()["rules"] == ["grafana-firing"]
    await s.shows("noc-1", "HighCPU", "CPU over 90% on web-1")
    await s.delivered("noc-1", 3)
    assert list(s.phone("noc-1").state.tones) == ["Alarm.raw"] * 2


async def test_home_assistant_webhook_and_mqtt(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, mosquitto: Broker
) -> None:
    s = await _start("home-assistant", daemon_runner, make_fleet, mosquitto)
    # What the guide's rest_command sends.
    garage = {"title": "Garage", "message": "Garage door open for 10 minutes", "tone": "Chime.raw"}
    assert (await s.post("home-assistant", garage)).json()["rules"] == ["ha-notify"]
    for phone in ("kitchen", "study"):
        await s.shows(phone, "Garage", "Garage door open for 10 minutes")
        assert s.phone(phone).state.last_tone == "Chime.raw"
    # No tone named: a silent page.
    await s.post("home-assistant", {"title": "Washer", "message": "Done", "tone": ""})
    await s.shows("study", "Washer", "Done")
    assert list(s.phone("study").state.tones) == ["Chime.raw"]
    # mqtt.publish with plain text to one phone, with JSON to the group.
    await s.publish("phonepush/ha/kitchen", "Dinner is ready")
    await s.shows("kitchen", "Home Assistant", "Dinner is ready")
    await s.delivered("kitchen", 3)
    assert s.phone("study").state.pushes == 2
    smoke = {"title": "Smoke", "message": "Smoke in the hall", "tone": "Alarm.raw"}
    await s.publish("phonepush/ha/house", smoke)
    for phone in ("kitchen", "study"):
        await s.shows(phone, "Smoke", "Smoke in the hall")
        assert s.phone(phone).state.last_tone == "Alarm.raw"
    # Discovery: what notify.send_message on the study phone's entity publishes.
    with mosquitto.watch("homeassistant/notify/phonepush/phone_study/config") as watcher:
        discovered = json.loads((await watcher.next()).payload)
    await s.publish(discovered["command_topic"], "Bins go out tonight")
    await s.shows("study", "Home Assistant", "Bins go out tonight")
    await eventually(lambda: s.phone("study").state.last_tone == "Chime.raw")


async def test_shelly_and_tasmota_buttons(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, mosquitto: Broker
) -> None:
    s = await _start("shelly-tasmota", daemon_runner, make_fleet, mosquitto)
    await s.publish("stat/porch-button/RESULT", {"POWER": "ON"})  # state, not a button
    await s.publish("stat/porch-button/RESULT", {"Button1": {"Action": "SINGLE"}})
    for phone in ("workshop", "office"):
        await s.shows(phone, "Button", "porch-button pressed")
        assert s.phone(phone).state.last_tone == "Chime.raw"
    await s.events(1)
    # Older Tasmota firmware's shape matches too (and falls in the 5 s cooldown).
    await s.publish("stat/porch-button/RESULT", {"ACTION": "SINGLE"})
    await s.delivered("office", 1, "suppressed")

    gen1 = "shellies/shellybutton1-A4CF12/input_event/0"
    await s.publish(gen1, {"event": "L", "event_cnt": 7})
    await s.shows("office", "Button", "shellybutton1-A4CF12: long press")
    await s.delivered("office", 2)
    assert list(s.phone("office").state.tones)[-2:] == ["Chime.raw", "Alarm.raw"]
    # The same message again (Shelly retains it; a reconnect re-sends it): no second page.
    await s.publish(gen1, {"event": "L", "event_cnt": 7})
    await s.delivered("office", 2, "suppressed")

    rpc = {
        "src": "shellyplusi4-08b61fcb7f3c",
        "dst": "shellyplusi4-08b61fcb7f3c/events",
        "method": "NotifyEvent",
        "params": {"ts": 1718.5, "events": [{"component": "input:0", "event": "double_push"}]},
    }
    await s.publish("shellyplusi4-08b61fcb7f3c/events/rpc", rpc)
    await s.shows("workshop", "Button", "shellyplusi4-08b61fcb7f3c: double press")
    await s.delivered("workshop", 3)
    # Another Tasmota button within the first one's cooldown: each device has its own.
    await s.publish("stat/gate-button/RESULT", {"Button1": {"Action": "SINGLE"}})
    await s.shows("workshop", "Button", "gate-button pressed")
    await s.delivered("workshop", 4)
