"""Two ``phonepush run`` processes on one PostgreSQL database, one simulated fleet: a burst of
webhooks to both, one instance SIGKILLed mid-burst, the rest to the survivor. Every (event, phone)
is pushed, duplicates stay within what the killed instance had on the wire, and no phone ever
gets two pushes at once. Then acks, silences and pages work through either instance.

Both instances name the survivor as their ``public_url`` (a load balancer's place in a real
deployment), so the pages and ack links the killed one rendered are served by the other."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from _daemon_fixtures import RunProcess, eventually, free_port, start_run_process
from _sim_fixtures import MakeFleet
from phonepush.sim.simulator import Fleet

TOKEN = "t0ken-for-the-cluster"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PHONES = ["p0", "p1", "p2", "p3"]
_PAGE = re.compile(r"/pages/([A-Za-z0-9_-]+)")

pytestmark = pytest.mark.slow


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _config(fleet: Fleet, url: str, port: int, public_port: int) -> str:
    lines = [
        "[server]",
        f'listen = "127.0.0.1:{port}"',
        f'public_url = "http://127.0.0.1:{public_port}"',
        "[spool]",
        f"url = {_toml(url)}",
        "[cluster]",
        'lease = "2s"',
        "[webhook]",
        f'token = "{TOKEN}"',
        "[dispatch]",
        'retry_initial = "50ms"',
        'retry_max = "200ms"',
        "[log]",
        'level = "info"',
    ]
    for phone in fleet.phones:
        lines += ["[[phones]]", f'name = "{phone.name}"', f'host = "{phone.address}"']
    rules: list[dict[str, Any]] = [
        {"name": "burst", "on": "webhook:burst", "to": ["all"], "ttl": "5m"},
        {"name": "quiet", "on": "webhook:quiet", "to": ["p2"], "ttl": "5m"},
        {
            "name": "paged",
            "on": "webhook:paged",
            "to": ["p3"],
            "ack": True,
            "repeat": "1s",
            "max_repeats": 30,
            "ttl": "5m",
        },
    ]
    for rule in rules:
        lines.append("[[rules]]")
        lines += [f"{k} = {_toml(v)}" for k, v in rule.items()]
        lines += ["[rules.message]", 'title = "Page"', 'text = "{{ payload.n }}"']
    return "\n".join(lines) + "\n"


class Instance:
    def __init__(self, tmp: Path, name: str, fleet: Fleet, url: str, public_port: int | None):
        self.port = free_port()
        self.path = tmp / f"{name}.toml"
        self.path.write_text(_config(fleet, url, self.port, public_port or self.port))
        self.process: RunProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = await start_run_process(self.path)

    def kill(self) -> None:
        assert self.process is not None
        self.process.proc.kill()

    async def stop(self) -> None:
        if self.process is not None and self.process.proc.returncode is None:
            self.process.proc.terminate()
            await self.process.wait(30)


@pytest.fixture
async def fleet(make_fleet: MakeFleet) -> Fleet:
    fleet = await make_fleet(phones=len(PHONES), names=PHONES, tone_ms=10)
    # Slow phones: when the instance dies, pushes to them are on the wire.
    await fleet.phone("p0").set_fault("slow", delay_ms=300)
    await fleet.phone("p1").set_fault("slow", delay_ms=150)
    return fleet


@contextlib.asynccontextmanager
async def _instances(*instances: Instance) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for instance in instances:
            with contextlib.suppress(Exception):
                await instance.stop()
            if instance.process is not None:
                print(f"--- {instance.path.name}\n{instance.process.output[-6000:]}")


async def _fire(client: httpx.AsyncClient, base: str, hook: str, n: int) -> str | None:
    try:
        answer = await client.post(f"{base}/hooks/{hook}", json={"n": n}, headers=AUTH)
    except httpx.TransportError:
        return None  # sent to the instance that was killed
    if answer.status_code != 202:
        return None
    event: str = answer.json()["event"]
    return event


_PAGES = "SELECT id, event_id FROM pages"
_PENDING = "SELECT event_id, phone FROM deliveries WHERE state = 'pending'"


def _received(
    requests: dict[str, list[dict[str, Any]]], pages: dict[str, str]
) -> collections.Counter[tuple[str, str]]:
    """How many times each (event, phone) page reached the phone, from its request records."""
    received: collections.Counter[tuple[str, str]] = collections.Counter()
    for name, records in requests.items():
        for record in records:
            for item in record.get("items", []):
                found = _PAGE.search(item["url"])
                if found and found.group(1) in pages:
                    received[(pages[found.group(1)], name)] += 1
    return received


def _rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


async def test_a_sigkilled_instance_loses_nothing_and_pushes_never_overlap(
    fleet: Fleet, pg_url: str, tmp_path: Path
) -> None:
    b = Instance(tmp_path, "b", fleet, pg_url, None)
    a = Instance(tmp_path, "a", fleet, pg_url, b.port)
    async with _instances(a, b), httpx.AsyncClient(timeout=30) as client:
        await b.start()
        await a.start()

        # The burst, to both instances; A dies in the middle of it.
        accepted: list[str] = []
        for n in range(24):
            event = await _fire(client, (a, b)[n % 2].url, "burst", n)
            if event is not None:
                accepted.append(event)
            if n == 15:
                await eventually(lambda: fleet.phone("p0").state.pushes >= 3, timeout=20)
                a.kill()
                assert a.process is not None
                await a.process.wait()
                # What A may have had on the wire or not yet recorded: requests the phones
                # had received (or were receiving: read once they are parsed) whose delivery
                # is still pending in the store.
                requests_then = {p: list(fleet.phone(p).state.requests) for p in PHONES}
                pending_then = set(await asyncio.to_thread(_rows, pg_url, _PENDING))
        for n in range(24, 40):
            event = await _fire(client, b.url, "burst", n)
            assert event is not None
            accepted.append(event)

        # Every accepted (event, phone) ends delivered, in the store...
        async def all_delivered() -> bool:
            rows = await asyncio.to_thread(
                _rows,
                pg_url,
                "SELECT count(*) FROM deliveries WHERE event_id = ANY(%s) AND state = 'delivered'",
                accepted,
            )
            return bool(rows[0][0] == len(accepted) * len(PHONES))

        await eventually(all_delivered, timeout=90)

        # ...and on the phones: each got every event's page, a few at most twice.
        pages = dict(await asyncio.to_thread(_rows, pg_url, _PAGES))
        received = _received({p: list(fleet.phone(p).state.requests) for p in PHONES}, pages)
        on_the_wire = set(_received(requests_then, pages)) & pending_then
        missing = [(e, p) for e in accepted for p in PHONES if received[(e, p)] == 0]
        assert missing == []
        duplicates = sum(count - 1 for count in received.values())
        # At most one push per phone was on the wire (or answered, not yet recorded) when A
        # died: only those can be pushed again by the survivor.
        twice = {pair: count for pair, count in received.items() if count > 1}
        # Pushed again only what A had on the wire (or answered and not yet recorded), once.
        assert set(twice) <= on_the_wire, (twice, on_the_wire)
        assert set(twice.values()) <= {2}
        assert {name: fleet.phone(name).state.overlaps for name in PHONES} == dict.fromkeys(
            PHONES, 0
        )
        print(
            f"accepted {len(accepted)} events; at the kill {len(on_the_wire)} pushes were"
            f" on the wire or unrecorded; {duplicates} pushed twice"
        )

        # A second instance again (a new process, a new id): acks, silences and pages work
        # through either instance.
        await a.start()
        paged = await _fire(client, a.url, "paged", 777)
        assert paged is not None
        p3 = fleet.phone("p3")
        await eventually(lambda: any(k.name == "Ack" for k in p3.state.screen.softkeys))
        shown = _PAGE.search(p3.state.screen.url or "")
        assert shown is not None
        page = await client.get(f"{b.url}/pages/{shown.group(1)}")
        assert page.status_code == 200 and "777" in page.text
        ack = next(k.url for k in p3.state.screen.softkeys if k.name == "Ack")
        token = ack.rsplit("/", 1)[1]
        answered = await client.get(f"{b.url}/ack/{token}")
        assert answered.status_code == 200, answered.text
        for instance in (a, b):
            status = await client.get(f"{instance.url}/api/events/{paged}", headers=AUTH)
            assert status.json()["alerts"][0]["state"] == "acknowledged"
        # Repeats stop (every second until then): nothing more comes after a few seconds.
        pushed = p3.state.pushes
        await asyncio.sleep(2.5)
        assert p3.state.pushes == pushed

        made = await client.post(
            f"{a.url}/api/silences",
            headers=AUTH,
            json={
                "matchers": [{"name": "rule", "value": "quiet"}],
                "duration": "1h",
                "createdBy": "ops",
                "comment": "cluster test",
            },
        )
        assert made.status_code == 201, made.text
        silence = made.json()["id"]

        async def b_knows_it() -> bool:
            listed = await client.get(f"{b.url}/api/silences", headers=AUTH)
            return any(s["id"] == silence for s in listed.json())

        await eventually(b_knows_it, timeout=10)
        quiet = await _fire(client, b.url, "quiet", 1)
        status = await client.get(f"{a.url}/api/events/{quiet}", headers=AUTH)
        (delivery,) = status.json()["deliveries"]
        assert delivery["state"] == "suppressed", delivery
