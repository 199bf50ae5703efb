"""Moving an SQLite spool into a PostgreSQL store, for ``phonepush migrate``.

The spool file is never changed: it is opened read-only and copied whole (SQLite's online
backup, so the copy is one consistent snapshot even of a file with a write-ahead log) into a
temporary folder, and that copy is opened as a :class:`~phonepush.store.spool.Spool`, which
migrates a file of an older schema version to the current one. The rows are read from the copy.

What is copied is derived from the two schemas rather than listed here: every table of the
spool (but ``meta``, each store's own bookkeeping) must have a table of the same name in the
PostgreSQL store with every one of its columns, or nothing is copied and the error names what
has no counterpart, so a table or column a later version adds cannot be skipped silently.
A PostgreSQL column the spool lacks is left to its default, except the column that orders a
table's rows there as SQLite's ``rowid`` does (:attr:`~phonepush.store.tables.Dialect.
insertion_order`, ``alert_phones.seq``), which takes the rowid. Ids are kept, and each identity
column's sequence is moved past the highest id copied, so new ids continue after the old ones.

Everything is written in one PostgreSQL transaction, after the tables are locked against other
writers and found empty: a migration either copies everything or nothing, and never mixes two
spools (or a spool and what a daemon on the database already stored).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from phonepush.errors import SpoolError
from phonepush.store.postgres import PostgresStore
from phonepush.store.spool import Spool
from phonepush.store.tables import POSTGRES, SQLITE

__all__ = ["NOT_COPIED", "Copied", "SpoolSnapshot", "copy_spool", "holder_of", "snapshot"]

#: Tables of the spool that are not copied, and why.
NOT_COPIED: Final = {"meta": "each store's own bookkeeping (schema version, readiness probe)"}
#: Rows written per statement batch.
_BATCH: Final = 500
# SQLite's shared-memory index (the -shm file) has a "dead man switch" byte every connection to
# the database holds a read lock on while it is open: byte 128 (after the 8 locks of the WAL
# index, each 4 bytes from offset 120). A write lock on it that would conflict says who has the
# database open.
_DMS_OFFSET: Final = 128
# struct flock on Linux: short type, short whence, off_t start, off_t len, pid_t pid (+ padding).
_FLOCK: Final = "hhqqi4x"
_TABLES: Final = (
    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
)
#: Tables every spool has, whatever its version: a file without them is not a spool.
_SPOOL_TABLES: Final = frozenset({"events", "deliveries"})
_TARGET_COLUMNS: Final = (
    "SELECT table_name, column_name, is_identity, is_nullable, column_default"
    " FROM information_schema.columns WHERE table_schema = current_schema()"
)


def holder_of(path: Path) -> int | None:
    """The id of a process that has the SQLite database at ``path`` open (0 if it cannot be
    told, say from another PID namespace), or None if none has, or it cannot be known here.

    Called before this process opens the database itself: closing the descriptor used here
    would drop the locks of a connection of this process to the same file.
    """
    if sys.platform != "linux":
        return None  # the layout of struct flock differs; the docs say to stop the daemon
    try:
        fd = os.open(path.with_name(path.name + "-shm"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no index: nobody has it open in WAL mode
    try:
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _DMS_OFFSET, 1, 0)
        kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if kind == fcntl.F_UNLCK else max(pid, 0)


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    columns: tuple[str, ...]
    #: Ordered by rowid (and the rowid copied to the insertion-order column): not WITHOUT ROWID.
    rowid: bool


class SpoolSnapshot:
    """A read-only copy of a spool, at the current schema version: what :func:`snapshot` gives."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def tables(self) -> list[_Table]:
        found = []
        for (name,) in self._conn.execute(_TABLES).fetchall():
            columns = tuple(
                row[1] for row in self._conn.execute(f"PRAGMA table_info({_quote(name)})")
            )
            listed = self._conn.execute(
                "SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?", (name,)
            ).fetchone()
            found.append(_Table(name, columns, rowid=listed is not None and not listed[0]))
        return found

    def count(self, table: str, where: str = "") -> int:
        query = f"SELECT count(*) FROM {_quote(table)}{' WHERE ' + where if where else ''}"
        return int(self._conn.execute(query).fetchone()[0])

    def batches(self, table: _Table) -> Iterator[list[tuple[Any, ...]]]:
        """The table's rows (its rowid last, where it has one), in insertion order."""
        columns = ", ".join(map(_quote, table.columns))
        if table.rowid:
            query = f"SELECT {columns}, rowid FROM {_quote(table.name)} ORDER BY rowid"
        else:
            query = f"SELECT {columns} FROM {_quote(table.name)}"
        cursor = self._conn.execute(query)
        while rows := cursor.fetchmany(_BATCH):
            yield [tuple(row) for row in rows]


