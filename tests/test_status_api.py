"""The status API (``GET /api/events/<id>``) and ``phonepush status``, against the real daemon and
simulated phones."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from phonepush.cli import main as cli_main
from phonepush.sim.simulator import Fleet

TOKEN = "t0ken-for-status"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def config(fleet: Fleet) -> dict[str, Any]:
    ok, broken = fleet.phones
    return {
        "webhook": {"token": TOKEN},
        "phones": [
            {"name": "ok", "host": ok.address, "groups": ["desk"]},
            {"name": "broken", "host": broken.address, "groups": ["desk"]},
        ],
        "rules": [
            {
                "name": "bell",
                "on": "webhook:bell",
                "to": ["desk"],
                "execute": ["Play:Chime.raw"],
                "dedupe": "{{ payload.id }}",
                "ttl": "5m",
            }
        ],
    }


@pytest.fixture
async def phones(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=2, names=["ok", "broken"], tone_ms=20)
    # Error 1 ("parse error") is permanent: the delivery to this phone fails at once.
    await fleet.phone("broken").set_fault("error", number=1)
    return fleet


async def ring(client: httpx.AsyncClient, ident: str) -> str:
    answer = await client.post("/hooks/bell", json={"id": ident})
    assert answer.status_code == 202, answer.text
    event_id: str = answer.json()["event"]
    return event_id


async def test_event_status_lists_each_phones_delivery_and_state(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        first = await ring(client, "a")
        duplicate = await ring(client, "a")  # same dedupe key: suppressed

        async def finished() -> bool:
            body = (await client.get(f"/api/events/{first}")).json()
            return all(d["state"] != "pending" for d in body["deliveries"])

        await eventually(finished)
        body = (await client.get(f"/api/events/{first}")).json()
        suppressed = (await client.get(f"/api/events/{duplicate}")).json()

    assert body["event"] == first and body["rule"] == "bell" and body["rules"] == ["bell"]
    states = {d["phone"]: d["state"] for d in body["deliveries"]}
    assert states == {"ok": "delivered", "broken": "failed"}
    failed = next(d for d in body["deliveries"] if d["phone"] == "broken")
    assert "parsing" in failed["error"]
    for d in body["deliveries"]:
        assert d["created_at"] >= body["received_at"]
        assert d["expires_at"] > d["created_at"]
        assert d["kind"] == "page" and d["round"] == 0
    assert {d["state"] for d in suppressed["deliveries"]} == {"suppressed"}
    assert body["alerts"] == []


async def test_status_api_needs_the_bearer_token_and_a_known_event(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        event_id = await ring(client, "b")
        missing = await client.get("/api/events/0123456789abcdef0123456789ab")
    assert missing.status_code == 404
    async with httpx.AsyncClient(base_url=daemon_runner.url) as anonymous:
        assert (await anonymous.get(f"/api/events/{event_id}")).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token"}
        assert (await anonymous.get(f"/api/events/{event_id}", headers=wrong)).status_code == 401


async def test_status_command_prints_recent_events_while_the_daemon_runs(
    daemon_runner: DaemonRunner,
    phones: Fleet,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        older = await ring(client, "c")
        newer = await ring(client, "d")

        async def finished() -> bool:
            body = (await client.get(f"/api/events/{newer}")).json()
            return all(d["state"] != "pending" for d in body["deliveries"])

        await eventually(finished)
    config_file = tmp_path / "phonepush.toml"
    config_file.write_text(f'[spool]\npath = "{daemon_runner.spool}"\n')

    assert cli_main(["status", "--config", str(config_file), "--limit", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TIME", "EVENT", "SOURCE", "RULES", "DELIVERIES"]
    assert len(lines) == 3
    assert newer in lines[1] and "webhook:bell" in lines[1] and " bell " in lines[1]
    assert lines[1].endswith("delivered=1 failed=1")
    # Under the event, the delivery that did not get through and why.
    assert lines[2] == "  broken  failed  Error: Error parsing CiscoIPPhone object"

    assert cli_main(["status", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert out.index(newer) < out.index(older)


def test_status_command_without_a_spool_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "phonepush.toml"
    config_file.write_text(f'[spool]\npath = "{tmp_path / "none.db"}"\n')
    assert cli_main(["status", "--config", str(config_file)]) == 2
    assert "cannot read the spool" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


async def test_the_log_and_the_api_count_the_same_attempts(
    daemon_runner: DaemonRunner, phones: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="phonepush")
    ok = phones.phone("ok")
    await ok.set_fault("refuse")
    await phones.phone("broken").set_fault("none")
    await daemon_runner.start(config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        event_id = await ring(client, "c")
        # "ok" refuses twice or more (retried), "broken" answers at the first try.
        await eventually(
            lambda: daemon_runner.metric("phonepush_delivery_retries_total", phone="ok") >= 2
        )
        await ok.set_fault("none")

        async def finished() -> bool:
            body = (await client.get(f"/api/events/{event_id}")).json()
            return all(d["state"] == "delivered" for d in body["deliveries"])

        await eventually(finished)
        body = (await client.get(f"/api/events/{event_id}")).json()

    attempts = {d["phone"]: d["attempts"] for d in body["deliveries"]}
    logged: dict[str, int] = {}
    for record in caplog.records:
        said = re.fullmatch(
            rf"delivery \d+ event {event_id} rule bell phone (\S+) delivered after (\d+) "
            r"attempts? in [\d.]+ s",
            record.getMessage(),
        )
        if said:
            logged[said[1]] = int(said[2])
    assert logged == attempts
    assert attempts["broken"] == 1
    assert attempts["ok"] >= 3
    assert "phone broken delivered after 1 attempt in " in "\n".join(
        r.getMessage() for r in caplog.records
    )
