"""``[[schedules]]``: pages on a timetable, through the real pipeline, once per firing."""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from _pg_fixtures import OpenStore
from phonepush.commands.check import main as check_main
from phonepush.config import ScheduleConfig, parse_config
from phonepush.errors import ConfigError
from phonepush.events import Event
from phonepush.sim.simulator import Fleet
from phonepush.sources.schedule import Clock, Scheduler
from phonepush.store.interface import Store
from phonepush.store.spool import Spool

NEW_YORK = ZoneInfo("America/New_York")
TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeClock:
    """Wall time that moves only when the schedulers sleep: days pass in milliseconds.

    With ``sleepers`` schedulers sharing it, time moves only once all of them sleep, to the
    earliest wake-up, as it would for schedulers that take no time to work. Moving it while one
    of them still works (a claim awaiting a database) would hand that one a "now" a whole
    interval old, and its next sleep would jump past a firing.
    """

    def __init__(self, start: float, *, sleepers: int = 1) -> None:
        self.t = start
        self._sleepers = sleepers
        self._waiting: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, delay: float) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((self.t + delay, woken))
        if len(self._waiting) >= self._sleepers:
            self.t = max(self.t, min(target for target, _ in self._waiting))
            for target, future in self._waiting:
                if target <= self.t:
                    future.set_result(None)
            self._waiting = [(t, f) for t, f in self._waiting if not f.done()]
        try:
            await woken
        finally:
            # A sleeper cancelled (a test ending, a reload) no longer holds time back.
            self._waiting = [(t, f) for t, f in self._waiting if f is not woken]

    @property
    def clock(self) -> Clock:
        return Clock(self.now, self.sleep)


def schedule(**keys: Any) -> ScheduleConfig:
    keys.setdefault("name", "bell")
    keys.setdefault("to", ["office"])
    keys.setdefault("message", {"title": "Bell"})
    return ScheduleConfig.model_validate(keys)


@pytest.fixture
async def spool(open_store: OpenStore) -> AsyncIterator[Store]:
    async with open_store() as opened:
        yield opened


