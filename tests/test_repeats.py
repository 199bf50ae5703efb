"""Repeat until acknowledged, escalate, resolve: the scheduler on a clock the test drives, and the
daemon for real against simulated phones with short repeat intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from _pg_fixtures import OpenStore
from phonepush.alerting.repeats import Repeater
from phonepush.app.builder import Services, build
from phonepush.config import parse_config
from phonepush.events import Event
from phonepush.metrics import Metrics
from phonepush.pipeline.intake import Intake
from phonepush.sim.simulator import Fleet, SimPhone
from phonepush.store.spool import Delivery

TOKEN = "t0ken-for-repeats"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def config(fleet: Fleet, **rule: Any) -> dict[str, Any]:
    lobby, office, server_room = fleet.phones
    alert: dict[str, Any] = {
        "name": "disk",
        "on": "webhook:alert",
        "when": "payload.status == 'firing'",
        "to": ["it"],
        "execute": ["Play:Alarm.raw"],
        "message": {"title": "{{ payload.alertname }}", "text": "{{ payload.text }}"},
        "dedupe": "{{ payload.groupKey }}",
        "repeat": "200ms",
        "max_repeats": 2,
        "ttl": "5m",
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


FIRING = {"status": "firing", "groupKey": '{}:{alertname="DiskFull"}', "alertname": "DiskFull"}


@pytest.fixture
async def phones(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=3, names=["lobby", "office", "server-room"], tone_ms=20)
    return fleet


async def fire(runner: DaemonRunner, **payload: Any) -> str:
    async with httpx.AsyncClient(base_url=runner.url, headers=AUTH) as client:
        answer = await client.post(
            "/hooks/alert", json={**FIRING, "text": "/srv is 97% full", **payload}
        )
    assert answer.status_code == 202, answer.text
    event_id: str = answer.json()["event"]
    return event_id


async def status(runner: DaemonRunner, event_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=runner.url, headers=AUTH) as client:
        answer = await client.get(f"/api/events/{event_id}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def tones(phone: SimPhone) -> int:
    return sum(1 for t in phone.state.tones if t == "Alarm.raw")


async def settled(runner: DaemonRunner, event_id: str) -> dict[str, Any]:
    """The event's status once its alert has no repeat left to push and nothing is pending."""
    body: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal body
        body = await status(runner, event_id)
        alert = body["alerts"][0]
        return alert["next_at"] is None and all(d["state"] != "pending" for d in body["deliveries"])

    await eventually(done, timeout=10)
    return body


# --- the scheduler, on the test's clock ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_rounds_fall_due_every_repeat_and_stop_after_max_repeats(
    open_store: OpenStore,
) -> None:
    data = {
        "webhook": {"allow_anonymous": True},
        "phones": [
            {"name": "office", "host": "127.0.0.1:9"},
            {"name": "boss", "host": "127.0.0.1:9"},
        ],
        "rules": [
            {
                "name": "disk",
                "on": "webhook:alert",
                "to": "office",
                "message": {"title": "DiskFull"},
                "repeat": "2m",
                "max_repeats": 3,
                "escalate": {"after": 2, "to": ["boss"]},
            }
        ],
    }
    cfg = parse_config(data, environ={})
    clock = Clock()
    metrics = Metrics()
    submitted: list[Delivery] = []
    async with open_store(clock=clock) as spool:
        repeater = Repeater(spool, metrics=metrics, submit=submitted.extend, clock=clock)
        built = build(cfg, Services(spool, metrics, submitted.extend, clock=clock))
        intake = Intake(
            built.pipeline, spool, metrics=metrics, submit=submitted.extend, clock=clock
        )
        await intake.accept(Event("webhook", "alert", b"{}", received_at=clock.now))
        (first,) = submitted
        for d in submitted:
            await spool.deliveries.finish(d.id, "delivered")
        assert await spool.alerts.next_due() == clock.now + 120

        assert await repeater.tick(clock.now + 119) == 0
        clock.now += 120
        assert await repeater.tick() == 1
        assert [d.phone for d in submitted[1:]] == ["office"]
        # The repeat pushes the very requests of the first page (its page URL, its ack token).
        assert submitted[1].requests == first.requests
        assert await repeater.tick() == 0  # the same moment again: nothing more is due

        # Round 2 escalates: the boss gets the page too, with a token of its own.
        await spool.deliveries.finish(submitted[1].id, "delivered")
        clock.now += 120
        assert await repeater.tick() == 1
        assert sorted(d.phone for d in submitted[2:]) == ["boss", "office"]
        boss = next(d for d in submitted[2:] if d.phone == "boss")
        assert boss.requests != first.requests
        for d in submitted[2:]:
            await spool.deliveries.finish(d.id, "delivered")

        # A daemon that was down for an hour pushes the missed round once, not twenty times.
        clock.now += 3600
        assert await repeater.tick() == 1
        assert len(submitted) == 6
        assert await spool.alerts.next_due() is None
        assert await repeater.tick(clock.now + 3600) == 0

    sample = metrics.registry.get_sample_value
    assert sample("phonepush_repeats_total", {"rule": "disk"}) == 3
    assert sample("phonepush_escalations_total", {"rule": "disk"}) == 1


