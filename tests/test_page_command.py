"""``phonepush page`` and :func:`phonepush.audio.paging.page` end to end: simulated phones take the
push, real RTP receivers on the phones' own loopback addresses take the audio (the phones' own RTP
listeners are off: ``rtp=False``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from _sim_fixtures import MakeFleet, tone_wav
from phonepush import cli
from phonepush.audio.paging import PageSettings, PageTarget, page
from phonepush.audio.rtp import RtpReceiver
from phonepush.commands import page as page_command
from phonepush.errors import AudioError, InvalidURI, PhoneRejected
from phonepush.sim.simulator import Fleet, SimPhone

HOSTS = ("127.0.0.2", "127.0.0.3")
GROUP = "239.10.0.7"


@contextlib.asynccontextmanager
async def _receivers(group: str | None = None) -> AsyncIterator[tuple[int, list[RtpReceiver]]]:
    """One receiver per phone address, on a free even port phones accept (20480-32768)."""
    for _ in range(50):
        port = random.randrange(20480, 32768, 2)
        async with contextlib.AsyncExitStack() as stack:
            try:
                receivers = [
                    await stack.enter_async_context(RtpReceiver(host, port, group=group))
                    for host in HOSTS
                ]
            except AudioError:
                continue
            yield port, receivers
            return
    raise RuntimeError("no free RTP port")


def _items(phone: SimPhone) -> list[str]:
    return [item["url"] for record in phone.state.requests for item in record["items"]]


def _host_args(fleet: Fleet) -> str:
    return ",".join(phone.address for phone in fleet.phones)


async def _run(argv: list[str]) -> int:
    # The command runs its own event loop (asyncio.run), so it gets a thread of its own.
    return await asyncio.to_thread(cli.main, ["page", *argv])


async def test_page_a_file_to_two_phones(
    make_fleet: MakeFleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = await make_fleet(phones=2, hosts=HOSTS, rtp=False)
    audio = tone_wav(tmp_path / "evacuate.wav", 0.5, rate=16000, hz=500, amplitude=12000)
    async with _receivers() as (port, receivers):
        status = await _run(
            ["-h", _host_args(fleet), "--file", str(audio), "--port", str(port), "--volume", "80"]
        )
        assert status == 0
        for phone, receiver in zip(fleet.phones, receivers, strict=True):
            async with asyncio.timeout(2):
                await receiver.wait_for(25)
            assert _items(phone) == [f"RTPRx:127.0.0.1:{port}:80", "RTPRx:Stop"]
            assert phone.state.rtp["receive"] is None  # stopped again
            stats = receiver.stats
            assert stats.packets == 25
            assert stats.clean
            assert stats.duration_s == pytest.approx(0.5)
            assert stats.level_dbfs > -20
            assert stats.sender is not None and stats.sender[0] == "127.0.0.1"
    out = capsys.readouterr().out
    assert f"{fleet.phones[0].address}: listening (RTPRx:127.0.0.1:{port}:80)" in out
    assert "Streamed 0.50 s (25 packets) to 2 phones" in out


async def test_a_phone_that_refuses_is_reported_and_the_other_still_hears_the_page(
    make_fleet: MakeFleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = await make_fleet(phones=2, hosts=HOSTS, rtp=False)
    refusing, healthy = fleet.phones
    await refusing.set_fault("error", number=6)
    audio = tone_wav(tmp_path / "a.wav", 0.3, rate=16000, hz=500, amplitude=12000)
    async with _receivers() as (port, (silent, hearing)):
        status = await _run(["-h", _host_args(fleet), "--file", str(audio), "--port", str(port)])
        assert status == 1
        assert _items(healthy) == [f"RTPRx:127.0.0.1:{port}", "RTPRx:Stop"]
        async with asyncio.timeout(2):
            await hearing.wait_for(15)
        assert hearing.stats.packets == 15 and hearing.stats.clean
        assert silent.stats.packets == 0
    # The refusing phone was asked once (to listen) and never told to stop.
    assert refusing.state.pushes == 1
    captured = capsys.readouterr()
    assert f"{refusing.address}: failed: Error: " in captured.err
    assert f"{healthy.address}: listening" in captured.out


async def test_page_over_multicast(make_fleet: MakeFleet, tmp_path: Path) -> None:
    fleet = await make_fleet(phones=2, hosts=HOSTS, rtp=False)
    audio = tone_wav(tmp_path / "m.wav", 0.3, rate=16000, hz=500, amplitude=12000)
    async with _receivers(group=GROUP) as (port, receivers):
        argv = ["-h", _host_args(fleet), "--file", str(audio), "--multicast", f"{GROUP}:{port}"]
        assert await _run(argv) == 0
        for phone, receiver in zip(fleet.phones, receivers, strict=True):
            assert _items(phone) == [f"RTPMRx:{GROUP}:{port}", "RTPRx:Stop"]
            async with asyncio.timeout(2):
                await receiver.wait_for(15)
            assert receiver.stats.packets == 15
            assert receiver.stats.clean


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None and not os.environ.get("CI"),
    reason="espeak-ng is not installed (apt-get install espeak-ng); required in CI",
)
async def test_page_says_text_with_a_chime_twice(make_fleet: MakeFleet, tmp_path: Path) -> None:
    fleet = await make_fleet(phones=1, hosts=HOSTS[:1], rtp=False)
    chime = tmp_path / "chime.ulaw"
    chime.write_bytes(b"\x80\x00" * 800)  # 0.2 s of a loud square wave
    async with _receivers() as (port, (receiver, _)):
        argv = ["-h", _host_args(fleet), "--say", "Fire drill", "--port", str(port)]
        assert await _run([*argv, "--chime", str(chime), "--repeat", "2"]) == 0
        stats = receiver.stats
    assert stats.clean
    # Chime, a pause, the words twice with a second between them.
    assert stats.duration_s > 0.2 + 0.5 + 2 * 0.5 + 1.0
    assert receiver.audio.startswith(b"\x80\x00" * 800)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--say", "hi"], "No host specified"),
        (["-h", "127.0.0.2"], "exactly one of --say"),
        (["-h", "127.0.0.2", "--say", "a", "--file", "b"], "exactly one of --say"),
        (["-h", "127.0.0.2", "--say", "a", "--volume", "101"], "Invalid volume"),
        (["-h", "127.0.0.2", "--say", "a", "--multicast", "239.1.1.1"], "Invalid multicast"),
        (["-h", "not a host", "--say", "a"], "Invalid host"),
        (["-h", "127.0.0.2", "--file", "/nonexistent.wav"], "Cannot read"),
        (["-h", "127.0.0.2", "--say", "a", "--bogus"], "Option --bogus not recognized"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert page_command.main(argv) == 1
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


async def test_an_invalid_port_is_refused_before_any_push(
    make_fleet: MakeFleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = await make_fleet(phones=1, hosts=HOSTS[:1], rtp=False)
    audio = tone_wav(tmp_path / "a.wav", 0.1, rate=16000, hz=500, amplitude=12000)
    status = await _run(["-h", _host_args(fleet), "--file", str(audio), "--port", "20481"])
    assert status == 1
    assert "port must be even" in capsys.readouterr().err
    assert fleet.phones[0].state.pushes == 0


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["page", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--say", "--file", "--multicast", "--volume", "--port", "--source", "--repeat"):
        assert option in out


# --- paging.page() with the daemon's kind of push callable ----------------------------------


async def test_a_cancelled_page_still_stops_the_phones() -> None:
    pushed: list[tuple[str, str]] = []

    async def push(target: PageTarget, uri: str) -> None:
        pushed.append((target.name, uri))

    settings = PageSettings(source="127.0.0.1", lead_in_s=0)
    targets = [PageTarget("a", "127.0.0.2"), PageTarget("b", "127.0.0.3")]
    task = asyncio.create_task(page(targets, b"\xff" * 8000 * 10, push=push, settings=settings))
    while len(pushed) < 2:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(pushed[2:]) == [("a", "RTPRx:Stop"), ("b", "RTPRx:Stop")]


async def test_page_reports_each_phone_and_skips_unresolvable_ones() -> None:
    pushed: list[tuple[str, str]] = []

    async def push(target: PageTarget, uri: str) -> None:
        pushed.append((target.name, uri))
        if target.name == "busy":
            raise PhoneRejected(6, phone=target.name)

    targets = [
        PageTarget("ok", "127.0.0.2"),
        PageTarget("busy", "127.0.0.3"),
        PageTarget("nowhere", "no-such-host.invalid"),
    ]
    # The source may be a name (the daemon defaults to its public URL's host).
    settings = PageSettings(source="localhost", port=20482, volume=50, lead_in_s=0)
    report = await page(targets, b"\xff" * 800, push=push, settings=settings)
    assert report.uri == "RTPRx:127.0.0.1:20482:50"
    assert [(r.target.name, r.started, r.stopped) for r in report.results] == [
        ("ok", True, True),
        ("busy", False, False),
        ("nowhere", False, False),
    ]
    assert "Cannot resolve no-such-host.invalid" in report.results[2].error
    assert report.destinations == (("127.0.0.2", 20482),)
    assert report.stream is not None and report.stream.packets == 5
    assert not report.ok
    assert ("nowhere", "RTPRx:127.0.0.1:20482:50") not in pushed
    assert ("busy", "RTPRx:Stop") not in pushed


async def test_invalid_settings_fail_before_any_push() -> None:
    async def push(target: PageTarget, uri: str) -> None:
        raise AssertionError("no push expected")

    with pytest.raises(InvalidURI, match="multicast group"):
        await page(
            [PageTarget("a", "127.0.0.2")],
            b"\xff" * 160,
            push=push,
            settings=PageSettings(source="127.0.0.1", multicast="224.0.1.1"),
        )
