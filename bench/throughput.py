"""Throughput: a sustained stream of MQTT events, each to 100 phones that answer at once.

Setup: 100 simulated phones (no delay) in a child process pinned to the first CPU; a local
mosquitto; ``phonepush run`` with the durable spool and one rule (``bench/stream`` -> all
phones). Each run publishes ``--events`` events (QoS 1) as fast as the publisher goes, so the
daemon always has work queued for every phone, and waits until every phone has answered every
event. Deliveries per second = deliveries / (first publish -> last answer), timed at the phones;
``steady`` is the rate over the middle 80% of answers. The first run warms up (connections);
the headline is the median of ``--runs`` after it.

CPU per delivery: the daemon's user+sys CPU (``/proc/<pid>/stat``) over the measured runs,
divided by their deliveries. Also printed: the simulator's own ceiling measured alone
(``bench/simulator_throughput.py``, 100 phones, same pinning), and the ratio.

    .venv/bin/python bench/throughput.py [--quick]
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


def run_daemon(args: argparse.Namespace) -> dict[str, Any]:
    cpus = c.cpus()
    with (
        c.workdir("phonepush-throughput-") as tmp,
        c.Phones(args.phones, cpu=cpus[0] if len(cpus) > 1 else None) as phones,
        c.Mosquitto(tmp) as broker,
    ):
        server_port = c.free_port()
        rules = c.phonepush_rules(phones=args.phones, fire=False, stream=True)
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
            profiler = c.profile(daemon.pid, args.profile) if args.profile else None

            def publish(mark: int) -> float:
                return publisher.publish("bench/stream", json.dumps({"n": mark}))

            warmup = c.stream_run(phones, publish, max(5, args.events // 10), args.phones, 0, 60)
            runs = []
            cpu_total = 0.0
            for i in range(args.runs):
                time.sleep(0.3)
                before = daemon.cpu()
                first = 100_000 * (i + 1)
                run = c.stream_run(phones, publish, args.events, args.phones, first, 120)
                time.sleep(0.2)
                run["cpu_s"] = round(daemon.cpu() - before, 3)
                cpu_total += run["cpu_s"]
                runs.append(run)
            if profiler is not None:
                c.stop_profile(profiler)
            deliveries = sum(r["deliveries"] for r in runs)
            return {
                "phones": args.phones,
                "events_per_run": args.events,
                "warmup": warmup,
                "runs": runs,
                "median_per_second": c.median([r["per_second"] for r in runs]),
                "median_steady_per_second": c.median([r["steady_per_second"] for r in runs]),
                "all_complete": all(r["complete"] for r in runs),
                "cpu_ms_per_delivery": round(cpu_total * 1000 / max(1, deliveries), 3),
                "memory_mb": {k: round(v, 1) for k, v in daemon.memory().items()},
            }


def simulator_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    before = set(c.RESULTS.glob("simulator_throughput-*.json"))
    subprocess.run(
        [
            sys.executable,
            str(c.ROOT / "bench" / "simulator_throughput.py"),
            "--phones",
            str(args.phones),
            "--seconds",
            "2" if args.quick else "4",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    [path] = sorted(set(c.RESULTS.glob("simulator_throughput-*.json")) - before)
    record = json.loads(path.read_text())
    return {
        "file": path.name,
        "pushes_per_s": round(record["pushes_per_s"], 1),
        "pushes_per_server_cpu_s": round(record["pushes_per_server_cpu_s"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phones", type=int, default=100)
    parser.add_argument("--events", type=int, default=200, help="events per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", help="py-spy the daemon into this file (collapsed stacks)")
    parser.add_argument("--quick", action="store_true", help="smoke pass: 20 events, 1 run")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.runs = 20, 1

    result = run_daemon(args)
    ceiling = simulator_ceiling(args)
    ratio = result["median_per_second"] / ceiling["pushes_per_s"]
    print(f"throughput: {args.events} events x {args.phones} phones per run, spool on")
    runs = ", ".join(f"{r['per_second']:.0f}" for r in result["runs"])
    print(
        f"  deliveries/s, median of {args.runs}       {result['median_per_second']:.0f}  ({runs})"
    )
    print(f"  steady (middle 80%), median      {result['median_steady_per_second']:.0f}")
    print(f"  every push answered              {result['all_complete']}")
    print(f"  daemon CPU per delivery          {result['cpu_ms_per_delivery']:.3f} ms")
    print(f"  simulator alone                  {ceiling['pushes_per_s']:.0f} pushes/s")
    print(f"  daemon / simulator ceiling       {ratio:.2f}")
    c.write_record(
        "throughput",
        {
            "args": vars(args),
            "phonepush": result,
            "simulator_ceiling": ceiling,
            "ratio_to_ceiling": round(ratio, 3),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
