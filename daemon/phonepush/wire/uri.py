"""The grammar of URIs a Cisco phone executes, and ``URL[@PRIORITY]`` arguments.

The reference ``cgiexecute`` client accepts ``Dial:``, ``EditDial:``, ``Key:``, ``SoftKey:``,
``Init:``, ``Play:``, ``Display:`` and ``http(s)://``. Cisco's development notes add the forms
below;
we accept the union, so anything the reference client sends we send too, and more.

Choices where the notes leave room (kept here so there is one place to read them):

* ``Play:`` file names are at most 25 characters (the phone's TFTP name limit); a longer name is
  refused up front instead of failing on the phone.
* ``Display:`` minutes are 0–1440 (0 means "until changed").
* ``Dial:``/``SendDigits:`` take ``0-9 # * A-D`` and ``,`` (a one-second pause), as Cisco's
  development notes say ("can only contain 0123456789#*ABCD,"). No ``+``: the notes do not
  list it, so an E.164 number is written as the dial plan dials it (``Dial:0041446681800``), not
  as ``Dial:+41446681800``, which a phone may refuse as an invalid URI on every push. An empty
  sequence is refused (a phone takes it, but it is a template that rendered nothing). The
  optional ``:useAppUI:appId[:feedback]`` suffix of ``Dial:`` takes flags ``0``/``1`` and an
  appId of up to 64 printable characters without a colon or white space, possibly none
  (``Dial:1234:1:``; Cisco's example: ``Dial:918005551212:1:Cisco/Dialer``).
  ``SendDigits:`` takes an optional audible-feedback flag (``0``/``1``, the notes' values) and an
  optional ``appId`` after it, the flag possibly empty, with one colon before the appId (Cisco's
  example: ``SendDigits:…:1:Cisco/Dialer``) or two (its format line): ``SendDigits:123:1``,
  ``SendDigits:123:1:app``, ``SendDigits:123::app``, ``SendDigits:123:1::app``.
* RTP URIs need a dotted IPv4 address; ``RTPMRx``/``RTPMTx`` need a multicast group outside
  224.0.0.0/8, ``RTPRx``/``RTPTx`` a unicast address. Ports are even, 20480–32768; volume 0–100.
* ``http(s)://`` URLs may hold no white space or control characters. The scheme is matched in
  any case and returned lower-case (``HTTP://h/x`` becomes ``http://h/x``): phones compare it
  case-sensitively, RFC 3986 says schemes are case-insensitive.
* Every URI is at most 256 characters.
* Matching is on the whole string (the reference uses ``re.search(... $)``, which lets a trailing
  newline through; a phone would not accept that, so we don't).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from phonepush.errors import InvalidURI, WireError

__all__ = [
    "MAX_URL_LENGTH",
    "REFERENCE_SCHEMES",
    "ExecuteItem",
    "is_http",
    "parse_priority",
    "parse_target",
    "validate_uri",
]

MAX_URL_LENGTH: Final = 256
MAX_PLAY_NAME: Final = 25
RTP_PORT_MIN: Final = 20480
RTP_PORT_MAX: Final = 32768

#: The URI kinds the reference client's help text lists, in its order.
REFERENCE_SCHEMES: Final = (
    "Dial:",
    "EditDial:",
    "Key:",
    "SoftKey:",
    "Init:",
    "Play:",
    "Display:",
    "http:",
    "https:",
)


@dataclass(frozen=True, slots=True)
class ExecuteItem:
    """One ``<ExecuteItem URL=".." Priority=".."/>``."""

    url: str
    priority: int = 0


_DIGITS = r"[0-9#*A-D,]+"
_WORD = r"[A-Za-z0-9._\-]+"
_FLAG = r"[01]"
_APP_ID = r"[!-9;-~]{0,64}"

_SIMPLE: Final = re.compile(
    rf"""
      (?: Dial : {_DIGITS} (?: : {_FLAG} : {_APP_ID} (?: : {_FLAG})? )? )
    | (?: EditDial : {_DIGITS} )
    | (?: SendDigits : {_DIGITS} (?: : {_FLAG} | : {_FLAG}? : :? [!-9;-~]{{1,64}} )? )
    | (?: (?: Key | SoftKey | Init ) : [A-Za-z0-9]+ )
    | (?: App : {_WORD} (?: : {_WORD} )* )
    """,
    re.VERBOSE,
)
_PLAY: Final = re.compile(r"Play:([A-Za-z0-9._\-]+)")
_DISPLAY: Final = re.compile(r"Display:(On|Off|Default)(?::([0-9]{1,4}))?")
_RTP: Final = re.compile(r"(RTPRx|RTPMRx|RTPTx|RTPMTx):([0-9.]+):([0-9]{1,5})(?::([0-9]{1,3}))?")
_RTP_STOP: Final = re.compile(r"(?:RTPRx|RTPMRx|RTPTx|RTPMTx):Stop")
# No white space, no C0/C1 controls, and nothing XML cannot carry (lone surrogates, U+FFFE/F).
_HTTP: Final = re.compile(
    r"https?://[^\s\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]+", re.IGNORECASE
)


_DIAL_KIND: Final = re.compile(r"(?:Dial|EditDial|SendDigits):")
_DIAL_REASON: Final = (
    "a number takes no +, only 0-9 # * A-D and commas; write +41... as the dial plan dials it, "
    "such as 0041..."
)


def is_http(url: str) -> bool:
    """True for ``http://`` and ``https://`` URLs (the phone fetches these)."""
    return url[:7].lower() == "http://" or url[:8].lower() == "https://"


