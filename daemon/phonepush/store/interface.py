"""The storage interface: what the daemon asks of a store, whatever keeps the data.

:class:`Store` is one database: its lifecycle, health, size accounting and
:meth:`Store.transaction`. Its tables are reached through repositories, one per table group:
:class:`EventRepository` (events, their pages, cooldowns), :class:`DeliveryRepository`,
:class:`AlertRepository`, :class:`GroupRepository`, :class:`SilenceRepository` and
:class:`ScheduleRepository`. Consumers type
against these protocols; :class:`phonepush.store.spool.Spool` (SQLite) implements them, and a
second backend implements the same ones.

Every method that reaches the data is ``async``: a store on a network database (PostgreSQL,
shared by several daemons) must not stall the event loop, and with it webhooks, MQTT acks and
health, on every round trip or while the database is unreachable. A backend that needs no waiting
(SQLite on a local disk) simply never suspends.

Every repository method may run on its own (a single write is its own transaction) or inside
``async with store.transaction(...) as tx:`` through ``tx``'s repositories, where everything commits
together or nothing does. Errors are :class:`~phonepush.errors.SpoolError` (nothing written) and
:class:`~phonepush.errors.SpoolFull` (the backlog has no room), never a driver's own.

The store keeps data and the few rules that are about storage (the backlog limit, which events are
finished enough to purge); what an ack, a repeat round, a resolve or a group flush *does* is decided
by :mod:`phonepush.alerting` and :mod:`phonepush.grouping`, which write through one transaction.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from phonepush.events import Event
from phonepush.store.records import (
    ActionPress,
    ActionRecord,
    AlertPhone,
    AlertRecord,
    AlertState,
    AlertTarget,
    Delivery,
    DeliveryState,
    EventRecord,
    GroupWindow,
    NewAlert,
    NewDelivery,
    NewGroupedEvent,
    PushRequest,
    RoundKind,
    StoredSilence,
)

__all__ = [
    "AlertRepository",
    "DeliveryRepository",
    "EventRepository",
    "GroupRepository",
    "PurgeCursor",
    "ScheduleRepository",
    "SilenceRepository",
    "Store",
    "Transaction",
]

#: Where a purge pass has got to: (received_at, sequence) of the last event it looked at.
PurgeCursor = tuple[float, int]


class EventRepository(Protocol):
    """Events, the pages their deliveries show, and the cooldowns rules set."""

    async def add(self, event: Event, rules: Sequence[str]) -> None:
        """Store an event and the names of the rules it matched (its id must be new)."""

    async def get(self, event_id: str) -> EventRecord | None:
        """The stored event with its deliveries, or None (never stored, or purged)."""

    async def recent(self, limit: int = 20) -> list[EventRecord]:
        """The ``limit`` most recently stored events, newest first."""

    async def add_pages(self, event_id: str, pages: Mapping[str, str]) -> None:
        """Store new pages (id -> CiscoIPPhoneText XML) of an event."""

    async def put_page(self, page_id: str, event_id: str, xml: str) -> None:
        """Store a page of an event, replacing one stored under the same id."""

    async def page(self, page_id: str) -> str | None:
        """The page stored under ``page_id``, or None."""

    async def in_cooldown(self, rule: str, key: str, now: float) -> bool:
        """Whether ``rule`` set a cooldown for ``key`` that lasts beyond ``now``."""

    async def start_cooldowns(self, cooldowns: Sequence[tuple[str, str, float]]) -> None:
        """Set (rule, key, until) cooldowns, replacing those of the same rule and key."""

    async def claim_cooldowns(
        self, cooldowns: Sequence[tuple[str, str, float]], now: float
    ) -> set[tuple[str, str]]:
        """Start (rule, key, until) cooldowns where none lasts beyond ``now``; the (rule, key)
        of those started. Of several transactions claiming the same (rule, key) at once (other
        instances on a shared database) exactly one gets it."""

    async def end_cooldown(self, rule: str, key: str) -> None:
        """Drop the cooldown of ``rule`` for ``key``, if there is one."""

    async def purge_cooldowns(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` cooldowns that ended before ``before``; how many were."""

    async def purge_batch(
        self, before: float, limit: int, cursor: PurgeCursor = (-math.inf, 0)
    ) -> tuple[int, PurgeCursor]:
        """Delete up to ``limit`` of the oldest finished events (no pending delivery, not in a
        grouping window, no repeat to come) received before ``before`` and after ``cursor``,
        with their deliveries, pages and alerts, in one short transaction. Returns how many and
        the cursor to pass next; fewer than ``limit`` means none are left."""

    async def purge(self, before: float) -> int:
        """:meth:`purge_batch` until done, and the cooldowns ended before ``before``."""