async def test_a_phone_still_retrying_is_not_sent_another_round(open_store: OpenStore) -> None:
    data = {
        "webhook": {"allow_anonymous": True},
        "phones": [{"name": "office", "host": "127.0.0.1:9"}],
        "rules": [
            {
                "name": "disk",
                "on": "webhook:alert",
                "to": "office",
                "message": {"title": "DiskFull"},
                "repeat": "1m",
            }
        ],
    }
    cfg = parse_config(data, environ={})
    clock = Clock()
    metrics = Metrics()
    submitted: list[Delivery] = []
    async with open_store(clock=clock) as spool:
        repeater = Repeater(spool, metrics=metrics, submit=submitted.extend, clock=clock)
        built = build(cfg, Services(spool, metrics, submitted.extend))
        intake = Intake(
            built.pipeline, spool, metrics=metrics, submit=submitted.extend, clock=clock
        )
        await intake.accept(Event("webhook", "alert", b"{}", received_at=clock.now))
        clock.now += 60
        # The round counts, but the phone's first delivery is still pending: no pile-up.
        assert await repeater.tick() == 1
        assert len(submitted) == 1
        assert spool.pending_count() == 1


# --- the daemon against simulated phones --------------------------------------------------------


async def test_unacknowledged_page_is_pushed_again_until_max_repeats(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    # Each round's deliveries expire when the next falls due (min(ttl, repeat)): under a loaded
    # machine, 200 ms rounds can expire before they are pushed, so these count whole rounds.
    await daemon_runner.start(config(phones, repeat="1s"))
    event_id = await fire(daemon_runner)
    body = await settled(daemon_runner, event_id)

    office, server_room = phones.phone("office"), phones.phone("server-room")
    assert tones(office) == 3 and tones(server_room) == 3  # the page and two repeats
    assert phones.phone("lobby").state.pushes == 0
    assert body["alerts"][0]["rounds"] == 2 and body["alerts"][0]["state"] == "active"
    kinds = sorted((d["round"], d["kind"]) for d in body["deliveries"] if d["phone"] == "office")
    assert kinds == [(0, "page"), (1, "repeat"), (2, "repeat")]
    assert daemon_runner.metric("phonepush_repeats_total", rule="disk") == 2


async def test_an_ack_on_any_phone_stops_the_repeats(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones, repeat="300ms", max_repeats=50))
    event_id = await fire(daemon_runner)
    office = phones.phone("office")
    await eventually(lambda: any(k.name == "Ack" for k in office.state.screen.softkeys))
    await office.press(name="Ack")

    body = await settled(daemon_runner, event_id)
    alert = body["alerts"][0]
    assert alert["state"] == "acknowledged" and alert["ended_by"] == "office"
    assert alert["rounds"] < 50
    assert daemon_runner.metric("phonepush_acks_total", rule="disk", phone="office") == 1


