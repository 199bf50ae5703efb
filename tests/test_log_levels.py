"""What the log says at which level: a page held back by a cooldown, a silence or quiet hours is
the rule working (INFO); a page that cannot be made or sent is a failure (WARNING)."""

from __future__ import annotations

import logging

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from _sim_fixtures import MakeFleet

TOKEN = "t0ken-for-levels"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _rule(name: str, **extra: object) -> dict[str, object]:
    return {"name": name, "on": f"webhook:{name}", "to": ["desk"], "execute": ["Key:Headset"]} | (
        extra
    )


async def test_held_back_pages_are_info_and_failures_warnings(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="phonepush")
    fleet = await make_fleet(phones=1, names=["desk"], tone_ms=10)
    await daemon_runner.start(
        {
            "webhook": {"token": TOKEN},
            "phones": [{"name": "desk", "host": fleet.phone("desk").address}],
            "rules": [
                _rule("bell", cooldown="1h"),
                _rule(
                    "night",
                    quiet_hours={"ranges": ["00:00-24:00"], "timezone": "UTC"},
                ),
                _rule("muted"),
                _rule("broken", message={"title": "x", "text": "{{ payload|attr('__class__') }}"}),
            ],
        }
    )
    ids: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        made = await client.post(
            "/api/silences",
            json={
                "matchers": [{"name": "rule", "value": "muted"}],
                "duration": "1h",
                "createdBy": "ops",
                "comment": "maintenance",
            },
        )
        assert made.status_code == 201, made.text
        for hook in ("bell", "bell", "night", "muted", "broken"):
            answer = await client.post(f"/hooks/{hook}", json={"n": 1})
            assert answer.status_code == 202, answer.text
            ids[hook] = answer.json()["event"]  # the second bell's id is the one kept
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="desk", result="suppressed")
            == 3
        )
    )

    logged = {r.getMessage(): r.levelname for r in caplog.records}
    silence_id = made.json()["id"]
    assert logged[f"event {ids['bell']} rule bell suppressed for 1 phone: cooldown"] == "INFO"
    assert logged[f"event {ids['night']} rule night to desk: quiet hours"] == "INFO"
    assert logged[f"event {ids['muted']} rule muted to desk: silenced by {silence_id}"] == "INFO"
    (broken,) = [m for m in logged if m.startswith(f"event {ids['broken']} rule broken failed")]
    assert "failed for 1 phone: rules[broken].message.text: " in broken
    assert logged[broken] == "WARNING"
