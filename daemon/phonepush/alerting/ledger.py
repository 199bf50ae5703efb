"""What an acknowledgement, a repeat round and a resolve do to an alert and its deliveries.

Each is one transaction over the store's alert and delivery repositories (and, for a resolve,
its pages and cooldowns), so a crash leaves an alert as it was or as it ends up, never half-way.
The store only keeps alerts; these are the rules about them:

* **Ack scope.** The phone's latest delivery of the page (delivered, or still on the wire: the
  page is on screen while a ``Play:`` item holds the phone's answer) becomes acknowledged. With
  scope "any" the alert stops and its pending deliveries to every phone are cancelled; with scope
  "phone" only that phone's are, and the alert stops once every phone it went to acknowledged
  (escalation phones count once escalation started). A second press changes nothing.
* **Repeat rounds.** A due round pushes again to every phone still waiting for it (all of them,
  or those that have not acknowledged with scope "phone"; escalation phones from round
  ``escalate_after`` on), skipping a phone whose earlier delivery is still pending.
* **Resolving.** A later event ends the earlier alerts of a rule with the same dedupe key: their
  repeats stop, their pending deliveries are cancelled, the rule's cooldown for the key ends, and
  every phone that showed the page gets a notice.

Several daemons may share one store (PostgreSQL). Each transaction here locks the alert rows it
decides on before it reads anything of them (``lock=True``), one alert at a time or several in
event order, so two of them on the same alert run one after the other and the second sees what
the first did: of two presses of one token one is the first; a round waiting for an ack finds the
alert ended (or the phone acknowledged), an ack waiting for a round cancels what the round added;
of two resolves one ends the alert and sends the notices; of two rounds due at once (schedulers
of two instances overlapping) one is pushed. On SQLite the transaction holds the
database's write lock anyway. A transaction the database rolls back for running into another
one (:class:`~phonepush.errors.SpoolConflict`) is run once more.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from phonepush.errors import SpoolConflict, SpoolFull
from phonepush.store.interface import Store, Transaction
from phonepush.store.records import (
    AlertPhone,
    AlertRecord,
    AlertState,
    Delivery,
    DeliveryState,
    PushRequest,
    RoundKind,
)

__all__ = ["AckResult", "Resolution", "acknowledge", "repeat_round", "resolve"]

#: A notice renderer: (alert, the alert's page XML) -> (notice page id, its XML, its requests).
Notice = Callable[[AlertRecord, str], tuple[str, str, tuple[PushRequest, ...]]]

log = logging.getLogger("phonepush.alerting")

_T = TypeVar("_T")

_SHOWING = (DeliveryState.DELIVERED, DeliveryState.PENDING)
_SHOWN = (DeliveryState.DELIVERED, DeliveryState.ACKNOWLEDGED)


@dataclass(frozen=True, slots=True)
class AckResult:
    """What :func:`acknowledge` did. ``first`` is False for a second press."""

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


async def _once_more(what: str, run: Callable[[], Awaitable[_T]]) -> _T:
    """``run()``, and once more if the database rolled it back for a conflict with another
    instance's transaction (a deadlock, a serialization failure): nothing of it was written."""
    try:
        return await run()
    except SpoolConflict as exc:
        log.info("%s ran into another transaction, once more: %s", what, exc)
        return await run()


async def acknowledge(store: Store, token: str, at: float, by: str) -> AckResult | None:
    """Record that the phone holding ``token`` acknowledged its page at ``at`` (from ``by``).
    Returns None for an unknown token."""
    return await _once_more("an acknowledgement", lambda: _acknowledge(store, token, at, by))


async def _acknowledge(store: Store, token: str, at: float, by: str) -> AckResult | None:
    async with store.transaction("cannot record an acknowledgement") as tx:
        found = await tx.alerts.by_token(token, lock=True)
        if found is None:
            return None
        alert, phone = found
        if phone.acked_at is not None:
            return AckResult(alert, phone, first=False)
        await tx.alerts.acknowledge_phone(token, at, by)
        cancelled: list[int] = []
        shown = await tx.deliveries.latest(alert.event_id, alert.rule, phone.phone, _SHOWING)
        if shown is not None:
            delivery_id, state = shown
            await tx.deliveries.set_state(delivery_id, DeliveryState.ACKNOWLEDGED)
            if state is DeliveryState.PENDING:
                cancelled.append(delivery_id)
        if alert.state is AlertState.ACTIVE:
            everyone = alert.scope == "any"
            cancelled += await _cancel(
                tx, alert, None if everyone else phone.phone, f"acknowledged on {phone.phone}"
            )
            if not everyone:
                escalating = alert.escalate_after > 0 and alert.rounds >= alert.escalate_after
                everyone = (
                    await tx.alerts.waiting(alert.event_id, alert.rule, escalation=escalating) == 0
                )
            if everyone:
                await tx.alerts.end(
                    alert.event_id, alert.rule, AlertState.ACKNOWLEDGED, at, phone.phone
                )
                alert = await tx.alerts.get(alert.event_id, alert.rule) or alert
    acked = dataclasses.replace(phone, acked_at=at, acked_by=by)
    return AckResult(alert, acked, first=True, cancelled=tuple(cancelled))


