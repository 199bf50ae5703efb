"""The spool: the daemon's durable store of events, deliveries, pages and cooldowns (SQLite, WAL).

Intake commits an event and all its deliveries here in one transaction before the event is
acknowledged; the dispatcher takes pending deliveries from here, records progress, and finishes
them. A restart resumes exactly what was accepted.

Durability
    The database runs in WAL mode. With ``synchronous="normal"`` (the default) a commit appends to
    the write-ahead log without waiting for fsync: the write is in the operating system's page
    cache when ``add_event`` returns, so a crash or SIGKILL of the daemon loses nothing that was
    committed, but a power loss or kernel crash may lose the last commits (never corrupting the
    file). ``synchronous="full"`` fsyncs the log at every ``add_event`` commit, so acknowledged
    events also survive power loss, at the cost of one fsync per event (see
    ``docs/performance.md``, section "Spool").

    ``progress``, ``finish``, ``purge`` and ``check`` never wait for fsync, whatever the setting:
    the next fsync (an ``add_event`` under "full", or a checkpoint) makes them durable too. A power
    cut can only lose the last of them, which means a delivery is resumed and a push sent again:
    delivery is at-least-once anyway (``docs/design.md``), and an acknowledged event is never lost.

Threading and latency
    Every call is synchronous and meant to run on the event loop thread: each one is a handful of
    prepared statements (``sqlite3`` caches them per connection) and at most one commit, well under
    a millisecond with ``synchronous="normal"``. The connection lives as long as the spool; it is
    only reopened after a failure left it unusable. What would stall the loop is the checkpoint
    (copying the log into the database file, with two fsyncs) that SQLite runs after a commit now
    and then; the spool runs checkpoints on a second connection in a worker thread instead.

Failures
    Every ``sqlite3`` error is translated here into :class:`~phonepush.errors.SpoolError` (or
    :class:`~phonepush.errors.SpoolFull` for the backlog limit). A failed write is rolled back, so
    nothing half-written remains, and :attr:`Spool.healthy` turns False until a later write or
    :meth:`Spool.check` succeeds. Nothing has to be restarted: when the disk has room again (or the
    file is writable again) the next call simply works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, cast, get_args

from phonepush.errors import SpoolError, SpoolFull
from phonepush.events import Event

__all__ = [
    "FINAL_STATES",
    "INTAKE_STATES",
    "SCHEMA_VERSION",
    "Delivery",
    "EventRecord",
    "NewDelivery",
    "PushRequest",
    "RequestKind",
    "Spool",
]

RequestKind = Literal["execute", "background", "ringtone"]

#: The version of the schema below, kept in ``PRAGMA user_version``.
SCHEMA_VERSION: Final = 1
#: States a delivery ends in; :meth:`Spool.finish` moves a pending delivery to one of them.
FINAL_STATES: Final = frozenset({"delivered", "failed", "expired", "suppressed"})
#: States intake may record a new delivery in (a suppressed or failed one is kept for the record).
INTAKE_STATES: Final = frozenset({"pending", "failed", "suppressed"})

# Errors that come from what the caller passed (a duplicate id, a value SQLite cannot bind): they
# fail that call but say nothing about the disk, so they leave ``healthy`` alone.
_CALLER_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
    sqlite3.DataError,
)
_KINDS: Final = frozenset(get_args(RequestKind))
_SYNCHRONOUS: Final = frozenset({"normal", "full", "extra"})
# Keeps the log from staying at its high-water mark after a burst; checkpoints truncate to this.
_JOURNAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
# Background checkpoints run after this many commits (an add_event with one delivery writes about
# ten pages to the log, so this keeps the log near SQLite's default of 1,000 pages) ...
_CHECKPOINT_COMMITS: Final = 100
# ... and the loop-side connection checkpoints by itself only if the log grows past this anyway.
_BACKSTOP_PAGES: Final = 10_000

_log = logging.getLogger(__name__)

# Every index costs a page write per commit, so there are only those a lookup needs: events by
# age (purge), deliveries by event and the pending ones (a partial index, small), pages by event
# (purge). Cooldowns are one row per (rule, key) and purge just scans them. Delivery ids are rowids
# without AUTOINCREMENT (which writes one more page per commit): they increase, and can only be
# reused once purge removed every newer delivery.
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    headers TEXT NOT NULL,
    received_at REAL NOT NULL,
    rules TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_received_at ON events (received_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    rule TEXT NOT NULL,
    phone TEXT NOT NULL,
    requests TEXT NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries (id) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS pages (
    id TEXT PRIMARY KEY,
    event_id TEXT NOT NULL,
    xml TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pages_event ON pages (event_id);
CREATE TABLE IF NOT EXISTS cooldowns (
    rule TEXT NOT NULL,
    key TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (rule, key)
) WITHOUT ROWID;
"""

