"""Several daemons on one PostgreSQL store: acks, repeat rounds, resolves, cooldowns and group
windows decided by two instances at once come out as they would on one.

Two :class:`PostgresStore` objects on one database play the two instances. The interleavings are
made, not hoped for: instance A's operation runs inside a transaction the test holds open (a
ledger function or a commit opened inside it is part of it), B's operation starts as a task, the
test waits until PostgreSQL shows B waiting for a lock (``pg_stat_activity``), then lets A commit
and looks at what B did. Without the row locks B would not wait, and the wait times out.

The same sequences one after the other run on SQLite too (two spools on one file), to show both
backends give the same result.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
import pytest

from _pg_fixtures import OpenStore
from phonepush.alerting import ledger
from phonepush.app.builder import Services, build
from phonepush.config import parse_config
from phonepush.errors import SpoolConflict, SpoolError
from phonepush.events import Event
from phonepush.grouping.grouper import Grouper
from phonepush.metrics import Metrics
from phonepush.pipeline.intake import Accepted, Intake
from phonepush.silence.silences import Silences
from phonepush.store.interface import Store
from phonepush.store.postgres import PostgresStore
from phonepush.store.records import AlertRecord, AlertState, DeliveryState, PushRequest, RoundKind

T = TypeVar("T")

PHONES = ("office", "boss")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Instance:
    """One daemon's intake (and grouper) on its own store."""

    store: Store
    intake: Intake
    grouper: Grouper | None
    metrics: Metrics
    submitted: list[Any] = field(default_factory=list)

    def suppressed_counted(self) -> float:
        return sum(
            self.metrics.registry.get_sample_value(
                "phonepush_deliveries_total", {"phone": phone, "result": "suppressed"}
            )
            or 0.0
            for phone in PHONES
        )


def config(**rule: Any) -> Any:
    return parse_config(
        {
            "webhook": {"allow_anonymous": True},
            "phones": [{"name": p, "host": "127.0.0.1:9"} for p in PHONES],
            "rules": [
                {
                    "name": "disk",
                    "on": "webhook:alert",
                    "to": list(PHONES),
                    "message": {"title": "DiskFull", "text": "{{ payload.text }}"},
                    "dedupe": "{{ payload.key }}",
                    **rule,
                }
            ],
        },
        environ={},
    )


async def instance(store: Store, cfg: Any, clock: Clock, *, grouping: bool = False) -> Instance:
    metrics = Metrics()
    submitted: list[Any] = []
    grouper = None
    if grouping:
        silences = Silences(store, clock=clock)
        await silences.load()
        grouper = Grouper(
            store,
            silences,
            public_url=cfg.server.public_url,
            metrics=metrics,
            submit=submitted.extend,
            clock=clock,
        )
    services = Services(store, metrics, submitted.extend, clock=clock, grouper=grouper)
    intake = Intake(
        build(cfg, services).pipeline, store, metrics=metrics, submit=submitted.extend, clock=clock
    )
    return Instance(store, intake, grouper, metrics, submitted)


def event(clock: Clock, key: str = "k1", text: str = "sda full") -> Event:
    body = json.dumps({"key": key, "text": text}).encode()
    return Event("webhook", "alert", body, received_at=clock.now)


@asynccontextmanager
async def two(open_store: OpenStore, clock: Clock) -> AsyncIterator[tuple[Store, Store]]:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_store(clock=clock))
        b = await stack.enter_async_context(open_store(clock=clock))
        yield a, b


@asynccontextmanager
async def pg_pair(pg_url: str, clock: Clock) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    async with (
        PostgresStore(pg_url, clock=clock) as a,
        PostgresStore(pg_url, clock=clock) as b,
    ):
        yield a, b


async def blocked(pg_url: str, task: asyncio.Task[T]) -> None:
    """Return once ``task``'s statement waits for a lock in ``pg_url``'s database; fail if it
    finishes first or does not come to wait within 30 s."""
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        async with asyncio.timeout(30):
            while True:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                found = await cur.fetchone()
                if found is not None and found[0] > 0:
                    return
                if task.done():
                    pytest.fail(f"the second instance did not wait for the first: {task.result()}")
                await asyncio.sleep(0.01)


