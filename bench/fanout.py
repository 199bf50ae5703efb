"""Fan-out: one MQTT event to 1,000 phones that take 20 ms per push, through the whole daemon.

Setup: simulated phones (``--phones``, ``--delay-ms``, one push at a time each) in a child
process pinned to the first CPU; a local mosquitto; ``phonepush run`` with the durable spool
(WAL, ``synchronous = "normal"``), 200 rules (one matching ``bench/fire`` with ``to = ["all"]``,
the rest idle with messages and conditions) and default dispatch settings.

Each round publishes one event (QoS 1) and waits until every phone has answered a push carrying
that event's number; the figure is publish -> last phone's answer, timed at the phones. The
first round after start is *cold* (the daemon opens 1,000 connections); then ``--rounds`` warm
rounds, whose median is the headline. Also printed: the daemon's CPU per delivery over the warm
rounds (``/proc/<pid>/stat``), its start-to-ready time and peak RSS (``VmHWM``) after the rounds.

With ``--floor``, the same run also measures bare clients with no daemon around them
(``bench/client_fanout.py`` in a venv with aiohttp: plain aiohttp, httpx over httpx-aiohttp,
one small httpx client per phone, phonepush's PhoneClient, one shared httpx client).

    .venv/bin/python bench/fanout.py [--quick] [--floor]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

BENCH_VENV = Path("/tmp/phonepush-bench-venv")
BENCH_VENV_PACKAGES = ("aiohttp", "httpx-aiohttp", "httpx", "lxml", "sniffio", "pydantic")


def run_daemon(args: argparse.Namespace) -> dict[str, Any]:
    cpus = c.cpus()
    with (
        c.workdir("phonepush-fanout-") as tmp,
        c.Phones(
            args.phones, delay_ms=args.delay_ms, cpu=cpus[0] if len(cpus) > 1 else None
        ) as phones,
        c.Mosquitto(tmp) as broker,
    ):
        server_port = c.free_port()
        rules = c.phonepush_rules(phones=args.phones, extra=args.rules - 1)
        config = c.daemon_toml(
            workdir=tmp,
            broker_port=broker.port,
            phones=phones,
            rules=rules,
            server_port=server_port,
        )
        with (
            c.DaemonProcess(tmp, config, server_port=server_port) as daemon,
            c.Publisher(broker.port) as publisher,
        ):
            time.sleep(0.5)  # the daemon's subscription, after /readyz
            profiler = c.profile(daemon.pid, args.profile) if args.profile else None

            def publish(mark: int) -> float:
                return publisher.publish("bench/fire", json.dumps({"n": mark}))

            cold = c.fanout_round(phones, publish, 1, args.phones, args.timeout)
            warm = []
            cpu_before = daemon.cpu()
            for i in range(args.rounds):
                time.sleep(0.3)
                warm.append(c.fanout_round(phones, publish, 2 + i, args.phones, args.timeout))
            time.sleep(0.3)  # finishes are committed after the answers
            cpu_used = daemon.cpu() - cpu_before
            memory = daemon.memory()
            if profiler is not None:
                c.stop_profile(profiler)
            deliveries = sum(r["pushes"] for r in warm)
            return {
                "phones": args.phones,
                "delay_ms": args.delay_ms,
                "rules": args.rules,
                "ready_s": round(daemon.ready_seconds, 3),
                "cold": cold,
                "warm": warm,
                "warm_median_s": c.median([r["last_answer_s"] for r in warm]),
                "all_complete": cold["complete"] and all(r["complete"] for r in warm),
                "cpu_ms_per_delivery": round(cpu_used * 1000 / max(1, deliveries), 3),
                "memory_mb": {k: round(v, 1) for k, v in memory.items()},
            }


def run_floor(args: argparse.Namespace) -> dict[str, Any]:
    """Bare clients, no daemon: bench/client_fanout.py in a venv that has aiohttp."""
    try:
        python = c.ensure_venv(BENCH_VENV, [*BENCH_VENV_PACKAGES])
    except subprocess.CalledProcessError as exc:
        return {"error": f"could not make {BENCH_VENV}: {exc}"}
    variants = "aiohttp,phoneclient+aiohttp,phoneclient+httpx,phoneclient"
    if not args.quick:
        variants += ",shared-httpx"
    before = set(c.RESULTS.glob("client_fanout-*.json"))
    command = [
        str(python),
        str(c.ROOT / "bench" / "client_fanout.py"),
        "--phones",
        str(args.phones),
        "--delay-ms",
        str(args.delay_ms),
        "--variants",
        variants,
        "--shared-cap",
        "40",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    [path] = sorted(set(c.RESULTS.glob("client_fanout-*.json")) - before)
    record = json.loads(path.read_text())
    floor: dict[str, Any] = {"file": path.name}
    for name, result in record["results"].items():
        if "rounds" in result:
            warm = result["rounds"][1]
            floor[name] = {
                "wall_s": warm["wall_s"],
                "cpu_ms_per_push": warm["cpu_ms_per_push"],
                "capped": warm["capped"],
                "failed": warm["failed"],
            }
    return floor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phones", type=int, default=1000)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="warm rounds (median)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--floor", action="store_true", help="also measure bare clients")
    parser.add_argument("--profile", help="py-spy the daemon into this file (collapsed stacks)")
    parser.add_argument("--quick", action="store_true", help="smoke pass: 100 phones, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.phones, args.rounds, args.rules = 100, 2, 20

    result = run_daemon(args)
    print(
        f"fan-out: 1 event -> {result['phones']} phones at {args.delay_ms:g} ms, "
        f"{result['rules']} rules, spool on"
    )
    print(f"  cold (first event after start)   {result['cold'].get('last_answer_s', 'n/a')} s")
    warm = ", ".join(str(r.get("last_answer_s")) for r in result["warm"])
    print(
        f"  warm, median of {args.rounds}               {result['warm_median_s']:.3f} s  ({warm})"
    )
    print(f"  every phone answered              {result['all_complete']}")
    print(f"  daemon CPU per delivery (warm)    {result['cpu_ms_per_delivery']:.3f} ms")
    print(f"  start to ready                    {result['ready_s']:.3f} s")
    print(f"  memory after the rounds           {result['memory_mb']} MB")
    record: dict[str, Any] = {"args": vars(args), "phonepush": result}
    if args.floor:
        floor = run_floor(args)
        record["floor"] = floor
        print("  bare clients, no daemon (warm round, same phones):")
        for name, figures in floor.items():
            if isinstance(figures, dict):
                capped = " (capped)" if figures["capped"] else ""
                print(
                    f"    {name:<22}{figures['wall_s']:>7.2f} s {figures['cpu_ms_per_push']:>7.3f}"
                    f" ms CPU/push{capped}"
                )
    record["versions"] = c.versions("phonepush", "paho-mqtt", "httpx")
    c.write_record("fanout", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
