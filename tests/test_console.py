"""The web console over plain HTTP, against a real daemon and simulated phones: access (sign-in,
session cookie, bearer, throttle, disabled without a token), CSRF and origin checks on writes,
the Content-Security-Policy on every answer, and what the views and forms do. The browser's
side is tests/test_console_browser.py."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from _daemon_fixtures import DaemonRunner, eventually
from _sim_fixtures import MakeFleet
from phonepush.console import CSP
from phonepush.console.auth import MAX_FAILURES, Sessions, same_origin
from phonepush.console.views import parse_matchers
from phonepush.http.server import ServerState, create_app
from phonepush.metrics import Metrics
from phonepush.sim.simulator import Fleet

TOKEN = "console-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Every console page; each needs credentials.
PAGES = ["/", "/events", "/events/nope", "/silences", "/rules", "/test-page", "/screens"]
WRITES = ["/silences", "/silences/x/expire", "/test-page", "/screens/lobby/press", "/signout"]


def _config(fleet: Fleet, *, token: str | None = TOKEN) -> dict[str, Any]:
    lobby, office = fleet.phones
    config: dict[str, Any] = {
        "health": {"interval": "1s"},
        "phones": [
            {"name": "lobby", "host": lobby.address, "groups": ["frontdesk"]},
            {"name": "office", "host": office.address, "groups": ["frontdesk", "it"]},
        ],
        "rules": [
            {
                "name": "doorbell",
                "on": "webhook:doorbell",
                "to": ["frontdesk"],
                "execute": ["Play:Chime.raw"],
                "message": {"title": "Doorbell", "text": "{{ payload.door }}"},
            },
            {"name": "it-alert", "on": "webhook:alert", "to": ["it"], "execute": ["Key:Headset"]},
        ],
    }
    if token is not None:
        config["webhook"] = {"token": token}
    return config


async def _start(runner: DaemonRunner, fleet: Fleet, **kwargs: Any) -> httpx.AsyncClient:
    await runner.start(_config(fleet, **kwargs))
    return httpx.AsyncClient(base_url=runner.url)


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "no CSRF field on the page"
    return found.group(1)


async def _sign_in(client: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    return await client.post("/signin", data={"token": token, "next": "/"})


@pytest.fixture
async def fleet(make_fleet: MakeFleet) -> Fleet:
    return await make_fleet(phones=2, names=["lobby", "office"], tone_ms=10)


async def test_without_credentials_every_page_and_write_leads_to_sign_in(
    daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    async with await _start(daemon_runner, fleet) as client:
        for path in PAGES:
            answer = await client.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith("/signin?next=")
            assert answer.headers["content-security-policy"] == CSP
        for path in WRITES:
            answer = await client.post(path, data={"csrf": "x"})
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith("/signin")
        form = await client.get("/signin?next=%2Fevents")
        assert form.status_code == 200
        assert 'type="password"' in form.text and 'name="token"' in form.text
        assert "phones" not in form.text.lower().split("<main>")[1]
        # The assets are public (the sign-in page needs them) and come from the daemon.
        css = await client.get("/assets/console.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert css.headers["content-security-policy"] == CSP
        assert (await client.get("/assets/../server.py")).status_code == 404
        assert (await client.get("/assets/nope.js")).status_code == 404


async def test_the_existing_routes_answer_as_before(
    daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    async with await _start(daemon_runner, fleet) as client:
        assert (await client.get("/healthz")).text == "ok"
        assert (await client.get("/api/phones")).status_code == 401
        assert (await client.get("/api/silences")).status_code == 401
        assert (await client.get("/api/events/nope", headers=AUTH)).status_code == 404
        hook = await client.post("/hooks/doorbell", json={"door": "x"}, headers=AUTH)
        assert hook.status_code == 202
        # None of them gained the console's headers.
        assert "content-security-policy" not in hook.headers


def test_the_route_list_is_pinned() -> None:
    """The HTTP routes are a contract: the console added its own, and changed none."""
    state = ServerState(intake=None, spool=None, metrics=Metrics(CollectorRegistry()))  # type: ignore[arg-type]
    routes = [
        (route.path, tuple(sorted(route.methods or ())))  # type: ignore[attr-defined]
        for route in create_app(state).routes
    ]
    assert routes == [
        ("/hooks/{name}", ("POST",)),
        ("/pages/{page_id}", ("GET", "HEAD")),
        ("/metrics", ("GET", "HEAD")),
        ("/healthz", ("GET", "HEAD")),
        ("/readyz", ("GET", "HEAD")),
        ("/api/silences", ("POST",)),
        ("/api/silences", ("GET", "HEAD")),
        ("/api/silences/{silence_id}", ("GET", "HEAD")),
        ("/api/silences/{silence_id}", ("DELETE",)),
        ("/pages/{page_id}/{token}", ("GET", "HEAD")),
        ("/ack/{token}", ("GET", "HEAD", "POST")),
        ("/act/{token}", ("GET", "HEAD", "POST")),
        ("/api/events/{event_id}", ("GET", "HEAD")),
        ("/api/phones", ("GET", "HEAD")),
        ("/authenticate", ("GET", "HEAD", "POST")),
        # The console.
        ("/", ("GET", "HEAD")),
        ("/signin", ("GET", "HEAD")),
        ("/signin", ("POST",)),
        ("/signout", ("POST",)),
        ("/events", ("GET", "HEAD")),
        ("/events/{event_id}", ("GET", "HEAD")),
        ("/silences", ("GET", "HEAD")),
        ("/silences", ("POST",)),
        ("/silences/{silence_id}/expire", ("POST",)),
        ("/rules", ("GET", "HEAD")),
        ("/test-page", ("GET", "HEAD")),
        ("/test-page", ("POST",)),
        ("/screens", ("GET", "HEAD")),
        ("/screens/{phone}/press", ("POST",)),
        ("/assets/{name}", ("GET", "HEAD")),
    ]


async def test_without_a_token_the_console_is_disabled_not_open(
    daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    async with await _start(daemon_runner, fleet, token=None) as client:
        for answer in (
            await client.get("/"),
            await client.get("/signin"),
            await client.post("/signin", data={"token": ""}),
            await client.get("/events", headers={"Authorization": "Bearer x"}),
        ):
            assert answer.status_code == 503
            assert "webhook.token" in answer.text
            assert answer.headers["content-security-policy"] == CSP
            assert "set-cookie" not in answer.headers


async def test_sign_in_gives_a_strict_http_only_session_that_sign_out_ends(
    daemon_runner: DaemonRunner, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with await _start(daemon_runner, fleet) as client:
        answer = await client.post("/signin", data={"token": TOKEN, "next": "/rules"})
        assert answer.status_code == 303 and answer.headers["location"] == "/rules"
        cookie = answer.headers["set-cookie"]
        session = cookie.split(";", 1)[0].split("=", 1)[1]
        attributes = [part.strip().lower() for part in cookie.split(";")[1:]]
        assert {"httponly", "path=/", "samesite=strict"} <= set(attributes)
        assert "secure" not in attributes  # plain http here; https requests get Secure
        assert len(session) >= 40 and TOKEN not in cookie

        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-security-policy"] == CSP
        assert page.headers["x-frame-options"] == "DENY"
        assert "<script>" not in page.text and " style=" not in page.text
        # Sign-out needs the CSRF token too, then the session is gone for good.
        assert (await client.post("/signout", data={"csrf": ""})).status_code == 403
        out = await client.post("/signout", data={"csrf": _csrf(page.text)})
        assert out.status_code == 303 and out.headers["location"] == "/signin"
        client.cookies.set("phonepush_console", session)
        assert (await client.get("/")).status_code == 303
    # The daemon's own lines (the test's HTTP client logs what it sends at debug).
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("phonepush"))
    assert TOKEN not in logged and session not in logged
    assert "console: signed in from 127.0.0.1" in logged


async def test_sign_in_goes_back_only_to_this_site(
    daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    async with await _start(daemon_runner, fleet) as client:
        for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
            answer = await client.post("/signin", data={"token": TOKEN, "next": target})
            assert answer.headers["location"] == "/", target


async def test_wrong_tokens_are_refused_then_throttled(
    daemon_runner: DaemonRunner, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with await _start(daemon_runner, fleet) as client:
        for _ in range(MAX_FAILURES):
            answer = await _sign_in(client, "guess")
            assert answer.status_code == 401
            assert "set-cookie" not in answer.headers
        # Now even the right token is refused unexamined, from this address, for a while.
        answer = await _sign_in(client)
        assert answer.status_code == 429 and "set-cookie" not in answer.headers
        assert "Too many failed sign-ins" in answer.text
        # A bearer token is a separate credential and still works.
        assert (await client.get("/", headers=AUTH)).status_code == 200
    assert not any(
        "guess" in r.getMessage() for r in caplog.records if r.name.startswith("phonepush")
    )


async def test_writes_need_the_sessions_csrf_token_and_this_origin(
    daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    async with await _start(daemon_runner, fleet) as client:
        await _sign_in(client)
        csrf = _csrf((await client.get("/silences")).text)
        silence = {
            "matchers": "rule=doorbell",
            "duration": "1h",
            "comment": "fixing the bell",
            "created_by": "tests",
        }
        assert (await client.post("/silences", data=silence)).status_code == 403
        assert (
            await client.post("/silences", data={**silence, "csrf": "x" + csrf})
        ).status_code == 403
        foreign = await client.post(
            "/silences",
            data={**silence, "csrf": csrf},
            headers={"Origin": "http://evil.example"},
        )
        assert foreign.status_code == 403 and "another site" in foreign.text
        listed = await client.get("/api/silences", headers=AUTH)
        assert listed.json() == []

        created = await client.post(
            "/silences", data={**silence, "csrf": csrf}, headers={"Origin": daemon_runner.url}
        )
        assert created.status_code == 303
        assert created.headers["location"] == "/silences?notice=created"
        [made] = (await client.get("/api/silences", headers=AUTH)).json()
        assert made["matchers"] == [
            {"name": "rule", "value": "doorbell", "isRegex": False, "isEqual": True}
        ]
        assert made["comment"] == "fixing the bell" and made["createdBy"] == "tests"
        listed_page = (await client.get("/silences")).text
        assert f'data-silence="{made["id"]}"' in listed_page
        assert re.search(r"in (1 h|59 min)", listed_page)
        # The same service as the API: the event is held, the reason is on the events view.
        await client.post("/hooks/doorbell", json={"door": "front"}, headers=AUTH)
        events = (await client.get("/events?state=suppressed")).text
        assert "suppressed" in events and "silence" in events and "fixing the bell" not in events

        expired = await client.post(f"/silences/{made['id']}/expire", data={"csrf": csrf})
        assert expired.status_code == 303
        assert (await client.get("/api/silences", headers=AUTH)).json() == []
        # A form that is wrong says what is wrong, and keeps what was typed.
        wrong = await client.post(
            "/silences", data={**silence, "matchers": "colour=red", "csrf": csrf}
        )
        assert wrong.status_code == 400
        assert "matcher name &#39;colour&#39;" in wrong.text and "fixing the bell" in wrong.text


async def test_a_bearer_token_opens_every_page_and_write_without_csrf(
    daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    async with await _start(daemon_runner, fleet) as client:
        for path in PAGES[:3] + PAGES[3:6]:
            answer = await client.get(path, headers=AUTH)
            assert answer.status_code == (404 if path == "/events/nope" else 200), path
        # Nothing shows screens outside the demo.
        assert (await client.get("/screens", headers=AUTH)).status_code == 404
        wrong = await client.get("/", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        created = await client.post(
            "/silences",
            data={"matchers": "phone=lobby", "duration": "5m", "comment": "c"},
            headers=AUTH,
        )
        assert created.status_code == 303


async def test_the_test_page_goes_through_the_pipeline_to_the_phones(
    daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    lobby, office = fleet.phones
    async with await _start(daemon_runner, fleet) as client:
        form = (await client.get("/test-page", headers=AUTH)).text
        assert '<option value="frontdesk"' in form and '<option value="office"' in form
        sent = await client.post(
            "/test-page",
            data={"to": "office", "title": "Test page", "text": "Hello office"},
            headers=AUTH,
        )
        assert sent.status_code == 303
        event_id = sent.headers["location"].removeprefix("/events/")
        await eventually(lambda: office.state.screen.text == "Hello office")
        assert office.state.screen.title == "Test page"
        assert "Play:Chime.raw" in office.state.executed
        assert lobby.state.pushes == 0
        status = (await client.get(f"/api/events/{event_id}", headers=AUTH)).json()
        assert status["source"] == "console" and status["rules"] == ["test-page"]

        async def delivered() -> bool:
            page = (await client.get(f"/events/{event_id}", headers=AUTH)).text
            return "pushed to office" in page

        await eventually(delivered)
        page = (await client.get(f"/events/{event_id}", headers=AUTH)).text
        assert "accepted from console" in page
        assert (
            daemon_runner.metric("phonepush_deliveries_total", phone="office", result="delivered")
            == 1
        )

        unknown = await client.post(
            "/test-page", data={"to": "attic", "title": "t", "text": "x"}, headers=AUTH
        )
        assert unknown.status_code == 400
        assert "to: no phone or group named &#39;attic&#39;" in unknown.text
        nobody = await client.post(
            "/test-page", data={"to": "", "title": "t", "text": "x"}, headers=AUTH
        )
        assert nobody.status_code == 400 and "to: name at least one phone or group" in nobody.text


async def test_views_show_phones_events_and_rules(
    daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    async with await _start(daemon_runner, fleet) as client:
        client.headers.update(AUTH)

        async def both_reachable() -> bool:
            return (await client.get("/")).text.count('class="badge up"') == 2

        await eventually(both_reachable)
        grouped = (await client.get("/?group=it")).text
        assert 'data-phone="office"' in grouped and 'data-phone="lobby"' not in grouped

        hook = await client.post("/hooks/doorbell", json={"door": "<b>back</b>"})
        event_id = hook.json()["event"]
        await eventually(lambda: fleet.phones[0].state.pushes == 1)
        events = (await client.get("/events?rule=doorbell")).text
        assert f'data-event="{event_id}"' in events
        assert (await client.get("/events?rule=it-alert")).text.count("data-event=") == 0

        async def counted() -> bool:
            rules = (await client.get("/rules")).text
            return "2 delivered" in rules

        await eventually(counted)
        rules = (await client.get("/rules")).text
        assert "<code>webhook:doorbell</code>" in rules and "lobby, office" in rules
        # A rule's (and an event's) Silence link opens the form with its matcher filled in.
        assert '<a href="/silences?matchers=rule%3Ddoorbell">' in rules
        prefilled = (await client.get("/silences?matchers=rule%3Ddoorbell")).text
        assert ">rule=doorbell</textarea>" in prefilled
        # What came from the network is shown as text, never as markup.
        screen_text = fleet.phones[0].state.screen.text
        assert screen_text == "<b>back</b>"
        detail = (await client.get(f"/events/{event_id}")).text
        assert "<b>back</b>" not in detail


def test_sessions_end_when_the_token_changes_or_they_expire() -> None:
    now = [0.0]
    sessions = Sessions(ttl=60, clock=lambda: now[0])
    session, csrf = sessions.create("old")
    found = sessions.find(session, "old")
    assert found is not None and found.csrf == csrf
    # A reload that changed webhook.token: sessions made with the old one end.
    assert sessions.find(session, "new") is None
    assert sessions.find(session, "old") is None
    session, _ = sessions.create("old")
    now[0] = 61
    assert sessions.find(session, "old") is None


def test_matchers_are_typed_as_amtool_takes_them() -> None:
    assert parse_matchers("rule=doorbell\n\nphone!=lobby\ntopic=~zigbee/.*\nlabel.a!~x") == [
        {"name": "rule", "value": "doorbell", "isEqual": True, "isRegex": False},
        {"name": "phone", "value": "lobby", "isEqual": False, "isRegex": False},
        {"name": "topic", "value": "zigbee/.*", "isEqual": True, "isRegex": True},
        {"name": "label.a", "value": "x", "isEqual": False, "isRegex": True},
    ]
    with pytest.raises(ValueError, match="line 2"):
        parse_matchers("rule=a\njust words")


def test_writes_come_from_this_origin_or_the_public_urls() -> None:
    """Behind a proxy that rewrites Host, the browser's origin is server.public_url's."""

    def request(**headers: str) -> Request:
        raw = [(b"host", b"127.0.0.1:8080")]
        raw += [(k.encode(), v.encode()) for k, v in headers.items()]
        return Request(
            {
                "type": "http",
                "method": "POST",
                "scheme": "http",
                "path": "/silences",
                "query_string": b"",
                "headers": raw,
            }
        )

    public = "https://phonepush.example.org"
    assert same_origin(request(origin="http://127.0.0.1:8080"), public)
    assert same_origin(request(origin=public), public)
    assert not same_origin(request(origin=public))
    assert not same_origin(request(origin="https://evil.example"), public)
    assert not same_origin(request(referer="https://evil.example/x"), public)
    assert same_origin(request(referer=f"{public}/silences"), public)
    # A browser that says nothing: the CSRF token decides.
    assert same_origin(request())


async def test_a_reload_that_changes_the_token_signs_everyone_out(
    tmp_path: Path, daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    path = tmp_path / "phonepush.toml"

    def write(token: str) -> None:
        path.write_text(
            f'[server]\nlisten = "127.0.0.1:{daemon_runner.port}"\n'
            f'[spool]\npath = "{daemon_runner.spool}"\n'
            f'[webhook]\ntoken = "{token}"\n'
            f'[[phones]]\nname = "lobby"\nhost = "{fleet.phones[0].address}"\n',
            encoding="utf-8",
        )

    write(TOKEN)
    await daemon_runner.start_file(path)
    assert daemon_runner.daemon is not None
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        await _sign_in(client)
        assert (await client.get("/")).status_code == 200
        write("a-new-token-9876")
        daemon_runner.daemon.reload()

        async def signed_out() -> bool:
            return (await client.get("/")).status_code == 303

        await eventually(signed_out)
        assert (await _sign_in(client, "a-new-token-9876")).status_code == 303
        assert (await client.get("/")).status_code == 200


async def test_over_https_the_session_cookie_is_secure() -> None:
    """Behind a TLS proxy (server.trusted_proxies) the request's scheme is https."""
    intake = SimpleNamespace(pipeline=SimpleNamespace(pages_url="https://pp.example/pages/"))
    state = ServerState(intake, None, Metrics(CollectorRegistry()), token=TOKEN)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="https://pp.example") as client:
        answer = await client.post(
            "/signin", data={"token": TOKEN}, headers={"Origin": "https://pp.example"}
        )
    assert answer.status_code == 303
    attributes = [part.strip().lower() for part in answer.headers["set-cookie"].split(";")]
    assert "secure" in attributes and "httponly" in attributes


