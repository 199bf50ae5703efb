"""The spool on real SQLite files: what intake commits is there after a close, a crash or a full
disk, and nothing a failed call attempted is half there.

Making a file unwritable as root: root ignores permission bits, so these tests use mechanisms root
cannot override. A full disk is a real, small tmpfs filled with a filler file (ENOSPC); a directory
nothing may be created in is ``chattr +i``. Both need privileges (mount, CAP_LINUX_IMMUTABLE) and
are skipped, saying why, where they are not available.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from _pg_fixtures import OpenStore
from phonepush.errors import SpoolError, SpoolFull
from phonepush.events import Event
from phonepush.metrics import Metrics
from phonepush.store.commit import commit_event
from phonepush.store.interface import Store
from phonepush.store.spool import (
    SCHEMA_VERSION,
    Delivery,
    DeliveryState,
    NewDelivery,
    PushRequest,
    Spool,
)

EXECUTE = PushRequest(
    "execute",
    '<?xml version="1.0" encoding="UTF-8"?><CiscoIPPhoneExecute>'
    '<ExecuteItem URL="Play:Chime.raw"/></CiscoIPPhoneExecute>',
)
BACKGROUND = PushRequest(
    "background",
    '<?xml version="1.0" encoding="UTF-8"?><setBackground><background>'
    "<image>http://192.0.2.1/bg.png</image><icon>http://192.0.2.1/i.png</icon>"
    "</background></setBackground>",
)
PAGE = (
    '<?xml version="1.0" encoding="UTF-8"?><CiscoIPPhoneText><Title>Door</Title>'
    "<Text>Front door opened</Text></CiscoIPPhoneText>"
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def event(topic: str = "home/door", payload: bytes = b'{"state": "open"}', **kw: Any) -> Event:
    return Event("mqtt", topic, payload, {"content-type": "application/json"}, **kw)


def delivery(phone: str = "desk-1", rule: str = "door", **kw: Any) -> NewDelivery:
    kw.setdefault("requests", (EXECUTE,))
    kw.setdefault("expires_at", 5_000.0)
    return NewDelivery(rule, phone, **kw)


async def add(
    spool: Store,
    ev: Event | None = None,
    *deliveries: NewDelivery,
    rules: Sequence[str] = ("door",),
    pages: Mapping[str, str] | None = None,
    cooldowns: Sequence[tuple[str, str, float]] = (),
) -> list[Delivery]:
    """Intake's call, with one pending delivery to desk-1 unless told otherwise."""
    return await commit_event(
        spool,
        ev or event(),
        rules=rules,
        deliveries=deliveries or (delivery(),),
        pages=pages or {},
        cooldowns=cooldowns,
    )


# -- round trip -----------------------------------------------------------------------------


async def test_round_trip_event_deliveries_pages(open_store: OpenStore) -> None:
    clock = Clock(1_234.5)
    async with open_store(clock=clock) as spool:
        ev = event(payload=b"\xff\x00 not utf-8", received_at=1_230.0)
        stored = await add(
            spool,
            ev,
            delivery("desk-1", requests=(EXECUTE, BACKGROUND)),
            delivery("desk-2", state="suppressed", error="in cooldown"),
            rules=["door", "night"],
            pages={"p-" + ev.id: PAGE},
        )

        assert [d.phone for d in stored] == ["desk-1", "desk-2"]
        assert stored[0].id < stored[1].id
        assert stored[0].requests == (EXECUTE, BACKGROUND)
        assert stored[0].created_at == 1_234.5
        assert (stored[0].sent, stored[0].attempts, stored[0].state) == (0, 0, "pending")
        assert (stored[1].state, stored[1].error) == ("suppressed", "in cooldown")
        # The suppressed delivery is on record but is no work to do.
        assert spool.pending_count() == 1
        assert await spool.deliveries.pending() == [stored[0]]

        record = await spool.events.get(ev.id)
        assert record is not None
        assert (record.source, record.topic, record.received_at) == ("mqtt", "home/door", 1_230.0)
        assert record.payload == b"\xff\x00 not utf-8"
        assert record.headers == {"content-type": "application/json"}
        assert record.rules == ("door", "night")
        assert record.deliveries == tuple(stored)

        assert await spool.events.page("p-" + ev.id) == PAGE
        assert await spool.events.page("p-unknown") is None
        assert await spool.events.get("no-such-event") is None


