"""The one write intake makes: an event and everything it leads to, in one transaction."""

from __future__ import annotations

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
) -> list[Delivery]:
    """Store an event, its deliveries, its pages, the cooldowns it starts, its alerts and the
    grouping windows it joins, in one durable commit: once this returns the event may be
    acknowledged to its sender.

    Returns the deliveries with their ids, in the given order. Raises
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
        stored = await tx.deliveries.add(event.id, deliveries)
        await tx.events.add_pages(event.id, pages)
        await tx.events.start_cooldowns(cooldowns)
        if alerts:
            await tx.alerts.add(event.id, alerts)
        if groups:
            await tx.groups.join(event.id, groups)
    return stored
