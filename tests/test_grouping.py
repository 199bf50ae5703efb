"""Grouping (group_by / group_wait): several events inside the window become one page per phone."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from phonepush.errors import ConfigError
from phonepush.grouping.grouper import MAX_LISTED, group_page
from phonepush.sim.simulator import Fleet
from phonepush.wire.cisco import MAX_TITLE, TextPage, parse_text, text_xml

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def alert(name: str, instance: str, summary: str) -> dict[str, Any]:
    return {
        "status": "firing",
        "commonLabels": {"alertname": name, "instance": instance, "severity": "critical"},
        "commonAnnotations": {"summary": summary},
    }


def config(fleet: Fleet, **rule: Any) -> dict[str, Any]:
    office, server_room = fleet.phones
    alerts: dict[str, Any] = {
        "name": "alerts",
        "on": "webhook:alertmanager",
        "to": ["it"],
        "execute": ["Play:Alarm.raw"],
        "message": {
            "title": "{{ payload.commonLabels.alertname }}",
            "text": "{{ payload.commonAnnotations.summary }}",
        },
        "group_by": ["{{ payload.commonLabels.alertname }}"],
        "group_wait": "200ms",
    }
    alerts.update(rule)
    return {
        "webhook": {"token": TOKEN},
        "phones": [
            {"name": "office", "host": office.address, "groups": ["it"]},
            {"name": "server-room", "host": server_room.address, "groups": ["it"]},
        ],
        "rules": [alerts],
    }


@pytest.fixture
async def phones(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=2, names=["office", "server-room"], tone_ms=20)
    return fleet


async def post(runner: DaemonRunner, *payloads: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=runner.url, headers=AUTH) as client:
        for payload in payloads:
            answer = await client.post("/hooks/alertmanager", json=payload)
            assert answer.status_code == 202, answer.text
            assert answer.json()["rules"] == ["alerts"]


def delivered(runner: DaemonRunner, phone: str) -> float:
    return runner.metric("phonepush_deliveries_total", phone=phone, result="delivered")


async def test_three_alerts_inside_the_window_are_one_page_per_phone(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    await post(
        daemon_runner,
        alert("DiskFull", "nas:9100", "/srv 97% full"),
        alert("DiskFull", "db:9100", "/var 91% full"),
        alert("DiskFull", "web:9100", "/ 99% full"),
    )
    # Nothing is pushed before the window ends: the events wait in the spool.
    assert all(p.state.pushes == 0 for p in phones.phones)
    await eventually(lambda: delivered(daemon_runner, "office") == 1)
    await eventually(lambda: delivered(daemon_runner, "server-room") == 1)
    for phone in phones.phones:
        assert phone.state.pushes == 1
        assert phone.state.last_tone == "Alarm.raw"
        assert phone.state.screen.title == "3 alerts: DiskFull"
        assert phone.state.screen.text == "/srv 97% full\n/var 91% full\n/ 99% full"
    assert daemon_runner.metric("phonepush_grouped_events_total", rule="alerts") == 3
    assert daemon_runner.metric("phonepush_events_total", source="webhook", rule="alerts") == 3


async def test_different_group_keys_page_separately_and_later_events_open_a_new_window(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones))
    await post(
        daemon_runner,
        alert("DiskFull", "nas:9100", "/srv 97% full"),
        alert("MemoryHigh", "db:9100", "swap in use"),
        alert("DiskFull", "db:9100", "/var 91% full"),
    )
    await eventually(lambda: delivered(daemon_runner, "office") == 2)
    office = phones.phone("office")
    titles = sorted(await _titles(office))
    assert office.state.pushes == 2
    assert titles == ["2 alerts: DiskFull", "MemoryHigh"]

    # After a flush the next event of the same key waits for a window of its own.
    await post(daemon_runner, alert("DiskFull", "web:9100", "/ 99% full"))
    await eventually(lambda: delivered(daemon_runner, "office") == 3)
    assert office.state.screen.title == "DiskFull"
    assert office.state.screen.text == "/ 99% full"


async def test_group_wait_alone_groups_every_event_of_the_rule_with_titles_per_line(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones, group_by=[], group_wait="200ms"))
    await post(
        daemon_runner,
        alert("DiskFull", "nas:9100", "/srv 97% full"),
        alert("MemoryHigh", "db:9100", "swap in use"),
    )
    await eventually(lambda: delivered(daemon_runner, "office") == 1)
    office = phones.phone("office")
    assert office.state.pushes == 1
    assert office.state.screen.title == "2 alerts: DiskFull, MemoryHigh"
    assert office.state.screen.text == "DiskFull: /srv 97% full\nMemoryHigh: swap in use"


async def test_a_group_page_lists_each_event_as_its_own_page_would_show_it(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    # Each event's title and text are what its own page would show (cut to the phone's 32
    # characters for a title, control characters dropped, CR LF as a line end) before they
    # are joined into the group's page.
    await daemon_runner.start(config(phones, group_by=[], group_wait="200ms"))
    long_name = "FilesystemAlmostOutOfSpaceOnAllVolumes"
    await post(
        daemon_runner,
        alert(long_name, "nas:9100", "/srv 97%\x07 full"),
        alert("MemoryHigh", "db:9100", "swap\r\nin use"),
    )
    await eventually(lambda: delivered(daemon_runner, "office") == 1)
    office = phones.phone("office")
    shown = long_name[:29] + "..."
    assert office.state.screen.text == f"{shown}: /srv 97% full\nMemoryHigh: swap\nin use"


async def test_a_restart_during_the_window_still_delivers_the_group_once(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones, group_wait="1s"))
    await post(
        daemon_runner,
        alert("DiskFull", "nas:9100", "/srv 97% full"),
        alert("DiskFull", "db:9100", "/var 91% full"),
    )
    # 202 came back: the events are committed, and stopping now must not lose them.
    await daemon_runner.stop()
    assert all(p.state.pushes == 0 for p in phones.phones)

    await daemon_runner.start(config(phones, group_wait="1s"))
    await eventually(lambda: delivered(daemon_runner, "office") == 1)
    await eventually(lambda: delivered(daemon_runner, "server-room") == 1)
    office = phones.phone("office")
    assert office.state.pushes == 1
    assert office.state.screen.title == "2 alerts: DiskFull"
    # Nothing is left to flush again after another restart.
    await daemon_runner.stop()
    await daemon_runner.start(config(phones, group_wait="1s"))
    assert daemon_runner.daemon is not None and daemon_runner.daemon.running is not None
    assert await daemon_runner.daemon.running.spool.groups.next_due() is None
    assert office.state.pushes == 1


async def test_a_silence_made_during_the_window_leaves_its_events_out_of_the_page(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    await daemon_runner.start(config(phones, group_by=[], group_wait="300ms"))
    await post(
        daemon_runner,
        alert("DiskFull", "nas:9100", "/srv 97% full"),
        alert("MemoryHigh", "db:9100", "swap in use"),
    )
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        answer = await client.post(
            "/api/silences",
            json={
                "matchers": [
                    {"name": "label.commonLabels.alertname", "value": "MemoryHigh"},
                    {"name": "phone", "value": "office"},
                ],
                "duration": "1h",
                "createdBy": "ops",
                "comment": "swap known, fixing",
            },
        )
        assert answer.status_code == 201
    await eventually(lambda: delivered(daemon_runner, "server-room") == 1)
    await eventually(lambda: delivered(daemon_runner, "office") == 1)
    assert phones.phone("office").state.screen.title == "DiskFull"
    assert phones.phone("server-room").state.screen.title == "2 alerts: DiskFull, MemoryHigh"
    assert daemon_runner.metric("phonepush_silenced_total", rule="alerts") == 1


def test_group_page_lists_events_and_stays_within_the_phone_limits() -> None:
    pages = [TextPage(title="DiskFull", text=f"disk {i} full") for i in range(MAX_LISTED + 5)]
    page = group_page(pages)
    assert page.title.startswith(f"{MAX_LISTED + 5} alerts: DiskFull")
    assert page.text.splitlines()[-1] == "... and 5 more"
    single = TextPage(title="Doorbell", text="Front door", prompt="Ring")
    assert group_page([single]) is single
    long_titles = group_page([TextPage(title=f"Alert{i}", text="x") for i in range(10)])
    shown = parse_text(text_xml(long_titles).encode())
    assert len(shown.title) <= MAX_TITLE and shown.title.endswith("...")


def test_group_keys_are_checked_at_load_time(tmp_path: Any) -> None:
    from phonepush.config import parse_config

    base: dict[str, Any] = {
        "phones": [{"name": "office", "host": "127.0.0.1:1"}],
        "rules": [
            {
                "name": "alerts",
                "on": "webhook:am",
                "to": "office",
                "execute": ["Play:Alarm.raw"],
                "group_by": "{{ payload.a",
            }
        ],
    }
    with pytest.raises(ConfigError, match=r"rules\[alerts\]\.group_by\[0\]"):
        parse_config(base, environ={})
    bad_wait = copy.deepcopy(base)
    bad_wait["rules"][0].update(group_by=[], group_wait="0s")
    with pytest.raises(ConfigError, match=r"rules\[alerts\]\.group_wait: must be more than 0s"):
        parse_config(bad_wait, environ={})
    repeating = copy.deepcopy(base)
    repeating["rules"][0].update(group_by="{{ payload.a }}", repeat="1m")
    with pytest.raises(ConfigError, match="cannot also repeat"):
        parse_config(repeating, environ={})


async def _titles(phone: Any) -> list[str]:
    """Titles of every page pushed to ``phone`` (the screen shows only the last one)."""
    urls = [
        item["url"]
        for record in phone.state.requests
        for item in record["items"]
        if "/pages/" in item["url"]
    ]
    async with httpx.AsyncClient() as client:
        return [parse_text((await client.get(url)).content).title for url in urls]