async def test_progress_and_finish(open_store: OpenStore) -> None:
    async with open_store() as spool:
        (first,) = await add(spool, None, delivery(requests=(EXECUTE, BACKGROUND, EXECUTE)))
        (second,) = await add(spool)
        assert spool.pending_count() == 2

        await spool.deliveries.progress(
            first.id, sent=2, attempts=3, error="PhoneTimeout: no answer"
        )
        (resumed, _) = await spool.deliveries.pending()
        assert (resumed.sent, resumed.attempts, resumed.error) == (2, 3, "PhoneTimeout: no answer")

        await spool.deliveries.finish(first.id, "delivered")
        assert spool.pending_count() == 1
        assert [d.id for d in await spool.deliveries.pending()] == [second.id]
        # Finishing again, or recording progress on a finished delivery, changes nothing.
        await spool.deliveries.finish(first.id, "failed", "late")
        await spool.deliveries.progress(first.id, sent=0, attempts=9)
        assert spool.pending_count() == 1
        record = await spool.events.get(first.event_id)
        assert record is not None
        (done,) = record.deliveries
        assert (done.state, done.error, done.sent, done.attempts) == ("delivered", "", 2, 3)

        with pytest.raises(ValueError, match="pending"):
            await spool.deliveries.finish(second.id, "pending")


async def test_set_state_moves_a_delivery_whatever_its_state_and_counts_it(
    open_store: OpenStore,
) -> None:
    async with open_store() as spool:
        (stored,) = await add(spool)
        await spool.deliveries.set_state(stored.id, DeliveryState.ACKNOWLEDGED, "by desk-1")
        assert spool.pending_count() == 0
        assert await spool.deliveries.latest(
            stored.event_id, "door", "desk-1", [DeliveryState.ACKNOWLEDGED]
        ) == (stored.id, DeliveryState.ACKNOWLEDGED)
        await spool.deliveries.set_state(stored.id, DeliveryState.PENDING)
        assert spool.pending_count() == len(await spool.deliveries.pending()) == 1
        await spool.deliveries.set_state(10_000, DeliveryState.DELIVERED)  # no such delivery
        assert spool.pending_count() == 1


async def test_recent_events_newest_first(open_store: OpenStore) -> None:
    async with open_store() as spool:
        ids = [(await add(spool, event(topic=f"t/{i}")))[0].event_id for i in range(5)]
        recent = await spool.events.recent(limit=3)
        assert [r.id for r in recent] == ids[::-1][:3]
        assert [r.topic for r in recent] == ["t/4", "t/3", "t/2"]
        assert all(len(r.deliveries) == 1 for r in recent)


# -- durability -----------------------------------------------------------------------------


async def test_pending_resumes_in_order_after_reopen(open_store: OpenStore) -> None:
    async with open_store() as spool:
        stored = [(await add(spool, event(topic=f"t/{i}")))[0] for i in range(4)]
        await spool.deliveries.progress(stored[0].id, sent=1, attempts=1)
        await spool.deliveries.finish(stored[2].id, "expired", "TTL reached")

    async with open_store() as spool:
        assert spool.pending_count() == 3
        pending = await spool.deliveries.pending()
        assert [d.id for d in pending] == [stored[0].id, stored[1].id, stored[3].id]
        assert pending[0].sent == 1
        # New work after a restart gets ids after the old ones.
        (newer,) = await add(spool)
        assert newer.id > stored[3].id
        assert (await spool.deliveries.pending())[-1].id == newer.id


async def test_synchronous_full_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path, synchronous="FULL") as spool:
        first, second = [(await add(spool))[0] for _ in range(2)]
        await spool.deliveries.progress(first.id, sent=1, attempts=1)
        await spool.deliveries.finish(second.id, "delivered")
        await add(spool)
    async with Spool(path, synchronous="full") as spool:
        assert spool.pending_count() == 2
        assert (await spool.deliveries.pending())[0].sent == 1
    with pytest.raises(ValueError, match="synchronous"):
        Spool(path, synchronous="off")