async def race(
    pg_url: str, first: Store, held: Awaitable[Any], second: Awaitable[T]
) -> tuple[Any, T]:
    """``held`` runs in a transaction of ``first`` that stays open until ``second`` (started as
    a task) waits for one of its locks; then it commits, and ``second`` finishes."""
    async with first.transaction("held open by the test"):
        a = await held
        task = asyncio.ensure_future(second)
        await blocked(pg_url, task)
    return a, await task


async def firing(one: Instance, clock: Clock, key: str = "k1") -> Accepted:
    """An event that starts an alert, its first pages delivered."""
    accepted = await one.intake.accept(event(clock, key))
    for d in accepted.deliveries:
        await one.store.deliveries.finish(d.id, "delivered")
    return accepted


async def token_of(store: Store, event_id: str, phone: str) -> str:
    (found,) = [p for p in await store.alerts.phones_of(event_id) if p.phone == phone]
    assert found.token is not None
    return found.token


def notice(alert: AlertRecord, xml: str) -> tuple[str, str, tuple[PushRequest, ...]]:
    return f"{alert.page_id}r", xml, (PushRequest("execute", "<CiscoIPPhoneExecute/>"),)


# -- acknowledgements ----------------------------------------------------------------------------


async def test_two_acks_of_one_token_on_two_instances_are_one_first_press(pg_url: str) -> None:
    clock = Clock()
    async with pg_pair(pg_url, clock) as (a, b):
        one = await instance(a, config(ack=True, repeat="2m"), clock)
        accepted = await firing(one, clock)
        token = await token_of(a, accepted.event.id, "office")
        first, second = await race(
            pg_url,
            a,
            ledger.acknowledge(a, token, clock.now + 5, "10.0.0.1"),
            ledger.acknowledge(b, token, clock.now + 6, "10.0.0.2"),
        )
        assert first is not None and second is not None
        assert (first.first, second.first) == (True, False)
        (phone,) = [p for p in await b.alerts.phones_of(accepted.event.id) if p.phone == "office"]
        assert (phone.acked_at, phone.acked_by) == (clock.now + 5, "10.0.0.1")


async def test_two_acks_one_after_the_other_on_either_backend(open_store: OpenStore) -> None:
    clock = Clock()
    async with two(open_store, clock) as (a, b):
        one = await instance(a, config(ack=True, repeat="2m"), clock)
        accepted = await firing(one, clock)
        token = await token_of(a, accepted.event.id, "office")
        first = await ledger.acknowledge(a, token, clock.now + 5, "10.0.0.1")
        second = await ledger.acknowledge(b, token, clock.now + 6, "10.0.0.2")
        assert first is not None and second is not None
        assert (first.first, second.first) == (True, False)


async def test_a_round_waiting_for_an_ack_adds_nothing(pg_url: str) -> None:
    clock = Clock()
    async with pg_pair(pg_url, clock) as (a, b):
        one = await instance(a, config(ack=True, repeat="2m"), clock)
        accepted = await firing(one, clock)
        token = await token_of(a, accepted.event.id, "office")
        acked, round_ = await race(
            pg_url,
            a,
            ledger.acknowledge(a, token, clock.now + 5, "10.0.0.1"),
            ledger.repeat_round(b, accepted.event.id, "disk", clock.now + 120),
        )
        assert acked is not None and acked.first
        assert acked.alert.state is AlertState.ACKNOWLEDGED
        assert round_ is None
        record = await b.events.get(accepted.event.id)
        assert record is not None
        assert len(record.deliveries) == len(accepted.deliveries)
        assert await b.alerts.delivery_rounds(accepted.event.id) == {}


