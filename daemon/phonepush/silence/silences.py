"""Silences and quiet hours: when a page that would go out is held back, or sent "only if idle".

Two things can keep a page from a phone:

* **Runtime silences**, made through ``/api/silences`` (:mod:`phonepush.http.silences_api`) and
  kept in the spool so they survive a restart. A silence is a list of matchers, all of which must
  hold, and a time span. Matchers look like Alertmanager's: ``{"name": "rule", "value": "alerts"}``,
  with ``name`` one of ``rule``, ``phone``, ``source``, ``topic`` or ``label.<path>`` (a dotted
  path into the event's payload, ``label.commonLabels.severity``), ``isRegex`` for a regular
  expression that must match the whole value, ``isEqual: false`` to negate.
* **Quiet hours**, configured per rule and per phone: daily time ranges in a named time zone,
  optionally only on some days. ``action = "drop"`` holds the page back; ``action = "idle"``
  sends it with every item at Priority 2 ("execute only if idle"), so a phone in a call is not
  interrupted.

A held-back page is recorded as a delivery in state ``suppressed`` with the reason (``quiet
hours``, ``silenced by <id>``) and counted in ``phonepush_deliveries_total{result="suppressed"}``;
silenced ones also in ``phonepush_silenced_total{rule}``. Silences win over quiet hours (the reason
names the silence), and "drop" wins over "idle" when a rule and a phone both have quiet hours.

Regular expressions come from people holding the API token, but are matched against event data
that anyone able to send an event controls. They run on RE2 (``google-re2``), whose matching time
is linear in the pattern and subject sizes, never exponential: no pattern can freeze the event
loop, and RE2 refuses what needs backtracking (back-references, look-arounds) and Python's
``(?x)`` verbose flag. A pattern is at most :data:`MAX_REGEX_LENGTH` characters, and is only
tried on values of at most :data:`MAX_REGEX_SUBJECT` characters (a longer value does not match).
A silence stored by an older version whose pattern RE2 refuses is skipped at start with an error
in the log, not loaded with Python's engine.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol
from zoneinfo import ZoneInfo

import re2

from phonepush.config.quiet_hours import DAYS, QuietHoursConfig, parse_days, parse_range, parse_zone
from phonepush.errors import WireError
from phonepush.events import Event, decode_payload
from phonepush.metrics import Metrics
from phonepush.pipeline.plan import Work
from phonepush.store.interface import Store
from phonepush.store.records import Delivery, DeliveryState, NewDelivery, PushRequest, StoredSilence
from phonepush.wire import cisco
from phonepush.wire.uri import ExecuteItem

if TYPE_CHECKING:
    from phonepush.config import Config

__all__ = [
    "DAYS",
    "MATCHER_FIELDS",
    "MAX_MATCHERS",
    "MAX_REGEX_LENGTH",
    "MAX_REGEX_SUBJECT",
    "MAX_SILENCES",
    "Facts",
    "Matcher",
    "QuietHours",
    "QuietHoursConfig",
    "Quieting",
    "Screened",
    "Silence",
    "Silences",
    "Verdict",
    "idle_requests",
]

log = logging.getLogger("phonepush.silences")

#: Matcher names besides ``label.<path>``.
MATCHER_FIELDS: Final = frozenset({"rule", "phone", "source", "topic"})
MAX_MATCHERS: Final = 16
MAX_REGEX_LENGTH: Final = 256
MAX_REGEX_SUBJECT: Final = 256
MAX_SILENCES: Final = 1000
_MAX_VALUE: Final = 1024
_MAX_PATH_PARTS: Final = 8
# What one compiled pattern may hold (RE2's default is 8 MiB); 256 characters need far less, and
# 1,000 silences of 16 matchers stay bounded.
_REGEX_MEMORY: Final = 1 << 20


# --- quiet hours ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuietHours:
    """Compiled quiet hours. A range that crosses midnight belongs to the day it starts on:
    ``22:00-07:00`` with ``days = ["fri"]`` is Friday 22:00 to Saturday 07:00."""

    ranges: tuple[tuple[int, int], ...]
    days: frozenset[int]
    zone: ZoneInfo
    action: Literal["drop", "idle"]

    @classmethod
    def from_config(cls, config: QuietHoursConfig) -> QuietHours:
        return cls(
            tuple(parse_range(r) for r in config.ranges),
            parse_days(config.days),
            parse_zone(config.timezone),
            config.action,
        )

    def active(self, at: float) -> bool:
        """Whether the wall-clock time at ``at`` (epoch seconds) in the zone is quiet."""
        local = datetime.fromtimestamp(at, self.zone)
        minute = local.hour * 60 + local.minute
        today = local.weekday()
        yesterday = (today - 1) % 7
        for start, end in self.ranges:
            if start < end:
                if start <= minute < end and today in self.days:
                    return True
            elif (minute >= start and today in self.days) or (
                minute < end and yesterday in self.days
            ):
                return True
        return False


# --- matchers and silences ----------------------------------------------------------------------


class Facts:
    """What matchers look at in one event; the payload is decoded only if a label matcher asks."""

    __slots__ = ("__dict__", "event")

    def __init__(self, event: Event) -> None:
        self.event = event

    @cached_property
    def payload(self) -> Any:
        return decode_payload(self.event.payload)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    # JSON spelling, so true/false/3 match what a sender wrote.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _lookup(payload: Any, path: tuple[str, ...]) -> str:
    value = payload
    for part in path:
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return ""
    return _as_text(value)


class _Regex(Protocol):
    def fullmatch(self, text: str) -> object | None: ...


def _check_regex(pattern: str) -> _Regex:
    """Compile a matcher's pattern with RE2 (module docstring); ``ValueError`` says why not."""
    if len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(f"a regex is at most {MAX_REGEX_LENGTH} characters")
    options = re2.Options()
    options.log_errors = False  # RE2 would print the refused pattern on stderr, unescaped
    options.never_capture = True
    options.max_mem = _REGEX_MEMORY
    try:
        compiled: _Regex = re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args else "refused"
        raise ValueError(
            f"not a valid regex: {reason} (RE2 syntax: no back-references, look-arounds or (?x))"
        ) from None
    return compiled