_CRASH_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from phonepush.events import Event
    from phonepush.store.commit import commit_event
    from phonepush.store.spool import NewDelivery, PushRequest, Spool

    async def main(path: str) -> None:
        request = PushRequest("execute", "<CiscoIPPhoneExecute/>")
        phones = ["desk-1", "desk-2", "desk-3"]
        async with Spool(path) as spool:
            i = 0
            while True:
                ev = Event("webhook", "alarm", b"payload %d" % i, {})
                await commit_event(
                    spool,
                    ev,
                    rules=["alarm"],
                    deliveries=[NewDelivery("alarm", p, (request,), 9e9) for p in phones],
                    pages={f"page-{ev.id}": "<CiscoIPPhoneText/>"},
                    cooldowns=[("alarm", ev.id, 9e9)],
                )
                # Only printed once commit_event has returned, i.e. the event was acknowledged.
                print(ev.id, flush=True)
                i += 1
                # Let the background checkpoints run, so the kill may land in one.
                await asyncio.sleep(0)

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_every_returned_add_event_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", _CRASH_WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    acknowledged = []
    try:
        for line in writer.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) == 300:
                break
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert len(acknowledged) == 300

    async with Spool(path) as spool:
        for event_id in acknowledged:
            record = await spool.events.get(event_id)
            assert record is not None, event_id
            assert len(record.deliveries) == 3
            assert await spool.events.page(f"page-{event_id}") == "<CiscoIPPhoneText/>"
        # The writer may have committed a few more after the last line we read, never a part of
        # one: every stored event has all three deliveries.
        assert spool.pending_count() % 3 == 0
        assert spool.pending_count() >= 3 * len(acknowledged)


async def test_clean_close_after_many_commits_leaves_one_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path) as spool:
        stored = []
        for i in range(400):
            stored.extend(await add(spool, event(topic=f"t/{i}"), delivery("a"), delivery("b")))
            # As in the daemon, the loop runs between events: background checkpoints happen.
            await asyncio.sleep(0)
        for d in stored[::2]:
            await spool.deliveries.finish(d.id, "delivered")
            await asyncio.sleep(0)
    assert not Path(f"{path}-wal").exists()
    # With the log gone, these counts come from the database file itself.
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 400
        assert conn.execute(
            "SELECT count(*) FROM deliveries WHERE state = 'pending'"
        ).fetchone() == (400,)
    async with Spool(path) as spool:
        assert [d.id for d in await spool.deliveries.pending()] == [d.id for d in stored[1::2]]


# -- backlog limit --------------------------------------------------------------------------


async def test_spool_full_writes_nothing(open_store: OpenStore) -> None:
    async with open_store(max_pending=3) as spool:
        await add(spool, None, delivery("a"), delivery("b"))
        refused = event(topic="refused")
        with pytest.raises(SpoolFull):
            await add(
                spool,
                refused,
                delivery("c"),
                delivery("d"),
                pages={"p-refused": PAGE},
                cooldowns=[("door", "key", 9_999.0)],
            )
        assert await spool.events.get(refused.id) is None
        assert await spool.events.page("p-refused") is None
        assert not await spool.events.in_cooldown("door", "key", 1_000.0)
        assert spool.pending_count() == 2
        assert len(await spool.deliveries.pending()) == 2

        # Deliveries recorded as suppressed or failed are not work, so they are not refused.
        await add(spool, None, delivery("c", state="failed", error="URI too long"))
        # Exactly at the limit is allowed; finishing one makes room again.
        (third,) = await add(spool, None, delivery("c"))
        with pytest.raises(SpoolFull):
            await add(spool)
        await spool.deliveries.finish(third.id, "delivered")
        await add(spool)
        assert spool.pending_count() == 3


# -- failures and recovery ------------------------------------------------------------------


