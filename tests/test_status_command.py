"""``phonepush status`` lists the events that did something: one a rule paged for is shown, one
that made no delivery of its own (an Alertmanager-style resolve) only with ``--all``, and one no
rule matched (a sensor report the rule's ``when`` passes over) never: it is counted in
``phonepush_events_unmatched_total``, not stored, and logged at debug only."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from _sim_fixtures import MakeFleet
from phonepush.cli import main as cli_main

TOKEN = "t0ken-for-status"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_status_hides_events_without_deliveries_unless_all(
    daemon_runner: DaemonRunner,
    make_fleet: MakeFleet,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="phonepush")
    fleet = await make_fleet(phones=1, names=["desk"], tone_ms=10)
    running = await daemon_runner.start(
        {
            "webhook": {"token": TOKEN},
            "phones": [{"name": "desk", "host": fleet.phone("desk").address}],
            "rules": [
                {
                    "name": "bell",
                    "on": "webhook:bell",
                    "when": "payload.action == 'press'",
                    "resolve_when": "payload.action == 'answered'",
                    "to": ["desk"],
                    "execute": ["Play:Chime.raw"],
                }
            ],
        }
    )
    config_file = tmp_path / "phonepush.toml"
    config_file.write_text(f'[spool]\npath = "{daemon_runner.spool}"\n')
    ids: dict[str, list[str]] = {}
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        for action in ("battery", "press", "battery", "answered"):
            answer = await client.post("/hooks/bell", json={"action": action})
            assert answer.status_code == 202, answer.text
            ids.setdefault(action, []).append(answer.json()["event"])
            if len(ids) == 1:
                # Only a report so far: nothing to show, and the line says how to see more.
                assert cli_main(["status", "--config", str(config_file)]) == 0
                assert capsys.readouterr().out == (
                    f"{daemon_runner.spool}: no events with deliveries (--all lists every event)\n"
                )
                assert cli_main(["status", "--config", str(config_file), "--all"]) == 0
                assert capsys.readouterr().out == f"{daemon_runner.spool}: no events\n"
            if action == "press":
                await running.dispatcher.wait_idle()
                await eventually(lambda: fleet.phone("desk").state.pushes == 1)
        # The report was not stored: the API does not know its id.
        gone = await client.get(f"/api/events/{ids['battery'][0]}")
        assert gone.status_code == 404

    assert cli_main(["status", "--config", str(config_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    (pressed,) = ids["press"]
    assert pressed in lines[1]

    assert cli_main(["status", "--config", str(config_file), "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    (answered,) = ids["answered"]
    assert [next(i for i in (answered, pressed) if i in line) for line in lines[1:]] == [
        answered,
        pressed,
    ]
    assert lines[1].endswith("  -")
    assert not any(i in "\n".join(lines) for i in ids["battery"])

    # Counted, and kept out of the log above debug.
    assert daemon_runner.metric("phonepush_events_unmatched_total", source="webhook") == 2
    assert daemon_runner.metric("phonepush_events_total", source="webhook", rule="bell") == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert pressed in logged and answered in logged
    assert not any(i in logged for i in ids["battery"])
