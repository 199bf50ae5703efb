"""The daemon's HTTP side (Starlette): webhooks in, pages for phones out, health and metrics.

Routes (a contract, pinned by tests):

``POST /hooks/<name>``  an event for rules with ``on = "webhook:<name>"``; JSON, form or text body;
                        ``Authorization: Bearer <token>``; 202 ``{"event": id, "rules": [...]}``
                        only once the event is in the spool; 401, 400, 404, 413, 503 otherwise
``GET /pages/<id>``     the CiscoIPPhoneText a pushed http ExecuteItem points to
``GET /metrics``        Prometheus exposition
``GET /healthz``        the process answers
``GET /readyz``         spool writable and, when configured, MQTT connected (503 otherwise)
``/api/silences``       runtime silences (phonepush.http.silences_api)
``GET|POST /authenticate``  the phones' authenticationURL (phonepush.http.authenticate)
``/ack/<token>``, ``/act/<token>``, ``/pages/<id>/<token>``, ``GET /api/events/<id>``
                        acks, actions and status (phonepush.http.api)
``GET /`` and the console's pages  the web console (phonepush.console, docs/console.md)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import time
from typing import Any, Final
from urllib.parse import parse_qsl

import h11
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from phonepush import jsonlimits
from phonepush.config import ServerConfig
from phonepush.console import console_routes
from phonepush.errors import SpoolError, SpoolFull
from phonepush.events import Event
from phonepush.http.api import api_routes, event_status
from phonepush.http.authenticate import authenticate_routes
from phonepush.http.silences_api import parse_silence, silence_routes
from phonepush.http.state import ServerState

__all__ = ["MAX_HEADER_BYTES", "ServerState", "create_app", "http_protocol", "uvicorn_config"]

log = logging.getLogger("phonepush.server")

#: Request headers never stored with an event: they carry credentials.
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-phonepush-signature-256"}
)
_SIGNATURE_HEADER = "x-phonepush-signature-256"
#: Request headers, all together, at most this many bytes (431 beyond).
MAX_HEADER_BYTES = 16 * 1024


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def create_app(state: ServerState) -> Starlette:
    """Build the Starlette app over ``state``."""

    async def hook(request: Request) -> Response:
        name = request.path_params["name"]
        if not state.accepting:
            return _error(503, "shutting down", **{"Retry-After": str(state.retry_after)})
        if state.token is not None and not _bearer_ok(request, state.token):
            return _error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        if name not in state.intake.rules.hooks:
            return _error(404, f"no rule listens on webhook:{name}")
        try:
            body = await _read_body(request, state.max_body)
            if state.hmac_secret is not None:
                _check_signature(request, body, state.hmac_secret)
            payload = _payload(request.headers.get("content-type", ""), body)
        except _BadRequest as exc:
            state.metrics.events_rejected.labels("webhook", str(exc.status)).inc()
            return _error(exc.status, str(exc))
        headers = {k: v for k, v in request.headers.items() if k not in _SECRET_HEADERS}
        event = Event("webhook", name, payload, headers)
        try:
            accepted = await state.intake.accept(event)
        except SpoolFull:
            state.metrics.events_rejected.labels("webhook", "spool_full").inc()
            return _error(
                503, "spool full, try again later", **{"Retry-After": str(state.retry_after)}
            )
        except SpoolError as exc:
            state.metrics.events_rejected.labels("webhook", "spool_error").inc()
            log.error("webhook %s refused: spool failing: %s", name, exc)
            return _error(
                503, "spool unavailable, try again later", **{"Retry-After": str(state.retry_after)}
            )
        return JSONResponse({"event": event.id, "rules": list(accepted.rules)}, status_code=202)

    async def page(request: Request) -> Response:
        xml = await state.spool.events.page(request.path_params["page_id"])
        if xml is None:
            return PlainTextResponse("no such page", status_code=404)
        return Response(xml, media_type="text/xml; charset=UTF-8")

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            await state.spool.check()
            checks["spool"] = "ok"
        except SpoolError as exc:
            checks["spool"] = str(exc)
        for name, check in state.readiness.items():
            checks[name] = check() or "ok"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    async def spool_failing(request: Request, exc: Exception) -> Response:
        # Any route that read the store while it was out of reach (a phone fetching its page,
        # the console's views): a 503 its caller tries again, one line in the log rather than
        # a traceback. Only the path's first segment: the rest may be an Ack token.
        where = request.url.path.split("/")[1]
        log.warning("%s /%s/…: spool failing: %s", request.method, where, exc)
        return _error(
            503, "spool unavailable, try again later", **{"Retry-After": str(state.retry_after)}
        )

    routes = [
        Route("/hooks/{name}", hook, methods=["POST"]),
        Route("/pages/{page_id}", page, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *silence_routes(state, bearer_ok=_bearer_ok),
        *api_routes(state, bearer_ok=_bearer_ok),
        *authenticate_routes(lambda: state.authenticator),
        *console_routes(state, event_status=event_status, parse_silence=parse_silence),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_HeadChecks)],
        exception_handlers={SpoolError: spool_failing},
    )


class _HeadChecks:
    """Refuse, and close the connection after, requests whose head is over
    :data:`MAX_HEADER_BYTES` or that carry both ``Content-Length`` and ``Transfer-Encoding``.

    h11's own size bound (``h11_max_incomplete_event_size``) only applies to headers still
    arriving: a head that comes in one read of up to 256 KiB is parsed whole. Both length headers
    is how requests are smuggled past a proxy that reads the other one (RFC 9112 §6.1: a server
    may reject it and must close the connection); h11 would frame by the chunks and serve
    whatever was pipelined behind them. ``Connection: close`` on the answer makes uvicorn drop the
    connection with anything still buffered on it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = _head_refusal(scope["headers"])
            if refusal is not None:
                status, message = refusal
                await _error(status, message, Connection="close")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _head_refusal(headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    if size > MAX_HEADER_BYTES:
        return 431, f"request headers over the {MAX_HEADER_BYTES}-byte limit"
    names = {name for name, _ in headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return 400, "both Content-Length and Transfer-Encoding: refused (RFC 9112 section 6.1)"
    return None


# --- the HTTP protocol ------------------------------------------------------------------------

_TIMEOUT_BODY: Final = b"request head not complete in time\n"
#: What a client that took too long over its request head is told before the close.
_TIMEOUT_ANSWER: Final = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


def http_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with what it lacks against slow and idle clients.

    * **Header timeout.** uvicorn times a connection out only once a response has been sent
      (keep-alive); a connection that opens and sends nothing, or sends its head a byte at a time,
      is held for ever. Here the head must be complete ``header_timeout`` after the connection
      opens, or after the first byte of a later request on a kept-alive connection; later bytes
      do not extend it.
    * **Idle connections give way.** uvicorn answers 503 to every request once ``limit_concurrency``
      connections are open, idle ones included, so that many silent sockets shut everyone out.
      At the limit a new connection closes the longest-idle ones: those with no request in
      progress (a partial head counts as idle). Only requests being served can fill the limit.
    * **TCP_NODELAY** on every accepted socket. asyncio sets it only when the listening socket
      says ``IPPROTO_TCP``, which one bound as ``socket(AF_INET, SOCK_STREAM)`` does not; without
      it, a response written as head then body waits out the client's delayed ACK (~40 ms) on
      every kept-alive request.
    """

    class Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _idle_since: float = 0.0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._idle_since = time.monotonic()
            self._arm_header_timer()
            if self.limit_concurrency is not None:
                self._make_room(self.limit_concurrency)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                # The next request has begun but its head is not complete yet.
                if self._header_timer is None and not self.transport.is_closing():
                    self._arm_header_timer()
            else:
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            self._idle_since = time.monotonic()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        @property
        def idle(self) -> bool:
            """No request in progress: waiting for (the rest of) a request head."""
            return self.conn.their_state is h11.IDLE and (
                self.cycle is None or self.cycle.response_complete
            )

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self.idle:
                return
            if self.conn.trailing_data[0]:
                # Part of a head came: say why, as a client deserves that is merely slow.
                self.transport.write(_TIMEOUT_ANSWER)
            log.debug("closing a connection from %s: no request head in time", self.client)
            self.transport.close()

        def _make_room(self, limit: int) -> None:
            excess = len(self.connections) - limit + 1
            if excess <= 0:
                return
            idle = sorted(
                (
                    c
                    for c in self.connections
                    if c is not self and isinstance(c, Protocol) and c.idle
                ),
                key=lambda c: c._idle_since,
            )
            for other in idle[:excess]:
                log.debug("closing an idle connection from %s to make room", other.client)
                # Out of the count now: connection_lost only runs on a later loop turn.
                self.connections.discard(other)
                other.transport.close()

    return Protocol


def uvicorn_config(app: ASGIApp, server: ServerConfig) -> uvicorn.Config:
    """How the daemon's app is served: the bounds on what clients can make us hold."""
    return uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        # h11 (never httptools even if installed): the protocol above extends h11's, and
        # the header-size bound is h11's.
        http=http_protocol(server.header_timeout),
        # No route speaks WebSocket: an upgrade would only hand a connection to a protocol
        # without the bounds above.
        ws="none",
        limit_concurrency=server.max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_keep_alive=max(1, round(server.keepalive_timeout)),
        timeout_graceful_shutdown=2,
        # Forwarded headers are a client's word unless a configured proxy says them: believed
        # from anyone, they choose the address /authenticate throttles by.
        proxy_headers=bool(server.trusted_proxies),
        forwarded_allow_ips=list(server.trusted_proxies) or None,
    )


def _bearer_ok(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest on bytes: constant time whatever the given token's content.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


def _check_signature(request: Request, body: bytes, secret: str) -> None:
    given = request.headers.get(_SIGNATURE_HEADER, "")
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise _BadRequest(401, f"missing or wrong {_SIGNATURE_HEADER} signature")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BadRequest(413, f"body over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadRequest(413, f"body over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _payload(content_type: str, body: bytes) -> bytes:
    """Normalise the body into what rules see: JSON stays JSON (checked), a form becomes a JSON
    object of its fields, anything else is passed on as text."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            jsonlimits.loads(body)
        except ValueError as exc:  # malformed, or refused by the depth limit
            raise _BadRequest(400, f"malformed JSON: {exc}") from None
        return body
    if media == "application/x-www-form-urlencoded":
        try:
            text = body.decode("utf-8")
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
        except ValueError as exc:
            raise _BadRequest(400, f"malformed form body: {exc}") from None
        fields: dict[str, Any] = {}
        for key, value in pairs:
            if key in fields:
                previous = fields[key]
                fields[key] = (
                    [*previous, value] if isinstance(previous, list) else [previous, value]
                )
            else:
                fields[key] = value
        return json.dumps(fields).encode()
    return body
