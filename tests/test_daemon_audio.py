"""A rule's ``audio = {...}`` end to end: webhook in, the daemon pushes the start URI to
simulated phones on their own loopback addresses (127.0.0.2-4), streams RTP to them, pushes the
stop URI; each phone's own RTP listener says what it heard."""

from __future__ import annotations

import logging
import math
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner
from _sim_fixtures import free_rtp_port, tone_wav
from phonepush.app.daemon import Running
from phonepush.audio.announce import compile_actions
from phonepush.audio.clips import announcement, load_file
from phonepush.errors import ConfigError
from phonepush.events import Event
from phonepush.sim.simulator import Fleet
from phonepush.store.commit import commit_event
from phonepush.store.spool import NewDelivery, Spool

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
NAMES = ("lobby", "office", "hall")
DAEMON = "127.0.0.1"  # the daemon listens here, so pages come from here


def _wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    return tone_wav(path, seconds, rate=rate, amplitude=10000)


def _config(fleet: Fleet, port: int, audio: dict[str, Any], **rule: Any) -> dict[str, Any]:
    return {
        "audio": {"port": port},
        "phones": [
            {"name": phone.name, "host": phone.address, "groups": ["floor"]}
            for phone in fleet.phones
        ],
        "rules": [
            {"name": "evacuate", "on": "webhook:alarm", "to": "floor", "audio": audio, **rule}
        ],
    }


@pytest.fixture
async def phones(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=3, names=list(NAMES), hosts=HOSTS, tone_ms=20)
    return fleet


async def _fire(runner: DaemonRunner, running: Running, payload: dict[str, Any]) -> str:
    async with httpx.AsyncClient(base_url=runner.url) as client:
        answer = await client.post("/hooks/alarm", json=payload)
    assert answer.status_code == 202, answer.text
    assert running.announcer is not None
    await running.announcer.wait_idle()
    event: str = answer.json()["event"]
    return event


def _heard(fleet: Fleet) -> list[dict[str, Any]]:
    """Each phone's last finished RTP reception."""
    out = []
    for phone in fleet.phones:
        history = phone.rtp_status()["history"]
        assert len(history) == 1, f"{phone.name} heard {len(history)} streams"
        out.append(history[0])
    return out


async def _audio_rows(running: Running, event: str) -> dict[str, tuple[str, str]]:
    record = await running.spool.events.get(event)
    assert record is not None
    return {d.phone: (d.state, d.error) for d in record.deliveries if not d.requests}


async def test_spoken_page_to_three_phones(daemon_runner: DaemonRunner, phones: Fleet) -> None:
    port = free_rtp_port(HOSTS)
    running = await daemon_runner.start(
        _config(phones, port, {"say": "Evacuate {{ payload.zone }}", "volume": 80})
    )
    event = await _fire(daemon_runner, running, {"zone": "zone B"})

    uri = f"RTPRx:{DAEMON}:{port}:80"
    for phone, heard in zip(phones.phones, _heard(phones), strict=True):
        items = [i["url"] for r in phone.state.requests for i in r["items"]]
        assert items == [uri, "RTPRx:Stop"]
        assert heard["uri"] == uri and heard["ended_by"] == "RTPRx:Stop"
        assert (heard["address"], heard["port"]) == (phone.host, port)
        assert heard["from_source"] is True
        assert heard["clean"] is True and heard["lost"] == 0
        # "Evacuate zone B" in espeak-ng's English voice: about a second of speech.
        assert 0.5 < heard["duration_s"] < 4
        assert heard["level_dbfs"] > -35
        assert phone.rtp_status()["active"] is False
    # One stream reached all three: the same packets, the same SSRC.
    assert len({(h["ssrc"], h["packets"]) for h in _heard(phones)}) == 1

    assert await _audio_rows(running, event) == {name: ("delivered", "") for name in NAMES}
    assert daemon_runner.metric("phonepush_audio_pages_total", rule="evacuate", result="ok") == 1
    assert daemon_runner.metric("phonepush_deliveries_total", phone="hall", result="delivered") == 1
    assert daemon_runner.metric("phonepush_audio_stream_seconds_count", rule="evacuate") == 1


