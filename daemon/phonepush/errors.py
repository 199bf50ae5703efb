"""Every exception phonepush raises, in one tree.

::

    PhonepushError
    ├── ConfigError                 invalid configuration; names the key
    ├── WireError                   we were asked to build something a phone cannot take
    │   ├── InvalidURI              outside the CGI Execute URI grammar
    │   ├── TooLarge                XML body over 512 bytes, URL over 256 characters, …
    │   ├── InvalidTarget           a phone address we cannot use (host, port, scheme, timeout)
    │   └── MalformedPush           (phone side) a pushed object a phone would answer error 1/2 to
    ├── PhoneError                  a push failed; ``retryable``: sending it again is safe
    │   ├── PhoneNotSent            the request never fully reached the phone: it cannot
    │   │   │                       have run it                                       (retryable)
    │   │   ├── PhoneUnreachable    connect refused/reset, no route, DNS, TLS, reset while writing
    │   │   └── PhoneConnectTimeout no connection (or no room to write) in time; also PhoneTimeout
    │   ├── PhoneUnconfirmed        the request was written, no answer we can read: the phone
    │   │   │                       may have run it                               (not retryable)
    │   │   ├── PhoneAnswerTimeout  no answer within the timeout; also PhoneTimeout
    │   │   ├── PhoneBadResponse    hung up, reset, or sent what is not HTTP or a readable error
    │   │   └── PhoneHTTPError      HTTP status >= 400, no CiscoIPPhoneError
    │   ├── PhoneTimeout            base of the two timeouts (catch both with it)
    │   ├── PhoneHTTPBusy           HTTP 503 or 429 (multiplatform firmware's busy): it ran
    │   │                           nothing                                           (retryable)
    │   ├── PhoneRejected           CiscoIPPhoneError N: the phone refused; retryable only for 6
    │   │   └── PhoneAuthError      CiscoIPPhoneError 4, or HTTP 401                  (permanent)
    ├── TemplateError               a rule template failed to compile or render
    ├── MqttError                   the MQTT broker refused or could not take a publish
    ├── AudioError                  page audio cannot be read, converted, synthesized or streamed
    └── SpoolError                  the embedded store cannot take or give events
        ├── SpoolFull               over the configured backlog limit: intake must slow down
        └── SpoolConflict           a shared database rolled back a transaction that ran into
                                    another one (deadlock, serialization): run it again

``PhoneNotSent`` against ``PhoneUnconfirmed`` is what delivery semantics rest on: only the first
(and error 6) may be sent again without risking a second dial or chime; see docs/design.md,
"Delivery guarantees".

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
    "PhoneAnswerTimeout",
    "PhoneAuthError",
    "PhoneBadResponse",
    "PhoneConnectTimeout",
    "PhoneError",
    "PhoneHTTPBusy",
    "PhoneHTTPError",
    "PhoneNotSent",
    "PhoneRejected",
    "PhoneTimeout",
    "PhoneUnconfirmed",
    "PhoneUnreachable",
    "PhonepushError",
    "SpoolConflict",
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


class PhoneNotSent(PhoneError):
    """The request did not fully reach the phone (no connection, or it failed while writing):
    the phone cannot have run it, so sending it again is safe."""

    retryable = True


class PhoneUnconfirmed(PhoneError):
    """The request was written but no answer we can read came back (timeout, reset, garbage, an
    HTTP error without an error object): the phone may have run it. Sending it again could dial
    or chime twice, so only content a rule declares idempotent is (``retry_unconfirmed``)."""

    retryable = False


class PhoneUnreachable(PhoneNotSent):
    """The phone could not be connected to, or the connection failed before the request was
    written."""


class PhoneTimeout(PhoneError):
    """The phone did not connect or answer in time (``Play:`` holds the answer for the tone's
    length). Raised as :class:`PhoneConnectTimeout` or :class:`PhoneAnswerTimeout`."""


class PhoneConnectTimeout(PhoneTimeout, PhoneNotSent):
    """No connection, or no room to write the request, within the timeout."""


class PhoneAnswerTimeout(PhoneTimeout, PhoneUnconfirmed):
    """The request was written; no answer came within the timeout."""


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


class PhoneHTTPError(PhoneUnconfirmed):
    """An HTTP error status without a CiscoIPPhoneError body: nothing says what the phone did."""

    def __init__(self, status: int, *, phone: str = "") -> None:
        self.status = status
        super().__init__(f"HTTP status {status}", phone=phone)


class PhoneHTTPBusy(PhoneError):
    """HTTP 503 or 429: the phone says it is busy (multiplatform firmware's answer where others
    send error 6) and ran nothing; the same push later works."""

    retryable = True

    def __init__(self, status: int, *, phone: str = "") -> None:
        self.status = status
        super().__init__(f"HTTP status {status} (busy)", phone=phone)


class PhoneBadResponse(PhoneUnconfirmed):
    """After the request was written the phone hung up, reset the connection, or answered what
    is neither HTTP nor a CiscoIPPhone object we can read."""


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


class SpoolConflict(SpoolError):
    """A shared database (PostgreSQL) rolled the transaction back because it ran into another
    instance's: a deadlock, or a serialization failure. Nothing was written, and the same
    transaction run again will most likely succeed."""
