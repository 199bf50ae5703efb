"""The shipped Alertmanager recipe (config/examples/alertmanager.toml) driven by a real
Alertmanager: Debian's ``prometheus-alertmanager``, started here on a loopback port with cluster
gossip off, notifying the real daemon, which pages simulated phones.

Alerts are put in through Alertmanager's own API, as Prometheus does; what Alertmanager sends
(grouping, re-notification, resolved notifications, fingerprints, start times) is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import shutil
import tomllib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually, free_port
from _sim_fixtures import MakeFleet
from phonepush.sim.simulator import Fleet

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "examples" / "alertmanager.toml"
TOKEN = "alertmanager-test-token"
PHONES = ("noc-1", "noc-2")
#: Short waits so the test runs in seconds; the recipe does not depend on them.
ROUTE = """\
route:
  receiver: desk-phones
  group_by: [alertname]
  group_wait: 200ms
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: desk-phones
    webhook_configs:
      - url: {url}/hooks/alertmanager
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials: {token}
"""


def _binary() -> str:
    path = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if path is None:
        pytest.fail(
            "prometheus-alertmanager not found: install it with "
            "`apt-get install prometheus-alertmanager` (do not start the service it brings)"
        )
    return path


@contextlib.asynccontextmanager
async def alertmanager(tmp_path: Path, webhook_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A real Alertmanager notifying ``webhook_url``; yields a client for its API."""
    config = tmp_path / "alertmanager.yml"
    config.write_text(ROUTE.format(url=webhook_url, token=TOKEN))
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        _binary(),
        f"--config.file={config}",
        f"--storage.path={tmp_path / 'alertmanager-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no gossip: a single instance
        stdout=log,
        stderr=log,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def ready() -> bool:
                assert process.returncode is None, (tmp_path / "alertmanager.log").read_text()
                try:
                    return (await client.get("/-/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, timeout=20)
            yield client
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


def _alert(instance: str, *, resolved: bool = False) -> dict[str, Any]:
    alert: dict[str, Any] = {
        "labels": {"alertname": "DiskFull", "instance": instance, "severity": "critical"},
        "annotations": {"summary": f"Disk /srv is 97% full on {instance}"},
        "generatorURL": "http://prometheus:9090/graph",
    }
    if resolved:
        alert["endsAt"] = datetime.now(UTC).isoformat()
    return alert


async def _put(client: httpx.AsyncClient, *alerts: dict[str, Any]) -> None:
    answer = await client.post("/api/v2/alerts", json=list(alerts))
    assert answer.status_code == 200, answer.text


async def _start_daemon(runner: DaemonRunner, fleet: Fleet) -> None:
    data: dict[str, Any] = copy.deepcopy(tomllib.loads(EXAMPLE.read_text()))
    for key in ("server", "spool"):
        data.pop(key, None)  # the runner's own port and spool
    data["webhook"] = {"token": TOKEN}
    for phone in data["phones"]:
        phone["host"] = fleet.phone(phone["name"]).address
        phone.pop("username", None)
        phone.pop("password_file", None)
    await runner.start(data)


async def test_real_alertmanager_grow_resolve_and_fire_again(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, tmp_path: Path
) -> None:
    fleet = await make_fleet(phones=2, names=list(PHONES), tone_ms=10)
    await _start_daemon(daemon_runner, fleet)

    def delivered(phone: str) -> float:
        return daemon_runner.metric("phonepush_deliveries_total", phone=phone, result="delivered")

    async def shown(title: str, count: int) -> None:
        def check() -> bool:
            return all(
                fleet.phone(p).state.screen.title == title and delivered(p) == count for p in PHONES
            )

        try:
            await eventually(check, timeout=20)
        except AssertionError:
            screens = {p: fleet.phone(p).state.screen.title for p in PHONES}
            raise AssertionError(f"phones show {screens}, not {title!r} x{count}") from None

    hosts = ("nas:9100", "nas2:9100", "nas3:9100")
    async with alertmanager(tmp_path, daemon_runner.url) as am:
        await _put(am, _alert(hosts[0]), _alert(hosts[1]))
        await shown("DiskFull (2)", 1)

        # A third alert joins the group: Alertmanager notifies again, and the phones show 3.
        await _put(am, _alert(hosts[2]))
        await shown("DiskFull (3)", 2)
        for phone in PHONES:
            text = fleet.phone(phone).state.screen.text
            assert all(f"{host}: Disk /srv is 97% full on {host}" in text for host in hosts)

        # Resolved: one quiet page per phone, listing the alerts.
        await _put(am, *(_alert(host, resolved=True) for host in hosts))
        await shown("Resolved: DiskFull (3)", 3)
        for phone in PHONES:
            screen = fleet.phone(phone).state.screen
            assert all(host in screen.text for host in hosts), screen

        # The alert fires again 5 s later: a new page at once.
        await asyncio.sleep(5)
        await _put(am, _alert(hosts[0]))
        await shown("DiskFull (1)", 4)

    for phone in PHONES:
        # Four pages, no more: no second resolved page, nothing swallowed.
        assert fleet.phone(phone).state.pushes == 4
        assert list(fleet.phone(phone).state.tones) == ["Alarm.raw"] * 3
    assert daemon_runner.metric("phonepush_resolved_total", rule="alert-firing") == 1