def _fullmatch(regex: _Regex, subject: str) -> bool:
    try:
        return regex.fullmatch(subject) is not None
    except UnicodeEncodeError:
        # RE2 takes UTF-8; a lone surrogate from a JSON "\\ud800" escape cannot be encoded.
        return regex.fullmatch(subject.encode("utf-8", "replace").decode("utf-8")) is not None


@dataclass(frozen=True, slots=True)
class Matcher:
    """One condition of a silence."""

    name: str
    value: str
    is_regex: bool = False
    is_equal: bool = True
    _path: tuple[str, ...] = field(default=(), compare=False, repr=False)
    _regex: _Regex | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, data: object) -> Matcher:
        """Validate one matcher as the API takes it; ``ValueError`` says what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError("a matcher is an object with name and value")
        unknown = set(data) - {"name", "value", "isRegex", "isEqual"}
        if unknown:
            raise ValueError(f"unknown matcher key(s): {', '.join(sorted(map(str, unknown)))}")
        name, value = data.get("name"), data.get("value")
        is_regex, is_equal = data.get("isRegex", False), data.get("isEqual", True)
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError("a matcher needs name and value as strings")
        if not isinstance(is_regex, bool) or not isinstance(is_equal, bool):
            raise ValueError("isRegex and isEqual are true or false")
        if len(value) > _MAX_VALUE:
            raise ValueError(f"a matcher value is at most {_MAX_VALUE} characters")
        path: tuple[str, ...] = ()
        if name.startswith("label."):
            path = tuple(name.removeprefix("label.").split("."))
            if not all(path) or len(path) > _MAX_PATH_PARTS:
                raise ValueError(
                    f"label.<path>: a dotted path of 1-{_MAX_PATH_PARTS} non-empty keys,"
                    f" got {name!r}"
                )
        elif name not in MATCHER_FIELDS:
            raise ValueError(
                f"matcher name {name!r}: expected one of {', '.join(sorted(MATCHER_FIELDS))}"
                " or label.<path>"
            )
        try:
            regex = _check_regex(value) if is_regex else None
        except ValueError as exc:
            raise ValueError(f"matcher {name}: {exc}") from None
        return cls(name, value, is_regex, is_equal, path, regex)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "isRegex": self.is_regex,
            "isEqual": self.is_equal,
        }

    def matches(self, rule: str, phone: str, facts: Facts) -> bool:
        if self.name == "rule":
            subject = rule
        elif self.name == "phone":
            subject = phone
        elif self.name == "source":
            subject = facts.event.source
        elif self.name == "topic":
            subject = facts.event.topic
        else:
            subject = _lookup(facts.payload, self._path)
        if self._regex is not None:
            hit = len(subject) <= MAX_REGEX_SUBJECT and _fullmatch(self._regex, subject)
        else:
            hit = subject == self.value
        return hit == self.is_equal


@dataclass(frozen=True, slots=True)
class Silence:
    """A runtime silence: all ``matchers`` hold, and ``starts_at <= now < ends_at``."""

    id: str
    matchers: tuple[Matcher, ...]
    starts_at: float
    ends_at: float
    created_at: float
    created_by: str
    comment: str

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, rule: str, phone: str, facts: Facts) -> bool:
        return all(m.matches(rule, phone, facts) for m in self.matchers)

    def to_dict(self, now: float) -> dict[str, Any]:
        """The API's JSON form (times as RFC 3339 UTC)."""
        return {
            "id": self.id,
            "matchers": [m.to_dict() for m in self.matchers],
            "startsAt": _rfc3339(self.starts_at),
            "endsAt": _rfc3339(self.ends_at),
            "createdAt": _rfc3339(self.created_at),
            "createdBy": self.created_by,
            "comment": self.comment,
            "status": "active" if self.active(now) else "pending",
        }

    def stored(self) -> StoredSilence:
        return StoredSilence(
            id=self.id,
            matchers=json.dumps([m.to_dict() for m in self.matchers], ensure_ascii=False),
            starts_at=self.starts_at,
            ends_at=self.ends_at,
            created_at=self.created_at,
            created_by=self.created_by,
            comment=self.comment,
        )

    @classmethod
    def from_stored(cls, row: StoredSilence) -> Silence:
        return cls(
            id=row.id,
            matchers=tuple(Matcher.parse(m) for m in json.loads(row.matchers)),
            starts_at=row.starts_at,
            ends_at=row.ends_at,
            created_at=row.created_at,
            created_by=row.created_by,
            comment=row.comment,
        )


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at).astimezone().isoformat(timespec="seconds")


