"""The repositories: one class per table group, over the statements of the store's schema, the
same for both backends.

Each runs its statements through :class:`Sql`, the executor of its backend (the
:class:`~phonepush.store.spool.Spool` on SQLite, the
:class:`~phonepush.store.postgres.PostgresStore` on PostgreSQL), which translates errors and knows
whether a transaction is open: a single write on its own is its own transaction, inside
``store.transaction()`` it is part of that one. Rows are read by column name
(:class:`sqlite3.Row`, psycopg's ``dict_row``).

Statements are written once, in SQLite's dialect with ``?`` placeholders. The PostgreSQL executor
turns those into ``%s`` and drops SQLite's ``INDEXED BY`` hints (its planner picks the index);
``insert`` returns the new id by ``lastrowid`` or ``RETURNING id``. What else differs is in the
executor's :class:`Dialect`.

The repository methods are ``async def`` because the interface is (a network database must not
stall the event loop). On SQLite the executor's methods never suspend (see
:class:`~phonepush.store.spool.Spool`), so neither do these, and a transaction's body does not
interleave with other tasks as long as it awaits only the store.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final, Protocol, get_args

from phonepush.events import Event
from phonepush.store.interface import PurgeCursor
from phonepush.store.records import (
    FINAL_STATES,
    INTAKE_STATES,
    ActionPress,
    ActionRecord,
    AlertPhone,
    AlertRecord,
    AlertState,
    AlertTarget,
    Delivery,
    DeliveryState,
    EventRecord,
    GroupedEvent,
    GroupWindow,
    NewAlert,
    NewDelivery,
    NewGroupedEvent,
    PushRequest,
    RequestKind,
    RoundKind,
    StoredSilence,
)

__all__ = [
    "DELIVERY_COLUMNS",
    "POSTGRES",
    "SQLITE",
    "Alerts",
    "Deliveries",
    "Dialect",
    "Events",
    "Groups",
    "Repositories",
    "Row",
    "Schedules",
    "Silences",
    "Sql",
    "delivery_of_row",
]


class Row(Protocol):
    """A row as the executors return it: read by column name."""

    def __getitem__(self, column: str, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class Dialect:
    """What the backends' SQL says differently, beyond what their executors translate."""

    #: Store a page, replacing the one of the same id.
    put_page: str
    #: The column that orders a table's rows as they were inserted (alert_phones).
    insertion_order: str
    #: What ends a SELECT of a row the transaction is about to update: the lock that keeps
    #: another transaction from changing it in between, where there can be one.
    lock_row: str


SQLITE: Final = Dialect(
    put_page="INSERT OR REPLACE INTO pages (id, event_id, xml) VALUES (?, ?, ?)",
    insertion_order="rowid",
    lock_row="",  # a transaction holds the database's write lock from BEGIN IMMEDIATE
)
POSTGRES: Final = Dialect(
    put_page="INSERT INTO pages (id, event_id, xml) VALUES (?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET event_id = excluded.event_id, xml = excluded.xml",
    insertion_order="seq",  # its tables have no rowid: alert_phones has a column for it
    lock_row=" FOR UPDATE",
)

_KINDS: Final = frozenset(get_args(RequestKind))
_PENDING: Final = DeliveryState.PENDING
# A dict lookup: calling the enum costs a microsecond a row.
_STATES: Final = {state.value: state for state in DeliveryState}
_ALERT_STATES: Final = {state.value: state for state in AlertState}


class Sql(Protocol):
    """What the repositories need of the store: statements, with its error handling."""

    @property
    def dialect(self) -> Dialect: ...
    async def rows(self, sql: str, params: Sequence[Any], what: str) -> Sequence[Row]: ...
    async def row(self, sql: str, params: Sequence[Any], what: str) -> Row | None: ...
    async def write(self, sql: str, params: Sequence[Any], what: str) -> int: ...
    async def write_many(self, sql: str, params: Iterable[Sequence[Any]], what: str) -> int: ...
    async def insert(self, sql: str, params: Sequence[Any], what: str) -> int: ...
    def pending_changed(self, delta: int) -> None: ...
    def atomic(self, what: str) -> AbstractAsyncContextManager[object]:
        """The statements of the ``async with`` block in one transaction (or in the open one)."""


# --- events, pages, cooldowns -------------------------------------------------------------------

