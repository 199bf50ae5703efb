"""Compiled rules: topic matching, when, rendering, targets, and the shipped example configs
fed the payloads each integration really sends."""

from __future__ import annotations

import json
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phonepush.config import load_config
from phonepush.errors import ConfigError
from phonepush.events import Event
from phonepush.rules.book import Match, RuleSet, event_context, topic_matches
from phonepush.templates import Templates
from phonepush.wire.cisco import TextPage
from phonepush.wire.uri import ExecuteItem

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "config" / "examples"

PHONES = """
[mqtt]
url = "mqtt://127.0.0.1:1883"

[webhook]
allow_anonymous = true

[[phones]]
name = "lobby"
host = "192.0.2.21"
groups = ["frontdesk"]

[[phones]]
name = "office"
host = "192.0.2.22"
groups = ["frontdesk", "it"]

[[phones]]
name = "lab"
host = "192.0.2.23"
groups = ["it"]
"""


def ruleset(tmp_path: Path, rules: str) -> RuleSet:
    path = tmp_path / "phonepush.toml"
    path.write_text(PHONES + textwrap.dedent(rules), encoding="utf-8")
    return RuleSet.compile(load_config(path, environ={}))


def mqtt(topic: str, payload: Any) -> Event:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Event("mqtt", topic, body)


