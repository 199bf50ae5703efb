"""Audio pages in a cluster (phonepush.cluster.floor) on a real PostgreSQL: a page pushes to a
phone only while its instance holds the phone's claim, so its start and stop pushes never meet
another instance's delivery to that phone.

Two ``Cluster`` objects on two stores of one database, the dispatcher's side a stand-in that
records what it is handed; the page itself is the floor the announcer takes and gives back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from _cluster_fixtures import Faulty, SlowRelease, owner, pending, running
from _daemon_fixtures import DaemonRunner, eventually
from _sim_fixtures import MakeFleet, free_rtp_port, tone_wav
from phonepush.cluster import Cluster, Floor
from phonepush.cluster.floor import FENCED, HELD_ELSEWHERE
from phonepush.sim.simulator import Fleet
from phonepush.store.cluster import PostgresCluster
from phonepush.store.postgres import PostgresStore
from phonepush.store.records import Delivery, DeliveryState

LEASE = 1.5


class Lanes:
    """The dispatcher as the cluster and the floor see it: what it was handed, and whether its
    worker for a phone is running (the test says when it goes idle)."""

    def __init__(self) -> None:
        self.submitted: list[Delivery] = []
        self.running: set[str] = set()
        self.forgotten = 0

    def submit(self, deliveries: Iterable[Delivery]) -> None:
        for delivery in deliveries:
            if delivery.id not in self.ids():
                self.submitted.append(delivery)
                self.running.add(delivery.phone)

    def cancel(self, delivery_ids: Iterable[int]) -> None:
        return None

    def busy(self, phone: str) -> bool:
        return phone in self.running

    async def flush(self) -> None:
        return None

    async def forget(self) -> None:
        self.forgotten += 1
        self.running.clear()

    def ids(self) -> list[int]:
        return [d.id for d in self.submitted]


def _instance(store: PostgresCluster, lanes: Lanes, name: str) -> tuple[Cluster, Floor]:
    """A cluster and its floor, wired as the daemon wires them."""
    cluster = Cluster(store, lanes, lease=LEASE, registry=CollectorRegistry(), instance=name)
    floor = Floor(cluster, busy=lanes.busy, poll=0.05)
    cluster.keeps = floor.keeps
    return cluster, floor


def _went_idle(cluster: Cluster, lanes: Lanes, phone: str) -> None:
    """The dispatcher's worker for ``phone`` ran out of work."""
    lanes.running.discard(phone)
    cluster.idle(phone)


