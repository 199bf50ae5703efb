"""Hostile and malformed input: fuzzed parsers, validators, templates and the webhook endpoint,
and the end-to-end property that event data cannot change the XML a phone receives.

Each fuzz target is a ``(strategy, check)`` pair in :data:`TARGETS`; the tests here run them with
a modest number of examples, ``bench/fuzz.py`` runs the same pairs with 10,000 or more. A check
raises ``AssertionError`` (or lets an unexpected exception out) when the code under test crashes,
answers without a clear error, or breaks a property.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self
from urllib.parse import parse_qsl, quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from _daemon_fixtures import DaemonRunner
from _mqtt_fixtures import Broker
from phonepush import jsonlimits
from phonepush.config import MqttConfig
from phonepush.errors import (
    ConfigError,
    InvalidURI,
    PhoneBadResponse,
    PhoneError,
    PhoneHTTPError,
    TemplateError,
    TooLarge,
    WireError,
)
from phonepush.events import Event, decode_payload
from phonepush.phone.client import PhoneClient, PhoneTarget
from phonepush.silence.silences import Facts, Matcher
from phonepush.sim.simulator import Fleet
from phonepush.templates import MAX_OUTPUT, Templates
from phonepush.wire import cisco
from phonepush.wire.cisco import ResponseItem, sanitize_text
from phonepush.wire.uri import ExecuteItem, validate_uri

__all__ = ["TARGETS", "BackgroundDaemon", "Target"]

TOKEN: Final = "hostile-input-token"
#: Examples per fuzz target in the test suite; bench/fuzz.py runs 10,000+.
SUITE_EXAMPLES: Final = 150
_FUZZ_SETTINGS = settings(
    max_examples=SUITE_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- hostile strings --------------------------------------------------------------------------

#: Strings known to break naive XML, URI, template and HTTP handling.
NASTY: Final = (
    '"/><ExecuteItem URL="Dial:911" Priority="0"/><x a="',
    "'/><ExecuteItem URL='Key:Services'/>",
    "</Text></CiscoIPPhoneText><CiscoIPPhoneExecute>",
    "<![CDATA[</Title>]]>",
    "]]>",
    "<!--",
    "<?xml version='1.0'?>",
    '<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>',
    "&amp;&lt;&#x41;&#0;&e;",
    "{{ 7*7 }}{% for x in range(9) %}x{% endfor %}",
    "Dial:911",
    "Dial:911\n",
    "1234#*ABCD,",
    "Play:Chime.raw",
    "http://evil.example/x?a=1&b=<2>",
    "%00%0d%0aX-Injected: 1",
    "\r\nContent-Length: 0\r\n\r\n",
    "\x00\x01\x1b[31m\x7f\x85\x9f",
    "\u2028\u2029\ufeff\ufffe\uffff",
    "\ud800",
    "\udfff\ud83d",
    "😀 Ωmega ﷽",
    "A" * 300,
    "&" * 200,
    "<>&'\"" * 60,
)

_HOSTILE_CHARS = st.one_of(
    st.sampled_from(list("<>&'\"\n\r\t :@/?#[]%=;,{}\\+*!$()|~`^.\x00\x1b\x7f\x85\u2028\ufffe")),
    st.characters(codec=None),
)
#: Text biased towards metacharacters, plus known-bad strings and very long repetitions.
hostile_text = st.one_of(
    st.text(_HOSTILE_CHARS, max_size=40),
    st.sampled_from(NASTY),
    st.builds(
        lambda s, n: s * n, st.text(_HOSTILE_CHARS, min_size=1, max_size=4), st.integers(1, 5000)
    ),
)


@dataclass(frozen=True)
class Target:
    """A fuzz target: examples come from ``strategy``; ``check(example)`` raises on a failure."""

    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    what: str


# --- target: the phone-response parser --------------------------------------------------------


def _billion_laughs() -> bytes:
    entities = ['<!ENTITY lol0 "lol">']
    entities += [f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    return (
        f'<?xml version="1.0"?><!DOCTYPE lolz [{"".join(entities)}]>'
        '<CiscoIPPhoneResponse><ResponseItem Data="&lol9;"/></CiscoIPPhoneResponse>'
    ).encode()


_ATTACKS: Final = (
    # XXE: an external entity pointing at a local file.
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b'<CiscoIPPhoneResponse><ResponseItem URL="&x;" Data="&x;" Status="0"/>'
    b"</CiscoIPPhoneResponse>",
    # XXE over the network (blind/out-of-band variant).
    b'<?xml version="1.0"?><!DOCTYPE r SYSTEM "http://127.0.0.1:9/evil.dtd">'
    b"<CiscoIPPhoneResponse/>",
    # Parameter entities.
    b'<!DOCTYPE r [<!ENTITY % p SYSTEM "file:///etc/hostname"> %p;]><CiscoIPPhoneResponse/>',
    # Billion laughs.
    _billion_laughs(),
    # Quadratic blowup without a DTD is impossible; an oversized body is refused by size.
    b'<CiscoIPPhoneResponse><ResponseItem Data="'
    + b"A" * (cisco.MAX_RESPONSE_BYTES + 10)
    + b'"/></CiscoIPPhoneResponse>',
    # Deep nesting.
    b"<CiscoIPPhoneResponse>" + b"<a>" * 5000 + b"</a>" * 5000 + b"</CiscoIPPhoneResponse>",
    # Entity declared lower-case / with odd spacing.
    b"<!doctype r><CiscoIPPhoneResponse/>",
    b"<CiscoIPPhoneError Number='4'>&unknown;</CiscoIPPhoneError>",
    b'\xef\xbb\xbf<CiscoIPPhoneError Number="99999999999999999999"/>',
    b"<CiscoIPPhoneResponse><ResponseItem Status='x' URL='\xff\xfe'/></CiscoIPPhoneResponse>",
    b'<?xml version="1.0" encoding="UTF-16"?><CiscoIPPhoneResponse/>',
    b'<?xml version="1.0" encoding="no-such-codec"?><CiscoIPPhoneResponse/>',
    b"",
    b"   \r\n",
)


def _xml_answer() -> st.SearchStrategy[bytes]:
    item = st.builds(ResponseItem, hostile_text, hostile_text, st.integers(-(2**70), 2**70))
    built = st.one_of(
        st.lists(item, max_size=4).map(lambda items: _encode(cisco.response_xml(items))),
        st.builds(
            lambda n, t: _encode(cisco.error_xml(n, t)), st.integers(-(2**70), 2**70), hostile_text
        ),
        # Raw templates with hostile text pasted in unescaped, as a broken phone might.
        st.builds(
            lambda tag, attr, text: _encode(
                f'<{tag} Number="{attr}" Status="{attr}">{text}</{tag}>'
            ),
            st.sampled_from(["CiscoIPPhoneResponse", "CiscoIPPhoneError", "ResponseItem", "x"]),
            hostile_text,
            hostile_text,
        ),
    )
    return st.one_of(built, st.sampled_from(_ATTACKS), st.binary(max_size=600))


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


response_example = st.tuples(
    _xml_answer(),
    st.one_of(
        st.none(),
        st.sampled_from(["text/xml", "text/xml; charset=utf-8", "TEXT/XML", "text/html", ""]),
        st.text(max_size=30),
    ),
    st.one_of(
        st.sampled_from([200, 201, 204, 301, 401, 403, 404, 500, 503]), st.integers(100, 599)
    ),
    st.booleans(),
)


def check_response(example: tuple[bytes, str | None, int, bool]) -> None:
    """parse_response returns ResponseItems or raises a PhoneError with a message; a body with
    a DTD or over the size limit is never read as success."""
    body, content_type, status, receipts = example
    try:
        items = cisco.parse_response(body, content_type, status, receipts=receipts)
    except PhoneError as exc:
        assert str(exc), "an error without a message"
        assert len(str(exc)) < 2000, "an error message that echoes the whole answer"
        return
    assert isinstance(items, list) and all(isinstance(i, ResponseItem) for i in items)
    assert 200 <= status < 300, f"HTTP {status} taken as success"
    is_xml = (content_type or "").strip()[:8].lower() == "text/xml"
    if is_xml and (b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper()):
        raise AssertionError("an answer with a DTD was accepted")
    if is_xml and len(body) > cisco.MAX_RESPONSE_BYTES:
        raise AssertionError("an oversized answer was accepted")
    for item in items:
        assert isinstance(item.url, str) and isinstance(item.data, str)


# --- target: the URI validator ------------------------------------------------------------------

_URI_PREFIXES: Final = (
    "Dial:", "EditDial:", "SendDigits:", "Key:", "SoftKey:", "Init:", "App:", "Play:", "Display:",
    "RTPRx:", "RTPMRx:", "RTPTx:", "RTPMTx:", "http://", "https://", "HTTP://", "",
)  # fmt: skip

uri_example = st.one_of(
    st.builds(lambda p, s: p + s, st.sampled_from(_URI_PREFIXES), hostile_text),
    st.builds(
        lambda p, s: p + s,
        st.sampled_from(_URI_PREFIXES),
        st.text(st.sampled_from(list("0123456789#*ABCD,.:-_aZ")), max_size=30),
    ),
    st.text(_HOSTILE_CHARS, max_size=300),
)


def check_uri(uri: str) -> None:
    """validate_uri accepts a URI unchanged (but an http(s) scheme, lower-cased) or raises
    InvalidURI; what it accepts builds a push (or is refused as too large) that a phone parses
    back to exactly that one item."""
    try:
        accepted = validate_uri(uri)
    except InvalidURI as exc:
        assert str(exc).startswith("Invalid URL: ")
        return
    scheme, sep, rest = uri.partition("://")
    assert accepted == (scheme.lower() + sep + rest if scheme.lower() in ("http", "https") else uri)
    uri = accepted
    assert len(uri) <= 256
    try:
        xml = cisco.execute_xml([ExecuteItem(uri, 1)])
    except TooLarge:
        return
    body = cisco.form_body(xml)
    assert dict(parse_qsl(body.decode("ascii")))["XML"] == xml
    push = cisco.parse_push(xml.encode("utf-8"))
    assert push == cisco.ExecutePush((ExecuteItem(uri, 1),))


# --- target: template rendering -----------------------------------------------------------------

_RULE_TEMPLATES: Final = (
    "{{ payload.t }}",
    "Dial:{{ payload.n | digits }}",
    "Dial:{{ payload.n }}",
    "{{ payload | tojson }}",
    "{{ payload.alerts | map(attribute='labels') | list }}",
    "{% for a in payload.alerts %}{{ a.labels.alertname }} {% endfor %}",
    "{{ payload.when | datetime }}",
    "{{ payload.x | fromjson }}",
    "{{ payload.t | truncate(20) }} {{ payload.t | upper }} {{ payload.t | replace('a', 'b') }}",
    "{{ '%s-%s' | format(payload.t, payload.n) }}",
    "{{ payload.t ~ payload.n }}{{ payload.n * 3 }}",
    "{{ payload[payload.t] }}{{ payload.items() | list }}",
    "{{ payload.t.split(payload.n) }}",
    "{{ payload | length }} {{ payload.t | center(40) }}",
    "{% if payload.t is mapping %}m{% elif payload.t is string %}s{% endif %}",
)
_TOKENS: Final = (
    "{{", "}}", "{%", "%}", "{#", "#}", "payload", "payload.t", ".", "|", "(", ")", "[", "]",
    "tojson", "fromjson", "digits", "datetime", "upper", "join", "list", "map", "attribute=",
    "for x in ", "endfor", "if ", "else", "endif", "set y = ", "range(", "9", "-1", "'a'",
    "*", "**", "~", "+", "/", "//", "%", "==", "<", "and", "not", "is", "defined", ",",
    "__class__", "__globals__", "mro", "self", "loop", "x", "y", " ",
)  # fmt: skip

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), hostile_text),
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(
            st.one_of(st.sampled_from(["t", "n", "x", "alerts", "labels"]), hostile_text),
            children,
            max_size=5,
        ),
    ),
    max_leaves=20,
)
template_example = st.tuples(
    st.one_of(
        st.sampled_from(_RULE_TEMPLATES),
        st.lists(st.sampled_from(_TOKENS), max_size=25).map("".join),
        hostile_text,
    ),
    st.dictionaries(st.sampled_from(["t", "n", "x", "when", "alerts"]), json_values, max_size=5),
    st.booleans(),
)


def check_template(example: tuple[str, dict[str, Any], bool]) -> None:
    """A template either fails to compile with a ConfigError naming the key, or renders event data
    to a bounded string or a TemplateError naming the key; an expression evaluates or raises
    TemplateError. Nothing else escapes."""
    source, payload, as_expression = example
    templates = Templates()
    context = {"payload": payload, "topic": "t", "headers": {}, "source": "webhook"}
    where = "rules[fuzz].message.text"
    try:
        if as_expression:
            templates.compile_expression(source, where)(context)
            return
        render = templates.compile_template(source, where)
    except ConfigError as exc:
        assert str(exc).startswith(where + ": ")
        return
    except TemplateError as exc:
        assert str(exc).startswith(where + ": ")
        return
    try:
        output = render(context)
    except TemplateError as exc:
        assert str(exc).startswith(where + ": ")
        return
    assert isinstance(output, str) and len(output) <= MAX_OUTPUT
    for leak in ("<class ", "<function ", "<module ", "<built-in"):
        assert leak not in output, f"sandbox leaked {leak!r}: {output[:200]!r}"


# --- target: silence matchers (what /api/silences takes, matched against event data) -----------

# Pieces of regexes, the hostile ones among them: nesting, inline flags, back-references,
# look-arounds, counted repetition, and what Python's verbose mode hides.
_REGEX_PIECES: Final = (
    *"a()+*?|.^$[]-\\ ",
    "{2,}",
    "{1000}",
    "(?x)",
    "(?i)",
    "(?s)",
    "(?=",
    "(?!",
    "(?<=",
    "(?P<n>",
    "(?P=n)",
    "\\1",
    "\\Z",
    "\\d",
    "\\pL",
    "[^a]",
    "(a+)+",
    "(a|aa)*",
    "(.*a){20}",
)
_regex_source = st.one_of(
    st.lists(st.sampled_from(_REGEX_PIECES), max_size=30).map("".join),
    st.sampled_from(["(?x)(a +) +", "(a+)+$", "^(a|a)*$", "(\\w+\\s?)+$", "x" * 300]),
    hostile_text,
)
_matcher_name = st.sampled_from(["rule", "phone", "source", "topic", "label.x", "label.a.b"])
matcher_example = st.fixed_dictionaries(
    {"name": st.one_of(_matcher_name, hostile_text), "value": _regex_source},
    optional={"isRegex": st.one_of(st.booleans(), st.just(1)), "isEqual": st.booleans()},
)
# Subjects that make a backtracking engine explode against the patterns above.
_subject = st.one_of(
    st.integers(1, 200).map(lambda n: "a" * n + "!"),
    hostile_text,
    st.integers(0, 300).map(lambda n: "a" * n),
)
silence_example = st.tuples(matcher_example, _subject)


def check_silence(example: tuple[dict[str, Any], str]) -> None:
    """A matcher is parsed or refused with a ValueError; a parsed one matches any event data to
    true or false, without an exception, in time linear in its sizes (bench/fuzz.py's hang check
    times each case)."""
    data, subject = example
    try:
        matcher = Matcher.parse(data)
    except ValueError as exc:
        assert str(exc)
        return
    payload = json.dumps({"x": subject, "a": {"b": subject}}).encode()
    facts = Facts(Event("webhook", subject[:64] or "t", payload))
    assert isinstance(matcher.matches(subject, subject, facts), bool)


def silences_api_check(base_url: str) -> Callable[[list[dict[str, Any]]], None]:
    """The check for the silences API: every fuzzed silence gets 201 or a 400/413 saying why,
    never a 500; one taken is listed and can be expired."""
    client = httpx.Client(
        base_url=base_url, timeout=10, headers={"Authorization": f"Bearer {TOKEN}"}
    )

    def check(matchers: list[dict[str, Any]]) -> None:
        body = {"matchers": matchers, "duration": "1m", "createdBy": "fuzz", "comment": "x"}
        # Sent as ASCII JSON: a lone surrogate in a value travels as its "\\ud800" escape.
        answer = client.post(
            "/api/silences",
            content=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        # 413: a body over the API's size limit, refused before it is read.
        assert answer.status_code in (201, 400, 413), answer.text
        if answer.status_code in (400, 413):
            assert answer.json()["error"]
            return
        silence_id = answer.json()["id"]
        assert client.get(f"/api/silences/{silence_id}").status_code == 200
        assert client.delete(f"/api/silences/{silence_id}").status_code == 200

    check.client = client  # type: ignore[attr-defined]
    return check


silences_example = st.lists(matcher_example, min_size=1, max_size=4)
# --- target: nesting depth (the bounded JSON decoder, as webhooks and MQTT use it) -------------

#: Layers a nested document is built from: what wraps the inner value, before and after it.
_LAYERS: Final = (
    (b"[", b"]"),
    (b'{"k":', b"}"),
    (b' [ 1 , "[[{" , ', b" ] "),  # brackets in strings do not nest
    (b'{"a\\"[{": [], "v": ', b', "w": {"x": [[]]}}'),  # an escaped quote, then a sibling
    (b"[{}, [], ", b"]"),
)


@dataclass(frozen=True)
class Nested:
    """A JSON document nested ``depth`` layers deep (or cut short, so not JSON at all)."""

    depth: int
    layers: tuple[int, ...]
    core: bytes
    cut: int | None

    @property
    def body(self) -> bytes:
        opens = b"".join(_LAYERS[self.layers[i % len(self.layers)]][0] for i in range(self.depth))
        closes = b"".join(
            _LAYERS[self.layers[i % len(self.layers)]][1] for i in reversed(range(self.depth))
        )
        document = opens + self.core + closes
        return document if self.cut is None else document[: self.cut % max(1, len(document))]


nested_example = st.builds(
    Nested,
    depth=st.one_of(st.integers(0, 70), st.integers(60, 70), st.integers(0, 5000)),
    layers=st.lists(st.integers(0, len(_LAYERS) - 1), min_size=1, max_size=4).map(tuple),
    core=st.sampled_from(
        [b"1", b'"x"', b"null", b"[]", b"{}", b'"]]]}}}"', b'"\\\\"', b'"\\\\\\"]"']
    ),
    cut=st.one_of(st.none(), st.none(), st.integers(0, 10**6)),
)


def reference_depth(data: bytes) -> int:
    """The nesting depth of a JSON text, by the simplest scanner there is (an oracle for the
    decoder's own, which does not scan character by character)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def check_nested(example: Nested) -> None:
    """Up to the limit, the bounded decoder agrees with json.loads; beyond it, it refuses with
    JsonTooDeep (a ValueError), and what rules see is the text, as for malformed JSON."""
    body = example.body
    deep = reference_depth(body) > jsonlimits.MAX_DEPTH
    refused = True
    try:
        decoded = jsonlimits.loads(body)
    except jsonlimits.JsonTooDeep:
        assert deep or example.cut is not None, "refused as too deep within the limit"
    except ValueError:
        assert example.cut is not None, "a whole document refused as malformed"
    else:
        refused = False
        assert not deep, "decoded past the depth limit"
        assert decoded == json.loads(body)
    payload = decode_payload(body)
    if refused:
        assert payload == body.decode("utf-8", "replace")
    else:
        assert payload == decoded


# --- target: the webhook endpoint (needs a running daemon) --------------------------------------

MAX_BODY: Final = 64 * 1024
_HOOKS: Final = ("fuzz", "hostile")


@dataclass(frozen=True)
class HookRequest:
    method: str
    hook: str
    auth: str | None
    content_type: str | None
    body: bytes
    extra: tuple[tuple[str, str], ...]


_CONTENT_TYPES: Final = (
    "application/json",
    "application/json; charset=utf-8",
    "application/vnd.alert+json",
    "application/x-www-form-urlencoded",
    "text/plain",
    "text/xml",
    "multipart/form-data; boundary=x",
    "",
)
_header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
).map(lambda s: s.strip(" \t"))  # HTTP trims them; h11 refuses to send them
hook_example = st.builds(
    HookRequest,
    method=st.sampled_from(["POST"] * 8 + ["GET", "PUT", "DELETE", "PATCH"]),
    hook=st.one_of(
        st.sampled_from([*_HOOKS, "nosuch", "FUZZ", "fuzz.x"]),
        st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20).filter(
            lambda s: "/" not in s and s.strip(".") != "" and "\\" not in s and "?" not in s
        ),
    ),
    auth=st.one_of(
        st.just(f"Bearer {TOKEN}"),
        st.just(f"bearer  {TOKEN}"),
        st.none(),
        st.sampled_from([f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer"]),
        _header_text,
    ),
    content_type=st.one_of(st.none(), st.sampled_from(_CONTENT_TYPES), _header_text),
    body=st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),
        nested_example.map(lambda n: n.body),
        st.dictionaries(hostile_text, hostile_text, max_size=4).map(
            lambda d: "&".join(
                f"{quote(_clean(k))}={quote(_clean(v))}" for k, v in d.items()
            ).encode()
        ),
        st.binary(max_size=300),
        hostile_text.map(lambda s: _encode(s)),
        st.integers(MAX_BODY - 2, MAX_BODY + 2).map(lambda n: b"x" * n),
    ),
    extra=st.lists(
        st.tuples(
            st.sampled_from(["X-Fuzz", "User-Agent", "X-Forwarded-For", "Cookie"]), _header_text
        ),
        max_size=3,
    ).map(tuple),
)


