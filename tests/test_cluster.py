"""The cluster's coordination (phonepush.cluster, store/cluster.py) on a real PostgreSQL: two
instances' claims, releases, adoptions and leadership over two stores on one database, with the
dispatcher's side recorded by a stand-in that does what the cluster asks of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from _cluster_fixtures import Faulty, SlowRelease, claimed, owner, pending, running
from _daemon_fixtures import eventually
from phonepush.cluster import Cluster
from phonepush.cluster.loops import Leadership
from phonepush.errors import SpoolError
from phonepush.store.cluster import PostgresCluster
from phonepush.store.postgres import PostgresStore
from phonepush.store.records import Delivery, DeliveryState

LEASE = 1.5


class Lanes:
    """The dispatcher as the cluster sees it: what it was handed, what it was told to drop."""

    def __init__(self) -> None:
        self.submitted: list[Delivery] = []
        self.known: set[int] = set()
        self.cancelled: list[int] = []
        self.forgotten = 0

    def submit(self, deliveries: Iterable[Delivery]) -> None:
        for delivery in deliveries:
            if delivery.id not in self.known:
                self.known.add(delivery.id)
                self.submitted.append(delivery)

    def cancel(self, delivery_ids: Iterable[int]) -> None:
        self.cancelled.extend(delivery_ids)

    def busy(self, phone: str) -> bool:
        return False

    async def flush(self) -> None:
        return None

    async def forget(self) -> None:
        self.forgotten += 1
        self.known.clear()

    def ids(self) -> list[int]:
        return [d.id for d in self.submitted]


# --- the statements -----------------------------------------------------------------------------


async def test_a_phone_is_held_by_one_live_instance_and_released_only_without_pending_work(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = PostgresCluster(stores[0]), PostgresCluster(stores[1])
    await a.heartbeat("a", "host", 30, rejoin=False)
    await b.heartbeat("b", "host", 30, rejoin=False)
    assert await a.claim("a", ["lobby", "office"]) == [("lobby", ""), ("office", "")]
    assert await b.claim("b", ["lobby"]) == []
    # Held already: taken from no one.
    assert await a.claim("a", ["lobby"]) == [("lobby", "")]

    delivery = await pending(stores[1], "lobby")
    assert await a.release("a", ["lobby"]) == {"lobby": "kept"}
    assert [d.id for d in await a.pending_of(["lobby"])] == [delivery.id]
    await stores[0].deliveries.finish(delivery.id, DeliveryState.DELIVERED)
    assert await a.release("a", ["lobby", "office"]) == {"lobby": "released", "office": "released"}
    assert await b.release("b", ["office"]) == {"office": "lost"}
    assert await b.claim("b", ["lobby"]) == [("lobby", "")]


async def test_phones_of_an_instance_whose_lease_ran_out_are_adopted_and_unclaimed_work_too(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = PostgresCluster(stores[0]), PostgresCluster(stores[1])
    await a.heartbeat("a", "host", LEASE, rejoin=False)
    await b.heartbeat("b", "host", 60, rejoin=False)
    await a.claim("a", ["lobby"])
    await pending(stores[0], "lobby")
    await pending(stores[0], "office")  # committed, never claimed (its instance died)
    await pending(stores[0], "hall", audio=True)  # an audio page: the announcer's, not work

    assert await b.adopt("b") == [("office", "")]
    await asyncio.sleep(LEASE + 0.2)  # a's lease runs out by the database's clock
    assert await b.adopt("b") == [("lobby", "a")]
    assert await b.adopt("b") == []
    # An instance that is not live takes nothing.
    assert await a.claim("a", ["kitchen"]) == []
    assert await a.adopt("a") == []


async def test_the_leader_is_the_first_live_instance_and_changes_when_its_lease_runs_out(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = PostgresCluster(stores[0]), PostgresCluster(stores[1])
    assert await a.heartbeat("a", "host", LEASE, rejoin=False) == (1, "a")
    assert await b.heartbeat("b", "host", 60, rejoin=False) == (2, "a")
    assert await a.heartbeat("a", "host", LEASE, rejoin=False) == (2, "a")
    await asyncio.sleep(LEASE + 0.2)
    assert await b.heartbeat("b", "host", 60, rejoin=False) == (1, "b")
    # Back, a rejoins without its old claims and does not take the leadership back.
    await a.claim("a", ["lobby"])
    assert await a.heartbeat("a", "host", LEASE, rejoin=True) == (2, "b")
    assert await b.claim("b", ["lobby"]) == [("lobby", "")]


# --- two Cluster objects ------------------------------------------------------------------------


def _cluster(
    store: PostgresCluster, lanes: Lanes, name: str, registry: CollectorRegistry | None = None
) -> Cluster:
    registry = registry if registry is not None else CollectorRegistry()
    return Cluster(store, lanes, lease=LEASE, registry=registry, instance=name)


async def test_work_committed_through_another_instance_reaches_the_phones_holder(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    lanes_a, lanes_b = Lanes(), Lanes()
    a = _cluster(PostgresCluster(stores[0]), lanes_a, "a")
    b = _cluster(PostgresCluster(stores[1]), lanes_b, "b")
    async with running(a), running(b):
        first = await pending(stores[0], "lobby", held_by="a")
        a.submit([first])
        await eventually(lambda: lanes_a.ids() == [first.id])
        assert a.held == {"lobby"}

        # b commits work for a phone a holds: b leaves it to a, which finds it when its
        # worker for the phone goes idle (the release sees the pending row and keeps it).
        second = await pending(stores[1], "lobby")
        b.submit([second])
        await stores[0].deliveries.finish(first.id, DeliveryState.DELIVERED)
        a.idle("lobby")
        await eventually(lambda: lanes_a.ids() == [first.id, second.id])
        assert lanes_b.submitted == []

        # Nothing left: the release lets the phone go; b's next work is pushed by whoever
        # claims the phone first (b's submit, or a scan that found it pending), once.
        await stores[0].deliveries.finish(second.id, DeliveryState.DELIVERED)
        a.idle("lobby")
        await eventually(lambda: "lobby" not in a.held)
        third = await pending(stores[1], "lobby")
        b.submit([third])
        await eventually(lambda: third.id in lanes_a.ids() + lanes_b.ids())
        assert (lanes_a.ids() + lanes_b.ids()).count(third.id) == 1
        # Polled: this stand-in never says a phone's worker is busy, so the holder lets the
        # phone go and takes it back at each heartbeat (its work is still pending), and it is
        # out of memory a moment before the database says so.
        await eventually(lambda: (a.held | b.held) == {"lobby"} and not (a.held & b.held))


async def test_cancels_reach_the_instance_that_has_the_delivery(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    lanes_a, lanes_b = Lanes(), Lanes()
    a = _cluster(PostgresCluster(stores[0]), lanes_a, "a")
    b = _cluster(PostgresCluster(stores[1]), lanes_b, "b")
    async with running(b):
        delivery = await pending(stores[0], "lobby")
        b.submit([delivery])
        await eventually(lambda: lanes_b.ids() == [delivery.id])
        async with running(a):
            a.cancel([delivery.id])
            await eventually(lambda: delivery.id in lanes_b.cancelled)
            # Also one b does not have yet: b may be loading it (taking its phone over) as
            # the ack commits, and must skip it when it arrives (the dispatcher bounds these).
            loading = await pending(stores[0], "office")
            a.cancel([loading.id])
            await eventually(lambda: loading.id in lanes_b.cancelled)


async def test_an_instance_that_cannot_renew_its_lease_stops_and_the_other_takes_over(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    lanes_a, lanes_b = Lanes(), Lanes()
    faulty = Faulty(stores[0])
    a = _cluster(faulty, lanes_a, "a")
    registry = CollectorRegistry()
    b = _cluster(PostgresCluster(stores[1]), lanes_b, "b", registry)
    async with running(a):
        assert a.leader
        delivery = await pending(stores[0], "lobby")
        a.submit([delivery])
        await eventually(lambda: lanes_a.ids() == [delivery.id])
        async with running(b):
            assert not b.leader
            faulty.down = True
            await eventually(lambda: lanes_a.forgotten == 1, timeout=10)
            assert a.held == frozenset() and not a.leader
            assert a.remaining() == 0  # so no push starts (the dispatcher's gate waits)
            await eventually(lambda: lanes_b.ids() == [delivery.id], timeout=10)
            await eventually(lambda: b.leader, timeout=10)
            assert registry.get_sample_value("phonepush_cluster_adopted_total") == 1
            assert registry.get_sample_value("phonepush_cluster_leader") == 1
            assert registry.get_sample_value("phonepush_cluster_phones") == 1

            # The database answers again: a rejoins with nothing, b keeps what it took.
            faulty.down = False
            await eventually(lambda: a.remaining() > 0, timeout=10)
            assert a.held == frozenset() and not a.leader
            assert b.held == {"lobby"}


# --- a daemon that loses its database -----------------------------------------------------------


@pytest.mark.slow
async def test_a_daemon_fenced_while_the_database_was_down_takes_its_work_again(
    daemon_runner: Any, make_fleet: Any, pg_url: str, pg_cluster: Any, caplog: Any
) -> None:
    from _pg_fixtures import wait_until_accepting

    caplog.set_level(logging.INFO)
    fleet = await make_fleet(phones=1, names=["lobby"], tone_ms=10)
    lobby = fleet.phone("lobby")
    running = await daemon_runner.start(
        {
            "spool": {"url": pg_url},
            "cluster": {"lease": "2s"},
            "phones": [{"name": "lobby", "host": lobby.address}],
            "rules": [
                {
                    "name": "alert",
                    "on": "webhook:alert",
                    "to": ["all"],
                    "message": {"title": "Alert", "text": "{{ payload.text }}"},
                }
            ],
        }
    )
    cluster = running.cluster
    assert cluster is not None and cluster.leader
    import httpx

    async with httpx.AsyncClient(base_url=daemon_runner.url, timeout=30) as client:
        one = await client.post("/hooks/alert", json={"text": "one"})
        assert one.status_code == 202

        async def delivered(event: str) -> bool:
            # Written, not only pushed: stopped while the phone fetched its page, the push
            # would fail (the page unreadable) and be pushed again, a push more than counted.
            answer = await client.get(f"/api/events/{event}")
            return [d["state"] for d in answer.json()["deliveries"]] == ["delivered"]

        await eventually(lambda: delivered(one.json()["event"]), timeout=10)
        assert lobby.state.pushes == 1

        await asyncio.to_thread(pg_cluster.stop, "fast")
        try:
            await eventually(lambda: cluster.remaining() == 0 and not cluster.leader, timeout=10)
            assert "stopped pushing" in caplog.text
        finally:
            await asyncio.to_thread(pg_cluster.start)
            await asyncio.to_thread(wait_until_accepting, pg_cluster)

        async def accepted() -> bool:
            answer = await client.post("/hooks/alert", json={"text": "two"})
            return answer.status_code == 202

        await eventually(accepted, timeout=30)
        await eventually(lambda: lobby.state.pushes == 2, timeout=30)
        assert cluster.leader


async def test_work_arriving_while_a_phone_is_released_keeps_memory_and_database_agreeing(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    # What an instance believes it holds must be what the database says it holds: a phone held
    # in memory but released in the database can be claimed by a second instance, and both
    # push to it. (A long lease: no periodic scan repairs anything while this looks.)
    lanes = Lanes()
    slow = SlowRelease(stores[0])
    a = Cluster(slow, lanes, lease=30.0, registry=CollectorRegistry(), instance="a")
    async with running(a):
        first = await pending(stores[0], "lobby")
        a.submit([first])
        await eventually(lambda: a.held == {"lobby"})
        await stores[0].deliveries.finish(first.id, DeliveryState.DELIVERED)
        a.idle("lobby")
        await slow.entered.wait()
        # New work for the phone while its release waits; pushed at once, it is delivered
        # (and written) before the release looks for pending work.
        second = await pending(stores[0], "lobby")
        a.submit([second])
        for _ in range(50):
            await asyncio.sleep(0.01)
        if second.id in lanes.ids():
            await stores[0].deliveries.finish(second.id, DeliveryState.DELIVERED)
        slow.go.set()
        await eventually(lambda: second.id in lanes.ids())
        await eventually(lambda: len(slow.released) == 1)

        async def agree() -> bool:
            # Polled: a later release (a heartbeat lets go of a phone with nothing to push)
            # drops the phone from memory a moment before the database does; the bug this
            # guards against is a disagreement that stays.
            holder = await owner(stores[0], "lobby")
            return ("lobby" in a.held) == (holder == "a")

        await eventually(agree, timeout=5)


class SlowReleaseFaulty(SlowRelease, Faulty):
    """A release that waits for ``go`` and heartbeats that fail while ``down``."""


async def test_a_phone_waiting_for_its_release_when_the_lease_ran_out_takes_work_after_rejoin(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    # One phone's release is in flight, the next phone that goes idle waits behind it; then
    # the lease runs out. After the rejoin, that second phone's new work must be pushed: it
    # was once kept waiting for ever for a release the fence had thrown away.
    lanes = Lanes()
    store = SlowReleaseFaulty(stores[0])
    a = _cluster(store, lanes, "a")
    async with running(a):
        first = [await pending(stores[0], phone) for phone in ("lobby", "office")]
        a.submit(first)
        await eventually(lambda: a.held == {"lobby", "office"})
        for delivery in first:
            await stores[0].deliveries.finish(delivery.id, DeliveryState.DELIVERED)
        a.idle("lobby")
        await store.entered.wait()
        a.idle("office")

        store.down = True
        await eventually(lambda: lanes.forgotten == 1, timeout=10)
        store.go.set()
        store.down = False
        await eventually(lambda: a.remaining() > 0, timeout=10)

        later = await pending(stores[0], "office")
        a.submit([later])
        await eventually(lambda: later.id in lanes.ids(), timeout=10)
        assert "office" in a.held
        assert await owner(stores[0], "office") == "a"


async def test_the_leaders_word_on_a_full_store_reaches_every_instance(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    # Only the leader measures the shared store against max_size; the others refuse events
    # (spool full) on its word, and take them again when it says so.
    heard: list[bool] = []
    a = _cluster(PostgresCluster(stores[0]), Lanes(), "a")
    b = _cluster(PostgresCluster(stores[1]), Lanes(), "b")
    b.on_full = heard.append
    async with running(a), running(b):

        async def told(full: bool) -> bool:
            # Said again until heard: b may not be listening yet when the first one goes out.
            a.announce(f"full:{int(full)}")
            await asyncio.sleep(0.05)
            return bool(heard) and heard[-1] is full

        await eventually(lambda: told(True))
        await eventually(lambda: told(False))
        assert set(heard) == {True, False}


async def test_a_phone_taken_over_with_nothing_left_to_push_is_let_go_for_the_others_work(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    # An instance died holding a phone whose work was already done. The survivor that takes
    # the phone over finds nothing to push, so no worker of its ever goes idle for it: unless
    # it lets the phone go, work the other instances commit for the phone waits for ever
    # (they leave it to the live holder, which never looks).
    await claimed(stores[0], "lobby", by="gone")
    lanes_a, lanes_b = Lanes(), Lanes()
    registry = CollectorRegistry()
    a = _cluster(PostgresCluster(stores[0]), lanes_a, "a", registry)
    b = _cluster(PostgresCluster(stores[1]), lanes_b, "b")
    async with running(a), running(b):
        assert registry.get_sample_value("phonepush_cluster_adopted_total") == 1
        assert lanes_a.submitted == []
        work = await pending(stores[1], "lobby")
        b.submit([work])
        await eventually(lambda: work.id in lanes_a.ids() + lanes_b.ids(), timeout=10)
        assert (lanes_a.ids() + lanes_b.ids()).count(work.id) == 1


class LateClaim(Faulty):
    """Claims that wait for ``go``; heartbeats that fail while ``down``; a rejoin after which
    the waiting claim reaches the database (a statement held up while the pool reconnected)."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__(store)
        self.claiming = asyncio.Event()
        self.go = asyncio.Event()
        self.claimed = asyncio.Event()

    async def claim(self, instance: str, phones: Sequence[str]) -> list[tuple[str, str]]:
        self.claiming.set()
        await self.go.wait()
        try:
            return await super().claim(instance, phones)
        finally:
            self.claimed.set()

    async def heartbeat(self, *args: Any, rejoin: bool, **kwargs: Any) -> tuple[int, str]:
        result = await super().heartbeat(*args, rejoin=rejoin, **kwargs)
        if rejoin:
            self.go.set()
            await self.claimed.wait()
        return result