class DeliveryRepository(Protocol):
    """Deliveries: one rule's requests to one phone, from pending to a final state.

    Adding pending deliveries and finishing or cancelling them keeps the store's pending count
    (:meth:`Store.pending_count`) in step, at commit.
    """

    async def add(self, event_id: str, deliveries: Sequence[NewDelivery]) -> list[Delivery]:
        """Store new deliveries of an event (each in one of the intake states); returns them
        with their ids, in the given order."""

    async def add_pending(
        self,
        event_id: str,
        rule: str,
        phone: str,
        requests: Sequence[PushRequest],
        created_at: float,
        expires_at: float,
    ) -> Delivery:
        """Store one more pending delivery of an event (a repeat, a notice)."""

    async def of_event(self, event_id: str) -> list[Delivery]:
        """An event's deliveries, in the order they were added."""

    async def by_rule(self) -> list[tuple[str, DeliveryState, int, float]]:
        """Every stored delivery counted by rule and state: ``(rule, state, count, newest
        created_at)``, for the console's rules view."""

    async def pending(self) -> list[Delivery]:
        """Every pending delivery, oldest first: what a restarted dispatcher resumes."""

    async def pending_ids(self, event_id: str, rule: str, phone: str | None = None) -> list[int]:
        """The pending deliveries of a rule's alert of an event (to one phone, or all)."""

    async def pending_phones(self, event_id: str, rule: str) -> set[str]:
        """The phones a rule still has a pending delivery of an event for."""

    async def latest(
        self, event_id: str, rule: str, phone: str, states: Collection[DeliveryState]
    ) -> tuple[int, DeliveryState] | None:
        """The newest delivery of a rule's event to ``phone`` in one of ``states``: id, state."""

    async def phones_reached(
        self, event_id: str, rule: str, states: Collection[DeliveryState]
    ) -> list[str]:
        """The phones with a delivery of the rule's event in one of ``states``, in the order
        their first delivery was added."""

    async def progress(self, delivery_id: int, sent: int, attempts: int, error: str = "") -> None:
        """Record that the phone answered the first ``sent`` requests after ``attempts`` tries
        (nothing for a delivery no longer pending)."""

    async def finish(
        self, delivery_id: int, state: str, error: str = "", attempts: int | None = None
    ) -> None:
        """Move a pending delivery to a final state (nothing if it is no longer pending), with
        the tries it took when given (kept as last recorded otherwise)."""

    async def finish_many(
        self, finished: Sequence[tuple[int, str, str] | tuple[int, str, str, int]]
    ) -> None:
        """:meth:`finish` for many ``(delivery_id, state, error[, attempts])``, in one
        transaction."""

    async def set_state(self, delivery_id: int, state: DeliveryState, error: str = "") -> None:
        """Put a delivery in ``state`` whatever state it is in now (an ack of a page)."""

    async def suppress(self, ids: Sequence[int], why: str) -> None:
        """Cancel deliveries: suppressed, with ``why`` as their error."""