async def repeat_round(
    store: Store, event_id: str, rule: str, now: float
) -> tuple[AlertRecord, list[Delivery]] | None:
    """Push the next round of an active alert whose repeat is due: one delivery per phone that
    waits for it. Returns the updated alert and the new deliveries, or None if the alert is no
    longer active or its next round is not due at ``now`` (another instance pushed it).
    Raises :class:`SpoolFull` (writing nothing) when the backlog has no room."""
    return await _once_more(
        f"round of {rule} ({event_id})", lambda: _repeat_round(store, event_id, rule, now)
    )


async def _repeat_round(
    store: Store, event_id: str, rule: str, now: float
) -> tuple[AlertRecord, list[Delivery]] | None:
    async with store.transaction(f"cannot repeat {rule} of event {event_id}") as tx:
        alert = await tx.alerts.get(event_id, rule, lock=True)
        if (
            alert is None
            or alert.state is not AlertState.ACTIVE
            or alert.next_at is None
            or alert.next_at > now
        ):
            return None
        number = alert.rounds + 1
        busy = await tx.deliveries.pending_phones(event_id, rule)
        escalating = alert.escalate_after > 0 and number >= alert.escalate_after
        targets = [
            t
            for t in await tx.alerts.targets(event_id, rule)
            if (not t.escalation or escalating)
            and (alert.scope == "any" or t.acked_at is None)
            and t.phone not in busy
        ]
        if len(targets) > store.room():
            raise SpoolFull(
                f"spool {store.location}: no room for round {number} of {rule} ({event_id})"
            )
        expires_at = now + min(alert.ttl, alert.repeat)
        created: list[Delivery] = []
        for target in targets:
            delivery = await tx.deliveries.add_pending(
                event_id, rule, target.phone, target.requests, now, expires_at
            )
            kind = RoundKind.ESCALATION if target.escalation else RoundKind.REPEAT
            await tx.alerts.add_round_delivery(delivery.id, number, kind)
            created.append(delivery)
        next_at = now + alert.repeat if number < alert.max_repeats else None
        await tx.alerts.set_round(event_id, rule, number, next_at)
    return dataclasses.replace(alert, rounds=number, next_at=next_at), created


async def resolve(
    store: Store, rule: str, key: str, *, by_event: str, at: float, notice: Notice
) -> list[Resolution]:
    """Resolve the earlier alerts of ``rule`` with dedupe ``key`` (not yet resolved, not started
    by ``by_event``). ``notice(alert, page_xml)`` renders the notice the phones that showed the
    page get: (page id, page XML, requests)."""
    return await _once_more(
        f"resolve of {rule}",
        lambda: _resolve(store, rule, key, by_event=by_event, at=at, notice=notice),
    )


async def _resolve(
    store: Store, rule: str, key: str, *, by_event: str, at: float, notice: Notice
) -> list[Resolution]:
    resolved: list[Resolution] = []
    async with store.transaction(f"cannot resolve {rule}") as tx:
        alerts = await tx.alerts.unresolved(rule, key, besides=by_event, lock=True)
        for alert in alerts:
            cancelled = await _cancel(tx, alert, None, f"resolved by {by_event}")
            await tx.alerts.end(alert.event_id, alert.rule, AlertState.RESOLVED, at, by_event)
            shown = await tx.deliveries.phones_reached(alert.event_id, alert.rule, _SHOWN)
            page = await tx.events.page(alert.page_id) if alert.page_id else None
            notices: list[Delivery] = []
            if page is not None and shown:
                page_id, xml, requests = notice(alert, page)
                await tx.events.put_page(page_id, alert.event_id, xml)
                for phone in shown:
                    delivery = await tx.deliveries.add_pending(
                        alert.event_id, rule, phone, requests, at, at + alert.ttl
                    )
                    await tx.alerts.add_round_delivery(
                        delivery.id, alert.rounds, RoundKind.RESOLVED
                    )
                    notices.append(delivery)
            ended = dataclasses.replace(
                alert, state=AlertState.RESOLVED, ended_at=at, ended_by=by_event, next_at=None
            )
            resolved.append(Resolution(ended, tuple(cancelled), tuple(notices)))
        if alerts:
            await tx.events.end_cooldown(rule, key)
    return resolved


async def _cancel(tx: Transaction, alert: AlertRecord, phone: str | None, why: str) -> list[int]:
    """Cancel an alert's pending deliveries (to one phone, or all); their ids."""
    ids = await tx.deliveries.pending_ids(alert.event_id, alert.rule, phone)
    await tx.deliveries.suppress(ids, why)
    return ids
