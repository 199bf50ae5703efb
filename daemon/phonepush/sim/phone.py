"""What a simulated phone understands: the objects pushed to it, the URIs it executes, the pages it
fetches, and the answers it writes.

Written from the phone's side of ``cisco-notes.md`` and Cisco's *IP Phone Services Application
Development Notes*, and sharing nothing with phonepush's client (``uri``, ``cisco``): the client
is tested against an independent reading of the same documents, so a mistake in one shows up as
a failure instead of being agreed to by both.

Choices where the documents leave room:

* **The XML field** is at most :data:`MAX_OBJECT_BYTES` (512) bytes, as older documentation and
  the reference tools say; a longer one is ``CiscoIPPhoneError Number="1"`` (the phone cannot
  parse it).
* **The prolog.** Without ``<?xml ... encoding="UTF-8"?>`` the phone reads the body in its
  locale's charset (modelled as ISO-8859-1, an English phone's): ASCII works, a UTF-8 name or URL
  is read as Latin-1 and echoed that way. A declared encoding other than UTF-8 or ISO-8859-1 is
  error 1. A DTD or entity declaration is error 1 before anything is parsed, and the parser never
  resolves entities, loads a DTD or touches the network.
* **Error numbers.** 1 when the phone cannot read the object: not well-formed, over the limit, a
  DTD, or a name it does not know (names are case-sensitive, so ``<executeItem>`` is unknown). 2
  when it reads known names but cannot act on them: another CiscoIPPhone object (a Menu pushed to
  ``/CGI/Execute``), no ExecuteItem or more than :data:`MAX_ITEMS`, an item without ``URL``, a
  Priority other than 0-2, a setBackground or setRingTone without its URLs.
* **URIs** follow the notes' grammar; anything else is ``Status="1" Data="Invalid URI"``. Names
  are exact (``Key:headset`` is invalid). ``Dial:``/``EditDial:`` take ``0-9 # * A-D ,`` (the
  notes: "can only contain 0123456789#*ABCD,"; a ``+`` is an invalid URI), and the optional
  ``:useAppUI:appId[:feedback]`` (flags 0/1, an appId of up to 64 characters without a colon);
  ``SendDigits:`` takes ``:feedback``, ``:feedback:appId`` (Cisco's example) or
  ``:feedback::appId`` (Cisco's format), the feedback flag possibly empty. A ``Play:`` file the
  phone does not have is ``Status="6" Data="URI not found"``, as for a URI it does not support.
  ``http(s)://`` is matched without regard to case (``HTTP://`` works on a phone).
* **Pages** (CiscoIPPhoneText fetched by the phone) are read with the same parser; their charset
  is the prolog's, else the Content-Type's, else ISO-8859-1.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote_plus, unquote_to_bytes

from lxml import etree

__all__ = [
    "DEFAULT_PLAY_FILES",
    "INIT_TARGETS",
    "KEY_NAMES",
    "MAX_ITEMS",
    "MAX_OBJECT_BYTES",
    "MAX_URL",
    "SOFTKEY_NAMES",
    "Background",
    "DialUri",
    "DisplayUri",
    "Execute",
    "FetchUri",
    "Item",
    "KeyUri",
    "ObjectRefused",
    "Page",
    "PageRefused",
    "PlayUri",
    "Result",
    "RingTone",
    "RtpUri",
    "SoftKey",
    "Uri",
    "error_body",
    "form_field",
    "html_body",
    "read_object",
    "read_page",
    "read_uri",
    "response_body",
    "ring_files",
]

MAX_OBJECT_BYTES: Final = 512
MAX_ITEMS: Final = 3
MAX_URL: Final = 256
MAX_PAGE_BYTES: Final = 64 * 1024
MAX_PLAY_NAME: Final = 25
MAX_TITLE: Final = 32
MAX_TEXT: Final = 4000
MAX_SOFTKEYS: Final = 8
MAX_APP_ID: Final = 64
RTP_PORTS: Final = range(20480, 32769, 2)

#: ``Key:`` names (cisco-notes.md; support varies by model, the simulator knows them all).
KEY_NAMES: Final = frozenset(
    [
        "Headset",
        "Speaker",
        "Mute",
        "Hold",
        "Release",
        "Transfer",
        "Conference",
        "Services",
        "Messages",
        "Directories",
        "Settings",
        "Info",
        "Applications",
        "AppMenu",
        "Contacts",
        "KeyPadStar",
        "KeyPadPound",
        "NavUp",
        "NavDwn",
        "NavLeft",
        "NavRight",
        "NavSelect",
        "NavBack",
        "Offhook",
        "Onhook",
        "VolUp",
        "VolDwn",
        "PTT",
        "KEMPage",
    ]
    + [f"Line{n}" for n in range(1, 121)]
    + [f"Feature{n}" for n in range(1, 121)]
    + [f"FixedFeature{n}" for n in range(1, 4)]
    + [f"Session{n}" for n in range(1, 7)]
    + [f"Soft{n}" for n in range(1, 6)]
    + [f"KeyPad{n}" for n in range(10)]
)
#: ``SoftKey:`` names (Cisco's notes: the softkeys of the phone's own objects).
SOFTKEY_NAMES: Final = frozenset(
    [
        "Back",
        "Cancel",
        "Exit",
        "Next",
        "Search",
        "Select",
        "Submit",
        "Update",
        "Dial",
        "EditDial",
        "<<",
    ]
)
#: ``Init:`` targets.
INIT_TARGETS: Final = frozenset(["CallHistory", "Services", "Messages", "Directories", "AppStatus"])
#: The ring files a phone has on its TFTP path unless told otherwise: Cisco's stock ring list,
#: and ``Alarm.raw``, which phonepush's examples and documentation use.
DEFAULT_PLAY_FILES: Final = (
    "Alarm.raw",
    "Analog1.raw",
    "Analog2.raw",
    "AreYouThere.raw",
    "Bass.raw",
    "CallBack.raw",
    "Chime.raw",
    "Classic1.raw",
    "Classic2.raw",
    "ClockShop.raw",
    "Drums1.raw",
    "Drums2.raw",
    "FilmScore.raw",
    "HarpSynth.raw",
    "Jamaica.raw",
    "KotoEffect.raw",
    "MusicBox.raw",
    "Piano1.raw",
    "Piano2.raw",
    "Pop.raw",
    "Pulse1.raw",
    "Ring1.raw",
    "Ring2.raw",
    "Ring3.raw",
    "Ring4.raw",
    "Ring5.raw",
    "Ring6.raw",
    "Ring7.raw",
    "Sax1.raw",
    "Sax2.raw",
    "Vibe.raw",
)

# The CiscoIPPhone objects a phone knows but does not act on when pushed (error 2, not 1).
_OTHER_OBJECTS: Final = frozenset(
    [
        "CiscoIPPhoneText",
        "CiscoIPPhoneMenu",
        "CiscoIPPhoneIconMenu",
        "CiscoIPPhoneIconFileMenu",
        "CiscoIPPhoneDirectory",
        "CiscoIPPhoneImage",
        "CiscoIPPhoneImageFile",
        "CiscoIPPhoneGraphicMenu",
        "CiscoIPPhoneGraphicFileMenu",
        "CiscoIPPhoneInput",
        "CiscoIPPhoneStatus",
        "CiscoIPPhoneStatusFile",
        "CiscoIPPhoneResponse",
        "CiscoIPPhoneError",
    ]
)
_PROLOG: Final = '<?xml version="1.0" encoding="UTF-8"?>'
_LOCALE_CHARSET: Final = "iso-8859-1"
_CHARSETS: Final = {
    "utf-8": "utf-8",
    "utf8": "utf-8",
    "iso-8859-1": "iso-8859-1",
    "iso8859-1": "iso-8859-1",
    "latin1": "iso-8859-1",
    "latin-1": "iso-8859-1",
}
_DECLARATION: Final = re.compile(rb"\A(?:\xef\xbb\xbf)?<\?xml\s([^>]*?)\?>")
_ENCODING: Final = re.compile(rb"encoding\s*=\s*[\"']([^\"']*)[\"']")
_CONTENT_CHARSET: Final = re.compile(r"charset\s*=\s*\"?([A-Za-z0-9._-]+)", re.IGNORECASE)
_CONTROL: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

_SEQUENCE: Final = re.compile(r"[0-9#*A-D,]*")
_DTMF: Final = re.compile(r"[0-9#*A-D,]+")
_APP_ID: Final = re.compile(rf"[^:]{{1,{MAX_APP_ID}}}")
_PLAY_NAME: Final = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_PLAY_NAME}}}")
_DISPLAY: Final = re.compile(r"(On|Off|Default)(?::([0-9]{1,4}))?")
_HTTP: Final = re.compile(r"(?i:https?)://[^/?#\s\x00-\x1f\x7f]+[^\s\x00-\x1f\x7f]*")
_RTP_KINDS: Final = frozenset(["RTPRx", "RTPMRx", "RTPTx", "RTPMTx"])


# --- errors ---------------------------------------------------------------------------------------


class ObjectRefused(Exception):
    """A pushed object the phone will not act on: answered ``CiscoIPPhoneError Number=number``."""

    def __init__(self, number: int, text: str) -> None:
        super().__init__(text)
        self.number = number
        self.text = text


class PageRefused(Exception):
    """A fetched page the phone cannot show (to the client: ``Status="6" Data="Parse error"``)."""


# --- pushed objects -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Item:
    url: str
    priority: int


@dataclass(frozen=True, slots=True)
class Execute:
    items: tuple[Item, ...]


@dataclass(frozen=True, slots=True)
class Background:
    icon: str
    image: str


@dataclass(frozen=True, slots=True)
class RingTone:
    url: str


PushedObject = Execute | Background | RingTone


def form_field(body: bytes, name: str = "XML") -> bytes | None:
    """The raw bytes of the first form field called exactly ``name``, or None."""
    for pair in body.split(b"&"):
        key, sep, value = pair.partition(b"=")
        if sep and unquote_plus(key.decode("latin-1")) == name:
            return unquote_to_bytes(value.replace(b"+", b" "))
    return None


def _charset(document: bytes, fallback: str) -> str:
    """The charset the phone reads ``document`` in (raises ValueError for one it cannot)."""
    declaration = _DECLARATION.match(document)
    if declaration is None:
        return fallback
    encoding = _ENCODING.search(declaration.group(1))
    if encoding is None:
        return "utf-8"  # XML's default when the declaration names none
    name = encoding.group(1).decode("ascii", "replace").lower()
    if name not in _CHARSETS:
        raise ValueError(f"encoding {name!r} is not one a phone reads")
    return _CHARSETS[name]


def _parse(document: bytes, charset: str) -> etree._Element:
    """Parse with a parser that resolves no entity, loads no DTD and opens no connection
    (raises ValueError for anything not well-formed or holding a DTD)."""
    # Refused on the raw bytes: the charsets allowed above spell "<!" in ASCII, so no encoding
    # trick can hide a DTD from this check, and libxml2 never sees one.
    if b"<!DOCTYPE" in document or b"<!ENTITY" in document:
        raise ValueError("a DTD or entity declaration")
    parser = etree.XMLParser(
        encoding=charset,
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )
    try:
        root = etree.fromstring(document, parser)
    except etree.XMLSyntaxError as exc:
        raise ValueError(f"not well-formed: {exc}") from exc
    if root is None:
        raise ValueError("empty document")
    return root


def read_object(xml: bytes) -> PushedObject:
    """Read a pushed object (the ``XML`` field) as a phone does; raises :class:`ObjectRefused`."""
    if len(xml) > MAX_OBJECT_BYTES:
        raise ObjectRefused(1, f"object of {len(xml)} bytes is over {MAX_OBJECT_BYTES}")
    try:
        root = _parse(xml, _charset(xml, _LOCALE_CHARSET))
    except ValueError as exc:
        raise ObjectRefused(1, str(exc)) from None
    tag = root.tag
    if tag == "CiscoIPPhoneExecute":
        return _read_execute(root)
    if tag == "setBackground":
        background = _only_child(root, "background")
        if background is None:
            raise ObjectRefused(2, "setBackground needs background")
        icon, image = _leaf(background, "icon"), _leaf(background, "image")
        _known_children(background, {"icon", "image"})
        if not icon or not image:
            raise ObjectRefused(2, "setBackground needs an icon and an image URL")
        return Background(icon, image)
    if tag == "setRingTone":
        _known_children(root, {"ringTone"})
        url = _leaf(root, "ringTone")
        if not url:
            raise ObjectRefused(2, "setRingTone needs a ringTone URL")
        return RingTone(url)
    if isinstance(tag, str) and tag in _OTHER_OBJECTS:
        raise ObjectRefused(2, f"{tag} is not executed when pushed")
    raise ObjectRefused(1, f"unknown object {str(tag)[:40]!r}")


def _read_execute(root: etree._Element) -> Execute:
    _no_attributes(root, set())
    items: list[Item] = []
    for child in root:
        if child.tag != "ExecuteItem":
            raise ObjectRefused(1, f"unknown element {str(child.tag)[:40]!r}")
        _no_attributes(child, {"URL", "Priority"})
        url = child.get("URL")
        if url is None:
            raise ObjectRefused(2, "ExecuteItem without URL")
        priority = child.get("Priority", "0")
        if priority not in ("0", "1", "2"):
            raise ObjectRefused(2, f"Priority {priority[:10]!r} is not 0, 1 or 2")
        items.append(Item(url, int(priority)))
    if not 1 <= len(items) <= MAX_ITEMS:
        raise ObjectRefused(2, f"{len(items)} ExecuteItems; 1-{MAX_ITEMS} are executed")
    return Execute(tuple(items))


def _no_attributes(element: etree._Element, allowed: set[str]) -> None:
    unknown = set(element.keys()) - allowed
    if unknown:
        raise ObjectRefused(1, f"unknown attribute {sorted(unknown)[0][:40]!r}")


def _known_children(element: etree._Element, allowed: set[str]) -> None:
    for child in element:
        if child.tag not in allowed:
            raise ObjectRefused(1, f"unknown element {str(child.tag)[:40]!r}")


def _only_child(element: etree._Element, tag: str) -> etree._Element | None:
    _known_children(element, {tag})
    return element.find(tag)


def _leaf(element: etree._Element, tag: str) -> str:
    return (element.findtext(tag) or "").strip()


# --- URIs -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchUri:
    """An http(s) URL: the phone fetches and shows what it finds."""

    url: str


@dataclass(frozen=True, slots=True)
class KeyUri:
    """``Key:``, ``SoftKey:`` or ``Init:`` with a name from the phone's tables."""

    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class DialUri:
    """``Dial:``, ``EditDial:`` or ``SendDigits:``."""

    kind: str
    digits: str


