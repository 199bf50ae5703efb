"""What a push does, counted by the phone: the daemon against simulated phones that answer late,
answer as multiplatform firmware does, or refuse a push that arrives while they are busy.

The simulator lists what each phone executed (``state.executed``) and counts pushes that arrived
while it was serving another (``state.overlaps``); docs/design.md, "Delivery guarantees", has the
table these tests check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from _sim_fixtures import free_rtp_port, tone_wav
from phonepush.app.daemon import Running
from phonepush.commands.status import recent_events
from phonepush.sim.simulator import Fleet, SimPhone

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


async def _fire(runner: DaemonRunner, hook: str, payload: dict[str, Any] | None = None) -> str:
    async with httpx.AsyncClient(base_url=runner.url) as client:
        answer = await client.post(f"/hooks/{hook}", json=payload or {})
    assert answer.status_code == 202, answer.text
    event: str = answer.json()["event"]
    return event


async def _settled(runner: DaemonRunner, running: Running, event: str) -> list[dict[str, Any]]:
    """The event's deliveries from the status API, once none is pending."""
    deliveries: list[dict[str, Any]] = []

    async def done() -> bool:
        nonlocal deliveries
        async with httpx.AsyncClient(base_url=runner.url) as client:
            answer = await client.get(f"/api/events/{event}")
        deliveries = answer.json()["deliveries"]
        return all(d["state"] != "pending" for d in deliveries)

    await eventually(done, timeout=15)
    if running.announcer is not None:
        await running.announcer.wait_idle()
    return deliveries


def _executed(phone: SimPhone, uri: str) -> int:
    return sum(1 for executed in phone.state.executed if executed == uri)