_DELIVERY_COLUMNS: Final = (
    "id, event_id, rule, phone, requests, sent, attempts, created_at, expires_at, state, error"
)
_EVENT_COLUMNS: Final = "id, source, topic, payload, headers, received_at, rules"

_INSERT_EVENT: Final = (
    "INSERT INTO events (id, source, topic, payload, headers, received_at, rules)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_DELIVERY: Final = (
    "INSERT INTO deliveries (event_id, rule, phone, requests, created_at, expires_at, state, error)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_PAGE: Final = "INSERT INTO pages (id, event_id, xml) VALUES (?, ?, ?)"
_UPSERT_COOLDOWN: Final = (
    "INSERT INTO cooldowns (rule, key, until) VALUES (?, ?, ?)"
    " ON CONFLICT (rule, key) DO UPDATE SET until = excluded.until"
)
_IN_COOLDOWN: Final = "SELECT 1 FROM cooldowns WHERE rule = ? AND key = ? AND until > ?"
_PENDING: Final = (
    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries INDEXED BY deliveries_pending"
    " WHERE state = 'pending' ORDER BY id"
)
_COUNT_PENDING: Final = "SELECT count(*) FROM deliveries WHERE state = 'pending'"
_PROGRESS: Final = (
    "UPDATE deliveries SET sent = ?, attempts = ?, error = ? WHERE id = ? AND state = 'pending'"
)
_FINISH: Final = "UPDATE deliveries SET state = ?, error = ? WHERE id = ? AND state = 'pending'"
_PAGE: Final = "SELECT xml FROM pages WHERE id = ?"
_EVENT: Final = f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = ?"
_RECENT: Final = f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY seq DESC LIMIT ?"
_EVENT_DELIVERIES: Final = (
    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE event_id = ? ORDER BY id"
)
_PURGEABLE: Final = (
    "SELECT id FROM events WHERE received_at < ? AND NOT EXISTS ("
    " SELECT 1 FROM deliveries WHERE deliveries.event_id = events.id AND state = 'pending')"
)
_PROBE: Final = "INSERT OR REPLACE INTO meta (key, value) VALUES ('checked_at', ?)"


@dataclass(frozen=True, slots=True)
class PushRequest:
    """One HTTP request to a phone, already rendered: an XML body of at most 512 bytes."""

    kind: RequestKind
    xml: str


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """What intake hands the spool for one (rule, phone) of an event.

    ``state`` is ``"pending"`` for work to do; a delivery suppressed or failed at intake (a phone
    in cooldown, a URI over the limit) is recorded with that state and its ``error``, and is never
    dispatched.
    """

    rule: str
    phone: str
    requests: tuple[PushRequest, ...]
    expires_at: float
    state: str = "pending"
    error: str = ""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivery row, as the dispatcher sees it.

    ``sent`` is how many of ``requests`` the phone has already answered: a resumed delivery starts
    at ``requests[sent]``.
    """

    id: int
    event_id: str
    rule: str
    phone: str
    requests: tuple[PushRequest, ...]
    sent: int
    attempts: int
    created_at: float
    expires_at: float
    state: str
    error: str


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A stored event with the rules it matched and all its deliveries."""

    id: str
    source: str
    topic: str
    received_at: float
    rules: tuple[str, ...]
    deliveries: tuple[Delivery, ...]
    payload: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


class Spool:
    """The SQLite spool. Use as ``async with Spool(path) as spool:``.

    ``max_pending`` bounds the backlog: :meth:`add_event` raises :class:`SpoolFull` rather than
    take more pending deliveries. ``synchronous`` is ``"normal"`` (survives a crash of the daemon)
    or ``"full"`` (also survives power loss); see the module docstring. ``clock`` stamps
    ``created_at`` of deliveries. ``busy_timeout`` is how long a write waits for another process
    holding the database's write lock (a maintenance command, say) before it fails; it blocks the
    event loop for that long, so it is kept short.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_pending: int = 100_000,
        synchronous: str = "normal",
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 0.2,
    ) -> None:
        if synchronous.lower() not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {sorted(_SYNCHRONOUS)}, not {synchronous!r}"
            )
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        self.path = Path(path)
        self.max_pending = max_pending
        self.synchronous = synchronous.lower()
        self._clock = clock
        self._busy_timeout_ms = max(0, round(busy_timeout * 1000))
        self._conn: sqlite3.Connection | None = None
        self._open = False
        self._pending = 0
        self._conn_synchronous = ""  # what the open connection is set to now
        self._commits = 0  # since the last checkpoint was started
        self._checkpoint_due = asyncio.Event()
        self._checkpointer: asyncio.Task[None] | None = None
        self._stopping = False
        self.healthy = True

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._open_connection()
        self._stopping = False
        self._checkpoint_due = asyncio.Event()
        self._checkpointer = asyncio.create_task(
            self._checkpoint_loop(), name=f"spool-checkpoint:{self.path.name}"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._checkpointer = self._checkpointer, None
        try:
            if task is not None:
                # Not cancelled: a checkpoint already running in its thread is let finish, so
                # its connection is closed only once nothing uses it.
                self._stopping = True
                self._checkpoint_due.set()
                await task
        finally:
            self._open = False
            self._drop_connection()

    def _open_connection(self) -> None:
        """Open (creating the file, its directory and the schema if needed) and probe a write."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot create directory: {exc}") from exc
        self._connect()
        self._open = True
        try:
            self.check()
        except SpoolError:
            self._open = False
            self._drop_connection()
            raise

    # -- intake ----------------------------------------------------------------------------

    def add_event(
        self,
        event: Event,
        *,
        rules: Sequence[str],
        deliveries: Sequence[NewDelivery],
        pages: Mapping[str, str],
        cooldowns: Sequence[tuple[str, str, float]],
    ) -> list[Delivery]:
        """Store an event, its deliveries, its pages and the cooldowns it starts, in one commit.

        Returns the deliveries with their ids, in the given order. Raises :class:`SpoolFull` (and
        writes nothing) if the new pending deliveries would take the backlog over ``max_pending``;
        :class:`SpoolError` (and writes nothing) if the database cannot take the write.
        """
        for new in deliveries:
            if new.state not in INTAKE_STATES:
                raise ValueError(f"a new delivery cannot be {new.state!r}")
        # Everything that can fail outside SQLite happens before the transaction starts.
        requests = [_dump_requests(new.requests) for new in deliveries]
        event_row = (
            event.id,
            event.source,
            event.topic,
            event.payload,
            json.dumps(dict(event.headers), ensure_ascii=False),
            event.received_at,
            json.dumps(list(rules), ensure_ascii=False),
        )
        page_rows = [(page_id, event.id, xml) for page_id, xml in pages.items()]
        new_pending = sum(1 for new in deliveries if new.state == "pending")
        conn = self._connection()
        if self._pending + new_pending > self.max_pending:
            raise SpoolFull(
                f"spool {self.path}: {self._pending} deliveries pending,"
                f" {new_pending} more would exceed the limit of {self.max_pending}"
            )
        created_at = self._clock()
        ids: list[int] = []
        try:
            self._set_synchronous(conn, self.synchronous)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_INSERT_EVENT, event_row)
            for new, dumped in zip(deliveries, requests, strict=True):
                cursor = conn.execute(
                    _INSERT_DELIVERY,
                    (
                        event.id,
                        new.rule,
                        new.phone,
                        dumped,
                        created_at,
                        new.expires_at,
                        new.state,
                        new.error,
                    ),
                )
                ids.append(cast(int, cursor.lastrowid))
            if page_rows:
                conn.executemany(_INSERT_PAGE, page_rows)
            if cooldowns:
                conn.executemany(_UPSERT_COOLDOWN, cooldowns)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._write_failed(f"cannot store event {event.id}", exc) from exc
        except BaseException:
            self._abandon(conn)
            raise
        stored = [
            Delivery(
                id=delivery_id,
                event_id=event.id,
                rule=new.rule,
                phone=new.phone,
                requests=tuple(new.requests),
                sent=0,
                attempts=0,
                created_at=created_at,
                expires_at=new.expires_at,
                state=new.state,
                error=new.error,
            )
            for delivery_id, new in zip(ids, deliveries, strict=True)
        ]
        self._pending += new_pending
        self._committed()
        return stored

    def in_cooldown(self, rule: str, key: str, now: float) -> bool:
        """Whether ``rule`` set a cooldown for ``key`` that lasts beyond ``now``."""
        return self._fetchone(_IN_COOLDOWN, (rule, key, now), "cannot read cooldowns") is not None

    # -- dispatch --------------------------------------------------------------------------

    def pending(self) -> list[Delivery]:
        """Every pending delivery, oldest (lowest id) first: what a restarted dispatcher resumes."""
        rows = self._fetchall(_PENDING, (), "cannot read deliveries")
        # The deliveries of one event to many phones carry the same requests: decode them once.
        decoded: dict[str, tuple[PushRequest, ...]] = {}
        return [_delivery(row, decoded) for row in rows]

    def pending_count(self) -> int:
        """How many deliveries are pending (kept in memory, consistent with the database)."""
        return self._pending

    def progress(self, delivery_id: int, sent: int, attempts: int, error: str = "") -> None:
        """Record that the phone answered the first ``sent`` requests after ``attempts`` tries.

        Does nothing for a delivery that is no longer pending.
        """
        if sent < 0 or attempts < 0:
            raise ValueError("sent and attempts cannot be negative")
        self._write(
            _PROGRESS, (sent, attempts, error, delivery_id), f"cannot update delivery {delivery_id}"
        )

    def finish(self, delivery_id: int, state: str, error: str = "") -> None:
        """Move a pending delivery to its final ``state`` (delivered, failed, expired, suppressed).

        Does nothing for a delivery that is no longer pending, so finishing twice is harmless.
        """
        if state not in FINAL_STATES:
            raise ValueError(f"cannot finish a delivery as {state!r}")
        changed = self._write(
            _FINISH, (state, error, delivery_id), f"cannot finish delivery {delivery_id}"
        )
        self._pending -= changed

    # -- lookups ---------------------------------------------------------------------------

    def page(self, page_id: str) -> str | None:
        """The CiscoIPPhoneText XML stored under ``page_id``, or None."""
        row = self._fetchone(_PAGE, (page_id,), "cannot read pages")
        return None if row is None else cast(str, row[0])

    def event(self, event_id: str) -> EventRecord | None:
        """The stored event with its deliveries, or None if there is none (or it was purged)."""
        row = self._fetchone(_EVENT, (event_id,), "cannot read events")
        return None if row is None else self._record(row)

    def recent_events(self, limit: int = 20) -> list[EventRecord]:
        """The ``limit`` most recently stored events, newest first."""
        rows = self._fetchall(_RECENT, (limit,), "cannot read events")
        return [self._record(row) for row in rows]

    # -- housekeeping ----------------------------------------------------------------------

    def purge(self, before: float) -> int:
        """Delete events received before ``before`` that have no pending delivery, with their
        deliveries and pages, and cooldowns that ended before ``before``.

        Returns how many events were deleted.
        """
        conn = self._connection()
        try:
            self._set_synchronous(conn, "normal")
            conn.execute("BEGIN IMMEDIATE")
            doomed = [(row[0],) for row in conn.execute(_PURGEABLE, (before,))]
            conn.executemany("DELETE FROM deliveries WHERE event_id = ?", doomed)
            conn.executemany("DELETE FROM pages WHERE event_id = ?", doomed)
            conn.executemany("DELETE FROM events WHERE id = ?", doomed)
            conn.execute("DELETE FROM cooldowns WHERE until < ?", (before,))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._write_failed("cannot purge", exc) from exc
        except BaseException:
            self._abandon(conn)
            raise
        self._committed()
        return len(doomed)

    def check(self) -> None:
        """Raise :class:`SpoolError` unless a write to the database succeeds now.

        The readiness probe: it commits one small row, so a full disk, a read-only file or a lock
        held elsewhere shows up here.
        """
        self._write(_PROBE, (repr(self._clock()),), "not writable")

    # -- internals -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                timeout=self._busy_timeout_ms / 1000,
                cached_statements=64,
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: cannot open: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SpoolError(f"spool {self.path}: cannot use WAL mode (journal mode {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            self._conn_synchronous = self.synchronous
            conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {_BACKSTOP_PAGES}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SpoolError(
                    f"spool {self.path}: schema version {version} is newer than this"
                    f" phonepush understands ({SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            self._pending = conn.execute(_COUNT_PENDING).fetchone()[0]
        except sqlite3.Error as exc:
            conn.close()
            raise SpoolError(f"spool {self.path}: cannot open: {exc}") from exc
        except SpoolError:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _connection(self) -> sqlite3.Connection:
        if not self._open:
            raise SpoolError(f"spool {self.path} is not open")
        if self._conn is not None:
            return self._conn
        # A failure dropped the connection: reconnecting is how a later call tries again.
        try:
            return self._connect()
        except SpoolError:
            self.healthy = False
            raise

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Already unusable if closing fails; a new connection is opened on the next call.
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _committed(self) -> None:
        self.healthy = True
        self._commits += 1
        if self._commits >= _CHECKPOINT_COMMITS:
            self._checkpoint_due.set()

    async def _checkpoint_loop(self) -> None:
        """Copy the write-ahead log into the database file, in a worker thread.

        A checkpoint fsyncs the log and the database file; on the event loop thread (where SQLite
        runs it by default, after a commit) that stalls everything for milliseconds to hundreds of
        milliseconds on a busy disk. Here it runs on its own connection in a thread, after every
        :data:`_CHECKPOINT_COMMITS` commits; the loop-side connection only checkpoints by itself
        if the log grows past :data:`_BACKSTOP_PAGES` anyway.
        """
        conn: sqlite3.Connection | None = None
        in_thread = False
        failing = False
        try:
            while True:
                await self._checkpoint_due.wait()
                self._checkpoint_due.clear()
                if self._stopping:
                    return
                self._commits = 0
                try:
                    in_thread = True
                    conn = await asyncio.to_thread(self._checkpoint, conn)
                    in_thread = False
                except sqlite3.Error as exc:
                    in_thread = False
                    if conn is not None:
                        await asyncio.to_thread(conn.close)
                    conn = None
                    # Commits go on into the log meanwhile, so this alone does not make the spool
                    # unhealthy; say it once, not at every try.
                    if not failing:
                        _log.warning("spool %s: checkpoint failed: %s", self.path, exc)
                    failing = True
                else:
                    if failing:
                        _log.info("spool %s: checkpoints work again", self.path)
                    failing = False
        finally:
            # If this task was cancelled while its thread still runs a checkpoint, the thread owns
            # the connection; it is closed when collected.
            if conn is not None and not in_thread:
                await asyncio.to_thread(conn.close)

    def _checkpoint(self, conn: sqlite3.Connection | None) -> sqlite3.Connection:
        # Runs in a worker thread, one call at a time.
        if conn is None:
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=0, check_same_thread=False
            )
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return conn

    def _abandon(self, conn: sqlite3.Connection) -> None:
        """Roll back after a non-SQLite exception so no transaction stays open on the connection."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._drop_connection()

    def _set_synchronous(self, conn: sqlite3.Connection, level: str) -> None:
        if self._conn_synchronous != level:
            conn.execute(f"PRAGMA synchronous = {level.upper()}")
            self._conn_synchronous = level

    def _write(self, sql: str, params: Sequence[Any], what: str) -> int:
        """Run one statement in its own (autocommit) transaction; return the rows changed."""
        conn = self._connection()
        try:
            self._set_synchronous(conn, "normal")
            changed = conn.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise self._write_failed(what, exc) from exc
        self._committed()
        return changed

    def _write_failed(self, what: str, exc: sqlite3.Error) -> SpoolError:
        """Undo what the failed transaction wrote and resynchronise the pending counter."""
        conn = self._conn
        try:
            if conn is not None:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._pending = conn.execute(_COUNT_PENDING).fetchone()[0]
        except sqlite3.Error:
            # The connection is in no state to be trusted; the next call opens a new one, which
            # counts the pending deliveries afresh.
            self._drop_connection()
        if not isinstance(exc, _CALLER_ERRORS):
            self.healthy = False
        return SpoolError(f"spool {self.path}: {what}: {exc}")

    def _fetchone(self, sql: str, params: Sequence[Any], what: str) -> Any:
        conn = self._connection()
        try:
            return conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise self._read_failed(what, exc) from exc

    def _fetchall(self, sql: str, params: Sequence[Any], what: str) -> list[Any]:
        conn = self._connection()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._read_failed(what, exc) from exc

    def _read_failed(self, what: str, exc: sqlite3.Error) -> SpoolError:
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            self._drop_connection()
        return SpoolError(f"spool {self.path}: {what}: {exc}")

    def _record(self, row: Sequence[Any]) -> EventRecord:
        event_id, source, topic, payload, headers, received_at, rules = row
        deliveries = self._fetchall(_EVENT_DELIVERIES, (event_id,), "cannot read deliveries")
        return EventRecord(
            id=event_id,
            source=source,
            topic=topic,
            received_at=received_at,
            rules=tuple(json.loads(rules)),
            deliveries=tuple(_delivery(d) for d in deliveries),
            payload=bytes(payload),
            headers=json.loads(headers),
        )


def _dump_requests(requests: Iterable[PushRequest]) -> str:
    dumped = []
    for request in requests:
        if request.kind not in _KINDS:
            raise ValueError(f"unknown push request kind {request.kind!r}")
        dumped.append([request.kind, request.xml])
    return json.dumps(dumped, ensure_ascii=False)


def _delivery(
    row: Sequence[Any], decoded: dict[str, tuple[PushRequest, ...]] | None = None
) -> Delivery:
    (
        delivery_id,
        event_id,
        rule,
        phone,
        requests,
        sent,
        attempts,
        created_at,
        expires_at,
        state,
        error,
    ) = row
    parsed = None if decoded is None else decoded.get(requests)
    if parsed is None:
        parsed = tuple(PushRequest(kind, xml) for kind, xml in json.loads(requests))
        if decoded is not None:
            decoded[requests] = parsed
    return Delivery(
        id=delivery_id,
        event_id=event_id,
        rule=rule,
        phone=phone,
        requests=parsed,
        sent=sent,
        attempts=attempts,
        created_at=created_at,
        expires_at=expires_at,
        state=state,
        error=error,
    )
