"""Attacks on what the daemon stores (issue "hostile input, round two", findings 2, 7, 12, 15):
oversized MQTT payloads, credential headers and file modes, symbolic links and unwritable
spool paths, and a spool that grows without bound. Real mosquitto, the real daemon, real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually, free_port
from _mqtt_fixtures import Broker
from _sim_fixtures import MakeFleet
from phonepush.app.systemd import state_directories
from phonepush.errors import SpoolError
from phonepush.events import Event
from phonepush.store.commit import commit_event
from phonepush.store.housekeeping import Housekeeper
from phonepush.store.spool import NewDelivery, PushRequest, Spool

PHONEPUSH = Path(sys.executable).with_name("phonepush")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- finding 2: MQTT payloads were unbounded ------------------------------------------------------


async def test_finding_2_oversized_mqtt_payload_is_acked_not_stored(
    daemon_runner: DaemonRunner,
    mosquitto: Broker,
    make_fleet: MakeFleet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = await make_fleet(phones=1, names=["desk"], tone_ms=10)
    config = {
        "mqtt": {"url": mosquitto.url, "client_id": "finding-2"},
        "phones": [{"name": "desk", "host": fleet.phones[0].address}],
        "rules": [
            {
                "name": "bell",
                "on": "mqtt:door/#",
                "to": ["desk"],
                "message": {"title": "Door", "text": "{{ payload.who }}"},
            }
        ],
    }
    running = await daemon_runner.start(config)
    big = json.dumps({"who": "x" * 100_000})  # over the 64 KiB default, under the packet cap
    huge = b"y" * 10_000_000  # over the 1 MiB Maximum Packet Size asked of the broker
    with caplog.at_level(logging.WARNING, logger="phonepush.mqtt"):
        for _ in range(3):
            await asyncio.to_thread(mosquitto.publish, "door/big", big)
        await asyncio.to_thread(mosquitto.publish, "door/huge", huge)
        await asyncio.to_thread(mosquitto.publish, "door/front", json.dumps({"who": "Ann"}))
        await eventually(lambda: fleet.phones[0].state.screen.text == "Ann")
        await eventually(
            lambda: (
                daemon_runner.metric(
                    "phonepush_events_rejected_total", source="mqtt", reason="too_large"
                )
                == 3
            )
        )
    # The 10 MB message never reached us: the broker dropped it for our packet size.
    await eventually(lambda: "Dropping too large outgoing PUBLISH" in mosquitto.log_text)
    notes = [r for r in caplog.records if "mqtt.max_payload" in r.getMessage()]
    assert len(notes) == 1, [r.getMessage() for r in notes]  # once per topic per minute
    assert "door/big" in notes[0].getMessage()
    stored = await running.spool.events.recent(10)
    assert [e.topic for e in stored] == ["door/front"]
    assert fleet.phones[0].state.pushes == 1

    # Acknowledged, so a restart on the same session gets none of them again.
    await daemon_runner.stop()
    running = await daemon_runner.start(config)
    await asyncio.to_thread(mosquitto.publish, "door/front", json.dumps({"who": "Bob"}))
    await eventually(lambda: fleet.phones[0].state.screen.text == "Bob")
    assert [e.topic for e in await running.spool.events.recent(10)] == ["door/front", "door/front"]
    assert (
        daemon_runner.metric("phonepush_events_rejected_total", source="mqtt", reason="too_large")
        == 0
    )


async def test_finding_2_oversized_payload_over_mqtt_3_is_acked_not_stored(
    daemon_runner: DaemonRunner, mosquitto: Broker
) -> None:
    """MQTT 3.1.1 has no Maximum Packet Size: the whole message reaches paho, and the size check
    alone keeps it out (the broker's max_packet_size is what bounds memory there)."""
    config = {
        "mqtt": {"url": mosquitto.url, "client_id": "finding-2-v3", "protocol": "3.1.1"},
        "rules": [{"name": "all", "on": "mqtt:v3/#", "to": ["all"], "execute": ["Key:1"]}],
    }
    running = await daemon_runner.start(config)

    async def stored(count: int) -> bool:
        return len(await running.spool.events.recent(5)) == count

    await asyncio.to_thread(mosquitto.publish, "v3/big", b"z" * 2_000_000)
    await asyncio.to_thread(mosquitto.publish, "v3/small", b"{}")
    await eventually(lambda: stored(1))
    await eventually(
        lambda: (
            daemon_runner.metric(
                "phonepush_events_rejected_total", source="mqtt", reason="too_large"
            )
            == 1
        )
    )
    assert [e.topic for e in await running.spool.events.recent(5)] == ["v3/small"]
    await daemon_runner.stop()
    running = await daemon_runner.start(config)
    await asyncio.to_thread(mosquitto.publish, "v3/small", b"{}")
    await eventually(lambda: stored(2))
    assert (
        daemon_runner.metric("phonepush_events_rejected_total", source="mqtt", reason="too_large")
        == 0
    )


async def test_finding_2_too_large_notes_are_bounded_across_many_topics(
    daemon_runner: DaemonRunner, mosquitto: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood of oversized messages on distinct topics: every one counted, one line per topic
    for the first 1,024 topics remembered, then one shared line a minute for the rest."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    await daemon_runner.start(
        {
            "mqtt": {"url": mosquitto.url, "client_id": "finding-2-flood", "max_payload": 10},
            "rules": [{"name": "all", "on": "mqtt:flood/#", "to": ["all"], "execute": ["Key:1"]}],
        }
    )
    topics = 1100

    def flood() -> None:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="flooder", protocol=MQTTProtocolVersion.MQTTv5
        )
        client.connect(mosquitto.host, mosquitto.port)
        client.loop_start()
        try:
            infos = [client.publish(f"flood/{i}", b"x" * 11, qos=1) for i in range(topics)]
            for info in infos:
                info.wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()

    with caplog.at_level(logging.WARNING, logger="phonepush.mqtt"):
        await asyncio.to_thread(flood)
        await eventually(
            lambda: (
                daemon_runner.metric(
                    "phonepush_events_rejected_total", source="mqtt", reason="too_large"
                )
                == topics
            ),
            timeout=30,
        )
    notes = [r for r in caplog.records if "mqtt.max_payload" in r.getMessage()]
    assert len(notes) == 1024 + 1