@contextlib.asynccontextmanager
async def snapshot(path: Path) -> AsyncIterator[SpoolSnapshot]:
    """The spool at ``path``, copied into a temporary folder and migrated there to this
    phonepush's schema; the file at ``path`` is only read.

    Raises :class:`SpoolError` (naming ``path``) when the file is missing, is not a spool, or is
    of a schema version newer than this phonepush knows.
    """
    with tempfile.TemporaryDirectory(prefix="phonepush-migrate-") as folder:
        copy = Path(folder) / "spool.db"
        _copy(path, copy)
        try:
            async with Spool(copy):
                pass  # opening it brings the copy's schema to the current version
        except SpoolError as exc:
            raise SpoolError(str(exc).replace(str(copy), str(path))) from exc
        conn = sqlite3.connect(copy)
        try:
            yield SpoolSnapshot(conn)
        finally:
            conn.close()


def _copy(path: Path, copy: Path) -> None:
    if not path.is_file():
        raise SpoolError(f"no spool at {path}")
    # A read-only connection to a WAL database still makes its -wal and -shm files when they are
    # not there (a cleanly stopped daemon removed them); those are removed again afterwards, so
    # the spool's folder is left as it was (and no file owned by another user is left in it).
    sides = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
    made = [side for side in sides if not side.exists()]
    try:
        _backup(path, copy)
    finally:
        if made and holder_of(path) is None:
            for side in made:
                with contextlib.suppress(OSError):
                    if side.name.endswith("-shm") or side.stat().st_size == 0:
                        side.unlink()


def _backup(path: Path, copy: Path) -> None:
    try:
        source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise SpoolError(f"spool {path}: cannot open: {exc}") from exc
    try:
        tables = {row[0] for row in source.execute(_TABLES)}
        if not tables >= _SPOOL_TABLES:
            raise SpoolError(f"spool {path}: not a phonepush spool (no events table)")
        with contextlib.closing(sqlite3.connect(copy)) as target:
            source.backup(target)
    except sqlite3.DatabaseError as exc:
        raise SpoolError(f"spool {path}: not a phonepush spool ({exc})") from exc
    except sqlite3.Error as exc:
        raise SpoolError(f"spool {path}: cannot read: {exc}") from exc
    finally:
        source.close()


@dataclass(frozen=True, slots=True)
class Copied:
    """What :func:`copy_spool` copied: rows per table, in the order copied."""

    tables: tuple[tuple[str, int], ...]
    #: Deliveries still to be pushed among them.
    pending: int

    @property
    def events(self) -> int:
        return dict(self.tables).get("events", 0)


@dataclass(frozen=True, slots=True)
class _Plan:
    table: _Table
    #: The PostgreSQL columns written: the spool's, and the insertion-order one from the rowid.
    columns: tuple[str, ...]
    from_rowid: bool
    #: Identity columns whose sequence must move past the ids copied.
    identities: tuple[str, ...]


