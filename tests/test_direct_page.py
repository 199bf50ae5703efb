"""Pages sent by hand (the console's test page): past the rule book, through everything else."""

from __future__ import annotations

from typing import Any

import pytest

from _daemon_fixtures import DaemonRunner, eventually
from phonepush.errors import ConfigError
from phonepush.pipeline.direct import DirectPage
from phonepush.sim.simulator import Fleet


@pytest.fixture
async def phones(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=3, names=["lobby", "office", "cellar"])
    return fleet


def config(fleet: Fleet) -> dict[str, Any]:
    lobby, office, cellar = fleet.phones
    return {
        "phones": [
            {"name": "lobby", "host": lobby.address, "groups": ["frontdesk"]},
            {"name": "office", "host": office.address, "groups": ["frontdesk"]},
            {"name": "cellar", "host": cellar.address},
        ],
        "rules": [
            {
                "name": "doorbell",
                "on": "webhook:doorbell",
                "to": "all",
                "message": {"title": "Doorbell"},
            }
        ],
    }


def a_page(to: tuple[str, ...], **kw: Any) -> DirectPage:
    return DirectPage(
        origin="console", rule="test-page", to=to, title="Test page", text="Hello", **kw
    )


async def test_a_page_to_a_group_reaches_its_phones_and_is_recorded(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    running = await daemon_runner.start(config(phones))
    accepted = await running.intake.page(a_page(("frontdesk",), execute=("Play:Chime.raw",)))
    assert accepted.rules == ("test-page",)
    assert sorted(d.phone for d in accepted.deliveries) == ["lobby", "office"]
    lobby, office, cellar = phones.phones
    await eventually(lambda: lobby.state.last_tone == "Chime.raw")
    await eventually(lambda: office.state.screen.title == "Test page")
    assert lobby.state.screen.text == "Hello"
    assert cellar.state.pushes == 0
    stored = await running.spool.events.get(accepted.event.id)
    assert stored is not None
    assert (stored.source, stored.topic, stored.rules) == ("console", "frontdesk", ("test-page",))
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="office", result="delivered")
            == 1
        )
    )
    assert daemon_runner.metric("phonepush_events_total", source="console", rule="test-page") == 1


@pytest.mark.parametrize(
    ("page", "message"),
    [
        (a_page(("nowhere",)), "to: no phone or group named 'nowhere'"),
        (a_page(()), "to: name at least one phone or group"),
        (a_page(("lobby",), execute=("Play:",)), "execute[0]:"),
        (
            DirectPage(origin="console", rule="test-page", to=("lobby",), title="", text=""),
            "nothing to page",
        ),
    ],
)
async def test_bad_requests_are_refused_naming_the_field_and_write_nothing(
    daemon_runner: DaemonRunner, phones: Fleet, page: DirectPage, message: str
) -> None:
    running = await daemon_runner.start(config(phones))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        await running.intake.page(page)
    assert await running.spool.events.recent(10) == []