def _clean(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def _expected_status(request: HookRequest) -> int:
    if request.method != "POST":
        return 405
    scheme, _, given = (request.auth or "").partition(" ")
    if scheme.lower() != "bearer" or given.strip() != TOKEN:
        return 401
    if request.hook not in _HOOKS:
        return 404
    if len(request.body) > MAX_BODY:
        return 413
    media = (request.content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        if reference_depth(request.body) > jsonlimits.MAX_DEPTH:
            return 400
        try:
            json.loads(request.body)
        except ValueError:
            return 400
    if media == "application/x-www-form-urlencoded":
        try:
            text = request.body.decode("utf-8")
            parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
        except ValueError:
            return 400
    return 202


def webhook_check(base_url: str) -> Callable[[HookRequest], None]:
    """The check for the webhook target, against a daemon at ``base_url``: every request gets
    the status it should, refusals carry a JSON error, and nothing answers 5xx."""
    client = httpx.Client(base_url=base_url, timeout=10)

    def check(request: HookRequest) -> None:
        # Header values go as Latin-1 bytes, as a raw client could send them.
        headers = {k.encode(): v.encode("latin-1") for k, v in request.extra}
        if request.auth is not None:
            headers[b"Authorization"] = request.auth.encode("latin-1")
        if request.content_type is not None:
            headers[b"Content-Type"] = request.content_type.encode("latin-1")
        answer = client.request(
            request.method, "/hooks/" + quote(request.hook, safe=""), content=request.body,
            headers=headers,
        )  # fmt: skip
        expected = _expected_status(request)
        assert answer.status_code == expected, (
            f"{answer.status_code} (expected {expected}): {answer.text[:200]}"
        )
        if expected == 202:
            assert answer.json()["event"]
        elif expected != 405:
            error = answer.json()["error"]
            assert isinstance(error, str) and error

    check.client = client  # type: ignore[attr-defined]
    return check


# --- the daemon, on its own loop in a thread ----------------------------------------------------


def daemon_config(fleet: Fleet, mqtt_url: str | None = None) -> dict[str, Any]:
    """One phone; a rule that feeds hostile payload fields into every template it has; with
    ``mqtt_url``, two rules telling apart what MQTT payloads rules saw as JSON and as text."""
    data: dict[str, Any] = {
        "webhook": {"token": TOKEN},
        "server": {"listen": "127.0.0.1:0", "max_body": MAX_BODY},
        "phones": [{"name": "desk", "host": fleet.phones[0].address}],
        "rules": [
            {
                "name": "hostile",
                "on": "webhook:hostile",
                "to": "desk",
                "execute": ["Dial:{{ payload.n }}", "Play:{{ payload.p }}"],
                "message": {"title": "{{ payload.t }}", "text": "{{ payload.x }}"},
                "ttl": "30s",
            },
            {
                # Matches (almost) nothing: the webhook fuzz exercises intake, not the phone.
                "name": "fuzz",
                "on": "webhook:fuzz",
                "when": "payload is mapping and payload.go == 'go-go-go'",
                "to": "desk",
                "execute": ["Play:Chime.raw"],
            },
        ],
    }
    if mqtt_url is not None:
        data["mqtt"] = {"url": mqtt_url}
        for name, when in (
            ("mqtt-json", "payload is not string"),
            ("mqtt-text", "payload is string"),
        ):
            rule = {"on": f"mqtt:{MQTT_TOPIC}", "to": "desk", "execute": ["Key:Headset"]}
            data["rules"].append({"name": name, "when": when, **rule})
    return data


class _LoopThread(abc.ABC):
    """An event loop in a thread for synchronous hypothesis tests and the bench script:
    :meth:`_serve` sets things up, then :meth:`_serving` until the ``with`` block ends.
    An error before that is raised in the thread that entered."""

    _name = "loop"

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError(f"{self._name} did not start in 20 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self._serve()

    async def _serving(self) -> None:
        """Say ready, then wait for the end of the ``with`` block."""
        assert self._stop is not None
        self._ready.set()
        await self._stop.wait()

    @abc.abstractmethod
    async def _serve(self) -> None: ...


class BackgroundDaemon(_LoopThread):
    """The real daemon and one simulated phone on an event loop in a thread, so synchronous
    hypothesis tests and the bench script can drive them over real sockets."""

    _name = "daemon-loop"

    def __init__(self, tmp: Path, mqtt_url: str | None = None) -> None:
        super().__init__()
        self._tmp = tmp
        self._mqtt_url = mqtt_url
        self.runner: DaemonRunner
        self.fleet: Fleet

    @property
    def url(self) -> str:
        return self.runner.url

    async def _serve(self) -> None:
        async with Fleet(1, names=["desk"], tone_ms=1) as fleet:
            runner = DaemonRunner(self._tmp)
            data = daemon_config(fleet, self._mqtt_url)
            data["server"] = dict(data["server"], listen=f"127.0.0.1:{runner.port}")
            await runner.start(data)
            self.runner, self.fleet = runner, fleet
            try:
                await self._serving()
            finally:
                await runner.stop()

    def events(self, source: str, rule: str) -> float:
        return self.runner.metric("phonepush_events_total", source=source, rule=rule)

    def delivered(self) -> float:
        return sum(
            self.runner.metric("phonepush_deliveries_total", phone="desk", result=result)
            for result in ("delivered", "failed", "expired")
        )


@contextlib.contextmanager
def running_daemon(tmp: Path, mqtt_url: str | None = None) -> Iterator[BackgroundDaemon]:
    with BackgroundDaemon(tmp, mqtt_url) as daemon:
        yield daemon


# --- target: MQTT payloads nested deep (needs a running daemon and broker) ---------------------

MQTT_TOPIC: Final = "fuzz/depth"


def mqtt_depth_check(daemon: BackgroundDaemon, broker: Broker) -> Callable[[Nested], None]:
    """The check for MQTT payloads of any depth: each is taken (never an intake failure), and
    rules see JSON up to the depth limit, the text beyond it or when it is not JSON."""

    def taken() -> tuple[float, float]:
        return daemon.events("mqtt", "mqtt-json"), daemon.events("mqtt", "mqtt-text")

    def too_large() -> float:
        return daemon.runner.metric(
            "phonepush_events_rejected_total", source="mqtt", reason="too_large"
        )

    def check(example: Nested) -> None:
        body = example.body
        before, failures, refused = taken(), _mqtt_failures(daemon), too_large()
        broker.publish(MQTT_TOPIC, body)
        deadline = time.monotonic() + 10
        if len(body) > MqttConfig.model_fields["max_payload"].default:
            # Deep and long: over mqtt.max_payload, refused unread before any decoding.
            while too_large() == refused:
                assert time.monotonic() < deadline, "the oversized payload was not counted"
                time.sleep(0.002)
            assert taken() == before, "an oversized payload was taken"
            check.refused += 1  # type: ignore[attr-defined]
            return
        while taken() == before:
            assert _mqtt_failures(daemon) == failures, "the payload failed intake"
            assert time.monotonic() < deadline, "the event was not taken in 10 s"
            time.sleep(0.002)
        json_seen = taken()[0] > before[0]
        assert json_seen == _rules_see_json(body), f"rules saw {'JSON' if json_seen else 'text'}"
        check.taken += 1  # type: ignore[attr-defined]

    check.taken = 0  # type: ignore[attr-defined]
    check.refused = 0  # type: ignore[attr-defined]
    return check


def _rules_see_json(body: bytes) -> bool:
    """Whether rules should see ``body`` as parsed JSON other than a string (the oracle)."""
    if reference_depth(body) > jsonlimits.MAX_DEPTH:
        return False
    try:
        return not isinstance(json.loads(body), str)
    except ValueError:
        return False


def _mqtt_failures(daemon: BackgroundDaemon) -> float:
    return daemon.runner.metric("phonepush_events_rejected_total", source="mqtt", reason="error")


# --- the end-to-end structural property ---------------------------------------------------------


@dataclass(frozen=True)
class HostileEvent:
    """Four payload fields, each either a string (sent as JSON) or raw bytes pasted into the JSON
    string literal (non-UTF-8, or breaking the JSON on purpose)."""

    fields: tuple[tuple[str, str | bytes], ...]

    def body(self) -> bytes:
        parts = []
        for key, value in self.fields:
            literal = value if isinstance(value, bytes) else json.dumps(value).encode()[1:-1]
            parts.append(b'"%s": "%s"' % (key.encode(), literal))
        return b"{" + b", ".join(parts) + b"}"


_field_value = st.one_of(
    hostile_text,
    st.text(st.sampled_from(list("0123456789#*ABCD,")), min_size=1, max_size=20),
    st.sampled_from(["911", "Chime.raw", "5551234", "Alarm.raw", "", " 42 "]),
    st.binary(max_size=20),
)
# Valid dial strings and tone names most of the time, so both outcomes (pushed, refused) are common.
_valid_dial = st.text(st.sampled_from(list("0123456789#*ABCD,")), min_size=1, max_size=30)
_valid_tone = st.from_regex(r"[A-Za-z0-9._-]{1,25}", fullmatch=True)


def _mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # one_of() of repeated branches does not weight them; pick the branch by a number instead.
    return st.integers(0, 4).flatmap(lambda i: rare if i == 4 else common)


_dial = _mostly(_valid_dial, _field_value)
_tone = _mostly(_valid_tone, _field_value)
_text_field = _mostly(hostile_text, st.binary(max_size=20))
hostile_event = st.builds(
    lambda n, p, t, x: HostileEvent((("n", n), ("p", p), ("t", t), ("x", x))),
    _dial,
    _tone,
    _text_field,
    _text_field,
)


def _expected_uri(kind: str, value: Any) -> str | None:
    rendered = f"{kind}:{value if isinstance(value, str) else ''}".strip()
    try:
        return validate_uri(rendered)
    except WireError:
        return None


def _no_surrogates(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)


def _line_ends(text: str) -> str:
    # An XML parser reads a literal CR in text content as LF.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def structure_check(daemon: BackgroundDaemon) -> Callable[[HostileEvent], None]:
    """The check of the end-to-end property: post the event, then parse what the phone got."""
    client = httpx.Client(
        base_url=daemon.url, timeout=10, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    phone = daemon.fleet.phones[0]
    pages_prefix = f"{daemon.url}/pages/"

    def check(event: HostileEvent) -> None:
        body = event.body()
        payload = decode_payload(body)
        fields: Mapping[str, Any] = payload if isinstance(payload, dict) else {}
        # JSON can carry lone surrogates ("\\ud800"); rules see them as U+FFFD.
        fields = {k: _no_surrogates(v) for k, v in fields.items()}
        dial = _expected_uri("Dial", fields.get("n"))
        play = _expected_uri("Play", fields.get("p"))
        before_pushes = phone.state.pushes
        before_done = daemon.delivered()
        answer = client.post("/hooks/hostile", content=body, headers={"Content-Type": "text/plain"})
        if len(body) > MAX_BODY:
            assert answer.status_code == 413 and phone.state.pushes == before_pushes
            return
        assert answer.status_code == 202, answer.text
        event_id = answer.json()["event"]
        deadline = time.monotonic() + 10
        while daemon.delivered() == before_done:
            assert time.monotonic() < deadline, "the delivery did not finish in 10 s"
            time.sleep(0.002)
        pushes = phone.state.pushes - before_pushes
        if dial is None or play is None:
            assert pushes == 0, "a rule that failed to render still pushed"
            assert daemon.runner.metric("phonepush_deliveries_total", phone="desk", result="failed")
            return
        records = list(phone.state.requests)[-pushes:] if pushes else []
        got: list[ExecuteItem] = []
        for record in records:
            got.extend(_strict_execute_items(record["xml"]))
        assert len(got) == 3, f"expected 3 items, the phone got {got!r}"
        page_url = got[0].url
        assert page_url.startswith(pages_prefix + event_id) and got[0].priority == 0
        assert got[1:] == [ExecuteItem(dial, 0), ExecuteItem(play, 0)]
        # The page the phone fetched says exactly what the event said, sanitized.
        page = client.get(page_url.removeprefix(daemon.url))
        title, text = _strict_text_page(page.content)
        expected_title = sanitize_text(fields.get("t") or "", cisco.MAX_TITLE)
        assert title == _line_ends(expected_title)
        assert text == _line_ends(sanitize_text(fields.get("x") or "", cisco.MAX_TEXT))
        assert phone.state.screen.url == page_url and phone.state.screen.text == text
        check.pushed += 1  # type: ignore[attr-defined]

    check.client = client  # type: ignore[attr-defined]
    check.pushed = 0  # type: ignore[attr-defined]
    return check


def _strict_execute_items(xml: str) -> list[ExecuteItem]:
    """The items of a pushed CiscoIPPhoneExecute, asserting there is nothing else in it."""
    root = etree.fromstring(
        xml.encode("utf-8"), etree.XMLParser(resolve_entities=False, no_network=True)
    )
    assert root.tag == "CiscoIPPhoneExecute"
    assert not (root.text or "").strip()
    items = []
    for child in root.iterchildren():
        assert isinstance(child.tag, str), "a comment or processing instruction in a push"
        assert child.tag == "ExecuteItem" and sorted(child.keys()) == ["Priority", "URL"]
        assert len(child) == 0 and not (child.text or "").strip() and not (child.tail or "").strip()
        items.append(ExecuteItem(child.get("URL", ""), int(child.get("Priority", "-1"))))
    assert 1 <= len(items) <= 3
    assert len(xml.encode("utf-8")) <= cisco.MAX_PUSH_BYTES
    return items


def _strict_text_page(xml: bytes) -> tuple[str, str]:
    root = etree.fromstring(xml, etree.XMLParser(resolve_entities=False, no_network=True))
    assert root.tag == "CiscoIPPhoneText"
    tags = [child.tag for child in root.iterchildren()]
    assert tags in (["Text"], ["Title", "Text"]), tags
    for child in root.iterchildren():
        assert len(child) == 0, "markup inside a page field"
    return root.findtext("Title") or "", root.findtext("Text") or ""


TARGETS: Final = (
    Target("response", response_example, check_response, "phone-response parser"),
    Target("uri", uri_example, check_uri, "URI validator and push round trip"),
    Target("template", template_example, check_template, "template compile and render"),
    Target("silence", silence_example, check_silence, "silence matcher parse and match"),
    Target("depth", nested_example, check_nested, "bounded JSON decoder and event payloads"),
)

# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_fuzz_pure_targets(target: Target) -> None:
    _FUZZ_SETTINGS(given(target.strategy)(target.check))()


@pytest.fixture(scope="module")
def background_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundDaemon]:
    with running_daemon(tmp_path_factory.mktemp("hostile")) as daemon:
        yield daemon


def test_fuzz_webhook_endpoint(background_daemon: BackgroundDaemon) -> None:
    check = webhook_check(background_daemon.url)
    with check.client:  # type: ignore[attr-defined]
        _FUZZ_SETTINGS(given(hook_example)(check))()
        # After all that, the daemon still serves and is ready.
        assert check.client.get("/readyz").status_code == 200  # type: ignore[attr-defined]


def test_fuzz_silences_api(background_daemon: BackgroundDaemon) -> None:
    check = silences_api_check(background_daemon.url)
    with check.client:  # type: ignore[attr-defined]
        _FUZZ_SETTINGS(given(silences_example)(check))()
        assert check.client.get("/api/silences").json() == []  # type: ignore[attr-defined]


def test_fuzz_mqtt_payload_depth(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: Broker
) -> None:
    with running_daemon(tmp_path_factory.mktemp("mqtt-depth"), mqtt_url=mosquitto.url) as daemon:
        check = mqtt_depth_check(daemon, mosquitto)
        settings(_FUZZ_SETTINGS, max_examples=60)(given(nested_example)(check))()
    # Every example was either taken or, over mqtt.max_payload, refused; most are taken.
    assert check.taken + check.refused >= 60  # type: ignore[attr-defined]
    assert check.taken > check.refused  # type: ignore[attr-defined]


def test_no_payload_changes_the_xml_a_phone_receives(background_daemon: BackgroundDaemon) -> None:
    check = structure_check(background_daemon)
    with check.client:  # type: ignore[attr-defined]
        settings(_FUZZ_SETTINGS, max_examples=100)(given(hostile_event)(check))()
    # Both outcomes were exercised: hostile fields refused, and pushes checked item by item.
    assert check.pushed >= 10  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "fields",
    [
        {"n": '911" /><ExecuteItem URL="Key:Services', "p": "Chime.raw", "t": "x", "x": "y"},
        {"n": "911", "p": "Chime.raw", "t": '"/><ExecuteItem URL="Dial:1"/>', "x": "</Text>&"},
        {"n": "911", "p": "Chime.raw", "t": "<Title>", "x": "]]><!--<?pi?>&lt;&#0;"},
        {"n": "911", "p": "Chime.raw", "t": "\ud800\udfff", "x": "a\x00b\x1bc\rd\ufffe"},
        {"n": "911\nDial:112", "p": "Chime.raw", "t": "t", "x": "x"},
        {"n": "911", "p": "Chime.raw%22%3E", "t": "t", "x": "x"},
        {"n": "911", "p": "Chime.raw", "t": "T" * 5000, "x": "<>&'\"" * 3000},
    ],
)
def test_known_injection_payloads(
    background_daemon: BackgroundDaemon, fields: dict[str, str]
) -> None:
    check = structure_check(background_daemon)
    with check.client:  # type: ignore[attr-defined]
        check(HostileEvent(tuple(fields.items())))


def test_non_utf8_payload_bytes(background_daemon: BackgroundDaemon) -> None:
    check = structure_check(background_daemon)
    with check.client:  # type: ignore[attr-defined]
        check(
            HostileEvent(
                (
                    ("n", "911"),
                    ("p", "Chime.raw"),
                    ("t", b"\xff\xfe\xc3("),
                    ("x", b"\x80\xed\xa0\x80"),
                )
            )
        )


# --- phones that answer with attacks ------------------------------------------------------------


class _HostilePhone:
    """A TCP server on 127.0.0.1 that answers every request with one fixed, hostile answer."""

    def __init__(self, head: bytes, body: bytes | None, *, endless: bool = False) -> None:
        self._head, self._body, self._endless = head, body, endless
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _HostilePhone:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self._head)
            if self._endless:
                writer.write(self._body or b"")
                chunk = b"<a>" * 10_000
                for _ in range(2000):  # 60 MB at most; the client must stop long before
                    writer.write(chunk)
                    await writer.drain()
            elif self._body is not None:
                writer.write(self._body)
            await writer.drain()
        writer.close()


def _answer(body: bytes, content_type: str = "text/xml", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    "attack",
    [_ATTACKS[0], _ATTACKS[1], _ATTACKS[2], _ATTACKS[3], _ATTACKS[4], _ATTACKS[5]],
    ids=["xxe-file", "xxe-network", "parameter-entity", "billion-laughs", "oversized", "deep"],
)
async def test_hostile_phone_answers_are_refused_over_a_real_socket(
    attack: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # As an error object the answer must be read, and is refused unexpanded ...
    error = attack.replace(b"CiscoIPPhoneResponse", b"CiscoIPPhoneError")
    async with _HostilePhone(_answer(error), None) as hostile:
        target = PhoneTarget("evil", "127.0.0.1", hostile.port, timeout=5)
        async with PhoneClient(target) as client:
            with pytest.raises((PhoneBadResponse, PhoneHTTPError)) as caught:
                await client.execute([ExecuteItem("Play:Chime.raw")])
    message = str(caught.value)
    assert "root:" not in message and "lollol" not in message
    assert caught.value.phone == "evil"
    # ... and so is the same attack in a response object.
    with caplog.at_level(logging.DEBUG):
        async with _HostilePhone(_answer(attack), None) as hostile:
            target = PhoneTarget("evil", "127.0.0.1", hostile.port, timeout=5)
            async with PhoneClient(target) as client:
                with pytest.raises(PhoneBadResponse) as caught:
                    await client.execute([ExecuteItem("Play:Chime.raw")])
    assert "root:" not in str(caught.value) + caplog.text
    assert "lollol" not in str(caught.value) + caplog.text


async def test_an_endless_answer_is_cut_at_the_cap_and_refused() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nConnection: close\r\n\r\n"
    # An error object: what is cut is read (any other 2xx answer is success unread).
    async with _HostilePhone(head, b"<CiscoIPPhoneError>", endless=True) as hostile:
        target = PhoneTarget("evil", "127.0.0.1", hostile.port, timeout=5)
        async with PhoneClient(target) as client:
            with pytest.raises(PhoneBadResponse, match="over the 65536-byte limit"):
                await client.execute([ExecuteItem("Play:Chime.raw")])


async def test_a_compressed_bomb_is_never_decompressed() -> None:
    import gzip

    bomb = gzip.compress(b'<CiscoIPPhoneResponse Data="' + b"A" * 20_000_000 + b'"/>')
    async with _HostilePhone(_answer(bomb, extra="Content-Encoding: gzip\r\n"), None) as hostile:
        target = PhoneTarget("evil", "127.0.0.1", hostile.port, timeout=5)
        async with PhoneClient(target) as client:
            with pytest.raises(PhoneBadResponse, match="malformed XML"):
                await client.execute([ExecuteItem("Play:Chime.raw")])


# --- configuration with errors ------------------------------------------------------------------

_BAD_CONFIGS: Final = [
    ('[server]\nlisten = "127.0.0.1:99999"\n', "server.listen"),
    ('[server]\nlisen = "127.0.0.1:8080"\n', "server.lisen: unknown key"),
    ('[[phones]]\nname = "a"\nhost = "bad host"\n', "phones[a].host"),
    ('[[phones]]\nname = "a"\nhost = "10.0.0.1"\npasword = "x"\n', "phones[a].pasword"),
    (
        '[[phones]]\nname = "a"\nhost = "10.0.0.1"\n[[rules]]\nname = "r"\non = "webhook:x"\n'
        'to = "a"\nexecute = ["Dial:{{ payload.n "]\n',
        "rules[r].execute[0]",
    ),
    (
        '[[phones]]\nname = "a"\nhost = "10.0.0.1"\n[[rules]]\nname = "r"\non = "webhook:x"\n'
        'to = "a"\nexecute = ["Dial:911"]\nwhen = "payload =="\n',
        "rules[r].when",
    ),
    ('[server]\nlisten = "0.0.0.0:8080"\npublic_url = "http://10.0.0.5:8080"\n', "webhook.token"),
    ("[server\n", "not valid TOML"),
    ("[webhook]\ntoken = 12345\n", "webhook.token"),
    ('[spool]\nsynchronous = "sometimes"\n', "spool.synchronous"),
    ('[mqtt]\nurl = "mqtt://user:hunter2@broker"\n', "mqtt.url"),
]


@pytest.mark.parametrize(("text", "key"), _BAD_CONFIGS, ids=[k for _, k in _BAD_CONFIGS])
@pytest.mark.parametrize("command", ["run", "check"])
def test_config_errors_exit_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, text: str, key: str
) -> None:
    from phonepush.cli import main

    path = tmp_path / "phonepush.toml"
    path.write_text(text)
    assert main([command, "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert key in captured.err, captured.err
    assert "hunter2" not in captured.err + captured.out
    assert "Traceback" not in captured.err


def test_config_error_exit_code_from_the_real_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "phonepush.toml"
    path.write_text("[server]\nmax_body = 10\n")
    result = subprocess.run(
        [sys.executable, "-m", "phonepush", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "server.max_body" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "example",
    [
        # Found by bench/fuzz.py: escaped as OSError / RecursionError / SyntaxError.
        ("{{ payload.when | datetime }}", {"when": -(2**62)}, False),
        ("{{ payload.when | datetime }}", {"when": 1e18}, False),
        ("-x" * 400, {}, True),
        ("{{ " + "(" * 300 + "1" + ")" * 300 + " }}", {}, False),
        ("{{ x" + ".a" * 5000 + " }}", {}, False),
    ],
)
def test_template_cases_found_by_fuzzing(example: tuple[str, dict[str, Any], bool]) -> None:
    check_template(example)


# --- MQTT payload sizes (mqtt.max_payload) ------------------------------------------------------

#: The limit the MQTT fuzz runs with: small, so cases around it are quick to publish.
MQTT_LIMIT: Final = 4096


def _mqtt_sizes() -> st.SearchStrategy[int]:
    from phonepush.sources.mqtt import packet_cap

    cap = packet_cap(MQTT_LIMIT)
    return st.one_of(
        st.integers(0, 3 * MQTT_LIMIT),
        st.integers(MQTT_LIMIT - 3, MQTT_LIMIT + 3),
        st.sampled_from(
            [0, 1, MQTT_LIMIT, MQTT_LIMIT + 1, 65536, 65537, cap - 256, cap + 1, 3 * cap]
        ),
    )


#: Payload sizes around ``MQTT_LIMIT`` and around the Maximum Packet Size asked of the broker.
mqtt_size_example = st.deferred(_mqtt_sizes)


class BackgroundMqtt(_LoopThread):
    """The real MQTT source (paho, QoS 1, MQTT 5) on an event loop in a thread, against a real
    broker, with ``mqtt.max_payload = MQTT_LIMIT``; what it accepts lands in :attr:`accepted`.

    :meth:`check` publishes one payload of the given size and checks the outcome: taken whole
    at or under the limit; over it, acknowledged and counted ``too_large`` and never taken;
    over the Maximum Packet Size, dropped by the broker (its log says so) and never seen."""

    _name = "mqtt-fuzz"

    def __init__(
        self, broker_url: str, broker_log: Callable[[], str], publish: Callable[..., None]
    ):
        import queue

        super().__init__()
        self._url = broker_url
        self._broker_log = broker_log
        self._publish = publish
        self.accepted: queue.Queue[Event] = queue.Queue()
        self._cases = 0
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()

    async def _serve(self) -> None:
        from phonepush.config import MqttConfig
        from phonepush.metrics import Metrics
        from phonepush.sources.mqtt import MqttSource

        async def accept(event: Event) -> None:
            self.accepted.put(event)

        config = MqttConfig(url=self._url, client_id="fuzz-sizes", max_payload=MQTT_LIMIT)
        source = MqttSource(
            config, filters=["fuzz/#"], accept=accept, metrics=Metrics(self.registry)
        )
        async with source, asyncio.TaskGroup() as tasks:
            runner = tasks.create_task(source.run())
            while not source.connected:
                await asyncio.sleep(0.01)
            await self._serving()
            runner.cancel()

    def _too_large(self) -> float:
        value = self.registry.get_sample_value(
            "phonepush_events_rejected_total", {"source": "mqtt", "reason": "too_large"}
        )
        return value or 0.0

    def _drops(self) -> int:
        return self._broker_log().count("Dropping too large outgoing PUBLISH")

    def check(self, size: int) -> None:
        import queue

        from phonepush.sources.mqtt import packet_cap

        self._cases += 1
        topic = f"fuzz/{self._cases}"
        payload = (b'{["\x00\xff' * (size // 5 + 1))[:size]
        rejected = self._too_large()
        beyond_cap = size + len(topic) + 64 >= packet_cap(MQTT_LIMIT)
        # The broker's log is read only for the cases that need it: it grows with every case.
        dropped = self._drops() if beyond_cap else 0
        self._publish(topic, payload)
        deadline = time.monotonic() + 10
        if size <= MQTT_LIMIT:
            event = self.accepted.get(timeout=10)
            assert event.topic == topic and event.payload == payload, (event.topic, size)
        elif not beyond_cap:
            while self._too_large() == rejected:
                assert time.monotonic() < deadline, f"{size} bytes neither taken nor counted"
                time.sleep(0.005)
        else:
            while self._drops() == dropped:
                assert time.monotonic() < deadline, f"{size} bytes not dropped by the broker"
                time.sleep(0.01)
        assert self._too_large() in (rejected, rejected + 1)
        with contextlib.suppress(queue.Empty):
            extra = self.accepted.get_nowait()
            raise AssertionError(f"taken although over the limit: {len(extra.payload)} bytes")


def test_fuzz_mqtt_payload_sizes(mosquitto: Any) -> None:
    with BackgroundMqtt(mosquitto.url, lambda: mosquitto.log_text, mosquitto.publish) as mqtt:
        settings(_FUZZ_SETTINGS, max_examples=60)(given(mqtt_size_example)(mqtt.check))()
