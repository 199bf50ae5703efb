"""Fault injection: ``phonepush run`` as a process, a real mosquitto, 50 simulated phones.

Each scenario is an async function that injects one fault into a running daemon and returns
:class:`Figures`: events sent, accepted (the broker's PUBACK to the publisher, or a 202),
delivered, duplicated and lost. The tests run them small (``PHONEPUSH_FAULT_SCALE``, default 0.3
of full size) and assert on the figures; ``bench/faults.py`` runs the same functions at full size
and prints the table in ``docs/reliability.md``.

How delivery is counted: event ``n`` carries ``{"n": n}`` and goes to phone ``n % 50`` through a
rule ``execute = ["Dial:{{ payload.n }}"]``; the simulated phone records every number dialled, so
a number seen twice is a duplicate and an accepted number never seen is a loss. Webhook events use
numbers from :data:`WEBHOOK_BASE` up, so the two sources never share a number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client.parser import text_string_to_metric_families

from _mqtt_fixtures import Broker
from _ports import free_port
from phonepush.sim.simulator import Fleet

__all__ = [
    "SCALE",
    "Figures",
    "scenario_broker_restart",
    "scenario_burst",
    "scenario_share_group",
    "scenario_sick_phones",
    "scenario_sigkill",
    "scenario_spool_full",
]

#: Fraction of the issue's sizes the tests run (bench/faults.py runs 1.0).
SCALE = float(os.environ.get("PHONEPUSH_FAULT_SCALE", "0.3"))
PHONES = 50
TOKEN = "fault-injection-token"
#: Webhook events dial numbers from here up; MQTT events dial 0, 1, 2, ...
WEBHOOK_BASE = 1_000_000
#: Generous bound for every wait: a scenario that needs it has already failed.
PATIENCE = 60.0


def scaled(full: int, minimum: int = 20) -> int:
    return max(minimum, round(full * SCALE))


def phone_of(n: int) -> int:
    return n % PHONES


@dataclass
class Figures:
    """What one scenario sent, what was accepted, and what the phones saw."""

    scenario: str
    sent: int
    accepted: int
    delivered: int  # accepted events that reached their phone at least once
    duplicated: int  # pushes beyond the first of an event
    lost: int  # accepted and never delivered
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "sent": self.sent,
            "accepted": self.accepted,
            "delivered": self.delivered,
            "duplicated": self.duplicated,
            "lost": self.lost,
            **self.extra,
        }


def count(
    scenario: str, sent: int, accepted: Collection[int], seen: Counter[int], **extra: Any
) -> Figures:
    delivered = sum(1 for n in accepted if seen[n] > 0)
    return Figures(
        scenario,
        sent=sent,
        accepted=len(accepted),
        delivered=delivered,
        duplicated=sum(c - 1 for c in seen.values() if c > 1),
        lost=len(accepted) - delivered,
        extra=extra,
    )


# --- the parts -------------------------------------------------------------------------------


def dialled(fleet: Fleet) -> Counter[int]:
    """Every number every phone dialled, with how often."""
    seen: Counter[int] = Counter()
    for phone in fleet.phones:
        seen.update(int(number) for number in phone.state.dialled)
    return seen


async def until(check: Callable[[], bool], timeout: float = PATIENCE) -> bool:
    """Poll ``check``; False (not an exception) when it does not hold in time, so a scenario
    still reports its figures and the test's asserts say what went missing."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def write_config(
    path: Path,
    *,
    port: int,
    spool: Path,
    fleet: Fleet,
    broker: Broker | None = None,
    client_id: str = "phonepush-faults",
    share_group: str = "",
    max_pending: int = 100_000,
    ttl: str = "10m",
    phone_timeout: str = "2s",
) -> None:
    """One rule per phone and source (event n → phone n % 50), and one rule to every phone."""
    lines = [
        "[server]",
        f'listen = "127.0.0.1:{port}"',
        "[spool]",
        f'path = "{spool}"',
        f"max_pending = {max_pending}",
        "[webhook]",
        f'token = "{TOKEN}"',
        "[dispatch]",
        'retry_initial = "50ms"',
        'retry_max = "500ms"',
        "[log]",
        # One line per event and per delivery would cost the burst more than the work itself.
        'level = "warning"',
    ]
    if broker is not None:
        lines += [
            "[mqtt]",
            f'url = "{broker.url}"',
            f'client_id = "{client_id}"',
            f'share_group = "{share_group}"',
            'reconnect_min = "100ms"',
            'reconnect_max = "1s"',
        ]
    for i, phone in enumerate(fleet.phones):
        lines += [
            "[[phones]]",
            f'name = "p{i:02d}"',
            f'host = "{phone.address}"',
            f'timeout = "{phone_timeout}"',
        ]
    dial = 'execute = ["Dial:{{ payload.n }}"]'
    for i in range(len(fleet.phones)):
        if broker is not None:
            lines += ["[[rules]]", f'name = "m{i:02d}"', f'on = "mqtt:faults/{i}"']
            lines += [f'to = ["p{i:02d}"]', dial, f'ttl = "{ttl}"']
        lines += ["[[rules]]", f'name = "w{i:02d}"', f'on = "webhook:w{i}"']
        lines += [f'to = ["p{i:02d}"]', dial, f'ttl = "{ttl}"']
    lines += ["[[rules]]", 'name = "everyone"', 'on = "webhook:all"', 'to = ["all"]', dial]
    lines += [f'ttl = "{ttl}"']
    path.write_text("\n".join(lines) + "\n")


