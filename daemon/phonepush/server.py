"""The daemon's HTTP side (Starlette): webhooks in, pages for phones out, health and metrics.

Routes (a contract, pinned by tests):

``POST /hooks/<name>``  an event for rules with ``on = "webhook:<name>"``; JSON, form or text body;
                        ``Authorization: Bearer <token>``; 202 ``{"event": id, "rules": [...]}``
                        only once the event is in the spool; 401, 400, 404, 413, 503 otherwise
``GET /pages/<id>``     the CiscoIPPhoneText a pushed http ExecuteItem points to
``GET /metrics``        Prometheus exposition
``GET /healthz``        the process answers
``GET /readyz``         spool writable and, when configured, MQTT connected (503 otherwise)
``/api/silences``       runtime silences (phonepush.api_silences)
``GET|POST /authenticate``  the phones' authenticationURL (phonepush.authenticate)
``/ack/<token>``, ``/pages/<id>/<token>``, ``GET /api/events/<id>``  acks and status (phonepush.api)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from phonepush import jsonlimits
from phonepush.acks import AckService
from phonepush.api import api_routes
from phonepush.api_silences import silence_routes
from phonepush.authenticate import Authenticator, authenticate_routes
from phonepush.errors import SpoolError, SpoolFull
from phonepush.events import Event
from phonepush.intake import Intake
from phonepush.metrics import Metrics
from phonepush.silences import Silences
from phonepush.spool import Spool

__all__ = ["MAX_HEADER_BYTES", "ServerState", "create_app"]

log = logging.getLogger("phonepush.server")

#: Request headers never stored with an event: they carry credentials.
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-phonepush-signature-256"}
)
_SIGNATURE_HEADER = "x-phonepush-signature-256"
#: Request headers, all together, at most this many bytes (431 beyond).
MAX_HEADER_BYTES = 16 * 1024


@dataclass(slots=True)
class ServerState:
    """What the routes need; the daemon swaps fields on reload."""

    intake: Intake
    spool: Spool
    metrics: Metrics
    token: str | None = None
    hmac_secret: str | None = None
    max_body: int = 64 * 1024
    retry_after: int = 5
    #: False once shutdown begins: hooks answer 503 so senders retry against the next start.
    accepting: bool = True
    #: extra readiness checks, name -> callable returning an error text or "" when fine
    readiness: dict[str, Callable[[], str]] = field(default_factory=dict)
    #: runtime silences (``/api/silences``, phonepush.api_silences); None: the API answers 503
    silences: Silences | None = None
    #: acknowledgements (``/ack/<token>``, phonepush.api); None: those routes answer 404
    acks: AckService | None = None
    #: the phones' authentication URL (phonepush.authenticate); None: ``/authenticate`` is 404
    authenticator: Authenticator | None = None


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
            accepted = state.intake.accept(event)
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
        xml = state.spool.page(request.path_params["page_id"])
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
            state.spool.check()
            checks["spool"] = "ok"
        except SpoolError as exc:
            checks["spool"] = str(exc)
        for name, check in state.readiness.items():
            checks[name] = check() or "ok"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    routes = [
        Route("/hooks/{name}", hook, methods=["POST"]),
        Route("/pages/{page_id}", page, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *silence_routes(state, bearer_ok=_bearer_ok),
        *api_routes(state, bearer_ok=_bearer_ok),
        *authenticate_routes(lambda: state.authenticator),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_HeaderLimit)])


class _HeaderLimit:
    """Refuse requests whose headers are over :data:`MAX_HEADER_BYTES`. h11's own bound
    (``h11_max_incomplete_event_size``) only applies to headers still arriving: a head that comes
    in one read of up to 256 KiB is parsed whole, so the limit is enforced again here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > MAX_HEADER_BYTES:
                response = _error(
                    431,
                    f"request headers over the {MAX_HEADER_BYTES}-byte limit",
                    Connection="close",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
