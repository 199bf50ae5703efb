"""Intake: an event in, matched and rendered, committed to the spool, handed to the dispatcher.

Every source calls :meth:`Intake.accept`; it returns only once the event and its deliveries are
committed, which is what lets a source acknowledge (MQTT PUBACK, HTTP 202). :meth:`Intake.plan`
does the same work without writing anything, for ``phonepush fire --dry-run``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from phonepush.errors import WireError
from phonepush.events import Event
from phonepush.metrics import Metrics
from phonepush.rules.book import Match, RuleSet
from phonepush.store.commit import commit_event
from phonepush.store.interface import Store
from phonepush.store.records import Delivery, NewAlert, NewDelivery, PushRequest
from phonepush.wire import cisco
from phonepush.wire.uri import ExecuteItem

if TYPE_CHECKING:
    from phonepush.alerting.acks import Alerting
    from phonepush.audio.announce import Announcer
    from phonepush.grouping.grouper import Grouper

__all__ = ["Accepted", "Intake", "Plan", "PlannedRule"]

log = logging.getLogger("phonepush.intake")


@dataclass(frozen=True, slots=True)
class PlannedRule:
    """What one matched rule does with one event."""

    rule: str
    phones: tuple[str, ...]
    ttl: float
    requests: tuple[PushRequest, ...]
    state: str  # "pending", "suppressed" (cooldown/dedupe) or "failed" (template, URI, size)
    error: str = ""
    page_id: str = ""
    #: Acks, repeats, resolves (phonepush.alerting.acks): each phone's own requests and ack token.
    alert: NewAlert | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything an event leads to, before anything is written."""

    event: Event
    rules: tuple[PlannedRule, ...]
    pages: dict[str, str] = field(default_factory=dict)
    cooldowns: tuple[tuple[str, str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Accepted:
    """An event committed to the spool."""

    event: Event
    rules: tuple[str, ...]
    deliveries: tuple[Delivery, ...]


class Intake:
    """Turns events into committed deliveries.

    ``submit`` receives the pending deliveries right after the commit (the dispatcher's
    :meth:`~phonepush.dispatch.dispatcher.Dispatcher.submit`).
    """

    def __init__(
        self,
        rules: RuleSet,
        spool: Store,
        *,
        public_url: str,
        metrics: Metrics,
        submit: Callable[[Sequence[Delivery]], None],
        clock: Callable[[], float] = time.time,
        grouper: Grouper | None = None,
        alerting: Alerting | None = None,
        announcer: Announcer | None = None,
        keep_headers: Collection[str] | None = None,
    ) -> None:
        self.rules = rules
        #: Webhook request headers stored with the event (lower case; None keeps them all).
        #: Rules see every header the server passed on; only the spool is limited to these.
        self.keep_headers = None if keep_headers is None else frozenset(keep_headers)
        #: Acknowledgements, repeats and resolves (phonepush.alerting); None applies none of them.
        self.alerting = alerting
        #: Grouping, silences and quiet hours (phonepush.grouping); None applies none of them.
        self.grouper = grouper
        #: Rules' audio pages (phonepush.audio); None plays none (and audio-only rules fail).
        self.announcer = announcer
        self._spool = spool
        self._pages_url = public_url.rstrip("/") + "/pages/"
        self._metrics = metrics
        self._submit = submit
        self._clock = clock

    def plan(self, event: Event) -> Plan:
        """Match and render ``event``; consult (but do not set) cooldowns."""
        now = self._clock()
        planned: list[PlannedRule] = []
        pages: dict[str, str] = {}
        cooldowns: list[tuple[str, str, float]] = []
        for index, match in enumerate(self.rules.match(event)):
            rule = match.rule
            if match.error is not None:
                planned.append(
                    PlannedRule(rule.name, rule.phones, rule.ttl, (), "failed", match.error)
                )
                continue
            # A dedupe key without a cooldown suppresses repeats for the rule's TTL: a repeated
            # event inside the window could not be told apart from the first one on the phone.
            window = rule.cooldown if rule.cooldown is not None else None
            if window is None and match.dedupe_key:
                window = rule.ttl
            if window is not None:
                if self._spool.events.in_cooldown(rule.name, match.dedupe_key, now) or any(
                    c[0] == rule.name and c[1] == match.dedupe_key for c in cooldowns
                ):
                    planned.append(
                        PlannedRule(rule.name, rule.phones, rule.ttl, (), "suppressed", "cooldown")
                    )
                    continue
                cooldowns.append((rule.name, match.dedupe_key, now + window))
            page_id = f"{event.id}{index:02x}" if match.page is not None else ""
            try:
                requests = self._render(match, page_id, pages)
                alert = (
                    self.alerting.plan(
                        match,
                        page_id,
                        functools.partial(self._render, match, page_id, pages),
                        requests,
                        event.received_at,
                    )
                    if self.alerting is not None
                    else None
                )
            except WireError as exc:
                planned.append(
                    PlannedRule(rule.name, rule.phones, rule.ttl, (), "failed", str(exc))
                )
                continue
            planned.append(
                PlannedRule(
                    rule.name, rule.phones, rule.ttl, requests, "pending", "", page_id, alert
                )
            )
        return Plan(event, tuple(planned), pages, tuple(cooldowns))

    def _render(
        self, match: Match, page_id: str, pages: dict[str, str], page_url: str = ""
    ) -> tuple[PushRequest, ...]:
        items: list[ExecuteItem] = []
        if match.page is not None:
            pages[page_id] = cisco.text_xml(match.page)
            # The page first: its text is on screen while a Play: item holds the phone's answer.
            url = page_url or self._pages_url + page_id
            items.append(ExecuteItem(url, match.rule.priority))
        items.extend(match.execute)
        requests = [PushRequest("execute", cisco.execute_xml(b)) for b in cisco.pack(items)]
        if match.background is not None:
            requests.append(PushRequest("background", cisco.background_xml(*match.background)))
        if match.ringtone is not None:
            requests.append(PushRequest("ringtone", cisco.ringtone_xml(match.ringtone)))
        if not requests and (self.announcer is None or not self.announcer.handles(match.rule.name)):
            raise WireError("the rule renders nothing to push")
        return tuple(requests)

    def accept(self, event: Event) -> Accepted:
        """Commit ``event`` and its deliveries, then hand the pending ones to the dispatcher.

        Raises :class:`~phonepush.errors.SpoolError` (or ``SpoolFull``) with nothing written:
        the source must not acknowledge the event then.
        """
        plan = self.plan(event)
        if self.alerting is not None:
            self.alerting.resolve(event)
        own = {(p.rule, a.phone): a.requests for p in plan.rules if p.alert for a in p.alert.phones}
        new = [
            NewDelivery(
                rule=p.rule,
                phone=phone,
                requests=own.get((p.rule, phone), p.requests),
                expires_at=event.received_at + p.ttl,
                state=p.state,
                error=p.error,
            )
            for p in plan.rules
            for phone in p.phones
        ]
        if self.announcer is not None:
            # Request-less rows for the audio of rules that also push: played, not dispatched.
            new += self.announcer.deliveries(event, plan)
        staged = self.grouper.stage(event, plan, new) if self.grouper is not None else None
        deliveries = commit_event(
            self._spool,
            self._stored(event),
            rules=[p.rule for p in plan.rules],
            deliveries=new if staged is None else staged.deliveries,
            pages=plan.pages,
            cooldowns=plan.cooldowns,
            groups=() if staged is None else staged.groups,
            alerts=(
                self.alerting.committed(plan, new if staged is None else staged.deliveries)
                if self.alerting is not None
                else ()
            ),
        )
        self._count(plan)
        if staged is not None and self.grouper is not None:
            self.grouper.committed(event, staged)
        pending = [d for d in deliveries if d.state == "pending"]
        if self.announcer is not None:
            pending = self.announcer.take(event, pending)
        if pending:
            self._submit(pending)
        if self.alerting is not None and any(p.alert for p in plan.rules):
            self.alerting.wake()
        return Accepted(event, tuple(p.rule for p in plan.rules), tuple(deliveries))

    def _stored(self, event: Event) -> Event:
        """The event as the spool keeps it: a webhook's headers cut to ``keep_headers``."""
        keep = self.keep_headers
        if keep is None or event.source != "webhook":
            return event
        headers = {k: v for k, v in event.headers.items() if k.lower() in keep}
        if len(headers) == len(event.headers):
            return event
        return dataclasses.replace(event, headers=headers)

    async def __call__(self, event: Event) -> Accepted:
        """Sources take an async ``accept`` callable; the spool write itself is synchronous."""
        return self.accept(event)

    def _count(self, plan: Plan) -> None:
        event = plan.event
        metrics = self._metrics
        if not plan.rules:
            metrics.events.labels(event.source, "").inc()
        for p in plan.rules:
            metrics.events.labels(event.source, p.rule).inc()
            if p.state == "failed":
                metrics.template_errors.labels(p.rule).inc()
            if p.state != "pending":
                for phone in p.phones:
                    metrics.deliveries.labels(phone, p.state).inc()
                log.warning(
                    "event %s rule %s %s for %d phone(s): %s",
                    event.id,
                    p.rule,
                    p.state,
                    len(p.phones),
                    p.error,
                )
        log.info(
            "event %s %s %s (%d bytes) matched %s",
            event.id,
            event.source,
            event.topic,
            len(event.payload),
            ", ".join(p.rule for p in plan.rules) or "no rule",
        )