async def test_an_ack_waiting_for_a_round_cancels_what_the_round_added(pg_url: str) -> None:
    clock = Clock()
    async with pg_pair(pg_url, clock) as (a, b):
        one = await instance(a, config(ack=True, repeat="2m"), clock)
        accepted = await firing(one, clock)
        token = await token_of(a, accepted.event.id, "office")
        round_, acked = await race(
            pg_url,
            a,
            ledger.repeat_round(a, accepted.event.id, "disk", clock.now + 120),
            ledger.acknowledge(b, token, clock.now + 121, "10.0.0.1"),
        )
        assert round_ is not None
        added = {d.id for d in round_[1]}
        assert len(added) == len(PHONES)
        assert acked is not None and acked.first
        assert set(acked.cancelled) == added
        record = await b.events.get(accepted.event.id)
        assert record is not None
        states = {d.phone: d.state for d in record.deliveries if d.id in added}
        assert states == {"office": DeliveryState.ACKNOWLEDGED, "boss": DeliveryState.SUPPRESSED}
        alert = await b.alerts.get(accepted.event.id, "disk")
        assert alert is not None and alert.state is AlertState.ACKNOWLEDGED


async def test_a_deadlock_between_instances_is_a_conflict_to_run_again(pg_url: str) -> None:
    clock = Clock()
    async with pg_pair(pg_url, clock) as (a, b):
        one = await instance(a, config(ack=True, repeat="2m"), clock)
        e1 = (await firing(one, clock, "k1")).event.id
        e2 = (await firing(one, clock, "k2")).event.id

        async def crosswise() -> None:
            async with b.transaction("locks e2, then e1") as tx:
                await tx.alerts.get(e2, "disk", lock=True)
                await tx.alerts.get(e1, "disk", lock=True)

        failed: list[BaseException] = []
        try:
            async with a.transaction("locks e1, then e2") as tx:
                await tx.alerts.get(e1, "disk", lock=True)
                task = asyncio.ensure_future(crosswise())
                await blocked(pg_url, task)
                await tx.alerts.get(e2, "disk", lock=True)
        except SpoolError as exc:
            failed.append(exc)
        try:
            await task
        except SpoolError as exc:
            failed.append(exc)
        # PostgreSQL breaks the cycle by rolling back one of the two; the other commits.
        (conflict,) = failed
        assert isinstance(conflict, SpoolConflict)
        assert "deadlock" in str(conflict)
        assert a.healthy and b.healthy


async def test_one_round_due_on_two_instances_is_pushed_once(pg_url: str) -> None:
    clock = Clock()
    async with pg_pair(pg_url, clock) as (a, b):
        one = await instance(a, config(ack=True, repeat="2m"), clock)
        accepted = await firing(one, clock)
        due = clock.now + 120
        first, second = await race(
            pg_url,
            a,
            ledger.repeat_round(a, accepted.event.id, "disk", due),
            ledger.repeat_round(b, accepted.event.id, "disk", due),
        )
        assert first is not None and first[0].rounds == 1
        assert second is None
        rounds = await b.alerts.delivery_rounds(accepted.event.id)
        assert sorted(rounds.values()) == [(1, RoundKind.REPEAT)] * len(PHONES)


# -- resolves ------------------------------------------------------------------------------------


async def test_two_resolves_of_one_key_resolve_once_with_one_set_of_notices(pg_url: str) -> None:
    clock = Clock()
    async with pg_pair(pg_url, clock) as (a, b):
        one = await instance(a, config(ack=True, repeat="2m"), clock)
        accepted = await firing(one, clock)
        first, second = await race(
            pg_url,
            a,
            ledger.resolve(a, "disk", "k1", by_event="ok-1", at=clock.now + 9, notice=notice),
            ledger.resolve(b, "disk", "k1", by_event="ok-2", at=clock.now + 9, notice=notice),
        )
        assert [r.alert.ended_by for r in first] == ["ok-1"]
        assert second == []
        rounds = await b.alerts.delivery_rounds(accepted.event.id)
        assert sorted(kind for _, kind in rounds.values()) == [RoundKind.RESOLVED] * len(PHONES)
        alert = await b.alerts.get(accepted.event.id, "disk")
        assert alert is not None and (alert.state, alert.ended_by) == (AlertState.RESOLVED, "ok-1")


async def test_two_resolves_one_after_the_other_on_either_backend(open_store: OpenStore) -> None:
    clock = Clock()
    async with two(open_store, clock) as (a, b):
        one = await instance(a, config(ack=True, repeat="2m"), clock)
        accepted = await firing(one, clock)
        first = await ledger.resolve(a, "disk", "k1", by_event="ok-1", at=1.0, notice=notice)
        second = await ledger.resolve(b, "disk", "k1", by_event="ok-2", at=2.0, notice=notice)
        assert (len(first), second) == (1, [])
        rounds = await b.alerts.delivery_rounds(accepted.event.id)
        assert len(rounds) == len(PHONES)


