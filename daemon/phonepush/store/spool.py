"""The spool: the daemon's SQLite store of events, deliveries, pages, cooldowns, alerts, groups
and silences (WAL). It implements :mod:`phonepush.store.interface`.

:class:`Spool` owns the database file and its one connection: file safety, WAL checkpoints, the
synchronous level, size accounting and :meth:`Spool.transaction`. Its tables are reached through
the repositories of :mod:`phonepush.store.tables` (``spool.events``, ``spool.deliveries``,
``spool.alerts``, ``spool.groups``, ``spool.silences``). Intake commits an event and everything it
leads to in one transaction (:func:`phonepush.store.commit.commit_event`) before the event is
acknowledged; the dispatcher takes pending deliveries from here, records progress, and finishes
them. A restart resumes exactly what was accepted.

Durability
    The database runs in WAL mode. With ``synchronous="normal"`` (the default) a commit appends to
    the write-ahead log without waiting for fsync: the write is in the operating system's page
    cache when the commit returns, so a crash or SIGKILL of the daemon loses nothing that was
    committed, but a power loss or kernel crash may lose the last commits (never corrupting the
    file). ``synchronous="full"`` fsyncs the log at every *durable* commit (an accepted event, a
    group flush), so acknowledged events also survive power loss, at the cost of one fsync per
    event (see ``docs/performance.md``, section "Spool").

    Other writes (progress, finishing, acks, purges, ``check``) never wait for fsync, whatever
    the setting: the next fsync (a durable commit under "full", or a checkpoint) makes them durable
    too. A power cut can only lose the last of them, which means a delivery is resumed and a push
    sent again: delivery is at-least-once anyway (``docs/design.md``), and an acknowledged event
    is never lost.

Threading and latency
    The interface is async (a store on a network database must not stall the loop), but every
    call here does its work synchronously on the event loop thread and never suspends, with no
    thread in between: SQLite on a local disk is fast enough that a thread hop would cost more
    than the call. Each one is a handful of prepared statements (``sqlite3`` caches them per
    connection) and at most one commit, well under a millisecond with ``synchronous="normal"``.
    The connection lives as long as the spool; it is only reopened after a failure left it
    unusable. What would stall the loop is the checkpoint (copying the log into the database
    file, with two fsyncs) that SQLite runs after a commit now and then; the spool runs
    checkpoints on a second connection in a worker thread instead.

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
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from phonepush.errors import SpoolError
from phonepush.store.backlog import Backlog
from phonepush.store.interface import Store

# The records are phonepush.store.records'; named here too for code that imports them with Spool.
from phonepush.store.records import (
    ALERT_STATES,
    FINAL_STATES,
    INTAKE_STATES,
    AlertPhone,
    AlertRecord,
    Delivery,
    DeliveryKind,
    DeliveryState,
    EventRecord,
    EventSummary,
    GroupedEvent,
    GroupWindow,
    NewAlert,
    NewAlertPhone,
    NewDelivery,
    NewGroupedEvent,
    PushRequest,
    RequestKind,
    StoredSilence,
)
from phonepush.store.tables import SQLITE, Dialect, Repositories

__all__ = [
    "ALERT_STATES",
    "FINAL_STATES",
    "INTAKE_STATES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "AlertPhone",
    "AlertRecord",
    "Delivery",
    "DeliveryKind",
    "DeliveryState",
    "EventRecord",
    "EventSummary",
    "GroupWindow",
    "GroupedEvent",
    "NewAlert",
    "NewAlertPhone",
    "NewDelivery",
    "NewGroupedEvent",
    "PushRequest",
    "RequestKind",
    "Spool",
    "StoredSilence",
    "read_recent",
]


# Errors that come from what the caller passed (a duplicate id, a value SQLite cannot bind): they
# fail that call but say nothing about the disk, so they leave ``healthy`` alone.
_CALLER_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
    sqlite3.DataError,
)
_SYNCHRONOUS: Final = frozenset({"normal", "full", "extra"})
# Keeps the log from staying at its high-water mark after a burst; checkpoints truncate to this.
_JOURNAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
# Background checkpoints run after this many commits (an event with one delivery writes about
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
CREATE TABLE IF NOT EXISTS alert_actions (
    token TEXT PRIMARY KEY,
    event_id TEXT NOT NULL,
    rule TEXT NOT NULL,
    phone TEXT NOT NULL,
    page_token TEXT NOT NULL,
    position INTEGER NOT NULL,
    label TEXT NOT NULL,
    spec TEXT NOT NULL,
    confirm INTEGER NOT NULL,
    repeatable INTEGER NOT NULL,
    with_ack INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE INDEX IF NOT EXISTS alert_actions_page ON alert_actions (page_token);
CREATE INDEX IF NOT EXISTS alert_actions_event ON alert_actions (event_id);
CREATE TABLE IF NOT EXISTS action_presses (
    id INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    rule TEXT NOT NULL,
    phone TEXT NOT NULL,
    label TEXT NOT NULL,
    at REAL NOT NULL,
    result TEXT NOT NULL,
    by TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS action_presses_event ON action_presses (event_id);
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
CREATE TABLE IF NOT EXISTS schedule_firings (
    schedule TEXT PRIMARY KEY,
    scheduled_at REAL NOT NULL,
    fired_at REAL NOT NULL
) WITHOUT ROWID;
"""

