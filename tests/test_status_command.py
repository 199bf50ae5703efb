"""``phonepush status`` lists the events that did something: one a rule paged for is shown, one
that made no delivery (a sensor report the rule's ``when`` passed over) only with ``--all``."""

from __future__ import annotations

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
) -> None:
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
        for action in ("battery", "press", "battery"):
            answer = await client.post("/hooks/bell", json={"action": action})
            assert answer.status_code == 202, answer.text
            ids.setdefault(action, []).append(answer.json()["event"])
            if len(ids) == 1:
                # Only a report so far: nothing to show, and the line says how to see it.
                assert cli_main(["status", "--config", str(config_file)]) == 0
                assert capsys.readouterr().out == (
                    f"{daemon_runner.spool}: no events with deliveries (--all lists every event)\n"
                )
    await running.dispatcher.wait_idle()
    await eventually(lambda: fleet.phone("desk").state.pushes == 1)

    assert cli_main(["status", "--config", str(config_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    (pressed,) = ids["press"]
    assert pressed in lines[1] and lines[1].endswith("delivered=1")

    assert cli_main(["status", "--config", str(config_file), "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4, lines
    newest_first = [ids["battery"][1], pressed, ids["battery"][0]]
    assert [next(i for i in newest_first if i in line) for line in lines[1:]] == newest_first
    assert lines[1].endswith("  -") and lines[3].endswith("  -")
