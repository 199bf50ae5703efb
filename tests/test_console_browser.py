"""The console in a real browser: Debian's chromium driven by Playwright (nothing downloaded),
against a real daemon and simulated phones in this process, as ``phonepush demo`` runs them.

One browser and one daemon for the module; each test has its own browser context (cookies) and
fails on any script error, console error or failed request the page saw."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from _daemon_fixtures import eventually, free_port
from phonepush.app.daemon import Daemon
from phonepush.commands.demo import FleetScreens
from phonepush.config import parse_config
from phonepush.sim.simulator import Fleet

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-token-5678"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NAMES = ("lobby", "office", "server-room")

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="chromium is not installed"),
]


@dataclass
class Stack:
    fleet: Fleet
    url: str
    browser: Any


@dataclass
class Watched:
    """A page and what went wrong on it."""

    page: Any
    problems: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.problems == []


def _config(fleet: Fleet, port: int, spool: Path) -> dict[str, Any]:
    groups = {"lobby": ["frontdesk"], "office": ["frontdesk", "it"], "server-room": ["it"]}
    return {
        "server": {"listen": f"127.0.0.1:{port}"},
        "spool": {"path": str(spool)},
        "webhook": {"token": TOKEN},
        "dispatch": {"retry_initial": "50ms", "retry_max": "200ms"},
        "health": {"interval": "1s"},
        "phones": [
            {"name": p.name, "host": p.address, "groups": groups[p.name], "timeout": "1s"}
            for p in fleet.phones
        ],
        "rules": [
            {
                "name": "doorbell",
                "on": "webhook:doorbell",
                "to": ["frontdesk"],
                "execute": ["Play:Chime.raw"],
                "message": {"title": "Doorbell", "text": "Someone at the {{ payload.door }}"},
                "ack": True,
            }
        ],
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    spool = tmp_path_factory.mktemp("console-browser") / "spool.db"
    async with Fleet(3, names=NAMES, tone_ms=10) as fleet:
        port = free_port()
        config = parse_config(_config(fleet, port, spool), environ={})
        daemon = Daemon(
            config, registry=CollectorRegistry(), drain_timeout=2, screens=FleetScreens(fleet)
        )
        task = asyncio.create_task(daemon.run(), name="console-daemon")
        await asyncio.wait_for(daemon.ready.wait(), 10)
        try:
            async with playwright_api.async_playwright() as driver:
                browser = await driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    yield Stack(fleet, f"http://127.0.0.1:{port}", browser)
                finally:
                    await browser.close()
        finally:
            daemon.stop()
            await asyncio.wait_for(task, 15)


@pytest_asyncio.fixture(loop_scope="module")
async def watched(stack: Stack) -> AsyncIterator[Watched]:
    # A phone-sized window: the console must work there.
    context = await stack.browser.new_context(
        base_url=stack.url, viewport={"width": 390, "height": 844}
    )
    page = await context.new_page()
    seen = Watched(page)
    page.on("pageerror", lambda error: seen.problems.append(f"script error: {error}"))
    page.on(
        "console",
        lambda message: (
            seen.problems.append(f"console {message.type}: {message.text}")
            if message.type in ("error", "warning")
            else None
        ),
    )

    def failed(request: Any) -> None:
        # ERR_ABORTED is the browser cutting a load short because the page navigated on (the
        # live update's fetch when a form is sent, a stylesheet when the test moves to the next
        # page): not the console failing. What the server answered is checked below.
        if request.failure == "net::ERR_ABORTED":
            return
        seen.problems.append(f"request failed: {request.url} {request.failure}")

    def answered(response: Any) -> None:
        if response.status >= 400:
            seen.problems.append(f"HTTP {response.status}: {response.url}")

    page.on("requestfailed", failed)
    page.on("response", answered)
    try:
        yield seen
    finally:
        await context.close()


async def _sign_in(page: Any, path: str = "/") -> None:
    await page.goto(path)
    assert "/signin" in page.url
    await page.fill("input[name=token]", TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"**{path}")


async def _mark(page: Any) -> None:
    """Something only this document has: gone if the page reloads."""
    await page.evaluate("window.consoleTestMark = 1")


async def _still_marked(page: Any) -> bool:
    return bool(await page.evaluate("window.consoleTestMark === 1"))


async def test_sign_in_see_the_phones_and_one_go_unreachable_live(
    stack: Stack, watched: Watched
) -> None:
    page = watched.page
    expect = playwright_api.expect
    await _sign_in(page)
    for name in NAMES:
        await expect(page.locator(f"tr[data-phone='{name}'] .badge.up")).to_be_visible()
    await expect(page.locator("tr[data-phone='office']")).to_contain_text("CP-8841")
    # Nothing overflows sideways on a phone-sized screen.
    assert await page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )
    await _mark(page)
    await stack.fleet.phone("server-room").set_fault("refuse")
    try:
        # Within one health interval (1 s, and its 1 s timeout), without a reload.
        await expect(page.locator("tr[data-phone='server-room'] .badge.down")).to_be_visible(
            timeout=8000
        )
    finally:
        await stack.fleet.phone("server-room").set_fault("none")
    assert await _still_marked(page)
    await page.click("a[href='/?group=it']")
    await expect(page.locator("tr[data-phone]")).to_have_count(2)
    # The rows are there as soon as the document is parsed; its CSS and script may still be
    # loading, and going on to the next page then would cut them off (ERR_ABORTED).
    await page.wait_for_load_state("load")
    for path in ("/events", "/silences", "/rules", "/test-page", "/screens"):
        await page.goto(path)
        assert await page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        ), f"{path} overflows a phone-sized screen"
    watched.assert_clean()


async def test_an_event_arrives_live_and_its_timeline_shows(stack: Stack, watched: Watched) -> None:
    page = watched.page
    expect = playwright_api.expect
    await _sign_in(page, "/events")
    await _mark(page)
    async with httpx.AsyncClient(base_url=stack.url, headers=AUTH) as client:
        answer = await client.post("/hooks/doorbell", json={"door": "back door"})
    event_id = answer.json()["event"]
    row = page.locator(f"tr[data-event='{event_id}']")
    await expect(row).to_contain_text("delivered", timeout=8000)
    await expect(row).to_contain_text("lobby")
    assert await _still_marked(page)
    await row.locator("a").click()
    await page.wait_for_url(f"**/events/{event_id}")
    timeline = page.locator("ol.timeline")
    await expect(timeline).to_contain_text("accepted from webhook doorbell")
    await expect(timeline).to_contain_text("pushed to office")
    watched.assert_clean()


async def test_create_and_expire_a_silence(stack: Stack, watched: Watched) -> None:
    page = watched.page
    expect = playwright_api.expect
    await _sign_in(page, "/silences")
    await page.fill("textarea[name=matchers]", "rule=doorbell\nphone=lobby")
    await page.fill("input[name=duration]", "30m")
    await page.fill("input[name=comment]", "replacing the lobby phone")
    await page.click("button:has-text('Create silence')")
    await expect(page.locator(".notice")).to_have_text("Silence created.")
    row = page.locator("tr[data-silence]")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("phone=lobby")
    await expect(row).to_contain_text("replacing the lobby phone")
    async with httpx.AsyncClient(base_url=stack.url, headers=AUTH) as client:
        assert len((await client.get("/api/silences")).json()) == 1
        await row.locator("button", has_text="Expire").click()
        await expect(page.locator(".notice")).to_have_text("Silence expired.")
        await expect(page.locator("tr[data-silence]")).to_have_count(0)
        assert (await client.get("/api/silences")).json() == []
    watched.assert_clean()


async def test_send_a_test_page_that_the_phone_receives(stack: Stack, watched: Watched) -> None:
    page = watched.page
    expect = playwright_api.expect
    lobby = stack.fleet.phone("lobby")
    await _sign_in(page, "/test-page")
    await page.select_option("select[name=to]", "lobby")
    await page.fill("textarea[name=text]", "Testing the lobby phone")
    await page.click("form.stack button[type=submit]")
    await page.wait_for_url("**/events/*")
    await eventually(lambda: lobby.state.screen.text == "Testing the lobby phone")
    assert lobby.state.screen.title == "Test page"
    assert "Play:Chime.raw" in lobby.state.executed
    await expect(page.locator("ol.timeline")).to_contain_text("pushed to lobby", timeout=8000)
    watched.assert_clean()


async def test_the_demo_screens_show_the_page_and_its_softkeys_press(
    stack: Stack, watched: Watched
) -> None:
    page = watched.page
    expect = playwright_api.expect
    office = stack.fleet.phone("office")
    async with httpx.AsyncClient(base_url=stack.url, headers=AUTH) as client:
        await client.post("/hooks/doorbell", json={"door": "side door"})
    await eventually(lambda: office.state.screen.text == "Someone at the side door")
    await _sign_in(page, "/screens")
    screen = page.locator("article[data-screen='office']")
    await expect(screen.locator(".lcd-title")).to_have_text("Doorbell")
    await expect(screen.locator(".lcd-text")).to_have_text("Someone at the side door")
    await screen.locator("button", has_text="Ack").click()
    await expect(page.locator(".notice")).to_have_text("Softkey pressed.")
    assert office.state.presses[-1]["name"] == "Ack"
    # What the phone shows now is the ack's answer, as the phone got it.
    await expect(screen.locator(".lcd-title")).to_have_text(office.state.screen.title)
    watched.assert_clean()
