"""Finished deliveries are written to the spool in batches: none is lost or left pending when the
dispatcher says it is idle, and a batch follows the same rules as one finish at a time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from _daemon_fixtures import eventually
from _pg_fixtures import OpenStore
from _sim_fixtures import MakeFleet
from phonepush.dispatch.dispatcher import Dispatcher
from phonepush.events import Event
from phonepush.metrics import Metrics
from phonepush.phone.client import PhoneTarget
from phonepush.store.commit import commit_event
from phonepush.store.spool import NewDelivery, PushRequest
from phonepush.wire.cisco import execute_xml
from phonepush.wire.uri import ExecuteItem

REQUEST = PushRequest("execute", execute_xml([ExecuteItem("Key:Headset")]))


def _event() -> Event:
    return Event("mqtt", "alarm/fire", b"{}", {})


async def test_finish_many_is_finish_for_each(open_store: OpenStore) -> None:
    async with open_store() as spool:
        stored = await commit_event(
            spool,
            _event(),
            rules=["fire"],
            deliveries=[NewDelivery("fire", f"desk-{i}", (REQUEST,), 9e9) for i in range(3)],
            pages={},
            cooldowns=[],
        )
        first, second, third = (d.id for d in stored)
        with pytest.raises(ValueError, match="pending"):
            await spool.deliveries.finish_many([(first, "delivered", ""), (second, "pending", "")])
        assert spool.pending_count() == 3  # nothing of a refused batch is written

        await spool.deliveries.finish_many(
            [(first, "delivered", ""), (second, "failed", "HTTP 404")]
        )
        # Finishing again is harmless, as with finish(): the first final state stays.
        await spool.deliveries.finish_many([(first, "expired", "late")])
        await spool.deliveries.finish_many([])

        assert spool.pending_count() == 1
        assert [d.id for d in await spool.deliveries.pending()] == [third]
        record = await spool.events.get(stored[0].event_id)
        assert record is not None
        states = {d.id: (d.state, d.error) for d in record.deliveries}
        assert states == {
            first: ("delivered", ""),
            second: ("failed", "HTTP 404"),
            third: ("pending", ""),
        }


async def test_every_delivery_is_recorded_when_the_dispatcher_is_idle(
    open_store: OpenStore, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=30, tone_ms=0)
    targets = {p.name: PhoneTarget(p.name, p.host, p.port) for p in fleet.phones}
    metrics = Metrics(CollectorRegistry())
    async with open_store() as spool:
        metrics.watch(spool)
        stored = await commit_event(
            spool,
            _event(),
            rules=["fire"],
            deliveries=[NewDelivery("fire", name, (REQUEST,), 9e9) for name in targets],
            pages={},
            cooldowns=[],
        )
        async with Dispatcher(spool, targets, metrics=metrics) as dispatcher:
            dispatcher.submit(stored)
            await dispatcher.wait_idle()
            # Checked at once, before the loop runs again: idle means written.
            assert spool.pending_count() == 0
            record = await spool.events.get(stored[0].event_id)
            assert record is not None
            assert {d.state for d in record.deliveries} == {"delivered"}
            registry = metrics.registry
            assert registry.get_sample_value("phonepush_spool_pending") == 0
            delivered = sum(
                registry.get_sample_value(
                    "phonepush_deliveries_total", {"phone": name, "result": "delivered"}
                )
                or 0
                for name in targets
            )
            assert delivered == len(targets)
    assert sum(p.state.pushes for p in fleet.phones) == len(targets)


class HeldUpDeliveries:
    """A store's deliveries whose writes of finished deliveries are held up until ``go`` is
    set (``writing`` is set when the first one starts); the rest is the store's own."""

    def __init__(self, deliveries: Any) -> None:
        self._deliveries = deliveries
        self.writing = asyncio.Event()
        self.go = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._deliveries, name)

    async def finish_many(self, finished: Any) -> None:
        if not self.go.is_set():
            self.writing.set()
            await self.go.wait()
        await self._deliveries.finish_many(finished)


class HeldUpWrites:
    """The store as a dispatcher sees it, with :class:`HeldUpDeliveries`."""

    def __init__(self, spool: Any) -> None:
        self._spool = spool
        self.deliveries = HeldUpDeliveries(spool.deliveries)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spool, name)


async def _one_phone(make_fleet: MakeFleet) -> tuple[Any, dict[str, PhoneTarget]]:
    fleet = await make_fleet(phones=1, tone_ms=0)
    phone = fleet.phones[0]
    return phone, {phone.name: PhoneTarget(phone.name, phone.host, phone.port)}


async def _commit(spool: Any, phone: str, count: int) -> list[Any]:
    """``count`` pending deliveries to ``phone``, of one event."""
    deliveries = [NewDelivery("fire", phone, (REQUEST,), 9e9) for _ in range(count)]
    return list(
        await commit_event(
            spool, _event(), rules=["fire"], deliveries=deliveries, pages={}, cooldowns=[]
        )
    )


async def test_deliveries_finished_while_a_fence_stops_their_write_are_still_recorded(
    open_store: OpenStore, make_fleet: MakeFleet
) -> None:
    # The cluster's fence stops every worker, one of them in the middle of writing what it
    # finished: dropped then, the delivered page stayed pending in the store, and was pushed
    # again by whoever took the phone next.
    phone, targets = await _one_phone(make_fleet)
    async with open_store() as spool:
        stored = await _commit(spool, phone.name, 1)
        held = HeldUpWrites(spool)
        writing, go = held.deliveries.writing, held.deliveries.go
        async with Dispatcher(held, targets, metrics=Metrics(CollectorRegistry())) as dispatcher:
            dispatcher.submit(stored)
            await writing.wait()
            await dispatcher.forget()
            # Finished, not yet written: an adoption that loads it again must not push it.
            assert dispatcher.holds(stored[0].id)
            go.set()

            async def recorded() -> bool:
                record = await spool.events.get(stored[0].event_id)
                assert record is not None
                return [d.state for d in record.deliveries] == ["delivered"]

            await eventually(recorded)
    assert phone.state.pushes == 1


async def test_a_delivery_cancelled_before_it_is_submitted_is_not_pushed(
    open_store: OpenStore, make_fleet: MakeFleet
) -> None:
    # A cluster instance loading a phone's pending work as another one records an Ack hears the
    # cancel first: the delivery it then submits must not ring the phone after the Ack.
    phone, targets = await _one_phone(make_fleet)
    async with open_store() as spool:
        first, second = await _commit(spool, phone.name, 2)
        async with Dispatcher(spool, targets, metrics=Metrics(CollectorRegistry())) as dispatcher:
            dispatcher.cancel([first.id])
            dispatcher.submit([first])
            await dispatcher.wait_idle()
            assert phone.state.pushes == 0

            # Kept for a while, not for ever (a cluster hears of every cancel, mostly of
            # deliveries other instances hold): after ten thousand more, the first is gone.
            dispatcher.cancel([second.id])
            dispatcher.cancel(range(10**9, 10**9 + 10_000))
            dispatcher.submit([second])
            await dispatcher.wait_idle()
            assert phone.state.pushes == 1
