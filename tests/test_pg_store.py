"""``[spool] url``: the daemon on a real PostgreSQL (the throwaway cluster of _pg_fixtures), its
configuration, and what a database that goes away does to intake and readiness."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from _pg_fixtures import PgCluster, wait_until_accepting
from phonepush.app.daemon import open_store
from phonepush.commands import check as check_command
from phonepush.commands import status as status_command
from phonepush.config import parse_config
from phonepush.errors import ConfigError, SpoolError
from phonepush.sim.simulator import Fleet
from phonepush.store.postgres import PostgresStore

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def config(fleet: Fleet, url: str) -> dict[str, Any]:
    return {
        "spool": {"url": url},
        "webhook": {"token": TOKEN},
        "phones": [{"name": p.name, "host": p.address} for p in fleet.phones],
        "rules": [
            {
                "name": "alert",
                "on": "webhook:alert",
                "to": ["all"],
                "execute": ["Play:Alarm.raw"],
                "message": {"title": "Alert", "text": "{{ payload.text }}"},
                "ttl": "5m",
            }
        ],
    }


@pytest.fixture
async def phones(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=2, names=["lobby", "office"], tone_ms=20)
    return fleet


# -- configuration ------------------------------------------------------------------------------


def test_url_and_path_together_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"spool\.url: give url \(PostgreSQL\) or path"):
        parse_config(
            {"spool": {"url": "postgresql://pp@db/phonepush", "path": "/tmp/spool.db"}},
            environ={},
        )


def test_a_url_in_the_file_wins_over_the_units_spool_path_from_the_environment() -> None:
    # The systemd unit sets PHONEPUSH_SPOOL__PATH; a host moved to PostgreSQL must still start.
    config = parse_config(
        {"spool": {"url": "postgresql://pp@db/phonepush"}},
        environ={"PHONEPUSH_SPOOL__PATH": "/var/lib/phonepush/spool.db"},
    )
    assert config.spool.url == "postgresql://pp@db/phonepush"
    assert "path" not in config.spool.model_fields_set
    # Both in the environment is still a contradiction.
    with pytest.raises(ConfigError, match=r"spool\.url: give url"):
        parse_config(
            {},
            environ={
                "PHONEPUSH_SPOOL__PATH": "/var/lib/phonepush/spool.db",
                "PHONEPUSH_SPOOL__URL": "postgresql://pp@db/phonepush",
            },
        )


def test_a_password_in_the_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"spool": {"url": "postgresql://pp:hunter2@db/phonepush"}}, environ={})
    assert "spool.url: put the password in spool.password" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_check_names_the_store_and_never_its_password(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "db-password").write_text("hunter2\n")
    config_file = tmp_path / "phonepush.toml"
    config_file.write_text(
        '[spool]\nurl = "postgresql://pp@db:5433/phonepush"\npassword_file = "db-password"\n'
    )
    config = parse_config(
        {"spool": {"url": "postgresql://pp@db:5433/phonepush", "password_file": "db-password"}},
        environ={},
        base_dir=tmp_path,
    )
    assert config.spool.password is not None
    assert config.spool.password.get_secret_value() == "hunter2"
    assert check_command.main(["--config", str(config_file)]) == 0
    printed = capsys.readouterr().out
    assert "spool: PostgreSQL at postgresql://" in printed
    assert "db:5433/phonepush (with a password, pool of at most 10 connections" in printed
    assert "hunter2" not in printed


def test_without_psycopg_a_url_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "phonepush.store.postgres", raising=False)
    config = parse_config({"spool": {"url": "postgresql://pp@db/phonepush"}}, environ={})
    with pytest.raises(ConfigError, match=r"pip install 'phonepush\[postgres\]'"):
        open_store(config.spool)


async def test_a_database_that_is_not_there_fails_at_start_naming_the_url() -> None:
    config = parse_config(
        {"spool": {"url": "postgresql://pp@127.0.0.1:1/phonepush", "password": "hunter2"}},
        environ={},
    )
    with pytest.raises(SpoolError) as caught:
        async with open_store(config.spool):
            pass
    assert "postgresql://pp@127.0.0.1:1/phonepush: cannot connect" in str(caught.value)
    assert "hunter2" not in str(caught.value)


# -- the daemon on PostgreSQL -------------------------------------------------------------------


async def test_the_daemon_on_postgres_pushes_answers_and_keeps_pending_work_over_a_restart(
    daemon_runner: DaemonRunner, phones: Fleet, pg_url: str, tmp_path: Path, capsys: Any
) -> None:
    lobby, office = phones.phone("lobby"), phones.phone("office")
    await office.set_fault("refuse")
    await daemon_runner.start(config(phones, pg_url))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        answer = await client.post("/hooks/alert", json={"text": "disk full"})
        assert answer.status_code == 202, answer.text
        event_id = answer.json()["event"]
        await eventually(lambda: lobby.state.last_tone == "Alarm.raw")
        page = await client.get(lobby.state.screen.url.removeprefix(daemon_runner.url))
        assert page.status_code == 200 and "disk full" in page.text
        await eventually(
            lambda: _states(client, event_id, {"lobby": "delivered", "office": "pending"})
        )
    await daemon_runner.stop()
    assert not daemon_runner.spool.exists()  # nothing went to an SQLite file

    # `phonepush status` reads the same database.
    config_file = tmp_path / "phonepush.toml"
    config_file.write_text(f'[spool]\nurl = "{pg_url}"\n')
    assert status_command.main(["--config", str(config_file), "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["event"] == event_id
    assert {d["phone"]: d["state"] for d in shown["deliveries"]} == {
        "lobby": "delivered",
        "office": "pending",
    }

    # The office phone's delivery waited in the database and goes out after the restart, once.
    await office.set_fault("none")
    await daemon_runner.start(config(phones, pg_url))
    await eventually(lambda: office.state.last_tone == "Alarm.raw")
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        await eventually(
            lambda: _states(client, event_id, {"lobby": "delivered", "office": "delivered"})
        )
    assert lobby.state.pushes == 1


async def _states(client: httpx.AsyncClient, event_id: str, expected: dict[str, str]) -> bool:
    answer = await client.get(f"/api/events/{event_id}")
    assert answer.status_code == 200, answer.text
    return {d["phone"]: d["state"] for d in answer.json()["deliveries"]} == expected


@pytest.mark.slow
async def test_a_stopped_database_makes_the_daemon_unready_and_refuse_then_it_recovers(
    daemon_runner: DaemonRunner, phones: Fleet, pg_url: str, pg_cluster: PgCluster
) -> None:
    lobby = phones.phone("lobby")
    await daemon_runner.start(config(phones, pg_url))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH, timeout=60) as client:
        first = await client.post("/hooks/alert", json={"text": "before"})
        assert first.status_code == 202
        # Delivered and written: stopped while the phone fetched its page, the first push
        # would fail (the page unreadable) and be pushed again, a push more than counted here.
        both = {"lobby": "delivered", "office": "delivered"}
        await eventually(lambda: _states(client, first.json()["event"], both), timeout=10)
        assert lobby.state.pushes == 1

        await asyncio.to_thread(pg_cluster.stop, "fast")
        try:
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["spool"] != "ok"
            refused = await client.post("/hooks/alert", json={"text": "during"})
            assert refused.status_code == 503
            assert "Retry-After" in refused.headers
            # A phone fetching its page meanwhile is told to come back, not served a 500.
            assert "/pages/" in lobby.state.screen.url
            page = await client.get(lobby.state.screen.url)
            assert page.status_code == 503, page.text
            assert "Retry-After" in page.headers
        finally:
            await asyncio.to_thread(pg_cluster.start)
            await asyncio.to_thread(wait_until_accepting, pg_cluster)

        await eventually(lambda: _ready(client), timeout=30)
        again = await client.post("/hooks/alert", json={"text": "after"})
        assert again.status_code == 202, again.text
        await eventually(lambda: lobby.state.pushes == 2, timeout=15)
        # What was accepted before the outage is still there; the refused event never was.
        status = await client.get(f"/api/events/{first.json()['event']}")
        assert status.status_code == 200


async def _ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz")).status_code == 200


async def test_a_task_started_inside_a_transaction_writes_on_its_own(pg_url: str) -> None:
    from phonepush.events import Event
    from phonepush.store.postgres import PostgresStore

    async with PostgresStore(pg_url) as store:
        inside, beside = (Event("webhook", t, b"{}", {}) for t in ("inside", "beside"))
        with pytest.raises(RuntimeError):
            async with store.transaction("test"):
                await store.events.add(inside, ["alert"])
                # Started here, the task inherits the context, not the transaction.
                await asyncio.create_task(store.events.add(beside, ["alert"]))
                raise RuntimeError("rolled back")
        assert await store.events.get(inside.id) is None
        assert await store.events.get(beside.id) is not None


@pytest.mark.slow
async def test_an_mqtt_message_waits_unacknowledged_while_the_database_is_down(
    daemon_runner: DaemonRunner, phones: Fleet, pg_url: str, pg_cluster: PgCluster, mosquitto: Any
) -> None:
    lobby = phones.phone("lobby")
    data = config(phones, pg_url)
    data["mqtt"] = {"url": mosquitto.url, "reconnect_min": "100ms", "reconnect_max": "500ms"}
    data["rules"].append(
        {"name": "bell", "on": "mqtt:bell", "to": ["lobby"], "execute": ["Play:Chime.raw"]}
    )
    await daemon_runner.start(data)
    await asyncio.to_thread(pg_cluster.stop, "fast")
    try:
        await asyncio.to_thread(mosquitto.publish, "bell", "ring")
        # Not committed, so not acknowledged: the daemon keeps trying, and the phone gets nothing.
        await eventually(
            lambda: (
                daemon_runner.metric(
                    "phonepush_events_rejected_total", source="mqtt", reason="spool_error"
                )
                >= 1
            ),
            timeout=30,
        )
        assert lobby.state.pushes == 0
    finally:
        await asyncio.to_thread(pg_cluster.start)
        await asyncio.to_thread(wait_until_accepting, pg_cluster)
    await eventually(lambda: lobby.state.last_tone == "Chime.raw", timeout=30)
    assert lobby.state.pushes == 1


async def test_connections_find_a_vanished_database_host_quickly_unless_the_url_says_otherwise(
    pg_url: str,
) -> None:
    # Without keepalives a statement on a connection whose peer vanished hangs for the kernel's
    # defaults (hours idle, minutes of retransmissions), and a webhook waiting on it with it.
    def settings(conn: Any) -> dict[str, str]:
        return {
            o.keyword.decode(): (o.val or b"").decode()
            for o in conn.pgconn.info
            if o.keyword in (b"keepalives", b"keepalives_idle", b"tcp_user_timeout")
        }

    async with PostgresStore(pg_url) as store, await store.dedicated_connection() as conn:
        assert settings(conn) == {
            "keepalives": "1",
            "keepalives_idle": "5",
            "tcp_user_timeout": "15000",
        }
    own = pg_url + ("&" if "?" in pg_url else "?") + "keepalives_idle=60"
    async with PostgresStore(own) as store, await store.dedicated_connection() as conn:
        assert settings(conn)["keepalives_idle"] == "60"
