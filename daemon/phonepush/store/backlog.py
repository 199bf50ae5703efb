"""The backlog limit, kept the same way by both stores.

``max_pending`` deliveries may wait at once, and none may be added while the store is ``full``
(pending work alone over ``max_size``). The count lives in memory so intake can check it on
every event without a query: each store keeps ``_pending`` in step with its own commits and
counts it again from the database when it opens and on every ``check()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from phonepush.errors import SpoolFull

__all__ = ["Backlog"]


class Backlog(ABC):
    """``pending_count``, ``admit`` and ``room`` of a store (a base of :class:`Spool` and
    :class:`PostgresStore`)."""

    max_pending: int
    max_size: int | None
    full: bool
    _pending: int

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store is, as messages name it."""

    def pending_count(self) -> int:
        """How many deliveries are pending (kept in memory: see the module's documentation)."""
        return self._pending

    def admit(self, new_pending: int) -> None:
        """Raise :class:`SpoolFull` unless ``new_pending`` more deliveries fit."""
        if self.full:
            raise SpoolFull(
                f"spool {self.location}: pending work alone is over max_size ({self.max_size}"
                " bytes); refusing events until deliveries finish"
            )
        if self._pending + new_pending > self.max_pending:
            raise SpoolFull(
                f"spool {self.location}: {self._pending} deliveries pending,"
                f" {new_pending} more would exceed the limit of {self.max_pending}"
            )

    def room(self) -> int:
        return self.max_pending - self._pending
