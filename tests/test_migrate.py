"""``phonepush migrate --from PATH --to URL``: an SQLite spool moved into a real PostgreSQL (the
throwaway cluster of _pg_fixtures), and a daemon on the database carrying on where the one on the
spool stopped."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually, phonepush
from phonepush.config import parse_config
from phonepush.events import Event
from phonepush.sim.simulator import Fleet
from phonepush.store.commit import commit_event
from phonepush.store.interface import Store
from phonepush.store.records import NewDelivery, PushRequest, StoredSilence
from phonepush.store.spool import Spool

TOKEN = "t0ken-for-migrate"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAGE = "<CiscoIPPhoneText><Text>kept</Text></CiscoIPPhoneText>"


async def stored(spool: Store, topic: str = "door", phone: str = "desk-1") -> int:
    """An event with one pending delivery, committed as intake commits one; its delivery id."""
    event = Event("webhook", topic, b'{"text": "open"}', {})
    (delivery,) = await commit_event(
        spool,
        event,
        rules=(topic,),
        deliveries=(
            NewDelivery(
                topic, phone, (PushRequest("execute", "Play:Chime.raw"),), time.time() + 60
            ),
        ),
        pages={f"page-{event.id}": PAGE},
        # A key of its own: a second event under a live cooldown would be stored suppressed.
        cooldowns=((topic, event.id, time.time() + 60),),
    )
    return delivery.id


async def pg_count(url: str, table: str) -> int:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {table}")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


# -- the command on spools made by the store's own API ------------------------------------------


async def test_every_row_moves_ids_continue_and_a_second_migrate_is_refused(
    tmp_path: Path, pg_url: str
) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path) as spool:
        first = await stored(spool)
        await stored(spool)
        last = await stored(spool, phone="desk-2")
        await spool.silences.add(
            StoredSilence("s-1", "[]", 0.0, time.time() + 3600, 0.0, "ops", "maintenance")
        )

    code, out, err = await phonepush("migrate", "--from", str(path), "--to", pg_url)
    assert code == 0, err
    lines = out.splitlines()
    counts = dict(line.split() for line in lines[:-1])
    assert counts["events"] == counts["deliveries"] == counts["pages"] == "3"
    assert counts["silences"] == "1"
    assert counts["cooldowns"] == "3"
    assert "meta" not in counts  # each store's own bookkeeping
    assert lines[-1] == f"migrated 3 events (3 pending deliveries) from {path} to {pg_url}"

    from phonepush.store.postgres import PostgresStore

    async with PostgresStore(pg_url) as store:
        assert [d.id for d in await store.deliveries.pending()] == [first, first + 1, last]
        assert await store.events.page(f"page-{(await store.events.recent(1))[0].id}") == PAGE
        assert [s.id for s in await store.silences.all()] == ["s-1"]
        # The identity sequence moved past the ids copied: the next delivery comes after them.
        assert await stored(store) > last

    # Moving a spool into a database that holds data would mix two stores: refused, untouched.
    other = tmp_path / "other.db"
    async with Spool(other) as spool:
        await stored(spool, topic="other")
    code, out, err = await phonepush("migrate", "--from", str(other), "--to", pg_url)
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("phonepush migrate: --to: ")
    assert "already holds data" in err
    assert await pg_count(pg_url, "events") == 4


async def test_a_spool_of_an_older_format_moves_and_is_left_as_it_was(
    tmp_path: Path, pg_url: str
) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path) as spool:
        await stored(spool)
    # What an earlier phonepush left (as in test_spool): no schema_version key, no
    # schedule_firings table.
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'schema_version'")
        conn.execute("DROP TABLE schedule_firings")
        conn.commit()
    before = path.read_bytes()
    files = sorted(tmp_path.iterdir())

    code, out, err = await phonepush("migrate", "--from", str(path), "--to", pg_url)
    assert code == 0, err
    assert "migrated 1 event (1 pending delivery)" in out
    assert "schedule_firings  0" in out
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == files
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "schedule_firings" not in tables


async def test_a_spool_table_the_database_lacks_stops_the_move_naming_it(
    tmp_path: Path, pg_url: str
) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path) as spool:
        await stored(spool)
    # As a later phonepush might add a table to the spool that this one has no place for.
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE escalation_chains (name TEXT PRIMARY KEY)")
        conn.commit()
    code, out, err = await phonepush("migrate", "--from", str(path), "--to", pg_url)
    assert (code, out) == (2, "")
    assert err == (
        f"phonepush migrate: --to: spool table escalation_chains has no counterpart in {pg_url}:"
        " this phonepush cannot migrate it\n"
    )
    assert await pg_count(pg_url, "events") == 0


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda path: None, "--from: no spool at "),
        (
            lambda path: path.write_bytes(b"these are not the bytes of an SQLite database\n" * 99),
            "--from: spool {path}: not a phonepush spool",
        ),
        (
            lambda path: (
                sqlite3.connect(path).execute("CREATE TABLE notes (text)").connection.commit()
            ),
            "--from: spool {path}: not a phonepush spool (no events table)",
        ),
    ],
    ids=["missing", "not-sqlite", "other-sqlite"],
)
async def test_a_bad_from_is_one_line_naming_the_flag(
    tmp_path: Path, pg_url: str, make: Any, says: str
) -> None:
    path = tmp_path / "spool.db"
    make(path)
    code, out, err = await phonepush("migrate", "--from", str(path), "--to", pg_url)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith(f"phonepush migrate: {says.format(path=path)}"), err
    assert await pg_count(pg_url, "pg_tables WHERE tablename = 'events'") == 0


async def test_a_password_in_to_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path) as spool:
        await stored(spool)
    code, out, err = await phonepush(
        "migrate", "--from", str(path), "--to", "postgresql://pp:hunter2@127.0.0.1:1/phonepush"
    )
    assert (code, out) == (2, "")
    assert err == (
        "phonepush migrate: --to: put the password in --password-file or $PGPASSWORD, not the URL\n"
    )


async def test_an_unreachable_database_is_one_line_naming_to(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path) as spool:
        await stored(spool)
    secret = tmp_path / "db-password"
    secret.write_text("hunter2\n")
    code, out, err = await phonepush(
        "migrate",
        "--from",
        str(path),
        "--to",
        "postgresql://pp@127.0.0.1:1/phonepush",
        "--password-file",
        str(secret),
    )
    assert (code, out) == (2, "")
    assert err.startswith("phonepush migrate: --to: spool postgresql://pp@127.0.0.1:1/phonepush:")
    assert err.count("\n") == 1 and "hunter2" not in err


# -- a daemon's spool, moved, and a daemon on the database resuming it --------------------------


def config(fleet: Fleet) -> dict[str, Any]:
    return {
        "webhook": {"token": TOKEN},
        "phones": [{"name": p.name, "host": p.address} for p in fleet.phones],
        "rules": [
            {
                "name": "disk",
                "on": "webhook:alert",
                "to": ["lobby"],
                "execute": ["Play:Alarm.raw"],
                "message": {"title": "DiskFull", "text": "{{ payload.text }}"},
                "ack": True,
            },
            {"name": "door", "on": "webhook:door", "to": ["office"], "execute": ["Play:Chime.raw"]},
            {
                "name": "batch",
                "on": "webhook:batch",
                "to": ["lobby"],
                "execute": ["Play:Pop.raw"],
                "group_by": [],
                "group_wait": "1h",
            },
        ],
    }


@pytest.fixture
async def phones(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=2, names=["lobby", "office"], tone_ms=20)
    return fleet


async def events_of(client: httpx.AsyncClient, event_id: str) -> dict[str, Any]:
    answer = await client.get(f"/api/events/{event_id}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_a_daemon_on_the_migrated_database_resumes_serves_pages_and_takes_acks(
    daemon_runner: DaemonRunner, phones: Fleet, pg_url: str
) -> None:
    lobby, office = phones.phone("lobby"), phones.phone("office")
    await office.set_fault("refuse")
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        alert = (await client.post("/hooks/alert", json={"text": "/srv is 97% full"})).json()
        await eventually(lambda: any(k.name == "Ack" for k in lobby.state.screen.softkeys))
        page_url = lobby.state.screen.url
        door = (await client.post("/hooks/door", json={})).json()
        batch = (await client.post("/hooks/batch", json={"text": "one"})).json()
        made = await client.post(
            "/api/silences",
            json={
                "matchers": [{"name": "rule", "value": "nothing-fires-this", "isRegex": False}],
                "duration": "2h",
                "comment": "kept across the move",
                "createdBy": "ops",
            },
        )
        assert made.status_code == 201, made.text
        await eventually(
            lambda: _has(
                client, door["event"], lambda d: d["attempts"] >= 1 and d["state"] == "pending"
            )
        )
        old_ids = [
            d["id"]
            for event in (alert, door, batch)
            for d in (await events_of(client, event["event"]))["deliveries"]
        ]

        # While the daemon has the spool open, moving it is refused.
        code, out, err = await phonepush(
            "migrate", "--from", str(daemon_runner.spool), "--to", pg_url
        )
        assert (code, out) == (2, "")
        assert err == (
            f"phonepush migrate: --from: {daemon_runner.spool} is open in a running daemon"
            f" (process {os.getpid()}): stop it first\n"
        )
    await daemon_runner.stop()

    code, out, err = await phonepush("migrate", "--from", str(daemon_runner.spool), "--to", pg_url)
    assert code == 0, err
    assert out.splitlines()[-1] == (
        f"migrated 3 events (1 pending delivery) from {daemon_runner.spool} to {pg_url}"
    )

    await office.set_fault("none")
    data = config(phones)
    data["spool"] = {"url": pg_url}
    await daemon_runner.start(data)
    # The delivery that was pending on the spool goes out from the database, once.
    await eventually(lambda: office.state.last_tone == "Chime.raw", timeout=10)
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        await eventually(lambda: _has(client, door["event"], lambda d: d["state"] == "delivered"))
        # The page the phone was sent before the move is served from the database...
        page = await client.get(page_url.removeprefix(daemon_runner.url))
        assert page.status_code == 200 and "/srv is 97% full" in page.text
        # ... and the Ack on it, pressed now, is taken.
        await lobby.press(name="Ack")
        assert lobby.state.screen.title == "Acknowledged"
        (state,) = (await events_of(client, alert["event"]))["alerts"]
        assert state["state"] == "acknowledged" and state["ended_by"] == "lobby"
        silences = (await client.get("/api/silences")).json()
        assert [s["comment"] for s in silences] == ["kept across the move"]
        # The grouped event still waits in its window (an hour): nothing of it was pushed.
        assert (await events_of(client, batch["event"]))["deliveries"] == []

        # New work gets ids after the old ones.
        again = (await client.post("/hooks/door", json={})).json()
        await eventually(lambda: _has(client, again["event"], lambda d: d["state"] == "delivered"))
        (new,) = (await events_of(client, again["event"]))["deliveries"]
        assert new["id"] > max(old_ids)
    assert office.state.pushes == 2


async def _has(client: httpx.AsyncClient, event_id: str, check: Any) -> bool:
    deliveries = (await events_of(client, event_id))["deliveries"]
    return bool(deliveries) and all(check(d) for d in deliveries)


def test_the_cluster_guides_configuration_is_one_the_daemon_takes(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "docs" / "cluster.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    data = tomllib.loads(block)
    for name in ("db-password", "webhook-token"):
        (tmp_path / name).write_text("s3cret\n")
    config = parse_config(data, environ={}, base_dir=tmp_path)
    assert config.spool.url.startswith("postgresql://") and config.mqtt is not None
    assert config.server.public_url == "http://phonepush.example.net"
    assert config.cluster.lease == 10.0