#: The migrations, in order: ``MIGRATIONS[n - 1]`` takes a spool from version n - 1 to n. A later
#: version appends its statements (tables and columns added, so an older file still opens);
#: none is ever edited. The version is kept in ``meta`` (``schema_version``) and in
#: ``PRAGMA user_version``, which phonepush releases before the key read.
MIGRATIONS: Final[tuple[str, ...]] = (_SCHEMA,)
SCHEMA_VERSION: Final = len(MIGRATIONS)

_COUNT_PENDING: Final = "SELECT count(*) FROM deliveries WHERE state = 'pending'"
_HAS_META: Final = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
_SCHEMA_VERSION_KEY: Final = "SELECT value FROM meta WHERE key = 'schema_version'"
_PROBE: Final = "INSERT OR REPLACE INTO meta (key, value) VALUES ('checked_at', ?)"


class _SpoolFile:
    """The database file and its side files: made private (0600, folders 0700), symbolic links
    refused unless followed on purpose or trusted."""

    def __init__(self, path: Path, *, follow_symlinks: bool, trusted_links: Collection[Path]):
        self.path = path
        self.follow_symlinks = follow_symlinks
        self._trusted_links = frozenset(Path(link) for link in trusted_links)

    def side(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def make_folder(self) -> None:
        """Create the file's folder (and those above it) 0700, whatever the umask."""
        self.refuse_links(self.path.parent)
        try:
            missing = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
            for folder in reversed(missing):
                folder.mkdir(mode=_DIR_MODE)
        except FileExistsError:
            pass  # made meanwhile by someone else; what it is is checked when the file opens
        except OSError as exc:
            raise SpoolError(
                f"spool {self.path}: cannot create folder {exc.filename}: {exc.strerror}"
            ) from exc

    def refuse_links(self, *paths: Path) -> None:
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

    def prepare(self) -> None:
        """Create the database file 0600 (SQLite gives its -wal and -shm the same mode), or
        narrow an existing one to 0600; refuse symbolic links unless ``follow_symlinks``."""
        sides = [self.side(suffix) for suffix in _SIDE_FILES]
        self.refuse_links(self.path.parent, self.path, *sides)
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

    def disk_bytes(self) -> int:
        total = 0
        for name in (self.path, *(self.side(s) for s in _SIDE_FILES)):
            try:
                total += name.stat().st_size
            except OSError:
                continue
        return total


class _Checkpointer:
    """Copies the write-ahead log into the database file, in a worker thread.

    A checkpoint fsyncs the log and the database file; on the event loop thread (where SQLite runs
    it by default, after a commit) that stalls everything for milliseconds to hundreds of
    milliseconds on a busy disk. Here it runs on its own connection in a thread, after every
    :data:`_CHECKPOINT_COMMITS` commits; the loop-side connection only checkpoints by itself if
    the log grows past :data:`_BACKSTOP_PAGES` anyway.
    """

    def __init__(self, path: Path, synchronous: str) -> None:
        self._path = path
        self.synchronous = synchronous
        self._commits = 0  # since the last checkpoint was started
        self._due = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        self._due = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name=f"spool-checkpoint:{self._path.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            # Not cancelled: a checkpoint already running in its thread is let finish, so its
            # connection is closed only once nothing uses it.
            self._stopping = True
            self._due.set()
            await task

    def committed(self) -> None:
        self._commits += 1
        if self._commits >= _CHECKPOINT_COMMITS:
            self._due.set()

    async def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        in_thread = False
        failing = False
        try:
            while True:
                await self._due.wait()
                self._due.clear()
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
                        _log.warning("spool %s: checkpoint failed: %s", self._path, exc)
                    failing = True
                else:
                    if failing:
                        _log.info("spool %s: checkpoints work again", self._path)
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
                self._path, isolation_level=None, timeout=0, check_same_thread=False
            )
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return conn