class Daemon:
    """``python -m phonepush run --config F`` as a process, its log in a file."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config = config
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.peak_rss_kib = 0

    async def start(self, *, wait_ready: bool = True) -> None:
        assert self.proc is None or self.proc.returncode is not None
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "phonepush",
                "run",
                "--config",
                str(self.config),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        path = "/readyz" if wait_ready else "/healthz"
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as client:
            deadline = time.monotonic() + 30
            while True:
                if self.proc.returncode is not None or time.monotonic() > deadline:
                    raise AssertionError(f"daemon did not start:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(path)).status_code == 200:
                        return
                await asyncio.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def sample_rss(self) -> int:
        """VmHWM (peak resident set) of the running process, in KiB; remembered for later."""
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))
        return self.peak_rss_kib

    async def kill(self) -> None:
        """SIGKILL: no drain, no clean disconnect, nothing flushed but what was committed."""
        assert self.proc is not None
        self.sample_rss()
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> int:
        if not self.alive:
            return self.proc.returncode if self.proc and self.proc.returncode is not None else 0
        assert self.proc is not None
        self.sample_rss()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0 if down)."""
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                text = (await client.get(f"{self.url}/metrics")).text
        except httpx.HTTPError:
            return 0.0
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                answer = await client.get(f"{self.url}/readyz")
        except httpx.HTTPError as exc:
            return 0, {"error": str(exc)}
        return answer.status_code, answer.json()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Publisher:
    """A QoS 1 publisher on its own paho thread, with a persistent session so publishes in flight
    across a broker restart are resent. An event is *accepted* once the broker PUBACKed it."""

    def __init__(self, broker: Broker, client_id: str = "faults-publisher") -> None:
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self._client.max_inflight_messages_set(200)
        self._client.reconnect_delay_set(1, 2)
        self._client.on_publish = self._on_publish
        self._broker = broker
        self._sent: list[tuple[int, int]] = []  # (number, packet id)
        self._acked: set[int] = set()  # packet ids the broker acknowledged
        self._lock = threading.Lock()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, *args: Any) -> None:
        # On paho's thread (holding paho's own lock) once the PUBACK is in, also for
        # publishes queued while the broker was away and sent after the reconnect.
        with self._lock:
            self._acked.add(mid)

    def __enter__(self) -> Publisher:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 600
        self._client.connect(
            self._broker.host, self._broker.port, clean_start=False, properties=props
        )
        self._client.loop_start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, numbers: Iterable[int]) -> None:
        for n in numbers:
            # The PUBACK may be in before the packet id is listed: the two are matched only
            # when asked. Packet ids are not reused below 65,536 publishes.
            info = self._client.publish(f"faults/{phone_of(n)}", json.dumps({"n": n}), qos=1)
            with self._lock:
                self._sent.append((n, info.mid))

    @property
    def sent(self) -> int:
        with self._lock:
            return len(self._sent)

    def acked(self) -> set[int]:
        with self._lock:
            return {n for n, mid in self._sent if mid in self._acked}