async def test_add_event_is_all_or_nothing(open_store: OpenStore) -> None:
    async with open_store() as spool:
        await add(spool, None, pages={"page-1": PAGE})
        clashing = event()
        # The page id is taken: the event and delivery rows written before it are undone too.
        with pytest.raises(SpoolError, match="page") as caught:
            await add(spool, clashing, delivery("a"), delivery("b"), pages={"page-1": "<other/>"})
        # The driver's own error is kept as the cause (sqlite3's, or psycopg's UniqueViolation).
        assert "IntegrityError" in {c.__name__ for c in type(caught.value.__cause__).__mro__}
        assert await spool.events.get(clashing.id) is None
        assert await spool.events.page("page-1") == PAGE
        assert spool.pending_count() == len(await spool.deliveries.pending()) == 1
        # A caller's mistake says nothing about the disk.
        assert spool.healthy
        await add(spool, clashing, delivery("a"), delivery("b"), pages={"page-2": PAGE})
        assert spool.pending_count() == 3


async def test_a_transaction_across_repositories_commits_together_or_not_at_all(
    open_store: OpenStore,
) -> None:
    async with open_store() as spool:
        ev = event()
        with pytest.raises(RuntimeError):
            async with spool.transaction("test") as tx:
                await tx.events.add(ev, ["door"])
                await tx.deliveries.add(ev.id, [delivery("a"), delivery("b")])
                await tx.events.add_pages(ev.id, {"page-1": PAGE})
                raise RuntimeError("given up half-way")
        assert await spool.events.get(ev.id) is None
        assert await spool.events.page("page-1") is None
        assert spool.pending_count() == len(await spool.deliveries.pending()) == 0
        assert spool.healthy

        async with spool.transaction("test") as tx:
            await tx.events.add(ev, ["door"])
            stored = await tx.deliveries.add(ev.id, [delivery("a"), delivery("b")])
            await tx.events.add_pages(ev.id, {"page-1": PAGE})
            await tx.deliveries.suppress([stored[1].id], "cancelled")
        record = await spool.events.get(ev.id)
        assert record is not None
        assert [(d.phone, d.state, d.error) for d in record.deliveries] == [
            ("a", "pending", ""),
            ("b", "suppressed", "cancelled"),
        ]
        assert await spool.events.page("page-1") == PAGE
        assert spool.pending_count() == len(await spool.deliveries.pending()) == 1


async def test_the_pending_gauge_is_read_from_the_spool_when_scraped(open_store: OpenStore) -> None:
    metrics = Metrics(CollectorRegistry())
    registry = metrics.registry
    assert registry.get_sample_value("phonepush_spool_pending") == 0  # no spool open yet
    async with open_store() as spool:
        metrics.watch(spool)
        first, _ = await add(spool, None, delivery("a"), delivery("b"))
        assert registry.get_sample_value("phonepush_spool_pending") == 2
        await spool.deliveries.finish(first.id, "delivered")
        assert registry.get_sample_value("phonepush_spool_pending") == 1
        size = registry.get_sample_value("phonepush_spool_bytes")
        assert size is not None and size > 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs: filling it makes writes fail with ENOSPC, as on a full disk."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem is full."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


async def test_full_disk_is_a_spool_error_then_recovers(small_disk: Path) -> None:
    async with Spool(small_disk / "spool.db") as spool:
        (kept,) = await add(spool)
        assert spool.healthy
        filler = fill(small_disk)

        big = event(payload=b"x" * 64_000)
        with pytest.raises(SpoolError, match="full") as caught:
            await add(spool, big, delivery("a"), delivery("b"), pages={"p-big": PAGE})
        assert isinstance(caught.value.__cause__, sqlite3.Error)
        assert not spool.healthy
        with pytest.raises(SpoolError):
            await spool.check()
        # Rolled back, and the counter agrees with the file.
        assert await spool.events.get(big.id) is None
        assert await spool.events.page("p-big") is None
        assert spool.pending_count() == 1
        assert [d.id for d in await spool.deliveries.pending()] == [kept.id]

        # Space comes back: the same spool, without a restart, takes writes again.
        filler.unlink()
        await spool.check()
        assert spool.healthy
        stored = await add(spool, big, delivery("a"), delivery("b"), pages={"p-big": PAGE})
        assert spool.pending_count() == 3
        assert [d.id for d in await spool.deliveries.pending()] == [kept.id] + [
            d.id for d in stored
        ]
        await spool.deliveries.finish(kept.id, "delivered")
        assert spool.pending_count() == 2

    async with Spool(small_disk / "spool.db") as reopened:
        assert reopened.pending_count() == 2
        assert await reopened.events.page("p-big") == PAGE


