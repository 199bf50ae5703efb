"""Quiet hours: at fixed local times in a named zone (injected clock), against simulated phones."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry

from phonepush.app.builder import Services, build
from phonepush.config import parse_config
from phonepush.dispatch.dispatcher import Dispatcher
from phonepush.errors import ConfigError
from phonepush.events import Event
from phonepush.grouping.grouper import Grouper
from phonepush.metrics import Metrics
from phonepush.pipeline.intake import Intake
from phonepush.silence.silences import QuietHours, QuietHoursConfig, Silences
from phonepush.sim.simulator import Fleet
from phonepush.store.spool import Spool

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str) -> float:
    """Epoch seconds of a Berlin wall-clock time, e.g. ``"2030-03-08 23:30"`` (a Friday)."""
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


def hours(**overrides: Any) -> QuietHours:
    data: dict[str, Any] = {"ranges": ["22:00-07:00"], "timezone": "Europe/Berlin"}
    data.update(overrides)
    return QuietHours.from_config(QuietHoursConfig.model_validate(data))


def test_a_range_across_midnight_covers_both_sides_of_it() -> None:
    night = hours()
    assert night.active(at("2030-03-08 22:00"))
    assert night.active(at("2030-03-08 23:59"))
    assert night.active(at("2030-03-09 00:00"))
    assert night.active(at("2030-03-09 06:59"))
    assert not night.active(at("2030-03-09 07:00"))
    assert not night.active(at("2030-03-08 21:59"))
    assert not night.active(at("2030-03-08 12:00"))


def test_days_name_the_day_a_range_starts_and_the_zone_decides_the_day() -> None:
    friday_night = hours(days=["fri"])
    assert friday_night.active(at("2030-03-08 23:00"))  # Friday
    assert friday_night.active(at("2030-03-09 06:00"))  # Saturday morning: Friday's night
    assert not friday_night.active(at("2030-03-09 23:00"))  # Saturday night
    assert not friday_night.active(at("2030-03-08 06:00"))  # Friday morning: Thursday's night
    weekdays = hours(ranges=["09:00-17:00"], days=["mon-fri"])
    assert weekdays.active(at("2030-03-11 10:00"))  # Monday
    assert not weekdays.active(at("2030-03-10 10:00"))  # Sunday
    # 23:30 in Berlin is 22:30 UTC in winter: the same instant is quiet in one zone only.
    utc = hours(ranges=["23:00-23:59"], timezone="UTC")
    assert not utc.active(at("2030-03-08 23:30"))
    assert hours(ranges=["23:00-23:59"]).active(at("2030-03-08 23:30"))


@pytest.mark.parametrize(
    ("quiet", "message"),
    [
        ({"ranges": ["22:00-07:00"], "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"ranges": ["22:00-07:00"], "timezone": "../../etc/passwd"}, "unknown time zone"),
        ({"ranges": ["22-07"], "timezone": "UTC"}, "expected HH:MM-HH:MM"),
        ({"ranges": ["07:00-07:00"], "timezone": "UTC"}, "an empty range"),
        ({"ranges": ["22:00-07:00"], "timezone": "UTC", "days": ["fri", "fry"]}, "day names"),
        ({"ranges": ["22:00-07:00"], "timezone": "UTC", "action": "mute"}, "action"),
        ({"ranges": ["22:00-07:00"]}, "timezone"),
    ],
)
def test_bad_quiet_hours_are_refused_naming_the_key(quiet: dict[str, Any], message: str) -> None:
    data = {
        "phones": [{"name": "office", "host": "127.0.0.1:1", "quiet_hours": quiet}],
        "rules": [
            {"name": "bell", "on": "webhook:bell", "to": "office", "execute": ["Play:Chime.raw"]}
        ],
    }
    with pytest.raises(ConfigError, match=r"phones\[office\]\.quiet_hours") as info:
        parse_config(data, environ={})
    assert message in str(info.value)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def pipeline(
    tmp_path: Path, make_fleet: Any
) -> AsyncIterator[tuple[Fleet, Clock, Callable[..., Any]]]:
    """The daemon's intake, grouper, spool and dispatcher on an injected clock, against two
    simulated phones (``office`` quiet at night, ``lobby`` not)."""
    fleet: Fleet = await make_fleet(phones=2, names=["office", "lobby"], tone_ms=10)
    clock = Clock(at("2030-03-08 12:00"))
    async with AsyncExitStack() as stack:
        made: dict[str, Any] = {}

        async def start(rule: dict[str, Any], office_quiet: dict[str, Any] | None = None) -> Any:
            office, lobby = fleet.phones
            phone: dict[str, Any] = {"name": "office", "host": office.address}
            if office_quiet is not None:
                phone["quiet_hours"] = office_quiet
            config = parse_config(
                {
                    "spool": {"path": str(tmp_path / "spool.db")},
                    "webhook": {"allow_anonymous": True},
                    "phones": [phone, {"name": "lobby", "host": lobby.address}],
                    "rules": [{"name": "bell", "on": "webhook:bell", "to": "all", **rule}],
                },
                environ={},
            )
            metrics = Metrics(CollectorRegistry())
            spool = await stack.enter_async_context(Spool(config.spool.path, clock=clock))
            dispatcher = await stack.enter_async_context(
                Dispatcher(spool, config.phone_targets(), metrics=metrics, clock=clock)
            )
            silences = Silences(spool, clock=clock)
            await silences.load()
            grouper = Grouper(
                spool,
                silences,
                public_url=config.server.public_url,
                metrics=metrics,
                submit=dispatcher.submit,
                clock=clock,
            )
            services = Services(spool, metrics, dispatcher.submit, clock=clock, grouper=grouper)
            made["intake"] = Intake(
                build(config, services).pipeline,
                spool,
                metrics=metrics,
                submit=dispatcher.submit,
                clock=clock,
            )
            made.update(spool=spool, dispatcher=dispatcher, metrics=metrics, grouper=grouper)
            return made

        yield fleet, clock, start


async def ring(made: dict[str, Any], clock: Clock) -> dict[str, tuple[str, str]]:
    """Send one event at the clock's time; the (state, error) of its delivery per phone."""
    accepted = await made["intake"].accept(Event("webhook", "bell", b"{}", received_at=clock.now))
    await made["dispatcher"].wait_idle()
    record = await made["spool"].events.get(accepted.event.id)
    return {d.phone: (d.state, d.error) for d in record.deliveries}