# -- cooldowns and dedupe ------------------------------------------------------------------------


async def test_two_instances_taking_one_key_at_once_ring_once(pg_url: str) -> None:
    clock = Clock()
    cfg = config(cooldown="1m")
    async with pg_pair(pg_url, clock) as (a, b):
        one, other = await instance(a, cfg, clock), await instance(b, cfg, clock)
        first, second = await race(
            pg_url,
            a,
            one.intake.accept(event(clock)),
            other.intake.accept(event(clock)),
        )
        assert {d.state for d in first.deliveries} == {DeliveryState.PENDING}
        # B's stage found no cooldown (A had not committed); its commit lost the claim.
        assert [(d.phone, d.state, d.error) for d in second.deliveries] == [
            (p, DeliveryState.SUPPRESSED, "cooldown") for p in PHONES
        ]
        assert other.submitted == []
        assert other.suppressed_counted() == len(PHONES)
        stored = await a.events.get(second.event.id)
        assert stored is not None
        assert [(d.id, d.state) for d in stored.deliveries] == [
            (d.id, d.state) for d in second.deliveries
        ]
        # Its page is left out: nothing would ever show it.
        assert await a.events.page(f"{second.event.id}00") is None
        assert await a.events.page(f"{first.event.id}00") is not None


async def test_one_key_through_two_instances_in_turn_on_either_backend(
    open_store: OpenStore,
) -> None:
    clock = Clock()
    cfg = config(cooldown="1m")
    async with two(open_store, clock) as (a, b):
        one, other = await instance(a, cfg, clock), await instance(b, cfg, clock)
        first = await one.intake.accept(event(clock))
        second = await other.intake.accept(event(clock))
        assert {d.state for d in first.deliveries} == {DeliveryState.PENDING}
        assert {(d.state, d.error) for d in second.deliveries} == {
            (DeliveryState.SUPPRESSED, "cooldown")
        }
        clock.now += 61  # the window is over: the key rings again
        third = await other.intake.accept(event(clock))
        assert {d.state for d in third.deliveries} == {DeliveryState.PENDING}


async def test_a_commit_that_loses_the_claim_stores_what_the_stage_would_have(
    open_store: OpenStore,
) -> None:
    """The claim in the commit, without the stage's early look (as when another instance's
    commit lands between them): the rule's deliveries suppressed, its alert and page left out,
    another key unaffected."""
    from phonepush.store.commit import commit_event
    from phonepush.store.records import NewAlert, NewAlertPhone, NewDelivery

    clock = Clock()
    request = (PushRequest("execute", "<CiscoIPPhoneExecute/>"),)

    async def commit(store: Store, key: str) -> tuple[Event, list[Any]]:
        ev = event(clock, key)
        page = f"{ev.id}00"
        alert = NewAlert(
            "disk", key, page, "any", 120.0, 3, 0, 300.0, clock.now + 120,
            tuple(NewAlertPhone(p, f"{ev.id}-{p}", request) for p in PHONES),
        )  # fmt: skip
        stored = await commit_event(
            store,
            ev,
            rules=["disk"],
            deliveries=[NewDelivery("disk", p, request, clock.now + 300) for p in PHONES],
            pages={page: "<CiscoIPPhoneText/>"},
            cooldowns=[("disk", key, clock.now + 60)],
            alerts=[alert],
            now=clock.now,
            rule_pages={"disk": page},
        )
        return ev, stored

    async with two(open_store, clock) as (a, b):
        _, won = await commit(a, "k1")
        lost_event, lost = await commit(b, "k1")
        _, other = await commit(b, "k2")
        assert {d.state for d in won} == {d.state for d in other} == {DeliveryState.PENDING}
        assert [(d.state, d.error, d.requests) for d in lost] == [
            (DeliveryState.SUPPRESSED, "cooldown", ())
        ] * len(PHONES)
        assert await a.alerts.of_event(lost_event.id) == []
        assert await a.events.page(f"{lost_event.id}00") is None
        # B's count of pending deliveries follows what it stored: only the k2 ones.
        assert b.pending_count() == len(PHONES)


