"""Compiled rules: which rules an event triggers, and what each one sends.

:meth:`RuleBook.compile` turns the validated configuration into :class:`CompiledRule`s holding
every template a rule uses (once per load or reload, reusing what loading compiled); features
(acks, grouping, audio) take their templates and policies from the compiled rule.
:meth:`RuleBook.match` runs per event and never raises: a template that fails or renders an
invalid URI gives a :class:`Match` with ``error`` set, which intake records as a failed
delivery. ``RuleSet`` is the book's former name, kept for those who import it.

Per event the work is: one dict lookup for the candidate rules (a per-topic cache in front of a
topic-level trie, so many rules cost nothing for topics they cannot match), then the payload is
decoded once and shared by every candidate's ``when`` and templates. Literal parts of a rule
(the usual ``Play:Chime.raw``) are built once at compile time.

Template context: ``payload`` (:func:`phonepush.events.decode_payload`: parsed JSON, else text),
``topic`` (MQTT topic or hook name), ``headers`` (lower-case names), ``source`` (``mqtt`` or
``webhook``), ``event`` (``{id, received_at}``) and ``now`` (the event's arrival as an aware
local datetime, so a re-rendered event says the same thing).

An ``execute`` entry that renders to nothing (``{{ 'Play:Alarm.raw' if payload.critical }}``)
is left out, so one rule can send an item only for some events.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from phonepush.config import ActionConfig, Config, RuleConfig, is_template, split_priority
from phonepush.errors import ConfigError, TemplateError, WireError
from phonepush.events import Event, decode_payload
from phonepush.templates import Expression, Templates, TextTemplate
from phonepush.wire.cisco import TextPage
from phonepush.wire.uri import ExecuteItem, is_http, validate_uri

__all__ = [
    "ActionSpec",
    "AlertPolicy",
    "CompiledAction",
    "CompiledRule",
    "Match",
    "Rule",
    "RuleBook",
    "RuleSet",
    "event_context",
    "topic_matches",
]

#: Distinct topics remembered by a RuleBook's match cache before it starts over.
_TOPIC_CACHE_SIZE: Final = 4096


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching: ``+`` is one level, a final ``#`` the parent and any levels below it;
    topics starting with ``$`` are not matched by a wildcard in the first level."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filters = topic_filter.split("/")
    levels = topic.split("/")
    for i, part in enumerate(filters):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(filters) == len(levels)


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    """What a rule does about acks, repeats and resolves (``ack``, ``repeat``, ``escalate``,
    ``resolve_when``); :mod:`phonepush.alerting` carries it out."""

    ack: bool
    scope: str
    repeat: float
    max_repeats: int
    escalate_after: int
    escalate_phones: tuple[str, ...]
    resolve_when: Expression | None


@dataclass(frozen=True, slots=True)
class CompiledAction:
    """One entry of a rule's ``actions`` with its templates compiled: ``topic``/``payload``
    (mqtt), ``url``/``body`` (webhook); ``dial`` is the literal number."""

    label: str
    confirm: bool
    repeatable: bool
    kind: Literal["mqtt", "webhook", "dial"]
    where: str
    topic: TextTemplate | None = None
    payload: TextTemplate | None = None
    qos: int = 1
    retain: bool = False
    url: TextTemplate | None = None
    method: str = "POST"
    body: TextTemplate | None = None
    headers: tuple[tuple[str, str], ...] = ()
    dial: str = ""


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """An action rendered with one event: ``spec`` is the JSON stored with each phone's
    page (``{"mqtt": {topic, payload, qos, retain}}``, ``{"webhook": {url, method, body,
    headers}}`` or ``{"dial": "NUMBER"}``)."""

    label: str
    confirm: bool
    repeatable: bool
    kind: Literal["mqtt", "webhook", "dial"]
    spec: str


@dataclass(frozen=True, slots=True)
class _Item:
    """One ``execute`` entry: a constant item, or a template and the priority to give it."""

    constant: ExecuteItem | None
    render: TextTemplate | None
    priority: int
    where: str


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    """One rule with every template it uses compiled, as intake and the features see it.

    Compiled once per load or reload by :meth:`RuleBook.compile`; features take their part from
    here (``alert``, ``group_by``, ``audio_say``) instead of compiling their own.
    """

    name: str
    source: Literal["mqtt", "webhook", "schedule", "console"]
    pattern: str
    phones: tuple[str, ...]
    priority: int
    ttl: float
    cooldown: float | None
    when: Expression | None = None
    items: tuple[_Item, ...] = ()
    static_execute: tuple[ExecuteItem, ...] | None = ()  # all items constant: no work per event
    page: tuple[TextTemplate, TextTemplate, TextTemplate] | None = None
    static_page: TextPage | None = None
    background: tuple[TextTemplate, TextTemplate] | None = None
    ringtone: TextTemplate | None = None
    dedupe: TextTemplate | None = None
    #: Acks, repeats and resolves; None when the rule uses none of them.
    alert: AlertPolicy | None = None
    #: ``group_by`` keys; a grouped rule (``group_window`` set) may have none.
    group_by: tuple[TextTemplate, ...] = ()
    group_window: float | None = None
    #: Whether the rule plays an audio page (``audio``), and its ``audio.say`` when it speaks.
    audio: bool = False
    audio_say: TextTemplate | None = None
    #: Softkeys that act (``actions``) and how long their tokens work (``action_ttl``).
    actions: tuple[CompiledAction, ...] = ()
    action_ttl: float = 300.0

    def listens_to(self, event: Event) -> bool:
        """Whether ``event`` comes from where this rule listens (its ``when`` not consulted)."""
        if event.source != self.source:
            return False
        if self.source != "mqtt":
            return event.topic == self.pattern
        return topic_matches(self.pattern, event.topic)


#: The name rules had before they carried their templates.
Rule = CompiledRule


@dataclass(frozen=True, slots=True)
class Match:
    """One rule triggered by one event, with everything it sends rendered and validated."""

    rule: CompiledRule
    execute: tuple[ExecuteItem, ...] = ()
    page: TextPage | None = None
    background: tuple[str, str] | None = None
    ringtone: str | None = None
    dedupe_key: str = ""
    error: str | None = None
    actions: tuple[ActionSpec, ...] = ()


class _Node:
    __slots__ = ("children", "here", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.here: list[int] = []  # rules whose filter ends at this level
        self.rest: list[int] = []  # rules whose filter is "<this level>/#"


class RuleBook:
    """The compiled rules of one configuration."""

    def __init__(self, rules: Sequence[CompiledRule]) -> None:
        self._rules = tuple(rules)
        self.rules: tuple[CompiledRule, ...] = self._rules
        self._by_name = {rule.name: rule for rule in self._rules}
        self.mqtt_filters: list[str] = list(
            dict.fromkeys(r.pattern for r in self.rules if r.source == "mqtt")
        )
        self.hooks: frozenset[str] = frozenset(
            r.pattern for r in self.rules if r.source == "webhook"
        )
        self._by_hook: dict[str, tuple[CompiledRule, ...]] = {
            hook: tuple(c for c in self._rules if c.source == "webhook" and c.pattern == hook)
            for hook in self.hooks
        }
        self._by_schedule: dict[str, tuple[CompiledRule, ...]] = {}
        for compiled in self._rules:
            if compiled.source == "schedule":
                self._by_schedule[compiled.pattern] = (
                    *self._by_schedule.get(compiled.pattern, ()),
                    compiled,
                )
        self._trie = _Node()
        for index, compiled in enumerate(self._rules):
            if compiled.source == "mqtt":
                self._insert(compiled.pattern, index)
        self._topic_cache: dict[str, tuple[CompiledRule, ...]] = {}

    @classmethod
    def compile(cls, config: Config) -> RuleBook:
        """Compile every rule; a bad template raises :class:`ConfigError` naming
        ``rules[<name>].<key>``."""
        # Loading compiled every template already (to report errors): these are cache hits.
        templates = config.templates
        return cls([_compile_rule(rule, config, templates) for rule in config.all_rules])

    def rule(self, name: str) -> CompiledRule:
        return self._by_name[name]

    def get(self, name: str) -> CompiledRule | None:
        return self._by_name.get(name)

    def match(self, event: Event) -> list[Match]:
        """The rules ``event`` triggers, in config order. Never raises."""
        if event.source == "webhook":
            candidates = self._by_hook.get(event.topic, ())
        elif event.source == "schedule":
            candidates = self._by_schedule.get(event.topic, ())
        elif event.source == "mqtt":
            candidates = self._mqtt_candidates(event.topic)
        else:  # a console page names its phones itself; no rule listens to it
            return []
        if not candidates:
            return []
        context = _context(event)
        matches: list[Match] = []
        for compiled in candidates:
            match = _apply(compiled, context)
            if match is not None:
                matches.append(match)
        return matches

    def _insert(self, topic_filter: str, index: int) -> None:
        node = self._trie
        levels = topic_filter.split("/")
        for level in levels:
            if level == "#":
                node.rest.append(index)
                return
            node = node.children.setdefault(level, _Node())
        node.here.append(index)

    def _mqtt_candidates(self, topic: str) -> tuple[CompiledRule, ...]:
        cached = self._topic_cache.get(topic)
        if cached is not None:
            return cached
        found: list[int] = []
        self._walk(self._trie, topic.split("/"), 0, topic.startswith("$"), found)
        result = tuple(self._rules[i] for i in sorted(set(found)))
        if len(self._topic_cache) >= _TOPIC_CACHE_SIZE:
            self._topic_cache.clear()
        self._topic_cache[topic] = result
        return result

    def _walk(self, node: _Node, levels: list[str], i: int, dollar: bool, found: list[int]) -> None:
        wildcards = not (dollar and i == 0)
        if wildcards:
            found.extend(node.rest)
        if i == len(levels):
            found.extend(node.here)
            return
        child = node.children.get(levels[i])
        if child is not None:
            self._walk(child, levels, i + 1, dollar, found)
        if wildcards and (child := node.children.get("+")) is not None:
            self._walk(child, levels, i + 1, dollar, found)


#: The name the rule book had before it held every template of a rule (the configuration
#: reference names it).
RuleSet = RuleBook


# --- compiling ----------------------------------------------------------------------------------


def _compile_rule(rule: RuleConfig, config: Config, templates: Templates) -> CompiledRule:
    where = f"{'schedules' if rule.source == 'schedule' else 'rules'}[{rule.name}]"
    try:
        phones = config.expand(rule.to)
    except KeyError as exc:
        raise ConfigError(f"{where}.to: no phone or group named {exc.args[0]!r}") from None
    when = templates.compile_expression(rule.when, f"{where}.when") if rule.when.strip() else None
    items = tuple(
        _compile_item(entry, rule.priority, f"{where}.execute[{i}]", templates)
        for i, entry in enumerate(rule.execute)
    )
    static_execute: tuple[ExecuteItem, ...] | None = None
    if all(item.constant is not None for item in items):
        static_execute = tuple(item.constant for item in items if item.constant is not None)

    page = static_page = None
    if rule.message is not None:
        message = rule.message
        page = (
            templates.compile_template(message.title, f"{where}.message.title"),
            templates.compile_template(message.text, f"{where}.message.text"),
            templates.compile_template(message.prompt, f"{where}.message.prompt"),
        )
        if not any(map(is_template, (message.title, message.text, message.prompt))):
            static_page = TextPage(title=message.title, text=message.text, prompt=message.prompt)
    background = None
    if rule.background is not None:
        background = (
            templates.compile_url_template(rule.background.icon, f"{where}.background.icon"),
            templates.compile_url_template(rule.background.image, f"{where}.background.image"),
        )
    ringtone = (
        templates.compile_url_template(rule.ringtone, f"{where}.ringtone")
        if rule.ringtone
        else None
    )
    dedupe = templates.compile_template(rule.dedupe, f"{where}.dedupe") if rule.dedupe else None
    return CompiledRule(
        name=rule.name,
        source=rule.source,
        pattern=rule.pattern,
        phones=phones,
        priority=rule.priority,
        ttl=rule.ttl,
        cooldown=rule.cooldown,
        when=when,
        items=items,
        static_execute=static_execute,
        page=page,
        static_page=static_page,
        background=background,
        ringtone=ringtone,
        dedupe=dedupe,
        alert=_alert_policy(rule, phones, config, templates),
        group_by=tuple(
            templates.compile_template(source, f"{where}.group_by[{i}]")
            for i, source in enumerate(rule.group_by)
        ),
        group_window=rule.group_window if rule.grouped else None,
        audio=rule.audio is not None,
        audio_say=(
            templates.compile_template(rule.audio.say, f"{where}.audio.say")
            if rule.audio is not None and rule.audio.say.strip()
            else None
        ),
        actions=tuple(
            _compile_action(action, f"{where}.actions[{i}]", templates)
            for i, action in enumerate(rule.actions)
        ),
        action_ttl=rule.action_ttl,
    )


def _compile_action(action: ActionConfig, where: str, templates: Templates) -> CompiledAction:
    common = (action.label, action.confirm, action.repeatable, action.kind, where)
    if action.mqtt is not None:
        mqtt = action.mqtt
        return CompiledAction(
            *common,
            topic=templates.compile_template(mqtt.topic, f"{where}.mqtt.topic"),
            payload=templates.compile_template(mqtt.payload, f"{where}.mqtt.payload"),
            qos=mqtt.qos,
            retain=mqtt.retain,
        )
    if action.webhook is not None:
        hook = action.webhook
        return CompiledAction(
            *common,
            url=templates.compile_url_template(hook.url, f"{where}.webhook.url"),
            method=hook.method,
            body=templates.compile_template(hook.body, f"{where}.webhook.body"),
            headers=tuple(hook.headers.items()),
        )
    return CompiledAction(*common, dial=action.dial)


def _alert_policy(
    rule: RuleConfig, phones: tuple[str, ...], config: Config, templates: Templates
) -> AlertPolicy | None:
    # Actions live on the per-phone page an alert gives each phone (its token names the phone
    # that pressed), so a rule with actions makes alerts even without acks.
    if not (rule.acked or rule.repeat is not None or rule.resolve_when.strip() or rule.actions):
        return None
    escalate: tuple[str, ...] = ()
    if rule.escalate is not None:
        escalate = tuple(p for p in config.expand(rule.escalate.to) if p not in phones)
    return AlertPolicy(
        ack=rule.acked,
        scope=rule.ack_scope,
        repeat=rule.repeat or 0.0,
        max_repeats=rule.repeats,
        escalate_after=rule.escalate.after if rule.escalate is not None else 0,
        escalate_phones=escalate,
        resolve_when=(
            templates.compile_expression(rule.resolve_when, f"rules[{rule.name}].resolve_when")
            if rule.resolve_when.strip()
            else None
        ),
    )


def _compile_item(entry: str, default: int, where: str, templates: Templates) -> _Item:
    try:
        url, priority = split_priority(entry)
    except WireError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    priority = default if priority is None else priority
    if not is_template(url):
        try:
            return _Item(ExecuteItem(validate_uri(url), priority), None, priority, where)
        except WireError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    # An item written as an http(s) URL is one the phone fetches: its values are URL-encoded.
    compile = templates.compile_url_template if is_http(url) else templates.compile_template
    return _Item(None, compile(url, where), priority, where)


# --- per event ----------------------------------------------------------------------------------


# A JSON string escape of a UTF-16 surrogate ("\ud800"): json.loads turns an unpaired one into a
# lone surrogate, which no UTF-8 encoder (SQLite, logs, XML) accepts.
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _scrub(value: Any) -> Any:
    """``value`` with lone surrogates replaced by U+FFFD, in strings, keys and nested values."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value


