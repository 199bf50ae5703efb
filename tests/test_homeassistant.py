"""Home Assistant by MQTT discovery (``[homeassistant]``): a real daemon, a real mosquitto and
simulated phones. The test reads the broker as Home Assistant does (``homeassistant/#``
retained configs, the state topics they name), checks every config against the keys Home
Assistant documents for its component, and drives the entities the way Home Assistant would:
a notify message, a button press, its own birth message."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from _daemon_fixtures import DaemonRunner, eventually, free_port, start_run_process
from _mqtt_fixtures import Broker
from _sim_fixtures import MakeFleet
from phonepush import __version__
from phonepush.cli import main as cli_main
from phonepush.config import parse_config
from phonepush.errors import ConfigError
from phonepush.sim.simulator import Fleet

# --- what Home Assistant documents -----------------------------------------------------------
# home-assistant.io, source/_integrations/{notify,binary_sensor,button,event}.mqtt.markdown and
# the MQTT integration's discovery section (device, origin, availability).

#: Keys every MQTT entity takes.
ENTITY_KEYS = {
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "default_entity_id",
    "device",
    "enabled_by_default",
    "encoding",
    "entity_category",
    "entity_picture",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "name",
    "object_id",
    "origin",
    "payload_available",
    "payload_not_available",
    "qos",
    "unique_id",
}
#: component -> (its own keys, the keys it requires).
COMPONENTS: dict[str, tuple[set[str], set[str]]] = {
    "notify": ({"command_template", "command_topic", "retain"}, {"command_topic"}),
    "binary_sensor": (
        {
            "device_class",
            "expire_after",
            "force_update",
            "off_delay",
            "payload_off",
            "payload_on",
            "state_topic",
            "value_template",
        },
        {"state_topic"},
    ),
    "button": (
        {"command_template", "command_topic", "device_class", "payload_press", "retain"},
        {"command_topic"},
    ),
    "event": (
        {"device_class", "event_types", "state_topic", "value_template"},
        {"state_topic", "event_types"},
    ),
}
DEVICE_KEYS = {
    "configuration_url",
    "connections",
    "hw_version",
    "identifiers",
    "manufacturer",
    "model",
    "model_id",
    "name",
    "serial_number",
    "suggested_area",
    "sw_version",
    "via_device",
}
AVAILABILITY_KEYS = {"payload_available", "payload_not_available", "topic", "value_template"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
#: Home Assistant's discovery topic: <prefix>/<component>/[<node_id>/]<object_id>/config, ids
#: being [a-zA-Z0-9_-]+.
ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def check_config(topic: str, config: dict[str, Any]) -> str:
    """Fail unless ``config`` is a valid discovery config for its topic; its component."""
    prefix, component, node_id, object_id, last = topic.split("/")
    assert (prefix, last) == ("homeassistant", "config"), topic
    assert set(node_id) <= ID_CHARS and set(object_id) <= ID_CHARS, topic
    own, required = COMPONENTS[component]
    keys = set(config)
    assert keys <= ENTITY_KEYS | own, f"{topic}: undocumented keys {keys - ENTITY_KEYS - own}"
    assert required <= keys, f"{topic}: missing {required - keys}"
    # What makes an entity a discovered device's, available with the daemon, and traceable.
    assert {"unique_id", "device", "availability", "origin"} <= keys, topic
    device = config["device"]
    assert set(device) <= DEVICE_KEYS and device["identifiers"] and device["name"], topic
    assert all(set(a) <= AVAILABILITY_KEYS and a["topic"] for a in config["availability"])
    assert set(config["origin"]) <= ORIGIN_KEYS and config["origin"]["name"] == "phonepush"
    assert config["origin"]["sw_version"] == __version__
    assert config.get("qos", 0) in (0, 1, 2)
    return component


class HomeAssistantView:
    """The broker as Home Assistant reads it: the retained discovery configs and states, and
    every message in order (to see what a step published)."""

    def __init__(self, broker: Broker) -> None:
        self.retained: dict[str, bytes] = {}
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"home-assistant-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_message = self._on_message
        self._broker = broker

    def __enter__(self) -> HomeAssistantView:
        self._client.connect(self._broker.host, self._broker.port)
        self._client.loop_start()
        self._client.subscribe([("homeassistant/#", 1), ("phonepush/#", 1)])
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_message(self, client: object, userdata: object, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))
            if message.payload:
                self.retained[message.topic] = bytes(message.payload)
            else:
                self.retained.pop(message.topic, None)

    def configs(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                t: json.loads(p)
                for t, p in self.retained.items()
                if t.startswith("homeassistant/") and t.endswith("/config")
            }

    def state(self, topic: str) -> bytes | None:
        with self._lock:
            return self.retained.get(topic)

    def since(self, mark: int) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return self.messages[mark:]

    def mark(self) -> int:
        with self._lock:
            return len(self.messages)

    def entity(self, component: str, object_id: str) -> dict[str, Any]:
        return self.configs()[f"homeassistant/{component}/phonepush/{object_id}/config"]


@pytest.fixture
def home_assistant(mosquitto: Broker) -> Iterator[HomeAssistantView]:
    with HomeAssistantView(mosquitto) as view:
        yield view


def config_data(broker: Broker, fleet: Fleet, **more: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "mqtt": {"url": broker.url, "client_id": f"phonepush-{time.monotonic_ns()}"},
        "homeassistant": {"enabled": True, "execute": ["Play:Chime.raw"]},
        "health": {"interval": "1s"},
        "phones": [
            {"name": "kitchen", "host": fleet.phone("kitchen").address, "groups": ["house"]},
            {"name": "study", "host": fleet.phone("study").address, "groups": ["house"]},
        ],
        "rules": [
            {
                "name": "doorbell",
                "on": "mqtt:doorbell",
                "to": ["kitchen"],
                "message": {"title": "Door", "text": "Someone at the door"},
                "ack": True,
            }
        ],
    }
    data.update(more)
    return data


async def house(make_fleet: MakeFleet) -> Fleet:
    return await make_fleet(phones=2, names=["kitchen", "study"], tone_ms=10)


async def publish(broker: Broker, topic: str, payload: str) -> None:
    await asyncio.to_thread(broker.publish, topic, payload.encode())


# --- discovery ---------------------------------------------------------------------------------


async def test_every_entity_is_discovered_with_documented_keys(
    daemon_runner: DaemonRunner,
    make_fleet: MakeFleet,
    mosquitto: Broker,
    home_assistant: HomeAssistantView,
) -> None:
    fleet = await house(make_fleet)
    await daemon_runner.start(config_data(mosquitto, fleet))
    expected = {
        "notify/phonepush/phone_kitchen",
        "notify/phonepush/phone_study",
        "notify/phonepush/group_house",
        "binary_sensor/phonepush/phone_kitchen_connectivity",
        "binary_sensor/phonepush/phone_study_connectivity",
        "button/phonepush/phone_kitchen_test",
        "button/phonepush/phone_study_test",
        "event/phonepush/rule_doorbell_ack",
    }
    wanted = {f"homeassistant/{e}/config" for e in expected}
    await eventually(lambda: set(home_assistant.configs()) == wanted)
    configs = home_assistant.configs()
    for topic, config in configs.items():
        check_config(topic, config)
        # Every entity goes away with the daemon: its status topic's will says "offline".
        assert config["availability"] == [
            {
                "topic": "phonepush/status",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ]
    unique = [c["unique_id"] for c in configs.values()]
    assert len(set(unique)) == len(unique)
    assert home_assistant.state("phonepush/status") == b"online"

    sensor = home_assistant.entity("binary_sensor", "phone_kitchen_connectivity")
    assert sensor["device_class"] == "connectivity"
    assert (sensor["payload_on"], sensor["payload_off"]) == ("ON", "OFF")
    event = home_assistant.entity("event", "rule_doorbell_ack")
    assert event["event_types"] == ["acknowledged"]
    button = home_assistant.entity("button", "phone_kitchen_test")
    assert button["command_topic"] == "phonepush/phone/kitchen/test"

    # A phone is a Cisco device; its model and firmware come in once the probe read them.
    def kitchen_device() -> dict[str, Any]:
        return dict(home_assistant.entity("notify", "phone_kitchen")["device"])

    await eventually(lambda: "model" in kitchen_device())
    device = kitchen_device()
    assert device["manufacturer"] == "Cisco" and device["name"] == "kitchen"
    assert device["model"] and device["sw_version"]
    assert device["connections"][0][0] == "mac"
    # The phone's other entities describe the same device.
    await eventually(
        lambda: home_assistant.entity("button", "phone_kitchen_test")["device"] == device
    )
    await eventually(lambda: home_assistant.state("phonepush/phone/kitchen/connectivity") == b"ON")


async def test_a_notify_message_and_a_button_press_page_through_the_pipeline(
    daemon_runner: DaemonRunner,
    make_fleet: MakeFleet,
    mosquitto: Broker,
    home_assistant: HomeAssistantView,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet = await house(make_fleet)
    await daemon_runner.start(config_data(mosquitto, fleet))
    await eventually(lambda: len(home_assistant.configs()) == 8)
    kitchen, study = fleet.phone("kitchen"), fleet.phone("study")
    topic = home_assistant.entity("notify", "phone_kitchen")["command_topic"]

    # What Home Assistant publishes for notify.send_message: the message as the payload.
    await publish(mosquitto, topic, "Dinner is ready")
    await eventually(lambda: kitchen.state.screen.text.strip() == "Dinner is ready")
    assert kitchen.state.screen.title == "Home Assistant"
    await eventually(lambda: kitchen.state.last_tone == "Chime.raw")
    assert (
        daemon_runner.metric(
            "phonepush_events_total", source="mqtt", rule="homeassistant.notify.kitchen"
        )
        == 1
    )
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="kitchen", result="delivered")
            >= 1
        )
    )
    assert study.state.pushes == 0

    group_topic = home_assistant.entity("notify", "group_house")["command_topic"]
    await publish(mosquitto, group_topic, "42")
    for phone in (kitchen, study):
        await eventually(lambda phone=phone: phone.state.screen.text.strip() == "42")

    button = home_assistant.entity("button", "phone_study_test")
    await publish(mosquitto, button["command_topic"], button["payload_press"])
    await eventually(lambda: "Test page" in study.state.screen.text)
    assert (
        daemon_runner.metric(
            "phonepush_events_total", source="mqtt", rule="homeassistant.test.study"
        )
        == 1
    )

    # Ordinary events in the spool: `phonepush status` lists them by their rules.
    config_file = tmp_path / "status.toml"
    config_file.write_text(f'[spool]\npath = "{daemon_runner.spool}"\n')
    assert cli_main(["status", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    for rule in (
        "homeassistant.notify.kitchen",
        "homeassistant.notify.house",
        "homeassistant.test.study",
    ):
        assert rule in out, out


async def test_an_unreachable_phone_reads_off(
    daemon_runner: DaemonRunner,
    make_fleet: MakeFleet,
    mosquitto: Broker,
    home_assistant: HomeAssistantView,
) -> None:
    fleet = await house(make_fleet)
    data = config_data(mosquitto, fleet)
    # A third phone nobody answers for.
    data["phones"].append({"name": "garage", "host": f"127.0.0.1:{free_port()}"})
    await daemon_runner.start(data)
    sensor = home_assistant.entity
    await eventually(lambda: len(home_assistant.configs()) == 11)
    garage = sensor("binary_sensor", "phone_garage_connectivity")["state_topic"]
    kitchen = sensor("binary_sensor", "phone_kitchen_connectivity")["state_topic"]
    await eventually(lambda: home_assistant.state(garage) == b"OFF")
    await eventually(lambda: home_assistant.state(kitchen) == b"ON")
    # The state is retained: Home Assistant reads it when it subscribes, after a restart too.
    assert (garage, b"OFF", True) in [
        (t, p, True) for t, p, _ in home_assistant.since(0) if t == garage
    ]

    await fleet.phone("kitchen").set_fault("refuse")
    await eventually(lambda: home_assistant.state(kitchen) == b"OFF", timeout=10)
    await fleet.phone("kitchen").set_fault("none")
    await eventually(lambda: home_assistant.state(kitchen) == b"ON", timeout=10)


async def test_an_ack_fires_the_rules_event(
    daemon_runner: DaemonRunner,
    make_fleet: MakeFleet,
    mosquitto: Broker,
    home_assistant: HomeAssistantView,
) -> None:
    fleet = await house(make_fleet)
    await daemon_runner.start(config_data(mosquitto, fleet))
    await eventually(lambda: len(home_assistant.configs()) == 8)
    state_topic = home_assistant.entity("event", "rule_doorbell_ack")["state_topic"]
    kitchen = fleet.phone("kitchen")
    await publish(mosquitto, "doorbell", "ring")
    await eventually(lambda: [k.name for k in kitchen.state.screen.softkeys] == ["Ack", "Close"])
    mark = home_assistant.mark()
    await kitchen.press(name="Ack")

    def fired() -> list[tuple[bytes, bool]]:
        return [(p, r) for t, p, r in home_assistant.since(mark) if t == state_topic]

    await eventually(lambda: len(fired()) == 1)
    payload, retained = fired()[0]
    # Not retained: Home Assistant ignores a replayed event, and an old ack is no news.
    assert not retained
    event = json.loads(payload)
    assert event["event_type"] == "acknowledged"
    assert event["phone"] == "kitchen" and event["rule"] == "doorbell" and event["event"]


# --- reloads and Home Assistant restarts ---------------------------------------------------------


def write(path: Path, data: dict[str, Any]) -> None:
    lines: list[str] = []

    def value(v: Any) -> str:
        return json.dumps(v)

    for key in ("server", "spool", "mqtt", "homeassistant", "health", "webhook", "dispatch"):
        if key in data:
            lines.append(f"[{key}]")
            lines += [f"{k} = {value(v)}" for k, v in data[key].items()]
    for phone in data["phones"]:
        lines.append("[[phones]]")
        lines += [f"{k} = {value(v)}" for k, v in phone.items()]
    for rule in data.get("rules", []):
        lines.append("[[rules]]")
        for k, v in rule.items():
            if isinstance(v, dict):
                inner = ", ".join(f"{ik} = {value(iv)}" for ik, iv in v.items())
                lines.append(f"{k} = {{ {inner} }}")
            else:
                lines.append(f"{k} = {value(v)}")
    path.write_text("\n".join(lines) + "\n")


async def reload(runner: DaemonRunner, count: int) -> None:
    assert runner.daemon is not None
    runner.daemon.reload()  # what SIGHUP does
    await eventually(lambda: runner.metric("phonepush_config_reloads_total", result="ok") == count)


async def test_a_reload_clears_a_removed_phone_and_republishes_nothing_unchanged(
    daemon_runner: DaemonRunner,
    make_fleet: MakeFleet,
    mosquitto: Broker,
    home_assistant: HomeAssistantView,
    tmp_path: Path,
) -> None:
    fleet = await house(make_fleet)
    data = config_data(
        mosquitto,
        fleet,
        server={"listen": f"127.0.0.1:{daemon_runner.port}"},
        spool={"path": str(daemon_runner.spool)},
        webhook={"allow_anonymous": True},
    )
    path = tmp_path / "phonepush.toml"
    write(path, data)
    await daemon_runner.start_file(path)
    study = {
        "homeassistant/notify/phonepush/phone_study/config",
        "homeassistant/binary_sensor/phonepush/phone_study_connectivity/config",
        "homeassistant/button/phonepush/phone_study_test/config",
    }
    await eventually(lambda: len(home_assistant.configs()) == 8)
    await eventually(lambda: home_assistant.state("phonepush/phone/study/connectivity") == b"ON")
    # Settled: both phones' details known (their configs carry the model).
    await eventually(
        lambda: all(
            "model" in c["device"] for t, c in home_assistant.configs().items() if "/phone_" in t
        )
    )

    # The same file again: nothing is published. (The next reload's one change is the first
    # thing seen after it: anything the unchanged reload sent would come before.)
    mark = home_assistant.mark()
    await reload(daemon_runner, 1)
    data["rules"][0]["name"] = "frontdoor"
    write(path, data)
    await reload(daemon_runner, 2)
    new = "homeassistant/event/phonepush/rule_frontdoor_ack/config"
    old = "homeassistant/event/phonepush/rule_doorbell_ack/config"
    await eventually(
        lambda: new in home_assistant.configs() and old not in home_assistant.configs()
    )
    # (Configs only: a probe under load may change a phone's state meanwhile.)
    configs_since = [t for t, _, _ in home_assistant.since(mark) if t.endswith("/config")]
    assert sorted(configs_since) == sorted([new, old])

    # The study phone leaves: its entities and its retained state are cleared.
    data["phones"] = [p for p in data["phones"] if p["name"] != "study"]
    mark = home_assistant.mark()
    write(path, data)
    await reload(daemon_runner, 3)
    await eventually(lambda: not study & set(home_assistant.configs()))
    await eventually(lambda: home_assistant.state("phonepush/phone/study/connectivity") is None)
    cleared = {(t, p) for t, p, _ in home_assistant.since(mark)}
    assert {(t, b"") for t in study} <= cleared
    # The group and the kitchen phone stay as they were (the group's one member changed
    # nothing Home Assistant is told).
    assert "homeassistant/notify/phonepush/group_house/config" in home_assistant.configs()
    assert not [t for t, p in cleared if "kitchen" in t and t.endswith("/config")]

    # Turned off: every entity goes.
    data["homeassistant"]["enabled"] = False
    write(path, data)
    await reload(daemon_runner, 4)
    await eventually(lambda: not home_assistant.configs())


async def test_home_assistant_coming_online_gets_every_config_again(
    daemon_runner: DaemonRunner,
    make_fleet: MakeFleet,
    mosquitto: Broker,
    home_assistant: HomeAssistantView,
) -> None:
    fleet = await house(make_fleet)
    await daemon_runner.start(config_data(mosquitto, fleet, health={"interval": 0}))
    await eventually(lambda: len(home_assistant.configs()) == 8)
    mark = home_assistant.mark()
    # Home Assistant's birth message, as it sends it when it starts.
    await publish(mosquitto, "homeassistant/status", "online")
    await eventually(
        lambda: (
            {t for t, _, _ in home_assistant.since(mark) if t.endswith("/config")}
            == set(home_assistant.configs())
        )
    )
    # The birth message is no event for the rules.
    assert daemon_runner.metric("phonepush_events_total", source="mqtt", rule="") == 0


# --- configuration --------------------------------------------------------------------------------


def test_enabled_without_mqtt_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"homeassistant\.enabled: needs an \[mqtt\] section"):
        parse_config(
            {
                "homeassistant": {"enabled": True},
                "phones": [{"name": "a", "host": "127.0.0.1"}],
            },
            environ={},
        )


def test_bad_keys_are_named() -> None:
    base = {"mqtt": {"url": "mqtt://127.0.0.1"}, "phones": [{"name": "a", "host": "127.0.0.1"}]}
    with pytest.raises(ConfigError, match=r"homeassistant\.node_id"):
        parse_config({**base, "homeassistant": {"enabled": True, "node_id": "a/b"}}, environ={})
    with pytest.raises(ConfigError, match=r"homeassistant\.execute\[0\]"):
        parse_config({**base, "homeassistant": {"enabled": True, "execute": ["x"]}}, environ={})
    with pytest.raises(ConfigError, match=r"homeassistant\.title"):
        parse_config({**base, "homeassistant": {"enabled": True, "title": "{{ x"}}, environ={})
    with pytest.raises(ConfigError, match=r"homeassistant\.discovery_prefix"):
        parse_config({**base, "homeassistant": {"discovery_prefix": "ha/#"}}, environ={})


def test_names_that_would_share_an_id_are_refused() -> None:
    data = {
        "mqtt": {"url": "mqtt://127.0.0.1"},
        "homeassistant": {"enabled": True},
        "phones": [{"name": "a.b", "host": "127.0.0.1"}, {"name": "a_b", "host": "127.0.0.2"}],
    }
    with pytest.raises(ConfigError, match=r"'a\.b' and 'a_b' would be one Home Assistant id"):
        parse_config(data, environ={})


def test_off_by_default_adds_no_rules() -> None:
    config = parse_config(
        {"mqtt": {"url": "mqtt://127.0.0.1"}, "phones": [{"name": "a", "host": "127.0.0.1"}]},
        environ={},
    )
    assert not config.homeassistant.enabled and not config.all_rules


async def test_a_broker_that_lost_everything_gets_every_config_again(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, mosquitto: Broker
) -> None:
    fleet = await house(make_fleet)
    running = await daemon_runner.start(config_data(mosquitto, fleet, health={"interval": 0}))
    with HomeAssistantView(mosquitto) as view:
        await eventually(lambda: len(view.configs()) == 8)
    assert running.mqtt is not None
    mosquitto.restart()  # no persistence: the retained configs are gone
    await eventually(lambda: running.mqtt is not None and running.mqtt.connected, timeout=15)
    with HomeAssistantView(mosquitto) as view:
        await eventually(lambda: len(view.configs()) == 8)


async def test_a_phone_removed_while_stopped_is_cleared_at_the_next_start(
    daemon_runner: DaemonRunner,
    make_fleet: MakeFleet,
    mosquitto: Broker,
    home_assistant: HomeAssistantView,
) -> None:
    fleet = await house(make_fleet)
    data = config_data(mosquitto, fleet)
    await daemon_runner.start(data)
    await eventually(lambda: len(home_assistant.configs()) == 8)
    for phone in ("kitchen", "study"):
        topic = f"phonepush/phone/{phone}/connectivity"
        await eventually(lambda topic=topic: home_assistant.state(topic) == b"ON")
    await daemon_runner.stop()

    data["phones"] = [p for p in data["phones"] if p["name"] != "study"]
    data["health"] = {"interval": 0}  # the kitchen phone stays unseen in this run
    mark = home_assistant.mark()
    await daemon_runner.start(data)
    await eventually(lambda: not [t for t in home_assistant.configs() if "study" in t])
    await eventually(lambda: home_assistant.state("phonepush/phone/study/connectivity") is None)
    assert len(home_assistant.configs()) == 5  # the kitchen phone's three, the group, the rule
    # Every config once more, after anything the start sent.
    again = home_assistant.mark()
    await publish(mosquitto, "homeassistant/status", "online")
    await eventually(
        lambda: (
            {t for t, _, _ in home_assistant.since(again) if t.endswith("/config")}
            == set(home_assistant.configs())
        )
    )
    # The kitchen phone's state was known before the restart: kept, never cleared meanwhile.
    assert home_assistant.state("phonepush/phone/kitchen/connectivity") == b"ON"
    assert ("phonepush/phone/kitchen/connectivity", b"") not in [
        (t, p) for t, p, _ in home_assistant.since(mark)
    ]


async def test_sighup_clears_a_removed_phone_in_a_running_daemon(
    make_fleet: MakeFleet,
    mosquitto: Broker,
    home_assistant: HomeAssistantView,
    tmp_path: Path,
) -> None:
    fleet = await house(make_fleet)
    data = config_data(
        mosquitto,
        fleet,
        server={"listen": f"127.0.0.1:{free_port()}"},
        spool={"path": str(tmp_path / "spool.db")},
        webhook={"allow_anonymous": True},
    )
    path = tmp_path / "phonepush.toml"
    write(path, data)
    process = await start_run_process(path)
    try:
        await eventually(lambda: len(home_assistant.configs()) == 8, timeout=10)
        data["phones"] = [p for p in data["phones"] if p["name"] != "study"]
        write(path, data)
        process.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: not [t for t in home_assistant.configs() if "study" in t])
        assert len(home_assistant.configs()) == 5
    finally:
        process.proc.send_signal(signal.SIGTERM)
        assert await process.wait() == 0, process.output


async def test_instances_sharing_the_events_each_hear_home_assistant(
    daemon_runner: DaemonRunner,
    make_fleet: MakeFleet,
    mosquitto: Broker,
    home_assistant: HomeAssistantView,
    tmp_path: Path,
) -> None:
    """Two daemons share the rules' subscriptions (``share_group``): each event goes to one of
    them. Home Assistant's birth message must reach both: each has its own entities."""
    fleet = await house(make_fleet)
    other = DaemonRunner(tmp_path / "west")
    (tmp_path / "west").mkdir()
    try:
        for runner, node in ((daemon_runner, "east"), (other, "west")):
            data = config_data(mosquitto, fleet, health={"interval": 0})
            data["mqtt"]["share_group"] = "pool"
            data["homeassistant"]["node_id"] = node
            await runner.start(data)
        await eventually(lambda: len(home_assistant.configs()) == 16)
        mark = home_assistant.mark()
        await publish(mosquitto, "homeassistant/status", "online")
        await eventually(
            lambda: (
                {t for t, _, _ in home_assistant.since(mark) if t.endswith("/config")}
                == set(home_assistant.configs())
            )
        )
    finally:
        await other.stop()