async def test_a_large_fleet_is_listed_a_page_at_a_time_with_health_filters(
    daemon_runner: DaemonRunner,
) -> None:
    # 450 phones nobody has reached yet (probes off, addresses that are never dialled): the
    # phones view lists 200 a page, says where it is, and filters on health within a group.
    phones = [
        {"name": f"p{i:03d}", "host": f"192.0.2.{i % 250 + 1}:{8000 + i}", "groups": [f"g{i % 3}"]}
        for i in range(450)
    ]
    config = {"health": {"interval": "0"}, "webhook": {"token": TOKEN}, "phones": phones}
    await daemon_runner.start(config)
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:

        async def rows(query: str) -> tuple[list[str], str]:
            page = await client.get("/" + query)
            assert page.status_code == 200
            return re.findall(r'<tr data-phone="([^"]+)"', page.text), page.text

        first, html = await rows("")
        assert first == [f"p{i:03d}" for i in range(200)]
        assert "1–200 of 450" in html and 'href="/?page=2" rel="next"' in html
        assert "any (450)" in html and "unknown (450)" in html and "unreachable (0)" in html
        last, html = await rows("?page=3")
        assert last == [f"p{i:03d}" for i in range(400, 450)]
        assert "401–450 of 450" in html and 'rel="next"' not in html
        beyond, _ = await rows("?page=99")
        assert beyond == last
        group, html = await rows("?group=g1&health=unknown")
        assert group == [f"p{i:03d}" for i in range(1, 450, 3)]
        assert "unknown (150)" in html and 'class="pager"' not in html
        none, html = await rows("?group=g1&health=unreachable")
        assert none == [] and "No unreachable phones in group g1." in html
