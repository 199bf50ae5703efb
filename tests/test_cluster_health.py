"""Phone health shared by the instances of one PostgreSQL store: what the leader's probes find and
what any instance's pushes find shows on every instance's ``/api/phones`` and phone metrics, and
the leader's measure of the store's size reaches the others. Two daemons on one database, the
simulated phones, the real table (phonepush.health.shared, store/health.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from _daemon_fixtures import DaemonRunner, eventually
from _sim_fixtures import MakeFleet
from phonepush.config import parse_config
from phonepush.errors import SpoolError
from phonepush.health.monitor import Health
from phonepush.health.shared import SharedHealth
from phonepush.metrics import Metrics
from phonepush.phone.lanes import PhoneLanes
from phonepush.sim.simulator import Fleet
from phonepush.store.health import PhoneRecord, PostgresHealth
from phonepush.store.postgres import PostgresStore

TOKEN = "shared-health-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _config(fleet: Fleet, url: str, interval: str) -> dict[str, Any]:
    lobby, office = fleet.phones
    return {
        "spool": {"url": url},
        "cluster": {"lease": "2s"},
        "webhook": {"token": TOKEN},
        "health": {"interval": interval},
        "phones": [
            {"name": "lobby", "host": lobby.address, "timeout": "1s"},
            {"name": "office", "host": office.address, "timeout": "1s"},
        ],
        "rules": [
            {"name": "lobby", "on": "webhook:lobby", "to": ["lobby"], "execute": ["Key:Headset"]},
            {
                "name": "office",
                "on": "webhook:office",
                "to": ["office"],
                "execute": ["Key:Headset"],
                "ttl": "30s",
            },
        ],
    }


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[tuple[DaemonRunner, DaemonRunner]]:
    a, b = DaemonRunner(tmp_path / "a"), DaemonRunner(tmp_path / "b")
    try:
        yield a, b
    finally:
        for runner in (b, a):
            try:
                await runner.stop()
            except Exception as exc:  # noqa: BLE001 (the other one is stopped all the same)
                print(f"stopping a daemon: {exc!r}")


async def _start(
    two: tuple[DaemonRunner, DaemonRunner], fleet: Fleet, url: str, interval: str
) -> None:
    """A first (it leads the timers, the probes among them), then B."""
    a, b = two
    running = await a.start(_config(fleet, url, interval))
    assert running.cluster is not None and running.cluster.leader
    other = await b.start(_config(fleet, url, interval))
    assert other.cluster is not None and not other.cluster.leader


def _requests(runner: DaemonRunner, phone: str) -> float:
    """Pushes ``runner``'s instance sent to ``phone``, whatever their outcome."""
    return sum(
        sample.value
        for family in runner.registry.collect()
        if family.name == "phonepush_phone_requests"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("phone") == phone
    )


async def _phones(runner: DaemonRunner) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=runner.url, headers=AUTH) as client:
        answer = await client.get("/api/phones")
    assert answer.status_code == 200, answer.text
    return {phone["name"]: phone for phone in answer.json()}


async def test_what_the_leaders_probes_find_shows_on_the_other_instance(
    two: tuple[DaemonRunner, DaemonRunner], make_fleet: MakeFleet, pg_url: str
) -> None:
    fleet = await make_fleet(phones=2, names=["lobby", "office"], tone_ms=10)
    await _start(two, fleet, pg_url, "1s")
    a, b = two

    async def b_knows_both() -> bool:
        phones = await _phones(b)
        return all(p["reachable"] is True and p["model"] for p in phones.values())

    # B probes nothing (it does not lead) and pushed nothing: all it knows is A's.
    await eventually(b_knows_both, timeout=20)
    office = (await _phones(b))["office"]
    assert (office["model"], office["firmware"]) == ("CP-8841", "14.2(1)")
    assert office["mac"] and office["since"] is not None
    info = {"model": "CP-8841", "firmware": "14.2(1)"}
    for name in ("lobby", "office"):
        assert b.metric("phonepush_phone_up", phone=name) == 1
        assert b.metric("phonepush_phone_info", phone=name, **info) == 1

    await fleet.phone("office").set_fault("refuse")

    async def b_sees_office_down() -> bool:
        return (await _phones(b))["office"]["reachable"] is False

    await eventually(b_sees_office_down, timeout=20)
    assert b.metric("phonepush_phone_up", phone="office") == 0
    down = (await _phones(b))["office"]
    assert down["error"] and down["model"] == "CP-8841"
    assert (await _phones(b))["lobby"]["reachable"] is True
    # What A logged as the change is what B shows.
    assert (await _phones(a))["office"]["reachable"] is False

    await fleet.phone("office").set_fault("none")

    async def b_sees_office_back() -> bool:
        return (await _phones(b))["office"]["reachable"] is True

    await eventually(b_sees_office_back, timeout=20)
    assert b.metric("phonepush_phone_up", phone="office") == 1

    # phonepush_spool_bytes: the leader's measure, on B too.
    async def same_size() -> bool:
        size = b.metric("phonepush_spool_bytes")
        return size > 0 and size == a.metric("phonepush_spool_bytes")

    await eventually(same_size, timeout=20)