@dataclass(frozen=True, slots=True)
class PlayUri:
    """``Play:<file>``; ``file`` is ``"Stop"`` for ``Play:Stop``."""

    file: str


@dataclass(frozen=True, slots=True)
class DisplayUri:
    state: str
    minutes: int | None


@dataclass(frozen=True, slots=True)
class RtpUri:
    """An RTP URI; ``address`` is None for ``...:Stop``."""

    kind: str
    address: str | None = None
    port: int = 0
    volume: int | None = None

    @property
    def multicast(self) -> bool:
        return self.kind in ("RTPMRx", "RTPMTx")

    @property
    def transmit(self) -> bool:
        return self.kind.endswith("Tx")


Uri = FetchUri | KeyUri | DialUri | PlayUri | DisplayUri | RtpUri


def read_uri(url: str) -> Uri | None:
    """What an ExecuteItem URL asks, or None for one the phone does not understand."""
    if len(url) > MAX_URL:
        return None
    if _HTTP.fullmatch(url):
        return FetchUri(url)
    kind, sep, rest = url.partition(":")
    if not sep:
        return None
    if kind == "Key":
        return KeyUri(kind, rest) if rest in KEY_NAMES else None
    if kind == "SoftKey":
        return KeyUri(kind, rest) if rest in SOFTKEY_NAMES else None
    if kind == "Init":
        return KeyUri(kind, rest) if rest in INIT_TARGETS else None
    if kind in ("Dial", "EditDial"):
        return _dial(kind, rest)
    if kind == "SendDigits":
        return _send_digits(rest)
    if kind == "Play":
        return PlayUri(rest) if _PLAY_NAME.fullmatch(rest) else None
    if kind == "Display":
        match = _DISPLAY.fullmatch(rest)
        if match is None:
            return None
        minutes = int(match.group(2)) if match.group(2) is not None else None
        if minutes is not None and minutes > 1440:
            return None
        return DisplayUri(match.group(1), minutes)
    if kind in _RTP_KINDS:
        return _rtp(kind, rest)
    return None