async def test_with_scope_phone_each_phone_must_acknowledge(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones, repeat="200ms", max_repeats=50, ack_scope="phone"))
    event_id = await fire(daemon_runner)
    office, server_room = phones.phone("office"), phones.phone("server-room")
    await eventually(lambda: any(k.name == "Ack" for k in office.state.screen.softkeys))
    await office.press(name="Ack")
    after_ack = tones(office)

    # The server room keeps being paged while the office is left alone.
    await eventually(lambda: tones(server_room) >= after_ack + 2)
    body = await status(daemon_runner, event_id)
    assert body["alerts"][0]["state"] == "active"
    office_rounds = [d["round"] for d in body["deliveries"] if d["phone"] == "office"]
    assert max(office_rounds) <= body["alerts"][0]["rounds"]

    await eventually(lambda: any(k.name == "Ack" for k in server_room.state.screen.softkeys))
    await server_room.press(name="Ack")
    body = await settled(daemon_runner, event_id)
    assert body["alerts"][0]["state"] == "acknowledged"
    assert {a["phone"] for a in body["alerts"][0]["acknowledged"]} == {"office", "server-room"}
    # Once acknowledged there, the office got no further round.
    office_rounds_final = [d["round"] for d in body["deliveries"] if d["phone"] == "office"]
    assert office_rounds_final == office_rounds


