"""A read-only look at a spool file the daemon writes, for ``phonepush status`` (and ``--follow``).

The connection is opened read-only: SQLite's WAL lets a reader in while the daemon writes, and
each query sees what was committed when it started. Nothing is created or changed, and a file
of any schema version this phonepush knows reads the same.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from phonepush.errors import SpoolError

__all__ = ["DeliveryStatus", "EventActivity", "SpoolReader"]


@dataclass(frozen=True, slots=True)
class DeliveryStatus:
    """One delivery as ``status`` shows it; ``error`` is why it was suppressed or failed."""

    id: int
    rule: str
    phone: str
    state: str
    attempts: int
    error: str
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class EventActivity:
    """A stored event and its deliveries; ``seq`` orders events as they were stored."""

    seq: int
    id: str
    source: str
    topic: str
    received_at: float
    rules: tuple[str, ...]
    deliveries: tuple[DeliveryStatus, ...]

    @property
    def states(self) -> dict[str, int]:
        """How many of its deliveries are in each state."""
        counts: dict[str, int] = {}
        for delivery in self.deliveries:
            counts[delivery.state] = counts.get(delivery.state, 0) + 1
        return counts


_COLUMNS: Final = (
    "SELECT e.seq, e.id, e.source, e.topic, e.received_at, e.rules, d.id AS delivery, d.rule,"
    " d.phone, d.state, d.attempts, d.error, d.created_at, d.expires_at"
)
_WITH_DELIVERIES: Final = (
    " WHERE EXISTS (SELECT 1 FROM deliveries WHERE deliveries.event_id = events.id)"
)
_EVENT: Final = "SELECT seq, id, source, topic, received_at, rules FROM events"


class SpoolReader:
    """A read-only connection to the spool at ``path``; a context manager.

    Raises :class:`SpoolError` when the file is missing or not a spool (from any method).
    """

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise SpoolError(f"no spool at {path}")
        try:
            self._conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=2.0
            )
        except sqlite3.Error as exc:
            raise SpoolError(str(exc)) from exc
        self._conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SpoolReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def recent(self, limit: int, *, every: bool = True) -> list[EventActivity]:
        """The ``limit`` newest events, newest first (with ``every=False``, of those with at
        least one delivery)."""
        events = f"{_EVENT}{'' if every else _WITH_DELIVERIES} ORDER BY seq DESC LIMIT ?"
        return self._read(
            f"{_COLUMNS} FROM ({events}) AS e LEFT JOIN deliveries AS d ON d.event_id = e.id"
            " ORDER BY e.seq DESC, d.id",
            (limit,),
        )

    def since(self, seq: int, limit: int) -> list[EventActivity]:
        """The newest ``limit`` events stored at or after ``seq``, oldest first."""
        events = f"{_EVENT} WHERE seq >= ? ORDER BY seq DESC LIMIT ?"
        return self._read(
            f"{_COLUMNS} FROM ({events}) AS e LEFT JOIN deliveries AS d ON d.event_id = e.id"
            " ORDER BY e.seq, d.id",
            (seq, limit),
        )

    def last_seq(self) -> int:
        """The ``seq`` of the newest event, 0 when there is none."""
        (row,) = self._rows("SELECT max(seq) AS n FROM events", ())
        return int(row["n"] or 0)

    def _rows(self, query: str, params: tuple[int, ...]) -> list[Any]:
        """Rows by column name (a reader of another database overrides this; ``?`` marks the
        parameters)."""
        try:
            return self._conn.execute(query, params).fetchall()
        except sqlite3.Error as exc:
            raise SpoolError(str(exc)) from exc

    def _read(self, query: str, params: tuple[int, ...]) -> list[EventActivity]:
        rows = self._rows(query, params)
        events: list[EventActivity] = []
        deliveries: list[DeliveryStatus] = []
        for index, row in enumerate(rows):
            if row["delivery"] is not None:
                deliveries.append(
                    DeliveryStatus(
                        id=row["delivery"],
                        rule=row["rule"],
                        phone=row["phone"],
                        state=row["state"],
                        attempts=row["attempts"],
                        error=row["error"],
                        created_at=row["created_at"],
                        expires_at=row["expires_at"],
                    )
                )
            if index + 1 < len(rows) and rows[index + 1]["seq"] == row["seq"]:
                continue
            events.append(
                EventActivity(
                    seq=row["seq"],
                    id=row["id"],
                    source=row["source"],
                    topic=row["topic"],
                    received_at=row["received_at"],
                    rules=tuple(json.loads(row["rules"])),
                    deliveries=tuple(deliveries),
                )
            )
            deliveries = []
        return events