class AlertRepository(Protocol):
    """Alerts (an event's rule that acks, repeats or resolves), their phones, and which of an
    event's deliveries a repeat round or a resolve added."""

    async def add(self, event_id: str, alerts: Sequence[NewAlert]) -> None:
        """Store the alerts an event starts, active, with their phones."""

    async def get(self, event_id: str, rule: str, *, lock: bool = False) -> AlertRecord | None:
        """The alert of ``rule`` for an event, or None. ``lock`` (in a transaction) keeps other
        transactions from changing the alert, or deciding on it with ``lock``, until this one
        ends; a transaction that decides on an alert takes it before reading anything of it."""

    async def of_event(self, event_id: str) -> list[AlertRecord]:
        """The alerts an event started, by rule."""

    async def phones_of(self, event_id: str) -> list[AlertPhone]:
        """Every phone of every alert of an event, with its acknowledgement."""

    async def by_token(
        self, token: str, *, lock: bool = False
    ) -> tuple[AlertRecord, AlertPhone] | None:
        """The alert and phone an ack token was handed to, or None; ``lock`` locks the alert as
        :meth:`get` does and reads the phone after the lock."""

    async def due(self, now: float) -> list[AlertRecord]:
        """Active alerts whose next round is due at ``now``, soonest first."""

    async def next_due(self) -> float | None:
        """When the soonest round of any active alert is due, or None."""

    async def unresolved(
        self, rule: str, key: str, besides: str, *, lock: bool = False
    ) -> list[AlertRecord]:
        """The alerts of ``rule`` with dedupe ``key`` not resolved yet, but the one of the
        event ``besides``, by event id; ``lock`` locks them as :meth:`get` does."""

    async def targets(self, event_id: str, rule: str) -> list[AlertTarget]:
        """The phones of an alert with their requests, in the order they were added."""

    async def waiting(self, event_id: str, rule: str, *, escalation: bool) -> int:
        """How many phones of an alert have not acknowledged (escalation phones counted only
        with ``escalation``)."""

    async def set_round(self, event_id: str, rule: str, rounds: int, next_at: float | None) -> None:
        """Record that round ``rounds`` was pushed and when the next one is due."""

    async def end(self, event_id: str, rule: str, state: AlertState, at: float, by: str) -> None:
        """Stop an alert: ``state`` (acknowledged, resolved), when and by whom; no more rounds."""

    async def acknowledge_phone(self, token: str, at: float, by: str) -> None:
        """Record that the phone holding ``token`` acknowledged at ``at``, from ``by``."""

    async def add_round_delivery(self, delivery_id: int, round_: int, kind: RoundKind) -> None:
        """Mark a delivery as pushed by round ``round_`` (kind: repeat, escalation, resolved)."""

    async def delivery_rounds(self, event_id: str) -> dict[int, tuple[int, RoundKind]]:
        """Delivery id -> (round, kind) of the deliveries rounds and resolves added to an event;
        the first pages are not listed (round 0)."""

    async def actions_of_page(self, page_token: str) -> list[ActionRecord]:
        """The action softkeys of the per-phone page ``page_token`` names, by position."""

    async def action(self, token: str) -> ActionRecord | None:
        """The action an action token was handed out for, or None."""

    async def claim_action(self, token: str, at: float) -> bool:
        """Mark an action used at ``at``; False if it is one-time and was used already."""

    async def release_action(self, token: str) -> None:
        """Make a one-time action usable again (what it did failed)."""

    async def add_press(self, press: ActionPress) -> None:
        """Record one press of an action softkey."""

    async def presses_of(self, event_id: str) -> list[ActionPress]:
        """The action presses of an event, oldest first."""


