"""Latency: MQTT publish -> the push's request arriving at the phone, at 200 events/s.

Setup: 100 simulated phones (no delay) in a child process pinned to the first CPU; a local
mosquitto; ``phonepush run`` with the durable spool and one rule per phone
(``bench/one/p<i>`` -> phone ``p<i>``). The publisher sends event k to phone k mod 100 at a
steady ``--rate`` for ``--seconds`` (QoS 1); each push's arrival is timestamped by the phone
(same clock). Prints p50/p90/p99/max over every event of the run (after a 1 s warm-up run that
opens the connections).

    .venv/bin/python bench/latency.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c


def run_daemon(args: argparse.Namespace) -> dict[str, Any]:
    cpus = c.cpus()
    with (
        c.workdir("phonepush-latency-") as tmp,
        c.Phones(args.phones, cpu=cpus[0] if len(cpus) > 1 else None) as phones,
        c.Mosquitto(tmp) as broker,
    ):
        server_port = c.free_port()
        rules = c.phonepush_rules(phones=args.phones, fire=False, single=args.phones)
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
            time.sleep(0.5)

            def publish(mark: int) -> float:
                topic = f"bench/one/p{mark % args.phones}"
                return publisher.publish(topic, json.dumps({"n": mark}))

            c.latency_run(phones, publish, args.rate, 1.0, 1_000_000)
            profiler = c.profile(daemon.pid, args.profile) if args.profile else None
            before = daemon.cpu()
            result = c.latency_run(phones, publish, args.rate, args.seconds, 0)
            result["cpu_ms_per_delivery"] = round(
                (daemon.cpu() - before) * 1000 / max(1, result["received"]), 3
            )
            if profiler is not None:
                c.stop_profile(profiler)
            return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phones", type=int, default=100)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--profile", help="py-spy the daemon into this file (collapsed stacks)")
    parser.add_argument("--quick", action="store_true", help="smoke pass: 2 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 2.0

    result = run_daemon(args)
    print(f"latency: publish -> request at the phone, {args.rate:g} events/s, spool on")
    print(
        f"  p50 {result['p50_ms']:.2f} ms   p90 {result['p90_ms']:.2f} ms   "
        f"p99 {result['p99_ms']:.2f} ms   max {result['max_ms']:.2f} ms"
    )
    print(f"  events {result['events']}, arrived {result['received']}")
    print(
        f"  daemon CPU per delivery (1 event = 1 delivery)  {result['cpu_ms_per_delivery']:.3f} ms"
    )
    c.write_record("latency", {"args": vars(args), "phonepush": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
