"""The phones' authentication URL, served by phonepush: ``GET|POST /authenticate``.

A Cisco phone with an ``<authenticationURL>`` checks the HTTP Basic credentials of each push by
asking that URL with ``UserID``, ``Password`` and (older firmware) ``devicename`` — as query
parameters (GET) or a form (POST). Only a reply of exactly ``AUTHORIZED`` lets the push through;
anything else makes the phone answer ``CiscoIPPhoneError Number="4"``. Without CUCM, phonepush
can be that URL, so a home-lab phone can require credentials for pushes.

The accepted credentials come from ``[authentication]``: its ``users`` and, unless
``phone_credentials = false``, the ``username``/``password`` of every ``[[phones]]`` entry (what
phonepush itself pushes with). Without the section the route answers 404.

Choices:

* Passwords are compared through SHA-256 digests with :func:`hmac.compare_digest`, against every
  accepted pair, so the time taken says nothing about how much of a guess was right.
* After ``max_failures`` failed checks for one (client address, UserID) within
  ``failure_window``, further checks for that pair are refused without being examined until the
  window has passed; a success clears the pair's failures. The client is the phone, so a
  brute-force run through a phone locks that user out *on that phone* for the window.
* The reply is ``text/plain`` with no trailing newline, HTTP 200 either way (phones read the
  body; the reference authentication server does the same).
* Passwords are never logged; user names and device names are logged ``repr``-quoted, since they
  come from the network.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, Literal
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from phonepush.config import Config
from phonepush.metrics import Metrics

__all__ = [
    "AUTHORIZED",
    "UNAUTHORIZED",
    "AuthResult",
    "Authenticator",
    "authenticate_routes",
]

log = logging.getLogger("phonepush.authenticate")

AUTHORIZED: Final = "AUTHORIZED"
UNAUTHORIZED: Final = "UNAUTHORIZED"

AuthResult = Literal["authorized", "unauthorized", "throttled"]

#: A form body from a phone is three short fields; anything longer is not one.
_MAX_BODY: Final = 4096
#: Failure records kept at most; beyond it the oldest pairs are forgotten first.
_MAX_TRACKED: Final = 10_000


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class Authenticator:
    """Checks (UserID, Password) pairs against the configured credentials, counting failures.

    ``credentials`` may name a user more than once (phones sharing a user name with different
    passwords); any matching pair authorizes.
    """

    def __init__(
        self,
        credentials: Iterable[tuple[str, str]],
        *,
        metrics: Metrics | None = None,
        max_failures: int = 10,
        failure_window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pairs = tuple((_digest(user), _digest(password)) for user, password in credentials)
        self._metrics = metrics
        self._max_failures = max_failures
        self._window = failure_window
        self._clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Authenticator | None:
        """The authenticator ``config`` asks for, or ``None`` without ``[authentication]``."""
        section = config.authentication
        if section is None:
            return None
        credentials = [
            (user.name, user.password.get_secret_value())
            for user in section.users
            if user.password is not None
        ]
        if section.phone_credentials:
            credentials += [
                (phone.username, phone.password.get_secret_value())
                for phone in config.phones
                if phone.username and phone.password is not None
            ]
        return cls(
            credentials,
            metrics=metrics,
            max_failures=section.max_failures,
            failure_window=section.failure_window,
            clock=clock,
        )

    def check(self, user: str, password: str, client: str = "") -> AuthResult:
        """Whether ``user``/``password`` may push; ``client`` keys the failure count."""
        key = (client, user)
        now = self._clock()
        failures = self._failures.get(key)
        if failures is not None:
            while failures and failures[0] <= now - self._window:
                failures.popleft()
        if failures is not None and len(failures) >= self._max_failures:
            result: AuthResult = "throttled"
        else:
            user_digest, password_digest = _digest(user), _digest(password)
            matched = False
            for known_user, known_password in self._pairs:
                # Every pair is compared in full: no early exit that timing could reveal.
                same = hmac.compare_digest(user_digest, known_user) & hmac.compare_digest(
                    password_digest, known_password
                )
                matched |= same
            result = "authorized" if matched and user else "unauthorized"
            if result == "authorized":
                self._failures.pop(key, None)
            else:
                self._record_failure(key, now)
        if self._metrics is not None:
            self._metrics.authenticate.labels(result).inc()
        return result

    def _record_failure(self, key: tuple[str, str], now: float) -> None:
        failures = self._failures.pop(key, None)
        if failures is None:
            failures = deque(maxlen=self._max_failures)
        failures.append(now)
        # Re-inserted last, so the dict's order is least recently failed first.
        self._failures[key] = failures
        if len(self._failures) > _MAX_TRACKED:
            oldest = next(iter(self._failures))
            del self._failures[oldest]


def _fields(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    # Firmware differs in the case of the names (UserID, userid); the first value wins.
    out: dict[str, str] = {}
    for name, value in pairs:
        out.setdefault(name.lower(), value)
    return out


def _reply(text: str, status: int = 200) -> Response:
    # Response, not PlainTextResponse: the body must be the bare word, and the phone compares
    # it exactly.
    return Response(
        text.encode(),
        status_code=status,
        media_type="text/plain",
        headers={"Cache-Control": "no-store"},
    )


def authenticate_routes(get: Callable[[], Authenticator | None]) -> list[Route]:
    """``/authenticate`` (GET and POST), answering from ``get()`` (``None``: 404)."""

    async def authenticate(request: Request) -> Response:
        authenticator = get()
        if authenticator is None:
            return PlainTextResponse("no [authentication] section configured", status_code=404)
        fields = _fields(request.query_params.multi_items())
        if request.method == "POST":
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > _MAX_BODY:
                    return PlainTextResponse("body too large", status_code=413)
            try:
                form = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
            except (UnicodeDecodeError, ValueError):
                form = []
            # The form's fields first; the query string fills in what the form leaves out.
            fields = fields | _fields(form)
        user = fields.get("userid", "")
        device = fields.get("devicename", "")
        client = request.client.host if request.client is not None else ""
        result = authenticator.check(user, fields.get("password", ""), client)
        if result == "authorized":
            log.debug("authorized %r for %r from %s", user, device, client)
            return _reply(AUTHORIZED)
        reason = "too many failures, not checked" if result == "throttled" else "wrong credentials"
        log.warning("unauthorized: user %r, device %r, from %s: %s", user, device, client, reason)
        return _reply(UNAUTHORIZED)

    return [Route("/authenticate", authenticate, methods=["GET", "POST"])]
