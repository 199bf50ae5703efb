"""Phone health shared by the instances of one PostgreSQL store (:mod:`phonepush.health.shared`).

The table ``phone_health`` (schema version 3 of :mod:`phonepush.store.postgres`; SQLite has none:
a daemon on SQLite is alone and keeps its phones' health in memory) holds, per phone, what one
instance learns and the others need: reachability (with when it took its value, when it was last
checked and the error), the device information and the last push's result. Each of those three
parts carries its own time, and a write keeps, part by part, whichever is newer: the row is the
merge of what every instance wrote, whatever order the writes came in, and an instance that
writes what it knows never undoes what another learned later. Times are the instances' own
clocks (``time.time``, as ``/api/phones`` shows them): instances are expected to keep their
clocks in step (NTP), as their logs' timestamps need anyway.

``updated_at`` (by the database's clock) lets a reader take only the rows written since its
last read. ``meta``'s ``live_bytes`` carries the leader's last measure of the store's size to the
instances that do not measure it (``phonepush_spool_bytes``).

psycopg is not imported here: this module is imported with the store already open.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from phonepush.store.postgres import PostgresStore

__all__ = ["PhoneRecord", "PostgresHealth", "Seen"]


@dataclass(frozen=True, slots=True)
class PhoneRecord:
    """One phone's row: what an instance knows of it (``info_at`` None: no device information;
    ``push_at`` None: no push)."""

    phone: str
    host: str
    reachable: bool | None
    since: float | None
    checked_at: float | None
    error: str
    model: str = ""
    firmware: str = ""
    mac: str = ""
    host_name: str = ""
    info_at: float | None = None
    push_result: str = ""
    push_at: float | None = None


@dataclass(frozen=True, slots=True)
class Seen:
    """What one read found: the database's time of the read, the rows written since the time
    asked for, and the leader's last measure of the store's size (None before any)."""

    now: float
    records: list[PhoneRecord]
    live_bytes: int | None


_COLUMNS: Final = (
    ("phone", "text"),
    ("host", "text"),
    ("reachable", "boolean"),
    ("since", "float8"),
    ("checked_at", "float8"),
    ("error", "text"),
    ("model", "text"),
    ("firmware", "text"),
    ("mac", "text"),
    ("host_name", "text"),
    ("info_at", "float8"),
    ("push_result", "text"),
    ("push_at", "float8"),
)
_NAMES: Final = ", ".join(name for name, _ in _COLUMNS)

# A row whose phone moved to another address describes another device: the writer's replaces it.
_MOVED: Final = "h.host <> excluded.host"


def _newer(column: str) -> str:
    return f"({_MOVED} OR excluded.{column} > coalesce(h.{column}, '-infinity'::float8))"


def _take(columns: Sequence[str], when: str) -> list[str]:
    return [f"{c} = CASE WHEN {when} THEN excluded.{c} ELSE h.{c} END" for c in columns]


_CHECKED: Final = _newer("checked_at")
# Still in the same state by the newer check: it has been since the earlier of the two times
# (the instance that saw the change first knows best when it was).
_SINCE: Final = (
    f"since = CASE WHEN NOT {_CHECKED} THEN h.since"
    f" WHEN {_MOVED} OR h.reachable IS DISTINCT FROM excluded.reachable THEN excluded.since"
    " ELSE least(h.since, excluded.since) END"
)
# One statement for a batch of phones (one row each: the caller's are distinct).
_WRITE: Final = (
    f"INSERT INTO phone_health AS h ({_NAMES}, updated_at)"
    f" SELECT u.*, extract(epoch from clock_timestamp()) FROM unnest("
    + ", ".join(f"%s::{kind}[]" for _, kind in _COLUMNS)
    + f") AS u ({_NAMES})"
    " ON CONFLICT (phone) DO UPDATE SET "
    + ", ".join(
        [
            "host = excluded.host",
            *_take(("reachable",), _CHECKED),
            _SINCE,
            *_take(("checked_at", "error"), _CHECKED),
            *_take(("model", "firmware", "mac", "host_name", "info_at"), _newer("info_at")),
            *_take(("push_result", "push_at"), _newer("push_at")),
            "updated_at = excluded.updated_at",
        ]
    )
)
# Always one row (the left join's), so the read's time and the size come with no phone too.
_READ: Final = (
    "SELECT extract(epoch from clock_timestamp()) AS now,"
    " (SELECT value FROM meta WHERE key = 'live_bytes') AS live_bytes,"
    + ", ".join(f"h.{name}" for name, _ in _COLUMNS)
    + " FROM (SELECT 1) AS one LEFT JOIN phone_health h ON h.updated_at > %s"
)
_PUT_BYTES: Final = (
    "INSERT INTO meta (key, value) VALUES ('live_bytes', %s)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


class PostgresHealth:
    """The shared health's statements on ``store``'s pool."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._published: int | None = None

    async def write(self, records: Sequence[PhoneRecord]) -> None:
        """Merge ``records`` (one per phone) into the table, in one statement."""
        if not records:
            return
        columns: list[list[Any]] = [[getattr(r, name) for r in records] for name, _ in _COLUMNS]
        await self._store.write(_WRITE, columns, "cannot share phone health")

    async def read(self, after: float) -> Seen:
        """The rows written after ``after`` (the database's time; -inf: every row)."""
        rows = await self._store.rows(
            _READ, (after if math.isfinite(after) else -1.0,), "cannot read phone health"
        )
        first = rows[0]
        size = first["live_bytes"]
        records = [
            PhoneRecord(**{name: row[name] for name, _ in _COLUMNS})
            for row in rows
            if row["phone"] is not None
        ]
        return Seen(float(first["now"]), records, None if size is None else int(size))

    async def publish_bytes(self) -> None:
        """The leader's side: the store's size as last measured, for the other instances, when
        it changed. Housekeeping measures it every tick when ``spool.max_size`` is set; without
        one nothing does, so it is measured here (a catalog query of the store's tables)."""
        store = self._store
        size = await store.live_bytes() if store.max_size is None else store.disk_bytes()
        if size != self._published:
            await store.write(_PUT_BYTES, (str(size),), "cannot share the store's size")
            self._published = size

    def heard_bytes(self, size: int) -> None:
        """A follower's side: what the leader measured last is this instance's size too."""
        self._published = None  # should it lead later, it writes its own measure at once
        self._store.heard_bytes(size)