_EVENT_COLUMNS: Final = "id, source, topic, payload, headers, received_at, rules"
_INSERT_EVENT: Final = (
    "INSERT INTO events (id, source, topic, payload, headers, received_at, rules)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_EVENT: Final = f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = ?"
_RECENT: Final = f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY seq DESC LIMIT ?"
_INSERT_PAGE: Final = "INSERT INTO pages (id, event_id, xml) VALUES (?, ?, ?)"
_PAGE: Final = "SELECT xml FROM pages WHERE id = ?"
_UPSERT_COOLDOWN: Final = (
    "INSERT INTO cooldowns (rule, key, until) VALUES (?, ?, ?)"
    " ON CONFLICT (rule, key) DO UPDATE SET until = excluded.until"
)
# A claim: a new cooldown, or one replacing a cooldown that is over. The WHERE makes it a
# compare-and-set in one statement; on PostgreSQL a concurrent claim of the same (rule, key) waits
# for the first to commit and then finds its window running, so exactly one of them is returned.
_CLAIM_COOLDOWN: Final = (
    "INSERT INTO cooldowns (rule, key, until) VALUES (?, ?, ?)"
    " ON CONFLICT (rule, key) DO UPDATE SET until = excluded.until"
    " WHERE cooldowns.until <= ? RETURNING rule, key"
)
_IN_COOLDOWN: Final = "SELECT 1 FROM cooldowns WHERE rule = ? AND key = ? AND until > ?"
_EXPIRED_COOLDOWNS: Final = (
    "DELETE FROM cooldowns WHERE (rule, key) IN"
    " (SELECT rule, key FROM cooldowns WHERE until < ? LIMIT ?)"
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
# What goes with a purged event, children first.
_PURGE: Final = (
    "DELETE FROM alert_deliveries WHERE delivery_id IN"
    " (SELECT id FROM deliveries WHERE event_id = ?)",
    "DELETE FROM alert_phones WHERE event_id = ?",
    "DELETE FROM alert_actions WHERE event_id = ?",
    "DELETE FROM action_presses WHERE event_id = ?",
    "DELETE FROM alerts WHERE event_id = ?",
    "DELETE FROM deliveries WHERE event_id = ?",
    "DELETE FROM pages WHERE event_id = ?",
    "DELETE FROM events WHERE id = ?",
)


def _marks(values: Collection[object]) -> str:
    return ", ".join("?" * len(values))


class Events:
    """:class:`~phonepush.store.interface.EventRepository`."""

    def __init__(self, sql: Sql, deliveries: Deliveries) -> None:
        self._sql = sql
        self._deliveries = deliveries

    async def add(self, event: Event, rules: Sequence[str]) -> None:
        row = (
            event.id,
            event.source,
            event.topic,
            event.payload,
            json.dumps(dict(event.headers), ensure_ascii=False),
            event.received_at,
            json.dumps(list(rules), ensure_ascii=False),
        )
        await self._sql.write(_INSERT_EVENT, row, f"cannot store event {event.id}")

    async def get(self, event_id: str) -> EventRecord | None:
        row = await self._sql.row(_EVENT, (event_id,), "cannot read events")
        return None if row is None else await self._record(row)

    async def recent(self, limit: int = 20) -> list[EventRecord]:
        return [
            await self._record(row)
            for row in await self._sql.rows(_RECENT, (limit,), "cannot read events")
        ]

    async def add_pages(self, event_id: str, pages: Mapping[str, str]) -> None:
        if pages:
            rows = [(page_id, event_id, xml) for page_id, xml in pages.items()]
            await self._sql.write_many(_INSERT_PAGE, rows, "cannot store pages")

    async def put_page(self, page_id: str, event_id: str, xml: str) -> None:
        await self._sql.write(
            self._sql.dialect.put_page, (page_id, event_id, xml), f"cannot store page {page_id}"
        )

    async def page(self, page_id: str) -> str | None:
        row = await self._sql.row(_PAGE, (page_id,), "cannot read pages")
        return None if row is None else str(row["xml"])

    async def in_cooldown(self, rule: str, key: str, now: float) -> bool:
        return (
            await self._sql.row(_IN_COOLDOWN, (rule, key, now), "cannot read cooldowns") is not None
        )

    async def start_cooldowns(self, cooldowns: Sequence[tuple[str, str, float]]) -> None:
        if cooldowns:
            await self._sql.write_many(_UPSERT_COOLDOWN, cooldowns, "cannot store cooldowns")

    async def claim_cooldowns(
        self, cooldowns: Sequence[tuple[str, str, float]], now: float
    ) -> set[tuple[str, str]]:
        claimed: set[tuple[str, str]] = set()
        # In (rule, key) order: two commits claiming the same keys lock them in the same order.
        for rule, key, until in sorted(cooldowns):
            rows = await self._sql.rows(
                _CLAIM_COOLDOWN, (rule, key, until, now), "cannot store cooldowns"
            )
            claimed.update((row["rule"], row["key"]) for row in rows)
        return claimed

    async def end_cooldown(self, rule: str, key: str) -> None:
        await self._sql.write(
            "DELETE FROM cooldowns WHERE rule = ? AND key = ?",
            (rule, key),
            "cannot end a cooldown",
        )

    async def purge_cooldowns(self, before: float, limit: int) -> int:
        return await self._sql.write(_EXPIRED_COOLDOWNS, (before, limit), "cannot purge cooldowns")

    async def purge_batch(
        self, before: float, limit: int, cursor: PurgeCursor = (-math.inf, 0)
    ) -> tuple[int, PurgeCursor]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        after_at, after_seq = cursor
        async with self._sql.atomic("cannot purge"):
            rows = await self._sql.rows(
                _PURGEABLE, (before, after_at, after_at, after_seq, limit), "cannot purge"
            )
            doomed = [(row["id"],) for row in rows]
            if doomed:
                for statement in _PURGE:
                    await self._sql.write_many(statement, doomed, "cannot purge")
        if doomed:
            cursor = (float(rows[-1]["received_at"]), int(rows[-1]["seq"]))
        return len(doomed), cursor

    async def purge(self, before: float) -> int:
        total = 0
        cursor: PurgeCursor = (-math.inf, 0)
        while True:
            removed, cursor = await self.purge_batch(before, 1000, cursor)
            total += removed
            if removed < 1000:
                break
        while await self.purge_cooldowns(before, 1000) == 1000:
            pass
        return total

    async def _record(self, row: Row) -> EventRecord:
        return EventRecord(
            id=row["id"],
            source=row["source"],
            topic=row["topic"],
            received_at=row["received_at"],
            rules=tuple(json.loads(row["rules"])),
            deliveries=tuple(await self._deliveries.of_event(row["id"])),
            payload=bytes(row["payload"]),
            headers=json.loads(row["headers"]),
        )


# --- deliveries ---------------------------------------------------------------------------------

_DELIVERY_COLUMNS: Final = (
    "id, event_id, rule, phone, requests, sent, attempts, created_at, expires_at, state, error"
)
_INSERT_DELIVERY: Final = (
    "INSERT INTO deliveries (event_id, rule, phone, requests, created_at, expires_at, state, error)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_PENDING_ROWS: Final = (
    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries INDEXED BY deliveries_pending"
    " WHERE state = 'pending' ORDER BY id"
)
_EVENT_DELIVERIES: Final = (
    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE event_id = ? ORDER BY id"
)
_PROGRESS: Final = (
    "UPDATE deliveries SET sent = ?, attempts = ?, error = ? WHERE id = ? AND state = 'pending'"
)
_FINISH: Final = (
    "UPDATE deliveries SET state = ?, error = ?, attempts = COALESCE(?, attempts)"
    " WHERE id = ? AND state = 'pending'"
)
_PENDING_OF: Final = (
    "SELECT id, phone FROM deliveries WHERE event_id = ? AND rule = ? AND state = 'pending'"
    " ORDER BY id"
)


class Deliveries:
    """:class:`~phonepush.store.interface.DeliveryRepository`.

    Delivery ids are rowids without AUTOINCREMENT on SQLite (which writes one more page per
    commit): they increase, and can only be reused once purge removed every newer delivery. On
    PostgreSQL they are identity values, never reused.
    """

    def __init__(self, sql: Sql, clock: Callable[[], float]) -> None:
        self._sql = sql
        self._clock = clock

    async def add(self, event_id: str, deliveries: Sequence[NewDelivery]) -> list[Delivery]:
        for new in deliveries:
            if new.state not in INTAKE_STATES:
                raise ValueError(f"a new delivery cannot be {new.state!r}")
        # The deliveries of one event to many phones carry the same requests: encode them once.
        dumped: dict[tuple[PushRequest, ...], str] = {}
        created_at = self._clock()
        insert = self._sql.insert
        stored: list[Delivery] = []
        for new in deliveries:
            requests = tuple(new.requests)
            text = dumped.get(requests)
            if text is None:
                text = dumped[requests] = _dump_requests(requests)
            state = _STATES[new.state]
            row = (
                event_id,
                new.rule,
                new.phone,
                text,
                created_at,
                new.expires_at,
                state,
                new.error,
            )
            delivery_id = await insert(_INSERT_DELIVERY, row, "cannot store deliveries")
            stored.append(
                Delivery(
                    delivery_id,
                    event_id,
                    new.rule,
                    new.phone,
                    requests,
                    0,
                    0,
                    created_at,
                    new.expires_at,
                    state,
                    new.error,
                )
            )
        self._sql.pending_changed(sum(1 for d in stored if d.state is _PENDING))
        return stored

    async def add_pending(
        self,
        event_id: str,
        rule: str,
        phone: str,
        requests: Sequence[PushRequest],
        created_at: float,
        expires_at: float,
    ) -> Delivery:
        row = (event_id, rule, phone, _dump_requests(requests), created_at, expires_at)
        delivery_id = await self._sql.insert(
            _INSERT_DELIVERY, (*row, _PENDING, ""), "cannot store deliveries"
        )
        self._sql.pending_changed(1)
        return Delivery(
            delivery_id,
            event_id,
            rule,
            phone,
            tuple(requests),
            0,
            0,
            created_at,
            expires_at,
            _PENDING,
            "",
        )

    async def of_event(self, event_id: str) -> list[Delivery]:
        rows = await self._sql.rows(_EVENT_DELIVERIES, (event_id,), "cannot read deliveries")
        return [_delivery(row) for row in rows]

    async def pending(self) -> list[Delivery]:
        rows = await self._sql.rows(_PENDING_ROWS, (), "cannot read deliveries")
        # The deliveries of one event to many phones carry the same requests: decode them once.
        decoded: dict[str, tuple[PushRequest, ...]] = {}
        return [_delivery(row, decoded) for row in rows]

    async def pending_ids(self, event_id: str, rule: str, phone: str | None = None) -> list[int]:
        rows = await self._sql.rows(_PENDING_OF, (event_id, rule), "cannot read deliveries")
        return [row["id"] for row in rows if phone is None or row["phone"] == phone]

    async def pending_phones(self, event_id: str, rule: str) -> set[str]:
        rows = await self._sql.rows(_PENDING_OF, (event_id, rule), "cannot read deliveries")
        return {row["phone"] for row in rows}

    async def latest(
        self, event_id: str, rule: str, phone: str, states: Collection[DeliveryState]
    ) -> tuple[int, DeliveryState] | None:
        row = await self._sql.row(
            "SELECT id, state FROM deliveries WHERE event_id = ? AND rule = ? AND phone = ?"
            f" AND state IN ({_marks(states)}) ORDER BY id DESC LIMIT 1",
            (event_id, rule, phone, *states),
            "cannot read deliveries",
        )
        return None if row is None else (row["id"], _STATES[row["state"]])

    async def by_rule(self) -> list[tuple[str, DeliveryState, int, float]]:
        rows = await self._sql.rows(
            "SELECT rule, state, count(*) AS n, max(created_at) AS newest FROM deliveries"
            " GROUP BY rule, state",
            (),
            "cannot read deliveries",
        )
        return [(row["rule"], _STATES[row["state"]], row["n"], row["newest"]) for row in rows]

    async def phones_reached(
        self, event_id: str, rule: str, states: Collection[DeliveryState]
    ) -> list[str]:
        rows = await self._sql.rows(
            "SELECT phone FROM deliveries WHERE event_id = ? AND rule = ?"
            f" AND state IN ({_marks(states)}) GROUP BY phone ORDER BY min(id)",
            (event_id, rule, *states),
            "cannot read deliveries",
        )
        return [row["phone"] for row in rows]

    async def progress(self, delivery_id: int, sent: int, attempts: int, error: str = "") -> None:
        if sent < 0 or attempts < 0:
            raise ValueError("sent and attempts cannot be negative")
        await self._sql.write(
            _PROGRESS, (sent, attempts, error, delivery_id), f"cannot update delivery {delivery_id}"
        )

    async def finish(
        self, delivery_id: int, state: str, error: str = "", attempts: int | None = None
    ) -> None:
        if state not in FINAL_STATES:
            raise ValueError(f"cannot finish a delivery as {state!r}")
        changed = await self._sql.write(
            _FINISH, (state, error, attempts, delivery_id), f"cannot finish delivery {delivery_id}"
        )
        self._sql.pending_changed(-changed)

    async def finish_many(
        self, finished: Sequence[tuple[int, str, str] | tuple[int, str, str, int]]
    ) -> None:
        rows: list[tuple[str, str, int | None, int]] = []
        for row in finished:
            state = row[1]
            if state not in FINAL_STATES:
                raise ValueError(f"cannot finish a delivery as {state!r}")
            rows.append((state, row[2], row[3] if len(row) == 4 else None, row[0]))
        if not rows:
            return
        # Rows are locked in id order, as cancellations (suppress, in pending_ids' order) lock
        # them: two instances finishing and cancelling the same deliveries cannot deadlock.
        rows.sort(key=lambda row: row[3])
        what = f"cannot finish {len(rows)} deliveries"
        async with self._sql.atomic(what):
            changed = await self._sql.write_many(_FINISH, rows, what)
            self._sql.pending_changed(-changed)

    async def set_state(self, delivery_id: int, state: DeliveryState, error: str = "") -> None:
        what = f"cannot update delivery {delivery_id}"
        # The row is locked from the read to the write (on SQLite the transaction is enough):
        # another task's transaction may run in between on PostgreSQL, and the pending count
        # follows what was replaced.
        async with self._sql.atomic(what):
            row = await self._sql.row(
                f"SELECT state FROM deliveries WHERE id = ?{self._sql.dialect.lock_row}",
                (delivery_id,),
                what,
            )
            if row is None:
                return
            await self._sql.write(
                "UPDATE deliveries SET state = ?, error = ? WHERE id = ?",
                (state, error, delivery_id),
                what,
            )
            self._sql.pending_changed(
                (state is _PENDING) - (row["state"] == _PENDING)  # the count follows either way
            )

    async def suppress(self, ids: Sequence[int], why: str) -> None:
        changed = await self._sql.write_many(
            "UPDATE deliveries SET state = 'suppressed', error = ? WHERE id = ?"
            " AND state = 'pending'",
            [(why, i) for i in sorted(ids)],  # id order, as finish_many locks them
            "cannot cancel deliveries",
        )
        self._sql.pending_changed(-changed)


def _dump_requests(requests: Iterable[PushRequest]) -> str:
    dumped = []
    for request in requests:
        if request.kind not in _KINDS:
            raise ValueError(f"unknown push request kind {request.kind!r}")
        dumped.append([request.kind, request.xml])
    return json.dumps(dumped, ensure_ascii=False)


#: The columns :func:`delivery_of_row` reads, for queries of the store's other modules.
DELIVERY_COLUMNS: Final = _DELIVERY_COLUMNS


def delivery_of_row(
    row: Row, decoded: dict[str, tuple[PushRequest, ...]] | None = None
) -> Delivery:
    """A row of ``DELIVERY_COLUMNS`` as the :class:`Delivery` record."""
    return _delivery(row, decoded)


def _delivery(row: Row, decoded: dict[str, tuple[PushRequest, ...]] | None = None) -> Delivery:
    requests = row["requests"]
    parsed = None if decoded is None else decoded.get(requests)
    if parsed is None:
        parsed = tuple(PushRequest(kind, xml) for kind, xml in json.loads(requests))
        if decoded is not None:
            decoded[requests] = parsed
    return Delivery(
        id=row["id"],
        event_id=row["event_id"],
        rule=row["rule"],
        phone=row["phone"],
        requests=parsed,
        sent=row["sent"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        state=_STATES[row["state"]],
        error=row["error"],
    )


# --- alerts -------------------------------------------------------------------------------------

_ALERT_COLUMNS: Final = (
    "event_id, rule, key, page_id, scope, repeat, max_repeats, escalate_after, ttl, rounds,"
    " next_at, state, ended_at, ended_by"
)
_ALERT_PHONE_COLUMNS: Final = "event_id, rule, phone, token, escalation, acked_at, acked_by"
_ALERT: Final = f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE event_id = ? AND rule = ?"
_ALERT_PHONE: Final = f"SELECT {_ALERT_PHONE_COLUMNS} FROM alert_phones WHERE token = ?"
_ALERTS_DUE: Final = (
    f"SELECT {_ALERT_COLUMNS} FROM alerts INDEXED BY alerts_due"
    " WHERE state = 'active' AND next_at IS NOT NULL AND next_at <= ? ORDER BY next_at"
)
_NEXT_REPEAT: Final = (
    "SELECT min(next_at) AS next_at FROM alerts INDEXED BY alerts_due"
    " WHERE state = 'active' AND next_at IS NOT NULL"
)
_INSERT_ALERT: Final = (
    "INSERT INTO alerts (event_id, rule, key, page_id, scope, repeat, max_repeats,"
    " escalate_after, ttl, next_at, state)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active')"
)
_INSERT_ALERT_PHONE: Final = (
    "INSERT INTO alert_phones (event_id, rule, phone, token, requests, escalation)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


class Alerts:
    """:class:`~phonepush.store.interface.AlertRepository`."""

    def __init__(self, sql: Sql) -> None:
        self._sql = sql

    async def add(self, event_id: str, alerts: Sequence[NewAlert]) -> None:
        what = f"cannot store the alerts of event {event_id}"
        for alert in alerts:
            await self._sql.write(
                _INSERT_ALERT,
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
                what,
            )
            await self._sql.write_many(
                _INSERT_ALERT_PHONE,
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
                what,
            )
            await self._sql.write_many(
                _INSERT_ACTION,
                [
                    (
                        a.token,
                        event_id,
                        alert.rule,
                        p.phone,
                        p.token,
                        a.position,
                        a.label,
                        a.spec,
                        int(a.confirm),
                        int(a.repeatable),
                        int(p.with_ack),
                        a.expires_at,
                    )
                    for p in alert.phones
                    for a in p.actions
                ],
                what,
            )

    async def actions_of_page(self, page_token: str) -> list[ActionRecord]:
        rows = await self._sql.rows(
            f"SELECT {_ACTION_COLUMNS} FROM alert_actions WHERE page_token = ? ORDER BY position",
            (page_token,),
            "cannot read actions",
        )
        return [_action(row) for row in rows]

    async def action(self, token: str) -> ActionRecord | None:
        row = await self._sql.row(
            f"SELECT {_ACTION_COLUMNS} FROM alert_actions WHERE token = ?",
            (token,),
            "cannot read actions",
        )
        return None if row is None else _action(row)

    async def claim_action(self, token: str, at: float) -> bool:
        # One statement: of two presses at once, only one finds it unused.
        return (
            await self._sql.write(
                "UPDATE alert_actions SET used_at = ? WHERE token = ?"
                " AND (used_at IS NULL OR repeatable = 1)",
                (at, token),
                "cannot record an action",
            )
            > 0
        )

    async def release_action(self, token: str) -> None:
        await self._sql.write(
            "UPDATE alert_actions SET used_at = NULL WHERE token = ? AND repeatable = 0",
            (token,),
            "cannot record an action",
        )

    async def add_press(self, press: ActionPress) -> None:
        await self._sql.write(
            "INSERT INTO action_presses (event_id, rule, phone, label, at, result, by, error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                press.event_id,
                press.rule,
                press.phone,
                press.label,
                press.at,
                press.result,
                press.by,
                press.error,
            ),
            "cannot record an action",
        )

    async def presses_of(self, event_id: str) -> list[ActionPress]:
        rows = await self._sql.rows(
            "SELECT event_id, rule, phone, label, at, result, by, error FROM action_presses"
            " WHERE event_id = ? ORDER BY id",
            (event_id,),
            "cannot read actions",
        )
        return [
            ActionPress(
                row["event_id"],
                row["rule"],
                row["phone"],
                row["label"],
                float(row["at"]),
                row["result"],
                row["by"],
                row["error"],
            )
            for row in rows
        ]

    async def get(self, event_id: str, rule: str, *, lock: bool = False) -> AlertRecord | None:
        sql = _ALERT + self._sql.dialect.lock_row if lock else _ALERT
        row = await self._sql.row(sql, (event_id, rule), "cannot read alerts")
        return None if row is None else _alert(row)

    async def of_event(self, event_id: str) -> list[AlertRecord]:
        rows = await self._sql.rows(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE event_id = ? ORDER BY rule",
            (event_id,),
            "cannot read alerts",
        )
        return [_alert(row) for row in rows]

    async def phones_of(self, event_id: str) -> list[AlertPhone]:
        rows = await self._sql.rows(
            f"SELECT {_ALERT_PHONE_COLUMNS} FROM alert_phones WHERE event_id = ?",
            (event_id,),
            "cannot read alerts",
        )
        return [_alert_phone(row) for row in rows]

    async def by_token(
        self, token: str, *, lock: bool = False
    ) -> tuple[AlertRecord, AlertPhone] | None:
        row = await self._sql.row(_ALERT_PHONE, (token,), "cannot read alerts")
        if row is None:
            return None
        phone = _alert_phone(row)
        alert = await self.get(phone.event_id, phone.rule, lock=lock)
        if alert is None or not lock:
            return None if alert is None else (alert, phone)
        # Read again under the alert's lock: an ack that committed while this one waited for it
        # shows up now (each statement reads what was committed before it began).
        row = await self._sql.row(_ALERT_PHONE, (token,), "cannot read alerts")
        return None if row is None else (alert, _alert_phone(row))

    async def due(self, now: float) -> list[AlertRecord]:
        return [
            _alert(row) for row in await self._sql.rows(_ALERTS_DUE, (now,), "cannot read alerts")
        ]

    async def next_due(self) -> float | None:
        row = await self._sql.row(_NEXT_REPEAT, (), "cannot read alerts")
        return None if row is None or row["next_at"] is None else float(row["next_at"])

    async def unresolved(
        self, rule: str, key: str, besides: str, *, lock: bool = False
    ) -> list[AlertRecord]:
        # In event order, so that two resolves lock the rows they share in the same order; a row
        # another resolve ended while this one waited for its lock is read again and left out.
        rows = await self._sql.rows(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE rule = ? AND key = ?"
            " AND state != 'resolved' AND event_id != ? ORDER BY event_id"
            + (self._sql.dialect.lock_row if lock else ""),
            (rule, key, besides),
            "cannot read alerts",
        )
        return [_alert(row) for row in rows]

    async def targets(self, event_id: str, rule: str) -> list[AlertTarget]:
        rows = await self._sql.rows(
            "SELECT phone, requests, escalation, acked_at FROM alert_phones"
            f" WHERE event_id = ? AND rule = ? ORDER BY {self._sql.dialect.insertion_order}",
            (event_id, rule),
            "cannot read alerts",
        )
        return [
            AlertTarget(
                phone=row["phone"],
                requests=tuple(PushRequest(k, xml) for k, xml in json.loads(row["requests"])),
                escalation=bool(row["escalation"]),
                acked_at=row["acked_at"],
            )
            for row in rows
        ]

    async def waiting(self, event_id: str, rule: str, *, escalation: bool) -> int:
        row = await self._sql.row(
            "SELECT count(*) AS waiting FROM alert_phones WHERE event_id = ? AND rule = ?"
            " AND acked_at IS NULL AND (escalation = 0 OR ?)",
            (event_id, rule, escalation),
            "cannot read alerts",
        )
        return 0 if row is None else int(row["waiting"])

    async def set_round(self, event_id: str, rule: str, rounds: int, next_at: float | None) -> None:
        await self._sql.write(
            "UPDATE alerts SET rounds = ?, next_at = ? WHERE event_id = ? AND rule = ?",
            (rounds, next_at, event_id, rule),
            f"cannot update alert {rule} of event {event_id}",
        )

    async def end(self, event_id: str, rule: str, state: AlertState, at: float, by: str) -> None:
        await self._sql.write(
            "UPDATE alerts SET state = ?, ended_at = ?, ended_by = ?, next_at = NULL"
            " WHERE event_id = ? AND rule = ?",
            (state, at, by, event_id, rule),
            f"cannot update alert {rule} of event {event_id}",
        )

    async def acknowledge_phone(self, token: str, at: float, by: str) -> None:
        await self._sql.write(
            "UPDATE alert_phones SET acked_at = ?, acked_by = ? WHERE token = ?",
            (at, by, token),
            "cannot record an acknowledgement",
        )

    async def add_round_delivery(self, delivery_id: int, round_: int, kind: RoundKind) -> None:
        await self._sql.write(
            "INSERT INTO alert_deliveries (delivery_id, round, kind) VALUES (?, ?, ?)",
            (delivery_id, round_, kind),
            "cannot store deliveries",
        )

    async def delivery_rounds(self, event_id: str) -> dict[int, tuple[int, RoundKind]]:
        rows = await self._sql.rows(
            "SELECT a.delivery_id, a.round, a.kind FROM alert_deliveries a"
            " JOIN deliveries d ON d.id = a.delivery_id WHERE d.event_id = ?",
            (event_id,),
            "cannot read deliveries",
        )
        return {row["delivery_id"]: (row["round"], RoundKind(row["kind"])) for row in rows}


_ACTION_COLUMNS: Final = (
    "token, event_id, rule, phone, page_token, position, label, spec, confirm, repeatable,"
    " with_ack, expires_at, used_at"
)
_INSERT_ACTION: Final = (
    "INSERT INTO alert_actions (token, event_id, rule, phone, page_token, position, label, spec,"
    " confirm, repeatable, with_ack, expires_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _action(row: Row) -> ActionRecord:
    return ActionRecord(
        token=row["token"],
        event_id=row["event_id"],
        rule=row["rule"],
        phone=row["phone"],
        page_token=row["page_token"],
        position=int(row["position"]),
        label=row["label"],
        spec=row["spec"],
        confirm=bool(row["confirm"]),
        repeatable=bool(row["repeatable"]),
        with_ack=bool(row["with_ack"]),
        expires_at=float(row["expires_at"]),
        used_at=None if row["used_at"] is None else float(row["used_at"]),
    )


def _alert(row: Row) -> AlertRecord:
    return AlertRecord(
        event_id=row["event_id"],
        rule=row["rule"],
        key=row["key"],
        page_id=row["page_id"],
        scope=row["scope"],
        repeat=row["repeat"],
        max_repeats=row["max_repeats"],
        escalate_after=row["escalate_after"],
        ttl=row["ttl"],
        rounds=row["rounds"],
        next_at=row["next_at"],
        state=_ALERT_STATES[row["state"]],
        ended_at=row["ended_at"],
        ended_by=row["ended_by"],
    )


def _alert_phone(row: Row) -> AlertPhone:
    return AlertPhone(
        event_id=row["event_id"],
        rule=row["rule"],
        phone=row["phone"],
        token=row["token"],
        escalation=bool(row["escalation"]),
        acked_at=row["acked_at"],
        acked_by=row["acked_by"],
    )


# --- grouping windows ---------------------------------------------------------------------------

_DUE_WINDOWS: Final = (
    "SELECT rule, key, opened_at, due_at, ttl FROM grouping_windows WHERE due_at <= ?"
    " ORDER BY due_at"
)
_DUE_WINDOW: Final = (
    "SELECT rule, key, opened_at, due_at, ttl FROM grouping_windows"
    " WHERE rule = ? AND key = ? AND due_at <= ?"
)
_WINDOW_EVENTS: Final = (
    "SELECT g.seq, g.event_id, g.phones, g.content, e.source, e.topic, e.payload, e.received_at"
    " FROM grouped_events AS g LEFT JOIN events AS e ON e.id = g.event_id"
    " WHERE g.rule = ? AND g.key = ? ORDER BY g.seq"
)


class Groups:
    """:class:`~phonepush.store.interface.GroupRepository`."""

    def __init__(self, sql: Sql, clock: Callable[[], float]) -> None:
        self._sql = sql
        self._clock = clock

    async def join(self, event_id: str, groups: Sequence[NewGroupedEvent]) -> None:
        what = f"cannot group event {event_id}"
        now = self._clock()
        # In (rule, key) order: two events joining the same windows lock them in the same order.
        for group in sorted(groups, key=lambda g: (g.rule, g.key)):
            # The first event of a (rule, key) opens the window; later ones only join it. The
            # assignment that changes nothing is what takes the window row's lock (DO NOTHING
            # takes none): a flush of the window (which locks it first) waits for this commit
            # and sees the event, or this waits for the flush and opens a new window.
            await self._sql.write(
                "INSERT INTO grouping_windows (rule, key, opened_at, due_at, ttl)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (rule, key)"
                " DO UPDATE SET opened_at = grouping_windows.opened_at",
                (group.rule, group.key, now, group.due_at, group.ttl),
                what,
            )
            await self._sql.write(
                "INSERT INTO grouped_events (rule, key, event_id, phones, content)"
                " VALUES (?, ?, ?, ?, ?)",
                (group.rule, group.key, event_id, json.dumps(list(group.phones)), group.content),
                what,
            )

    async def next_due(self) -> float | None:
        row = await self._sql.row(
            "SELECT min(due_at) AS due_at FROM grouping_windows", (), "cannot read grouping windows"
        )
        return None if row is None or row["due_at"] is None else float(row["due_at"])

    async def due(self, now: float) -> list[GroupWindow]:
        windows = await self._sql.rows(_DUE_WINDOWS, (now,), "cannot read grouping windows")
        return [await self._window(w) for w in windows]

    async def lock_due(self, rule: str, key: str, now: float) -> GroupWindow | None:
        window = await self._sql.row(
            _DUE_WINDOW + self._sql.dialect.lock_row,
            (rule, key, now),
            "cannot read grouping windows",
        )
        # The events are read after the lock: every event that joined before it is among them.
        return None if window is None else await self._window(window)

    async def _window(self, w: Row) -> GroupWindow:
        rows = await self._sql.rows(
            _WINDOW_EVENTS, (w["rule"], w["key"]), "cannot read grouped events"
        )
        events = tuple(
            GroupedEvent(
                seq=row["seq"],
                event_id=row["event_id"],
                phones=tuple(json.loads(row["phones"])),
                content=row["content"],
                source=row["source"] or "",
                topic=row["topic"] or "",
                payload=bytes(row["payload"] or b""),
                received_at=row["received_at"] or 0.0,
            )
            for row in rows
        )
        return GroupWindow(w["rule"], w["key"], w["opened_at"], w["due_at"], w["ttl"], events)

    async def remove_events(self, rule: str, key: str, through: int) -> None:
        await self._sql.write(
            "DELETE FROM grouped_events WHERE rule = ? AND key = ? AND seq <= ?",
            (rule, key, through),
            f"cannot flush group {rule}",
        )

    async def close_if_empty(self, rule: str, key: str) -> None:
        await self._sql.write(
            "DELETE FROM grouping_windows WHERE rule = ? AND key = ? AND NOT EXISTS"
            " (SELECT 1 FROM grouped_events WHERE rule = ? AND key = ?)",
            (rule, key, rule, key),
            f"cannot flush group {rule}",
        )


# --- silences -----------------------------------------------------------------------------------

_INSERT_SILENCE: Final = (
    "INSERT INTO silences (id, matchers, starts_at, ends_at, created_at, created_by, comment)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SILENCES: Final = (
    "SELECT id, matchers, starts_at, ends_at, created_at, created_by, comment FROM silences"
    " ORDER BY created_at, id"
)


class Silences:
    """:class:`~phonepush.store.interface.SilenceRepository`."""

    def __init__(self, sql: Sql) -> None:
        self._sql = sql

    async def add(self, silence: StoredSilence) -> None:
        await self._sql.write(
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

    async def delete(self, silence_id: str) -> bool:
        return bool(
            await self._sql.write(
                "DELETE FROM silences WHERE id = ?", (silence_id,), "cannot delete a silence"
            )
        )

    async def all(self) -> list[StoredSilence]:
        return [
            StoredSilence(
                id=row["id"],
                matchers=row["matchers"],
                starts_at=row["starts_at"],
                ends_at=row["ends_at"],
                created_at=row["created_at"],
                created_by=row["created_by"],
                comment=row["comment"],
            )
            for row in await self._sql.rows(_SILENCES, (), "cannot read silences")
        ]


# The newest firing claimed per schedule. The upsert's WHERE makes a claim a compare-and-set in
# one statement: it changes a row only for a firing newer than the last one claimed, so of
# several instances sharing the file exactly one wins each firing, and an old firing can never
# be claimed again.
_CLAIM_FIRING: Final = (
    "INSERT INTO schedule_firings (schedule, scheduled_at, fired_at) VALUES (?, ?, ?)"
    " ON CONFLICT (schedule) DO UPDATE SET scheduled_at = excluded.scheduled_at,"
    " fired_at = excluded.fired_at WHERE schedule_firings.scheduled_at < excluded.scheduled_at"
)


class Schedules:
    """:class:`~phonepush.store.interface.ScheduleRepository`."""

    def __init__(self, sql: Sql) -> None:
        self._sql = sql

    async def last(self, schedule: str) -> float | None:
        row = await self._sql.row(
            "SELECT scheduled_at FROM schedule_firings WHERE schedule = ?",
            (schedule,),
            f"cannot read schedule {schedule}",
        )
        return None if row is None else float(row["scheduled_at"])

    async def claim(self, schedule: str, scheduled_at: float, now: float) -> bool:
        return bool(
            await self._sql.write(
                _CLAIM_FIRING,
                (schedule, scheduled_at, now),
                f"cannot claim a firing of schedule {schedule}",
            )
        )


class Repositories:
    """The repositories of one store, reached as ``store.events``, ``store.deliveries``...: the
    base of both stores, each the :class:`Sql` its repositories run their statements through."""

    def __init__(self, sql: Sql, clock: Callable[[], float]) -> None:
        self.deliveries = Deliveries(sql, clock)
        self.events = Events(sql, self.deliveries)
        self.alerts = Alerts(sql)
        self.groups = Groups(sql, clock)
        self.silences = Silences(sql)
        self.schedules = Schedules(sql)