class Recorder:
    """Stands in for the intake: the events a scheduler fired."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def __call__(self, event: Event) -> None:
        self.events.append(event)

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(e.payload) for e in self.events]

    def local(self) -> list[str]:
        return [p["scheduled_at"] for p in self.payloads()]


async def run_until(scheduler: Scheduler, done: Callable[[], bool]) -> None:
    task = asyncio.create_task(scheduler.run())
    try:
        await eventually(done, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def at(*parts: int, fold: int = 0) -> float:
    return datetime(*parts, tzinfo=NEW_YORK, fold=fold).timestamp()  # type: ignore[misc]


# --- timing across DST, with an injected clock ---------------------------------------------------


async def test_a_cron_on_a_time_the_clock_skips_fires_once_when_the_clock_jumps(
    spool: Store,
) -> None:
    # 2026-03-08, America/New_York: 02:00 EST becomes 03:00 EDT, so 02:30 never happens.
    clock = FakeClock(at(2026, 3, 7, 12, 0))
    fired = Recorder()
    bell = schedule(cron="30 2 * * *", timezone="America/New_York")
    scheduler = Scheduler([bell], store=spool, accept=fired, clock=clock.clock)
    await run_until(scheduler, lambda: len(fired.events) >= 3)
    assert fired.local()[:3] == [
        "2026-03-08T03:00:00-04:00",  # the moment the clock jumped past 02:30
        "2026-03-09T02:30:00-04:00",
        "2026-03-10T02:30:00-04:00",
    ]
    first = fired.payloads()[0]
    assert first["name"] == "bell" and first["timezone"] == "America/New_York"
    assert first["timestamp"] == at(2026, 3, 8, 3, 0)
    assert {e.source for e in fired.events} == {"schedule"}
    assert {e.key for e in fired.events} == {"schedule:bell"}


async def test_a_cron_on_a_time_the_clock_passes_twice_fires_once(spool: Store) -> None:
    # 2026-11-01, America/New_York: 02:00 EDT becomes 01:00 EST, so 01:30 happens twice.
    clock = FakeClock(at(2026, 10, 31, 12, 0))
    fired = Recorder()
    bell = schedule(cron="30 1 * * *", timezone="America/New_York")
    scheduler = Scheduler([bell], store=spool, accept=fired, clock=clock.clock)
    await run_until(scheduler, lambda: len(fired.events) >= 3)
    assert fired.local()[:3] == [
        "2026-11-01T01:30:00-04:00",  # the first 01:30 only
        "2026-11-02T01:30:00-05:00",
        "2026-11-03T01:30:00-05:00",
    ]
    first, second = (e["timestamp"] for e in fired.payloads()[:2])
    assert second - first == 25 * 3600


async def test_a_half_hourly_cron_fires_in_both_passes_of_the_repeated_hour(spool: Store) -> None:
    clock = FakeClock(at(2026, 11, 1, 0, 50))
    fired = Recorder()
    chime = schedule(cron="*/30 * * * *", timezone="America/New_York")
    scheduler = Scheduler([chime], store=spool, accept=fired, clock=clock.clock)
    await run_until(scheduler, lambda: len(fired.events) >= 5)
    assert fired.local()[:5] == [
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:30:00-04:00",
        "2026-11-01T01:00:00-05:00",
        "2026-11-01T01:30:00-05:00",
        "2026-11-01T02:00:00-05:00",
    ]


async def test_every_fires_on_multiples_of_the_interval(spool: Store) -> None:
    clock = FakeClock(1_800_000_007.5)
    fired = Recorder()
    scheduler = Scheduler([schedule(every="10s")], store=spool, accept=fired, clock=clock.clock)
    await run_until(scheduler, lambda: len(fired.events) >= 3)
    assert [p["timestamp"] for p in fired.payloads()[:3]] == [
        1_800_000_010.0,
        1_800_000_020.0,
        1_800_000_030.0,
    ]


# --- missed firings, shared spools, reloads ------------------------------------------------------


async def test_a_firing_missed_while_down_is_made_up_once_within_catch_up(
    spool: Store, caplog: pytest.LogCaptureFixture
) -> None:
    bell = schedule(cron="0 8 * * *", timezone="America/New_York", catch_up="10m")
    await spool.schedules.claim("bell", at(2026, 6, 1, 8, 0), at(2026, 6, 1, 8, 0))
    # Down over the next day's 08:00; back at 08:04.
    clock = FakeClock(at(2026, 6, 2, 8, 4))
    fired = Recorder()
    await Scheduler([bell], store=spool, accept=fired, clock=clock.clock).catch_up()
    assert fired.local() == ["2026-06-02T08:00:00-04:00"]
    assert fired.payloads()[0]["made_up"] is True
    # A second start (or a second instance) finds it made: nothing twice.
    await Scheduler([bell], store=spool, accept=fired, clock=clock.clock).catch_up()
    assert len(fired.events) == 1
    assert await spool.schedules.last("bell") == at(2026, 6, 2, 8, 0)


@pytest.mark.parametrize("catch_up", ["0s", "3m"])
async def test_a_firing_missed_longer_ago_than_catch_up_is_skipped_and_logged(
    spool: Store, caplog: pytest.LogCaptureFixture, catch_up: str
) -> None:
    bell = schedule(cron="0 8 * * *", timezone="America/New_York", catch_up=catch_up)
    await spool.schedules.claim("bell", at(2026, 6, 1, 8, 0), at(2026, 6, 1, 8, 0))
    clock = FakeClock(at(2026, 6, 2, 8, 4))
    fired = Recorder()
    caplog.set_level(logging.INFO, "phonepush.schedules")
    await Scheduler([bell], store=spool, accept=fired, clock=clock.clock).catch_up()
    assert fired.events == []
    assert "schedule bell: the firing due at 2026-06-02T08:00:00-04:00 EDT was missed" in (
        caplog.text
    )
    assert "skipped" in caplog.text


async def test_a_schedule_that_never_fired_has_nothing_to_make_up(spool: Store) -> None:
    clock = FakeClock(at(2026, 6, 2, 8, 4))
    fired = Recorder()
    bell = schedule(cron="0 8 * * *", timezone="America/New_York", catch_up="1h")
    await Scheduler([bell], store=spool, accept=fired, clock=clock.clock).catch_up()
    assert fired.events == []


async def test_two_schedulers_on_one_spool_fire_each_firing_once(open_store: OpenStore) -> None:
    clock = FakeClock(1_800_000_000.0, sleepers=2)
    fired = Recorder()
    tick = schedule(every="10s")
    async with open_store() as one, open_store() as two:
        first = Scheduler([tick], store=one, accept=fired, clock=clock.clock)
        second = Scheduler([tick], store=two, accept=fired, clock=clock.clock)
        tasks = [asyncio.create_task(first.run()), asyncio.create_task(second.run())]
        try:
            await eventually(lambda: len(fired.events) >= 20, timeout=10)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    stamps = [p["timestamp"] for p in fired.payloads()]
    assert len(stamps) == len(set(stamps))
    assert sorted(stamps) == [1_800_000_010.0 + 10 * i for i in range(len(stamps))]


async def test_a_claim_is_granted_once_and_never_for_an_older_firing(spool: Store) -> None:
    assert await spool.schedules.last("bell") is None
    assert await spool.schedules.claim("bell", 100.0, 101.0)
    assert not await spool.schedules.claim("bell", 100.0, 101.5)
    assert not await spool.schedules.claim("bell", 90.0, 102.0)
    assert await spool.schedules.claim("bell", 110.0, 111.0)
    assert await spool.schedules.claim("other", 100.0, 101.0)
    assert await spool.schedules.last("bell") == 110.0


async def test_an_update_keeps_unchanged_schedules_and_never_fires_a_firing_twice(
    spool: Store,
) -> None:
    clock = FakeClock(1_800_000_000.0)
    fired = Recorder()
    tick, tock = schedule(name="tick", every="10s"), schedule(name="tock", every="7s")
    scheduler = Scheduler([tick, tock], store=spool, accept=fired, clock=clock.clock)
    task = asyncio.create_task(scheduler.run())
    try:
        await eventually(lambda: len(fired.events) >= 4, timeout=10)
        # Reloaded: tick unchanged, tock gone, chime new.
        scheduler.update([tick, schedule(name="chime", every="15s")])
        removed_at = clock.t
        await eventually(lambda: {"chime"} <= {e.topic for e in fired.events}, timeout=10)
        await eventually(lambda: clock.t > removed_at + 60, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    seen = [(e.topic, json.loads(e.payload)["timestamp"]) for e in fired.events]
    assert len(seen) == len(set(seen))
    assert all(stamp <= removed_at for topic, stamp in seen if topic == "tock")
    ticks = sorted(stamp for topic, stamp in seen if topic == "tick")
    assert ticks == [1_800_000_010.0 + 10 * i for i in range(len(ticks))]


async def test_an_existing_spool_file_without_the_table_opens(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    async with Spool(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE schedule_firings")
    async with Spool(path) as reopened:
        assert await reopened.schedules.last("bell") is None
        assert await reopened.schedules.claim("bell", 1.0, 2.0)


# --- through the real daemon, to simulated phones -------------------------------------------------


def daemon_config(fleet: Fleet, **tick: Any) -> dict[str, Any]:
    office, desk = fleet.phones
    return {
        "phones": [
            {"name": "office", "host": office.address},
            {"name": "desk", "host": desk.address},
        ],
        "webhook": {"token": TOKEN},
        "schedules": [
            {
                "name": "tick",
                "every": "1s",
                "to": "all",
                "message": {"title": "Bell", "text": "{{ payload.scheduled_at }}"},
                **tick,
            }
        ],
    }


@pytest.fixture
async def phones(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=2, names=["office", "desk"], tone_ms=10)
    return fleet


async def test_a_schedule_pages_its_phones_again_and_again(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    running = await daemon_runner.start(daemon_config(phones))
    await eventually(lambda: all(p.state.pushes >= 3 for p in phones.phones), timeout=15)
    recent = await running.spool.events.recent(50)
    assert len(recent) >= 3
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        shown = (await client.get(f"/api/events/{recent[-1].id}")).json()
    assert (shown["source"], shown["topic"], shown["rules"]) == ("schedule", "tick", ["tick"])
    assert {d["state"] for d in shown["deliveries"]} == {"delivered"}
    assert daemon_runner.metric("phonepush_events_total", source="schedule", rule="tick") >= 3


async def test_a_silence_holds_a_schedules_page(daemon_runner: DaemonRunner, phones: Fleet) -> None:
    running = await daemon_runner.start(daemon_config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        made = await client.post(
            "/api/silences",
            json={
                "matchers": [{"name": "source", "value": "schedule"}],
                "duration": "1h",
                "createdBy": "caretaker",
                "comment": "school holidays",
            },
        )
        assert made.status_code == 201
    silence_id = made.json()["id"]

    async def silenced() -> bool:
        for event in await running.spool.events.recent(50):
            if (
                event.source == "schedule"
                and event.deliveries
                and all(
                    (d.state, d.error) == ("suppressed", f"silenced by {silence_id}")
                    for d in event.deliveries
                )
            ):
                return True
        return False

    await eventually(silenced, timeout=10)
    assert daemon_runner.metric("phonepush_silenced_total", rule="tick") >= 1


async def test_a_reload_adds_and_removes_schedules(
    daemon_runner: DaemonRunner, phones: Fleet, tmp_path: Path
) -> None:
    office, desk = phones.phones
    path = tmp_path / "phonepush.toml"

    def write(name: str, to: str) -> None:
        path.write_text(
            textwrap.dedent(
                f"""
                [server]
                listen = "127.0.0.1:{daemon_runner.port}"
                [spool]
                path = "{daemon_runner.spool}"
                [[phones]]
                name = "office"
                host = "{office.address}"
                [[phones]]
                name = "desk"
                host = "{desk.address}"
                [[schedules]]
                name = "{name}"
                every = "1s"
                to = "{to}"
                message = {{ title = "{name}" }}
                """
            )
        )

    write("first", "office")
    await daemon_runner.start_file(path)
    await eventually(lambda: office.state.pushes >= 1, timeout=10)
    write("second", "desk")
    assert daemon_runner.daemon is not None
    daemon_runner.daemon.reload()
    await eventually(lambda: desk.state.pushes >= 2, timeout=10)
    before = office.state.pushes
    pushed_to_desk = desk.state.pushes
    await eventually(lambda: desk.state.pushes >= pushed_to_desk + 2, timeout=10)
    # Whatever "first" had in flight at the reload is done by now; it fires no more.
    assert office.state.pushes <= before + 1


# --- configuration and `phonepush check` ---------------------------------------------------------


BASE = {"phones": [{"name": "office", "host": "127.0.0.1:1"}]}


def problems(entry: dict[str, Any], **extra: Any) -> str:
    data = {**BASE, "schedules": [{"name": "bell", "to": "office", **entry}], **extra}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, environ={})
    return str(caught.value)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"cron": "0 25 * * *", "timezone": "UTC", "execute": ["Key:Services"]},
            "schedules[bell].cron: not a cron expression (Bad hour): '0 25 * * *'",
        ),
        (
            {"cron": "0 8 * * 1-5", "timezone": "Europe/Nowhere", "execute": ["Key:Services"]},
            "schedules[bell].timezone: unknown time zone 'Europe/Nowhere'",
        ),
        (
            {"cron": "0 8 * * *", "execute": ["Key:Services"]},
            "schedules[bell].timezone: required with cron",
        ),
        (
            {"cron": "0 8 * * *", "every": "1h", "timezone": "UTC", "execute": ["Key:Services"]},
            "schedules[bell].cron: give cron or every, exactly one of them",
        ),
        (
            {"execute": ["Key:Services"]},
            "schedules[bell].cron: give cron or every, exactly one of them",
        ),
        (
            {"every": "500ms", "execute": ["Key:Services"]},
            "schedules[bell].every: must be at least 1s",
        ),
        ({"every": "1h"}, "schedules[bell].to: nothing to send"),
        (
            {"every": "1h", "message": {"title": "{{ payload.name"}},
            "schedules[bell].message.title:",
        ),
        (
            {"every": "1h", "to": "lobby", "execute": ["Key:Services"]},
            "schedules[bell].to: no phone or group named 'lobby'",
        ),
    ],
)
def test_a_bad_schedule_fails_loading_naming_its_key(entry: dict[str, Any], expected: str) -> None:
    assert expected in problems(entry)


def test_a_schedule_cannot_share_a_rules_name() -> None:
    rule = {"name": "bell", "on": "webhook:door", "to": "office", "execute": ["Key:Services"]}
    message = problems(
        {"every": "1h", "execute": ["Key:Services"]},
        rules=[rule],
        webhook={"allow_anonymous": True},
    )
    assert "schedules[bell].name: a rule or another schedule has this name" in message


def test_a_rule_cannot_listen_on_a_schedule() -> None:
    rule = {"name": "r", "on": "schedule:bell", "to": "office", "execute": ["Key:Services"]}
    with pytest.raises(ConfigError, match=r"rules\[r\]\.on: expected mqtt"):
        parse_config({**BASE, "rules": [rule]}, environ={})


def test_check_lists_the_next_three_firings_in_local_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "phonepush.toml"
    path.write_text(
        textwrap.dedent(
            """
            [[phones]]
            name = "office"
            host = "127.0.0.1:1"
            [[schedules]]
            name = "new-year"
            cron = "0 8 1 1 *"
            timezone = "Europe/Berlin"
            catch_up = "15m"
            to = "office"
            message = { title = "Happy new year" }
            """
        )
    )
    assert check_main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "new-year: cron '0 8 1 1 *' in Europe/Berlin, catch_up 15m" in out
    (line,) = [line for line in out.splitlines() if line.strip().startswith("next:")]
    firings = line.split("next:")[1].split(", ")
    assert len(firings) == 3
    years = [int(f.split()[1][:4]) for f in firings]
    assert years == [years[0], years[0] + 1, years[0] + 2]
    assert all(f.endswith("-01-01 08:00:00 CET") for f in (f.split(" ", 1)[1] for f in firings))


async def test_a_firing_the_spool_refuses_is_counted_and_the_next_one_still_fires(
    spool: Store,
) -> None:
    from prometheus_client import CollectorRegistry

    from phonepush.errors import SpoolFull
    from phonepush.metrics import Metrics

    metrics = Metrics(CollectorRegistry())
    clock = FakeClock(1_800_000_000.0)
    fired = Recorder()

    async def full_once(event: Event) -> None:
        if not metrics.registry.get_sample_value(
            "phonepush_events_rejected_total", {"source": "schedule", "reason": "spool_full"}
        ):
            raise SpoolFull("spool full")
        await fired(event)

    scheduler = Scheduler(
        [schedule(every="10s")], store=spool, accept=full_once, clock=clock.clock, metrics=metrics
    )
    await run_until(scheduler, lambda: len(fired.events) >= 1)
    assert fired.payloads()[0]["timestamp"] == 1_800_000_020.0


def test_the_school_bells_example_loads_and_renders_its_pages(tmp_path: Path) -> None:
    from phonepush.config import load_config
    from phonepush.rules.book import RuleBook
    from phonepush.sources.schedule import firing_event

    example = Path(__file__).resolve().parent.parent / "config" / "examples" / "school-bells.toml"
    (tmp_path / "school-bells.toml").write_text(example.read_text())
    (tmp_path / "phone-password").write_text("secret\n")
    config = load_config(tmp_path / "school-bells.toml", environ={})
    book = RuleBook.compile(config)
    chime = next(s for s in config.schedules if s.name == "chime-test")
    berlin = datetime(2026, 12, 1, 7, 30, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    assert chime.timetable.next_after(berlin - 60) == berlin
    (match,) = book.match(firing_event(chime, berlin))
    assert match.rule.phones == ("caretaker",)
    assert match.page is not None and match.page.text == "Daily test, 2026-12-01T07:30."
    lessons = next(s for s in config.schedules if s.name == "lessons-start")
    saturday = datetime(2026, 12, 5, 12, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    monday = datetime(2026, 12, 7, 8, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    assert lessons.timetable.next_after(saturday) == monday


def test_fire_dry_run_shows_a_schedules_next_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from phonepush.commands.fire import main as fire_main

    path = tmp_path / "phonepush.toml"
    path.write_text(
        textwrap.dedent(
            """
            [[phones]]
            name = "office"
            host = "127.0.0.1:1"
            [[schedules]]
            name = "new-year"
            cron = "0 8 1 1 *"
            timezone = "Europe/Berlin"
            to = "office"
            message = { title = "Happy new year", text = "{{ payload.scheduled_at[:10] }}" }
            """
        )
    )
    assert fire_main(["--config", str(path), "--schedule", "new-year", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "event schedule:new-year" in out and "rule new-year: pending, 1 phone(s)" in out
    assert "<Title>Happy new year</Title><Text>20" in out and "-01-01</Text>" in out
    assert fire_main(["--config", str(path), "--schedule", "nope", "--dry-run"]) == 1
    assert "no schedule named 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fire_main(["--config", str(path), "--schedule", "new-year"])


async def test_a_schedules_quiet_hours_hold_its_page(spool: Store) -> None:
    from phonepush.silence.silences import Facts, Quieting, Silences

    config = parse_config(
        {
            **BASE,
            "schedules": [
                {
                    "name": "bell",
                    "every": "1h",
                    "to": "office",
                    "execute": ["Play:Chime.raw"],
                    "quiet_hours": {"ranges": ["12:00-13:00"], "timezone": "Europe/Berlin"},
                }
            ],
        },
        environ={},
    )
    silences = Silences(spool)
    quieting = Quieting.from_config(config, silences)
    lunch = datetime(2026, 12, 1, 12, 30, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    event = Facts(Event("schedule", "bell", b"{}"))
    assert quieting.verdict("bell", "office", event, lunch).reason == "quiet hours"
    assert quieting.verdict("bell", "office", event, lunch + 3600).action == "send"
