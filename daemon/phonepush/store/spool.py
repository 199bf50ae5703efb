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
import math
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, cast, get_args

from phonepush.errors import SpoolError, SpoolFull
from phonepush.events import Event

__all__ = [
    "ALERT_STATES",
    "FINAL_STATES",
    "INTAKE_STATES",
    "SCHEMA_VERSION",
    "AckResult",
    "AlertPhone",
    "AlertRecord",
    "Delivery",
    "EventRecord",
    "GroupWindow",
    "GroupedEvent",
    "NewAlert",
    "NewAlertPhone",
    "NewDelivery",
    "NewGroupedEvent",
    "PushRequest",
    "RequestKind",
    "Resolution",
    "Spool",
    "StoredSilence",
]

RequestKind = Literal["execute", "background", "ringtone"]

#: The version of the schema below, kept in ``PRAGMA user_version``.
SCHEMA_VERSION: Final = 1
#: States a delivery ends in; :meth:`Spool.finish` moves a pending delivery to one of them.
FINAL_STATES: Final = frozenset({"delivered", "unconfirmed", "failed", "expired", "suppressed"})
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
#: What SQLite keeps next to the database: the write-ahead log, its shared-memory index, and a
#: rollback journal (never used in WAL mode, but opened by that name if it is there).
_SIDE_FILES: Final = ("-wal", "-shm", "-journal")
#: Spool files hold event payloads and pages: readable by the daemon's user alone.
_FILE_MODE: Final = 0o600
_DIR_MODE: Final = 0o700