def event_context(event: Event) -> dict[str, Any]:
    """What rule templates see for ``event`` (for templates compiled elsewhere: ``group_by``)."""
    return _context(event)


def _context(event: Event) -> dict[str, Any]:
    payload = decode_payload(event.payload)
    if _SURROGATE_ESCAPE.search(event.payload):
        payload = _scrub(payload)
    return {
        "payload": payload,
        "topic": event.topic,
        "headers": {name.lower(): value for name, value in event.headers.items()},
        "source": event.source,
        "event": {"id": event.id, "received_at": event.received_at},
        "now": datetime.fromtimestamp(event.received_at).astimezone(),
    }


def _apply(compiled: CompiledRule, context: Mapping[str, Any]) -> Match | None:
    rule = compiled
    try:
        if compiled.when is not None and not compiled.when(context):
            return None
        return Match(
            rule=rule,
            execute=_execute(compiled, context),
            page=_page(compiled, context),
            background=_background(compiled, context),
            ringtone=_ringtone(compiled, context),
            dedupe_key=compiled.dedupe(context) if compiled.dedupe is not None else "",
            actions=tuple(_action(a, context) for a in compiled.actions),
        )
    except (TemplateError, WireError) as exc:
        return Match(rule=rule, error=str(exc))


def _execute(compiled: CompiledRule, context: Mapping[str, Any]) -> tuple[ExecuteItem, ...]:
    if compiled.static_execute is not None:
        return compiled.static_execute
    out: list[ExecuteItem] = []
    for item in compiled.items:
        if item.constant is not None:
            out.append(item.constant)
            continue
        assert item.render is not None
        url = item.render(context).strip()
        if url:
            out.append(ExecuteItem(_checked(url, item.where), item.priority))
    return tuple(out)


