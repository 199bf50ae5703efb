"""The CiscoIPPhone XML objects: what we push, what phones answer, what phones fetch.

Builders return ``str`` documents with the UTF-8 prolog (without it a phone assumes its locale's
charset). Every attribute value and text node goes through :func:`_escape`. Parsers take ``bytes``
and use one hardened lxml parser: no entity resolution, no DTD, no network, bounded input.

Phones' limits we enforce here (see ``docs/design.md`` for the sources):

* a pushed XML body is at most :data:`MAX_PUSH_BYTES` (512) bytes of UTF-8;
* a CiscoIPPhoneExecute holds 1-3 items; :func:`pack` splits longer lists into several requests,
  with at most one ``http(s)`` item in each (Cisco: a phone fetches one URL per request);
* CiscoIPPhoneText: Title and Prompt 32 characters, Text 4000, up to 8 softkeys. Event data that
  overflows a page is truncated, marked ``...``, rather than refused: a cut-off alert text is more
  use to someone at a desk than no page at all. URLs are never cut; an overlong one is refused.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlencode

from lxml import etree

from phonepush.errors import (
    MalformedPush,
    PhoneAuthError,
    PhoneBadResponse,
    PhoneError,
    PhoneHTTPBusy,
    PhoneHTTPError,
    PhoneRejected,
    TooLarge,
    WireError,
)
from phonepush.wire.uri import MAX_URL_LENGTH, ExecuteItem, is_http, validate_uri

_log = logging.getLogger("phonepush.cisco")

__all__ = [
    "CUT",
    "DEVICE_INFORMATION_PATH",
    "MAX_PUSH_BYTES",
    "MAX_RESPONSE_BYTES",
    "PROLOG",
    "BackgroundPush",
    "DeviceInfo",
    "ExecutePush",
    "Push",
    "ResponseItem",
    "RingTonePush",
    "SoftKey",
    "TextPage",
    "background_xml",
    "error_xml",
    "execute_xml",
    "form_body",
    "pack",
    "parse_device_information",
    "parse_push",
    "parse_response",
    "parse_text",
    "response_xml",
    "ringtone_xml",
    "sanitize_text",
    "text_xml",
]

PROLOG: Final = '<?xml version="1.0" encoding="UTF-8"?>'
MAX_PUSH_BYTES: Final = 512
MAX_ITEMS: Final = 3
#: What we read of a phone's answer; real answers are a few hundred bytes.
MAX_RESPONSE_BYTES: Final = 64 * 1024
MAX_TITLE: Final = 32
MAX_TEXT: Final = 4000
MAX_SOFTKEYS: Final = 8
#: Marks text cut to a phone's limit: ASCII, since not every phone font has U+2026.
CUT: Final = "..."

_XML_ESCAPES: Final = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"}
)
# Characters XML 1.0 cannot carry at all, plus the C0/C1 controls a phone shows as garbage.
_NOT_XML: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def _escape(value: str) -> str:
    # XML's five predefined entities, the ones Cisco's notes list; &apos; rather than the
    # reference client's numeric &#x27; (html.escape), which is not among them.
    return value.translate(_XML_ESCAPES)


def sanitize_text(value: str, limit: int) -> str:
    """Drop characters a phone cannot show (control characters but CR, LF, tab), turn CR LF and
    CR into LF, and cut to ``limit`` characters, marking a cut with :data:`CUT`."""
    # Line ends as an XML parser hands them to the phone, so the limit counts what it shows.
    value = _NOT_XML.sub("", value).replace("\r\n", "\n").replace("\r", "\n")
    if len(value) > limit:
        # A limit too small for the marker (no phone field is) cuts without one.
        value = value[: limit - len(CUT)] + CUT if limit > len(CUT) else value[:limit]
    return value


def _check_size(xml: str) -> str:
    size = len(xml.encode("utf-8"))
    if size > MAX_PUSH_BYTES:
        raise TooLarge(f"XML body is {size} bytes; a phone takes at most {MAX_PUSH_BYTES}")
    return xml


def _check_url(url: str, what: str) -> str:
    if len(url) > MAX_URL_LENGTH:
        raise TooLarge(f"{what} is {len(url)} characters; a phone takes at most {MAX_URL_LENGTH}")
    if not is_http(url) or _NOT_XML.search(url) or any(c.isspace() for c in url):
        raise WireError(f"{what} must be an http:// or https:// URL: {url!r}")
    scheme, sep, rest = url.partition("://")
    return scheme.lower() + sep + rest


# --- what we push -------------------------------------------------------------------------------


def execute_xml(items: Sequence[ExecuteItem]) -> str:
    """A CiscoIPPhoneExecute with 1-3 validated items, refused if over 512 bytes."""
    if not 1 <= len(items) <= MAX_ITEMS:
        raise WireError(f"a CiscoIPPhoneExecute holds 1-{MAX_ITEMS} items, not {len(items)}")
    parts = [PROLOG, "<CiscoIPPhoneExecute>"]
    for item in items:
        url = validate_uri(item.url)
        if item.priority not in (0, 1, 2):
            raise WireError(f"Invalid priority: {item.priority}")
        parts.append(f'<ExecuteItem URL="{_escape(url)}" Priority="{item.priority}" />')
    parts.append("</CiscoIPPhoneExecute>")
    return _check_size("".join(parts))


def background_xml(icon: str, image: str) -> str:
    """A setBackground object (icon and full-size image, both http(s) URLs)."""
    icon = _check_url(icon, "icon URL")
    image = _check_url(image, "image URL")
    return _check_size(
        f"{PROLOG}<setBackground><background><icon>{_escape(icon)}</icon>"
        f"<image>{_escape(image)}</image></background></setBackground>"
    )


def ringtone_xml(url: str) -> str:
    """A setRingTone object (a raw µ-law file's http(s) URL)."""
    url = _check_url(url, "ring tone URL")
    return _check_size(f"{PROLOG}<setRingTone><ringTone>{_escape(url)}</ringTone></setRingTone>")


@functools.lru_cache(maxsize=64)
def form_body(xml: str) -> bytes:
    """The request body a phone expects: one urlencoded form field named ``XML``. Memoised: a
    fan-out sends the same object to every phone, and quoting it costs more than the lookup."""
    return urlencode({"XML": xml}).encode("ascii")


def pack(items: Iterable[ExecuteItem]) -> list[list[ExecuteItem]]:
    """Split items, in order, into requests a phone accepts: at most 3 items, at most one http(s)
    URL, and at most 512 bytes each. An item too large even alone raises :class:`TooLarge`."""
    batches: list[list[ExecuteItem]] = []
    current: list[ExecuteItem] = []
    for item in items:
        candidate = [*current, item]
        fits = (
            len(candidate) <= MAX_ITEMS
            and sum(is_http(i.url) for i in candidate) <= 1
            and _fits(candidate)
        )
        if fits:
            current = candidate
            continue
        if current:
            batches.append(current)
        execute_xml([item])  # raises if the item cannot be sent even on its own
        current = [item]
    if current:
        batches.append(current)
    return batches


def _fits(items: Sequence[ExecuteItem]) -> bool:
    try:
        execute_xml(items)
    except TooLarge:
        return False
    return True


# --- what a phone fetches -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SoftKey:
    """A ``SoftKeyItem``: label, URL (an internal ``SoftKey:`` URI or http(s)), position 1-8."""

    name: str
    url: str
    position: int


@dataclass(frozen=True, slots=True)
class TextPage:
    """A CiscoIPPhoneText page."""

    title: str = ""
    text: str = ""
    prompt: str = ""
    softkeys: tuple[SoftKey, ...] = field(default_factory=tuple)


def text_xml(page: TextPage) -> str:
    """Render a CiscoIPPhoneText: fields sanitized and cut to the phone's limits."""
    if len(page.softkeys) > MAX_SOFTKEYS:
        raise WireError(f"a page holds at most {MAX_SOFTKEYS} softkeys, not {len(page.softkeys)}")
    parts = [PROLOG, "<CiscoIPPhoneText>"]
    if page.title:
        parts.append(f"<Title>{_escape(sanitize_text(page.title, MAX_TITLE))}</Title>")
    if page.prompt:
        parts.append(f"<Prompt>{_escape(sanitize_text(page.prompt, MAX_TITLE))}</Prompt>")
    parts.append(f"<Text>{_escape(sanitize_text(page.text, MAX_TEXT))}</Text>")
    for key in page.softkeys:
        if not 1 <= key.position <= MAX_SOFTKEYS:
            raise WireError(f"softkey position must be 1-{MAX_SOFTKEYS}, not {key.position}")
        if len(key.url) > MAX_URL_LENGTH:
            raise TooLarge(f"softkey URL is longer than {MAX_URL_LENGTH} characters")
        parts.append(
            f"<SoftKeyItem><Name>{_escape(sanitize_text(key.name, MAX_TITLE))}</Name>"
            f"<URL>{_escape(key.url)}</URL><Position>{key.position}</Position></SoftKeyItem>"
        )
    parts.append("</CiscoIPPhoneText>")
    return "".join(parts)


# --- what a phone answers -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseItem:
    """One ``ResponseItem``: the URL executed, the phone's Data text and Status (0 = success)."""

    url: str
    data: str
    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0


def response_xml(items: Sequence[ResponseItem]) -> str:
    """A CiscoIPPhoneResponse, as a phone sends it (the simulator's answer)."""
    body = "".join(
        f'<ResponseItem URL="{_escape(i.url)}" Data="{_escape(i.data)}" Status="{i.status}" />'
        for i in items
    )
    return f"{PROLOG}<CiscoIPPhoneResponse>{body}</CiscoIPPhoneResponse>"


def error_xml(number: int, text: str = "") -> str:
    """A CiscoIPPhoneError, as a phone sends it."""
    return f'{PROLOG}<CiscoIPPhoneError Number="{number}">{_escape(text)}</CiscoIPPhoneError>'


# The encoding a document declares, read as ASCII (what the DTD check below can trust).
_DECLARED_ENCODING: Final = re.compile(
    rb"\A(?:\xef\xbb\xbf)?\s*<\?xml\s[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._\-]+)[\"']"
)
_LATIN1: Final = frozenset({"iso-8859-1", "iso8859-1", "latin1", "latin-1", "l1"})


def _parser(body: bytes) -> etree.XMLParser:
    # One parser per call: lxml parsers are not safe to share across threads, and this is cheap.
    # The encoding is forced to UTF-8 (or ISO-8859-1 when declared): left to libxml2, a UTF-16,
    # UTF-7 or EBCDIC document would hide "<!DOCTYPE" from the byte check in _parse_xml, and
    # libxml2 expands internal entities in attribute values even with resolve_entities=False.
    declared = _DECLARED_ENCODING.match(body)
    name = declared.group(1).decode("ascii").lower() if declared else ""
    return etree.XMLParser(
        encoding="iso-8859-1" if name in _LATIN1 else "utf-8",
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def _parse_xml(body: bytes, limit: int, error: type[Exception]) -> etree._Element:
    if len(body) > limit:
        raise error(f"XML of {len(body)} bytes is over the {limit}-byte limit")
    # A phone never sends a DTD; refusing any closes XXE and entity-expansion bombs outright.
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise error("XML with a DTD or entity declarations is refused")
    try:
        root = etree.fromstring(body, _parser(body))
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise error(f"malformed XML: {exc}") from exc
    if root is None:  # pragma: no cover - lxml raises on empty input
        raise error("empty XML document")
    return root


def _clip(text: str, limit: int = 80) -> str:
    """What a phone sent, cut short for an error message (they go to logs and the spool)."""
    return text if len(text) <= limit else text[: limit - len(CUT)] + CUT


def _accepted(body: bytes, content_type: str | None, status: int) -> list[ResponseItem]:
    _log.debug(
        "phone answered %d %s without receipts, taken as success: %r",
        status,
        _clip(content_type or "(no Content-Type)"),
        body[:64],
    )
    return []


def _http_error(status: int) -> PhoneError:
    if status == 401:
        return PhoneAuthError("HTTP 401")
    if status in (429, 503):
        return PhoneHTTPBusy(status)
    return PhoneHTTPError(status)


def parse_response(
    body: bytes, content_type: str | None, status: int = 200, *, receipts: bool = True
) -> list[ResponseItem]:
    """Read a phone's answer to a push.

    Returns the ResponseItems (in the phone's completion order). Any 2xx answer that is not a
    CiscoIPPhoneError is success: multiplatform (3PCC) firmware answers ``200 text/html``, some
    answer nothing, and the phone has taken the push either way; its first bytes go to the debug
    log, and the result is empty (no receipts). Only a ``text/xml`` answer that is not readable
    XML (garbage, a DTD, over the size limit) is not.

    Raises a :class:`~phonepush.errors.PhoneError`: :class:`PhoneRejected` /
    :class:`PhoneAuthError` for a CiscoIPPhoneError, whatever the HTTP status;
    :class:`PhoneHTTPBusy` for 503/429 and :class:`PhoneHTTPError` for another error status
    without one; :class:`PhoneBadResponse` for unreadable XML or an error object without a
    number. ``receipts`` is kept for callers; it no longer changes anything.
    """
    del receipts
    ok = 200 <= status < 300
    if not body.strip():
        if ok:
            return []
        raise _http_error(status)
    ctype = (content_type or "").strip()
    if ctype[:8].lower() != "text/xml":
        if not ok:
            raise _http_error(status)
        return _accepted(body, content_type, status)
    if ok and len(body) <= _MEMO_MAX:
        known = _response_items(body)
        if known is not None:
            return list(known)
    try:
        root = _parse_xml(body, MAX_RESPONSE_BYTES, PhoneBadResponse)
    except PhoneBadResponse:
        if not ok:
            raise _http_error(status) from None
        # It says XML and is not (or is hostile, or too long): a sick phone, or an error object
        # we cannot read. Written and not answered: unconfirmed.
        raise
    if root.tag == "CiscoIPPhoneError":
        number_text = root.get("Number", "")
        text = (root.text or "").strip()
        try:
            # A phone's error numbers are small: a huge one is garbage, not an error to report.
            if len(number_text) > 12:
                raise ValueError(number_text)
            number = int(number_text)
        except ValueError:
            raise PhoneBadResponse(
                f"CiscoIPPhoneError without a Number: {_clip(number_text)!r}"
            ) from None
        if number == 4:
            raise PhoneAuthError(text)
        raise PhoneRejected(number, text)
    if not ok:
        raise _http_error(status)
    if root.tag != "CiscoIPPhoneResponse":
        return _accepted(body, content_type, status)
    return _items(root)


#: Where a Cisco phone's web server describes the phone (no authentication).
DEVICE_INFORMATION_PATH: Final = "/DeviceInformationX"
#: Longest value kept from a DeviceInformation field: they become metric labels and JSON.
_INFO_MAX: Final = 64


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What ``GET /DeviceInformationX`` says of a phone ("" for a field it left out)."""

    model: str
    firmware: str
    mac: str
    host_name: str


def parse_device_information(
    body: bytes, content_type: str | None, status: int = 200
) -> DeviceInfo | None:
    """Read a phone's ``<DeviceInformation>`` document; ``None`` when the answer is not one (an
    error status, 404 from a phone without the page, HTML, unreadable or hostile XML): the
    phone answered, so it is there, it just did not describe itself."""
    if not 200 <= status < 300 or not body.strip():
        return None
    ctype = (content_type or "").strip().lower()
    # Some firmware serves the document as text/html; the root element decides.
    if ctype and not ctype.startswith(("text/xml", "application/xml", "text/html")):
        return None
    try:
        root = _parse_xml(body, MAX_RESPONSE_BYTES, PhoneBadResponse)
    except PhoneBadResponse:
        return None
    if root.tag != "DeviceInformation":
        return None

    def text(*names: str) -> str:
        for name in names:
            element = root.find(name)
            if element is not None and element.text:
                value = _NOT_XML.sub("", element.text).strip()
                if value:
                    return _clip(" ".join(value.split()), _INFO_MAX)
        return ""

    return DeviceInfo(
        model=text("modelNumber"),
        # versionID is the release people quote (e.g. 12.8(1)); appLoadID the load file's name.
        firmware=text("versionID", "appLoadID"),
        mac=text("MACAddress"),
        host_name=text("HostName"),
    )


def _items(root: etree._Element) -> list[ResponseItem]:
    items = []
    for element in root.iterfind("ResponseItem"):
        try:
            item_status = int(element.get("Status", "0"))
        except ValueError:
            item_status = -1
        items.append(ResponseItem(element.get("URL", ""), element.get("Data", ""), item_status))
    return items


#: Answers up to this size are memoised by :func:`_response_items`.
_MEMO_MAX: Final = 2048


@functools.lru_cache(maxsize=64)
def _response_items(body: bytes) -> tuple[ResponseItem, ...] | None:
    """The items of a 2xx ``text/xml`` CiscoIPPhoneResponse, or None for any other answer (left
    to :func:`parse_response`). Memoised because the phones of a fan-out answer the same bytes,
    and parsing costs more than the lookup; only this pure case is, so errors are built afresh
    each time and nothing is logged from here."""
    try:
        root = _parse_xml(body, MAX_RESPONSE_BYTES, PhoneBadResponse)
    except PhoneBadResponse:
        return None
    if root.tag != "CiscoIPPhoneResponse":
        return None
    return tuple(_items(root))


# --- what a phone receives (the simulator's side) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecutePush:
    items: tuple[ExecuteItem, ...]


@dataclass(frozen=True, slots=True)
class BackgroundPush:
    icon: str
    image: str


@dataclass(frozen=True, slots=True)
class RingTonePush:
    url: str


Push = ExecutePush | BackgroundPush | RingTonePush


def parse_push(xml: bytes) -> Push:
    """Parse a pushed object as a phone does.

    Raises :class:`MalformedPush` with ``number`` 1 (not well-formed XML) or 2 (well-formed, but
    not an object this phone can act on), the CiscoIPPhoneError a phone would answer.
    """
    try:
        root = _parse_xml(xml, 40 * 1024, WireError)
    except WireError as exc:
        raise MalformedPush(1, str(exc)) from exc
    return _frame(root)


def _framing(message: str) -> MalformedPush:
    return MalformedPush(2, message)


def _frame(root: etree._Element) -> Push:
    if root.tag == "CiscoIPPhoneExecute":
        items = []
        for child in root:
            if child.tag != "ExecuteItem" or set(child.keys()) - {"URL", "Priority"}:
                raise _framing(f"unexpected element or attribute in <{child.tag}>")
            url = child.get("URL")
            if url is None:
                raise _framing("ExecuteItem without URL")
            priority_text = child.get("Priority", "0")
            if priority_text not in ("0", "1", "2"):
                raise _framing(f"Priority must be 0, 1 or 2, not {priority_text!r}")
            items.append(ExecuteItem(url, int(priority_text)))
        if not 1 <= len(items) <= MAX_ITEMS:
            raise _framing(f"CiscoIPPhoneExecute holds {len(items)} items; 1-{MAX_ITEMS} allowed")
        return ExecutePush(tuple(items))
    if root.tag == "setBackground":
        background = root.find("background")
        icon = background.findtext("icon") if background is not None else None
        image = background.findtext("image") if background is not None else None
        if not icon or not image:
            raise _framing("setBackground needs background/icon and background/image")
        return BackgroundPush(icon.strip(), image.strip())
    if root.tag == "setRingTone":
        url = root.findtext("ringTone")
        if not url:
            raise _framing("setRingTone needs ringTone")
        return RingTonePush(url.strip())
    raise _framing(f"unknown object <{root.tag}>")


def parse_text(body: bytes) -> TextPage:
    """Parse a CiscoIPPhoneText as a phone does, enforcing its limits (WireError if broken)."""
    root = _parse_xml(body, 64 * 1024, WireError)
    if root.tag != "CiscoIPPhoneText":
        raise WireError(f"expected <CiscoIPPhoneText>, got <{root.tag}>")
    title = root.findtext("Title") or ""
    prompt = root.findtext("Prompt") or ""
    text = root.findtext("Text") or ""
    if len(title) > MAX_TITLE or len(prompt) > MAX_TITLE:
        raise WireError("Title and Prompt take at most 32 characters")
    if len(text) > MAX_TEXT:
        raise WireError("Text takes at most 4000 characters")
    if _NOT_XML.search(title + prompt + text):
        raise WireError("control characters in a text page")
    keys = []
    for element in root.iterfind("SoftKeyItem"):
        name = element.findtext("Name") or ""
        url = element.findtext("URL") or ""
        position_text = element.findtext("Position") or ""
        if not position_text.isdigit() or not 1 <= int(position_text) <= MAX_SOFTKEYS:
            raise WireError(f"softkey Position must be 1-{MAX_SOFTKEYS}")
        if len(name) > MAX_TITLE or len(url) > MAX_URL_LENGTH:
            raise WireError("softkey Name or URL too long")
        keys.append(SoftKey(name, url, int(position_text)))
    if len(keys) > MAX_SOFTKEYS:
        raise WireError(f"at most {MAX_SOFTKEYS} softkeys")
    return TextPage(title=title, text=text, prompt=prompt, softkeys=tuple(keys))
