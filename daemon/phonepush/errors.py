"""Every exception phonepush raises, in one tree.

::

    PhonepushError
    ├── ConfigError                 invalid configuration; names the key
    ├── WireError                   we were asked to build something a phone cannot take
    │   ├── InvalidURI              outside the CGI Execute URI grammar
    │   ├── TooLarge                XML body over 512 bytes, URL over 256 characters, …
    │   ├── InvalidTarget           a phone address we cannot use (host, port, scheme, timeout)
    │   └── MalformedPush           (phone side) a pushed object a phone would answer error 1/2 to
    ├── PhoneError                  a push failed; ``retryable`` says if trying again can help
    │   ├── PhoneUnreachable        connection refused, no route, DNS, TLS handshake  (retryable)
    │   ├── PhoneTimeout            no answer within the timeout                      (retryable)
    │   ├── PhoneAuthError          CiscoIPPhoneError 4, or HTTP 401                  (permanent)
    │   ├── PhoneRejected           CiscoIPPhoneError N; retryable only for 6 (busy / internal)
    │   ├── PhoneHTTPError          HTTP status >= 400, no CiscoIPPhoneError  (5xx retryable)
    │   └── PhoneBadResponse        wrong Content-Type, malformed or hostile XML      (retryable)
    ├── TemplateError               a rule template failed to compile or render
    ├── MqttError                   the MQTT broker refused or could not take a publish
    ├── AudioError                  page audio cannot be read, converted, synthesized or streamed
    └── SpoolError                  the embedded store cannot take or give events
        └── SpoolFull               over the configured backlog limit: intake must slow down

Third-party exceptions (httpx, lxml, sqlite3, jinja2) are translated into these at one boundary
each, with ``raise ... from exc`` so the cause stays in tracebacks.
"""

from __future__ import annotations

__all__ = [
    "CISCO_ERRORS",
    "AudioError",
    "ConfigError",
    "InvalidTarget",
    "InvalidURI",
    "MalformedPush",
    "MqttError",
    "PhoneAuthError",
    "PhoneBadResponse",
    "PhoneError",
    "PhoneHTTPError",
    "PhoneRejected",
    "PhoneTimeout",
    "PhoneUnreachable",
    "PhonepushError",
    "SpoolError",
    "SpoolFull",
    "TemplateError",
    "TooLarge",
    "WireError",
]

#: CiscoIPPhoneError numbers and their meaning, as the reference client prints them.
CISCO_ERRORS: dict[int, str] = {
    1: "Error parsing CiscoIPPhone object",
    2: "Error framing CiscoIPPhone object",
    3: "Internal file error",
    4: "Authentication error",
}


class PhonepushError(Exception):
    """Base of every error phonepush raises on purpose."""


class ConfigError(PhonepushError):
    """The configuration is invalid. The message names the section, rule or phone and the key."""


class WireError(PhonepushError):
    """Something we were asked to send is not valid CGI Execute."""


class InvalidURI(WireError):
    """A URI outside the grammar phones accept."""

    def __init__(self, uri: str, reason: str = "") -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"Invalid URL: {uri}" + (f" ({reason})" if reason else ""))


class InvalidTarget(WireError, ValueError):
    """A phone address we cannot use: host, port, scheme or timeout. Also a ``ValueError``, so
    validators (pydantic) that wrap ``ValueError`` report it as a field error."""


class TooLarge(WireError):
    """An object over a phone's limits (512-byte XML body, 256-character URL)."""


class MalformedPush(WireError):
    """What a phone sees in a bad push: ``number`` is the CiscoIPPhoneError it answers
    (1: not well-formed XML, 2: well-formed but not an object it can act on)."""

    def __init__(self, number: int, message: str) -> None:
        self.number = number
        super().__init__(message)


class PhoneError(PhonepushError):
    """A push to a phone failed.

    ``retryable`` tells the dispatcher whether the same request may succeed later.
    """

    retryable: bool = False

    def __init__(self, message: str, *, phone: str = "") -> None:
        self.phone = phone
        super().__init__(message)


class PhoneUnreachable(PhoneError):
    """The phone could not be connected to."""

    retryable = True


class PhoneTimeout(PhoneError):
    """The phone did not answer in time (``Play:`` holds the answer for the tone's length)."""

    retryable = True


class PhoneRejected(PhoneError):
    """The phone answered ``CiscoIPPhoneError``."""

    def __init__(self, number: int, text: str = "", *, phone: str = "") -> None:
        self.number = number
        self.meaning = CISCO_ERRORS.get(number, str(number))
        self.text = text
        # Error 6 shows up when the phone is busy with another request; the same push later works.
        self.retryable = number == 6
        super().__init__(f"Error: {self.meaning}", phone=phone)


class PhoneAuthError(PhoneRejected):
    """The phone refused the credentials (error 4, or HTTP 401)."""

    def __init__(self, text: str = "", *, phone: str = "") -> None:
        super().__init__(4, text, phone=phone)


class PhoneHTTPError(PhoneError):
    """An HTTP error status without a CiscoIPPhoneError body."""

    def __init__(self, status: int, *, phone: str = "") -> None:
        self.status = status
        self.retryable = status >= 500 or status == 429
        super().__init__(f"HTTP status {status}", phone=phone)


class PhoneBadResponse(PhoneError):
    """The phone answered something that is not a CiscoIPPhone object we can read."""

    retryable = True


class TemplateError(PhonepushError):
    """A rule template failed to compile or to render."""


class MqttError(PhonepushError):
    """A publish to the MQTT broker failed: refused by the broker, or the source is closed."""


class AudioError(PhonepushError):
    """Audio for a page failed: an unreadable or unsupported file, text-to-speech missing
    (espeak-ng not installed) or failing, or an RTP socket that cannot be opened."""


class SpoolError(PhonepushError):
    """The spool (SQLite) failed: unwritable file, full disk, corruption."""


class SpoolFull(SpoolError):
    """The spool holds more pending work than its limit; intake must push back."""