# --- finding 7: credential headers stored 7 days, spool files 0644 -------------------------------


async def test_finding_7_credential_headers_not_stored_and_spool_files_private(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=1, names=["desk"], tone_ms=10)
    old_umask = os.umask(0o022)  # what a shell outside the systemd unit has
    try:
        running = await daemon_runner.start(
            {
                "phones": [{"name": "desk", "host": fleet.phones[0].address}],
                "rules": [
                    {
                        "name": "ci",
                        "on": "webhook:ci",
                        # Rules still see every header: the allow-list is about storage.
                        "when": "headers['x-api-key'] == 'k-SECRET-1'",
                        "to": ["desk"],
                        "message": {"title": "CI", "text": "{{ headers['x-github-event'] }}"},
                    }
                ],
            }
        )
    finally:
        os.umask(old_umask)
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        answer = await client.post(
            "/hooks/ci",
            json={"ok": True},
            headers={
                "X-Api-Key": "k-SECRET-1",
                "X-Gitlab-Token": "g-SECRET-2",
                "Cookie": "session=c-SECRET-3",
                "X-My-Auth-Signature": "s-SECRET-4",
                "X-GitHub-Event": "push",
                "User-Agent": "GitHub-Hookshot/abc",
            },
        )
    assert answer.status_code == 202, answer.text
    event_id = answer.json()["event"]
    assert answer.json()["rules"] == ["ci"]
    await eventually(lambda: fleet.phones[0].state.screen.text == "push")
    record = await running.spool.events.get(event_id)
    assert record is not None
    assert dict(record.headers) == {
        "content-type": "application/json",
        "user-agent": "GitHub-Hookshot/abc",
        "x-github-event": "push",
    }
    spool = daemon_runner.spool
    files = [spool, spool.with_name("spool.db-wal"), spool.with_name("spool.db-shm")]
    raw = b"".join(f.read_bytes() for f in files if f.exists())
    assert b"SECRET" not in raw
    for f in files:
        assert f.exists(), f
        assert _mode(f) == 0o600, (f, oct(_mode(f)))
    assert _mode(spool.parent) != 0  # the test's own folder: left as it was

    # A spool made 0644 by an older phonepush is narrowed when it is next opened.
    await daemon_runner.stop()
    for f in files:
        if f.exists():
            f.chmod(0o644)
    await daemon_runner.start({"rules": [], "phones": []})
    for f in files:
        if f.exists():
            assert _mode(f) == 0o600, (f, oct(_mode(f)))