@dataclass
class WebhookTally:
    accepted: set[int] = field(default_factory=set)
    posts: int = 0
    status: Counter[int] = field(default_factory=Counter)
    retry_after: set[str] = field(default_factory=set)
    done: bool = False


async def post_events(
    url: str,
    numbers: Iterable[int],
    tally: WebhookTally,
    *,
    hook: Callable[[int], str] = lambda n: f"w{phone_of(n)}",
    concurrency: int = 16,
    give_up: float = PATIENCE,
) -> WebhookTally:
    """POST each event until it gets a 202, the way a sender that honours 503 retries does.

    A connection reset or a 503 means try again (after the Retry-After, capped at 0.2 s to keep
    the scenario short); the event counts as accepted only on its 202.
    """
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in numbers:
        queue.put_nowait(WEBHOOK_BASE + n)
    deadline = time.monotonic() + give_up
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            number = queue.get_nowait()
            while time.monotonic() < deadline:
                tally.posts += 1
                try:
                    answer = await client.post(
                        f"{url}/hooks/{hook(number - WEBHOOK_BASE)}",
                        json={"n": number},
                        headers=headers,
                    )
                except httpx.HTTPError:
                    tally.status[0] += 1
                    await asyncio.sleep(0.1)
                    continue
                tally.status[answer.status_code] += 1
                if answer.status_code == 202:
                    tally.accepted.add(number)
                    break
                if answer.status_code != 503:
                    break
                tally.retry_after.add(answer.headers.get("retry-after", ""))
                await asyncio.sleep(min(float(answer.headers.get("retry-after", "1")), 0.2))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    tally.done = True
    return tally


@dataclass
class Rig:
    work: Path
    fleet: Fleet
    broker: Broker | None
    daemons: list[Daemon] = field(default_factory=list)

    def daemon(self, name: str = "d", **config: Any) -> Daemon:
        port = free_port()
        path = self.work / f"{name}.toml"
        config.setdefault("spool", self.work / f"{name}-spool.db")
        write_config(path, port=port, fleet=self.fleet, broker=self.broker, **config)
        daemon = Daemon(path, port, self.work / f"{name}.log")
        self.daemons.append(daemon)
        return daemon

    def seen(self) -> Counter[int]:
        return dialled(self.fleet)

    def delivered(self, numbers: Iterable[int]) -> int:
        seen = self.seen()
        return sum(1 for n in numbers if seen[n] > 0)


@contextlib.asynccontextmanager
async def rig(
    work: Path, *, broker: bool = True, persistence: bool = True, **fleet: Any
) -> AsyncIterator[Rig]:
    """A broker (optional), 50 phones, and cleanup of every daemon started on it."""
    work.mkdir(parents=True, exist_ok=True)
    mosquitto: Broker | None = None
    if broker:
        directory = work / "mosquitto"
        directory.mkdir(exist_ok=True)
        mosquitto = Broker(directory, free_port(), persistence=persistence)
        mosquitto.write_conf()
        # mosquitto's default queues at most 1,000 messages per client beyond those in flight and
        # drops the rest, PUBACKed to the publisher or not ("Outgoing messages are being dropped"
        # in its log): a burst larger than that is lost in the broker, whatever the daemon does.
        with mosquitto.conf.open("a") as conf:
            conf.write("max_queued_messages 1000000\n")
        mosquitto.start()
    fleet.setdefault("tone_ms", 0)
    try:
        async with Fleet(PHONES, **fleet) as phones:
            the_rig = Rig(work, phones, mosquitto)
            try:
                yield the_rig
            finally:
                for daemon in the_rig.daemons:
                    if daemon.alive:
                        assert daemon.proc is not None
                        daemon.proc.kill()
                        await daemon.proc.wait()
    finally:
        if mosquitto is not None:
            mosquitto.stop()


async def settle(rig: Rig, daemons: Iterable[Daemon], numbers: Collection[int]) -> None:
    """Wait until every number is delivered and no daemon has anything pending (late duplicates
    included), then a little longer for a push already on the wire."""
    await until(lambda: rig.delivered(numbers) == len(numbers))
    for daemon in daemons:
        deadline = time.monotonic() + PATIENCE
        while (
            daemon.alive
            and await daemon.metric("phonepush_spool_pending") > 0
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)


