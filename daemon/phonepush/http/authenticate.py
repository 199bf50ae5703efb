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
* A configured user is never locked out. The client asking is the phone, not whoever pushed
  to it, so a lockout keyed on it would let anyone who can reach a phone shut the daemon's own
  user out of that phone. Wrong passwords for configured users are counted
  (``phonepush_authenticate_failures_total{user="<name>"}``) and logged, at most once per user
  per ``failure_window`` with the count in between: guessing shows on a dashboard instead.
* UserIDs nobody configured are throttled: after ``max_failures`` failures from one client
  address within ``failure_window``, and after ``max_failures`` × 10 from all addresses
  together, further checks of unknown names are refused unexamined until the window has passed.
  The per-address table is keyed by address only (a new user name makes no new entry) and
  holds at most 4,096 addresses, the least recently failing evicted first; the shared bucket
  means filling the table with addresses buys no extra guesses.
* The client address is the TCP peer unless ``server.trusted_proxies`` names the proxy in front
  (uvicorn believes ``X-Forwarded-For`` from those only).
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
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Final, Literal
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from phonepush.config import Config
from phonepush.logs import LogLimiter
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
#: Client addresses whose unknown-name failures are tracked at most; the least recently failing
#: is forgotten first.
_MAX_ADDRESSES: Final = 4096
#: All addresses together may fail this many times ``max_failures`` per window with unknown names.
_GLOBAL_FACTOR: Final = 10


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
        pairs = [(user, _digest(user), _digest(password)) for user, password in credentials]
        self._pairs = tuple((user, password) for _, user, password in pairs)
        self._known = {digest: name for name, digest, _ in pairs if name}
        self._metrics = metrics
        self._max_failures = max_failures
        self._window = failure_window
        self._clock = clock
        self._by_address: OrderedDict[str, deque[float]] = OrderedDict()
        self._everyone: deque[float] = deque(maxlen=max_failures * _GLOBAL_FACTOR)
        # Configured users' failures: a line per user per window, with the count in between.
        self._known_failures_log = LogLimiter(failure_window, max(1, len(self._known)), clock)
        self._everyone_logged = float("-inf")

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
        """Whether ``user``/``password`` may push; ``client`` is the asking phone's address."""
        now = self._clock()
        user_digest = _digest(user)
        known = self._known.get(user_digest)
        if known is None and self._throttled(client, now):
            result: AuthResult = "throttled"
        else:
            password_digest = _digest(password)
            matched = False
            for known_user, known_password in self._pairs:
                # Every pair is compared in full: no early exit that timing could reveal.
                same = hmac.compare_digest(user_digest, known_user) & hmac.compare_digest(
                    password_digest, known_password
                )
                matched |= same
            result = "authorized" if matched and user else "unauthorized"
            if result == "unauthorized":
                self._failed(known, client, now)
        if self._metrics is not None:
            self._metrics.authenticate.labels(result).inc()
        return result

    def _throttled(self, client: str, now: float) -> bool:
        horizon = now - self._window
        mine = self._by_address.get(client, deque())
        for failures in (mine, self._everyone):
            while failures and failures[0] <= horizon:
                failures.popleft()
        return len(mine) >= self._max_failures or len(self._everyone) == self._everyone.maxlen

    def _failed(self, known: str | None, client: str, now: float) -> None:
        if self._metrics is not None:
            self._metrics.authenticate_failures.labels(known or "").inc()
        if known is not None:
            self._log_known_failure(known, client)
            return
        self._everyone.append(now)
        failures = self._by_address.pop(client, None)
        if failures is None:
            failures = deque(maxlen=self._max_failures)
        failures.append(now)
        # Re-inserted last, so the table's order is least recently failed first.
        self._by_address[client] = failures
        if len(failures) == self._max_failures:
            log.warning(
                "%d failures with unknown user names from %s within %gs: unknown names from "
                "there are refused unexamined until the window has passed",
                self._max_failures,
                client,
                self._window,
            )
        if (
            len(self._everyone) == self._everyone.maxlen
            and now - self._everyone_logged >= self._window
        ):
            self._everyone_logged = now
            log.warning(
                "%d failures with unknown user names from all clients within %gs: unknown "
                "names are refused unexamined until the window has passed",
                len(self._everyone),
                self._window,
            )
        if len(self._by_address) > _MAX_ADDRESSES:
            self._by_address.popitem(last=False)

    def _log_known_failure(self, user: str, client: str) -> None:
        log_limit = self._known_failures_log
        if not log_limit.allow(user):
            return
        log.warning(
            "wrong password for configured user %r from %s%s; not locked out (the client is a "
            "phone, anyone could lock it out); see phonepush_authenticate_failures_total",
            user,
            client,
            f" ({log_limit.suppressed} more wrong since the last such line)"
            if log_limit.suppressed
            else "",
        )


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
        # Said at debug: the Authenticator logs what an operator must see, at a bounded rate.
        reason = "too many failures, not checked" if result == "throttled" else "wrong credentials"
        log.debug("unauthorized: user %r, device %r, from %s: %s", user, device, client, reason)
        return _reply(UNAUTHORIZED)

    return [Route("/authenticate", authenticate, methods=["GET", "POST"])]
