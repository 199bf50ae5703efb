"""The one write intake makes: an event and everything it leads to, in one transaction.

The cooldowns an event starts are claimed in that transaction, not only looked up before it
(:class:`~phonepush.pipeline.cooldown.Cooldowns`): two instances sharing a database can take
two events of one rule and dedupe key at once, both find no cooldown, and both would ring.
The claim is a compare-and-set per (rule, key); the commit that loses it stores the rule's
deliveries as the planning stage would have, suppressed by the cooldown.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

from phonepush.events import Event
from phonepush.store.interface import Store
from phonepush.store.records import (
    INTAKE_STATES,
    Delivery,
    DeliveryState,
    NewAlert,
    NewDelivery,
    NewGroupedEvent,
)

__all__ = ["commit_event"]


async def commit_event(
    store: Store,
    event: Event,
    *,
    rules: Sequence[str],
    deliveries: Sequence[NewDelivery],
    pages: Mapping[str, str],
    cooldowns: Sequence[tuple[str, str, float]],
    alerts: Sequence[NewAlert] = (),
    groups: Sequence[NewGroupedEvent] = (),
    now: float | None = None,
    rule_pages: Mapping[str, str] | None = None,
) -> list[Delivery]:
    """Store an event, its deliveries, its pages, the cooldowns it starts, its alerts and the
    grouping windows it joins, in one durable commit: once this returns the event may be
    acknowledged to its sender.

    ``cooldowns`` are claimed as of ``now`` (when the event was planned; the clock by default):
    for a (rule, key) whose cooldown another commit started meanwhile, the rule's deliveries are
    stored suppressed with error ``cooldown`` (one per phone, its grouped phones included), its
    alerts and grouped events are left out, and so is its page (``rule_pages``: rule -> the id
    of the page it rendered).

    Returns the deliveries with their ids, in the given order (a rule's grouped phones that a
    cooldown suppressed after them). Raises
    :class:`~phonepush.errors.SpoolFull` (and writes nothing) if the new pending deliveries would
    take the backlog over its limit; :class:`~phonepush.errors.SpoolError` (and writes nothing) if
    the store cannot take the write.
    """
    for new in deliveries:
        if new.state not in INTAKE_STATES:
            raise ValueError(f"a new delivery cannot be {new.state!r}")
    store.admit(sum(1 for new in deliveries if new.state == DeliveryState.PENDING))
    async with store.transaction(f"cannot store event {event.id}", durable=True) as tx:
        await tx.events.add(event, rules)
        if cooldowns:
            claimed = await tx.events.claim_cooldowns(
                cooldowns, time.time() if now is None else now
            )
            cooled = {rule for rule, key, _ in cooldowns if (rule, key) not in claimed}
            if cooled:
                deliveries, pages, alerts, groups = _cooled(
                    event, cooled, deliveries, pages, alerts, groups, rule_pages or {}
                )
        stored = await tx.deliveries.add(event.id, deliveries)
        await tx.events.add_pages(event.id, pages)
        if alerts:
            await tx.alerts.add(event.id, alerts)
        if groups:
            await tx.groups.join(event.id, groups)
    return stored


def _cooled(
    event: Event,
    cooled: set[str],
    deliveries: Sequence[NewDelivery],
    pages: Mapping[str, str],
    alerts: Sequence[NewAlert],
    groups: Sequence[NewGroupedEvent],
    rule_pages: Mapping[str, str],
) -> tuple[list[NewDelivery], dict[str, str], list[NewAlert], list[NewGroupedEvent]]:
    """What the event stores when the rules ``cooled`` lost their cooldown claims: what the
    cooldown stage would have planned for them."""
    suppressed = DeliveryState.SUPPRESSED
    kept = [
        dataclasses.replace(d, requests=(), state=suppressed, error="cooldown")
        if d.rule in cooled
        else d
        for d in deliveries
    ]
    # A grouped phone has no delivery yet (the flush makes it): it gets its suppressed one now.
    have = {(d.rule, d.phone) for d in kept}
    for group in groups:
        if group.rule in cooled:
            for phone in group.phones:
                if (group.rule, phone) not in have:
                    have.add((group.rule, phone))
                    kept.append(
                        NewDelivery(
                            group.rule,
                            phone,
                            (),
                            event.received_at + group.ttl,
                            suppressed,
                            "cooldown",
                        )
                    )
    alerts = [a for a in alerts if a.rule not in cooled]
    used = {a.page_id for a in alerts} | {
        page for rule, page in rule_pages.items() if rule not in cooled
    }
    dropped = {page for rule, page in rule_pages.items() if rule in cooled} - used
    return (
        kept,
        {page: xml for page, xml in pages.items() if page not in dropped},
        alerts,
        [g for g in groups if g.rule not in cooled],
    )
