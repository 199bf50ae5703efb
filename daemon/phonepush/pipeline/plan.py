"""What flows through the pipeline, and the one protocol its stages share.

Features (alerting, grouping, audio, silences) import this module, never the intake; the intake
names no feature: it runs the :class:`Stage` objects of a :class:`Pipeline`, which
:mod:`phonepush.app.builder` assembles from a configuration.

An event's way: the intake matches it against the rule book and renders what each rule sends
(:func:`render`) into a :class:`Plan`; the pipeline's *planning* stages (cooldowns, alert
tokens) refine the plan without writing anything (``fire --dry-run`` stops there); the intake
turns the plan into deliveries; the *staging* stages (audio rows, grouping and quiet hours,
alert rows and resolves) change what will be stored; one commit; then the hooks the stages
left in :attr:`Work.committed` run on the committed pending deliveries, and what is left goes
to the dispatcher.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from phonepush.errors import WireError
from phonepush.events import Event
from phonepush.rules.book import Match, RuleBook
from phonepush.store.spool import Delivery, NewAlert, NewDelivery, NewGroupedEvent, PushRequest
from phonepush.wire import cisco
from phonepush.wire.uri import ExecuteItem

__all__ = [
    "Accepted",
    "AfterCommit",
    "Pipeline",
    "Plan",
    "PlannedRule",
    "Stage",
    "Work",
    "render",
]


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
    #: What the rule rendered (None when its templates failed): stages read the compiled rule
    #: (``match.rule``) and the structured content from here.
    match: Match | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything an event leads to, before anything is written."""

    event: Event
    rules: tuple[PlannedRule, ...]
    pages: dict[str, str] = field(default_factory=dict)
    cooldowns: tuple[tuple[str, str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Accepted:
    """An event taken in: committed to the spool with its deliveries, or, when no rule matched
    it (and no stage kept it), only counted: ``rules`` and ``deliveries`` empty, nothing
    written."""

    event: Event
    rules: tuple[str, ...]
    deliveries: tuple[Delivery, ...]


#: Runs after the commit with the event's pending deliveries; returns those the dispatcher
#: should get (an audio page takes its own rows).
AfterCommit = Callable[[list[Delivery]], Awaitable[list[Delivery]]]


@dataclass(slots=True)
class Work:
    """One event on its way through the stages; each stage reads and replaces parts of it."""

    event: Event
    plan: Plan
    #: When the intake took the event (its clock), for cooldown windows.
    now: float
    #: Where the rules' pages are served: ``{public_url}/pages/``.
    pages_url: str
    deliveries: list[NewDelivery] = field(default_factory=list)
    groups: list[NewGroupedEvent] = field(default_factory=list)
    alerts: list[NewAlert] = field(default_factory=list)
    committed: list[AfterCommit] = field(default_factory=list)
    #: Set by a stage that did something for the event beyond its rules (resolved an earlier
    #: alert): the spool keeps the event even when no rule matched, so what it ended can be
    #: traced to it.
    keep: bool = False


class Stage(Protocol):
    """One step of the pipeline: a feature's part of every event."""

    async def stage(self, work: Work) -> None:
        """Read and change ``work``; planning stages write nothing, staging stages may leave
        hooks in ``work.committed`` for after the commit. Async because a stage may read the
        store (cooldowns, alerts, groups); a stage that does not simply never awaits."""


@dataclass(frozen=True, slots=True)
class Pipeline:
    """One configuration's rule book and stages; a reload swaps the whole of it."""

    book: RuleBook
    #: Before deliveries exist; also what ``fire --dry-run`` runs.
    planning: tuple[Stage, ...]
    #: Between the deliveries and the commit.
    staging: tuple[Stage, ...]
    #: ``{public_url}/pages/``.
    pages_url: str
    #: Phone names, group names and ``all`` -> phone names (``Config.expand``); raises
    #: ``KeyError`` naming an unknown one. For pages that name their phones (``Intake.page``).
    expand: Callable[[Iterable[str]], tuple[str, ...]]
    #: Webhook request headers stored with the event (lower case; None keeps them all).
    keep_headers: frozenset[str] | None = None


def render(
    match: Match, page_id: str, pages: dict[str, str], page_url: str
) -> tuple[PushRequest, ...]:
    """The requests ``match`` sends, its page (when it has one) put in ``pages[page_id]`` and
    pointed to by ``page_url``. Raises :class:`WireError` when something does not fit or the
    rule sends nothing at all."""
    items: list[ExecuteItem] = []
    if match.page is not None:
        pages[page_id] = cisco.text_xml(match.page)
        # The page first: its text is on screen while a Play: item holds the phone's answer.
        items.append(ExecuteItem(page_url, match.rule.priority))
    items.extend(match.execute)
    requests = [PushRequest("execute", cisco.execute_xml(b)) for b in cisco.pack(items)]
    if match.background is not None:
        requests.append(PushRequest("background", cisco.background_xml(*match.background)))
    if match.ringtone is not None:
        requests.append(PushRequest("ringtone", cisco.ringtone_xml(match.ringtone)))
    if not requests and not match.rule.audio:
        raise WireError("the rule renders nothing to push")
    return tuple(requests)