def _checked(url: str, where: str) -> str:
    try:
        return validate_uri(url)
    except WireError as exc:
        raise WireError(f"{where}: {exc}") from exc


def _http(url: str, where: str) -> str:
    url = url.strip()
    if not is_http(url):
        raise WireError(f"{where}: must be an http:// or https:// URL, got {url[:80]!r}")
    return _checked(url, where)


def _page(compiled: CompiledRule, context: Mapping[str, Any]) -> TextPage | None:
    if compiled.static_page is not None or compiled.page is None:
        return compiled.static_page
    title, text, prompt = compiled.page
    return TextPage(title=title(context), text=text(context), prompt=prompt(context))


def _background(compiled: CompiledRule, context: Mapping[str, Any]) -> tuple[str, str] | None:
    if compiled.background is None:
        return None
    icon, image = compiled.background
    where = f"rules[{compiled.name}].background"
    return _http(icon(context), f"{where}.icon"), _http(image(context), f"{where}.image")


def _ringtone(compiled: CompiledRule, context: Mapping[str, Any]) -> str | None:
    if compiled.ringtone is None:
        return None
    return _http(compiled.ringtone(context), f"rules[{compiled.name}].ringtone")


def _action(action: CompiledAction, context: Mapping[str, Any]) -> ActionSpec:
    spec: dict[str, Any]
    if action.kind == "mqtt":
        assert action.topic is not None and action.payload is not None
        topic = action.topic(context)
        if not topic or "+" in topic or "#" in topic or "\0" in topic:
            raise WireError(f"{action.where}.mqtt.topic: {topic[:80]!r} is no topic to publish to")
        spec = {
            "mqtt": {
                "topic": topic,
                "payload": action.payload(context),
                "qos": action.qos,
                "retain": action.retain,
            }
        }
    elif action.kind == "webhook":
        assert action.url is not None and action.body is not None
        spec = {
            "webhook": {
                "url": _http(action.url(context), f"{action.where}.webhook.url"),
                "method": action.method,
                "body": action.body(context),
                "headers": dict(action.headers),
            }
        }
    else:
        spec = {"dial": action.dial}
    return ActionSpec(
        action.label, action.confirm, action.repeatable, action.kind, json.dumps(spec)
    )