# -- group windows -------------------------------------------------------------------------------


async def windowless(pg_url: str) -> int:
    """Grouped events whose window is gone: they would never be flushed."""
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM grouped_events g WHERE NOT EXISTS (SELECT 1 FROM"
            " grouping_windows w WHERE w.rule = g.rule AND w.key = g.key)"
        )
        found = await cur.fetchone()
        assert found is not None
        return int(found[0])


GROUPED = {"group_by": "{{ payload.key }}", "group_wait": "1m", "dedupe": ""}


async def test_an_event_joining_while_a_flush_waits_is_flushed_with_the_window(
    pg_url: str,
) -> None:
    clock = Clock()
    cfg = config(**GROUPED)
    async with pg_pair(pg_url, clock) as (a, b):
        one = await instance(a, cfg, clock, grouping=True)
        other = await instance(b, cfg, clock, grouping=True)
        assert other.grouper is not None
        await one.intake.accept(event(clock, text="sda full"))
        clock.now += 61
        _, flushed = await race(
            pg_url, a, one.intake.accept(event(clock, text="sdb full")), other.grouper.flush_due()
        )
        assert sorted(d.phone for d in flushed) == sorted(PHONES)
        page = next(iter(flushed)).requests
        assert page  # one page per phone, listing both events
        assert await b.groups.next_due() is None
        assert await windowless(pg_url) == 0
        xml = [await b.events.page(p) for p in await _page_ids(pg_url)]
        assert any(x is not None and "2 alerts" in x for x in xml)


async def test_an_event_joining_while_a_flush_commits_opens_a_new_window(pg_url: str) -> None:
    clock = Clock()
    cfg = config(**GROUPED)
    async with pg_pair(pg_url, clock) as (a, b):
        one = await instance(a, cfg, clock, grouping=True)
        other = await instance(b, cfg, clock, grouping=True)
        assert other.grouper is not None and one.grouper is not None
        await one.intake.accept(event(clock, text="sda full"))
        clock.now += 61
        flushed, joined = await race(
            pg_url, b, other.grouper.flush_due(), one.intake.accept(event(clock, text="sdb full"))
        )
        assert sorted(d.phone for d in flushed) == sorted(PHONES)
        assert await windowless(pg_url) == 0
        assert await a.groups.next_due() == clock.now + 60
        clock.now += 61
        again = await one.grouper.flush_due()
        assert sorted(d.event_id for d in again) == [joined.event.id] * len(PHONES)


async def test_two_flushes_of_one_window_flush_it_once(pg_url: str) -> None:
    clock = Clock()
    cfg = config(**GROUPED)
    async with pg_pair(pg_url, clock) as (a, b):
        one = await instance(a, cfg, clock, grouping=True)
        other = await instance(b, cfg, clock, grouping=True)
        assert one.grouper is not None and other.grouper is not None
        await one.intake.accept(event(clock))
        clock.now += 61
        first, second = await race(pg_url, a, one.grouper.flush_due(), other.grouper.flush_due())
        assert sorted(d.phone for d in first) == sorted(PHONES)
        assert second == []
        assert other.submitted == []


async def test_two_flushes_in_turn_on_either_backend(open_store: OpenStore) -> None:
    clock = Clock()
    cfg = config(**GROUPED)
    async with two(open_store, clock) as (a, b):
        one = await instance(a, cfg, clock, grouping=True)
        other = await instance(b, cfg, clock, grouping=True)
        assert one.grouper is not None and other.grouper is not None
        await one.intake.accept(event(clock))
        clock.now += 61
        window = await b.groups.due(clock.now)  # B read the window before A flushed it
        assert len(window) == 1
        assert len(await one.grouper.flush_due()) == len(PHONES)
        async with b.transaction("a flush that read the window earlier") as tx:
            assert await tx.groups.lock_due(window[0].rule, window[0].key, clock.now) is None


async def _page_ids(pg_url: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute("SELECT id FROM pages")
        return [str(row[0]) for row in await cur.fetchall()]