async def test_a_claim_that_reaches_the_database_after_the_rejoin_is_acted_on(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    # A claim sent before the fence runs after the rejoin dropped this instance's claims: the
    # database says the phone is this (live) instance's, which no other instance adopts. Its
    # answer came after the fence, so the instance must not push on it, but it must not forget
    # it either: the phone's work would stay pending for ever.
    lanes = Lanes()
    store = LateClaim(stores[0])
    a = _cluster(store, lanes, "a")
    async with running(a):
        work = await pending(stores[0], "lobby")
        a.submit([work])
        await store.claiming.wait()
        store.down = True
        await eventually(lambda: lanes.forgotten == 1, timeout=10)
        # (A scan before the fence may have taken the phone: only what comes after counts.)
        lanes.submitted.clear()
        store.down = False
        await eventually(lambda: store.claimed.is_set(), timeout=10)
        await eventually(lambda: work.id in lanes.ids(), timeout=10)
        assert a.held == {"lobby"}
        assert await owner(stores[0], "lobby") == "a"


class HangingRelease(PostgresCluster):
    """The real statements, but the first release never answers (its connection was lost
    mid-statement, and nothing tells the client)."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__(store)
        self.entered = asyncio.Event()
        self.calls = 0

    async def release(self, instance: str, phones: Sequence[str]) -> dict[str, str]:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            await asyncio.Event().wait()
        return await super().release(instance, phones)


async def test_a_release_that_never_answers_does_not_hold_the_phone_back_for_ever(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    # Releases run one after another: one stuck on a lost connection held back every later
    # release, and the phones waiting for them kept their new work pending for ever.
    lanes = Lanes()
    store = HangingRelease(stores[0])
    a = _cluster(store, lanes, "a")
    async with running(a):
        first = await pending(stores[0], "lobby")
        a.submit([first])
        await eventually(lambda: a.held == {"lobby"})
        await stores[0].deliveries.finish(first.id, DeliveryState.DELIVERED)
        a.idle("lobby")
        await store.entered.wait()
        second = await pending(stores[0], "lobby")
        a.submit([second])
        await eventually(lambda: second.id in lanes.ids(), timeout=10)
        assert a.held == {"lobby"}
        assert await owner(stores[0], "lobby") == "a"


class LostAnswer(PostgresCluster):
    """The real statements, but the answer of the first claim or adoption scan that takes a
    phone is lost after its commit (the connection dropped just then)."""

    lost = False

    async def claim(self, instance: str, phones: Sequence[str]) -> list[tuple[str, str]]:
        return self._lose(await super().claim(instance, phones))

    async def adopt(self, instance: str) -> list[tuple[str, str]]:
        return self._lose(await super().adopt(instance))

    def _lose(self, taken: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if taken and not self.lost:
            self.lost = True
            raise SpoolError("server closed the connection unexpectedly (test)")
        return taken


async def test_a_phone_claimed_by_a_statement_whose_answer_was_lost_is_pushed(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    # The claim committed, its answer never came: the phone is this live instance's in the
    # database, where no other instance takes it and no scan looks again. It must not be left
    # there with its work pending for ever.
    lanes = Lanes()
    store = LostAnswer(stores[0])
    a = _cluster(store, lanes, "a")
    async with running(a):
        work = await pending(stores[0], "lobby")
        a.submit([work])
        await eventually(lambda: store.lost, timeout=10)
        await eventually(lambda: work.id in lanes.ids(), timeout=10)
        assert a.held == {"lobby"}
        assert await owner(stores[0], "lobby") == "a"


async def test_phones_adopted_by_a_scan_whose_answer_was_lost_are_pushed(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    # The scan took a dead instance's phone and lost its answer (or timed out after the first
    # of its statements committed): the phone is this instance's in the database, unknown
    # here. No scan takes a phone from a live owner, so only this instance can find it.
    await claimed(stores[0], "lobby", by="gone")
    work = await pending(stores[0], "lobby")
    lanes = Lanes()
    store = LostAnswer(stores[0])
    a = _cluster(store, lanes, "a")
    async with running(a):
        assert store.lost
        await eventually(lambda: work.id in lanes.ids(), timeout=10)
        assert a.held == {"lobby"}
        assert await owner(stores[0], "lobby") == "a"


async def test_a_timer_loop_stopped_by_a_stop_while_it_winds_down_after_leading_ends() -> None:
    # Leadership ends (leave) and the timer loop is cut; the daemon's stop then cancels the
    # leadership task while the cut loop is still winding down (a statement being cancelled).
    # That stop was swallowed, the task went back to waiting for a leadership that never
    # came, and the daemon's shutdown waited for it for ever.
    leadership = Leadership(lambda leading: None)
    running = asyncio.Event()
    winding = asyncio.Event()
    wound = asyncio.Event()

    async def runner() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        finally:
            winding.set()
            await wound.wait()

    leadership.set(True)
    task = asyncio.create_task(leadership.lead(runner, "timer"))
    await running.wait()
    leadership.set(False)
    await winding.wait()
    task.cancel()
    wound.set()
    await eventually(task.done)
    assert task.cancelled()


class HangingLoad(PostgresCluster):
    """The real statements, but the first read of the phones' pending work never answers."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__(store)
        self.entered = asyncio.Event()
        self.calls = 0

    async def pending_of(self, *args: Any, **kwargs: Any) -> list[Delivery]:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            await asyncio.Event().wait()
        return await super().pending_of(*args, **kwargs)


async def test_a_load_of_taken_phones_that_never_answers_holds_no_later_scan_back(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    # Scans run one after another: one stuck reading the work of the phones it took (its
    # connection lost mid-statement) held every later scan back, and work only a scan finds
    # (committed by an instance that died before claiming it) stayed pending for ever.
    lanes = Lanes()
    store = HangingLoad(stores[0])
    a = _cluster(store, lanes, "a")
    async with running(a):
        await claimed(stores[0], "lobby", by="gone")
        first = await pending(stores[0], "lobby")
        await store.entered.wait()
        second = await pending(stores[0], "office")  # committed, never claimed
        await eventually(lambda: {first.id, second.id} <= set(lanes.ids()), timeout=10)
        assert a.held == {"lobby", "office"}


class StuckFlush(Lanes):
    """A dispatcher whose first write of finished deliveries never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.flushes = 0

    async def flush(self) -> None:
        self.flushes += 1
        if self.flushes == 1:
            self.entered.set()
            await asyncio.Event().wait()


async def test_a_write_of_finished_deliveries_that_never_answers_holds_no_release_back(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    lanes = StuckFlush()
    a = _cluster(PostgresCluster(stores[0]), lanes, "a")
    async with running(a):
        first = await pending(stores[0], "lobby")
        a.submit([first])
        await eventually(lambda: a.held == {"lobby"})
        await stores[0].deliveries.finish(first.id, DeliveryState.DELIVERED)
        a.idle("lobby")
        await lanes.entered.wait()
        second = await pending(stores[0], "lobby")
        a.submit([second])
        await eventually(lambda: second.id in lanes.ids(), timeout=10)
        assert a.held == {"lobby"}
        assert await owner(stores[0], "lobby") == "a"


class Counted(PostgresCluster):
    """The real statements, counting heartbeats."""

    beats = 0

    async def heartbeat(self, *args: Any, **kwargs: Any) -> tuple[int, str]:
        result = await super().heartbeat(*args, **kwargs)
        self.beats += 1
        return result


async def test_a_reload_of_the_silences_that_never_answers_does_not_stop_the_heartbeats(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    # The heartbeat loop reloads the silences every few beats: awaited there, a reload stuck
    # on a lost connection stopped the heartbeats, the instance fenced itself and never
    # rejoined while the reload hung.
    store = Counted(stores[0])
    a = _cluster(store, Lanes(), "a")
    reloads = 0

    async def reload() -> None:
        nonlocal reloads
        reloads += 1
        await asyncio.Event().wait()

    a.reload_silences = reload
    async with running(a):
        # One at (re)connecting to the channel, one from the heartbeats.
        await eventually(lambda: reloads >= 2, timeout=10)
        beats = store.beats
        await eventually(lambda: store.beats >= beats + 3, timeout=10)
        assert a.remaining() > 0