def _flag(text: str) -> bool:
    return text in ("0", "1")


def _dial(kind: str, rest: str) -> DialUri | None:
    # Dial:{dialSequence}[:{useAppUI}:{applicationId}[:audibleFeedback]]
    digits, *tail = rest.split(":")
    if not _SEQUENCE.fullmatch(digits):
        return None
    if tail:
        if len(tail) not in (2, 3) or not _flag(tail[0]):
            return None
        if tail[1] and not _APP_ID.fullmatch(tail[1]):
            return None
        if len(tail) == 3 and not _flag(tail[2]):
            return None
    return DialUri(kind, digits)


def _send_digits(rest: str) -> DialUri | None:
    # SendDigits:dtmfSequence[:audibleFeedback[[:]:applicationId]]: Cisco's format line has the
    # double colon, its example a single one; a phone takes both.
    digits, *tail = rest.split(":")
    if not _DTMF.fullmatch(digits):
        return None
    if len(tail) > 3 or (tail and tail[0] not in ("", "0", "1")):
        return None
    if len(tail) == 3 and tail[1] != "":
        return None
    if len(tail) >= 2 and not _APP_ID.fullmatch(tail[-1]):
        return None
    if len(tail) == 1 and tail[0] == "":
        return None
    return DialUri("SendDigits", digits)