_log = logging.getLogger("phonepush.spool")

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
CREATE TABLE IF NOT EXISTS alerts (
    event_id TEXT NOT NULL,
    rule TEXT NOT NULL,
    key TEXT NOT NULL,
    page_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    repeat REAL NOT NULL,
    max_repeats INTEGER NOT NULL,
    escalate_after INTEGER NOT NULL,
    ttl REAL NOT NULL,
    rounds INTEGER NOT NULL DEFAULT 0,
    next_at REAL,
    state TEXT NOT NULL,
    ended_at REAL,
    ended_by TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (event_id, rule)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS alerts_key ON alerts (rule, key);
CREATE INDEX IF NOT EXISTS alerts_due ON alerts (next_at)
    WHERE state = 'active' AND next_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS alert_phones (
    event_id TEXT NOT NULL,
    rule TEXT NOT NULL,
    phone TEXT NOT NULL,
    token TEXT UNIQUE,
    requests TEXT NOT NULL,
    escalation INTEGER NOT NULL,
    acked_at REAL,
    acked_by TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (event_id, rule, phone)
);
CREATE TABLE IF NOT EXISTS alert_deliveries (
    delivery_id INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    kind TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS silences (
    id TEXT PRIMARY KEY,
    matchers TEXT NOT NULL,
    starts_at REAL NOT NULL,
    ends_at REAL NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    comment TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grouping_windows (
    rule TEXT NOT NULL,
    key TEXT NOT NULL,
    opened_at REAL NOT NULL,
    due_at REAL NOT NULL,
    ttl REAL NOT NULL,
    PRIMARY KEY (rule, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grouped_events (
    seq INTEGER PRIMARY KEY,
    rule TEXT NOT NULL,
    key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    phones TEXT NOT NULL,
    content TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS grouped_events_window ON grouped_events (rule, key);
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
# Finished events, oldest first, from a cursor on: no pending delivery (looked up per event by
# the event's deliveries), not waiting in a grouping window, no repeat still to come. The two
# NOT IN lists are small tables SQLite reads once per statement; the cursor keeps a pass from
# reading the same unfinished old events again in every batch.
_PURGEABLE: Final = (
    "SELECT id, received_at, seq FROM events INDEXED BY events_received_at"
    " WHERE received_at < ? AND received_at >= ? AND (received_at > ? OR seq > ?)"
    " AND NOT EXISTS (SELECT 1 FROM deliveries"
    "  WHERE deliveries.event_id = events.id AND state = 'pending')"
    " AND id NOT IN (SELECT event_id FROM grouped_events)"
    " AND id NOT IN (SELECT event_id FROM alerts WHERE state = 'active' AND next_at IS NOT NULL)"
    " ORDER BY received_at, seq LIMIT ?"
)
_EXPIRED_COOLDOWNS: Final = (
    "DELETE FROM cooldowns WHERE (rule, key) IN"
    " (SELECT rule, key FROM cooldowns WHERE until < ? LIMIT ?)"
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


# --- acknowledgements and repeats ---
#
# An *alert* is one (event, rule) whose page can be acknowledged, repeated or resolved; it keeps
# the policy it was accepted with (a restart or reload does not change a page already out) and,
# per phone, the requests that phone is pushed (its page URL carries its ack token).

#: What an alert can be: still running, stopped by an acknowledgement, stopped by a resolve.
ALERT_STATES: Final = frozenset({"active", "acknowledged", "resolved"})


@dataclass(frozen=True, slots=True)
class NewAlertPhone:
    """A phone of a new alert: its ack token (None without acks) and its own requests.

    ``escalation`` phones get nothing at first, only repeats from round ``escalate_after`` on.
    """

    phone: str
    token: str | None
    requests: tuple[PushRequest, ...]
    escalation: bool = False


@dataclass(frozen=True, slots=True)
class NewAlert:
    """What intake hands the spool, with an event, for a rule that acks, repeats or resolves."""

    rule: str
    key: str
    page_id: str
    scope: str  # "any" or "phone"
    repeat: float  # seconds; 0 = no repeats
    max_repeats: int
    escalate_after: int  # 0 = no escalation
    ttl: float
    next_at: float | None
    phones: tuple[NewAlertPhone, ...]


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """An alert row. ``rounds`` counts repeats pushed; ``next_at`` is None once none are left."""

    event_id: str
    rule: str
    key: str
    page_id: str
    scope: str
    repeat: float
    max_repeats: int
    escalate_after: int
    ttl: float
    rounds: int
    next_at: float | None
    state: str
    ended_at: float | None
    ended_by: str


@dataclass(frozen=True, slots=True)
class AlertPhone:
    """One phone of an alert, with who acknowledged it there and when."""

    event_id: str
    rule: str
    phone: str
    token: str | None
    escalation: bool
    acked_at: float | None
    acked_by: str


@dataclass(frozen=True, slots=True)
class AckResult:
    """What :meth:`Spool.acknowledge` did. ``first`` is False for a second press."""

    alert: AlertRecord
    phone: AlertPhone
    first: bool
    cancelled: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Resolution:
    """An alert a later event resolved: the pending deliveries cancelled, the notices added."""

    alert: AlertRecord
    cancelled: tuple[int, ...]
    notices: tuple[Delivery, ...]


_ALERT_COLUMNS: Final = (
    "event_id, rule, key, page_id, scope, repeat, max_repeats, escalate_after, ttl, rounds,"
    " next_at, state, ended_at, ended_by"
)
_ALERT_PHONE_COLUMNS: Final = "event_id, rule, phone, token, escalation, acked_at, acked_by"


class Spool:
    """The SQLite spool. Use as ``async with Spool(path) as spool:``.

    ``max_pending`` bounds the backlog: :meth:`add_event` raises :class:`SpoolFull` rather than
    take more pending deliveries. ``synchronous`` is ``"normal"`` (survives a crash of the daemon)
    or ``"full"`` (also survives power loss); see the module docstring. ``clock`` stamps
    ``created_at`` of deliveries. ``busy_timeout`` is how long a write waits for another process
    holding the database's write lock (a maintenance command, say) before it fails; it blocks the
    event loop for that long, so it is kept short.

    ``max_size`` bounds the bytes the database's live pages take (see :meth:`live_bytes`);
    :class:`phonepush.store.housekeeping.Housekeeper` enforces it, evicting finished events and,
    when pending work alone is over it, setting :attr:`full`, which makes :meth:`add_event` refuse.
    The spool file and its side files are created ``0600`` (and an existing one is narrowed to
    that); a symbolic link at ``path`` or at its folder is refused unless ``follow_symlinks``.
    ``trusted_links`` are links taken all the same when root owns them: the folders the service
    manager made (systemd's ``StateDirectory=`` under ``DynamicUser=`` is a root-owned link to
    ``private/<name>``, and only root could have put it there).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_pending: int = 100_000,
        synchronous: str = "normal",
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 0.2,
        max_size: int | None = None,
        follow_symlinks: bool = False,
        trusted_links: Collection[Path] = (),
    ) -> None:
        if synchronous.lower() not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {sorted(_SYNCHRONOUS)}, not {synchronous!r}"
            )
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        self.path = Path(path)
        self.max_pending = max_pending
        self.max_size = max_size
        self.follow_symlinks = follow_symlinks
        self._trusted_links = frozenset(Path(link) for link in trusted_links)
        #: True while pending work alone is over ``max_size``: :meth:`add_event` refuses.
        self.full = False
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
        self._refuse_links(self.path.parent)
        try:
            # Folders made here are the daemon's own: 0700, whatever the umask.
            missing = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
            for folder in reversed(missing):
                folder.mkdir(mode=_DIR_MODE)
        except FileExistsError:
            pass  # made meanwhile by someone else; what it is is checked when the file opens
        except OSError as exc:
            raise SpoolError(
                f"spool {self.path}: cannot create folder {exc.filename}: {exc.strerror}"
            ) from exc
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
        alerts: Sequence[NewAlert] = (),
        groups: Sequence[NewGroupedEvent] = (),
    ) -> list[Delivery]:
        """Store an event, its deliveries, its pages and the cooldowns it starts, in one commit.

        Returns the deliveries with their ids, in the given order. Raises :class:`SpoolFull` (and
        writes nothing) if the new pending deliveries would take the backlog over ``max_pending``;
        :class:`SpoolError` (and writes nothing) if the database cannot take the write.
        """
        # Everything that can fail outside SQLite happens before the transaction starts.
        requests = _dump_new(deliveries)
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
        if self.full:
            raise SpoolFull(
                f"spool {self.path}: pending work alone is over max_size ({self.max_size} bytes);"
                " refusing events until deliveries finish"
            )
        if self._pending + new_pending > self.max_pending:
            raise SpoolFull(
                f"spool {self.path}: {self._pending} deliveries pending,"
                f" {new_pending} more would exceed the limit of {self.max_pending}"
            )
        created_at = self._clock()
        try:
            self._set_synchronous(conn, self.synchronous)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_INSERT_EVENT, event_row)
            ids = _insert_deliveries(conn, event.id, deliveries, requests, created_at)
            if page_rows:
                conn.executemany(_INSERT_PAGE, page_rows)
            if cooldowns:
                conn.executemany(_UPSERT_COOLDOWN, cooldowns)
            if alerts:
                self._insert_alerts(conn, event.id, alerts)
            if groups:
                self._insert_grouped(conn, event.id, groups)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._write_failed(f"cannot store event {event.id}", exc) from exc
        except BaseException:
            self._abandon(conn)
            raise
        stored = _stored(ids, event.id, deliveries, created_at)
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
        """Move a pending delivery to its final ``state`` (one of :data:`FINAL_STATES`).

        Does nothing for a delivery that is no longer pending, so finishing twice is harmless.
        """
        if state not in FINAL_STATES:
            raise ValueError(f"cannot finish a delivery as {state!r}")
        changed = self._write(
            _FINISH, (state, error, delivery_id), f"cannot finish delivery {delivery_id}"
        )
        self._pending -= changed

    def finish_many(self, finished: Sequence[tuple[int, str, str]]) -> None:
        """:meth:`finish` for many ``(delivery_id, state, error)`` in one transaction: one commit
        for all the answers of a fan-out that arrive together, instead of one each."""
        for _, state, _ in finished:
            if state not in FINAL_STATES:
                raise ValueError(f"cannot finish a delivery as {state!r}")
        if not finished:
            return
        conn = self._connection()
        try:
            self._set_synchronous(conn, "normal")
            conn.execute("BEGIN IMMEDIATE")
            changed = 0
            for delivery_id, state, error in finished:
                changed += conn.execute(_FINISH, (state, error, delivery_id)).rowcount
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._write_failed(f"cannot finish {len(finished)} deliveries", exc) from exc
        self._committed()
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
        """Delete every finished event received before ``before`` (no pending delivery, not in a
        grouping window, no repeat to come) with its deliveries, pages and alerts, and cooldowns
        that ended before ``before``. All in one go: the daemon uses :meth:`purge_batch`.

        Returns how many events were deleted.
        """
        total = 0
        cursor = (-math.inf, 0)
        while True:
            removed, cursor = self.purge_batch(before, 1000, cursor)
            total += removed
            if removed < 1000:
                break
        while self.purge_cooldowns(before, 1000) == 1000:
            pass
        return total

    def purge_batch(
        self, before: float, limit: int, cursor: tuple[float, int] = (-math.inf, 0)
    ) -> tuple[int, tuple[float, int]]:
        """Delete up to ``limit`` of the oldest finished events received before ``before``
        (``math.inf``: any age) and after ``cursor``, with their rows, in one short transaction.

        Returns how many were deleted and the cursor to pass next time; fewer than ``limit``
        means none are left.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        conn = self._connection()
        after_at, after_seq = cursor
        try:
            self._set_synchronous(conn, "normal")
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(
                _PURGEABLE, (before, after_at, after_at, after_seq, limit)
            ).fetchall()
            doomed = [(row[0],) for row in rows]
            if doomed:
                self._purge_alerts(conn, doomed)
                conn.executemany("DELETE FROM deliveries WHERE event_id = ?", doomed)
                conn.executemany("DELETE FROM pages WHERE event_id = ?", doomed)
                conn.executemany("DELETE FROM events WHERE id = ?", doomed)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._write_failed("cannot purge", exc) from exc
        except BaseException:
            self._abandon(conn)
            raise
        if doomed:
            self._committed()
            cursor = (float(rows[-1][1]), int(rows[-1][2]))
        return len(doomed), cursor

    def purge_cooldowns(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` cooldowns that ended before ``before``; how many were."""
        return self._write(_EXPIRED_COOLDOWNS, (before, limit), "cannot purge cooldowns")

    def live_bytes(self) -> int:
        """Bytes the database's pages in use take: what ``max_size`` bounds.

        Pages freed by a purge stay in the file and are reused by later writes, so the file
        stops growing once this is held under the limit; the write-ahead log comes on top, up to
        about the checkpoint interval's worth (a few MiB) between checkpoints.
        """
        conn = self._connection()
        try:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
        except sqlite3.Error as exc:
            raise self._read_failed("cannot measure the database", exc) from exc
        return int((pages - free) * size)

    def disk_bytes(self) -> int:
        """What the spool's files take on disk now: the database, its log and its index.

        Read by the ``phonepush_spool_bytes`` gauge at scrape time; never raises (a file that
        is missing counts 0).
        """
        total = 0
        for name in (self.path, *(self._side(s) for s in _SIDE_FILES)):
            try:
                total += name.stat().st_size
            except OSError:
                continue
        return total

    def check(self) -> None:
        """Raise :class:`SpoolError` unless a write to the database succeeds now.

        The readiness probe: it commits one small row, so a full disk, a read-only file or a lock
        held elsewhere shows up here.
        """
        self._write(_PROBE, (repr(self._clock()),), "not writable")

    # -- internals -------------------------------------------------------------------------

    def _side(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def _refuse_links(self, *paths: Path) -> None:
        if self.follow_symlinks:
            return
        for path in paths:
            if path.is_symlink() and not self._trusted(path):
                raise SpoolError(
                    f"spool {self.path}: {path} is a symbolic link (to {os.readlink(path)});"
                    " refused unless spool.follow_symlinks = true"
                )

    def _trusted(self, link: Path) -> bool:
        return link in self._trusted_links and link.lstat().st_uid == 0

    def _prepare_file(self) -> None:
        """Create the database file 0600 (SQLite gives its -wal and -shm the same mode), or
        narrow an existing one to 0600; refuse symbolic links unless ``follow_symlinks``."""
        sides = [self._side(suffix) for suffix in _SIDE_FILES]
        self._refuse_links(self.path.parent, self.path, *sides)
        # Made here, before SQLite would make it with its own 0644; O_EXCL and O_NOFOLLOW so a
        # link slipped in meanwhile is not followed. With follow_symlinks the link's target is.
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        if not self.follow_symlinks:
            flags |= os.O_EXCL | os.O_NOFOLLOW
        if not self.path.exists():
            try:
                os.close(os.open(self.path, flags, _FILE_MODE))
            except FileExistsError:
                pass
            except OSError as exc:
                raise SpoolError(f"spool {self.path}: cannot create: {exc.strerror}") from exc
        for path in (self.path, *sides):
            try:
                mode = path.stat().st_mode
                if stat.S_IMODE(mode) & 0o077 and stat.S_ISREG(mode):
                    path.chmod(_FILE_MODE)
                    _log.info("spool %s: narrowed %s to mode 0600", self.path, path.name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                # Not ours to change (another owner): it still opens, so say so and go on.
                _log.warning("spool %s: cannot make %s private: %s", self.path, path, exc)

    def _connect(self) -> sqlite3.Connection:
        self._prepare_file()
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
            # Every statement is CREATE ... IF NOT EXISTS, so running them on each open is cheap
            # and also adds the tables a newer phonepush brought to a file of the same version.
            if version <= SCHEMA_VERSION:
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

    # --- acknowledgements and repeats ---

    def alerts_due(self, now: float) -> list[AlertRecord]:
        """Active alerts whose next repeat is due at ``now``, soonest first."""
        rows = self._fetchall(_ALERTS_DUE, (now,), "cannot read alerts")
        return [_alert(row) for row in rows]

    def next_repeat_at(self) -> float | None:
        """When the soonest repeat of any active alert is due, or None if none is."""
        row = self._fetchone(_NEXT_REPEAT, (), "cannot read alerts")
        return None if row is None or row[0] is None else float(row[0])

    def alerts_of(self, event_id: str) -> list[AlertRecord]:
        """The alerts an event started (one per rule that acks, repeats or resolves)."""
        rows = self._fetchall(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE event_id = ? ORDER BY rule",
            (event_id,),
            "cannot read alerts",
        )
        return [_alert(row) for row in rows]

    def alert_phones_of(self, event_id: str) -> list[AlertPhone]:
        """Every phone of every alert of an event, with its acknowledgement."""
        rows = self._fetchall(
            f"SELECT {_ALERT_PHONE_COLUMNS} FROM alert_phones WHERE event_id = ?",
            (event_id,),
            "cannot read alerts",
        )
        return [_alert_phone(row) for row in rows]

    def delivery_rounds(self, event_id: str) -> dict[int, tuple[int, str]]:
        """Delivery id -> (round, kind: repeat|escalation|resolved) for the deliveries that
        repeats and resolves added to an event; the first pages are not listed (round 0)."""
        rows = self._fetchall(
            "SELECT a.delivery_id, a.round, a.kind FROM alert_deliveries a"
            " JOIN deliveries d ON d.id = a.delivery_id WHERE d.event_id = ?",
            (event_id,),
            "cannot read deliveries",
        )
        return {row[0]: (row[1], row[2]) for row in rows}

    def alert_by_token(self, token: str) -> tuple[AlertRecord, AlertPhone] | None:
        """The alert and phone an ack token was handed to, or None."""
        row = self._fetchone(
            f"SELECT {_ALERT_PHONE_COLUMNS} FROM alert_phones WHERE token = ?",
            (token,),
            "cannot read alerts",
        )
        if row is None:
            return None
        phone = _alert_phone(row)
        alert = self._fetchone(_ALERT, (phone.event_id, phone.rule), "cannot read alerts")
        return None if alert is None else (_alert(alert), phone)

    def repeat_round(
        self, event_id: str, rule: str, now: float
    ) -> tuple[AlertRecord, list[Delivery]] | None:
        """Push the next round of an active alert whose repeat is due: one delivery per phone
        that still waits for it (all phones, or those that have not acknowledged with scope
        "phone"; escalation phones from round ``escalate_after`` on), skipping a phone whose
        earlier delivery is still pending. Returns the updated alert and the new deliveries, or
        None if the alert is no longer active. Raises :class:`SpoolFull` (writing nothing) when
        the backlog has no room.
        """
        conn = self._connection()
        created: list[Delivery] = []
        try:
            self._set_synchronous(conn, "normal")
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(_ALERT, (event_id, rule)).fetchone()
            if row is None or row[11] != "active" or row[10] is None:
                conn.execute("COMMIT")
                return None
            alert = _alert(row)
            number = alert.rounds + 1
            busy = {
                r[0]
                for r in conn.execute(
                    "SELECT phone FROM deliveries WHERE event_id = ? AND rule = ?"
                    " AND state = 'pending'",
                    (event_id, rule),
                )
            }
            escalating = alert.escalate_after > 0 and number >= alert.escalate_after
            targets = [
                (phone, requests, bool(escalation))
                for phone, requests, escalation, acked_at in conn.execute(
                    "SELECT phone, requests, escalation, acked_at FROM alert_phones"
                    " WHERE event_id = ? AND rule = ? ORDER BY rowid",
                    (event_id, rule),
                )
                if (not escalation or escalating)
                and (alert.scope == "any" or acked_at is None)
                and phone not in busy
            ]
            if self._pending + len(targets) > self.max_pending:
                raise SpoolFull(
                    f"spool {self.path}: no room for round {number} of {rule} ({event_id})"
                )
            expires_at = now + min(alert.ttl, alert.repeat)
            for phone, requests, escalation in targets:
                delivery_id = self._insert_delivery(
                    conn, event_id, rule, phone, requests, now, expires_at
                )
                conn.execute(
                    "INSERT INTO alert_deliveries (delivery_id, round, kind) VALUES (?, ?, ?)",
                    (delivery_id, number, "escalation" if escalation else "repeat"),
                )
                created.append(
                    _pending_delivery(delivery_id, event_id, rule, phone, requests, now, expires_at)
                )
            next_at = now + alert.repeat if number < alert.max_repeats else None
            conn.execute(
                "UPDATE alerts SET rounds = ?, next_at = ? WHERE event_id = ? AND rule = ?",
                (number, next_at, event_id, rule),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._write_failed(f"cannot repeat {rule} of event {event_id}", exc) from exc
        except BaseException:
            self._abandon(conn)
            raise
        self._pending += len(created)
        self._committed()
        alert = AlertRecord(**{**_asdict(alert), "rounds": number, "next_at": next_at})
        return alert, created

    def acknowledge(self, token: str, at: float, by: str) -> AckResult | None:
        """Record that the phone holding ``token`` acknowledged its page at ``at``.

        The phone's latest delivery of the page becomes "acknowledged"; with scope "any" the
        alert stops (its pending deliveries to every phone are cancelled), with scope "phone"
        only that phone's are, and the alert stops once every phone it went to acknowledged.
        A second press changes nothing (``first`` is False). Returns None for an unknown token.
        """
        conn = self._connection()
        cancelled: list[int] = []
        try:
            self._set_synchronous(conn, "normal")
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                f"SELECT {_ALERT_PHONE_COLUMNS} FROM alert_phones WHERE token = ?", (token,)
            ).fetchone()
            alert_row = None if row is None else conn.execute(_ALERT, (row[0], row[1])).fetchone()
            if row is None or alert_row is None:
                conn.execute("COMMIT")
                return None
            phone, alert = _alert_phone(row), _alert(alert_row)
            if phone.acked_at is not None:
                conn.execute("COMMIT")
                return AckResult(alert, phone, first=False)
            conn.execute(
                "UPDATE alert_phones SET acked_at = ?, acked_by = ? WHERE token = ?",
                (at, by, token),
            )
            # The delivery that put the page on this phone: delivered, or still on the wire
            # (the page is on screen while a Play: item holds the phone's answer).
            shown = conn.execute(
                "SELECT max(id) FROM deliveries WHERE event_id = ? AND rule = ? AND phone = ?"
                " AND state IN ('delivered', 'pending')",
                (alert.event_id, alert.rule, phone.phone),
            ).fetchone()[0]
            if shown is not None:
                pending_before = conn.execute(
                    "SELECT state FROM deliveries WHERE id = ?", (shown,)
                ).fetchone()[0]
                conn.execute(
                    "UPDATE deliveries SET state = 'acknowledged', error = '' WHERE id = ?",
                    (shown,),
                )
                if pending_before == "pending":
                    cancelled.append(shown)
            if alert.state == "active":
                everyone = alert.scope == "any"
                cancelled += self._cancel_pending(
                    conn, alert, None if everyone else phone.phone, f"acknowledged on {phone.phone}"
                )
                if not everyone:
                    waiting = conn.execute(
                        "SELECT count(*) FROM alert_phones WHERE event_id = ? AND rule = ?"
                        " AND acked_at IS NULL AND (escalation = 0 OR ?)",
                        (
                            alert.event_id,
                            alert.rule,
                            alert.escalate_after > 0 and alert.rounds >= alert.escalate_after,
                        ),
                    ).fetchone()[0]
                    everyone = waiting == 0
                if everyone:
                    conn.execute(
                        "UPDATE alerts SET state = 'acknowledged', ended_at = ?, ended_by = ?,"
                        " next_at = NULL WHERE event_id = ? AND rule = ?",
                        (at, phone.phone, alert.event_id, alert.rule),
                    )
                    alert_row = conn.execute(_ALERT, (alert.event_id, alert.rule)).fetchone()
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._write_failed("cannot record an acknowledgement", exc) from exc
        except BaseException:
            self._abandon(conn)
            raise
        self._pending -= len(cancelled)
        self._committed()
        acked = AlertPhone(**{**_asdict(phone), "acked_at": at, "acked_by": by})
        return AckResult(_alert(alert_row), acked, first=True, cancelled=tuple(cancelled))

    def resolve(
        self,
        rule: str,
        key: str,
        *,
        by_event: str,
        at: float,
        notice: Callable[[AlertRecord, str], tuple[str, str, tuple[PushRequest, ...]]],
    ) -> list[Resolution]:
        """Resolve the earlier alerts of ``rule`` with dedupe ``key`` (not yet resolved, not
        started by ``by_event``): their repeats stop, their pending deliveries are cancelled, the
        rule's cooldown for ``key`` ends, and every phone that showed the page gets a notice.

        ``notice(alert, page_xml)`` renders the notice: (page id, page XML, requests).
        """
        conn = self._connection()
        resolved: list[Resolution] = []
        added = 0
        cancelled_total = 0
        try:
            self._set_synchronous(conn, "normal")
            conn.execute("BEGIN IMMEDIATE")
            alerts = [
                _alert(row)
                for row in conn.execute(
                    f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE rule = ? AND key = ?"
                    " AND state != 'resolved' AND event_id != ?",
                    (rule, key, by_event),
                )
            ]
            for alert in alerts:
                cancelled = self._cancel_pending(conn, alert, None, f"resolved by {by_event}")
                cancelled_total += len(cancelled)
                conn.execute(
                    "UPDATE alerts SET state = 'resolved', ended_at = ?, ended_by = ?,"
                    " next_at = NULL WHERE event_id = ? AND rule = ?",
                    (at, by_event, alert.event_id, alert.rule),
                )
                shown = [
                    r[0]
                    for r in conn.execute(
                        "SELECT phone FROM deliveries WHERE event_id = ? AND rule = ?"
                        " AND state IN ('delivered', 'acknowledged')"
                        " GROUP BY phone ORDER BY min(id)",
                        (alert.event_id, alert.rule),
                    )
                ]
                page = conn.execute(_PAGE, (alert.page_id,)).fetchone() if alert.page_id else None
                notices: list[Delivery] = []
                if page is not None and shown:
                    page_id, xml, requests = notice(alert, page[0])
                    conn.execute(
                        "INSERT OR REPLACE INTO pages (id, event_id, xml) VALUES (?, ?, ?)",
                        (page_id, alert.event_id, xml),
                    )
                    dumped = _dump_requests(requests)
                    for phone in shown:
                        delivery_id = self._insert_delivery(
                            conn, alert.event_id, rule, phone, dumped, at, at + alert.ttl
                        )
                        conn.execute(
                            "INSERT INTO alert_deliveries (delivery_id, round, kind)"
                            " VALUES (?, ?, 'resolved')",
                            (delivery_id, alert.rounds),
                        )
                        notices.append(
                            _pending_delivery(
                                delivery_id, alert.event_id, rule, phone, dumped, at, at + alert.ttl
                            )
                        )
                added += len(notices)
                ended = AlertRecord(
                    **{
                        **_asdict(alert),
                        "state": "resolved",
                        "ended_at": at,
                        "ended_by": by_event,
                        "next_at": None,
                    }
                )
                resolved.append(Resolution(ended, tuple(cancelled), tuple(notices)))
            if alerts:
                conn.execute("DELETE FROM cooldowns WHERE rule = ? AND key = ?", (rule, key))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._write_failed(f"cannot resolve {rule}", exc) from exc
        except BaseException:
            self._abandon(conn)
            raise
        self._pending += added - cancelled_total
        if alerts:
            self._committed()
        return resolved

    def _insert_alerts(
        self, conn: sqlite3.Connection, event_id: str, alerts: Sequence[NewAlert]
    ) -> None:
        for alert in alerts:
            conn.execute(
                "INSERT INTO alerts (event_id, rule, key, page_id, scope, repeat, max_repeats,"
                " escalate_after, ttl, next_at, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active')",
                (
                    event_id,
                    alert.rule,
                    alert.key,
                    alert.page_id,
                    alert.scope,
                    alert.repeat,
                    alert.max_repeats,
                    alert.escalate_after,
                    alert.ttl,
                    alert.next_at,
                ),
            )
            conn.executemany(
                "INSERT INTO alert_phones (event_id, rule, phone, token, requests, escalation)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        event_id,
                        alert.rule,
                        p.phone,
                        p.token,
                        _dump_requests(p.requests),
                        int(p.escalation),
                    )
                    for p in alert.phones
                ],
            )

    def _insert_delivery(
        self,
        conn: sqlite3.Connection,
        event_id: str,
        rule: str,
        phone: str,
        requests: str,
        created_at: float,
        expires_at: float,
    ) -> int:
        cursor = conn.execute(
            _INSERT_DELIVERY,
            (event_id, rule, phone, requests, created_at, expires_at, "pending", ""),
        )
        return cast(int, cursor.lastrowid)

    def _cancel_pending(
        self, conn: sqlite3.Connection, alert: AlertRecord, phone: str | None, why: str
    ) -> list[int]:
        """Mark an alert's pending deliveries (to one phone, or all) suppressed; their ids."""
        sql = "SELECT id FROM deliveries WHERE event_id = ? AND rule = ? AND state = 'pending'"
        params: tuple[str, ...] = (alert.event_id, alert.rule)
        if phone is not None:
            sql += " AND phone = ?"
            params += (phone,)
        ids = [row[0] for row in conn.execute(sql, params)]
        conn.executemany(
            "UPDATE deliveries SET state = 'suppressed', error = ? WHERE id = ?",
            [(why, i) for i in ids],
        )
        return ids

    def _purge_alerts(self, conn: sqlite3.Connection, doomed: Sequence[tuple[str]]) -> None:
        conn.executemany(
            "DELETE FROM alert_deliveries WHERE delivery_id IN"
            " (SELECT id FROM deliveries WHERE event_id = ?)",
            doomed,
        )
        conn.executemany("DELETE FROM alert_phones WHERE event_id = ?", doomed)
        conn.executemany("DELETE FROM alerts WHERE event_id = ?", doomed)

    # --- silences and groups ---
    #
    # Silences are written through by phonepush.silence.Silences, which keeps them in memory.
    # Grouped events wait in grouped_events (committed with their event, so acknowledged) under
    # a grouping window per (rule, key); phonepush.grouping flushes a window once it is due into
    # ordinary deliveries, in one transaction that also removes the window and its events.

    def add_silence(self, silence: StoredSilence) -> None:
        """Store a silence (its id must be new)."""
        self._write(
            _INSERT_SILENCE,
            (
                silence.id,
                silence.matchers,
                silence.starts_at,
                silence.ends_at,
                silence.created_at,
                silence.created_by,
                silence.comment,
            ),
            f"cannot store silence {silence.id}",
        )

    def delete_silence(self, silence_id: str) -> bool:
        """Remove a silence; False if there was none with that id."""
        return bool(
            self._write(
                "DELETE FROM silences WHERE id = ?", (silence_id,), "cannot delete a silence"
            )
        )

    def stored_silences(self) -> list[StoredSilence]:
        """Every stored silence, oldest first."""
        rows = self._fetchall(_SILENCES, (), "cannot read silences")
        return [StoredSilence(*row) for row in rows]

    def next_group_due(self) -> float | None:
        """When the earliest grouping window is due, or None if no window is open."""
        row = self._fetchone(
            "SELECT min(due_at) FROM grouping_windows", (), "cannot read grouping windows"
        )
        return None if row is None or row[0] is None else float(row[0])

    def due_groups(self, now: float) -> list[GroupWindow]:
        """The grouping windows due at ``now``, each with its events in arrival order."""
        windows = self._fetchall(_DUE_WINDOWS, (now,), "cannot read grouping windows")
        out: list[GroupWindow] = []
        for rule, key, opened_at, due_at, ttl in windows:
            rows = self._fetchall(_WINDOW_EVENTS, (rule, key), "cannot read grouped events")
            events = tuple(
                GroupedEvent(
                    seq=seq,
                    event_id=event_id,
                    phones=tuple(json.loads(phones)),
                    content=content,
                    source=source or "",
                    topic=topic or "",
                    payload=bytes(payload or b""),
                    received_at=received_at or 0.0,
                )
                for seq, event_id, phones, content, source, topic, payload, received_at in rows
            )
            out.append(GroupWindow(rule, key, opened_at, due_at, ttl, events))
        return out

    def flush_group(
        self,
        window: GroupWindow,
        *,
        event_id: str,
        deliveries: Sequence[NewDelivery],
        pages: Mapping[str, str],
    ) -> list[Delivery]:
        """Turn a due window into ``deliveries`` (and ``pages``) of ``event_id``, and remove the
        window and its events, in one commit. Not subject to ``max_pending``: the events were
        accepted already. Returns the deliveries with their ids."""
        requests = _dump_new(deliveries)
        last = max((e.seq for e in window.events), default=0)
        conn = self._connection()
        created_at = self._clock()
        try:
            self._set_synchronous(conn, self.synchronous)
            conn.execute("BEGIN IMMEDIATE")
            ids = _insert_deliveries(conn, event_id, deliveries, requests, created_at)
            conn.executemany(
                _INSERT_PAGE, [(page_id, event_id, xml) for page_id, xml in pages.items()]
            )
            conn.execute(
                "DELETE FROM grouped_events WHERE rule = ? AND key = ? AND seq <= ?",
                (window.rule, window.key, last),
            )
            # An event that joined after the window was read keeps it open (and due).
            conn.execute(
                "DELETE FROM grouping_windows WHERE rule = ? AND key = ? AND NOT EXISTS"
                " (SELECT 1 FROM grouped_events WHERE rule = ? AND key = ?)",
                (window.rule, window.key, window.rule, window.key),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._write_failed(f"cannot flush group {window.rule}", exc) from exc
        except BaseException:
            self._abandon(conn)
            raise
        stored = _stored(ids, event_id, deliveries, created_at)
        self._pending += sum(1 for new in deliveries if new.state == "pending")
        self._committed()
        return stored

    def _insert_grouped(
        self, conn: sqlite3.Connection, event_id: str, groups: Sequence[NewGroupedEvent]
    ) -> None:
        now = self._clock()
        for group in groups:
            # The first event of a (rule, key) opens the window; later ones only join it.
            conn.execute(
                "INSERT INTO grouping_windows (rule, key, opened_at, due_at, ttl)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (rule, key) DO NOTHING",
                (group.rule, group.key, now, group.due_at, group.ttl),
            )
            conn.execute(
                "INSERT INTO grouped_events (rule, key, event_id, phones, content)"
                " VALUES (?, ?, ?, ?, ?)",
                (group.rule, group.key, event_id, json.dumps(list(group.phones)), group.content),
            )


_ALERT: Final = f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE event_id = ? AND rule = ?"
_ALERTS_DUE: Final = (
    f"SELECT {_ALERT_COLUMNS} FROM alerts INDEXED BY alerts_due"
    " WHERE state = 'active' AND next_at IS NOT NULL AND next_at <= ? ORDER BY next_at"
)
_NEXT_REPEAT: Final = (
    "SELECT min(next_at) FROM alerts INDEXED BY alerts_due"
    " WHERE state = 'active' AND next_at IS NOT NULL"
)


def _alert(row: Sequence[Any]) -> AlertRecord:
    return AlertRecord(*row)


def _alert_phone(row: Sequence[Any]) -> AlertPhone:
    event_id, rule, phone, token, escalation, acked_at, acked_by = row
    return AlertPhone(event_id, rule, phone, token, bool(escalation), acked_at, acked_by)


def _pending_delivery(
    delivery_id: int,
    event_id: str,
    rule: str,
    phone: str,
    requests: str,
    created_at: float,
    expires_at: float,
) -> Delivery:
    row = (delivery_id, event_id, rule, phone, requests, 0, 0, created_at, expires_at)
    return _delivery((*row, "pending", ""))


def _asdict(record: AlertRecord | AlertPhone) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


def _dump_new(deliveries: Sequence[NewDelivery]) -> list[str]:
    """Check new deliveries and serialise their requests, before any transaction starts."""
    for new in deliveries:
        if new.state not in INTAKE_STATES:
            raise ValueError(f"a new delivery cannot be {new.state!r}")
    return [_dump_requests(new.requests) for new in deliveries]


def _insert_deliveries(
    conn: sqlite3.Connection,
    event_id: str,
    deliveries: Sequence[NewDelivery],
    requests: Sequence[str],
    created_at: float,
) -> list[int]:
    """Insert new deliveries inside the caller's transaction; return their ids, in order."""
    ids: list[int] = []
    for new, dumped in zip(deliveries, requests, strict=True):
        row = (
            event_id,
            new.rule,
            new.phone,
            dumped,
            created_at,
            new.expires_at,
            new.state,
            new.error,
        )
        ids.append(cast(int, conn.execute(_INSERT_DELIVERY, row).lastrowid))
    return ids


def _stored(
    ids: Sequence[int], event_id: str, deliveries: Sequence[NewDelivery], created_at: float
) -> list[Delivery]:
    """The rows just inserted, as the dispatcher sees them."""
    return [
        Delivery(
            id=delivery_id,
            event_id=event_id,
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


# --- silences and groups ---

_INSERT_SILENCE: Final = (
    "INSERT INTO silences (id, matchers, starts_at, ends_at, created_at, created_by, comment)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SILENCES: Final = (
    "SELECT id, matchers, starts_at, ends_at, created_at, created_by, comment FROM silences"
    " ORDER BY created_at, id"
)
_DUE_WINDOWS: Final = (
    "SELECT rule, key, opened_at, due_at, ttl FROM grouping_windows WHERE due_at <= ?"
    " ORDER BY due_at"
)
_WINDOW_EVENTS: Final = (
    "SELECT g.seq, g.event_id, g.phones, g.content, e.source, e.topic, e.payload, e.received_at"
    " FROM grouped_events AS g LEFT JOIN events AS e ON e.id = g.event_id"
    " WHERE g.rule = ? AND g.key = ? ORDER BY g.seq"
)


@dataclass(frozen=True, slots=True)
class StoredSilence:
    """A silence row; ``matchers`` is their JSON (phonepush.silence reads and writes it)."""

    id: str
    matchers: str
    starts_at: float
    ends_at: float
    created_at: float
    created_by: str
    comment: str


@dataclass(frozen=True, slots=True)
class NewGroupedEvent:
    """What intake hands the spool, with an event, for a rule that groups: the event joins the
    (rule, key) window, opening it (due at ``due_at``) if none is open. ``content`` is what the
    event contributes to the group's page (JSON, written and read by phonepush.grouping.grouper)."""

    rule: str
    key: str
    phones: tuple[str, ...]
    content: str
    due_at: float
    ttl: float


@dataclass(frozen=True, slots=True)
class GroupedEvent:
    """An event waiting in a grouping window, with what silences match on."""

    seq: int
    event_id: str
    phones: tuple[str, ...]
    content: str
    source: str
    topic: str
    payload: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class GroupWindow:
    """An open grouping window and its events."""

    rule: str
    key: str
    opened_at: float
    due_at: float
    ttl: float
    events: tuple[GroupedEvent, ...]
