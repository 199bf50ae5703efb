"""The silences API (Starlette routes, mounted by :func:`phonepush.http.server.create_app`).

``POST /api/silences``         create: ``{"matchers": [...], "duration": "2h" | "endsAt": ...,
                               "startsAt"?, "comment", "createdBy"}`` -> 201 ``{"id": ...}``
``GET /api/silences``          the silences in force or scheduled (a JSON list)
``GET /api/silences/<id>``     one of them
``DELETE /api/silences/<id>``  expire it now -> 200 ``{"id": ..., "status": "expired"}``

Every route needs ``Authorization: Bearer <webhook.token>``. Unlike the hooks, which a loopback
listener may leave open, the API is refused (403) when no token is configured: a silence hides
pages, and anyone able to reach a local port should not be able to do that. Bad input is a 400
whose ``error`` says what is wrong; a failing spool is a 503.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Final, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from phonepush import jsonlimits
from phonepush.config import parse_duration
from phonepush.errors import SpoolError
from phonepush.silence.silences import MAX_MATCHERS, Matcher, Silence, Silences

__all__ = ["MAX_DURATION", "parse_silence", "silence_routes"]

#: The longest a silence can last.
MAX_DURATION: Final = 366 * 86400.0
_MAX_BODY: Final = 16 * 1024
_MAX_COMMENT: Final = 1024
_MAX_CREATED_BY: Final = 256
_Endpoint = Callable[[Request], Awaitable[Response]]
_KEYS: Final = frozenset({"matchers", "duration", "startsAt", "endsAt", "comment", "createdBy"})


class _State(Protocol):
    """What the routes read from :class:`phonepush.http.state.ServerState`."""

    @property
    def token(self) -> str | None: ...

    @property
    def silences(self) -> Silences | None: ...


class _Invalid(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _time(value: object, key: str) -> float:
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected an RFC 3339 time such as 2026-11-26T22:00:00Z")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{key}: expected an RFC 3339 time such as 2026-11-26T22:00:00Z, got {value[:64]!r}"
        ) from None
    if parsed.tzinfo is None:
        raise ValueError(f"{key}: give a time zone (Z or +01:00)")
    return parsed.timestamp()


def _text(data: Mapping[str, Any], key: str, limit: int) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key}: required, a non-empty string")
    if len(value) > limit:
        raise ValueError(f"{key}: at most {limit} characters")
    return value


def parse_silence(data: object, *, now: float, silence_id: str) -> Silence:
    """Validate a ``POST /api/silences`` body into a :class:`Silence`; ``ValueError`` names the
    key that is wrong."""
    if not isinstance(data, Mapping):
        raise ValueError("expected a JSON object")
    unknown = set(data) - _KEYS
    if unknown:
        raise ValueError(f"unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    matchers = data.get("matchers")
    if not isinstance(matchers, list) or not 1 <= len(matchers) <= MAX_MATCHERS:
        raise ValueError(f"matchers: a list of 1-{MAX_MATCHERS} matchers")
    parsed = []
    for i, matcher in enumerate(matchers):
        try:
            parsed.append(Matcher.parse(matcher))
        except ValueError as exc:
            raise ValueError(f"matchers[{i}]: {exc}") from None
    starts_at = now if data.get("startsAt") is None else _time(data["startsAt"], "startsAt")
    if ("duration" in data) == ("endsAt" in data):
        raise ValueError("give either duration (such as 2h) or endsAt")
    if "duration" in data:
        try:
            duration = parse_duration(data["duration"])
        except ValueError as exc:
            raise ValueError(f"duration: {exc}") from None
        if duration <= 0:
            raise ValueError("duration: must be more than 0s")
        ends_at = max(starts_at, now) + duration
    else:
        ends_at = _time(data["endsAt"], "endsAt")
    if ends_at <= max(starts_at, now):
        raise ValueError("endsAt: must be after startsAt and in the future")
    if ends_at - max(starts_at, now) > MAX_DURATION:
        raise ValueError("a silence lasts at most 366 days")
    return Silence(
        id=silence_id,
        matchers=tuple(parsed),
        starts_at=starts_at,
        ends_at=ends_at,
        created_at=now,
        created_by=_text(data, "createdBy", _MAX_CREATED_BY),
        comment=_text(data, "comment", _MAX_COMMENT),
    )


def silence_routes(
    state: _State,
    *,
    bearer_ok: Callable[[Request, str], bool],
    clock: Callable[[], float] = time.time,
) -> list[Route]:
    """The routes, over ``state``; ``bearer_ok`` is the server's constant-time token check."""

    def guard(request: Request) -> Silences:
        token = state.token
        if token is None:
            raise _Invalid(403, "the silences API needs webhook.token to be configured")
        if not bearer_ok(request, token):
            raise _Invalid(401, "missing or wrong bearer token")
        silences = state.silences
        if silences is None:
            raise _Invalid(503, "silences are not available")
        return silences

    def route(handler: Callable[[Request, Silences], Awaitable[Response]]) -> _Endpoint:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request, guard(request))
            except _Invalid as exc:
                headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
                return _error(exc.status, str(exc), **headers)
            except SpoolError:
                return _error(503, "spool unavailable, try again later")

        return endpoint

    async def create(request: Request, silences: Silences) -> Response:
        body = await _read_body(request)
        try:
            silence = parse_silence(
                jsonlimits.loads(body), now=clock(), silence_id=str(uuid.uuid4())
            )
            await silences.add(silence)
        except ValueError as exc:  # so are json.JSONDecodeError and jsonlimits refusals
            raise _Invalid(400, str(exc)) from None
        return JSONResponse({"id": silence.id}, status_code=201)

    async def listing(request: Request, silences: Silences) -> Response:
        at = clock()
        return JSONResponse([s.to_dict(at) for s in await silences.current()])

    async def one(request: Request, silences: Silences) -> Response:
        silence = await silences.get(request.path_params["silence_id"])
        if silence is None:
            raise _Invalid(404, "no such silence in force or scheduled")
        return JSONResponse(silence.to_dict(clock()))

    async def expire(request: Request, silences: Silences) -> Response:
        silence_id = request.path_params["silence_id"]
        if not await silences.expire(silence_id):
            raise _Invalid(404, "no such silence in force or scheduled")
        return JSONResponse({"id": silence_id, "status": "expired"})

    return [
        Route("/api/silences", route(create), methods=["POST"]),
        Route("/api/silences", route(listing), methods=["GET"]),
        Route("/api/silences/{silence_id}", route(one), methods=["GET"]),
        Route("/api/silences/{silence_id}", route(expire), methods=["DELETE"]),
    ]


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > _MAX_BODY:
        raise _Invalid(413, f"body over the {_MAX_BODY}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _MAX_BODY:
            raise _Invalid(413, f"body over the {_MAX_BODY}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)