def _rtp(kind: str, rest: str) -> RtpUri | None:
    if rest == "Stop":
        return RtpUri(kind)
    parts = rest.split(":")
    transmit = kind.endswith("Tx")
    if len(parts) not in ((2,) if transmit else (2, 3)):
        return None
    address, port_text, *volume_text = parts
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return None
    multicast = kind in ("RTPMRx", "RTPMTx")
    if multicast != ip.is_multicast or (multicast and address.startswith("224.")):
        return None
    if not port_text.isdigit() or len(port_text) > 5 or int(port_text) not in RTP_PORTS:
        return None
    volume = None
    if volume_text:
        if not volume_text[0].isdigit() or len(volume_text[0]) > 3 or int(volume_text[0]) > 100:
            return None
        volume = int(volume_text[0])
    return RtpUri(kind, address, int(port_text), volume)


# --- pages the phone fetches ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SoftKey:
    """A ``SoftKeyItem`` of a page the phone shows."""

    name: str
    url: str
    position: int


@dataclass(frozen=True, slots=True)
class Page:
    """A CiscoIPPhoneText the phone can show."""

    title: str = ""
    prompt: str = ""
    text: str = ""
    softkeys: tuple[SoftKey, ...] = field(default_factory=tuple)


_PAGE_FIELDS: Final = frozenset(["Title", "Prompt", "Text", "SoftKeyItem"])
_SOFTKEY_FIELDS: Final = frozenset(["Name", "URL", "Position"])


