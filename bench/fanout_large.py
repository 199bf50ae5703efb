"""Large fan-out: one MQTT event to 5,000 and to 10,000 phones with the daemon held to 1,024
open files, beside bare clients pushing to the same phones in the same run.

Setup per size (``--sizes``, default 5,000 and 10,000): simulated phones (20 ms per push, one
push at a time each) in a child process pinned to the first CPU, with its own open-files limit
raised to the hard limit (a phone is a listening socket); a local mosquitto; ``phonepush run``
with its open-files limit set to 1,024, one rule to ``all`` and default dispatch settings
(``concurrency = 256``, ``max_connections`` half the open-files limit at start). Two ways:

* ``--limit both`` (default): soft *and* hard 1,024, so the start-up raise cannot lift it and
  ``max_connections`` is 512. More phones than descriptors: the daemon closes idle connections
  least recently used, so every round connects again to most phones (the worst case).
* ``--limit soft``: ``ulimit -Sn 1024`` as a service manager's default leaves it; the daemon
  raises the soft limit to the hard one at start and keeps a connection to every phone.

Each round publishes one event (QoS 1) and waits until every phone has answered a push carrying
its number; the figure is publish -> last phone's answer, timed at the phones. ``--rounds``
rounds (median; the first after start is counted too: connections are remade every round
anyway). Also: the daemon's CPU per delivery over the rounds (``/proc/<pid>/stat``), its peak
RSS (``VmHWM``), the most descriptors it held (sampled every 20 ms), and the simulator's CPU per
push (one process on one CPU: above ~1 ms per push it, not the client, sets the wall time).

The floor, measured in the same run against the same phones: this process pushes the same
``Dial:`` to every phone with one :class:`PhoneClient` per phone, 256 at a time
(the daemon's concurrency), no daemon, no spool, no MQTT, a fresh connection each (as the daemon
has under its connection bound); its wall time (start -> last answer, at the phones) and CPU per
push.

    .venv/bin/python bench/fanout_large.py [--quick] [--sizes 5000,10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

#: The daemon's open-files limit: a service manager's default soft limit.
DAEMON_NOFILE = 1024


def run_size(phones_count: int, args: argparse.Namespace) -> dict[str, Any]:
    cpus = c.cpus()
    with (
        c.workdir("phonepush-fanout-large-") as tmp,
        c.Phones(
            phones_count, delay_ms=args.delay_ms, cpu=cpus[0] if len(cpus) > 1 else None
        ) as phones,
        c.Mosquitto(tmp) as broker,
    ):
        server_port = c.free_port()
        rules = c.phonepush_rules(phones=phones_count)
        config = c.daemon_toml(
            workdir=tmp,
            broker_port=broker.port,
            phones=phones,
            rules=rules,
            server_port=server_port,
        )
        with (
            c.DaemonProcess(
                tmp,
                config,
                server_port=server_port,
                nofile=DAEMON_NOFILE,
                soft_only=args.limit == "soft",
                ready_timeout=120,
            ) as daemon,
            c.Publisher(broker.port) as publisher,
        ):
            time.sleep(0.5)  # the daemon's subscription, after /readyz
            stop = threading.Event()
            peak_fds = [0]
            sampler = threading.Thread(
                target=c.fd_sampler, args=(daemon.pid, stop, peak_fds), daemon=True
            )
            sampler.start()

            def publish(mark: int) -> float:
                return publisher.publish("bench/fire", json.dumps({"n": mark}))

            rounds = []
            cpu_before = daemon.cpu()
            sim_before = c.cpu_seconds(phones.pid)
            for i in range(args.rounds):
                if i:
                    time.sleep(0.5)
                rounds.append(c.fanout_round(phones, publish, 1 + i, phones_count, args.timeout))
            time.sleep(0.5)  # finishes are committed after the answers
            cpu_used = daemon.cpu() - cpu_before
            sim_used = c.cpu_seconds(phones.pid) - sim_before
            memory = daemon.memory()
            stop.set()
            sampler.join()
            log = (tmp / "daemon.log").read_text(errors="replace")
            deliveries = sum(r["pushes"] for r in rounds)
            daemon_figures = {
                "rounds": rounds,
                "median_s": c.median([r.get("last_answer_s", float("nan")) for r in rounds]),
                "all_complete": all(r["complete"] for r in rounds),
                "cpu_ms_per_delivery": round(cpu_used * 1000 / max(1, deliveries), 3),
                "simulator_cpu_ms_per_push": round(sim_used * 1000 / max(1, deliveries), 3),
                "memory_mb": {k: round(v, 1) for k, v in memory.items()},
                "ready_s": round(daemon.ready_seconds, 3),
                "peak_fds": peak_fds[0],
                "emfile_in_log": "Too many open files" in log,
            }
        floor = run_floor(phones, phones_count, args, first_mark=1000)
    return {"phones": phones_count, "phonepush": daemon_figures, "floor": floor}


def run_floor(
    phones: c.Phones, count: int, args: argparse.Namespace, *, first_mark: int
) -> dict[str, Any]:
    """Bare PhoneClients, 256 at a time, a fresh connection each; timed at the phones."""
    from phonepush.errors import PhonepushError
    from phonepush.phone.client import PhoneClient, PhoneTarget
    from phonepush.wire.uri import ExecuteItem

    targets = [PhoneTarget(f"p{i}", "127.0.0.1", port) for i, port in enumerate(phones.ports)]
    cpu_per_push: list[float] = []
    failures: list[int] = []

    async def push_all(mark: int) -> None:
        limit = asyncio.Semaphore(256)
        failed = 0

        async def one(target: PhoneTarget) -> None:
            nonlocal failed
            async with limit, PhoneClient(target) as client:
                try:
                    await client.execute([ExecuteItem(f"Dial:{mark}")])
                except PhonepushError:  # counted, not fatal to the round
                    failed += 1

        started = time.thread_time()
        await asyncio.gather(*(one(t) for t in targets))
        cpu_per_push.append((time.thread_time() - started) * 1000 / count)
        failures.append(failed)

    threads: list[threading.Thread] = []

    def publish(mark: int) -> float:
        sent = time.time()
        thread = threading.Thread(target=asyncio.run, args=(push_all(mark),))
        thread.start()
        threads.append(thread)
        return sent

    rounds = []
    sim_before = c.cpu_seconds(phones.pid)
    for i in range(args.rounds):
        rounds.append(c.fanout_round(phones, publish, first_mark + i, count, args.timeout))
        for thread in threads:
            thread.join()
        threads.clear()
        time.sleep(0.3)
    pushes = sum(r["pushes"] for r in rounds)
    return {
        "client": "PhoneClient per phone, 256 at a time, fresh connections",
        "simulator_cpu_ms_per_push": round(
            (c.cpu_seconds(phones.pid) - sim_before) * 1000 / max(1, pushes), 3
        ),
        "rounds": rounds,
        "median_s": c.median([r.get("last_answer_s", float("nan")) for r in rounds]),
        "cpu_ms_per_push": round(c.median(cpu_per_push), 3),
        "failed": sum(failures),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,10000", help="phone counts, comma-separated")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size (median)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--limit",
        choices=("both", "soft"),
        default="both",
        help="the daemon's 1,024 open files: soft and hard, or soft only (raised at start)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke pass: 1,500 phones, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds = "1500", 1
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if hard != resource.RLIM_INFINITY and hard < max(sizes) + 1000:
        raise SystemExit(f"simulated phones need {max(sizes) + 1000} open files; hard limit {hard}")

    results = []
    for size in sizes:
        result = run_size(size, args)
        results.append(result)
        ours, floor = result["phonepush"], result["floor"]
        how = "soft only" if args.limit == "soft" else "soft and hard"
        print(
            f"fan-out: 1 event -> {size} phones at {args.delay_ms:g} ms, daemon limited to "
            f"{DAEMON_NOFILE} open files ({how})"
        )
        print(
            f"  publish -> last answer, median of {args.rounds}   {ours['median_s']:.3f} s  "
            f"({', '.join(str(r.get('last_answer_s')) for r in ours['rounds'])})"
        )
        print(f"  every phone answered                 {ours['all_complete']}")
        print(f"  daemon CPU per delivery              {ours['cpu_ms_per_delivery']:.3f} ms")
        print(f"  daemon memory                        {ours['memory_mb']} MB")
        print(f"  most descriptors held                {ours['peak_fds']}")
        print(f"  simulator CPU per push               {ours['simulator_cpu_ms_per_push']:.3f} ms")
        print(f"  EMFILE in the daemon's log           {ours['emfile_in_log']}")
        print(f"  start to ready                       {ours['ready_s']:.2f} s")
        print(
            f"  floor ({floor['client']}): {floor['median_s']:.3f} s, "
            f"{floor['cpu_ms_per_push']:.3f} ms CPU/push, {floor['failed']} failed, simulator "
            f"{floor['simulator_cpu_ms_per_push']:.3f} ms CPU/push"
        )
    record: dict[str, Any] = {
        "args": vars(args),
        "daemon_nofile": DAEMON_NOFILE,
        "limit": args.limit,
        "results": results,
        "versions": c.versions("phonepush", "paho-mqtt"),
    }
    c.write_record("fanout_large", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
