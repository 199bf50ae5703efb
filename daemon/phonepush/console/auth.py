"""Who may use the console: sign-in with the API token, sessions, CSRF, failed sign-ins throttled.

* **Credentials.** The one secret is ``webhook.token``: typed into the sign-in form (a password
  field named ``token``) or sent as ``Authorization: Bearer <token>``, compared in constant time.
  Without a configured token the console is off (503): never open to whoever reaches the port.
* **Sessions** are random ids (256 bits) kept in memory with an absolute expiry, not signed
  cookies. A signed value cannot be taken back before it expires; a server-side id can: sign-out
  ends it, and a reload that changes the token ends every session made with the old one (each
  session remembers a digest of the token it was made with). A restart signs everyone out,
  which a console that runs with its daemon can afford. At most :data:`MAX_SESSIONS` exist; the
  oldest goes first.
* **The cookie** is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends
  it), Path=/, and Secure when the request came over https (directly, or through a proxy in
  ``server.trusted_proxies``).
* **CSRF.** Every write made with the cookie must carry the session's own random token (a hidden
  ``csrf`` field, or an ``X-CSRF-Token`` header) and, when the browser says where the request
  comes from (``Origin``, else ``Referer``), come from this origin (the request's Host, or
  ``server.public_url``'s). A request with a bearer token
  needs no CSRF token: a browser never adds that header by itself.
* **Throttle.** After :data:`MAX_FAILURES` failed sign-ins from one address within
  :data:`FAILURE_WINDOW`, or ten times as many from all addresses together, sign-ins are refused
  unexamined (429) until the window has passed: the table of addresses is bounded, and the
  shared bucket means spreading guesses over addresses buys no more of them.
* Neither the token nor a session id is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import urlsplit

from starlette.requests import Request

__all__ = [
    "COOKIE",
    "FAILURE_WINDOW",
    "MAX_FAILURES",
    "MAX_SESSIONS",
    "SESSION_TTL",
    "Identity",
    "Sessions",
    "Throttle",
    "bearer_given",
    "origin_of",
    "same_origin",
]

log = logging.getLogger("phonepush.console")

COOKIE: Final = "phonepush_console"
#: How long a session lasts from sign-in.
SESSION_TTL: Final = 12 * 3600.0
MAX_SESSIONS: Final = 1024
MAX_FAILURES: Final = 10
FAILURE_WINDOW: Final = 60.0
_MAX_ADDRESSES: Final = 4096
_EVERYONE_FACTOR: Final = 10


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking: a session (with its CSRF token) or a bearer token."""

    kind: Literal["session", "bearer"]
    session: str = ""
    csrf: str = ""


@dataclass(slots=True)
class _Session:
    expires_at: float
    csrf: str
    token: bytes


class Sessions:
    """Signed-in browsers: random ids in memory, each with its CSRF token and expiry."""

    def __init__(
        self, *, ttl: float = SESSION_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def create(self, token: str) -> tuple[str, str]:
        """A new session for a browser that gave ``token``: its id and CSRF token."""
        now = self._clock()
        self._prune(now)
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        self._sessions[session_id] = _Session(now + self._ttl, csrf, _digest(token))
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session_id, csrf

    def find(self, session_id: str, token: str) -> Identity | None:
        """The session ``session_id`` if it is live and was made with the current ``token``."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self._clock() or not hmac.compare_digest(
            session.token, _digest(token)
        ):
            del self._sessions[session_id]
            return None
        return Identity("session", session_id, session.csrf)

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _prune(self, now: float) -> None:
        # Sessions are kept in creation order and share one ttl: the expired ones lead.
        while self._sessions:
            first = next(iter(self._sessions.values()))
            if first.expires_at > now:
                break
            self._sessions.popitem(last=False)


class Throttle:
    """Failed sign-ins, per client address and all together, within a sliding window."""

    def __init__(
        self,
        *,
        max_failures: int = MAX_FAILURES,
        window: float = FAILURE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = max_failures
        self._window = window
        self._clock = clock
        self._by_address: OrderedDict[str, deque[float]] = OrderedDict()
        self._everyone: deque[float] = deque(maxlen=max_failures * _EVERYONE_FACTOR)

    def refused(self, address: str) -> bool:
        """Whether sign-ins from ``address`` are refused unexamined just now."""
        horizon = self._clock() - self._window
        mine = self._by_address.get(address, deque())
        for failures in (mine, self._everyone):
            while failures and failures[0] <= horizon:
                failures.popleft()
        return len(mine) >= self._max or len(self._everyone) == self._everyone.maxlen

    def failed(self, address: str) -> None:
        now = self._clock()
        self._everyone.append(now)
        failures = self._by_address.pop(address, None) or deque(maxlen=self._max)
        failures.append(now)
        # Re-inserted last: the table's order is least recently failed first.
        self._by_address[address] = failures
        if len(self._by_address) > _MAX_ADDRESSES:
            self._by_address.popitem(last=False)
        if len(failures) == self._max:
            log.warning(
                "console: %d failed sign-ins from %s within %gs; sign-ins from there are "
                "refused until the window has passed",
                self._max,
                address,
                self._window,
            )


def bearer_given(request: Request) -> str | None:
    """The bearer token a request carries, or None without an ``Authorization: Bearer``."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else None


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def same_origin(request: Request, public_url: str = "") -> bool:
    """Whether the browser says the request comes from this origin: the one the request names
    (its Host) or ``public_url``'s, which is what a browser behind a proxy that rewrites Host
    sees. True when it says nothing (the CSRF token is then what protects the write)."""
    own = {origin_of(str(request.url))}
    if public_url:
        own.add(origin_of(public_url))
    origin = request.headers.get("origin")
    if origin is not None:
        return origin.lower() in own
    referer = request.headers.get("referer")
    if referer:
        return origin_of(referer) in own
    return True
