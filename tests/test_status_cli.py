"""``phonepush status --follow``, run as a command while the daemon works: a new event shows up
with its delivery pending, then the delivery's change to delivered once the phone answers; with
``--json`` the same as one JSON object a line. Ctrl-C ends it with status 0 and no traceback."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from _daemon_fixtures import DaemonRunner
from _sim_fixtures import MakeFleet
from phonepush.commands.status import Follower
from phonepush.events import Event
from phonepush.store.commit import commit_event
from phonepush.store.reader import SpoolReader
from phonepush.store.spool import NewDelivery, PushRequest, Spool

TOKEN = "status-follow-token"
EXECUTE = PushRequest("execute", "<CiscoIPPhoneExecute/>")
#: A guard against a hang, not a measure: each line is awaited at most this long.
LINE_WAIT = 30.0


class Following:
    """A ``phonepush status --follow`` process, read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.seen: list[str] = []

    async def until(self, wanted: Callable[[str], bool]) -> str:
        """Read lines until one is ``wanted``; that line."""
        assert self.proc.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), LINE_WAIT)
            assert raw, f"output ended; read so far: {self.seen}"
            line = raw.decode().rstrip("\n")
            self.seen.append(line)
            if wanted(line):
                return line

    async def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(self.proc.communicate(), LINE_WAIT)
        assert self.proc.returncode is not None
        return self.proc.returncode, err.decode()


async def follow(config: Path, *args: str) -> Following:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "phonepush",
        "status",
        "--config",
        str(config),
        "--follow",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return Following(proc)


async def test_follow_shows_a_new_event_then_its_delivery_getting_through(
    tmp_path: Path, daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=1, names=["lobby"], tone_ms=10)
    lobby = fleet.phone("lobby")
    path = tmp_path / "phonepush.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{daemon_runner.port}"