def _one_phone(phone: SimPhone, rule: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {
        "phones": [{"name": "desk", "host": phone.address, **settings}],
        "rules": [{"name": "call", "on": "webhook:call", "to": "desk", "ttl": "10s", **rule}],
    }


async def test_a_late_answer_is_unconfirmed_and_the_push_runs_once(
    daemon_runner: DaemonRunner, make_fleet: Any
) -> None:
    # The phone dials at once and answers after 1.5 s; the daemon waits 0.5 s.
    fleet: Fleet = await make_fleet(phones=1, answer_after_ms=1500)
    phone = fleet.phones[0]
    running = await daemon_runner.start(
        _one_phone(phone, {"execute": ["Dial:5551234"]}, timeout="0.5s")
    )
    event = await _fire(daemon_runner, "call")
    [delivery] = await _settled(daemon_runner, running, event)
    await running.dispatcher.wait_idle()

    assert delivery["state"] == "unconfirmed"
    assert "Timed out after 0.5 s waiting for" in delivery["error"]
    assert list(phone.state.executed) == ["Dial:5551234"]
    assert list(phone.state.dialled) == ["5551234"]
    assert (
        daemon_runner.metric("phonepush_deliveries_total", phone="desk", result="unconfirmed") == 1
    )
    assert daemon_runner.metric("phonepush_delivery_retries_total", phone="desk") == 0
    [(_, event_id, _, _, counts)] = recent_events(daemon_runner.spool, 5)
    assert (event_id, counts) == (event, {"unconfirmed": 1})


@pytest.mark.slow
async def test_retry_unconfirmed_sends_idempotent_content_again(
    daemon_runner: DaemonRunner, make_fleet: Any
) -> None:
    fleet: Fleet = await make_fleet(phones=1, answer_after_ms=600)
    phone = fleet.phones[0]
    rule = {"execute": ["Display:On:10"], "retry_unconfirmed": True, "ttl": "2s"}
    running = await daemon_runner.start(_one_phone(phone, rule, timeout="0.3s"))
    event = await _fire(daemon_runner, "call")
    [delivery] = await _settled(daemon_runner, running, event)

    # Every try runs and none is answered in time: sent until the TTL, then expired.
    assert _executed(phone, "Display:On:10") >= 2
    assert delivery["state"] == "expired"


async def test_a_multiplatform_phone_answering_html_is_delivered_once(
    daemon_runner: DaemonRunner, make_fleet: Any
) -> None:
    fleet: Fleet = await make_fleet(phones=1, model="multiplatform", tone_ms=50)
    phone = fleet.phones[0]
    rule = {"execute": ["Play:Chime.raw", "Display:On:10"]}
    running = await daemon_runner.start(_one_phone(phone, rule))
    event = await _fire(daemon_runner, "call")
    [delivery] = await _settled(daemon_runner, running, event)

    assert delivery["state"] == "delivered", delivery["error"]
    assert list(phone.state.executed) == ["Play:Chime.raw", "Display:On:10"]
    assert phone.state.overlaps == 0


async def test_a_multi_request_delivery_goes_on_after_an_unconfirmed_request(
    daemon_runner: DaemonRunner, make_fleet: Any
) -> None:
    # Play holds the answer for the tone (1.5 s) and the daemon waits 0.5 s: the tone is
    # unconfirmed, not played again, and the page after it still goes out.
    fleet: Fleet = await make_fleet(phones=1, tone_ms=1500)
    phone = fleet.phones[0]
    rule = {
        "execute": ["Play:Chime.raw"],
        "message": {"title": "Door", "text": "Someone is at the door"},
    }
    running = await daemon_runner.start(_one_phone(phone, rule, timeout="0.5s"))
    event = await _fire(daemon_runner, "call")
    [delivery] = await _settled(daemon_runner, running, event)

    assert delivery["state"] == "unconfirmed"
    assert _executed(phone, "Play:Chime.raw") == 1
    await eventually(lambda: phone.state.screen.title == "Door")


async def test_two_page_rules_and_an_audio_page_never_overlap_on_one_phone(
    daemon_runner: DaemonRunner, make_fleet: Any, tmp_path: Path
) -> None:
    fleet: Fleet = await make_fleet(phones=1, names=["desk"], hosts=HOSTS[:1], tone_ms=150)
    phone = fleet.phones[0]
    port = free_rtp_port(HOSTS[:1])
    audio = {"file": str(tone_wav(tmp_path / "page.wav", 0.3))}
    running = await daemon_runner.start(
        {
            "audio": {"port": port},
            "phones": [{"name": "desk", "host": phone.address}],
            "rules": [
                {
                    "name": "chime",
                    "on": "webhook:evt",
                    "to": "desk",
                    "execute": ["Play:Chime.raw"],
                    "message": {"title": "Alarm", "text": "{{ payload.n }}"},
                },
                {"name": "light", "on": "webhook:evt", "to": "desk", "execute": ["Display:On:5"]},
                {"name": "speak", "on": "webhook:evt", "to": "desk", "audio": audio},
            ],
        }
    )
    events = [await _fire(daemon_runner, "evt", {"n": n}) for n in range(3)]
    for event in events:
        deliveries = await _settled(daemon_runner, running, event)
        assert sorted(d["state"] for d in deliveries) == ["delivered"] * 3, deliveries
    await running.dispatcher.wait_idle()

    assert phone.state.overlaps == 0
    assert _executed(phone, "Play:Chime.raw") == 3
    assert _executed(phone, "Display:On:5") == 3
    assert _executed(phone, "RTPRx:Stop") == 3


def _audio_config(fleet: Fleet, port: int, audio: dict[str, Any], **rule: Any) -> dict[str, Any]:
    return {
        "audio": {"port": port},
        "phones": [
            {"name": phone.name, "host": phone.address, "groups": ["floor"]}
            for phone in fleet.phones
        ],
        "rules": [{"name": "page", "on": "webhook:page", "to": "floor", "audio": audio, **rule}],
    }


def _started_and_stopped(fleet: Fleet) -> list[tuple[bool, bool]]:
    """Per phone: did it execute a start, and a stop after its last start?"""
    out = []
    for phone in fleet.phones:
        executed = list(phone.state.executed)
        starts = [i for i, uri in enumerate(executed) if uri.startswith("RTPRx:1")]
        stopped = bool(starts) and "RTPRx:Stop" in executed[starts[-1] :]
        out.append((bool(starts), stopped))
    return out


async def test_a_page_cut_by_its_ttl_mid_start_stops_every_started_phone(
    daemon_runner: DaemonRunner, make_fleet: Any, tmp_path: Path
) -> None:
    # The phones start listening at once but answer the start after 0.6 s; the TTL ends the
    # page at 0.3 s, while every start is still waiting for its answer.
    fleet: Fleet = await make_fleet(
        phones=3, names=["a", "b", "c"], hosts=HOSTS, answer_after_ms=600
    )
    port = free_rtp_port(HOSTS)
    audio = {"file": str(tone_wav(tmp_path / "page.wav", 1.0))}
    running = await daemon_runner.start(_audio_config(fleet, port, audio, ttl="0.3s"))
    event = await _fire(daemon_runner, "page")
    deliveries = await _settled(daemon_runner, running, event)

    assert {d["state"] for d in deliveries} == {"expired"}
    assert _started_and_stopped(fleet) == [(True, True)] * 3
    assert all(phone.rtp_status()["active"] is False for phone in fleet.phones)


@pytest.mark.slow
async def test_a_page_cut_by_shutdown_mid_start_stops_every_started_phone(
    daemon_runner: DaemonRunner, make_fleet: Any, tmp_path: Path
) -> None:
    fleet: Fleet = await make_fleet(
        phones=3, names=["a", "b", "c"], hosts=HOSTS, answer_after_ms=800
    )
    port = free_rtp_port(HOSTS)
    audio = {"file": str(tone_wav(tmp_path / "page.wav", 1.0))}
    await daemon_runner.start(_audio_config(fleet, port, audio))
    await _fire(daemon_runner, "page")
    await eventually(lambda: all(started for started, _ in _started_and_stopped(fleet)))
    await daemon_runner.stop()

    assert _started_and_stopped(fleet) == [(True, True)] * 3


@pytest.mark.slow
async def test_a_request_cut_by_shutdown_after_it_was_written_is_not_sent_again(
    daemon_runner: DaemonRunner, make_fleet: Any
) -> None:
    # The phone dials at once and answers after 4 s; the daemon stops meanwhile (it waits
    # 2 s for requests on the wire), then starts again on the same spool.
    fleet: Fleet = await make_fleet(phones=1, answer_after_ms=4000)
    phone = fleet.phones[0]
    config = _one_phone(phone, {"execute": ["Dial:5551234"], "ttl": "1m"})
    await daemon_runner.start(config)
    event = await _fire(daemon_runner, "call")
    await eventually(lambda: list(phone.state.executed) == ["Dial:5551234"])
    await daemon_runner.stop()

    running = await daemon_runner.start(config)
    [delivery] = await _settled(daemon_runner, running, event)
    await running.dispatcher.wait_idle()
    assert delivery["state"] == "unconfirmed"
    assert "the daemon stopped while waiting for the answer" in delivery["error"]
    assert list(phone.state.executed) == ["Dial:5551234"]