async def test_finish_on_a_full_disk_keeps_the_delivery_pending(small_disk: Path) -> None:
    async with Spool(small_disk / "spool.db") as spool:
        stored = [(await add(spool))[0] for _ in range(3)]
        filler = fill(small_disk)
        # Each failed update leaves the delivery pending and counted; the first one to get space
        # goes through.
        failures = 0
        for d in stored:
            try:
                await spool.deliveries.finish(d.id, "delivered")
            except SpoolError:
                failures += 1
        assert failures > 0
        assert spool.pending_count() == len(await spool.deliveries.pending()) == failures
        filler.unlink()
        for d in await spool.deliveries.pending():
            await spool.deliveries.finish(d.id, "delivered")
        assert spool.pending_count() == 0
        assert await spool.deliveries.pending() == []
        assert spool.healthy


def _chattr(flag: str, path: Path) -> bool:
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True, check=False)
    return done.returncode == 0


async def test_unwritable_directory_is_a_clear_error_at_open(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _chattr("+i", locked):
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        with pytest.raises(SpoolError, match=str(locked / "spool.db")):
            async with Spool(locked / "spool.db"):
                pass
    finally:
        _chattr("-i", locked)
    async with Spool(locked / "spool.db") as spool:
        await add(spool)
        assert spool.pending_count() == 1


async def test_readonly_file_fails_the_readiness_check(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path) as spool:
        await add(spool)
    if not _chattr("+i", path):
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        with pytest.raises(SpoolError, match="readonly"):
            async with Spool(path):
                pass
    finally:
        _chattr("-i", path)


async def test_path_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(SpoolError, match="not-a-dir"):
        async with Spool(tmp_path / "not-a-dir" / "spool.db"):
            pass


async def test_a_file_that_is_not_a_spool_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"these are not the bytes of an SQLite database\n" * 100)
    with pytest.raises(SpoolError, match="not a database"):
        async with Spool(path):
            pass


async def test_creates_missing_directories_and_versions_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "phonepush" / "spool.db"
    async with Spool(path) as spool:
        await add(spool)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.commit()
    with pytest.raises(SpoolError, match="newer"):
        async with Spool(path):
            pass


async def test_a_spool_from_before_schema_versions_opens_unchanged(tmp_path: Path) -> None:
    # What an earlier phonepush left: version 1 in user_version only, no schema_version key,
    # and without a table later releases added (schedule_firings).
    path = tmp_path / "spool.db"
    async with Spool(path) as spool:
        (kept,) = await add(spool, pages={"p-old": PAGE})
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'schema_version'")
        conn.execute("DROP TABLE schedule_firings")
        conn.commit()
    async with Spool(path) as spool:
        assert [d.id for d in await spool.deliveries.pending()] == [kept.id]
        assert await spool.events.page("p-old") == PAGE
        assert await spool.schedules.claim("daily", 100.0, 101.0)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [
            (str(SCHEMA_VERSION),)
        ]


async def test_a_spool_a_newer_phonepush_versioned_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path) as spool:
        await add(spool)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
        conn.commit()
    with pytest.raises(SpoolError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        async with Spool(path):
            pass


async def test_a_postgres_schema_is_versioned_and_a_newer_one_refused(pg_url: str) -> None:
    import psycopg

    from phonepush.store import postgres

    async with postgres.PostgresStore(pg_url) as store:
        await add(store)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (postgres.SCHEMA_VERSION,)
        ]
        conn.execute("UPDATE schema_version SET version = version + 1")
    with pytest.raises(SpoolError, match="is newer than this phonepush understands"):
        async with postgres.PostgresStore(pg_url):
            pass
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = version - 1")
    async with postgres.PostgresStore(pg_url) as store:
        assert store.pending_count() == 1