async def copy_spool(source: SpoolSnapshot, store: PostgresStore) -> Copied:
    """Copy every row of ``source`` into ``store``, in one transaction, keeping ids.

    Raises :class:`SpoolError` and writes nothing when a table or column of the spool has no
    counterpart in the store, when the store's tables already hold rows, or when a write fails.
    """
    plans = await _plan(source, store)
    names = ", ".join(_quote(plan.table.name) for plan in plans)
    copied: list[tuple[str, int]] = []
    async with store.transaction("cannot migrate", durable=True):
        # Held to the commit: no daemon on the database writes between the check and the copy.
        await store.write("SET LOCAL lock_timeout = '10s'", (), "cannot lock the tables")
        await store.write(
            f"LOCK TABLE {names} IN SHARE ROW EXCLUSIVE MODE", (), "cannot lock the tables"
        )
        held = [
            plan.table.name
            for plan in plans
            if await store.row(
                f"SELECT 1 FROM {_quote(plan.table.name)} LIMIT 1", (), "cannot read"
            )
        ]
        if held:
            raise SpoolError(
                f"spool {store.location} already holds data (in {', '.join(held)}):"
                " migrate into a new, empty database"
            )
        for plan in plans:
            copied.append((plan.table.name, await _copy_table(source, store, plan)))
        for plan in plans:
            for column in plan.identities:
                await store.row(
                    f"SELECT setval(pg_get_serial_sequence(?, ?), max({_quote(column)}))"
                    f" FROM {_quote(plan.table.name)} HAVING max({_quote(column)}) IS NOT NULL",
                    (_quote(plan.table.name), column),
                    f"cannot move the ids of {plan.table.name} on",
                )
    pending = source.count("deliveries", "state = 'pending'")
    return Copied(tuple(copied), pending)


async def _plan(source: SpoolSnapshot, store: PostgresStore) -> list[_Plan]:
    target: dict[str, dict[str, Any]] = {}
    for row in await store.rows(_TARGET_COLUMNS, (), "cannot read the schema"):
        target.setdefault(row["table_name"], {})[row["column_name"]] = row
    plans = []
    for table in source.tables():
        if table.name in NOT_COPIED:
            continue
        columns = target.get(table.name)
        if columns is None:
            raise SpoolError(
                f"spool table {table.name} has no counterpart in {store.location}:"
                " this phonepush cannot migrate it"
            )
        missing = [c for c in table.columns if c not in columns]
        if missing:
            raise SpoolError(
                f"spool column {table.name}.{missing[0]} has no counterpart in {store.location}:"
                " this phonepush cannot migrate it"
            )
        written = list(table.columns)
        from_rowid = False
        for name, column in columns.items():
            if name in table.columns:
                continue
            if table.rowid and name == POSTGRES.insertion_order != SQLITE.insertion_order:
                written.append(name)
                from_rowid = True
            elif (
                column["is_nullable"] != "YES"
                and column["column_default"] is None
                and (column["is_identity"] != "YES")
            ):
                raise SpoolError(
                    f"column {table.name}.{name} of {store.location} has no counterpart in the"
                    " spool and no default: this phonepush cannot migrate into it"
                )
        identities = tuple(name for name in written if columns[name]["is_identity"] == "YES")
        plans.append(_Plan(table, tuple(written), from_rowid, identities))
    return plans


async def _copy_table(source: SpoolSnapshot, store: PostgresStore, plan: _Plan) -> int:
    insert = (
        f"INSERT INTO {_quote(plan.table.name)} ({', '.join(map(_quote, plan.columns))})"
        f" VALUES ({', '.join('?' * len(plan.columns))})"
    )
    keep = len(plan.columns)  # the rowid is dropped where it is not written
    total = 0
    for rows in source.batches(plan.table):
        await store.write_many(
            insert, [row[:keep] for row in rows], f"cannot copy table {plan.table.name}"
        )
        total += len(rows)
    return total


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