async def test_wav_file_with_chime_and_a_message(
    daemon_runner: DaemonRunner, phones: Fleet, tmp_path: Path
) -> None:
    port = free_rtp_port(HOSTS)
    body, chime = _wav(tmp_path / "evacuate.wav", 0.6), _wav(tmp_path / "chime.wav", 0.2, 8000)
    audio = {"file": str(body), "chime": str(chime)}
    message = {"title": "Evacuate", "text": "Leave by the stairs, zone {{ payload.zone }}"}
    running = await daemon_runner.start(_config(phones, port, audio, message=message))
    event = await _fire(daemon_runner, running, {"zone": "C"})
    await running.dispatcher.wait_idle()

    played = announcement(load_file(body), chime=load_file(chime))
    packets = math.ceil(len(played) / 160)
    for phone, heard in zip(phones.phones, _heard(phones), strict=True):
        assert heard["packets"] == packets and heard["clean"] is True
        assert heard["duration_s"] == pytest.approx(packets * 0.02)
        assert heard["volume"] is None  # no volume: the phone's own
        # The message went out as usual, through the dispatcher.
        assert phone.state.screen.title == "Evacuate"
        assert phone.state.screen.text == "Leave by the stairs, zone C"
    record = await running.spool.events.get(event)
    assert record is not None
    assert sorted((d.phone, bool(d.requests), d.state) for d in record.deliveries) == sorted(
        [(name, with_requests, "delivered") for name in NAMES for with_requests in (True, False)]
    )


async def test_multicast_page(daemon_runner: DaemonRunner, phones: Fleet, tmp_path: Path) -> None:
    port = free_rtp_port(HOSTS)
    group = f"239.10.{random.randrange(256)}.{random.randrange(1, 255)}"
    body = _wav(tmp_path / "a.wav", 0.4)
    audio = {"file": str(body), "multicast": f"{group}:{port}", "volume": 50, "repeat": 2}
    running = await daemon_runner.start(_config(phones, port, audio))
    event = await _fire(daemon_runner, running, {})

    played = announcement(load_file(body), repeat=2)
    for phone, heard in zip(phones.phones, _heard(phones), strict=True):
        items = [i["url"] for r in phone.state.requests for i in r["items"]]
        assert items == [f"RTPMRx:{group}:{port}:50", "RTPRx:Stop"]
        assert heard["mode"] == "multicast" and heard["clean"] is True
        assert heard["packets"] == math.ceil(len(played) / 160)
    assert await _audio_rows(running, event) == {name: ("delivered", "") for name in NAMES}


# Linux's value; Python's socket module does not export it.
_IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)


