"""A reload builds a new rule book and stages: features the old configuration did not use start
working for the next event, and the ones it drops stop."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from phonepush.sim.simulator import Fleet

DOOR = """
[[rules]]
name = "door"
on = "webhook:door"
to = "office"
message = { title = "Door", text = "{{ payload.who }} rang" }
"""

#: The same rule, now acknowledged and deduplicated by who rang.
DOOR_ACKED = DOOR + 'ack = true\ndedupe = "{{ payload.who }}"\n'


@pytest.fixture
async def office(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=1, names=["office"])
    return fleet


def write(runner: DaemonRunner, path: Path, fleet: Fleet, rules: str) -> None:
    (phone,) = fleet.phones
    head = f"""
    [server]
    listen = "127.0.0.1:{runner.port}"

    [spool]
    path = "{runner.spool}"

    [webhook]
    allow_anonymous = true

    [[phones]]
    name = "office"
    host = "{phone.address}"
    """
    path.write_text(textwrap.dedent(head) + rules, encoding="utf-8")


async def ring(runner: DaemonRunner, who: str) -> str:
    async with httpx.AsyncClient(base_url=runner.url) as client:
        answer = await client.post("/hooks/door", json={"who": who})
    assert answer.status_code == 202, answer.text
    event_id: str = answer.json()["event"]
    return event_id


async def states(runner: DaemonRunner, event_id: str) -> list[str]:
    async with httpx.AsyncClient(base_url=runner.url) as client:
        body = (await client.get(f"/api/events/{event_id}")).json()
    return [d["state"] for d in body["deliveries"]]


async def test_a_reload_adds_acks_and_dedupe_to_a_rule_and_takes_them_away_again(
    daemon_runner: DaemonRunner, office: Fleet, tmp_path: Path
) -> None:
    path = tmp_path / "phonepush.toml"
    write(daemon_runner, path, office, DOOR)
    await daemon_runner.start_file(path)
    (phone,) = office.phones
    delivered = 0

    async def rung(who: str) -> str:
        nonlocal delivered
        event_id = await ring(daemon_runner, who)
        delivered += 1
        await eventually(lambda: phone.state.pushes == delivered)
        await eventually(lambda: phone.state.screen.text == f"{who} rang")
        return event_id

    await rung("Ann")
    assert not phone.state.screen.softkeys

    write(daemon_runner, path, office, DOOR_ACKED)
    assert daemon_runner.daemon is not None
    daemon_runner.daemon.reload()
    await eventually(
        lambda: daemon_runner.metric("phonepush_config_reloads_total", result="ok") == 1
    )
    await rung("Bob")
    assert [k.name for k in phone.state.screen.softkeys] == ["Ack", "Close"]
    # Bob again inside the rule's TTL: the new dedupe key holds it back.
    again = await ring(daemon_runner, "Bob")
    assert await states(daemon_runner, again) == ["suppressed"]

    write(daemon_runner, path, office, DOOR)
    daemon_runner.daemon.reload()
    await eventually(
        lambda: daemon_runner.metric("phonepush_config_reloads_total", result="ok") == 2
    )
    await rung("Cy")
    assert not phone.state.screen.softkeys