async def test_write_lock_held_elsewhere_fails_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path, busy_timeout=0.05) as spool:
        await add(spool)
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            blocked = event()
            with pytest.raises(SpoolError, match="locked"):
                await add(spool, blocked)
            assert not spool.healthy
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert await spool.events.get(blocked.id) is None
        assert spool.pending_count() == 1
        await add(spool, blocked)
        assert spool.healthy
        assert spool.pending_count() == 2


async def test_closed_spool_refuses_calls(open_store: OpenStore) -> None:
    spool = open_store()
    async with spool:
        await add(spool)
    with pytest.raises(SpoolError, match="not open"):
        await spool.deliveries.pending()


# -- cooldowns and housekeeping -------------------------------------------------------------


async def test_cooldown_lasts_until_its_end(open_store: OpenStore) -> None:
    async with open_store() as spool:
        await add(spool, cooldowns=[("door", "desk-1", 1_060.0)])
        assert await spool.events.in_cooldown("door", "desk-1", 1_000.0)
        assert await spool.events.in_cooldown("door", "desk-1", 1_059.9)
        assert not await spool.events.in_cooldown("door", "desk-1", 1_060.0)
        assert not await spool.events.in_cooldown("door", "desk-2", 1_000.0)
        assert not await spool.events.in_cooldown("window", "desk-1", 1_000.0)
        # A later event restarts the cooldown.
        await add(spool, cooldowns=[("door", "desk-1", 1_120.0)])
        assert await spool.events.in_cooldown("door", "desk-1", 1_100.0)


async def test_purge_removes_finished_old_events_only(
    open_store: OpenStore, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with open_store() as spool:
        old_done = event(received_at=100.0)
        old_pending = event(received_at=100.0)
        new_done = event(received_at=900.0)
        (d1,) = await add(
            spool, old_done, pages={"p-old": PAGE}, cooldowns=[("door", "old", 150.0)]
        )
        await add(spool, old_pending, pages={"p-pending": PAGE})
        (d3,) = await add(
            spool, new_done, pages={"p-new": PAGE}, cooldowns=[("door", "new", 950.0)]
        )
        await spool.deliveries.finish(d1.id, "delivered")
        await spool.deliveries.finish(d3.id, "failed", "PhoneAuthError")

        assert await spool.events.purge(before=500.0) == 1
        assert await spool.events.get(old_done.id) is None
        assert await spool.events.page("p-old") is None
        # Work still to do is kept however old it is; recent history is kept.
        assert await spool.events.get(old_pending.id) is not None
        assert await spool.events.page("p-pending") == PAGE
        assert await spool.events.get(new_done.id) is not None
        assert await spool.events.page("p-new") == PAGE
        assert spool.pending_count() == 1
        assert await spool.events.purge(before=500.0) == 0

    if backend == "sqlite":
        with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as conn:
            assert conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 2
            assert conn.execute("SELECT key FROM cooldowns").fetchall() == [("new",)]
    else:
        import psycopg

        with psycopg.connect(request.getfixturevalue("pg_url")) as pg:
            assert pg.execute("SELECT count(*) FROM deliveries").fetchall() == [(2,)]
            assert pg.execute("SELECT key FROM cooldowns").fetchall() == [("new",)]


# -- concurrency ----------------------------------------------------------------------------


async def test_readers_on_other_connections_do_not_block(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path, busy_timeout=0.0) as spool:
        (first,) = await add(spool)
        reader = sqlite3.connect(path, isolation_level=None)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 1
            # With a zero busy timeout any blocking would be an error: the spool writes while a
            # reader holds its snapshot.
            (second,) = await add(spool)
            await spool.deliveries.progress(first.id, sent=1, attempts=1)
            await spool.deliveries.finish(first.id, "delivered")
            await spool.check()
            assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 1
            reader.execute("COMMIT")
            assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 2

            # And the spool reads while another connection holds the write lock.
            reader.execute("BEGIN IMMEDIATE")
            reader.execute("UPDATE deliveries SET error = 'x' WHERE id = ?", (second.id,))
            assert [d.id for d in await spool.deliveries.pending()] == [second.id]
            assert await spool.events.get(first.event_id) is not None
            reader.execute("ROLLBACK")
        finally:
            reader.close()