def read_page(body: bytes, content_type: str = "") -> Page:
    """Read a fetched CiscoIPPhoneText within the phone's limits; raises :class:`PageRefused`."""
    if len(body) > MAX_PAGE_BYTES:
        raise PageRefused(f"page of {len(body)} bytes is over {MAX_PAGE_BYTES}")
    declared = _CONTENT_CHARSET.search(content_type)
    fallback = _CHARSETS.get(declared.group(1).lower(), "") if declared else _LOCALE_CHARSET
    try:
        root = _parse(body, _charset(body, fallback or _LOCALE_CHARSET))
    except ValueError as exc:
        raise PageRefused(str(exc)) from None
    if root.tag != "CiscoIPPhoneText":
        raise PageRefused(f"not a CiscoIPPhoneText: {str(root.tag)[:40]!r}")
    for child in root:
        if child.tag not in _PAGE_FIELDS:
            raise PageRefused(f"unknown element {str(child.tag)[:40]!r}")
    title, prompt, text = (root.findtext(tag) or "" for tag in ("Title", "Prompt", "Text"))
    if len(title) > MAX_TITLE or len(prompt) > MAX_TITLE:
        raise PageRefused(f"Title and Prompt take at most {MAX_TITLE} characters")
    if len(text) > MAX_TEXT:
        raise PageRefused(f"Text takes at most {MAX_TEXT} characters")
    if _CONTROL.search(title + prompt + text):
        raise PageRefused("control characters in the page")
    keys = [_softkey(element) for element in root.iterfind("SoftKeyItem")]
    if len(keys) > MAX_SOFTKEYS:
        raise PageRefused(f"at most {MAX_SOFTKEYS} softkeys")
    return Page(title, prompt, text, tuple(keys))