class GroupRepository(Protocol):
    """Grouping windows per (rule, key) and the events waiting in them."""

    async def join(self, event_id: str, groups: Sequence[NewGroupedEvent]) -> None:
        """Add an event to its windows, opening those not open yet (opened now)."""

    async def next_due(self) -> float | None:
        """When the earliest window is due, or None if none is open."""

    async def due(self, now: float) -> list[GroupWindow]:
        """The windows due at ``now``, each with its events in arrival order."""

    async def lock_due(self, rule: str, key: str, now: float) -> GroupWindow | None:
        """The (rule, key) window if it is due at ``now``, locked for the transaction (an event
        joining it waits for its end), with the events that joined it before; None if it is not
        open or not due (another instance flushed it)."""

    async def remove_events(self, rule: str, key: str, through: int) -> None:
        """Take the events up to sequence ``through`` out of the (rule, key) window."""

    async def close_if_empty(self, rule: str, key: str) -> None:
        """Remove the (rule, key) window unless events still wait in it."""


class SilenceRepository(Protocol):
    """Runtime silences (phonepush.silence keeps them in memory and writes through)."""

    async def add(self, silence: StoredSilence) -> None:
        """Store a silence (its id must be new)."""

    async def delete(self, silence_id: str) -> bool:
        """Remove a silence; False if there was none with that id."""

    async def all(self) -> list[StoredSilence]:
        """Every stored silence, oldest first."""


class ScheduleRepository(Protocol):
    """The newest firing claimed per schedule (phonepush.sources.schedule)."""

    async def last(self, schedule: str) -> float | None:
        """When the newest claimed firing of ``schedule`` was due; None if it never fired."""

    async def claim(self, schedule: str, scheduled_at: float, now: float) -> bool:
        """Claim the firing of ``schedule`` due at ``scheduled_at``: True for exactly one caller,
        and only if no firing as new or newer was claimed before (by any instance)."""


class Transaction(Protocol):
    """The repositories of one open transaction: what they write commits together."""

    @property
    def events(self) -> EventRepository: ...
    @property
    def deliveries(self) -> DeliveryRepository: ...
    @property
    def alerts(self) -> AlertRepository: ...
    @property
    def groups(self) -> GroupRepository: ...
    @property
    def silences(self) -> SilenceRepository: ...
    @property
    def schedules(self) -> ScheduleRepository: ...


class Store(Transaction, Protocol):
    """One store: its repositories (as in :class:`Transaction`, each call on its own), its
    transactions, and what the daemon watches of it.

    ``full`` is set by housekeeping while pending work alone is over ``max_size``: new events
    are refused then. ``healthy`` is False from a failed write until a later one succeeds.
    """

    full: bool
    healthy: bool
    max_pending: int
    max_size: int | None

    @property
    def location(self) -> str:
        """Where the data is, for messages (a file, a database URL without its password)."""

    def transaction(
        self, what: str, *, durable: bool = False
    ) -> AbstractAsyncContextManager[Transaction]:
        """Open a transaction; it commits when the ``async with`` block ends, and is rolled back if
        the block raises. ``what`` names it in errors (``cannot store event X``). ``durable``
        commits as durably as the store is configured to (an accepted event); others may be
        made durable by the next durable commit. A transaction opened inside another one is
        part of it."""

    # pending_count, admit, room and disk_bytes stay synchronous: they read counters the store
    # keeps in memory (or the size of a file), and the metrics collector calls them at scrape
    # time, from a thread that has no event loop to await on.

    def pending_count(self) -> int:
        """How many deliveries are pending (cheap: kept in memory)."""

    def admit(self, new_pending: int) -> None:
        """Raise :class:`~phonepush.errors.SpoolFull` unless ``new_pending`` more pending
        deliveries of a new event may be stored (``full``, ``max_pending``)."""

    def room(self) -> int:
        """How many more pending deliveries ``max_pending`` allows."""

    async def check(self) -> None:
        """Raise :class:`~phonepush.errors.SpoolError` unless a write succeeds now."""

    async def live_bytes(self) -> int:
        """Bytes the stored data takes: what ``max_size`` bounds."""

    def disk_bytes(self) -> int:
        """Bytes the store takes on disk now; never raises."""
