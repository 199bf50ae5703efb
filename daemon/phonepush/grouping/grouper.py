"""Grouping: events of a rule with the same group key, inside ``group_wait``, become one page.

Like Alertmanager's ``group_by``/``group_wait``: the first event of a (rule, group key) opens a
window of ``group_wait``; events with the same key arriving inside it join; when the window ends,
each phone gets ONE page ("3 alerts: DiskFull, MemoryHigh") listing them, instead of one push per
event. ``group_by`` is a list of templates (or one template); their rendered values, joined, are
the key. ``group_wait`` alone groups all of a rule's events; ``group_by`` alone waits 30 s.

Durability: a grouped event is committed with its event in the same spool transaction (as a row
of the window, not a delivery), so it is acknowledged to its sender only once stored, and a
restart during the window still delivers the group: :meth:`Grouper.run` (a named task of the
daemon) flushes every window that is due, including ones that fell due while the daemon was
down. A flush turns a window into ordinary deliveries (attached to the window's first event) and
removes the window in one transaction, so a crash repeats a flush or does not happen at all. The
flush locks the window row before it reads the window's events, and an event joining a window
takes the same lock, so several daemons on one database neither strand an event in a removed
window nor flush one twice.

Silences and quiet hours (:mod:`phonepush.silence`) screen ungrouped deliveries in their own
pipeline stage; for a group they are applied here at flush time, per phone and per event: a
silenced event is left out of that phone's page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from phonepush.errors import SpoolError, TemplateError, WireError
from phonepush.events import Event, Source
from phonepush.metrics import Metrics
from phonepush.pipeline.plan import Plan, PlannedRule, Work
from phonepush.rules.book import event_context
from phonepush.silence.silences import Facts, Quieting, Silences, Verdict, count_held
from phonepush.store.interface import Store
from phonepush.store.records import (
    Delivery,
    DeliveryState,
    GroupedEvent,
    GroupWindow,
    NewDelivery,
    NewGroupedEvent,
    PushRequest,
)
from phonepush.wire import cisco
from phonepush.wire.cisco import TextPage
from phonepush.wire.uri import ExecuteItem

__all__ = ["MAX_LISTED", "Grouper", "Staged", "group_page"]

log = logging.getLogger("phonepush.grouping")

#: Events listed one per line on a group's page; the rest are counted ("... and 7 more").
MAX_LISTED: Final = 50
#: How long the flusher waits before trying again after the spool failed.
_RETRY_SECONDS: Final = 1.0
_KEY_SEPARATOR: Final = "\x1f"


@dataclass(frozen=True, slots=True)
class Staged:
    """An event's deliveries after grouping, and its rows for group windows."""

    deliveries: list[NewDelivery]
    groups: list[NewGroupedEvent]


@dataclass(frozen=True, slots=True)
class _Member:
    """What one grouped event contributes to its group's page."""

    seq: int
    event_id: str
    phones: tuple[str, ...]
    page: TextPage | None
    page_priority: int
    items: tuple[ExecuteItem, ...]
    extra: tuple[PushRequest, ...]
    facts: Facts


@dataclass(frozen=True, slots=True)
class _Flush:
    """What flushing one window stores, and what it reports once stored."""

    lead: GroupedEvent
    members: list[_Member]
    phones: list[str]
    deliveries: list[NewDelivery]
    pages: dict[str, str]
    held: list[tuple[str, str, Verdict]]
    silenced: list[tuple[str, str]]


def group_page(pages: Sequence[TextPage]) -> TextPage:
    """One page for several: "3 alerts: A, B" over one line per event (cut to the phone's limits
    by :func:`phonepush.wire.cisco.text_xml`). A single page is returned as it is."""
    if len(pages) == 1:
        return pages[0]
    titles = list(dict.fromkeys(p.title for p in pages if p.title))
    title = f"{len(pages)} alerts: {', '.join(titles)}" if titles else f"{len(pages)} alerts"
    named = len(titles) > 1  # name each line only when the titles tell events apart
    lines = []
    for page in pages[:MAX_LISTED]:
        body = page.text or page.title
        lines.append(f"{page.title}: {body}" if named and page.title and page.text else body)
    if len(pages) > MAX_LISTED:
        lines.append(f"... and {len(pages) - MAX_LISTED} more")
    return TextPage(title=title, text="\n".join(lines), prompt=pages[0].prompt)