def _ttl_listener(group: str, port: int) -> socket.socket:
    """A socket joined to ``group`` on loopback that reports each datagram's IP TTL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((group, port))
    membership = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    sock.setsockopt(socket.IPPROTO_IP, _IP_RECVTTL, 1)
    sock.setblocking(False)
    return sock


def _ttls(sock: socket.socket) -> set[int]:
    seen: set[int] = set()
    while True:
        try:
            _data, ancillary, _flags, _addr = sock.recvmsg(2048, socket.CMSG_SPACE(4))
        except BlockingIOError:
            return seen
        for level, kind, value in ancillary:
            if level == socket.IPPROTO_IP and kind == socket.IP_TTL:
                seen.add(int.from_bytes(value[:4], sys.byteorder))


@pytest.mark.parametrize(("rule_ttl", "global_ttl", "expected"), [(9, 4, 9), (None, 4, 4)])
async def test_multicast_ttl_from_the_rule_or_the_audio_section(
    daemon_runner: DaemonRunner,
    phones: Fleet,
    tmp_path: Path,
    rule_ttl: int | None,
    global_ttl: int,
    expected: int,
) -> None:
    port = free_rtp_port(HOSTS)
    group = f"239.10.{random.randrange(256)}.{random.randrange(1, 255)}"
    audio: dict[str, Any] = {
        "file": str(_wav(tmp_path / "a.wav", 0.2)),
        "multicast": f"{group}:{port}",
    }
    if rule_ttl is not None:
        audio["multicast_ttl"] = rule_ttl
    config = _config(phones, port, audio)
    config["audio"]["multicast_ttl"] = global_ttl
    with _ttl_listener(group, port) as listener:
        running = await daemon_runner.start(config)
        await _fire(daemon_runner, running, {})
        assert _ttls(listener) == {expected}


def test_multicast_ttl_defaults_to_one_and_is_checked(tmp_path: Path) -> None:
    data = {
        "phones": [{"name": "a", "host": "127.0.0.2"}],
        "rules": [{"name": "r", "on": "webhook:x", "to": "a", "audio": {"say": "hi"}}],
    }
    (action,) = compile_actions(DaemonRunner(tmp_path).config(data)).values()
    assert action.multicast_ttl == 1
    for ttl in (0, 256):
        with pytest.raises(ConfigError, match=r"audio\.multicast_ttl: "):
            DaemonRunner(tmp_path).config({**data, "audio": {"multicast_ttl": ttl}})
        rule = {**data["rules"][0], "audio": {"say": "hi", "multicast_ttl": ttl}}  # type: ignore[dict-item]
        with pytest.raises(ConfigError, match=r"rules\[r\]\.audio\.multicast_ttl: "):
            DaemonRunner(tmp_path).config({**data, "rules": [rule]})


async def test_a_phone_that_refuses_is_reported_and_the_others_hear_the_page(
    daemon_runner: DaemonRunner,
    phones: Fleet,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_rtp_port(HOSTS)
    lobby, office, hall = phones.phones
    await office.set_fault("error", number=6)
    running = await daemon_runner.start(
        _config(phones, port, {"file": str(_wav(tmp_path / "a.wav", 0.3))})
    )
    with caplog.at_level(logging.WARNING, logger="phonepush.announce"):
        event = await _fire(daemon_runner, running, {})

    for phone in (lobby, hall):
        (heard,) = phone.rtp_status()["history"]
        assert heard["packets"] == 15 and heard["clean"] is True
    assert office.rtp_status()["history"] == []
    assert office.state.pushes == 2  # asked to listen, once more after "busy", never told to stop
    rows = await _audio_rows(running, event)
    assert rows["lobby"] == rows["hall"] == ("delivered", "")
    state, error = rows["office"]
    assert state == "failed" and "would not listen" in error
    assert (
        daemon_runner.metric("phonepush_audio_pages_total", rule="evacuate", result="partial") == 1
    )
    assert daemon_runner.metric("phonepush_deliveries_total", phone="office", result="failed") == 1
    assert any("office" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)


async def test_nothing_is_streamed_after_the_ttl(
    daemon_runner: DaemonRunner, phones: Fleet, tmp_path: Path
) -> None:
    port = free_rtp_port(HOSTS)
    audio = {"file": str(_wav(tmp_path / "long.wav", 3.0))}
    running = await daemon_runner.start(_config(phones, port, audio, ttl="1s"))
    await _fire(daemon_runner, running, {})
    for heard in _heard(phones):
        assert 0 < heard["duration_s"] <= 1.0


async def test_stopping_the_daemon_cuts_the_page_and_it_is_not_replayed(
    daemon_runner: DaemonRunner, phones: Fleet, tmp_path: Path
) -> None:
    port = free_rtp_port(HOSTS)
    data = _config(phones, port, {"file": str(_wav(tmp_path / "long.wav", 30.0))})
    running = await daemon_runner.start(data)
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        answer = await client.post("/hooks/alarm", json={})
    event = answer.json()["event"]
    await phones.wait_for(lambda: all(p.rtp_status()["packets"] > 10 for p in phones.phones))
    await daemon_runner.stop()

    for phone in phones.phones:
        status = phone.rtp_status()
        assert status["active"] is False and status["ended_by"] == "RTPRx:Stop"
        assert status["duration_s"] < 30
    running = await daemon_runner.start(data)
    assert await _audio_rows(running, event) == {
        name: ("expired", "the daemon stopped during the audio page") for name in NAMES
    }
    assert all(len(p.rtp_status()["history"]) == 1 for p in phones.phones)


async def test_audio_left_pending_by_a_crash_is_expired_at_start(
    daemon_runner: DaemonRunner, phones: Fleet
) -> None:
    port = free_rtp_port(HOSTS)
    data = _config(phones, port, {"say": "Evacuate"})
    event = Event("webhook", "alarm", b"{}", {}, "0" * 26, time.time())
    async with Spool(daemon_runner.spool) as spool:
        # What a daemon killed mid-page leaves: the audio rows still pending.
        await commit_event(
            spool,
            event,
            rules=["evacuate"],
            deliveries=[NewDelivery("evacuate", name, (), time.time() + 300) for name in NAMES],
            pages={},
            cooldowns=[],
        )
    running = await daemon_runner.start(data)
    assert await _audio_rows(running, event.id) == {
        name: ("expired", "interrupted by a restart; audio is not replayed") for name in NAMES
    }
    assert all(p.state.pushes == 0 for p in phones.phones)
    assert running.spool.pending_count() == 0


async def test_a_missing_file_stops_start_up_naming_the_key(
    daemon_runner: DaemonRunner, phones: Fleet, tmp_path: Path
) -> None:
    data = _config(phones, 20480, {"file": str(tmp_path / "nope.wav")})
    with pytest.raises(ConfigError, match=r"rules\[evacuate\]\.audio\.file: "):
        await daemon_runner.start(data)
    assert all(p.state.pushes == 0 for p in phones.phones)


def test_relative_files_are_found_next_to_the_config(tmp_path: Path) -> None:
    _wav(tmp_path / "chime.wav", 0.1, 8000)
    config = DaemonRunner(tmp_path).config(
        {
            "phones": [{"name": "a", "host": "127.0.0.2"}],
            "rules": [
                {
                    "name": "r",
                    "on": "webhook:x",
                    "to": "a",
                    "audio": {"say": "hello", "chime": "chime.wav", "repeat": 3},
                }
            ],
        }
    )
    (action,) = compile_actions(config, base_dir=tmp_path).values()
    assert action.chime == load_file(tmp_path / "chime.wav")
    assert action.repeat == 3 and action.multicast is None and action.body is None
    with pytest.raises(ConfigError, match=r"rules\[r\]\.audio\.chime"):
        compile_actions(config, base_dir=tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("audio", "rule", "message"),
    [
        ({"say": "a", "file": "b.wav"}, {}, "audio: give either say"),
        ({}, {}, "audio: give either say"),
        ({"say": "a", "multicast": "10.0.0.1:20480"}, {}, "audio.multicast: "),
        ({"say": "a", "multicast": "239.1.1.1:20481"}, {}, "audio.multicast: "),
        ({"say": "a", "volume": 101}, {}, "audio.volume: "),
        ({"say": "a"}, {"repeat": "1m"}, "audio: a rule with audio cannot"),
        ({"say": "a"}, {"group_wait": "10s"}, "audio: a rule with audio cannot"),
        ({"say": "{{ payload.zone"}, {}, "audio.say: "),
    ],
)
def test_bad_audio_settings_are_refused(
    tmp_path: Path, audio: dict[str, Any], rule: dict[str, Any], message: str
) -> None:
    data = {
        "phones": [{"name": "a", "host": "127.0.0.2"}],
        "rules": [{"name": "r", "on": "webhook:x", "to": "a", "audio": audio, **rule}],
    }
    with pytest.raises(ConfigError) as caught:
        DaemonRunner(tmp_path).config(data)
    assert f"rules[r].{message}" in str(caught.value)


def test_an_odd_audio_port_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"audio\.port: .*even"):
        DaemonRunner(tmp_path).config({"audio": {"port": 20481}})