def validate_uri(uri: str) -> str:
    """Return ``uri`` if a phone would execute it (an http(s) scheme in lower case, the rest
    unchanged), else raise :class:`InvalidURI`."""
    if len(uri) > MAX_URL_LENGTH:
        raise InvalidURI(uri, f"longer than {MAX_URL_LENGTH} characters")
    if _HTTP.fullmatch(uri):
        scheme, sep, rest = uri.partition("://")
        return scheme.lower() + sep + rest
    if _SIMPLE.fullmatch(uri) or _RTP_STOP.fullmatch(uri):
        return uri
    if m := _PLAY.fullmatch(uri):
        if len(m.group(1)) > MAX_PLAY_NAME:
            raise InvalidURI(uri, f"tone file name longer than {MAX_PLAY_NAME} characters")
        return uri
    if m := _DISPLAY.fullmatch(uri):
        if m.group(2) is not None and int(m.group(2)) > 1440:
            raise InvalidURI(uri, "minutes must be 0-1440")
        return uri
    if m := _RTP.fullmatch(uri):
        _check_rtp(uri, m.group(1), m.group(2), int(m.group(3)), m.group(4))
        return uri
    if _DIAL_KIND.match(uri) and "+" in uri:
        raise InvalidURI(uri, _DIAL_REASON)
    raise InvalidURI(uri)


def _check_rtp(uri: str, kind: str, address: str, port: int, volume: str | None) -> None:
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise InvalidURI(uri, "not an IPv4 address") from None
    multicast = kind in ("RTPMRx", "RTPMTx")
    if multicast and (not ip.is_multicast or address.startswith("224.")):
        raise InvalidURI(uri, "multicast group must be in 225.0.0.0-239.255.255.255")
    if not multicast and ip.is_multicast:
        raise InvalidURI(uri, "unicast stream needs a unicast address")
    if port % 2 or not RTP_PORT_MIN <= port <= RTP_PORT_MAX:
        raise InvalidURI(uri, f"port must be even, {RTP_PORT_MIN}-{RTP_PORT_MAX}")
    if volume is not None:
        if kind in ("RTPTx", "RTPMTx"):
            raise InvalidURI(uri, "transmit URIs take no volume")
        if int(volume) > 100:
            raise InvalidURI(uri, "volume must be 0-100")


def parse_target(argument: str) -> ExecuteItem:
    """Parse a ``URL[@PRIORITY]`` argument as the reference client does.

    The priority is split off at the last ``@`` and checked before the URL; the errors carry the
    reference's messages (``Invalid priority: X``, ``Invalid URL: X``).
    """
    url, priority = argument, 0
    if "@" in argument:
        url, text = argument.rsplit("@", maxsplit=1)
        priority = parse_priority(text)
    return ExecuteItem(validate_uri(url), priority)


def parse_priority(text: str) -> int:
    """``0``, ``1`` or ``2``; anything else raises the reference's ``Invalid priority: X``."""
    try:
        priority = int(text)
    except ValueError:
        raise WireError(f"Invalid priority: {text}") from None
    if not 0 <= priority <= 2:
        raise WireError(f"Invalid priority: {priority}")
    return priority