class Silences:
    """The silences in force or scheduled: kept in memory, written through to the spool.

    The spool is the only store; this object is the only writer, so the in-memory list is what
    the spool holds. A silence is deleted from the spool once it has ended (by time or by
    :meth:`expire`); the log keeps who made it and why.
    """

    def __init__(self, spool: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._spool = spool
        self._clock = clock
        self._silences: dict[str, Silence] = {}
        #: Told after a silence was added or expired (the cluster has the other instances
        #: reload theirs).
        self.on_change: Callable[[], None] | None = None

    async def load(self) -> None:
        """Read the silences from the spool (at start), forgetting those that have ended."""
        now = self._clock()
        # Built aside and swapped in whole: a reload (the cluster's) never leaves events
        # unsilenced while it reads.
        loaded: dict[str, Silence] = {}
        for row in await self._spool.silences.all():
            try:
                silence = Silence.from_stored(row)
            except (ValueError, TypeError) as exc:
                # Written by this code, so only a hand-edited row gets here: skip it, loudly.
                log.error("spool silence %s is unreadable and is ignored: %s", row.id, exc)
                continue
            if silence.ends_at > now:
                loaded[silence.id] = silence
            else:
                await self._spool.silences.delete(silence.id)
        self._silences = loaded

    async def add(self, silence: Silence) -> None:
        """Store ``silence``; ``ValueError`` when :data:`MAX_SILENCES` are already in force."""
        await self._prune()
        if len(self._silences) >= MAX_SILENCES:
            raise ValueError(f"there are already {MAX_SILENCES} silences; expire some first")
        await self._spool.silences.add(silence.stored())
        self._silences[silence.id] = silence
        if self.on_change is not None:
            self.on_change()
        log.warning(
            "silence %s by %s until %s: %s (%s)",
            silence.id,
            silence.created_by,
            _rfc3339(silence.ends_at),
            ", ".join(
                f"{m.name}{'=' if m.is_equal else '!'}{'~' if m.is_regex else '='}{m.value!r}"
                for m in silence.matchers
            ),
            silence.comment,
        )

    async def expire(self, silence_id: str) -> bool:
        """End a silence now; False if there is no such silence in force or scheduled."""
        await self._prune()
        if silence_id not in self._silences:
            return False
        await self._spool.silences.delete(silence_id)
        del self._silences[silence_id]
        if self.on_change is not None:
            self.on_change()
        log.warning("silence %s expired through the API", silence_id)
        return True

    async def current(self) -> list[Silence]:
        """Silences in force or scheduled, ending soonest first."""
        await self._prune()
        return sorted(self._silences.values(), key=lambda s: (s.ends_at, s.id))

    async def get(self, silence_id: str) -> Silence | None:
        await self._prune()
        return self._silences.get(silence_id)

    def matching(self, rule: str, phone: str, facts: Facts, now: float) -> Silence | None:
        """The first silence in force at ``now`` that holds for this rule, phone and event."""
        for silence in self._silences.values():
            if silence.active(now) and silence.matches(rule, phone, facts):
                return silence
        return None

    def __bool__(self) -> bool:
        return bool(self._silences)

    async def _prune(self) -> None:
        now = self._clock()
        for silence in [s for s in self._silences.values() if s.ends_at <= now]:
            await self._spool.silences.delete(silence.id)
            del self._silences[silence.id]
            log.info("silence %s ended", silence.id)


# --- the decision -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What happens to one page for one phone: ``send``, ``idle`` (Priority 2) or ``drop``."""

    action: Literal["send", "idle", "drop"]
    reason: str = ""
    silence: str = ""  # the silence's id, when one dropped it


_SEND: Final = Verdict("send")


def idle_requests(requests: Sequence[PushRequest]) -> tuple[PushRequest, ...]:
    """The same requests with every Execute item at Priority 2 ("execute only if idle").

    Items are read back with the phone-side parser from XML we built ourselves; priorities are
    one digit, so sizes and packing stay what they were.
    """
    out: list[PushRequest] = []
    for request in requests:
        if request.kind != "execute":
            out.append(request)
            continue
        push = cisco.parse_push(request.xml.encode("utf-8"))
        if not isinstance(push, cisco.ExecutePush):
            raise WireError("an execute request holds no CiscoIPPhoneExecute")
        items = [ExecuteItem(item.url, 2) for item in push.items]
        out.append(PushRequest("execute", cisco.execute_xml(items)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Screened:
    """Deliveries after silences and quiet hours, with what to count once they are committed."""

    deliveries: list[NewDelivery]
    held: list[tuple[str, str, Verdict]]  # (rule, phone, verdict) of every drop
    idled: int = 0


class Quieting:
    """Silences plus the configured quiet hours of rules and phones: one :class:`Verdict` per
    (rule, phone) at a moment."""

    def __init__(
        self,
        silences: Silences,
        rules: Mapping[str, QuietHours] | None = None,
        phones: Mapping[str, QuietHours] | None = None,
    ) -> None:
        self.silences = silences
        self._rules = dict(rules or {})
        self._phones = dict(phones or {})

    @classmethod
    def from_config(cls, config: Config, silences: Silences) -> Quieting:
        rules = {
            r.name: QuietHours.from_config(r.quiet_hours)
            for r in config.all_rules
            if r.quiet_hours is not None
        }
        phones = {
            p.name: QuietHours.from_config(p.quiet_hours)
            for p in config.phones
            if p.quiet_hours is not None
        }
        return cls(silences, rules, phones)

    def quiet(self, rule: str, phone: str, now: float) -> Verdict:
        """Quiet hours only (a group checks silences per event itself)."""
        actions = [
            hours.action
            for hours in (self._rules.get(rule), self._phones.get(phone))
            if hours is not None and hours.active(now)
        ]
        if "drop" in actions:
            return Verdict("drop", "quiet hours")
        if actions:
            return Verdict("idle", "quiet hours")
        return _SEND

    def silenced(self, rule: str, phone: str, facts: Facts, now: float) -> Silence | None:
        return self.silences.matching(rule, phone, facts, now) if self.silences else None

    def verdict(self, rule: str, phone: str, facts: Facts, now: float) -> Verdict:
        silence = self.silenced(rule, phone, facts, now)
        if silence is not None:
            return Verdict("drop", f"silenced by {silence.id}", silence.id)
        return self.quiet(rule, phone, now)

    def screen(self, event: Event, deliveries: Sequence[NewDelivery], now: float) -> Screened:
        """Apply silences and quiet hours to an event's pending deliveries."""
        if not (self.silences or self._rules or self._phones):
            return Screened(list(deliveries), [])
        facts = Facts(event)
        out: list[NewDelivery] = []
        held: list[tuple[str, str, Verdict]] = []
        idled = 0
        idle_cache: dict[tuple[PushRequest, ...], tuple[PushRequest, ...]] = {}
        for new in deliveries:
            if new.state != DeliveryState.PENDING:
                out.append(new)
                continue
            verdict = self.verdict(new.rule, new.phone, facts, now)
            if verdict.action == "drop":
                out.append(replace(new, state=DeliveryState.SUPPRESSED, error=verdict.reason))
                held.append((new.rule, new.phone, verdict))
            elif verdict.action == "idle":
                requests = idle_cache.get(new.requests)
                if requests is None:
                    requests = idle_cache[new.requests] = idle_requests(new.requests)
                out.append(replace(new, requests=requests))
                idled += 1
            else:
                out.append(new)
        return Screened(out, held, idled)


def count_held(metrics: Metrics, event_id: str, held: Sequence[tuple[str, str, Verdict]]) -> None:
    """Count (``phonepush_silenced_total``) and log the deliveries silences and quiet hours
    dropped, once they are committed; their ``suppressed`` rows are counted in
    ``phonepush_deliveries_total`` by whoever stored them."""
    for rule, phone, verdict in held:
        if verdict.silence:
            metrics.silenced.labels(rule).inc()
        log.info("event %s rule %s to %s: %s", event_id, rule, phone, verdict.reason)


class Screening:
    """The pipeline stage of silences and quiet hours: an event's pending deliveries are dropped
    (``suppressed``) or sent idle-only (Priority 2); counted once committed. Grouped events are
    screened per phone when their group is flushed (:mod:`phonepush.grouping`)."""

    def __init__(
        self, quieting: Quieting, *, metrics: Metrics, clock: Callable[[], float] = time.time
    ) -> None:
        self.quieting = quieting
        self._metrics = metrics
        self._clock = clock

    async def stage(self, work: Work) -> None:
        screened = self.quieting.screen(work.event, work.deliveries, self._clock())
        work.deliveries = screened.deliveries
        if not screened.held:
            return
        event_id = work.event.id

        async def committed(pending: list[Delivery]) -> list[Delivery]:
            count_held(self._metrics, event_id, screened.held)
            return pending

        work.committed.append(committed)