def hook(name: str, payload: Any, headers: dict[str, str] | None = None) -> Event:
    return Event("webhook", name, json.dumps(payload).encode(), headers or {})


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a", False),
        ("a/+", "a/", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/+", "/x", True),
        ("#", "$SYS/broker/uptime", False),
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("zigbee2mqtt/+", "zigbee2mqtt/front/action", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


LEVEL = st.sampled_from(["a", "b", "$x", ""])


@given(
    filters=st.lists(
        st.lists(st.sampled_from(["a", "b", "+", "$x", ""]), min_size=1, max_size=4)
        .flatmap(
            lambda levels: st.booleans().map(lambda h: "/".join(levels + (["#"] if h else [])))
        )
        .filter(bool),
        min_size=1,
        max_size=6,
    ),
    topics=st.lists(st.lists(LEVEL, min_size=1, max_size=5).map("/".join), max_size=8),
)
def test_ruleset_agrees_with_topic_matches(filters: list[str], topics: list[str]) -> None:
    rules = "".join(
        f'\n[[rules]]\nname = "r{i}"\non = "mqtt:{f}"\nto = "all"\nexecute = ["Key:Services"]\n'
        for i, f in enumerate(filters)
    )
    path = Path(f"/tmp/phonepush-test-rules-{id(filters)}.toml")
    try:
        path.write_text(PHONES + rules, encoding="utf-8")
        rs = RuleSet.compile(load_config(path, environ={}))
    finally:
        path.unlink()
    for topic in topics * 2:  # twice: the second pass is served from the topic cache
        expected = [f"r{i}" for i, f in enumerate(filters) if topic_matches(f, topic)]
        assert [m.rule.name for m in rs.match(mqtt(topic, "x"))] == expected


def test_matches_come_in_config_order_with_targets_expanded(tmp_path: Path) -> None:
    rs = ruleset(
        tmp_path,
        """
        [[rules]]
        name = "wide"
        on = "mqtt:doors/#"
        to = ["it", "lobby", "office", "all"]
        execute = ["Play:Chime.raw"]

        [[rules]]
        name = "narrow"
        on = "mqtt:doors/front"
        to = ["frontdesk"]
        execute = ["Key:Services"]
        """,
    )
    assert rs.mqtt_filters == ["doors/#", "doors/front"]
    assert rs.hooks == frozenset()
    wide, narrow = rs.match(mqtt("doors/front", "x"))
    assert (wide.rule.name, wide.rule.phones) == ("wide", ("office", "lab", "lobby"))
    assert (narrow.rule.name, narrow.rule.phones) == ("narrow", ("lobby", "office"))
    assert [m.rule.name for m in rs.match(mqtt("doors/back", "x"))] == ["wide"]
    assert rs.match(mqtt("windows/front", "x")) == []


def test_webhooks_match_by_name_and_see_headers(tmp_path: Path) -> None:
    rs = ruleset(
        tmp_path,
        """
        [[rules]]
        name = "am"
        on = "webhook:alertmanager"
        when = "headers['user-agent'].startswith('Alertmanager/') and source == 'webhook'"
        to = ["it"]
        execute = ["Play:Alarm.raw"]
        """,
    )
    assert rs.hooks == frozenset({"alertmanager"})
    event = hook("alertmanager", {}, {"User-Agent": "Alertmanager/0.27.0"})
    assert [m.rule.name for m in rs.match(event)] == ["am"]
    assert rs.match(hook("alertmanager", {}, {"User-Agent": "curl/8"})) == []
    assert rs.match(hook("grafana", {})) == []
    assert rs.match(mqtt("alertmanager", {})) == []


def test_rendering_priorities_pages_and_optional_items(tmp_path: Path) -> None:
    rs = ruleset(
        tmp_path,
        """
        [[rules]]
        name = "r"
        on = "mqtt:calls/+"
        to = ["lobby"]
        priority = 1
        execute = [
          "Play:Chime.raw",
          "Dial:{{ payload.number | digits }}@0",
          "{{ 'Display:On:' ~ payload.minutes if payload.minutes }}",
          "http://192.0.2.10/x?id={{ event.id }}@2",
        ]
        ringtone = "http://192.0.2.10/ring.raw"
        dedupe = "{{ payload.number }}"
        message.title = "Call {{ topic.split('/')[1] }}"
        message.text = "{{ payload.who }}"
        message.prompt = "p"
        background.icon = "http://192.0.2.10/i.png"
        background.image = "http://192.0.2.10/{{ payload.who }}.png"
        """,
    )
    event = mqtt("calls/in", {"number": "+1 555-0100", "who": "ann"})
    (match,) = rs.match(event)
    assert match.error is None
    assert match.execute == (
        ExecuteItem("Play:Chime.raw", 1),
        ExecuteItem("Dial:15550100", 0),
        ExecuteItem(f"http://192.0.2.10/x?id={event.id}", 2),
    )
    assert match.page == TextPage(title="Call in", text="ann", prompt="p")
    assert match.background == ("http://192.0.2.10/i.png", "http://192.0.2.10/ann.png")
    assert match.ringtone == "http://192.0.2.10/ring.raw"
    assert match.dedupe_key == "+1 555-0100"
    (match,) = rs.match(mqtt("calls/in", {"number": "1", "who": "b", "minutes": 5}))
    assert ExecuteItem("Display:On:5", 1) in match.execute


def test_failures_become_match_errors_not_exceptions(tmp_path: Path) -> None:
    rs = ruleset(
        tmp_path,
        """
        [[rules]]
        name = "divides"
        on = "mqtt:t"
        when = "1 / payload.n"
        to = ["lobby"]
        execute = ["Key:Services"]

        [[rules]]
        name = "uri"
        on = "mqtt:t"
        to = ["lobby"]
        execute = ["Play:{{ payload.tone }}"]

        [[rules]]
        name = "ring"
        on = "mqtt:t"
        to = ["lobby"]
        ringtone = "{{ payload.tone }}"

        [[rules]]
        name = "after"
        on = "mqtt:t"
        to = ["lobby"]
        execute = ["Key:Services"]
        """,
    )
    divides, uri, ring, after = rs.match(mqtt("t", {"n": 0, "tone": "../../etc/passwd"}))
    assert divides.error is not None and divides.error.startswith("rules[divides].when: ")
    assert uri.error == "rules[uri].execute[0]: Invalid URL: Play:../../etc/passwd"
    assert ring.error is not None and ring.error.startswith("rules[ring].ringtone: must be")
    assert (after.error, after.execute) == (None, (ExecuteItem("Key:Services"),))


def test_false_when_is_no_match_and_text_payloads_work(tmp_path: Path) -> None:
    rs = ruleset(
        tmp_path,
        """
        [[rules]]
        name = "door"
        on = "mqtt:zigbee2mqtt/+/action"
        when = "payload in ['single', 'double']"
        to = ["frontdesk"]
        execute = ["Play:Chime.raw"]
        message = { text = "{{ payload }} at {{ topic.split('/')[1] }}, {{ now.year > 2000 }}" }
        """,
    )
    assert rs.match(mqtt("zigbee2mqtt/front/action", b"")) == []
    assert rs.match(mqtt("zigbee2mqtt/front/action", b"hold")) == []
    (match,) = rs.match(mqtt("zigbee2mqtt/front/action", b"single"))
    assert match.page is not None and match.page.text == "single at front, True"


def test_compile_errors_name_the_rule(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rules\[bad\]\.when"):
        ruleset(
            tmp_path,
            """
            [[rules]]
            name = "bad"
            on = "webhook:x"
            when = "payload =="
            to = ["lobby"]
            execute = ["Key:Services"]
            """,
        )


# --- the shipped examples, fed real-shaped events ----------------------------------------------


@pytest.fixture
def examples(tmp_path: Path) -> dict[str, RuleSet]:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in ("mqtt-password", "phone-password", "webhook-token"):
        (credentials / name).write_text(f"{name}-value\n")
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
    return {
        path.stem: RuleSet.compile(load_config(path, environ=environ))
        for path in sorted(EXAMPLES.glob("*.toml"))
    }


def test_every_integration_has_an_example(examples: dict[str, RuleSet]) -> None:
    # evacuation.toml and school-bells.toml show features (audio paging, schedules), not an
    # integration with another tool.
    assert set(examples) - {"evacuation", "school-bells"} == {
        "zigbee2mqtt",
        "frigate",
        "alertmanager",
        "grafana",
        "home-assistant",
        "shelly-tasmota",
    }


def only(matches: list[Match], rule: str) -> Match:
    assert [m.rule.name for m in matches] == [rule]
    assert matches[0].error is None, matches[0].error
    return matches[0]


def test_zigbee2mqtt_press_pages_once(examples: dict[str, RuleSet]) -> None:
    rs = examples["zigbee2mqtt"]
    match = only(rs.match(mqtt("zigbee2mqtt/Front door/action", b"single")), "doorbell")
    assert match.execute == (ExecuteItem("Play:Chime.raw"), ExecuteItem("Display:On:5"))
    assert match.page == TextPage(title="Doorbell", text="Front door: single press")
    assert match.rule.phones == ("reception", "backoffice")
    # One cooldown per button.
    assert match.dedupe_key == "zigbee2mqtt/Front door/action"
    # The JSON copy of the same press, the empty action after it, state updates: nothing.
    press = {"action": "single", "battery": 100, "linkquality": 128}
    assert rs.match(mqtt("zigbee2mqtt/Front door", press)) == []
    assert rs.match(mqtt("zigbee2mqtt/Front door/action", b"")) == []
    assert rs.match(mqtt("zigbee2mqtt/Front door", {"battery": 99})) == []
    assert rs.match(mqtt("zigbee2mqtt/bridge/state", {"state": "online"})) == []
    # A sensor's report is not even on a topic the rules listen to.
    assert "zigbee2mqtt/+/action" in rs.mqtt_filters
    assert all(f.endswith("/action") for f in rs.mqtt_filters)
    panic = only(rs.match(mqtt("zigbee2mqtt/Desk/action", b"long")), "panic-button")
    assert panic.execute[0] == ExecuteItem("Play:Alarm.raw")


FRIGATE_AFTER = {
    "id": "1607123955.475377-mxklsc",
    "camera": "front_door",
    "label": "person",
    "top_score": 0.95,
    "current_zones": ["driveway"],
}


def test_frigate_pages_on_new_person_only(examples: dict[str, RuleSet]) -> None:
    rs = examples["frigate"]
    new = {"type": "new", "before": {}, "after": FRIGATE_AFTER}
    match = only(rs.match(mqtt("frigate/events", new)), "person-detected")
    assert match.page == TextPage(title="Front Door", text="Person detected (95%) in driveway")
    assert match.dedupe_key == "1607123955.475377-mxklsc"
    assert match.execute == (ExecuteItem("Play:Chime.raw"),)
    for kind in ("update", "end"):
        event = {"type": kind, "before": FRIGATE_AFTER, "after": FRIGATE_AFTER}
        assert rs.match(mqtt("frigate/events", event)) == []
    car = {"type": "new", "before": {}, "after": {**FRIGATE_AFTER, "label": "car"}}
    assert rs.match(mqtt("frigate/events", car)) == []
    review = {
        "type": "new",
        "before": {},
        "after": {
            "id": "1718987129.308396-fqk5ka",
            "camera": "front_cam",
            "severity": "alert",
            "data": {"objects": ["person", "car"], "zones": []},
        },
    }
    match = only(rs.match(mqtt("frigate/reviews", review)), "review-alert")
    assert match.page == TextPage(title="Alert: front_cam", text="person, car")
    assert match.rule.phones == ("guardroom",)
    review["after"]["severity"] = "detection"  # type: ignore[index]
    assert rs.match(mqtt("frigate/reviews", review)) == []


def alertmanager_payload(status: str) -> dict[str, Any]:
    alert = {
        "status": status,
        "labels": {"alertname": "InstanceDown", "instance": "db1:9100", "severity": "critical"},
        "annotations": {"summary": "db1 is down"},
        "startsAt": "2024-05-06T07:08:09.123Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2024-05-06T08:00:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": "b0f9e4d3c2a1",
    }
    return {
        "version": "4",
        "groupKey": '{}:{alertname="InstanceDown"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "desk-phones",
        "groupLabels": {"alertname": "InstanceDown"},
        "commonLabels": alert["labels"],
        "commonAnnotations": alert["annotations"],
        "externalURL": "http://alertmanager:9093",
        "alerts": [alert],
        "notification_reason": "new",  # newer versions add keys; rules ignore them
    }


def test_alertmanager_firing_and_resolved(examples: dict[str, RuleSet]) -> None:
    rs = examples["alertmanager"]
    firing = only(rs.match(hook("alertmanager", alertmanager_payload("firing"))), "alert-firing")
    assert firing.execute == (ExecuteItem("Play:Alarm.raw"), ExecuteItem("Display:On:30"))
    assert firing.page == TextPage(title="InstanceDown (1)", text="db1:9100: db1 is down\n")
    # The group and its firing alerts (fingerprint and start).
    key = '{}:{alertname="InstanceDown"} b0f9e4d3c2a1@2024-05-06T07:08:09.123Z'
    assert firing.dedupe_key == key
    warning = alertmanager_payload("firing")
    warning["commonLabels"] = {"alertname": "DiskFull", "severity": "warning"}
    assert only(rs.match(hook("alertmanager", warning)), "alert-firing").execute == (
        ExecuteItem("Play:Alarm.raw"),
    )
    # Resolved: no rule pages (resolve_when sends the notices); its key is the firing page's.
    resolved = alertmanager_payload("resolved")
    assert rs.match(hook("alertmanager", resolved)) == []
    rule = tomllib.loads((EXAMPLES / "alertmanager.toml").read_text())["rules"][0]
    key_of = Templates().compile_template(rule["dedupe"], "dedupe")
    assert key_of(event_context(hook("alertmanager", resolved))) == key


def test_grafana_firing_and_resolved(examples: dict[str, RuleSet]) -> None:
    rs = examples["grafana"]
    payload = alertmanager_payload("firing") | {
        "version": "1",
        "orgId": 1,
        "title": "[FIRING:1] InstanceDown",
        "state": "alerting",
        "message": "**Firing**\n\nValue: A=0",
    }
    payload["alerts"][0] |= {"silenceURL": "http://g/s", "dashboardURL": "", "values": {"A": 0}}
    match = only(rs.match(hook("grafana", payload)), "grafana-firing")
    assert match.page == TextPage(title="InstanceDown", text="db1 is down\n")
    assert match.execute == (ExecuteItem("Play:Alarm.raw"),)
    payload |= {"status": "resolved", "commonLabels": {}, "message": "all good"}
    match = only(rs.match(hook("grafana", payload)), "grafana-resolved")
    assert match.page == TextPage(title="OK: [FIRING:1] InstanceDown", text="all good")


def test_home_assistant_webhook_and_mqtt(examples: dict[str, RuleSet]) -> None:
    rs = examples["home-assistant"]
    body = {"title": "Garage", "message": "Garage door open for 10 minutes", "tone": "Chime.raw"}
    match = only(rs.match(hook("home-assistant", body)), "ha-notify")
    assert match.execute == (ExecuteItem("Play:Chime.raw"),)
    assert match.page == TextPage(title="Garage", text="Garage door open for 10 minutes")
    assert match.rule.phones == ("kitchen", "study")
    quiet = only(rs.match(hook("home-assistant", {"message": "Laundry done"})), "ha-notify")
    assert quiet.execute == ()
    assert quiet.page == TextPage(title="Home Assistant", text="Laundry done")
    match = only(rs.match(mqtt("phonepush/ha/kitchen", b"Dinner is ready")), "ha-mqtt-kitchen")
    assert match.page == TextPage(title="Home Assistant", text="Dinner is ready")
    assert match.rule.phones == ("kitchen",)
    match = only(rs.match(mqtt("phonepush/ha/house", body)), "ha-mqtt-house")
    assert match.execute == (ExecuteItem("Play:Chime.raw"),)


def test_tasmota_buttons_new_and_old_format(examples: dict[str, RuleSet]) -> None:
    rs = examples["shelly-tasmota"]
    for payload in ({"Button1": {"Action": "SINGLE"}}, {"ACTION": "SINGLE"}):
        match = only(rs.match(mqtt("stat/hall-button/RESULT", payload)), "tasmota-button")
        assert match.page == TextPage(title="Button", text="hall-button pressed")
    assert rs.match(mqtt("stat/hall-button/RESULT", {"POWER": "ON"})) == []
    assert rs.match(mqtt("stat/hall-button/RESULT", {"Button1": {"Action": "DOUBLE"}})) == []


def test_shelly_gen1_and_gen2_buttons(examples: dict[str, RuleSet]) -> None:
    rs = examples["shelly-tasmota"]
    topic = "shellies/shellybutton1-A4CF12F45C3E/input_event/0"
    first = only(rs.match(mqtt(topic, {"event": "S", "event_cnt": 2})), "shelly-gen1-button")
    assert first.page == TextPage(title="Button", text="shellybutton1-A4CF12F45C3E: single press")
    assert first.dedupe_key == f"{topic}:2"
    second = only(rs.match(mqtt(topic, {"event": "S", "event_cnt": 3})), "shelly-gen1-button")
    assert second.dedupe_key != first.dedupe_key  # event_cnt tells two presses apart
    long = only(rs.match(mqtt(topic, {"event": "L", "event_cnt": 4})), "shelly-gen1-button")
    assert long.execute == (ExecuteItem("Play:Chime.raw"), ExecuteItem("Play:Alarm.raw"))
    assert rs.match(mqtt(topic, {"event": "", "event_cnt": 4})) == []

    gen2 = {
        "src": "shellyplus1-a8032ab12345",
        "method": "NotifyEvent",
        "params": {"ts": 1.7e9, "events": [{"component": "input:0", "event": "single_push"}]},
    }
    match = only(rs.match(mqtt("shellyplus1-a8032ab12345/events/rpc", gen2)), "shelly-gen2-button")
    assert match.page == TextPage(title="Button", text="shellyplus1-a8032ab12345: single press")
    status = {"method": "NotifyStatus", "params": {"switch:0": {"output": True}}}
    assert rs.match(mqtt("shellyplus1-a8032ab12345/events/rpc", status)) == []


def test_the_rule_book_compiles_no_template_loading_compiled_already(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "phonepush.toml"
    rules = """
        [[rules]]
        name = "door"
        on = "mqtt:doors/+"
        when = "payload.action == 'open'"
        to = "lobby"
        dedupe = "{{ topic }}"
        execute = ["http://192.0.2.9/door?who={{ payload.who }}", "Play:{{ payload.tone }}"]
        message = { title = "Door", text = "{{ payload.who }} at {{ topic }}" }
        ringtone = "http://192.0.2.9/{{ payload.tone }}.raw"
        resolve_when = "payload.action == 'closed'"
        ack = true

        [[rules]]
        name = "floor"
        on = "mqtt:floors/#"
        to = "office"
        message = { text = "{{ payload.what }}" }
        group_by = ["{{ payload.floor }}"]

        [[rules]]
        name = "announce"
        on = "webhook:door"
        to = "lobby"
        audio = { say = "Door {{ payload.who }}" }
        """
    path.write_text(PHONES + textwrap.dedent(rules), encoding="utf-8")
    config = load_config(path, environ={})
    compiled: list[str] = []
    for name in ("from_string", "compile_expression"):
        real = getattr(jinja2.Environment, name)

        def counting(self: Any, source: Any, *args: Any, _real: Any = real, **kw: Any) -> Any:
            compiled.append(str(source))
            return _real(self, source, *args, **kw)

        monkeypatch.setattr(jinja2.Environment, name, counting)
    book = RuleSet.compile(config)
    assert compiled == []
    (match,) = book.match(mqtt("doors/front", b'{"action": "open", "who": "Ann", "tone": "Ding"}'))
    assert match.page is not None and match.page.text == "Ann at doors/front"
    assert [item.url for item in match.execute] == [
        "http://192.0.2.9/door?who=Ann",
        "Play:Ding",
    ]
    assert match.ringtone == "http://192.0.2.9/Ding.raw"
    assert book.rule("floor").group_by and book.rule("announce").audio_say is not None