# --- 1. SIGKILL in the middle of a burst ------------------------------------------------------


async def scenario_sigkill(work: Path, events: int) -> Figures:
    """``events`` MQTT and ``events`` webhook events to 50 phones; SIGKILL the daemon once a third
    of them reached the phones; start it again on the same spool."""
    async with rig(work) as r:
        assert r.broker is not None
        daemon = r.daemon()
        await daemon.start()
        mqtt = list(range(events))
        tally = WebhookTally()
        with Publisher(r.broker) as publisher:
            sender = asyncio.create_task(post_events(daemon.url, range(events), tally))
            await asyncio.to_thread(publisher.publish, mqtt)
            await until(lambda: sum(r.seen().values()) >= (2 * events) // 3)
            before_kill = sum(r.seen().values())
            await daemon.kill()
            rss_first = daemon.peak_rss_kib
            await asyncio.sleep(0.5)  # senders meet a closed port meanwhile
            await daemon.start()
            await until(lambda: tally.done and len(publisher.acked()) == events)
            await sender
            accepted = publisher.acked() | tally.accepted
            await settle(r, [daemon], accepted)
            daemon.sample_rss()
            seen = r.seen()
        return count(
            "sigkill",
            2 * events,
            accepted,
            seen,
            pushed_before_kill=before_kill,
            mqtt_acked=len(accepted & set(mqtt)),
            webhook_202=len(tally.accepted),
            webhook_posts=tally.posts,
            duplicated_mqtt=sum(c - 1 for n, c in seen.items() if c > 1 and n < WEBHOOK_BASE),
            peak_rss_mib=round(max(rss_first, daemon.peak_rss_kib) / 1024, 1),
        )


@pytest.mark.slow
async def test_sigkill_mid_burst_loses_nothing_acknowledged(tmp_path: Path) -> None:
    figures = await scenario_sigkill(tmp_path, scaled(1000))
    row = figures.row()
    assert figures.accepted == figures.sent, row  # the sender retried until every one was taken
    assert figures.lost == 0, row
    assert figures.delivered == figures.accepted, row
    # The kill happened mid-burst: some were on phones before it, the rest came after.
    assert 0 < row["pushed_before_kill"] < figures.sent, row


# --- 2. mosquitto restarts in the middle of a burst -------------------------------------------


async def scenario_broker_restart(work: Path, events: int, outage: float = 1.0) -> Figures:
    """Publish half, stop mosquitto (persistence on) once a fifth reached phones, publish the rest
    into the publisher's queue, start mosquitto again after ``outage`` seconds."""
    async with rig(work) as r:
        broker = r.broker
        assert broker is not None
        daemon = r.daemon()
        await daemon.start()
        numbers = list(range(events))
        with Publisher(broker) as publisher:
            await asyncio.to_thread(publisher.publish, numbers[: events // 2])
            await until(lambda: r.delivered(numbers) >= events // 5)
            before = r.delivered(numbers)
            await asyncio.to_thread(broker.stop)
            stopped = time.monotonic()
            await asyncio.to_thread(publisher.publish, numbers[events // 2 :])
            await _readyz_down(daemon)
            status, body = await daemon.readyz()
            await asyncio.sleep(max(0.0, outage - (time.monotonic() - stopped)))
            await asyncio.to_thread(broker.start)
            started = time.monotonic()
            await _readyz_up(daemon)
            reconnect = time.monotonic() - started
            await until(lambda: len(publisher.acked()) == events)
            accepted = publisher.acked()
            await settle(r, [daemon], accepted)
            ready_after = (await daemon.readyz())[0]
        return count(
            "broker_restart",
            events,
            accepted,
            r.seen(),
            delivered_before_outage=before,
            readyz_during_outage=status,
            readyz_mqtt_check=body.get("checks", {}).get("mqtt", ""),
            readyz_after=ready_after,
            ready_again_s=round(reconnect, 2),
            daemon_alive=daemon.alive,
            peak_rss_mib=round(daemon.sample_rss() / 1024, 1),
        )


async def _readyz_down(daemon: Daemon) -> bool:
    return await _readyz_until(daemon, lambda status: status == 503)


async def _readyz_up(daemon: Daemon) -> bool:
    return await _readyz_until(daemon, lambda status: status == 200)


async def _readyz_until(daemon: Daemon, want: Callable[[int], bool]) -> bool:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if want((await daemon.readyz())[0]):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.slow
async def test_broker_restart_mid_burst_loses_nothing_and_readyz_shows_it(
    tmp_path: Path,
) -> None:
    figures = await scenario_broker_restart(tmp_path, scaled(1000))
    row = figures.row()
    assert figures.accepted == figures.sent and figures.lost == 0, row
    assert row["readyz_during_outage"] == 503 and row["readyz_mqtt_check"] != "ok", row
    assert row["readyz_after"] == 200 and row["daemon_alive"], row
    assert row["delivered_before_outage"] < figures.sent, row


# --- 3. sick phones ----------------------------------------------------------------------------

SICK = {
    "p00": ("refuse", {}),
    "p01": ("hang", {}),
    "p02": ("http500", {}),
    "p03": ("garbage", {}),
    "p04": ("error", {"number": 6}),
    "p05": ("flap", {"delay_ms": 300}),
}


async def scenario_sick_phones(work: Path, events: int, ttl: float = 8.0) -> Figures:
    """``events`` events to all 50 phones, six of them sick (one per fault mode), TTL ``ttl``.
    Counted per (event, phone) delivery."""
    async with rig(work, broker=False) as r:
        for name, (mode, options) in SICK.items():
            await r.fleet.phones[int(name[1:])].set_fault(mode, **options)
        daemon = r.daemon(ttl=f"{ttl}s", phone_timeout="1s")
        await daemon.start()
        tally = WebhookTally()
        started = time.monotonic()
        await post_events(daemon.url, range(events), tally, hook=lambda n: "all")
        numbers = tally.accepted
        healthy = r.fleet.phones[len(SICK) :]

        def healthy_done() -> bool:
            return all(set(numbers) <= {int(d) for d in p.state.dialled} for p in healthy)

        await until(healthy_done)
        healthy_s = time.monotonic() - started
        expired_when_healthy_done = await daemon.metric(
            "phonepush_deliveries_total", result="expired"
        )
        deadline = time.monotonic() + ttl + PATIENCE
        while time.monotonic() < deadline:
            if await daemon.metric("phonepush_spool_pending") == 0:
                break
            await asyncio.sleep(0.2)
        per_phone: dict[str, dict[str, float]] = {}
        for name in SICK:
            per_phone[name] = {
                result: await daemon.metric("phonepush_deliveries_total", phone=name, result=result)
                for result in ("delivered", "unconfirmed", "expired", "failed")
            }
            per_phone[name]["retries"] = await daemon.metric(
                "phonepush_delivery_retries_total", phone=name
            )
            per_phone[name]["pushes_seen"] = r.fleet.phones[int(name[1:])].state.pushes
        healthy_delivered = sum(
            len(set(numbers) & {int(d) for d in p.state.dialled}) for p in healthy
        )
        healthy_dups = sum(len(p.state.dialled) - len(set(p.state.dialled)) for p in healthy)
        sick_delivered = sum(int(v["delivered"]) for v in per_phone.values())
        expired = sum(int(v["expired"]) for v in per_phone.values())
        failed = sum(int(v["failed"]) for v in per_phone.values())
        unconfirmed = sum(int(v["unconfirmed"]) for v in per_phone.values())
        accepted = len(numbers) * PHONES
        return Figures(
            "sick_phones",
            sent=events * PHONES,
            accepted=accepted,
            delivered=healthy_delivered + sick_delivered,
            duplicated=healthy_dups,
            lost=accepted - healthy_delivered - sick_delivered - unconfirmed - expired - failed,
            extra={
                "unit": "deliveries",
                "healthy_phones": len(healthy),
                "healthy_delivered": healthy_delivered,
                "healthy_all_delivered_s": round(healthy_s, 2),
                "ttl_s": ttl,
                "expired_when_healthy_done": int(expired_when_healthy_done),
                "expired": expired,
                "unconfirmed": unconfirmed,
                "failed": failed,
                "per_sick_phone": per_phone,
            },
        )


@pytest.mark.slow
async def test_sick_phones_expire_and_the_healthy_ones_get_everything(tmp_path: Path) -> None:
    events = scaled(50, minimum=10)
    figures = await scenario_sick_phones(tmp_path, events)
    row = figures.row()
    healthy = PHONES - len(SICK)
    assert row["healthy_delivered"] == events * healthy, row
    assert figures.duplicated == 0 and figures.lost == 0, row
    # Not held up behind the sick phones: all done before any sick delivery reached its TTL.
    assert row["expired_when_healthy_done"] == 0, row
    for name, (mode, _) in SICK.items():
        phone = row["per_sick_phone"][name]
        assert phone["failed"] == 0, (name, mode, phone)  # transient, never given up early
        if mode == "flap":
            # Up half the time: whatever it missed while down was retried, not dropped (one cut
            # mid-answer is unconfirmed, not sent again).
            settled = phone["delivered"] + phone["unconfirmed"] + phone["expired"]
            assert settled == events, (name, phone)
        elif mode in ("hang", "http500", "garbage"):
            # Written, no readable answer: the phone may have run it, so it is never sent again
            # (a hanging phone takes its timeout per push, so its later ones expire unsent).
            assert phone["unconfirmed"] >= 1, (name, mode, phone)
            assert phone["unconfirmed"] + phone["expired"] == events, (name, mode, phone)
            assert phone["retries"] == 0, (name, mode, phone)
            assert phone["pushes_seen"] == phone["unconfirmed"], (name, mode, phone)
        else:
            # Refused connections and busy answers: it ran nothing; retried until the TTL.
            assert phone["retries"] >= 1, (name, mode, phone)
            assert phone["expired"] == events, (name, mode, phone)
        if mode == "error":
            assert phone["pushes_seen"] >= 2, (name, mode, phone)


# --- 4. a burst over the spool limit ------------------------------------------------------------


async def scenario_burst(
    work: Path, events: int, webhook_events: int, max_pending: int = 500
) -> Figures:
    """``events`` MQTT and ``webhook_events`` webhook events at once into a daemon whose spool
    takes ``max_pending`` deliveries, to phones that take 40 ms a push (0.5 s at first)."""
    async with rig(work, persistence=False, delay_ms=40) as r:
        assert r.broker is not None
        daemon = r.daemon(max_pending=max_pending)
        await daemon.start()
        idle_rss = daemon.sample_rss()
        tally = WebhookTally()
        numbers = list(range(events))
        highest_pending = 0.0
        started = time.monotonic()
        with Publisher(r.broker) as publisher:
            # Phones slowed to 0.5 s a push until both sources have been pushed back, so the
            # spool reaches its limit whatever the machine's speed; then 40 ms again.
            for phone in r.fleet.phones:
                await phone.set_fault("slow", delay_ms=500)
            sender = asyncio.create_task(
                post_events(daemon.url, range(webhook_events), tally, concurrency=32)
            )
            await asyncio.to_thread(publisher.publish, numbers)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (
                tally.status[503]
                and await daemon.metric("phonepush_events_rejected_total", source="mqtt")
            ):
                highest_pending = max(
                    highest_pending, await daemon.metric("phonepush_spool_pending")
                )
                await asyncio.sleep(0.1)
            for phone in r.fleet.phones:
                await phone.set_fault("none")

            def done() -> bool:
                return tally.done and r.delivered(numbers) == len(publisher.acked()) == events

            while not done() and daemon.alive and time.monotonic() - started < PATIENCE:
                highest_pending = max(
                    highest_pending, await daemon.metric("phonepush_spool_pending")
                )
                daemon.sample_rss()
                await asyncio.sleep(0.1)
            await sender
            accepted = publisher.acked() | tally.accepted
            await settle(r, [daemon], accepted)
        elapsed = time.monotonic() - started
        return count(
            "burst",
            events + webhook_events,
            accepted,
            r.seen(),
            max_pending=max_pending,
            highest_pending=int(highest_pending),
            mqtt_refusals=int(
                await daemon.metric(
                    "phonepush_events_rejected_total", source="mqtt", reason="spool_full"
                )
            ),
            webhook_503=tally.status[503],
            retry_after=sorted(tally.retry_after),
            daemon_alive=daemon.alive,
            idle_rss_mib=round(idle_rss / 1024, 1),
            peak_rss_mib=round(daemon.sample_rss() / 1024, 1),
            seconds=round(elapsed, 1),
            events_per_s=round((events + webhook_events) / elapsed),
        )


@pytest.mark.slow
async def test_burst_over_the_spool_limit_slows_intake_and_keeps_memory_bounded(
    tmp_path: Path,
) -> None:
    figures = await scenario_burst(tmp_path, scaled(10_000), scaled(1000), max_pending=200)
    row = figures.row()
    assert row["daemon_alive"], row
    assert figures.accepted == figures.sent and figures.lost == 0, row
    assert figures.duplicated == 0, row
    # Pushed back on both sides: MQTT left unacknowledged, webhooks told when to come back.
    assert row["mqtt_refusals"] > 0, row
    assert row["webhook_503"] > 0 and row["retry_after"] and "" not in row["retry_after"], row
    assert all(value.isdigit() for value in row["retry_after"]), row
    assert row["highest_pending"] <= row["max_pending"], row
    # Bounded: the backlog waits in the broker and the senders, not in the daemon's memory.
    assert row["peak_rss_mib"] < row["idle_rss_mib"] + 100, row


# --- 5. the spool's disk fills up ------------------------------------------------------------


@contextlib.contextmanager
def small_disk(directory: Path, size: str = "8m") -> Any:
    """A real tmpfs of ``size``: filling it makes the spool's writes fail with ENOSPC."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to mount a tmpfs: {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 512)
    finally:
        os.close(fd)
    return filler


async def scenario_spool_full(work: Path, events: int, full_for: float = 2.0) -> Figures:
    """Half of ``events`` by MQTT, half by webhook, to phones taking 20 ms a push (one of them
    answering error 6 until the disk is back, so its deliveries are retried meanwhile). The
    spool's disk fills once a quarter of the first half reached phones; the second half is sent
    while it is full; the disk is freed ``full_for`` seconds later."""
    with small_disk(work / "disk") as disk:
        async with rig(work / "rig", delay_ms=20) as r:
            assert r.broker is not None
            daemon = r.daemon(spool=disk / "spool.db")
            await daemon.start()
            sick = r.fleet.phones[7]
            await sick.set_fault("error", number=6)
            half = events // 2
            first, second = range(half // 2), range(half // 2, half)
            tally = WebhookTally()
            late = WebhookTally()
            with Publisher(r.broker) as publisher:
                sender = asyncio.create_task(post_events(daemon.url, first, tally))
                await asyncio.to_thread(publisher.publish, first)
                await until(lambda: sum(r.seen().values()) >= half // 4)
                filler = await asyncio.to_thread(fill, disk)
                full_at = time.monotonic()
                await _readyz_down(daemon)
                status, body = await daemon.readyz()
                late_sender = asyncio.create_task(post_events(daemon.url, second, late))
                await asyncio.to_thread(publisher.publish, second)
                async with httpx.AsyncClient(timeout=5) as client:
                    probe = await client.post(
                        f"{daemon.url}/hooks/w0",
                        json={"n": 999},
                        headers={"Authorization": f"Bearer {TOKEN}"},
                    )
                await asyncio.sleep(max(0.0, full_for - (time.monotonic() - full_at)))
                delivered_while_full = r.delivered([*second, *(WEBHOOK_BASE + n for n in second)])
                refused = await daemon.metric(
                    "phonepush_events_rejected_total", source="mqtt", reason="spool_error"
                )
                refused_503 = await daemon.metric(
                    "phonepush_events_rejected_total", source="webhook", reason="spool_error"
                )
                filler.unlink()
                freed = time.monotonic()
                await _readyz_up(daemon)
                ready_again = time.monotonic() - freed
                await sick.set_fault("none")
                await until(lambda: tally.done and late.done and len(publisher.acked()) == half)
                await sender
                await late_sender
                accepted = publisher.acked() | tally.accepted | late.accepted
                await settle(r, [daemon], accepted)
                pending_after = await daemon.metric("phonepush_spool_pending")
            return count(
                "spool_full",
                events,
                accepted,
                r.seen(),
                readyz_while_full=status,
                readyz_spool_check=body.get("checks", {}).get("spool", ""),
                webhook_while_full=probe.status_code,
                webhook_retry_after=probe.headers.get("retry-after", ""),
                mqtt_refusals=int(refused),
                webhook_refusals=int(refused_503),
                sent_while_full_delivered_while_full=delivered_while_full,
                ready_again_s=round(ready_again, 2),
                pending_after=int(pending_after),
                daemon_alive=daemon.alive,
                readyz_after=(await daemon.readyz())[0],
            )


@pytest.mark.slow
async def test_full_disk_refuses_intake_and_recovers_by_itself(tmp_path: Path) -> None:
    figures = await scenario_spool_full(tmp_path, scaled(1000))
    row = figures.row()
    assert row["readyz_while_full"] == 503 and row["readyz_spool_check"] != "ok", row
    assert row["webhook_while_full"] == 503 and row["webhook_retry_after"].isdigit(), row
    assert row["mqtt_refusals"] > 0 and row["webhook_refusals"] > 0, row
    assert row["daemon_alive"] and row["readyz_after"] == 200, row
    # Nothing sent while full got through before the disk was back: nothing was taken unstored.
    assert row["sent_while_full_delivered_while_full"] == 0, row
    assert figures.accepted == figures.sent and figures.lost == 0, row
    # Recovered without a restart: the deliveries finished while full were recorded after.
    assert row["pending_after"] == 0, row


# --- 6. two daemons in one share group ----------------------------------------------------------


async def scenario_share_group(work: Path, events: int) -> Figures:
    """Two daemons share ``$share/phonepush``. ``events`` with both up; then ``events`` more, and
    one daemon is SIGKILLed once a third of those reached phones; it is started again after the
    survivor has delivered what it was given."""
    async with rig(work) as r:
        assert r.broker is not None
        a = r.daemon("a", client_id="phonepush-a", share_group="phonepush")
        b = r.daemon("b", client_id="phonepush-b", share_group="phonepush")
        await a.start()
        await b.start()
        first = list(range(events))
        second = list(range(events, 2 * events))
        with Publisher(r.broker) as publisher:
            await asyncio.to_thread(publisher.publish, first)
            await until(lambda: len(publisher.acked()) == events)
            await settle(r, [a, b], first)
            seen = r.seen()
            healthy_dups = sum(seen[n] - 1 for n in first if seen[n] > 1)
            healthy_delivered = sum(1 for n in first if seen[n] > 0)
            taken = {
                name: int(await d.metric("phonepush_events_total", source="mqtt"))
                for name, d in (("a", a), ("b", b))
            }

            await asyncio.to_thread(publisher.publish, second)
            await until(lambda: r.delivered(second) >= events // 3)
            await b.kill()
            await until(lambda: len(publisher.acked()) == 2 * events)
            # The survivor delivers what the broker gives it; wait until it has nothing left.
            stalled = 0
            last = -1
            while stalled < 10:
                now = r.delivered(second)
                stalled = stalled + 1 if now == last else 0
                last = now
                await asyncio.sleep(0.1)
            by_survivor = r.delivered(second)
            await b.start()
            accepted = publisher.acked()
            await settle(r, [a, b], accepted)
        return count(
            "share_group",
            2 * events,
            accepted,
            r.seen(),
            healthy_events=events,
            healthy_delivered=healthy_delivered,
            healthy_duplicated=healthy_dups,
            healthy_split=taken,
            second_burst_delivered_while_b_dead=by_survivor,
            second_burst=events,
        )


@pytest.mark.slow
async def test_share_group_delivers_once_and_a_killed_member_loses_nothing(
    tmp_path: Path,
) -> None:
    events = scaled(1000)
    figures = await scenario_share_group(tmp_path, events)
    row = figures.row()
    assert row["healthy_delivered"] == events and row["healthy_duplicated"] == 0, row
    assert all(n > 0 for n in row["healthy_split"].values()), row  # both took a share
    assert sum(row["healthy_split"].values()) == events, row
    assert figures.accepted == figures.sent and figures.lost == 0, row
    # The survivor kept delivering while the other was dead.
    assert row["second_burst_delivered_while_b_dead"] > events // 3, row
