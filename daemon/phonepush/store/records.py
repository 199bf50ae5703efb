"""What the store holds, as the rest of the daemon sees it: plain records, no storage library.

Every backend (:mod:`phonepush.store.spool` is SQLite) reads and writes these; the consumers
(dispatch, alerting, grouping, silences, the HTTP API, ``phonepush status``) see nothing else.
The string values of :class:`DeliveryState` are a contract: they are in spool files, in the
status API's JSON and in the ``result`` label of ``phonepush_deliveries_total``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, Literal

__all__ = [
    "ALERT_STATES",
    "FINAL_STATES",
    "INTAKE_STATES",
    "ActionPress",
    "ActionRecord",
    "AlertPhone",
    "AlertRecord",
    "AlertState",
    "AlertTarget",
    "Delivery",
    "DeliveryKind",
    "DeliveryState",
    "EventRecord",
    "EventSummary",
    "GroupWindow",
    "GroupedEvent",
    "NewAction",
    "NewAlert",
    "NewAlertPhone",
    "NewDelivery",
    "NewGroupedEvent",
    "PushRequest",
    "RequestKind",
    "RoundKind",
    "StoredSilence",
]

RequestKind = Literal["execute", "background", "ringtone"]


class DeliveryState(StrEnum):
    """What became of a delivery (one rule's pushes to one phone). Listed in the order
    ``phonepush status`` shows them."""

    PENDING = "pending"
    DELIVERED = "delivered"
    #: The phone acknowledged the page (``ack = true`` rules).
    ACKNOWLEDGED = "acknowledged"
    #: A request reached the phone but got no answer; not sent again.
    UNCONFIRMED = "unconfirmed"
    FAILED = "failed"
    EXPIRED = "expired"
    #: Never sent: cooldown, silence, quiet hours, or cancelled by an ack or a resolve.
    SUPPRESSED = "suppressed"


#: States a delivery ends in; finishing moves a pending delivery to one of them.
FINAL_STATES: Final = frozenset(
    {
        DeliveryState.DELIVERED,
        DeliveryState.UNCONFIRMED,
        DeliveryState.FAILED,
        DeliveryState.EXPIRED,
        DeliveryState.SUPPRESSED,
    }
)
#: States intake may record a new delivery in (a suppressed or failed one is kept for the record).
INTAKE_STATES: Final = frozenset(
    {DeliveryState.PENDING, DeliveryState.FAILED, DeliveryState.SUPPRESSED}
)


class DeliveryKind(StrEnum):
    """How a pending delivery reaches its phone: HTTP pushes (the dispatcher) or an audio page
    (the announcer). A delivery carries requests exactly when it is a push: the store keeps no
    separate column for it, so spool files of every version read the same. A row recorded
    suppressed or failed before anything was rendered carries none either, and reads as audio;
    only pending rows are ever acted on by their kind."""

    PUSH = "push"
    AUDIO = "audio"


def _kind(requests: tuple[PushRequest, ...]) -> DeliveryKind:
    return DeliveryKind.PUSH if requests else DeliveryKind.AUDIO


@dataclass(frozen=True, slots=True)
class PushRequest:
    """One HTTP request to a phone, already rendered: an XML body of at most 512 bytes."""

    kind: RequestKind
    xml: str


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """What intake hands the store for one (rule, phone) of an event.

    ``state`` is pending for work to do; a delivery suppressed or failed at intake (a phone in
    cooldown, a URI over the limit) is recorded with that state and its ``error``, and is never
    dispatched. A pending delivery without requests is an audio page's row (:attr:`kind`),
    played by the announcer instead of pushed.
    """

    rule: str
    phone: str
    requests: tuple[PushRequest, ...]
    expires_at: float
    state: str = DeliveryState.PENDING
    error: str = ""

    @property
    def kind(self) -> DeliveryKind:
        return _kind(self.requests)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A stored delivery, as the dispatcher sees it.

    ``sent`` is how many of ``requests`` the phone has already answered: a resumed delivery starts
    at ``requests[sent]``.
    """

    id: int
    event_id: str
    rule: str
    phone: str
    requests: tuple[PushRequest, ...]
    sent: int
    attempts: int
    created_at: float
    expires_at: float
    state: DeliveryState
    error: str

    @property
    def kind(self) -> DeliveryKind:
        return _kind(self.requests)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A stored event with the rules it matched and all its deliveries."""

    id: str
    source: str
    topic: str
    received_at: float
    rules: tuple[str, ...]
    deliveries: tuple[Delivery, ...]
    payload: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EventSummary:
    """A stored event and how many of its deliveries are in each state (``phonepush status``)."""

    id: str
    source: str
    topic: str
    received_at: float
    rules: tuple[str, ...]
    states: Mapping[str, int]


# --- acknowledgements and repeats ---
#
# An *alert* is one (event, rule) whose page can be acknowledged, repeated or resolved; it keeps
# the policy it was accepted with (a restart or reload does not change a page already out) and,
# per phone, the requests that phone is pushed (its page URL carries its ack token). What an ack,
# a repeat round or a resolve does to them is phonepush.alerting's; the store only keeps them.


class AlertState(StrEnum):
    """What an alert can be: still running, stopped by an acknowledgement, stopped by a resolve.
    The values are in spool files and in the status API's JSON."""

    ACTIVE = "active"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


ALERT_STATES: Final = frozenset(AlertState)


class RoundKind(StrEnum):
    """Why a delivery of an alert's event went out: the first page, a repeat round, an
    escalation round, or the notice that a later event resolved it. The values are in spool
    files (all but ``page``, which is every delivery no round added) and in the status API."""

    PAGE = "page"
    REPEAT = "repeat"
    ESCALATION = "escalation"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class NewAction:
    """One softkey that acts, on one phone's page: its own token, what it does (``spec``, the
    rendered ``{"mqtt": {...}}``, ``{"webhook": {...}}`` or ``{"dial": "NUMBER"}`` as JSON)."""

    token: str
    position: int
    label: str
    spec: str
    confirm: bool
    repeatable: bool
    expires_at: float


@dataclass(frozen=True, slots=True)
class ActionRecord:
    """A stored action of one phone's page, with when it was last used."""

    token: str
    event_id: str
    rule: str
    phone: str
    page_token: str
    position: int
    label: str
    spec: str
    confirm: bool
    repeatable: bool
    #: Whether the page also carries the Ack softkey.
    with_ack: bool
    expires_at: float
    used_at: float | None


@dataclass(frozen=True, slots=True)
class ActionPress:
    """One press of an action softkey: who, when, and what came of it."""

    event_id: str
    rule: str
    phone: str
    label: str
    at: float
    result: str
    by: str
    error: str = ""


@dataclass(frozen=True, slots=True)
class NewAlertPhone:
    """A phone of a new alert: its ack token (None without acks or actions) and its own
    requests; ``actions`` are its page's action softkeys, ``with_ack`` whether that page also
    carries Ack.

    ``escalation`` phones get nothing at first, only repeats from round ``escalate_after`` on.
    """

    phone: str
    token: str | None
    requests: tuple[PushRequest, ...]
    escalation: bool = False
    actions: tuple[NewAction, ...] = ()
    with_ack: bool = True


@dataclass(frozen=True, slots=True)
class NewAlert:
    """What intake hands the store, with an event, for a rule that acks, repeats or resolves."""

    rule: str
    key: str
    page_id: str
    scope: str  # "any" or "phone"
    repeat: float  # seconds; 0 = no repeats
    max_repeats: int
    escalate_after: int  # 0 = no escalation
    ttl: float
    next_at: float | None
    phones: tuple[NewAlertPhone, ...]


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """A stored alert. ``rounds`` counts repeats pushed; ``next_at`` is None once none are left."""

    event_id: str
    rule: str
    key: str
    page_id: str
    scope: str
    repeat: float
    max_repeats: int
    escalate_after: int
    ttl: float
    rounds: int
    next_at: float | None
    state: AlertState
    ended_at: float | None
    ended_by: str


@dataclass(frozen=True, slots=True)
class AlertPhone:
    """One phone of an alert, with who acknowledged it there and when."""

    event_id: str
    rule: str
    phone: str
    token: str | None
    escalation: bool
    acked_at: float | None
    acked_by: str


@dataclass(frozen=True, slots=True)
class AlertTarget:
    """A phone of an alert with what a repeat round pushes it."""

    phone: str
    requests: tuple[PushRequest, ...]
    escalation: bool
    acked_at: float | None


# --- silences and groups ---


@dataclass(frozen=True, slots=True)
class StoredSilence:
    """A silence row; ``matchers`` is their JSON (phonepush.silence reads and writes it)."""

    id: str
    matchers: str
    starts_at: float
    ends_at: float
    created_at: float
    created_by: str
    comment: str


@dataclass(frozen=True, slots=True)
class NewGroupedEvent:
    """What intake hands the store, with an event, for a rule that groups: the event joins the
    (rule, key) window, opening it (due at ``due_at``) if none is open. ``content`` is what the
    event contributes to the group's page (JSON, written and read by phonepush.grouping.grouper)."""

    rule: str
    key: str
    phones: tuple[str, ...]
    content: str
    due_at: float
    ttl: float


@dataclass(frozen=True, slots=True)
class GroupedEvent:
    """An event waiting in a grouping window, with what silences match on."""

    seq: int
    event_id: str
    phones: tuple[str, ...]
    content: str
    source: str
    topic: str
    payload: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class GroupWindow:
    """An open grouping window and its events."""

    rule: str
    key: str
    opened_at: float
    due_at: float
    ttl: float
    events: tuple[GroupedEvent, ...]
