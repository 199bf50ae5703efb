"""Runtime silences: the /api/silences API, matching, and persistence across restarts."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from phonepush.events import Event
from phonepush.silence.silences import MAX_REGEX_SUBJECT, Facts, Matcher
from phonepush.sim.simulator import Fleet

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FIRING: dict[str, Any] = {
    "status": "firing",
    "commonLabels": {"alertname": "DiskFull", "severity": "critical", "instance": "nas:9100"},
    "commonAnnotations": {"summary": "/srv 97% full"},
}


def config(fleet: Fleet, *, token: bool = True) -> dict[str, Any]:
    office, server_room = fleet.phones
    data: dict[str, Any] = {
        "phones": [
            {"name": "office", "host": office.address},
            {"name": "server-room", "host": server_room.address},
        ],
        "rules": [
            {
                "name": "alerts",
                "on": "webhook:alertmanager",
                "to": "all",
                "execute": ["Play:Alarm.raw"],
                "message": {"title": "{{ payload.commonLabels.alertname }}"},
            }
        ],
    }
    if token:
        data["webhook"] = {"token": TOKEN}
    return data


def silence(*matchers: dict[str, Any], **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "matchers": list(matchers),
        "duration": "2h",
        "createdBy": "ops",
        "comment": "disk swap tonight",
    }
    body.update(extra)
    if "endsAt" in extra and "duration" not in extra:
        del body["duration"]
    return body


@pytest.fixture
async def phones(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=2, names=["office", "server-room"], tone_ms=10)
    return fleet


async def fire(client: httpx.AsyncClient, payload: dict[str, Any] = FIRING) -> str:
    answer = await client.post("/hooks/alertmanager", json=payload)
    assert answer.status_code == 202
    event_id: str = answer.json()["event"]
    return event_id


async def states(runner: DaemonRunner, event_id: str) -> dict[str, tuple[str, str]]:
    assert runner.daemon is not None and runner.daemon.running is not None
    record = await runner.daemon.running.spool.events.get(event_id)
    assert record is not None
    return {d.phone: (d.state, d.error) for d in record.deliveries}


async def test_a_silence_holds_back_matching_pages_survives_a_restart_and_can_be_expired(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    office, server_room = phones.phone("office"), phones.phone("server-room")
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        made = await client.post(
            "/api/silences",
            json=silence(
                {"name": "rule", "value": "alerts"},
                {"name": "label.commonLabels.severity", "value": "crit.*", "isRegex": True},
                {"name": "phone", "value": "office"},
            ),
        )
        assert made.status_code == 201
        silence_id = made.json()["id"]
        event_id = await fire(client)
        await eventually(lambda: server_room.state.last_tone == "Alarm.raw")
        assert (await states(daemon_runner, event_id))["office"] == (
            "suppressed",
            f"silenced by {silence_id}",
        )
        assert office.state.pushes == 0
        assert daemon_runner.metric("phonepush_silenced_total", rule="alerts") == 1
        assert (
            daemon_runner.metric("phonepush_deliveries_total", phone="office", result="suppressed")
            == 1
        )
        # Events the matchers do not cover still page.
        warning = {**FIRING, "commonLabels": {**FIRING["commonLabels"], "severity": "warning"}}
        await fire(client, warning)
        await eventually(lambda: office.state.pushes == 1)

    await daemon_runner.stop()
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        listed = (await client.get("/api/silences")).json()
        assert [s["id"] for s in listed] == [silence_id]
        assert listed[0]["status"] == "active" and listed[0]["createdBy"] == "ops"
        assert listed[0]["matchers"][1] == {
            "name": "label.commonLabels.severity",
            "value": "crit.*",
            "isRegex": True,
            "isEqual": True,
        }
        event_id = await fire(client)
        await eventually(lambda: server_room.state.pushes == 3)
        assert (await states(daemon_runner, event_id))["office"][0] == "suppressed"

        assert (await client.delete(f"/api/silences/{silence_id}")).status_code == 200
        assert (await client.get("/api/silences")).json() == []
        assert (await client.delete(f"/api/silences/{silence_id}")).status_code == 404
        await fire(client)
        await eventually(lambda: office.state.pushes == 2)


async def test_a_silence_can_start_later(daemon_runner: DaemonRunner, phones: Fleet) -> None:
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        made = await client.post(
            "/api/silences",
            json=silence(
                {"name": "source", "value": "webhook"},
                startsAt="2099-01-01T00:00:00Z",
                endsAt="2099-01-01T02:00:00+00:00",
            ),
        )
        assert made.status_code == 201
        listed = (await client.get(f"/api/silences/{made.json()['id']}")).json()
        assert listed["status"] == "pending"
        await fire(client)
    await eventually(lambda: all(p.state.pushes == 1 for p in phones.phones))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (silence(), "matchers: a list of 1-16 matchers"),
        (silence({"name": "colour", "value": "red"}), "matcher name 'colour'"),
        (silence({"name": "label.", "value": "x"}), "label.<path>"),
        (silence({"name": "rule", "value": r"(a)\1", "isRegex": True}), "invalid escape"),
        (silence({"name": "rule", "value": "(?=a)", "isRegex": True}), "look-arounds"),
        (silence({"name": "rule", "value": "(?x)(a +) +", "isRegex": True}), "(?x)"),
        (silence({"name": "rule", "value": "x" * 300, "isRegex": True}), "at most 256"),
        (silence({"name": "rule", "value": "[a-", "isRegex": True}), "not a valid regex"),
        (silence({"name": "rule", "value": 3}), "as strings"),
        (silence({"name": "rule", "value": "a"}, duration="soon"), "duration:"),
        (silence({"name": "rule", "value": "a"}, endsAt="2020-01-01T00:00:00Z"), "endsAt"),
        (silence({"name": "rule", "value": "a"}, endsAt="2099-01-01T00:00:00"), "time zone"),
        (
            silence({"name": "rule", "value": "a"}, duration="2h", endsAt="2099-01-01T00:00:00Z"),
            "either",
        ),
        (silence({"name": "rule", "value": "a"}, duration="400d"), "366 days"),
        (silence({"name": "rule", "value": "a"}, createdBy=""), "createdBy"),
        (silence({"name": "rule", "value": "a"}, extra=1), "unknown key(s): extra"),
        (
            {"matchers": [{"name": "rule", "value": "a"}], "createdBy": "x", "comment": "y"},
            "either",
        ),
    ],
)
async def test_bad_silences_get_400_saying_why(
    daemon_runner: DaemonRunner, phones: Fleet, body: dict[str, Any], message: str
) -> None:
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        answer = await client.post("/api/silences", json=body)
        assert answer.status_code == 400
        assert message in answer.json()["error"]
        assert (await client.get("/api/silences")).json() == []


async def test_the_api_needs_the_token(daemon_runner: DaemonRunner, phones: Fleet) -> None:
    await daemon_runner.start(config(phones))
    body = silence({"name": "rule", "value": "alerts"})
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.post("/api/silences", json=body)).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.get("/api/silences", headers=wrong)).status_code == 401
        assert (await client.delete("/api/silences/x", headers=wrong)).status_code == 401
        answer = await client.post("/api/silences", content=b"{", headers=AUTH)
        assert answer.status_code == 400
        assert (await client.get("/api/silences", headers=AUTH)).json() == []


async def test_without_a_configured_token_the_api_is_closed(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones, token=False))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        answer = await client.post("/api/silences", json=silence({"name": "rule", "value": "a"}))
        assert answer.status_code == 403 and "webhook.token" in answer.json()["error"]


def facts(payload: bytes, topic: str = "alertmanager") -> Facts:
    return Facts(Event("webhook", topic, payload))


def test_matchers_compare_whole_values_and_payload_paths() -> None:
    event = facts(b'{"labels": {"severity": "critical", "n": 3, "on": true}, "list": ["a", "b"]}')
    regex = Matcher.parse({"name": "label.labels.severity", "value": "crit", "isRegex": True})
    assert not regex.matches("r", "p", event)  # the whole value, not a prefix
    assert Matcher.parse({"name": "label.labels.n", "value": "3"}).matches("r", "p", event)
    assert Matcher.parse({"name": "label.labels.on", "value": "true"}).matches("r", "p", event)
    assert Matcher.parse({"name": "label.list.1", "value": "b"}).matches("r", "p", event)
    # A missing value is the empty string, as Alertmanager treats a missing label.
    assert Matcher.parse({"name": "label.nope.deeper", "value": ""}).matches("r", "p", event)
    negated = Matcher.parse({"name": "phone", "value": "lobby", "isEqual": False})
    assert negated.matches("r", "office", event) and not negated.matches("r", "lobby", event)
    text = facts(b"plain text body", topic="doors/front")
    assert Matcher.parse({"name": "topic", "value": "doors/.*", "isRegex": True}).matches(
        "r", "p", text
    )
    assert Matcher.parse({"name": "label.x", "value": ""}).matches("r", "p", text)


def test_regexes_are_only_tried_on_bounded_values() -> None:
    long_value = b'{"a": "' + b"x" * (MAX_REGEX_SUBJECT + 1) + b'"}'
    matcher = Matcher.parse({"name": "label.a", "value": "x*", "isRegex": True})
    assert not matcher.matches("r", "p", facts(long_value))
    assert matcher.matches("r", "p", facts(b'{"a": "xxx"}'))
    # RE2 matches in linear time, so repeated groups and many quantifiers are fine.
    nested = Matcher.parse({"name": "label.a", "value": "(x+)+y*z*", "isRegex": True})
    assert nested.matches("r", "p", facts(b'{"a": "xxx"}'))
    assert not nested.matches("r", "p", facts(b'{"a": "' + b"x" * 200 + b'!"}'))