[spool]
path = "{daemon_runner.spool}"
[webhook]
token = "{TOKEN}"
[dispatch]
retry_initial = "50ms"
retry_max = "200ms"
[health]
interval = "0"
[[phones]]
name = "lobby"
host = "{lobby.address}"
[[rules]]
name = "alerts"
on = "webhook:alerts"
to = ["lobby"]
message = {{ title = "Alert", text = "{{{{ payload.msg }}}}" }}
""",
        encoding="utf-8",
    )
    # The phone is away: the delivery stays pending, retried, until it comes back.
    await lobby.set_fault("refuse")
    await daemon_runner.start_file(path)
    table = await follow(path)
    lines = await follow(path, "--json")
    first = await table.until(lambda line: True)
    assert first == f"{daemon_runner.spool}: no events with deliveries (--all lists every event)"

    async with httpx.AsyncClient(
        base_url=daemon_runner.url, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as client:
        answer = await client.post("/hooks/alerts", json={"msg": "smoke"})
    assert answer.status_code == 202, answer.text
    event_id = answer.json()["event"]

    row = await table.until(lambda line: event_id in line)
    assert row.split()[3:] == ["webhook:alerts", "alerts", "pending=1"]
    seen = json.loads(await lines.until(lambda line: event_id in line))
    assert seen["event"] == event_id
    assert [(d["phone"], d["state"]) for d in seen["deliveries"]] == [("lobby", "pending")]

    await lobby.set_fault("none")
    change = await table.until(lambda line: "-> delivered" in line)
    assert change.split()[2:] == [event_id, "lobby", "alerts", "pending", "->", "delivered"]
    while seen["deliveries"][0]["state"] == "pending":
        # Retries may show first (the error of each attempt), as the same event again.
        seen = json.loads(await lines.until(lambda line: event_id in line))
    assert seen["deliveries"][0]["state"] == "delivered"
    assert lobby.state.pushes == 1

    for process in (table, lines):
        code, err = await process.interrupt()
        assert (code, err) == (0, "")
    # Every line the JSON follower printed is an object of its own.
    assert all(isinstance(json.loads(line), dict) for line in lines.seen)


# -- what --follow prints, polled by hand over a spool the test writes ---------------------------


def new(phone: str, rule: str = "alerts", state: str = "pending", error: str = "") -> NewDelivery:
    return NewDelivery(rule, phone, (EXECUTE,), expires_at=9e9, state=state, error=error)


async def store(spool: Spool, topic: str, *deliveries: NewDelivery) -> str:
    event = Event("webhook", topic, b"{}")
    rules = sorted({d.rule for d in deliveries}) or ["alerts"]
    await commit_event(spool, event, rules=rules, deliveries=deliveries, pages={}, cooldowns=())
    return event.id


async def test_follow_prints_new_events_reasons_and_every_change(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    out = io.StringIO()
    async with Spool(path) as spool:
        held = await store(spool, "alerts", new("lobby", state="suppressed", error="cooldown"))
        with SpoolReader(path) as reader:
            follower = Follower(reader, out, every=False, json_lines=False)
            follower.start(reader.recent(20, every=False), "no events")
            table = out.getvalue().splitlines()
            assert table[1].split()[2:] == [held, "webhook:alerts", "alerts", "suppressed=1"]
            assert table[2:] == ["  lobby  suppressed  cooldown"]

            # An event that made no delivery is left out (no --all) ...
            quiet = await store(spool, "sensor")
            paged = await store(spool, "alerts", new("lobby"), new("desk", rule="night"))
            out.seek(0)
            out.truncate()
            follower.poll()
            (row,) = out.getvalue().splitlines()
            assert row.split()[2:] == [paged, "webhook:alerts", "alerts,night", "pending=2"]

            # ... until it has one (a resolve's page, say).
            [lobby, desk] = (d.id for d in reader.recent(1)[0].deliveries)
            await spool.deliveries.add(quiet, [new("lobby")])
            await spool.deliveries.progress(lobby, sent=0, attempts=1, error="Cannot connect")
            await spool.deliveries.finish(desk, "failed", "Error: the phone said no")
            out.seek(0)
            out.truncate()
            follower.poll()
            # Each line starts with a time ("2026-11-30 03:03:20  "), oldest event first.
            lines = [line[21:] for line in out.getvalue().splitlines()]
            assert lines == [
                f"{quiet}  webhook:sensor  alerts  pending=1",
                f"{paged}  lobby  alerts  pending, retrying  Cannot connect",
                f"{paged}  desk  night  pending -> failed  Error: the phone said no",
            ]

            # Nothing changed: nothing printed. Then a repeat round's new delivery.
            out.seek(0)
            out.truncate()
            follower.poll()
            assert out.getvalue() == ""
            await spool.deliveries.add(paged, [new("desk", rule="night")])
            follower.poll()
            (line,) = out.getvalue().splitlines()
            assert line.endswith(f"{paged}  desk  night  new pending")


async def test_follow_json_prints_the_whole_event_again_on_each_change(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    out = io.StringIO()
    async with Spool(path) as spool:
        with SpoolReader(path) as reader:
            follower = Follower(reader, out, every=True, json_lines=True, watched=3)
            follower.start([], "no events")
            assert out.getvalue() == ""
            first = await store(spool, "alerts", new("lobby"))
            follower.poll()
            (delivery,) = json.loads(out.getvalue())["deliveries"]
            await spool.deliveries.finish(delivery["id"], "delivered")
            follower.poll()
            objects = [json.loads(line) for line in out.getvalue().splitlines()]
            assert [o["event"] for o in objects] == [first, first]
            assert [o["deliveries"][0]["state"] for o in objects] == ["pending", "delivered"]
            assert set(objects[1]) == {
                "event",
                "rule",
                "rules",
                "source",
                "topic",
                "received_at",
                "deliveries",
            }

            # Watching 3 events: once 3 newer ones came, the first one's changes are not shown.
            later = [await store(spool, f"t{i}", new("desk")) for i in range(3)]
            out.seek(0)
            out.truncate()
            follower.poll()
            assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == later
            await spool.deliveries.add(first, [new("desk")])
            out.seek(0)
            out.truncate()
            follower.poll()
            assert out.getvalue() == ""