async def test_a_page_waits_for_the_phone_another_instance_pushes_to_then_holds_it_to_the_end(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    lanes_a, lanes_b = Lanes(), Lanes()
    a, floor_a = _instance(PostgresCluster(stores[0]), lanes_a, "a")
    b, _ = _instance(PostgresCluster(stores[1]), lanes_b, "b")
    async with running(a), running(b):
        # b is pushing a delivery to the lobby phone.
        first = await pending(stores[1], "lobby", held_by="b")
        b.submit([first])
        await eventually(lambda: lanes_b.ids() == [first.id])

        # a's page for the lobby and the hall: the hall is free, the lobby is b's.
        page = asyncio.create_task(floor_a.take(["lobby", "hall"], within=30))
        await eventually(lambda: "hall" in a.held)
        await asyncio.sleep(0.5)  # several polls: b still holds the lobby, the page waits
        assert not page.done()
        assert "lobby" not in a.held and b.held == {"lobby"}

        # b's delivery is done: its worker goes idle, it releases the phone, a's page gets it.
        await stores[1].deliveries.finish(first.id, DeliveryState.DELIVERED)
        _went_idle(b, lanes_b, "lobby")
        assert await asyncio.wait_for(page, 10) == {}
        assert a.held == {"lobby", "hall"} and b.held == frozenset()
        assert floor_a.holds("lobby")

        # While the page plays, b's new delivery for the lobby is left to a (b cannot claim the
        # phone), and a keeps the phone although nothing else is pushed to it here.
        second = await pending(stores[1], "lobby")
        b.submit([second])
        _went_idle(a, lanes_a, "lobby")
        await asyncio.sleep(0.5)  # b's claim, its notice and a's scan have run
        assert a.held == {"lobby", "hall"} and b.held == frozenset()
        assert lanes_a.submitted == [] and lanes_b.ids() == [first.id]

        # The page is over (stops pushed): the delivery is pushed, by a, once.
        floor_a.done(["lobby", "hall"])
        await eventually(lambda: lanes_a.ids() == [second.id])
        assert lanes_b.ids() == [first.id]
        # The hall had nothing pending: released. The lobby is a's until its worker is idle.
        await eventually(lambda: a.held == {"lobby"})
        assert not floor_a.holds("lobby")


async def test_a_phone_not_got_by_the_start_deadline_is_refused_and_the_others_still_play(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    lanes_a, lanes_b = Lanes(), Lanes()
    a, floor_a = _instance(PostgresCluster(stores[0]), lanes_a, "a")
    b, _ = _instance(PostgresCluster(stores[1]), lanes_b, "b")
    async with running(a), running(b):
        busy = await pending(stores[1], "lobby", held_by="b")
        b.submit([busy])
        await eventually(lambda: b.held == {"lobby"})

        refused = await floor_a.take(["lobby", "hall"], within=0.3)
        assert refused == {"lobby": HELD_ELSEWHERE}
        assert floor_a.holds("hall") and not floor_a.holds("lobby")
        assert b.held == {"lobby"}
        floor_a.done(["hall"])
        await eventually(lambda: a.held == frozenset())


async def test_a_fenced_instance_starts_no_page_and_a_fence_mid_page_ends_its_hold(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    lanes_a, lanes_b = Lanes(), Lanes()
    faulty = Faulty(stores[0])
    a, floor_a = _instance(faulty, lanes_a, "a")
    b, _ = _instance(PostgresCluster(stores[1]), lanes_b, "b")
    async with running(a), running(b):
        assert await floor_a.take(["lobby"], within=5) == {}
        await asyncio.wait_for(floor_a.ready("lobby"), 5)  # the lease is fresh: at once
        faulty.down = True
        await eventually(lambda: lanes_a.forgotten == 1, timeout=10)
        # The page no longer holds the phone, and a start waits for the lease to be renewed.
        assert not floor_a.holds("lobby")
        start = asyncio.create_task(floor_a.ready("lobby"))
        # Once a's lease has run out, b pushes to the phone; a pushes no page meanwhile.
        delivery = await pending(stores[1], "lobby")
        b.submit([delivery])
        await eventually(lambda: lanes_b.ids() == [delivery.id], timeout=10)
        assert not start.done()
        # Renewed, a rejoins without its claims: the start may go, but not to this phone.
        faulty.down = False
        await asyncio.wait_for(start, 10)
        assert not floor_a.holds("lobby")
        floor_a.done(["lobby"])
        assert a.held == frozenset() and b.held == {"lobby"}


async def test_a_page_does_not_start_while_its_instance_is_fenced(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    faulty = Faulty(stores[0])
    a, floor_a = _instance(faulty, Lanes(), "a")
    async with running(a):
        faulty.down = True
        await eventually(lambda: a.remaining() == 0, timeout=10)
        assert await floor_a.take(["lobby"], within=0.2) == {"lobby": FENCED}
        assert a.held == frozenset()


# --- two daemons, one phone ---------------------------------------------------------------------


def _daemon_config(
    fleet: Fleet,
    pg_url: str,
    port: int,
    wav: str,
    listen_port: int,
    *,
    note_to: str = "all",
    ttl: str = "5m",
    timeout: str = "10s",
) -> dict[str, Any]:
    return {
        "server": {"listen": f"127.0.0.1:{listen_port}"},
        "spool": {"url": pg_url},
        "cluster": {"lease": "2s"},
        "audio": {"port": port},
        "phones": [
            {"name": phone.name, "host": phone.address, "timeout": timeout}
            for phone in fleet.phones
        ],
        "rules": [
            {
                "name": "evacuate",
                "on": "webhook:alarm",
                "to": ["all"],
                "ttl": ttl,
                "audio": {"file": wav},
            },
            {
                "name": "note",
                "on": "webhook:note",
                "to": [note_to],
                "ttl": "5m",
                "message": {"title": "Note", "text": "{{ payload.n }}"},
            },
        ],
    }


@pytest.mark.slow
async def test_pages_and_deliveries_from_two_daemons_reach_a_phone_one_at_a_time(
    make_fleet: MakeFleet, pg_url: str, tmp_path: Path
) -> None:
    fleet = await make_fleet(phones=1, names=["lobby"], hosts=("127.0.0.2",), tone_ms=10)
    lobby = fleet.phone("lobby")
    # Every push takes a while: a page's start pushed while a delivery is on the wire from the
    # other daemon would be answered busy and counted in ``overlaps``.
    await lobby.set_fault("slow", delay_ms=150)
    wav = str(tone_wav(tmp_path / "chime.wav", 0.6))
    port = free_rtp_port(("127.0.0.2",))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = DaemonRunner(tmp_path / "a"), DaemonRunner(tmp_path / "b")
    try:
        await one.start(_daemon_config(fleet, pg_url, port, wav, one.port))
        await two.start(_daemon_config(fleet, pg_url, port, wav, two.port))
        events: list[str] = []
        async with (
            httpx.AsyncClient(base_url=one.url, timeout=30) as a,
            httpx.AsyncClient(base_url=two.url, timeout=30) as b,
        ):

            async def fire(client: httpx.AsyncClient, hook: str, n: int) -> None:
                answer = await client.post(f"/hooks/{hook}", json={"n": n})
                assert answer.status_code == 202, answer.text
                events.append(answer.json()["event"])

            # Deliveries through both daemons, a page from each in the middle of them.
            await asyncio.gather(*(fire(b, "note", n) for n in range(4)))
            await fire(a, "alarm", 0)
            await asyncio.gather(*(fire(c, "note", n) for n in range(4, 10) for c in (a, b)))
            await fire(b, "alarm", 1)
            await asyncio.gather(*(fire(a, "note", n) for n in range(10, 14)))

            async def finished() -> bool:
                for event in events:
                    answer = await a.get(f"/api/events/{event}")
                    states = [d["state"] for d in answer.json()["deliveries"]]
                    if "pending" in states:
                        return False
                return True

            await eventually(finished, timeout=60)
            states = []
            for event in events:
                answer = await a.get(f"/api/events/{event}")
                states += [(d["state"], d["error"]) for d in answer.json()["deliveries"]]
        assert states == [("delivered", "")] * len(events), states
        assert lobby.state.overlaps == 0
        heard = lobby.rtp_status()["history"]
        assert len(heard) == 2 and all(h["ended_by"] == "RTPRx:Stop" for h in heard), heard
    finally:
        for runner in (one, two):
            with contextlib.suppress(Exception):
                await runner.stop()


@pytest.mark.slow
async def test_a_phone_another_daemon_keeps_pushing_to_is_left_out_of_the_page_and_reported(
    make_fleet: MakeFleet, pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="phonepush.cluster")
    hosts = ("127.0.0.2", "127.0.0.3")
    fleet = await make_fleet(phones=2, names=["lobby", "hall"], hosts=hosts, tone_ms=10)
    lobby, hall = fleet.phone("lobby"), fleet.phone("hall")
    # The lobby answers busy: the other daemon's delivery to it is retried until its TTL (5
    # minutes), so that daemon holds the phone all along. The page waits for it no longer than
    # the phones' request timeout (what a start waits for a push in flight on one instance),
    # not until its own TTL (5 minutes too): the hall must not wait minutes for the lobby.
    await lobby.set_fault("error", number=6)
    wav = str(tone_wav(tmp_path / "chime.wav", 0.4))
    port = free_rtp_port(hosts)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = DaemonRunner(tmp_path / "a"), DaemonRunner(tmp_path / "b")
    settings = {"note_to": "lobby", "timeout": "1s"}
    try:
        paging = await one.start(_daemon_config(fleet, pg_url, port, wav, one.port, **settings))
        pushing = await two.start(_daemon_config(fleet, pg_url, port, wav, two.port, **settings))
        assert pushing.cluster is not None and paging.announcer is not None
        async with (
            httpx.AsyncClient(base_url=one.url, timeout=30) as a,
            httpx.AsyncClient(base_url=two.url, timeout=30) as b,
        ):
            note = await b.post("/hooks/note", json={"n": 1})
            assert note.status_code == 202
            await eventually(
                lambda: pushing.cluster is not None and pushing.cluster.held == {"lobby"}
            )
            alarm = await a.post("/hooks/alarm", json={})
            assert alarm.status_code == 202
            await eventually(lambda: lobby.state.pushes >= 2)  # the page is waiting meanwhile
            await asyncio.wait_for(paging.announcer.wait_idle(), 30)
            answer = await a.get(f"/api/events/{alarm.json()['event']}")
            rows = {d["phone"]: (d["state"], d["error"]) for d in answer.json()["deliveries"]}
            held = await b.get(f"/api/events/{note.json()['event']}")
            # Still being retried by the other daemon: the page did not wait for that.
            assert [d["state"] for d in held.json()["deliveries"]] == ["pending"]
        assert rows == {
            "lobby": ("failed", "would not listen: held by another instance"),
            "hall": ("delivered", ""),
        }
        assert [h["ended_by"] for h in hall.rtp_status()["history"]] == ["RTPRx:Stop"]
        # The page pushed nothing to the lobby: every push it got was the other daemon's note.
        assert lobby.rtp_status()["history"] == []
        assert lobby.state.overlaps == 0
        assert "not got (held by another instance): lobby" in caplog.text
        assert not any(
            item["url"].startswith("RTPRx") for r in lobby.state.requests for item in r["items"]
        )
    finally:
        for runner in (one, two):
            with contextlib.suppress(Exception):
                await runner.stop()


async def test_a_claim_a_page_gave_up_on_during_a_release_does_not_keep_the_phone_for_ever(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    lanes_a, lanes_b = Lanes(), Lanes()
    slow = SlowRelease(stores[0])
    a, floor_a = _instance(slow, lanes_a, "a")
    b, _ = _instance(PostgresCluster(stores[1]), lanes_b, "b")
    async with running(a), running(b):
        first = await pending(stores[0], "lobby", held_by="a")
        a.submit([first])
        await eventually(lambda: lanes_a.ids() == [first.id])
        await stores[0].deliveries.finish(first.id, DeliveryState.DELIVERED)
        _went_idle(a, lanes_a, "lobby")
        await slow.entered.wait()

        # A page with no time to wait asks for the phone while its release runs: it is claimed
        # again once the release is done, after the page went on without it.
        assert await floor_a.take(["lobby"], within=0) == {"lobby": HELD_ELSEWHERE}
        slow.go.set()
        await eventually(lambda: "lobby" in a.held)
        # Nothing to push: released at a heartbeat, and work through b is pushed by b.
        await eventually(lambda: "lobby" not in a.held, timeout=10)

        async def released() -> bool:
            return await owner(stores[0], "lobby") is None

        await eventually(released)
        second = await pending(stores[1], "lobby", held_by="b")
        b.submit([second])
        await eventually(lambda: second.id in lanes_b.ids(), timeout=10)
        assert lanes_a.ids() == [first.id]