def priorities(phone: Any) -> list[int]:
    return [item["priority"] for record in phone.state.requests for item in record["items"]]


RULE = {"execute": ["Play:Chime.raw", "Display:On:5"], "priority": 0}
NIGHT = {"ranges": ["22:00-07:00"], "timezone": "Europe/Berlin"}


async def test_rule_quiet_hours_drop_at_night_and_page_by_day(pipeline: Any) -> None:
    fleet, clock, start = pipeline
    made = await start({**RULE, "quiet_hours": NIGHT})
    clock.now = at("2030-03-08 23:30")
    states = await ring(made, clock)
    assert states == {
        "office": ("suppressed", "quiet hours"),
        "lobby": ("suppressed", "quiet hours"),
    }
    assert all(p.state.pushes == 0 for p in fleet.phones)
    registry = made["metrics"].registry
    assert (
        registry.get_sample_value(
            "phonepush_deliveries_total", {"phone": "office", "result": "suppressed"}
        )
        == 1
    )

    clock.now = at("2030-03-09 07:00")  # the next morning, just after the range
    states = await ring(made, clock)
    assert states == {"office": ("delivered", ""), "lobby": ("delivered", "")}
    assert priorities(fleet.phone("office")) == [0, 0]


async def test_idle_action_pushes_every_item_at_priority_2(pipeline: Any) -> None:
    fleet, clock, start = pipeline
    made = await start({**RULE, "quiet_hours": {**NIGHT, "action": "idle"}})
    clock.now = at("2030-03-09 02:15")  # after midnight: still the night's range
    states = await ring(made, clock)
    assert states == {"office": ("delivered", ""), "lobby": ("delivered", "")}
    office = fleet.phone("office")
    assert priorities(office) == [2, 2]
    assert office.state.last_tone == "Chime.raw"


async def test_phone_quiet_hours_apply_to_that_phone_only(pipeline: Any) -> None:
    fleet, clock, start = pipeline
    made = await start(RULE, office_quiet={**NIGHT, "days": ["fri"]})
    clock.now = at("2030-03-08 23:30")  # Friday night
    states = await ring(made, clock)
    assert states["office"] == ("suppressed", "quiet hours")
    assert states["lobby"] == ("delivered", "")
    assert fleet.phone("office").state.pushes == 0
    clock.now = at("2030-03-09 23:30")  # Saturday night: not in days
    states = await ring(made, clock)
    assert states["office"] == ("delivered", "")


async def test_drop_wins_over_idle_when_rule_and_phone_disagree(pipeline: Any) -> None:
    fleet, clock, start = pipeline
    made = await start({**RULE, "quiet_hours": {**NIGHT, "action": "idle"}}, office_quiet=NIGHT)
    clock.now = at("2030-03-08 23:30")
    states = await ring(made, clock)
    assert states["office"] == ("suppressed", "quiet hours")
    assert states["lobby"] == ("delivered", "")
    assert priorities(fleet.phone("lobby")) == [2, 2]


async def test_a_group_flushed_in_quiet_hours_is_held_back(pipeline: Any) -> None:
    fleet, clock, start = pipeline
    made = await start({**RULE, "group_wait": "5m", "quiet_hours": NIGHT})
    clock.now = at("2030-03-08 21:58")  # the events arrive before the quiet hours ...
    for _ in range(2):
        await made["intake"].accept(Event("webhook", "bell", b"{}", received_at=clock.now))
    grouper = made["grouper"]
    assert await grouper.flush_due() == []
    clock.now = at("2030-03-08 22:03")  # ... but the window ends inside them
    flushed = await grouper.flush_due()
    assert {(d.phone, d.state, d.error) for d in flushed} == {
        ("office", "suppressed", "quiet hours"),
        ("lobby", "suppressed", "quiet hours"),
    }
    await made["dispatcher"].wait_idle()
    assert all(p.state.pushes == 0 for p in fleet.phones)
