"""Regenerate docs/console.png, the console screenshot in README.md.

Runs what ``phonepush demo`` runs (three simulated phones, the demo's configuration, the daemon
in this process), fires a few events (a doorbell acknowledged on one phone, an Alertmanager
alert, a doorbell a silence holds back on one phone, a test page), signs in with Debian's
chromium through Playwright and saves the view asked for:

    .venv/bin/python docs/tools/console_screenshot.py [--view /events] [--out docs/console.png]

Needs the ``dev`` extra (Playwright) and ``chromium`` (``apt-get install chromium``); nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
from pathlib import Path

import httpx
from playwright.async_api import async_playwright

from phonepush.app.daemon import Daemon
from phonepush.commands.demo import _PHONES, TOKEN, FleetScreens, demo_config
from phonepush.sim.simulator import Fleet

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
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _events(url: str, fleet: Fleet, daemon: Daemon) -> None:
    running = daemon.running
    assert running is not None
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        await c.post("/hooks/doorbell", json={"action": "single", "door": "front door"})
        await running.dispatcher.wait_idle()
        await fleet.phone("lobby").press(name="Ack")
        await c.post(
            "/hooks/alertmanager",
            json={
                "status": "firing",
                "groupKey": "disk",
                "commonLabels": {"alertname": "DiskFull"},
                "commonAnnotations": {"summary": "/var on nas1 is 97% full"},
            },
        )
        await c.post(
            "/api/silences",
            json={
                "matchers": [{"name": "phone", "value": "office"}],
                "duration": "1h",
                "comment": "office closed today",
                "createdBy": "facilities",
            },
        )
        await asyncio.sleep(2.2)  # past the doorbell's 2 s cooldown
        await c.post("/hooks/doorbell", json={"action": "double", "door": "back door"})
        await c.post(
            "/test-page",
            data={"to": "server-room", "title": "Test page", "text": "Checking the rack phone"},
        )
        await running.dispatcher.wait_idle()
        await asyncio.sleep(0.5)


async def main(view: str, out: Path) -> None:
    names = [name for name, _ in _PHONES]
    with tempfile.TemporaryDirectory(prefix="phonepush-shot-") as tmp:
        async with Fleet(len(names), names=names, tone_ms=50) as fleet:
            port = _free_port()
            config = demo_config(port, fleet.phones, Path(tmp) / "spool.db")
            daemon = Daemon(config, drain_timeout=2, screens=FleetScreens(fleet))
            task = asyncio.create_task(daemon.run())
            await asyncio.wait_for(daemon.ready.wait(), 10)
            url = f"http://127.0.0.1:{port}"
            try:
                await _events(url, fleet, daemon)
                async with async_playwright() as driver:
                    browser = await driver.chromium.launch(
                        executable_path=CHROMIUM, args=CHROMIUM_ARGS
                    )
                    page = await browser.new_page(
                        base_url=url, viewport={"width": 1280, "height": 800}
                    )
                    await page.goto(f"/signin?next={view}")
                    await page.fill("input[name=token]", TOKEN)
                    await page.click("button[type=submit]")
                    await page.wait_for_url(f"**{view}")
                    await page.screenshot(path=str(out))
                    await browser.close()
            finally:
                daemon.stop()
                await task
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--view", default="/events", help="the console path to show")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console.png")
    args = parser.parse_args()
    asyncio.run(main(args.view, args.out.resolve()))
