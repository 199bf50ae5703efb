"""The console's routes: server-rendered pages (Jinja2, autoescaped) over the daemon's state.

``GET /``                     phones: reachable and since when, model, last push, pending
                              (``?group=``, ``?health=reachable|unreachable|unknown``,
                              ``?page=``: :data:`PHONES_PER_PAGE` at a time)
``GET /events``               recent events and each phone's delivery (``?rule=``, ``?state=``)
``GET /events/<id>``          one event's deliveries and timeline
``GET|POST /silences``        list, create; ``POST /silences/<id>/expire``
``GET /rules``                each rule's trigger, phones, last match and deliveries by state
``GET|POST /test-page``       send a test page to a phone or group, through the pipeline
``GET /screens``              the phones' screens, when something shows them (``phonepush demo``);
                              ``POST /screens/<phone>/press`` presses a softkey
``GET|POST /signin``, ``POST /signout``, ``GET /assets/<name>`` (public: CSS and JS)

Access is :mod:`phonepush.console.auth`'s. Every answer carries :data:`CSP` and friends: the
pages load only the daemon's own CSS and script, run no inline code and cannot be framed.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import parse_qsl, quote

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from phonepush.config import format_duration
from phonepush.console.auth import COOKIE, Identity, Sessions, Throttle, bearer_given, same_origin
from phonepush.console.screens import Screens
from phonepush.console.views import (
    EVENTS_SHOWN,
    ago,
    event_rows,
    groups_of,
    local_time,
    parse_matchers,
    rule_rows,
    timeline,
    until,
)
from phonepush.errors import ConfigError, SpoolError, SpoolFull
from phonepush.pipeline.direct import DirectPage
from phonepush.silence.silences import Silence, Silences
from phonepush.store.interface import Store
from phonepush.store.records import DeliveryState, EventRecord

if TYPE_CHECKING:
    from phonepush.health.monitor import Health
    from phonepush.pipeline.intake import Intake

__all__ = ["CSP", "PHONES_PER_PAGE", "ConsoleState", "console_routes"]

log = logging.getLogger("phonepush.console")

#: Phones listed on one page. Thousands of rows make a page of megabytes that the live update
#: fetches every few seconds (5,000 phones: 2 MB, 0.2 s to render each time); an operator looks
#: for the unreachable ones (``?health=unreachable``) or one group, not at every row at once.
PHONES_PER_PAGE: Final = 200
_HEALTH: Final = ("reachable", "unreachable", "unknown")


def _health_of(phone: Mapping[str, Any]) -> str:
    reachable = phone.get("reachable")
    return "unknown" if reachable is None else "reachable" if reachable else "unreachable"


def _page_number(text: str) -> int:
    return int(text) if text.isdigit() and 0 < len(text) < 7 else 1


CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
_ASSETS: Final = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript"}
_MAX_FORM: Final = 16 * 1024
_NOTICES: Final = {
    "created": "Silence created.",
    "expired": "Silence expired.",
    "pressed": "Softkey pressed.",
}
_STATES: Final = tuple(s.value for s in DeliveryState)
_TEST_RULE: Final = "test-page"
_TEST_TITLE: Final = "Test page"
_TEST_TEXT: Final = "A test page from the phonepush console. No action needed."

EventStatus = Callable[[Store, EventRecord], Awaitable[dict[str, Any]]]
_Handler = Callable[[Request, Identity, dict[str, str]], Awaitable[Response]]


class ConsoleState(Protocol):
    """What the console reads from :class:`phonepush.http.state.ServerState`."""

    @property
    def token(self) -> str | None: ...

    @property
    def intake(self) -> Intake: ...

    @property
    def spool(self) -> Store: ...

    @property
    def silences(self) -> Silences | None: ...

    @property
    def health(self) -> Health | None: ...

    @property
    def screens(self) -> Screens | None: ...


class ParseSilence(Protocol):
    """``phonepush.http.silences_api.parse_silence``: a ``POST /api/silences`` body checked."""

    def __call__(self, data: object, *, now: float, silence_id: str) -> Silence: ...


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def _secure(response: Response, *, cache: bool = False) -> Response:
    response.headers.update(_HEADERS)
    response.headers["Cache-Control"] = "no-cache" if cache else "no-store"
    return response


def _safe_next(target: str) -> str:
    # Only a path of this site: "//host" or "/\\host" would leave it.
    if target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form body of at most :data:`_MAX_FORM` bytes (first value of each field)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise _Refused(415, "expected a form (application/x-www-form-urlencoded)")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM:
            raise _Refused(413, f"form over the {_MAX_FORM}-byte limit")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        raise _Refused(400, "malformed form") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


class _Console:
    """The routes' shared parts: templates, sessions, throttle, the state."""

    def __init__(
        self,
        state: ConsoleState,
        *,
        event_status: EventStatus,
        parse_silence: ParseSilence,
        clock: Callable[[], float],
    ) -> None:
        self.state = state
        self.event_status = event_status
        self.parse_silence = parse_silence
        self.clock = clock
        self.sessions = Sessions()
        self.throttle = Throttle()
        # A separate environment from the rules' sandbox: these templates are ours, and HTML
        # wants autoescaping that the phones' XML does not.
        self.env = Environment(
            loader=PackageLoader("phonepush.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["clock"] = local_time
        self.env.filters["ago"] = ago
        self.env.filters["until"] = until
        self.env.filters["duration"] = format_duration
        files = resources.files("phonepush.console") / "static"
        self.assets = {name: (files / name).read_bytes() for name in _ASSETS}

    def render(
        self,
        template: str,
        identity: Identity | None,
        status: int = 200,
        *,
        headers: Mapping[str, str] | None = None,
        **context: Any,
    ) -> Response:
        context.setdefault("view", "")
        html = self.env.get_template(template).render(
            identity=identity, screens_on=self.state.screens is not None, **context
        )
        return _secure(HTMLResponse(html, status_code=status, headers=headers))

    def identify(self, request: Request, token: str) -> Identity | None:
        given = bearer_given(request)
        if given is not None:
            # compare_digest on bytes: constant time whatever the given token's content.
            if hmac.compare_digest(given.encode(), token.encode()):
                return Identity("bearer")
            return None
        session = request.cookies.get(COOKIE)
        return self.sessions.find(session, token) if session else None

    def public_url(self) -> str:
        # server.public_url, as the running configuration's pipeline carries it.
        return self.state.intake.pipeline.pages_url.removesuffix("/pages/")

    def disabled(self) -> Response:
        return self.render("disabled.html", None, 503, title="Console disabled")

    def refused(self, identity: Identity | None, status: int, message: str) -> Response:
        return self.render("error.html", identity, status, title="Refused", message=message)

    def page(self, handler: _Handler, *, write: bool = False) -> Callable[[Request], Any]:
        """``handler`` behind the console's access rules (and, for a write, CSRF checks)."""

        async def endpoint(request: Request) -> Response:
            token = self.state.token
            if token is None:
                return self.disabled()
            identity = self.identify(request, token)
            if identity is None:
                if bearer_given(request) is not None:
                    return self.render(
                        "error.html",
                        None,
                        401,
                        headers={"WWW-Authenticate": "Bearer"},
                        title="Not signed in",
                        message="Wrong bearer token.",
                    )
                # Back to the page after signing in; a form sent without a session is lost
                # (its action is no page to go back to).
                target = "/"
                if request.method == "GET":
                    target = request.url.path
                    if request.url.query:
                        target += "?" + request.url.query
                return _secure(
                    RedirectResponse(f"/signin?next={quote(target, safe='')}", status_code=303)
                )
            try:
                fields: dict[str, str] = {}
                if write:
                    if not same_origin(request, self.public_url()):
                        raise _Refused(403, "This form was sent from another site.")
                    fields = await _form(request)
                    if identity.kind == "session":
                        given = fields.get("csrf") or request.headers.get("x-csrf-token", "")
                        if not hmac.compare_digest(given.encode(), identity.csrf.encode()):
                            raise _Refused(
                                403, "The form's CSRF token is missing or stale: reload the page."
                            )
                return await handler(request, identity, fields)
            except _Refused as exc:
                return self.refused(identity, exc.status, str(exc))
            except SpoolError as exc:
                log.error("console: spool unavailable: %s", exc)
                return self.refused(identity, 503, "The spool is unavailable; try again shortly.")

        return endpoint


def console_routes(
    state: ConsoleState,
    *,
    event_status: EventStatus,
    parse_silence: ParseSilence,
    clock: Callable[[], float] = time.time,
) -> list[BaseRoute]:
    """The console over ``state``. ``event_status`` and ``parse_silence`` are the status and
    silences APIs' own (``phonepush.http``), so the console shows and validates as they do."""
    console = _Console(state, event_status=event_status, parse_silence=parse_silence, clock=clock)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        body = console.assets.get(name)
        if body is None:
            return _secure(Response("no such asset", status_code=404, media_type="text/plain"))
        return _secure(Response(body, media_type=_ASSETS[name]), cache=True)

    async def signin_form(request: Request) -> Response:
        token = state.token
        if token is None:
            return console.disabled()
        target = _safe_next(request.query_params.get("next", "/"))
        if console.identify(request, token) is not None:
            return _secure(RedirectResponse(target, status_code=303))
        return console.render("signin.html", None, title="Sign in", next=target, error="")

    async def signin(request: Request) -> Response:
        token = state.token
        if token is None:
            return console.disabled()
        address = request.client.host if request.client is not None else ""
        try:
            if not same_origin(request, console.public_url()):
                raise _Refused(403, "This form was sent from another site.")
            fields = await _form(request)
        except _Refused as exc:
            return console.refused(None, exc.status, str(exc))
        target = _safe_next(fields.get("next", "/"))
        if console.throttle.refused(address):
            return console.render(
                "signin.html",
                None,
                429,
                headers={"Retry-After": "60"},
                title="Sign in",
                next=target,
                error="Too many failed sign-ins: wait a minute and try again.",
            )
        given = fields.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            console.throttle.failed(address)
            log.warning("console: failed sign-in from %s", address)
            return console.render(
                "signin.html",
                None,
                401,
                title="Sign in",
                next=target,
                error="That is not the token (webhook.token).",
            )
        session, _ = console.sessions.create(token)
        log.info("console: signed in from %s", address)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            session,
            max_age=None,
            path="/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return _secure(response)

    async def signout(request: Request, identity: Identity, fields: dict[str, str]) -> Response:
        if identity.kind == "session":
            console.sessions.end(identity.session)
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return _secure(response)

    def phone_list() -> list[dict[str, Any]]:
        return state.health.phones() if state.health is not None else []

    async def phones(request: Request, identity: Identity, fields: dict[str, str]) -> Response:
        listed = phone_list()
        group = request.query_params.get("group", "")
        health = request.query_params.get("health", "")
        health = health if health in _HEALTH else ""
        in_group = [p for p in listed if not group or group in p["groups"]]
        counts = dict.fromkeys(_HEALTH, 0)
        for phone in in_group:
            counts[_health_of(phone)] += 1
        selected = [p for p in in_group if not health or _health_of(p) == health]
        pages = max(1, -(-len(selected) // PHONES_PER_PAGE))
        page = min(_page_number(request.query_params.get("page", "")), pages)
        start = (page - 1) * PHONES_PER_PAGE
        return console.render(
            "phones.html",
            identity,
            title="Phones",
            view="phones",
            phones=selected[start : start + PHONES_PER_PAGE],
            total=len(in_group),
            selected=len(selected),
            first=start + 1,
            counts=counts,
            health=health,
            page=page,
            pages=pages,
            groups=groups_of(listed),
            group=group,
            health_on=state.health is not None,
            interval=state.health.interval if state.health is not None else 0,
            now=console.clock(),
        )

    async def events(request: Request, identity: Identity, fields: dict[str, str]) -> Response:
        rule = request.query_params.get("rule", "")
        wanted = request.query_params.get("state", "")
        if wanted and wanted not in _STATES:
            wanted = ""
        rows = await event_rows(state.spool, rule=rule, state=wanted)
        return console.render(
            "events.html",
            identity,
            title="Events",
            view="events",
            events=rows,
            rules=list(dict.fromkeys([*(r.name for r in state.intake.rules.rules), _TEST_RULE])),
            states=_STATES,
            rule=rule,
            state=wanted,
            shown=EVENTS_SHOWN,
            now=console.clock(),
        )

    async def event(request: Request, identity: Identity, fields: dict[str, str]) -> Response:
        event_id = request.path_params["event_id"]
        record = await state.spool.events.get(event_id)
        if record is None:
            raise _Refused(404, "No such event: never stored, or purged since.")
        status = await console.event_status(state.spool, record)
        return console.render(
            "event.html",
            identity,
            title=f"Event {event_id}",
            view="events",
            event=status,
            timeline=timeline(status),
            now=console.clock(),
        )

    def silences_of() -> Silences:
        if state.silences is None:
            raise _Refused(503, "Silences are not available.")
        return state.silences

    async def silences_page(
        identity: Identity,
        status: int = 200,
        *,
        error: str = "",
        notice: str = "",
        form: Mapping[str, str] | None = None,
    ) -> Response:
        form = form or {}
        now = console.clock()
        return console.render(
            "silences.html",
            identity,
            status,
            title="Silences",
            view="silences",
            silences=[
                {**s.to_dict(now), "starts": s.starts_at, "ends": s.ends_at}
                for s in await silences_of().current()
            ],
            now=now,
            error=error,
            notice=notice,
            form={
                "matchers": form.get("matchers", ""),
                "duration": form.get("duration", "2h"),
                "comment": form.get("comment", ""),
                "created_by": form.get("created_by", "console"),
            },
        )

    def notice(request: Request) -> str:
        return _NOTICES.get(request.query_params.get("notice", ""), "")

    async def silence_create(
        request: Request, identity: Identity, fields: dict[str, str]
    ) -> Response:
        service = silences_of()
        now = console.clock()
        try:
            data = {
                "matchers": parse_matchers(fields.get("matchers", "")),
                "duration": fields.get("duration", "").strip(),
                "comment": fields.get("comment", ""),
                "createdBy": fields.get("created_by", "") or "console",
            }
            silence = console.parse_silence(data, now=now, silence_id=str(uuid.uuid4()))
            await service.add(silence)
        except ValueError as exc:
            return await silences_page(identity, 400, error=str(exc), form=fields)
        log.info(
            "console: silence %s created by %r for %s",
            silence.id,
            silence.created_by,
            ", ".join(f"{m.name}" for m in silence.matchers),
        )
        return _secure(RedirectResponse("/silences?notice=created", status_code=303))

    async def silence_expire(
        request: Request, identity: Identity, fields: dict[str, str]
    ) -> Response:
        silence_id = request.path_params["silence_id"]
        if not await silences_of().expire(silence_id):
            raise _Refused(404, "No such silence in force or scheduled.")
        return _secure(RedirectResponse("/silences?notice=expired", status_code=303))

    async def rules(request: Request, identity: Identity, fields: dict[str, str]) -> Response:
        return console.render(
            "rules.html",
            identity,
            title="Rules",
            view="rules",
            rules=await rule_rows(state.intake.rules, state.spool),
            now=console.clock(),
        )

    def test_form(
        identity: Identity,
        status: int = 200,
        *,
        error: str = "",
        form: Mapping[str, str] | None = None,
    ) -> Response:
        listed = phone_list()
        form = form or {}
        return console.render(
            "test_page.html",
            identity,
            status,
            title="Test page",
            view="test",
            phones=[p["name"] for p in listed],
            groups=groups_of(listed),
            error=error,
            form={
                "to": form.get("to", ""),
                "title": form.get("title", _TEST_TITLE),
                "text": form.get("text", _TEST_TEXT),
            },
        )

    async def test_page_form(
        request: Request, identity: Identity, fields: dict[str, str]
    ) -> Response:
        return test_form(identity)

    async def test_page(request: Request, identity: Identity, fields: dict[str, str]) -> Response:
        target = fields.get("to", "").strip()
        page = DirectPage(
            origin="console",
            rule=_TEST_RULE,
            to=(target,) if target else (),
            title=fields.get("title", "").strip(),
            text=fields.get("text", "").strip(),
            execute=("Play:Chime.raw",),
            priority=1,
            ttl=60.0,
        )
        try:
            accepted = await state.intake.page(page)
        except ConfigError as exc:
            return test_form(identity, 400, error=str(exc), form=fields)
        except SpoolFull:
            raise _Refused(503, "The spool is full; try again later.") from None
        log.info("console: test page %s to %r", accepted.event.id, target)
        return _secure(RedirectResponse(f"/events/{accepted.event.id}", status_code=303))

    def screens_of() -> Screens:
        if state.screens is None:
            raise _Refused(404, "No phone screens to show: they are shown by phonepush demo.")
        return state.screens

    async def screens(request: Request, identity: Identity, fields: dict[str, str]) -> Response:
        return console.render(
            "screens.html",
            identity,
            title="Screens",
            view="screens",
            screens=screens_of().screens(),
            notice=notice(request),
            error="",
        )

    async def press(request: Request, identity: Identity, fields: dict[str, str]) -> Response:
        shown = screens_of()
        position = fields.get("position", "")
        if not position.isdigit():
            raise _Refused(400, "position: a softkey position, 1-8")
        problem = await shown.press(request.path_params["phone"], int(position))
        if problem:
            return console.render(
                "screens.html",
                identity,
                409,
                title="Screens",
                view="screens",
                screens=shown.screens(),
                notice="",
                error=problem,
            )
        return _secure(RedirectResponse("/screens?notice=pressed", status_code=303))

    async def silences(request: Request, identity: Identity, fields: dict[str, str]) -> Response:
        # ?matchers=rule%3Ddoorbell: the form filled in from an event's or a rule's link.
        prefill = {"matchers": request.query_params.get("matchers", "")[:_MAX_FORM]}
        return await silences_page(identity, notice=notice(request), form=prefill)

    return [
        Route("/", console.page(phones), methods=["GET"]),
        Route("/signin", signin_form, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/signout", console.page(signout, write=True), methods=["POST"]),
        Route("/events", console.page(events), methods=["GET"]),
        Route("/events/{event_id}", console.page(event), methods=["GET"]),
        Route("/silences", console.page(silences), methods=["GET"]),
        Route("/silences", console.page(silence_create, write=True), methods=["POST"]),
        Route(
            "/silences/{silence_id}/expire",
            console.page(silence_expire, write=True),
            methods=["POST"],
        ),
        Route("/rules", console.page(rules), methods=["GET"]),
        Route("/test-page", console.page(test_page_form), methods=["GET"]),
        Route("/test-page", console.page(test_page, write=True), methods=["POST"]),
        Route("/screens", console.page(screens), methods=["GET"]),
        Route("/screens/{phone}/press", console.page(press, write=True), methods=["POST"]),
        Route("/assets/{name}", asset, methods=["GET"]),
    ]