async def test_a_push_outcome_one_instance_sees_reaches_the_other(
    two: tuple[DaemonRunner, DaemonRunner], make_fleet: MakeFleet, pg_url: str
) -> None:
    fleet = await make_fleet(phones=2, names=["lobby", "office"], tone_ms=10)
    # No probes: pushes alone tell what a phone is.
    await _start(two, fleet, pg_url, "0")
    a, b = two
    assert [p["reachable"] for p in (await _phones(a)).values()] == [None, None]

    def pusher(phone: str) -> tuple[DaemonRunner, DaemonRunner]:
        """(the instance that pushed to ``phone``, the other one). The instance that commits
        the work claims the phone, B here, unless A's scan took it first."""
        return (b, a) if _requests(b, phone) else (a, b)

    # Posted to B, which claims the phone (nobody holds it) and pushes: A, the leader, hears.
    async with httpx.AsyncClient(base_url=b.url, headers=AUTH) as client:
        assert (await client.post("/hooks/lobby", json={})).status_code == 202
    await eventually(lambda: fleet.phone("lobby").state.pushes == 1, timeout=10)
    # Counted by the instance once the phone's answer is in, a moment after the phone has it.
    await eventually(lambda: _requests(a, "lobby") + _requests(b, "lobby") > 0, timeout=10)
    pushed, other = pusher("lobby")

    async def other_knows_the_push() -> bool:
        lobby = (await _phones(other))["lobby"]
        mine = (await _phones(pushed))["lobby"]["last_push"]
        return lobby["reachable"] is True and mine is not None and lobby["last_push"] == mine

    await eventually(other_knows_the_push, timeout=20)
    lobby = (await _phones(other))["lobby"]
    assert lobby["last_push"]["result"] == "delivered"
    assert other.metric("phonepush_phone_up", phone="lobby") == 1

    # A phone that refuses the push: unreachable on the instance that pushed, and on the other.
    await fleet.phone("office").set_fault("refuse")
    async with httpx.AsyncClient(base_url=b.url, headers=AUTH) as client:
        assert (await client.post("/hooks/office", json={})).status_code == 202

    await eventually(lambda: _requests(a, "office") + _requests(b, "office") > 0, timeout=20)
    pushed, other = pusher("office")

    async def other_sees_office_down() -> bool:
        return (await _phones(other))["office"]["reachable"] is False

    await eventually(other_sees_office_down, timeout=20)
    assert other.metric("phonepush_phone_up", phone="office") == 0
    assert (await _phones(other))["office"]["error"]
    print(f"pushed by {'B' if pushed is b else 'A (the leader)'}")


# --- the table ------------------------------------------------------------------------------------


def _record(**fields: Any) -> PhoneRecord:
    base: dict[str, Any] = {
        "phone": "lobby",
        "host": "10.0.0.5",
        "reachable": None,
        "since": None,
        "checked_at": None,
        "error": "",
    }
    return PhoneRecord(**{**base, **fields})


async def test_each_part_of_a_phones_row_keeps_the_newer_of_what_instances_write(
    pg_url: str,
) -> None:
    async with PostgresStore(pg_url) as one, PostgresStore(pg_url) as two:
        a, b = PostgresHealth(one), PostgresHealth(two)
        await a.write([_record(reachable=False, since=10.0, checked_at=10.0, error="refused")])
        # Older news of the same phone, from another instance: nothing is undone.
        await b.write([_record(reachable=True, since=5.0, checked_at=5.0)])
        seen = await a.read(float("-inf"))
        (row,) = seen.records
        assert (row.reachable, row.since, row.checked_at, row.error) == (
            False,
            10.0,
            10.0,
            "refused",
        )

        # Newer device information and a newer push, each kept on its own.
        info = {"model": "CP-8841", "firmware": "14.2(1)", "mac": "AA", "host_name": "SEPAA"}
        await b.write([_record(reachable=True, since=5.0, checked_at=5.0, info_at=7.0, **info)])
        await a.write(
            [
                _record(
                    reachable=False,
                    since=12.0,
                    checked_at=12.0,
                    error="refused",
                    model="CP-7841",
                    info_at=6.0,
                    push_result="failed",
                    push_at=11.0,
                )
            ]
        )
        (row,) = (await b.read(float("-inf"))).records
        assert (row.model, row.firmware, row.info_at) == ("CP-8841", "14.2(1)", 7.0)
        assert (row.push_result, row.push_at) == ("failed", 11.0)
        # Still unreachable by the newer check: unreachable since the earlier time seen.
        assert (row.reachable, row.since, row.checked_at) == (False, 10.0, 12.0)

        # Only what was written since a read comes with the next one.
        assert (await a.read(seen.now + 60)).records == []
        later = await a.read(seen.now - 1)
        assert [r.phone for r in later.records] == ["lobby"]

        # The phone moved to another address: the row is the new one's.
        await b.write([_record(host="10.0.0.9", reachable=True, since=1.0, checked_at=1.0)])
        (row,) = (await a.read(float("-inf"))).records
        assert (row.host, row.reachable, row.checked_at, row.model, row.push_at) == (
            "10.0.0.9",
            True,
            1.0,
            "",
            None,
        )