async def test_unacknowledged_page_escalates_to_more_phones(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    rule = {
        "to": ["office"],
        "repeat": "1s",  # rounds that cannot expire before they are pushed, as above
        "max_repeats": 2,
        "escalate": {"after": 1, "to": ["all"]},
    }
    await daemon_runner.start(config(phones, **rule))
    event_id = await fire(daemon_runner)
    body = await settled(daemon_runner, event_id)

    lobby, office = phones.phone("lobby"), phones.phone("office")
    assert tones(office) == 3
    assert tones(lobby) == 2  # rounds 1 and 2, not the first page
    escalated = sorted(
        (d["phone"], d["round"]) for d in body["deliveries"] if d["kind"] == "escalation"
    )
    assert escalated == [("lobby", 1), ("lobby", 2), ("server-room", 1), ("server-room", 2)]
    assert daemon_runner.metric("phonepush_escalations_total", rule="disk") == 1
    # An escalated phone can acknowledge with its own softkey.
    assert any(k.name == "Ack" for k in lobby.state.screen.softkeys)


async def test_repeats_resume_after_a_restart(daemon_runner: DaemonRunner, phones: Fleet) -> None:
    await daemon_runner.start(config(phones, repeat="400ms", max_repeats=3))
    event_id = await fire(daemon_runner)
    office = phones.phone("office")
    await eventually(lambda: tones(office) >= 1)
    await daemon_runner.stop()
    stopped_at = tones(office)
    assert stopped_at < 4

    await daemon_runner.start(config(phones, repeat="400ms", max_repeats=3))
    body = await settled(daemon_runner, event_id)
    assert body["alerts"][0]["rounds"] == 3
    assert tones(office) == 4


async def test_resolved_event_stops_repeats_and_tells_the_phones(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    rule = {"repeat": "300ms", "max_repeats": 50, "resolve_when": "payload.status == 'resolved'"}
    await daemon_runner.start(config(phones, **rule))
    event_id = await fire(daemon_runner)
    office, server_room = phones.phone("office"), phones.phone("server-room")
    await eventually(lambda: tones(office) >= 1 and tones(server_room) >= 1)

    # The rule's `when` refuses resolved notifications; resolve_when still sees them.
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        answer = await client.post("/hooks/alert", json={**FIRING, "status": "resolved"})
    assert answer.status_code == 202 and answer.json()["rules"] == []
    resolver = answer.json()["event"]

    body = await settled(daemon_runner, event_id)
    alert = body["alerts"][0]
    assert alert["state"] == "resolved" and alert["ended_by"] == resolver
    for phone in (office, server_room):
        await eventually(lambda p=phone: p.state.screen.title == "Resolved: DiskFull")
        assert [k.name for k in phone.state.screen.softkeys] == ["Close"]
    notices = [d for d in body["deliveries"] if d["kind"] == "resolved"]
    assert sorted(d["phone"] for d in notices) == ["office", "server-room"]
    assert all(d["state"] == "delivered" for d in notices)
    assert daemon_runner.metric("phonepush_resolved_total", rule="disk") == 1

    # Firing again after the resolve is a new incident: it pages again at once.
    before = tones(office)
    again = await fire(daemon_runner)
    assert again != event_id
    await eventually(lambda: tones(office) > before)


async def test_resolve_when_other_key_leaves_the_alert_alone(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    rule = {"repeat": "5m", "resolve_when": "payload.status == 'resolved'"}
    await daemon_runner.start(config(phones, **rule))
    event_id = await fire(daemon_runner)
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        answer = await client.post(
            "/hooks/alert", json={**FIRING, "status": "resolved", "groupKey": "other"}
        )
    assert answer.status_code == 202
    body = await status(daemon_runner, event_id)
    assert body["alerts"][0]["state"] == "active"
    assert daemon_runner.metric("phonepush_resolved_total", rule="disk") == 0


def test_the_alertmanager_example_recipe_is_valid_config() -> None:
    import tomllib

    example = Path(__file__).parent.parent / "config" / "examples" / "alertmanager.toml"
    text = example.read_text()
    assert "\nresolve_when = \"payload.status == 'resolved'\"" in text  # always on
    recipe = ("repeat", "max_repeats", "escalate")
    for key in recipe:
        assert f"\n# {key} = " in text
        text = text.replace(f"\n# {key} = ", f"\n{key} = ")
    data = tomllib.loads(text)
    # The secrets are files on the target machine; the recipe is what is checked here.
    del data["webhook"]["token_file"]
    data["webhook"]["token"] = "example"
    for phone in data["phones"]:
        del phone["password_file"]
    cfg = parse_config(data, environ={})
    firing = next(r for r in cfg.rules if r.name == "alert-firing")
    assert firing.repeat == 300 and firing.repeats == 6 and firing.acked
    assert firing.escalate is not None and firing.escalate.after == 2


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        ({"max_repeats": 3}, r"rules\[disk\]\.max_repeats: needs repeat"),
        ({"escalate": {"after": 1, "to": "all"}}, r"rules\[disk\]\.escalate: needs repeat"),
        (
            {"repeat": "1m", "max_repeats": 2, "escalate": {"after": 3, "to": "all"}},
            r"rules\[disk\]\.escalate: after \(3\) is more than max_repeats \(2\)",
        ),
        (
            {"repeat": "1m", "escalate": {"after": 1, "to": ["nobody"]}},
            r"rules\[disk\]\.escalate\.to: no phone or group named 'nobody'",
        ),
        ({"repeat": "0s"}, r"rules\[disk\]\.repeat: must be more than 0s"),
        ({"resolve_when": "payload.status =="}, r"rules\[disk\]\.resolve_when"),
        ({"ack_scope": "everyone"}, r"rules\[disk\]\.ack_scope"),
    ],
)
def test_repeat_keys_are_checked_at_load(keys: dict[str, Any], error: str) -> None:
    from phonepush.errors import ConfigError

    rule = {"name": "disk", "on": "webhook:alert", "to": "office", "message": {"title": "x"}}
    data = {"phones": [{"name": "office", "host": "127.0.0.1:9"}], "rules": [{**rule, **keys}]}
    with pytest.raises(ConfigError, match=error):
        parse_config(data, environ={})
