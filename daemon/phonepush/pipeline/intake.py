"""Intake: an event in, matched and rendered, committed to the spool, handed to the dispatcher.

Every source calls :meth:`Intake.accept`; it returns only once the event and its deliveries are
committed, which is what lets a source acknowledge (MQTT PUBACK, HTTP 202). An event no rule
matches is counted (``phonepush_events_unmatched_total``) and not stored. :meth:`Intake.plan`
does the same planning without writing anything, for ``phonepush fire --dry-run``.

The intake names no feature: what happens between matching and the commit is the
:class:`~phonepush.pipeline.plan.Stage` list of its :class:`~phonepush.pipeline.plan.Pipeline`
(:mod:`phonepush.app.builder`). A reload replaces :attr:`Intake.pipeline` as a whole.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from phonepush.errors import WireError
from phonepush.events import Event
from phonepush.logs import counted
from phonepush.metrics import Metrics
from phonepush.pipeline.direct import DirectPage, direct_match
from phonepush.pipeline.plan import Accepted, Pipeline, Plan, PlannedRule, Work, render
from phonepush.rules.book import Match, RuleBook
from phonepush.store.commit import commit_event
from phonepush.store.interface import Store
from phonepush.store.records import Delivery, DeliveryState, NewDelivery

__all__ = ["Accepted", "DirectPage", "Intake", "Plan", "PlannedRule"]

log = logging.getLogger("phonepush.intake")


class Intake:
    """Turns events into committed deliveries.

    ``submit`` receives the pending deliveries right after the commit (the dispatcher's
    :meth:`~phonepush.dispatch.dispatcher.Dispatcher.submit`).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        spool: Store,
        *,
        metrics: Metrics,
        submit: Callable[[Sequence[Delivery]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        #: The rule book and stages of the running configuration; a reload swaps it.
        self.pipeline = pipeline
        self._spool = spool
        self._metrics = metrics
        self._submit = submit
        self._clock = clock

    @property
    def rules(self) -> RuleBook:
        return self.pipeline.book

    async def plan(self, event: Event) -> Plan:
        """Match and render ``event`` and run the planning stages; writes nothing."""
        return (await self._planned(self.pipeline, event)).plan

    async def _planned(
        self, pipeline: Pipeline, event: Event, matches: Sequence[Match] | None = None
    ) -> Work:
        planned: list[PlannedRule] = []
        pages: dict[str, str] = {}
        pages_url = pipeline.pages_url
        if matches is None:
            matches = pipeline.book.match(event)
        for index, match in enumerate(matches):
            rule = match.rule
            if match.error is not None:
                planned.append(
                    PlannedRule(rule.name, rule.phones, rule.ttl, (), "failed", match.error)
                )
                continue
            page_id = f"{event.id}{index:02x}" if match.page is not None else ""
            try:
                requests = render(match, page_id, pages, pages_url + page_id)
            except WireError as exc:
                planned.append(
                    PlannedRule(
                        rule.name, rule.phones, rule.ttl, (), "failed", str(exc), match=match
                    )
                )
                continue
            planned.append(
                PlannedRule(
                    rule.name, rule.phones, rule.ttl, requests, "pending", "", page_id, None, match
                )
            )
        work = Work(event, Plan(event, tuple(planned), pages), self._clock(), pages_url)
        for stage in pipeline.planning:
            await stage.stage(work)
        return work

    async def accept(self, event: Event) -> Accepted:
        """Commit ``event`` and its deliveries, then hand the pending ones to the dispatcher.

        Raises :class:`~phonepush.errors.SpoolError` (or ``SpoolFull``) with nothing written:
        the source must not acknowledge the event then.
        """
        pipeline = self.pipeline  # one configuration for the whole event, reload or not
        return await self._accept(pipeline, await self._planned(pipeline, event))

    async def page(self, page: DirectPage) -> Accepted:
        """Commit a page sent by hand to the phones and groups it names, as :meth:`accept` does
        an event: same stages, same commit, same dispatcher.

        Raises :class:`~phonepush.errors.ConfigError` (naming ``to`` or ``execute[i]``) for a
        phone or group that does not exist or a URI no phone would execute, with nothing
        written; :class:`~phonepush.errors.SpoolError` as :meth:`accept`.
        """
        pipeline = self.pipeline
        match = direct_match(page, pipeline.expand)
        return await self._accept(pipeline, await self._planned(pipeline, page.event(), [match]))

    async def _accept(self, pipeline: Pipeline, work: Work) -> Accepted:
        event = work.event
        plan = work.plan
        own = {(p.rule, a.phone): a.requests for p in plan.rules if p.alert for a in p.alert.phones}
        work.deliveries = [
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
        for stage in pipeline.staging:
            await stage.stage(work)
        plan = work.plan
        if not plan.rules and not work.keep:
            # A sensor reporting on a wildcard topic, a payload a rule's `when` passes over: kept
            # out of the spool and the log, or they would hide the events that paged.
            self._unmatched(event)
            return Accepted(event, (), ())
        deliveries = await commit_event(
            self._spool,
            self._stored(event, pipeline.keep_headers),
            rules=[p.rule for p in plan.rules],
            deliveries=work.deliveries,
            pages=plan.pages,
            cooldowns=plan.cooldowns,
            groups=work.groups,
            alerts=work.alerts,
            now=work.now,
            rule_pages={p.rule: p.page_id for p in plan.rules if p.page_id},
        )
        self._count(_as_stored(plan, deliveries))
        self._metrics.recorded(deliveries)
        pending = [d for d in deliveries if d.state == "pending"]
        for after in work.committed:
            pending = await after(pending)
        if pending:
            self._submit(pending)
        return Accepted(event, tuple(p.rule for p in plan.rules), tuple(deliveries))

    @staticmethod
    def _stored(event: Event, keep: frozenset[str] | None) -> Event:
        """The event as the spool keeps it: a webhook's headers cut to ``keep_headers``."""
        if keep is None or event.source != "webhook":
            return event
        headers = {k: v for k, v in event.headers.items() if k.lower() in keep}
        if len(headers) == len(event.headers):
            return event
        return dataclasses.replace(event, headers=headers)

    async def __call__(self, event: Event) -> Accepted:
        """Sources take an async ``accept`` callable."""
        return await self.accept(event)

    def _unmatched(self, event: Event) -> None:
        self._metrics.events.labels(event.source, "").inc()
        self._metrics.events_unmatched.labels(event.source).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "event %s %s %s (%d bytes) matched no rule: not stored",
                event.id,
                event.source,
                event.topic,
                len(event.payload),
            )

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
                # Held back by a cooldown or dedupe is the rule working; a failure is not.
                log.log(
                    logging.WARNING if p.state == "failed" else logging.INFO,
                    "event %s rule %s %s for %s: %s",
                    event.id,
                    p.rule,
                    p.state,
                    counted(len(p.phones), "phone"),
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


def _as_stored(plan: Plan, deliveries: Sequence[Delivery]) -> Plan:
    """``plan`` with the rules whose cooldown another instance started while this event was
    planned (the commit stored them suppressed) marked so, for the log."""
    cooled = {
        d.rule for d in deliveries if d.state == DeliveryState.SUPPRESSED and d.error == "cooldown"
    }
    if not any(p.rule in cooled and p.state == "pending" for p in plan.rules):
        return plan
    rules = tuple(
        dataclasses.replace(p, requests=(), state="suppressed", error="cooldown", alert=None)
        if p.rule in cooled and p.state == "pending"
        else p
        for p in plan.rules
    )
    return dataclasses.replace(plan, rules=rules)