class _Faulty(PostgresHealth):
    """The real statements, failing while ``down`` (the database out of reach)."""

    down = False

    async def write(self, records: Any) -> None:
        if self.down:
            raise SpoolError("database out of reach (test)")
        await super().write(records)


async def test_a_write_that_fails_is_logged_once_and_made_when_the_database_answers(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_config(
        {"phones": [{"name": "lobby", "host": "10.0.0.5"}], "spool": {"url": pg_url}},
        environ={},
    )
    health = Health(
        config, PhoneLanes(config.phone_targets()), metrics=Metrics(CollectorRegistry())
    )
    async with PostgresStore(pg_url) as store:
        faulty = _Faulty(store)
        shared = SharedHealth(faulty, health, leading=lambda: False)
        health.on_share = shared.changed
        faulty.down = True
        caplog.set_level(logging.INFO, logger="phonepush.health")
        health.reached("lobby", False, "connection refused")
        await shared.flush()
        health.reached("lobby", True, "")
        await shared.flush()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [r.getMessage() for r in warnings if "not shared" in r.getMessage()] == [
            "health: phone health not shared with the other instances: database out of reach (test)"
        ]
        faulty.down = False
        await shared.flush()
        assert "shared with the other instances again" in caplog.text
        (row,) = (await faulty.read(float("-inf"))).records
        assert (row.phone, row.reachable) == ("lobby", True)


def test_a_merged_change_is_told_as_a_local_one_and_never_shared_back() -> None:
    config = parse_config({"phones": [{"name": "lobby", "host": "10.0.0.5"}]}, environ={})
    registry = CollectorRegistry()
    health = Health(config, PhoneLanes(config.phone_targets()), metrics=Metrics(registry))
    changed: list[tuple[bool | None, str]] = []
    shared: list[str] = []
    health.on_change = lambda state: changed.append(
        (state.reachable, state.info.firmware if state.info else "")
    )
    health.on_share = lambda state: shared.append(state.name)
    info = {"model": "CP-8841", "firmware": "14.2(1)", "mac": "AA", "host_name": "SEPAA"}

    def up() -> float | None:
        return registry.get_sample_value("phonepush_phone_up", {"phone": "lobby"})

    health.merge([_record(reachable=True, since=1.0, checked_at=1.0, info_at=1.0, **info)])
    assert changed == [(True, "14.2(1)")] and up() == 1
    model = {"phone": "lobby", "model": "CP-8841", "firmware": "14.2(1)"}
    assert registry.get_sample_value("phonepush_phone_info", model) == 1
    # Checked again, still there: nothing to tell. Older news, and another address: ignored.
    health.merge([_record(reachable=True, since=1.0, checked_at=2.0)])
    health.merge([_record(reachable=False, since=0.5, checked_at=0.5, error="refused")])
    health.merge([_record(host="10.0.0.9", reachable=False, since=3.0, checked_at=3.0)])
    assert len(changed) == 1 and up() == 1
    health.merge([_record(reachable=False, since=4.0, checked_at=4.0, error="refused")])
    assert changed[-1] == (False, "14.2(1)") and up() == 0
    (lobby,) = health.phones()
    assert (lobby["reachable"], lobby["since"], lobby["error"]) == (False, 4.0, "refused")
    assert shared == []


async def test_a_database_of_the_previous_version_gets_the_health_table_at_open(
    pg_url: str,
) -> None:
    import psycopg

    from phonepush.store import postgres

    async with PostgresStore(pg_url):
        pass
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE phone_health")
        conn.execute("UPDATE schema_version SET version = 2")
    async with PostgresStore(pg_url) as store:
        health = PostgresHealth(store)
        await health.write([_record(reachable=True, since=1.0, checked_at=1.0)])
        assert [r.phone for r in (await health.read(float("-inf"))).records] == ["lobby"]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (postgres.SCHEMA_VERSION,)
        ]