async def test_finding_7_spool_folder_created_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "spool.db"
    old_umask = os.umask(0o022)
    try:
        async with Spool(path):
            pass
    finally:
        os.umask(old_umask)
    assert _mode(path.parent) == 0o700 and _mode(path.parent.parent) == 0o700
    assert _mode(path) == 0o600


# --- finding 12: symbolic links followed, tracebacks for unwritable paths ------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder anyone can read (pytest's tmp_path is 0700): for runs as another user."""
    directory = Path(tempfile.mkdtemp(prefix="phonepush-finding12-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run(
    config_dir: Path, spool: Path, *, as_nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    config = config_dir / "phonepush.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{free_port()}"\n'
        f"[spool]\npath = {json.dumps(str(spool))}\n"
        "[webhook]\nallow_anonymous = true\n"
    )
    config.chmod(0o644)
    prefix: list[str] = []
    if as_nobody:
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("needs root and setpriv to run the daemon as another user")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    return subprocess.run(
        [*prefix, str(PHONEPUSH), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PHONEPUSH_CONFIG": str(config)},
    )


def _one_clear_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    # "FILE: invalid configuration:" then the one line naming the key, as for every config error
    assert len(lines) == 2 and lines[0].endswith("invalid configuration:"), result.stderr
    assert lines[1].startswith("spool.path: "), result.stderr
    for word in words:
        assert word in lines[1], result.stderr
    return lines[1]


def test_finding_12_symlinked_spool_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "victim.db"
    target.parent.mkdir()
    link = tmp_path / "spool.db"
    link.symlink_to(target)
    _one_clear_error(_run(tmp_path, link), "symbolic link", "spool.follow_symlinks")
    assert not target.exists()

    # A link to an existing file is refused the same way, and the file is left alone.
    target.write_bytes(b"not a database")
    _one_clear_error(_run(tmp_path, link), "symbolic link")
    assert target.read_bytes() == b"not a database"


def test_finding_12_symlinked_spool_folder_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "state").symlink_to(real)
    _one_clear_error(_run(tmp_path, tmp_path / "state" / "spool.db"), "symbolic link")
    assert list(real.iterdir()) == []


async def test_finding_12_follow_symlinks_opens_the_target(tmp_path: Path) -> None:
    target = tmp_path / "real" / "spool.db"
    target.parent.mkdir()
    link = tmp_path / "spool.db"
    link.symlink_to(target)
    async with Spool(link, follow_symlinks=True) as spool:
        await spool.check()
    assert target.exists() and _mode(target) == 0o600


async def test_finding_12_the_service_managers_state_directory_link_is_taken(
    tmp_path: Path,
) -> None:
    # systemd's StateDirectory= under DynamicUser= is a root-owned link to private/<name>, named
    # in $STATE_DIRECTORY: the shipped unit's spool lives behind it.
    (tmp_path / "private" / "phonepush").mkdir(parents=True)
    state = tmp_path / "phonepush"
    state.symlink_to("private/phonepush")
    if state.lstat().st_uid != 0:
        pytest.skip("needs root: only a root-owned link is trusted")
    assert state_directories({"STATE_DIRECTORY": f"{state}:/elsewhere"})[0] == state
    async with Spool(state / "spool.db", trusted_links=[state]) as spool:
        await spool.check()
    assert (tmp_path / "private" / "phonepush" / "spool.db").exists()

    # Not named: refused as any other link. Named but not root's: refused too.
    with pytest.raises(SpoolError, match="symbolic link"):
        async with Spool(state / "spool.db"):
            pass
    os.lchown(state, 65534, 65534)
    with pytest.raises(SpoolError, match="symbolic link"):
        async with Spool(state / "spool.db", trusted_links=[state]):
            pass


def test_finding_12_read_only_folder_is_one_clear_error(open_dir: Path) -> None:
    # Owned by root, 0755: read-only for the user the daemon runs as.
    locked = open_dir / "locked"
    locked.mkdir(mode=0o755)
    line = _one_clear_error(_run(open_dir, locked / "spool.db", as_nobody=True), "cannot create")
    assert str(locked / "spool.db") in line
    # A missing folder under it cannot be created either.
    _one_clear_error(_run(open_dir, locked / "sub" / "spool.db", as_nobody=True), "cannot create")


def test_finding_12_unwritable_spool_file_is_one_clear_error(open_dir: Path) -> None:
    spool = open_dir / "spool.db"
    spool.write_bytes(b"")
    spool.chmod(0o644)  # root's, readable but not writable by the daemon's user
    _one_clear_error(_run(open_dir, spool, as_nobody=True))


# --- finding 15: storage bounded neither in time nor in size -------------------------------------


def _filler(i: int, payload: bytes) -> tuple[Event, list[NewDelivery], dict[str, str]]:
    event = Event("webhook", "fill", payload, {}, id=f"fill-{i:06d}", received_at=1000.0 + i)
    finished = NewDelivery(
        "fill", "desk", (PushRequest("execute", "<x/>"),), 2000.0 + i, "suppressed", "test"
    )
    return event, [finished], {f"page-{i:06d}": "<CiscoIPPhoneText/>" * 20}


class _Poller:
    """GET /healthz back to back from a thread, recording each answer and how long it took."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[int | str] = []
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def __aenter__(self) -> _Poller:
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        # Joined off the event loop: the daemon under test runs on it and must answer the
        # request in flight, or that request waits for its timeout and counts as unanswered.
        await asyncio.to_thread(self._thread.join, 10)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    answer: int | str = client.get(self.url + "/healthz").status_code
                except httpx.HTTPError as exc:
                    answer = repr(exc)
                self.latencies.append(time.perf_counter() - started)
                self.answers.append(answer)


@pytest.mark.slow
async def test_finding_15_full_spool_evicts_finished_rows_keeps_pending_and_answers(
    daemon_runner: DaemonRunner, mosquitto: Broker
) -> None:
    gone = f"127.0.0.1:{free_port()}"  # nothing listens: deliveries there stay pending
    running = await daemon_runner.start(
        {
            "mqtt": {"url": mosquitto.url, "client_id": "finding-15"},
            "spool": {"path": str(daemon_runner.spool), "max_size": 256 << 20},
            "phones": [{"name": "gone", "host": gone, "timeout": "1s"}],
            "dispatch": {"retry_initial": "5s", "retry_max": "30s"},
            "rules": [
                {"name": "work", "on": "webhook:work", "to": ["gone"], "ttl": "1h",
                 "execute": ["Play:Chime.raw"]},
                {"name": "fill", "on": "webhook:fill", "when": "false", "to": ["gone"],
                 "execute": ["Play:Chime.raw"]},
                {"name": "bus", "on": "mqtt:work", "to": ["gone"], "ttl": "1h",
                 "execute": ["Play:Chime.raw"]},
            ],
        }
    )  # fmt: skip
    spool, housekeeper = running.spool, running.housekeeper
    assert housekeeper is not None
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        work = []
        for i in range(20):
            answer = await client.post("/hooks/work", json={"n": i})
            assert answer.status_code == 202, answer.text
            work.append(answer.json()["event"])
    assert spool.pending_count() == 20

    # Finished events, older than the pending work, as months of traffic would leave them.
    payload = os.urandom(3000)
    fillers = 6000
    for i in range(fillers):
        event, deliveries, pages = _filler(i, payload)
        await commit_event(
            spool, event, rules=["fill"], deliveries=deliveries, pages=pages, cooldowns=()
        )
        if i % 200 == 0:
            await asyncio.sleep(0)
    before = await spool.live_bytes()
    assert before > 20 << 20

    limit = 4 << 20
    async with _Poller(daemon_runner.url) as poller:
        await asyncio.sleep(0.2)
        # As a reload with a smaller spool.max_size does:
        housekeeper.max_size = spool.max_size = limit

        async def evicted() -> bool:
            return await spool.live_bytes() <= limit

        await eventually(evicted, timeout=120)
        await asyncio.sleep(0.2)
    after = await spool.live_bytes()

    # Every /healthz answered, all through the eviction.
    assert poller.answers and set(poller.answers) == {200}, set(poller.answers)
    print(
        f"\nfinding 15: evicted {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB;"
        f" {len(poller.answers)} /healthz answers, longest {max(poller.latencies) * 1000:.1f} ms;"
        f" longest purge batch {housekeeper.longest_batch * 1000:.2f} ms,"
        f" batch size now {housekeeper.batch}"
    )
    # Oldest finished first, pending work kept whole.
    assert await spool.events.get("fill-000000") is None
    assert await spool.events.get(f"fill-{fillers - 1:06d}") is not None
    assert spool.pending_count() == 20
    for event_id in work:
        record = await spool.events.get(event_id)
        assert record is not None and [d.state for d in record.deliveries] == ["pending"]
    assert daemon_runner.metric("phonepush_spool_bytes") >= after

    # Pending work alone over the limit: intake is refused (503), nothing is dropped ...
    housekeeper.max_size = spool.max_size = 16 * 1024
    await eventually(lambda: spool.full, timeout=10)
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        answer = await client.post("/hooks/work", json={"n": "refused"})
        assert answer.status_code == 503 and "Retry-After" in answer.headers, answer.text
        assert spool.pending_count() == 20
        assert (
            daemon_runner.metric(
                "phonepush_events_rejected_total", source="webhook", reason="spool_full"
            )
            == 1
        )
        # MQTT: left unacknowledged (no PUBACK) and retried, not dropped.
        await asyncio.to_thread(mosquitto.publish, "work", b'{"n": "mqtt"}')
        await eventually(
            lambda: (
                daemon_runner.metric(
                    "phonepush_events_rejected_total", source="mqtt", reason="spool_full"
                )
                >= 1
            )
        )
        assert spool.pending_count() == 20
        # ... until there is room again.
        housekeeper.max_size = spool.max_size = 256 << 20
        await eventually(lambda: not spool.full, timeout=10)
        answer = await client.post("/hooks/work", json={"n": "taken"})
        assert answer.status_code == 202, answer.text
    await eventually(lambda: spool.pending_count() == 22, timeout=15)
    assert {(e.source, e.topic) for e in await spool.events.recent(2)} == {
        ("mqtt", "work"),
        ("webhook", "work"),
    }


async def test_finding_15_retention_purges_finished_events_only(tmp_path: Path) -> None:
    now = 1_000_000.0
    async with Spool(tmp_path / "spool.db", clock=lambda: now) as spool:
        pending = NewDelivery("r", "desk", (PushRequest("execute", "<x/>"),), now + 3600)
        done = NewDelivery("r", "desk", (), now, "suppressed", "test")
        ages = {"old-done": 8 * 86400, "old-pending": 8 * 86400, "new-done": 6 * 86400}
        for name, age in ages.items():
            await commit_event(
                spool,
                Event("webhook", "x", b"{}", {}, id=name, received_at=now - age),
                rules=["r"],
                deliveries=[pending if "pending" in name else done],
                pages={},
                cooldowns=[("r", name, now - age + 60)],
            )
        keeper = Housekeeper(spool, retention=7 * 86400, max_size=None, clock=lambda: now)
        await keeper.tidy()
        assert await spool.events.get("old-done") is None
        assert await spool.events.get("old-pending") is not None
        assert await spool.events.get("new-done") is not None
        assert not await spool.events.in_cooldown("r", "old-done", now - 9 * 86400)
        assert await spool.events.in_cooldown("r", "new-done", now - 6 * 86400)


async def test_finding_15_purge_batches_stay_small(tmp_path: Path) -> None:
    """The batch adapts to the time one transaction takes; purging in batches removes exactly
    what one big purge would."""
    async with Spool(tmp_path / "spool.db") as spool:
        payload = b"z" * 2000
        for i in range(3000):
            event, deliveries, pages = _filler(i, payload)
            await commit_event(
                spool, event, rules=["fill"], deliveries=deliveries, pages=pages, cooldowns=()
            )
        keeper = Housekeeper(spool, retention=86400, max_size=None)
        removed = await keeper.purge(1000.0 + 2500)  # events 0..2499
        assert removed == 2500
        assert (
            await spool.events.get("fill-002499") is None
            and await spool.events.get("fill-002500") is not None
        )
        assert 1 <= keeper.batch <= 2048
        assert math.isfinite(keeper.longest_batch)