class Spool(Repositories, Backlog):
    """The SQLite store (:class:`phonepush.store.interface.Store`). Use as
    ``async with Spool(path) as spool:``.

    ``max_pending`` bounds the backlog: :meth:`admit` raises :class:`SpoolFull` rather than let
    an event add more pending deliveries. ``synchronous`` is ``"normal"`` (survives a crash of the
    daemon) or ``"full"`` (also survives power loss); see the module docstring. ``clock`` stamps
    ``created_at`` of deliveries. ``busy_timeout`` is how long a write waits for another process
    holding the database's write lock (a maintenance command, say) before it fails; it blocks the
    event loop for that long, so it is kept short.

    ``max_size`` bounds the bytes the database's live pages take (see :meth:`live_bytes`);
    :class:`phonepush.store.housekeeping.Housekeeper` enforces it, evicting finished events and,
    when pending work alone is over it, setting :attr:`full`, which makes :meth:`admit` refuse.
    The spool file and its side files are created ``0600`` (and an existing one is narrowed to
    that); a symbolic link at ``path`` or at its folder is refused unless ``follow_symlinks``.
    ``trusted_links`` are links taken all the same when root owns them: the folders the service
    manager made (systemd's ``StateDirectory=`` under ``DynamicUser=`` is a root-owned link to
    ``private/<name>``, and only root could have put it there).

    The repositories' statements run through :meth:`rows`, :meth:`row`, :meth:`write`,
    :meth:`write_many` and :meth:`insert` (:class:`phonepush.store.tables.Sql`). They are
    ``async def`` for the repositories, which are the same on PostgreSQL, but do their work
    synchronously, without a thread: the spool is a local file and each call is a few prepared
    statements, well under a millisecond, which is less than handing it to a thread would cost;
    and a method that never suspends keeps a transaction's body from interleaving with other
    tasks.
    """

    #: What its SQL says differently from PostgreSQL's, for the repositories.
    dialect: Dialect = SQLITE

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
        self._file = _SpoolFile(
            self.path, follow_symlinks=follow_symlinks, trusted_links=trusted_links
        )
        #: True while pending work alone is over ``max_size``: :meth:`admit` refuses.
        self.full = False
        self.synchronous = synchronous.lower()
        self._clock = clock
        self._busy_timeout_ms = max(0, round(busy_timeout * 1000))
        self._conn: sqlite3.Connection | None = None
        self._open = False
        self._pending = 0
        self._conn_synchronous = ""  # what the open connection is set to now
        self._checkpointer = _Checkpointer(self.path, self.synchronous)
        self._in_transaction = False
        self._pending_delta = 0  # of the open transaction, counted in at its commit
        self.healthy = True
        super().__init__(self, clock)

    @property
    def location(self) -> str:
        return str(self.path)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._file.make_folder()
        self._connect()
        self._open = True
        try:
            await self.check()
        except SpoolError:
            self._open = False
            self._drop_connection()
            raise
        self._checkpointer.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._checkpointer.stop()
        finally:
            self._open = False
            self._drop_connection()

    # -- the store -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def transaction(self, what: str, *, durable: bool = False) -> AsyncIterator[Spool]:
        """Everything written through the repositories inside the ``async with`` block, in one
        commit.

        ``what`` names the transaction in a :class:`SpoolError`; ``durable`` commits at the
        configured ``synchronous`` level (others at "normal"). Inside another transaction this
        is part of that one.

        The block is meant to await only the store: the spool's methods never suspend (see
        :mod:`phonepush.store.tables`), so no other task runs, and none writes into this
        transaction, until it commits.
        """
        with self._atomic(what, durable=durable):
            yield self

    @contextlib.asynccontextmanager
    async def atomic(self, what: str) -> AsyncIterator[Spool]:
        """:meth:`transaction`, for the repositories' own multi-statement writes."""
        with self._atomic(what):
            yield self

    @contextlib.contextmanager
    def _atomic(self, what: str, *, durable: bool = False) -> Iterator[Spool]:
        if self._in_transaction:
            yield self
            return
        conn = self._connection()
        self._pending_delta = 0
        try:
            self._set_synchronous(conn, self.synchronous if durable else "normal")
            conn.execute("BEGIN IMMEDIATE")
            changes = conn.total_changes
            self._in_transaction = True
            yield self
            self._in_transaction = False
            wrote = conn.total_changes != changes
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._in_transaction = False
            raise self._write_failed(what, exc) from exc
        except BaseException:
            self._in_transaction = False
            self._abandon(conn)
            raise
        self._pending += self._pending_delta
        if wrote:  # a commit that wrote nothing says nothing about the disk
            self._committed()

    async def check(self) -> None:
        """Raise :class:`SpoolError` unless a write to the database succeeds now.

        The readiness probe: it commits one small row, so a full disk, a read-only file or a lock
        held elsewhere shows up here.
        """
        await self.write(_PROBE, (repr(self._clock()),), "not writable")

    async def live_bytes(self) -> int:
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
        return self._file.disk_bytes()

    # -- statements, for the repositories --------------------------------------------------

    async def rows(self, sql: str, params: Sequence[Any], what: str) -> list[sqlite3.Row]:
        conn = self._connection()
        if self._in_transaction:
            return conn.execute(sql, params).fetchall()  # the transaction handles errors
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._read_failed(what, exc) from exc

    async def row(self, sql: str, params: Sequence[Any], what: str) -> sqlite3.Row | None:
        conn = self._connection()
        if self._in_transaction:
            row: sqlite3.Row | None = conn.execute(sql, params).fetchone()
            return row
        try:
            row = conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise self._read_failed(what, exc) from exc
        return row

    async def write(self, sql: str, params: Sequence[Any], what: str) -> int:
        """Run one statement (in the open transaction, or as its own); the rows it changed."""
        conn = self._connection()
        if self._in_transaction:
            return conn.execute(sql, params).rowcount
        try:
            self._set_synchronous(conn, "normal")
            changed = conn.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise self._write_failed(what, exc) from exc
        self._committed()
        return changed

    async def write_many(self, sql: str, params: Iterable[Sequence[Any]], what: str) -> int:
        """One statement for each of ``params``, in one transaction; the rows they changed."""
        if self._in_transaction:
            return self._connection().executemany(sql, params).rowcount
        with self._atomic(what):
            return self._connection().executemany(sql, params).rowcount

    async def insert(self, sql: str, params: Sequence[Any], what: str) -> int:
        """Run one INSERT (in the open transaction, or as its own); the new row's id."""
        conn = self._conn
        if self._in_transaction and conn is not None:
            rowid = conn.execute(sql, params).lastrowid
        else:
            with self._atomic(what):
                rowid = self._connection().execute(sql, params).lastrowid
        assert rowid is not None
        return rowid

    def pending_changed(self, delta: int) -> None:
        """Deliveries became pending (or stopped being): counted at the commit."""
        if self._in_transaction:
            self._pending_delta += delta
        else:
            self._pending += delta

    # -- internals -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self._file.prepare()
        try:
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                timeout=self._busy_timeout_ms / 1000,
                cached_statements=64,
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: cannot open: {exc}") from exc
        conn.row_factory = sqlite3.Row
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SpoolError(f"spool {self.path}: cannot use WAL mode (journal mode {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            self._conn_synchronous = self.synchronous
            conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {_BACKSTOP_PAGES}")
            conn.execute("BEGIN IMMEDIATE")
            self._migrate(conn)
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

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION` inside the open transaction; refuse a file
        a newer phonepush wrote.

        The version is the ``schema_version`` key of ``meta`` and, for a phonepush that predates
        that key, ``PRAGMA user_version`` too: both are written, and the larger one counts. A
        file with neither is version 1 if it has tables (made before versions were kept),
        otherwise new.
        """
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if conn.execute(_HAS_META).fetchone() is not None:
            row = conn.execute(_SCHEMA_VERSION_KEY).fetchone()
            if row is not None and str(row[0]).isdigit():
                version = max(version, int(row[0]))
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"spool {self.path}: schema version {version} is newer than this"
                f" phonepush understands ({SCHEMA_VERSION}); upgrade phonepush"
            )
        # Version 1's statements are all CREATE ... IF NOT EXISTS and run on each open: cheap,
        # and they add the tables later releases of version 1 brought to an older file of it.
        for number, migration in enumerate(MIGRATIONS, start=1):
            if number == 1 or number > version:
                for statement in migration.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                if number > max(version, 1):
                    _log.info("spool %s: schema migrated to version %d", self.path, number)
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
        self._checkpointer.committed()

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

    def _read_failed(self, what: str, exc: sqlite3.Error) -> SpoolError:
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            self._drop_connection()
        return SpoolError(f"spool {self.path}: {what}: {exc}")


_RECENT_SUMMARIES: Final = (
    "SELECT id, source, topic, received_at, rules FROM events ORDER BY seq DESC LIMIT ?"
)
_RECENT_DELIVERED: Final = (
    "SELECT id, source, topic, received_at, rules FROM events"
    " WHERE EXISTS (SELECT 1 FROM deliveries WHERE deliveries.event_id = events.id)"
    " ORDER BY seq DESC LIMIT ?"
)
_STATE_COUNTS: Final = (
    "SELECT state, count(*) AS n FROM deliveries WHERE event_id = ? GROUP BY state"
)


def read_recent(path: Path, limit: int, *, every: bool = True) -> list[EventSummary]:
    """The ``limit`` newest events of the spool file at ``path`` (with ``every=False``, of those
    with at least one delivery), read-only: SQLite's WAL lets a reader in while the daemon
    writes, and nothing is created or changed (a file of any schema version this phonepush
    knows reads the same).

    Raises :class:`SpoolError` when the file is missing or not a spool.
    """
    if not path.is_file():
        raise SpoolError(f"no spool at {path}")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error as exc:
        raise SpoolError(str(exc)) from exc
    conn.row_factory = sqlite3.Row
    try:
        return [
            EventSummary(
                id=row["id"],
                source=row["source"],
                topic=row["topic"],
                received_at=row["received_at"],
                rules=tuple(json.loads(row["rules"])),
                states={
                    count["state"]: count["n"]
                    for count in conn.execute(_STATE_COUNTS, (row["id"],))
                },
            )
            for row in conn.execute(
                _RECENT_SUMMARIES if every else _RECENT_DELIVERED, (limit,)
            ).fetchall()
        ]
    except sqlite3.Error as exc:
        raise SpoolError(str(exc)) from exc
    finally:
        conn.close()


def _is_a_store(spool: Spool) -> Store:
    """Never called: mypy checks here that :class:`Spool` implements the storage interface."""
    return spool