class Grouper:
    """Intake's stage between rendering and the spool, and the task that flushes due groups.

    ``submit`` receives the pending deliveries of a flushed group (the dispatcher's
    :meth:`~phonepush.dispatch.dispatcher.Dispatcher.submit`).
    """

    def __init__(
        self,
        spool: Store,
        silences: Silences,
        *,
        public_url: str,
        metrics: Metrics,
        submit: Callable[[Sequence[Delivery]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self.silences = silences
        #: Where group pages are served; set again by each (re)load.
        self.pages_url = public_url.rstrip("/") + "/pages/"
        self._metrics = metrics
        self._submit = submit
        self._clock = clock
        self._wake = asyncio.Event()
        #: Told after a commit that joined a group (the cluster announces it: the instance that
        #: flushes groups may be another one).
        self.on_join: Callable[[], None] | None = None
        #: Silences and the configured quiet hours; set again by each (re)load (the builder's).
        self.quieting = Quieting(silences)

    # --- intake side ----------------------------------------------------------------------------

    async def stage(self, work: Work) -> None:
        """The pipeline stage: grouped rules' pending work becomes window rows; counted and
        logged once committed."""
        event = work.event
        staged = self.split(event, work.plan, work.deliveries)
        work.deliveries, work.groups = staged.deliveries, staged.groups
        if not staged.groups:
            return

        async def committed(pending: list[Delivery]) -> list[Delivery]:
            self.committed(event, staged)
            return pending

        work.committed.append(committed)

    def split(self, event: Event, plan: Plan, deliveries: Sequence[NewDelivery]) -> Staged:
        """Take grouped rules' pending work out of ``deliveries`` (as window rows). Writes
        nothing; silences and quiet hours screen what is left in their own stage."""
        now = self._clock()
        groups: list[NewGroupedEvent] = []
        context: dict[str, Any] | None = None
        for planned in plan.rules:
            rule = planned.match.rule if planned.match is not None else None
            if rule is None or rule.group_window is None or planned.state != "pending":
                continue
            if context is None:
                context = event_context(event)
            try:
                key = _KEY_SEPARATOR.join(t(context) for t in rule.group_by)
                content = self._content(planned)
            except (TemplateError, WireError) as exc:
                # Better a page on its own than none: the event is sent as if ungrouped.
                log.warning(
                    "event %s rule %s: not grouped (%s); paging it on its own",
                    event.id,
                    planned.rule,
                    exc,
                )
                continue
            groups.append(
                NewGroupedEvent(
                    rule=planned.rule,
                    key=key,
                    phones=planned.phones,
                    content=content,
                    due_at=now + rule.group_window,
                    ttl=planned.ttl,
                )
            )
        grouped = {g.rule for g in groups}
        rest = [d for d in deliveries if not (d.rule in grouped and d.state == "pending")]
        return Staged(rest, groups)

    def committed(self, event: Event, staged: Staged) -> None:
        """Count and log what :meth:`stage` decided, once the spool has committed it."""
        for group in staged.groups:
            self._metrics.grouped_events.labels(group.rule).inc()
            log.info("event %s joined a group of rule %s", event.id, group.rule)
        if staged.groups:
            self._wake.set()
            if self.on_join is not None:
                self.on_join()

    def wake(self) -> None:
        """A window may be due sooner than what the flush loop waits for: look again."""
        self._wake.set()

    @staticmethod
    def _content(planned: PlannedRule) -> str:
        """What this event adds to a group page, as the spool keeps it, taken from the rule's
        structured content: the page as the phone would show it, the execute items, and the
        other requests as rendered. XML is built once, when the group is flushed."""
        match = planned.match
        assert match is not None  # every pending rule was rendered from its match
        page = match.page
        shown = None
        if page is not None:
            # What the phone shows of the page: text_xml's sanitizing and cuts, without the XML.
            shown = {
                "title": cisco.sanitize_text(page.title, cisco.MAX_TITLE),
                "text": cisco.sanitize_text(page.text, cisco.MAX_TEXT),
                "prompt": cisco.sanitize_text(page.prompt, cisco.MAX_TITLE),
            }
        return json.dumps(
            {
                "page": shown,
                "page_priority": match.rule.priority if page is not None else 0,
                "items": [[item.url, item.priority] for item in match.execute],
                "extra": [[r.kind, r.xml] for r in planned.requests if r.kind != "execute"],
            },
            ensure_ascii=False,
        )

    # --- flushing -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Flush windows as they fall due; a named task of the daemon, until cancelled."""
        while True:
            self._wake.clear()
            try:
                await self.flush_due()
                due = await self._spool.groups.next_due()
            except SpoolError as exc:
                log.error("flushing groups failed, retrying: %s", exc)
                due = self._clock() + _RETRY_SECONDS
            timeout = None if due is None else max(0.0, due - self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def flush_due(self) -> list[Delivery]:
        """Turn every window due now into deliveries; hand the pending ones to ``submit``."""
        now = self._clock()
        flushed: list[Delivery] = []
        for window in await self._spool.groups.due(now):
            flushed.extend(await self._flush(window.rule, window.key, now))
        return flushed

    async def _flush(self, rule: str, key: str, now: float) -> list[Delivery]:
        """Turn the (rule, key) window into deliveries of its first event and take its events
        out, in one durable commit: a crash repeats the flush or it did not happen. Not held to
        the backlog limit: the events were accepted already.

        The window is locked and read again inside the transaction, so with several instances
        on one database an event joining it either waits for the flush (and opens a new
        window) or is committed before and is flushed with the others; a second flush of the
        same window (leadership changing hands) finds it gone and does nothing."""
        async with self._spool.transaction(f"cannot flush group {rule}", durable=True) as tx:
            window = await tx.groups.lock_due(rule, key, now)
            if window is None:
                return []
            if not window.events:
                await tx.groups.close_if_empty(rule, key)
                return []
            flush = self._plan(window, now)
            stored = await tx.deliveries.add(flush.lead.event_id, flush.deliveries)
            await tx.events.add_pages(flush.lead.event_id, flush.pages)
            await tx.groups.remove_events(rule, key, max(e.seq for e in window.events))
            await tx.groups.close_if_empty(rule, key)
        # Per event left out of a phone's page; a phone left with nothing is also one suppressed
        # delivery, recorded with the quiet-hours drops.
        for phone, silence_id in flush.silenced:
            self._metrics.silenced.labels(window.rule).inc()
            log.info(
                "group of rule %s: an event for %s silenced by %s", window.rule, phone, silence_id
            )
        count_held(self._metrics, flush.lead.event_id, flush.held)
        self._metrics.recorded(stored)
        log.info(
            "group of rule %s: %d event(s) (%s) over %.1f s -> %d phone(s)",
            window.rule,
            len(flush.members),
            ", ".join(m.event_id for m in flush.members),
            now - window.opened_at,
            len(flush.phones),
        )
        pending = [d for d in stored if d.state is DeliveryState.PENDING]
        if pending:
            self._submit(pending)
        return stored

    def _plan(self, window: GroupWindow, now: float) -> _Flush:
        """The deliveries and pages a flush of ``window`` stores (silences and quiet hours
        applied per phone and event)."""
        members = [m for m in (self._member(e) for e in window.events) if m is not None]
        lead = window.events[0]
        phones = list(dict.fromkeys(p for m in members for p in m.phones))
        deliveries: list[NewDelivery] = []
        pages: dict[str, str] = {}
        rendered: dict[tuple[tuple[int, ...], bool], tuple[PushRequest, ...] | str] = {}
        held: list[tuple[str, str, Verdict]] = []
        silenced: list[tuple[str, str]] = []  # (phone, silence id), once per event left out
        expires_at = now + window.ttl
        for phone in phones:
            kept: list[_Member] = []
            ids: list[str] = []
            for member in (m for m in members if phone in m.phones):
                silence = self.quieting.silenced(window.rule, phone, member.facts, now)
                if silence is None:
                    kept.append(member)
                else:
                    ids.append(silence.id)
                    silenced.append((phone, silence.id))
            verdict = self.quieting.quiet(window.rule, phone, now)
            if not kept:
                verdict = Verdict("drop", "silenced by " + ", ".join(dict.fromkeys(ids)))
            if verdict.action == "drop":
                deliveries.append(
                    NewDelivery(
                        window.rule,
                        phone,
                        (),
                        expires_at,
                        DeliveryState.SUPPRESSED,
                        verdict.reason,
                    )
                )
                held.append((window.rule, phone, verdict))
                continue
            variant = (tuple(m.seq for m in kept), verdict.action == "idle")
            if variant not in rendered:
                page_id = f"{lead.event_id}g{lead.seq:x}v{len(rendered):x}"
                try:
                    rendered[variant] = self._render(kept, page_id, pages, idle=variant[1])
                except WireError as exc:
                    rendered[variant] = str(exc)
            result = rendered[variant]
            if isinstance(result, str):
                deliveries.append(
                    NewDelivery(window.rule, phone, (), expires_at, DeliveryState.FAILED, result)
                )
            else:
                deliveries.append(NewDelivery(window.rule, phone, result, expires_at))
        return _Flush(lead, members, phones, deliveries, pages, held, silenced)

    def _member(self, grouped: GroupedEvent) -> _Member | None:
        try:
            data = json.loads(grouped.content)
            page = data["page"]
            member = _Member(
                seq=grouped.seq,
                event_id=grouped.event_id,
                phones=grouped.phones,
                page=None
                if page is None
                else TextPage(page["title"], page["text"], page["prompt"]),
                page_priority=int(data["page_priority"]),
                items=tuple(ExecuteItem(url, int(priority)) for url, priority in data["items"]),
                extra=tuple(PushRequest(kind, xml) for kind, xml in data["extra"]),
                facts=Facts(
                    Event(
                        cast(Source, grouped.source),
                        grouped.topic,
                        grouped.payload,
                        id=grouped.event_id,
                        received_at=grouped.received_at,
                    )
                ),
            )
        except (ValueError, KeyError, TypeError) as exc:
            # Written by this module, so only a hand-edited spool gets here.
            log.error("grouped event %s is unreadable and is left out: %s", grouped.event_id, exc)
            return None
        return member

    def _render(
        self, members: Sequence[_Member], page_id: str, pages: dict[str, str], *, idle: bool
    ) -> tuple[PushRequest, ...]:
        """The requests of one group page, as intake renders a single event's (page first)."""
        items: list[ExecuteItem] = []
        shown = [m.page for m in members if m.page is not None]
        if shown:
            pages[page_id] = cisco.text_xml(group_page(shown))
            first = next(m for m in members if m.page is not None)
            items.append(ExecuteItem(self.pages_url + page_id, first.page_priority))
        seen: set[str] = set()
        for member in members:
            for item in member.items:
                if item.url not in seen:
                    seen.add(item.url)
                    items.append(item)
        if idle:
            items = [ExecuteItem(item.url, 2) for item in items]
        requests = [PushRequest("execute", cisco.execute_xml(b)) for b in cisco.pack(items)]
        requests.extend(dict.fromkeys(r for m in members for r in m.extra))
        if not requests:
            raise WireError("the group renders nothing to push")
        return tuple(requests)