def test_names_with_dots_and_what_the_probe_read() -> None:
    from dataclasses import dataclass

    from phonepush.homeassistant.discovery import configs
    from phonepush.wire.cisco import DeviceInfo

    @dataclass
    class Known:
        name: str
        reachable: bool | None
        info: DeviceInfo | None

    config = parse_config(
        {
            "mqtt": {"url": "mqtt://127.0.0.1"},
            "homeassistant": {"enabled": True},
            "phones": [{"name": "front.desk", "host": "127.0.0.1", "groups": ["floor.1"]}],
        },
        environ={},
    )
    info = DeviceInfo(model="CP-8845", firmware="sip88xx.14-1-1", mac="00AABBCCDDEE", host_name="")
    found = configs(config, lambda name: Known(name, True, info))
    assert found == configs(config, lambda name: Known(name, True, info))  # same bytes again
    notify = json.loads(found["homeassistant/notify/phonepush/phone_front_desk/config"])
    check_config("homeassistant/notify/phonepush/phone_front_desk/config", notify)
    assert notify["command_topic"] == "phonepush/phone/front.desk/notify"
    assert notify["device"]["connections"] == [["mac", "00:aa:bb:cc:dd:ee"]]
    assert (notify["device"]["model"], notify["device"]["sw_version"]) == ("CP-8845", info.firmware)
    group = json.loads(found["homeassistant/notify/phonepush/group_floor_1/config"])
    assert group["command_topic"] == "phonepush/group/floor.1/notify"
    # The page the notify entity's command makes is an ordinary rule on that topic.
    rules = {r.name: r for r in config.all_rules}
    assert rules["homeassistant.notify.front.desk"].on == "mqtt:phonepush/phone/front.desk/notify"
    # Unknown details: a Cisco device still, without model or firmware.
    bare = json.loads(
        configs(config, lambda name: None)["homeassistant/notify/phonepush/phone_front_desk/config"]
    )
    assert bare["device"] == {
        "identifiers": ["phonepush_phone_front_desk"],
        "name": "front.desk",
        "manufacturer": "Cisco",
    }