def _softkey(element: etree._Element) -> SoftKey:
    for child in element:
        if child.tag not in _SOFTKEY_FIELDS:
            raise PageRefused(f"unknown element {str(child.tag)[:40]!r} in SoftKeyItem")
    name = element.findtext("Name") or ""
    url = element.findtext("URL") or ""
    position = element.findtext("Position") or ""
    if not position.isdigit() or not 1 <= int(position) <= MAX_SOFTKEYS:
        raise PageRefused(f"softkey Position must be 1-{MAX_SOFTKEYS}")
    if len(name) > MAX_TITLE or len(url) > MAX_URL:
        raise PageRefused("softkey Name or URL too long")
    return SoftKey(name, url, int(position))


# --- answers --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    """One ``ResponseItem``: the URL, the phone's Data text and Status (0 success)."""

    url: str
    data: str
    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0


_ESCAPES: Final = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"}
)


def _escape(text: str) -> str:
    # A URL the phone echoes may hold anything XML 1.0 cannot carry (it came in escaped as a
    # character reference to a control character, say): such characters are dropped, not sent.
    return _CONTROL.sub("", text).translate(_ESCAPES)


def response_body(results: Iterable[Result]) -> bytes:
    items = "".join(
        f'<ResponseItem URL="{_escape(r.url)}" Data="{_escape(r.data)}" Status="{r.status}" />'
        for r in results
    )
    return f"{_PROLOG}<CiscoIPPhoneResponse>{items}</CiscoIPPhoneResponse>".encode()


def error_body(number: int, text: str = "") -> bytes:
    error = f'<CiscoIPPhoneError Number="{number}">{_escape(text)}</CiscoIPPhoneError>'
    return (_PROLOG + error).encode()


def html_body(title: str) -> bytes:
    """A multiplatform phone's short answer page."""
    safe = _escape(title)
    return f"<html><head><title>{safe}</title></head><body>{safe}</body></html>\n".encode()


def ring_files(values: Sequence[str]) -> frozenset[str]:
    """A set of ring file names, refusing ones no phone could hold (ValueError)."""
    for value in values:
        if not _PLAY_NAME.fullmatch(value) or value == "Stop":
            raise ValueError(f"not a ring file name a phone can hold: {value!r}")
    return frozenset(values)
