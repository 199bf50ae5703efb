"""Acknowledgements: per-phone ack tokens, pages with Ack/Close softkeys, recording an ack, and
resolving earlier pages.

A rule that acknowledges, repeats or resolves (``ack``, ``repeat``, ``resolve_when``) turns each
page it sends into an *alert* in the spool (:class:`NewAlert`). With acks, every
phone gets its own page URL, ``{public_url}/pages/<page id>/<token>``, where the token is
unguessable (``secrets.token_urlsafe``) and names one (event, rule, phone). That URL serves the
rule's page plus two softkeys: **Ack** (``{public_url}/ack/<token>``) and **Close**
(``SoftKey:Exit``). Pressing Ack makes the phone fetch the ack URL; :class:`AckService` records
who acknowledged and when, answers the phone with a short confirmation page, counts it, publishes
``{rule, event, phone, at}`` to MQTT (``<status prefix>/ack/<rule>``) and, when configured, POSTs it
to ``[ack] webhook``.

:class:`AlertPlanning` and :class:`Alerting` are the pipeline's stages
(:mod:`phonepush.pipeline.plan`): the first plans the alert of a matched rule (tokens and each
phone's requests), the second resolves earlier alerts when an event satisfies a rule's
``resolve_when`` and stores the new alerts. The rule's policy is compiled with the rule
(:class:`phonepush.rules.book.AlertPolicy`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from phonepush.alerting import ledger
from phonepush.alerting.actions import page_softkeys
from phonepush.alerting.ledger import AckResult, Resolution
from phonepush.config import MqttConfig
from phonepush.errors import MqttError, TemplateError, WireError
from phonepush.events import Event
from phonepush.metrics import Metrics
from phonepush.pipeline.plan import Plan, PlannedRule, Work, render
from phonepush.redact import url_for_log
from phonepush.rules.book import AlertPolicy, Match, RuleBook, event_context
from phonepush.store.interface import Store
from phonepush.store.records import (
    AlertRecord,
    AlertState,
    Delivery,
    NewAction,
    NewAlert,
    NewAlertPhone,
    NewDelivery,
    PushRequest,
)
from phonepush.wire import cisco
from phonepush.wire.cisco import SoftKey, TextPage
from phonepush.wire.uri import ExecuteItem

if TYPE_CHECKING:
    import httpx

    from phonepush.sources.mqtt import MqttSource

__all__ = [
    "ACK_LABEL",
    "CLOSE_LABEL",
    "AckService",
    "AlertPlanning",
    "Alerting",
    "ack_prefix",
    "ack_url",
    "new_token",
    "page_with_softkeys",
]

log = logging.getLogger("phonepush.acks")

ACK_LABEL: Final = "Ack"
CLOSE_LABEL: Final = "Close"
#: The phone's own "leave this page" softkey URI.
_EXIT: Final = "SoftKey:Exit"
#: How long a best-effort ack publication (MQTT, webhook) may take before it is dropped.
_PUBLISH_TIMEOUT: Final = 5.0
#: Resolved notices show when the phone is idle: they must not interrupt a call.
_NOTICE_PRIORITY: Final = 1
#: What a per-phone page URL is rendered with before each phone's token replaces it.
_STAND_IN: Final = "~" * 22


def new_token() -> str:
    """An unguessable ack token (22 URL-safe characters, 128 random bits)."""
    return secrets.token_urlsafe(16)


def ack_url(public_url: str, token: str) -> str:
    """The URL the Ack softkey requests."""
    return f"{public_url.rstrip('/')}/ack/{token}"


def ack_prefix(mqtt: MqttConfig) -> str:
    """Where acks are published: ``<prefix>/ack/<rule>``, the prefix being ``status_topic``
    without its last level (``phonepush/status`` -> ``phonepush``), or ``status_topic`` itself
    when it has one level. Empty (nothing published) when ``status_topic`` is empty."""
    topic = mqtt.status_topic
    parent, sep, _ = topic.rpartition("/")
    return parent if sep and parent else topic


def page_with_softkeys(page_xml: str, softkeys: Sequence[SoftKey]) -> str:
    """A stored CiscoIPPhoneText with ``softkeys`` in place of any it had."""
    page = cisco.parse_text(page_xml.encode("utf-8"))
    return cisco.text_xml(TextPage(page.title, page.text, page.prompt, tuple(softkeys)))


def _clock_text(at: float) -> str:
    return datetime.fromtimestamp(at).astimezone().strftime("%H:%M:%S")


class AlertPlanning:
    """The planning stage: the alert each acknowledging, repeating or resolving rule starts
    (tokens and each phone's requests). A rule whose per-phone requests no longer fit fails.
    ``tokens`` makes each token: ``fire --dry-run`` shows a placeholder instead."""

    def __init__(self, tokens: Callable[[], str] = new_token) -> None:
        self._tokens = tokens

    async def stage(self, work: Work) -> None:
        plan = work.plan
        if not any(p.match is not None and p.match.rule.alert is not None for p in plan.rules):
            return
        planned: list[PlannedRule] = []
        for p in plan.rules:
            match = p.match
            if match is None or match.rule.alert is None or p.state != "pending":
                planned.append(p)
                continue
            try:
                alert = _alert(match, match.rule.alert, p, work, self._tokens)
            except WireError as exc:
                planned.append(PlannedRule(p.rule, p.phones, p.ttl, (), "failed", str(exc)))
                continue
            planned.append(dataclasses.replace(p, alert=alert))
        work.plan = dataclasses.replace(plan, rules=tuple(planned))


def _alert(
    match: Match,
    policy: AlertPolicy,
    planned: PlannedRule,
    work: Work,
    tokens: Callable[[], str],
) -> NewAlert:
    """The alert a matched rule starts. Raises :class:`~phonepush.errors.WireError` when the
    rule's requests no longer fit with a per-phone page URL."""
    page_id = planned.page_id
    # Acks and actions both need each phone's own page URL: its token says who pressed.
    ack = (policy.ack or bool(match.actions)) and bool(page_id)
    action_expiry = work.event.received_at + match.rule.action_ttl
    phones: list[NewAlertPhone] = []
    everyone = [(p, False) for p in match.rule.phones]
    everyone += [(p, True) for p in policy.escalate_phones]
    shape: tuple[PushRequest, ...] = ()
    if ack:
        # Rendered and packed once, with a stand-in token: every token has the same length
        # and needs no XML escaping, so each phone's requests are this text with its token
        # put in (for a thousand phones, 60 ms less per event on the event loop).
        shape = render(match, page_id, work.plan.pages, f"{work.pages_url}{page_id}/{_STAND_IN}")
    for phone, escalation in everyone:
        if ack:
            token = tokens()
            mine = f"/{page_id}/{token}"
            own = tuple(
                PushRequest(r.kind, r.xml.replace(f"/{page_id}/{_STAND_IN}", mine)) for r in shape
            )
            actions = tuple(
                NewAction(
                    tokens(),
                    position,
                    a.label,
                    a.spec,
                    a.confirm,
                    a.repeatable,
                    action_expiry,
                )
                for position, a in enumerate(match.actions, start=1)
            )
            phones.append(NewAlertPhone(phone, token, own, escalation, actions, policy.ack))
        else:
            phones.append(NewAlertPhone(phone, None, planned.requests, escalation))
    repeats = policy.max_repeats if policy.repeat > 0 else 0
    received_at = work.event.received_at
    return NewAlert(
        rule=match.rule.name,
        key=match.dedupe_key,
        page_id=page_id,
        scope=policy.scope,
        repeat=policy.repeat,
        max_repeats=repeats,
        escalate_after=policy.escalate_after,
        ttl=match.rule.ttl,
        next_at=received_at + policy.repeat if repeats else None,
        phones=tuple(phones),
    )


class Alerting:
    """The staging stage of acks, repeats and resolves: resolves earlier alerts an event ends,
    and stores the alerts of the event's rules with its deliveries.

    ``submit`` and ``cancel`` are the dispatcher's (new deliveries; deliveries the spool no
    longer has pending); ``wake`` tells the repeat scheduler a new alert exists. Built per
    configuration (``rules`` is its rule book); alerts already out keep their own policy.
    """

    def __init__(
        self,
        spool: Store,
        rules: RuleBook,
        *,
        public_url: str,
        metrics: Metrics,
        submit: Callable[[Sequence[Delivery]], None],
        cancel: Callable[[Iterable[int]], None],
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._metrics = metrics
        self._submit = submit
        self._cancel = cancel
        self.wake = wake
        self._clock = clock
        self.public_url = public_url.rstrip("/")
        self._pages_url = self.public_url + "/pages/"
        self._resolvers = tuple(
            r for r in rules.rules if r.alert is not None and r.alert.resolve_when is not None
        )

    async def stage(self, work: Work) -> None:
        if await self.resolve(work.event):
            work.keep = True
        work.alerts = self.committed(work.plan, work.deliveries)
        if any(p.alert for p in work.plan.rules):
            work.committed.append(self._woken)

    async def _woken(self, pending: list[Delivery]) -> list[Delivery]:
        self.wake()
        return pending

    def committed(self, plan: Plan, deliveries: Sequence[NewDelivery]) -> list[NewAlert]:
        """The alerts of ``plan`` as they are stored with ``deliveries``: a phone whose first
        delivery is not pending (silenced, quiet hours) gets no repeats either."""
        pending = {(d.rule, d.phone) for d in deliveries if d.state == "pending"}
        alerts: list[NewAlert] = []
        for planned in plan.rules:
            alert = planned.alert
            if alert is None:
                continue
            phones = tuple(
                p for p in alert.phones if p.escalation or (alert.rule, p.phone) in pending
            )
            if any(not p.escalation for p in phones):
                alerts.append(dataclasses.replace(alert, phones=phones))
        return alerts

    async def resolve(self, event: Event) -> list[Resolution]:
        """Resolve earlier alerts ``event`` ends: for every rule that listens where the event
        came from (its ``when`` is not consulted) and whose ``resolve_when`` is true, the alerts
        of that rule with the event's dedupe key. Cancels their pending deliveries and hands the
        resolved notices to the dispatcher. A template error skips that rule (logged)."""
        candidates = [r for r in self._resolvers if r.listens_to(event)]
        if not candidates:
            return []
        context = event_context(event)
        done: list[Resolution] = []
        for rule in candidates:
            assert rule.alert is not None and rule.alert.resolve_when is not None
            try:
                if not rule.alert.resolve_when(context):
                    continue
                key = rule.dedupe(context) if rule.dedupe is not None else ""
            except TemplateError as exc:
                log.warning("event %s: rules[%s].resolve_when: %s", event.id, rule.name, exc)
                continue
            resolved = await ledger.resolve(
                self._spool,
                rule.name,
                key,
                by_event=event.id,
                at=self._clock(),
                notice=self._notice,
            )
            for resolution in resolved:
                self._metrics.resolved.labels(rule.name).inc()
                self._cancel(resolution.cancelled)
                if resolution.notices:
                    self._submit(resolution.notices)
                log.info(
                    "event %s resolved %s of event %s: %d pending cancelled, %d notice(s)",
                    event.id,
                    rule.name,
                    resolution.alert.event_id,
                    len(resolution.cancelled),
                    len(resolution.notices),
                )
            done.extend(resolved)
        return done

    def _notice(
        self, alert: AlertRecord, page_xml: str
    ) -> tuple[str, str, tuple[PushRequest, ...]]:
        page = cisco.parse_text(page_xml.encode("utf-8"))
        notice_id = f"{alert.page_id}r"
        xml = cisco.text_xml(
            TextPage(
                title=f"Resolved: {page.title}" if page.title else "Resolved",
                text=page.text,
                prompt=f"resolved {_clock_text(self._clock())}",
                softkeys=(SoftKey(CLOSE_LABEL, _EXIT, 1),),
            )
        )
        item = ExecuteItem(self._pages_url + notice_id, _NOTICE_PRIORITY)
        return notice_id, xml, (PushRequest("execute", cisco.execute_xml([item])),)


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    xml: str


class AckService:
    """Records acknowledgements and tells the world; an async context manager (it owns the
    webhook's HTTP client and the publications still running).

    ``mqtt`` may be None (no broker); ``cancel`` is the dispatcher's.
    """

    def __init__(
        self,
        spool: Store,
        *,
        metrics: Metrics,
        public_url: str,
        cancel: Callable[[Iterable[int]], None],
        mqtt: MqttSource | None = None,
        topic_prefix: str = "",
        webhook: str = "",
        webhook_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._metrics = metrics
        self.public_url = public_url.rstrip("/")
        self._cancel = cancel
        self._mqtt = mqtt
        self._prefix = topic_prefix
        self.webhook = webhook
        self._webhook_timeout = webhook_timeout
        self._transport = transport
        self._clock = clock
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Told of each first ack (``{rule, event, phone, at}``), e.g. Home Assistant's ack
        #: events; set by the app.
        self.on_ack: Callable[[Mapping[str, object]], None] | None = None

    async def __aenter__(self) -> Self:
        return self

    def _webhook_client(self) -> httpx.AsyncClient:
        # Made on the first ack to post: most daemons have no ack webhook, and httpx is a
        # heavy import that nothing else in the daemon needs.
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport, timeout=self._webhook_timeout, follow_redirects=False
            )
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks = list(self._tasks)
        if tasks:
            # Publications are bounded by _PUBLISH_TIMEOUT already; give them that long.
            _, late = await asyncio.wait(tasks, timeout=_PUBLISH_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def wait_published(self) -> None:
        """Return once every publication started so far is done (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def page(self, page_id: str, token: str) -> _Answer:
        """The page behind a per-phone page URL, with Ack and Close softkeys."""
        found = await self._spool.alerts.by_token(token)
        xml = await self._spool.events.page(page_id)
        if found is None or xml is None or found[0].page_id != page_id:
            return _Answer(404, _text_page("Not found", "This page is no longer available."))
        actions = await self._spool.alerts.actions_of_page(token)
        if actions:
            ack = ack_url(self.public_url, token) if actions[0].with_ack else None
            softkeys = page_softkeys(self.public_url, actions, ack=ack)
        else:
            softkeys = (
                SoftKey(ACK_LABEL, ack_url(self.public_url, token), 1),
                SoftKey(CLOSE_LABEL, _EXIT, 2),
            )
        try:
            return _Answer(200, page_with_softkeys(xml, softkeys))
        except WireError as exc:
            # Only a public_url changed since the page went out can make the Ack URL too long.
            log.error("page %s: cannot add softkeys: %s", page_id, exc)
            return _Answer(200, xml)

    async def acknowledge(self, token: str, headers: Mapping[str, str], address: str) -> _Answer:
        """Record the ack of the phone holding ``token``; the confirmation page for it."""
        model = headers.get("x-ciscoipphonemodelname", "")
        device = " ".join(part for part in (model[:64], address) if part)
        at = self._clock()
        actions = await self._spool.alerts.actions_of_page(token)
        if actions and not actions[0].with_ack:
            # A page with actions but no Ack: its token is not an ack token.
            return _Answer(404, _text_page("Not found", "This alert is no longer known."))
        result = await ledger.acknowledge(self._spool, token, at, device)
        if result is None:
            return _Answer(404, _text_page("Not found", "This alert is no longer known."))
        self._cancel(result.cancelled)
        if result.first:
            self._acknowledged(result)
        return _Answer(200, self._confirmation(result))

    def _acknowledged(self, result: AckResult) -> None:
        alert, phone = result.alert, result.phone
        assert phone.acked_at is not None
        self._metrics.acks.labels(alert.rule, phone.phone).inc()
        log.info(
            "event %s rule %s acknowledged on %s (%s)%s",
            alert.event_id,
            alert.rule,
            phone.phone,
            phone.acked_by or "unknown device",
            f"; {len(result.cancelled)} pending cancelled" if result.cancelled else "",
        )
        message = {
            "rule": alert.rule,
            "event": alert.event_id,
            "phone": phone.phone,
            "at": phone.acked_at,
        }
        if self._mqtt is not None and self._prefix:
            self._spawn(self._publish_mqtt(f"{self._prefix}/ack/{alert.rule}", message))
        if self.webhook:
            self._spawn(self._post_webhook({**message, "by": phone.acked_by}))
        if self.on_ack is not None:
            self.on_ack(message)

    def _confirmation(self, result: AckResult) -> str:
        alert, phone = result.alert, result.phone
        assert phone.acked_at is not None
        when = _clock_text(phone.acked_at)
        if not result.first:
            text = f"Already acknowledged on {phone.phone} at {when}."
        elif alert.state is AlertState.RESOLVED:
            text = f"Acknowledged on {phone.phone} at {when}. The alert was already resolved."
        elif alert.scope == "phone" and alert.state is AlertState.ACTIVE:
            text = f"Acknowledged on {phone.phone} at {when}. This phone gets no more repeats."
        elif alert.state is AlertState.ACKNOWLEDGED and alert.ended_by not in ("", phone.phone):
            text = (
                f"Acknowledged on {phone.phone} at {when}; {alert.ended_by} had acknowledged"
                " it already."
            )
        else:
            text = f"Acknowledged on {phone.phone} at {when}."
        return _text_page("Acknowledged", text)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name="ack-publish")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_mqtt(self, topic: str, message: Mapping[str, object]) -> None:
        assert self._mqtt is not None
        body = json.dumps(message, separators=(",", ":"))
        try:
            async with asyncio.timeout(_PUBLISH_TIMEOUT):
                await self._mqtt.publish(topic, body, qos=1)
        except (MqttError, TimeoutError) as exc:
            log.warning("ack not published to %s: %s", topic, exc or "timed out")

    async def _post_webhook(self, message: Mapping[str, object]) -> None:
        import httpx

        if self._closed:
            log.warning("ack webhook not called: the service is closed")
            return
        client = self._webhook_client()
        try:
            async with asyncio.timeout(_PUBLISH_TIMEOUT):
                answer = await client.post(self.webhook, json=dict(message))
        except (httpx.HTTPError, TimeoutError) as exc:
            log.warning(
                "ack webhook %s failed: %s",
                url_for_log(self.webhook),
                url_for_log(str(exc)) or "timed out",
            )
            return
        if answer.status_code >= 300:
            log.warning(
                "ack webhook %s answered HTTP %d", url_for_log(self.webhook), answer.status_code
            )


def _text_page(title: str, text: str) -> str:
    return cisco.text_xml(
        TextPage(title=title, text=text, softkeys=(SoftKey(CLOSE_LABEL, _EXIT, 1),))
    )
