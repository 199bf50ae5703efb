"""Start-up and memory: ``phonepush run`` with 1,000 phones and 200 rules.

Start to ready: from spawning the process to ``/readyz`` answering 200 (configuration loaded and
checked, 200 rules compiled, spool opened, HTTP server listening, MQTT connected and
subscribed), median of ``--starts`` fresh starts on a new spool. The rules are as in
``bench/fanout.py``: one to all phones, the rest with a ``when`` and a message template each
(distinct per rule, so each is compiled).

Memory: after the last start, one event to all 1,000 phones (20 ms each; every phone gets a
connection, a worker task and its deliveries), then the daemon's peak RSS (``VmHWM``) and
current RSS from ``/proc/<pid>/status``.

    .venv/bin/python bench/startup_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phones", type=int, default=1000)
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke pass: 2 starts")
    args = parser.parse_args(argv)
    if args.quick:
        args.starts = 2

    cpus = c.cpus()
    ready: list[float] = []
    with (
        c.workdir("phonepush-startup-") as tmp,
        c.Phones(args.phones, delay_ms=20, cpu=cpus[0] if len(cpus) > 1 else None) as phones,
        c.Mosquitto(tmp) as broker,
    ):
        server_port = c.free_port()
        config = c.daemon_toml(
            workdir=tmp,
            broker_port=broker.port,
            phones=phones,
            rules=c.phonepush_rules(phones=args.phones, extra=args.rules - 1),
            server_port=server_port,
        )
        for i in range(args.starts):
            with c.DaemonProcess(tmp, config, server_port=server_port) as daemon:
                ready.append(round(daemon.ready_seconds, 3))
                before = daemon.memory()
                if i < args.starts - 1:
                    continue
                with c.Publisher(broker.port) as publisher:
                    time.sleep(0.3)
                    fan = c.fanout_round(
                        phones,
                        lambda mark: publisher.publish("bench/fire", json.dumps({"n": mark})),
                        1,
                        args.phones,
                        60,
                    )
                    time.sleep(0.3)
                after = daemon.memory()

    result = {
        "phones": args.phones,
        "rules": args.rules,
        "ready_s": ready,
        "ready_median_s": c.median(ready),
        "rss_at_ready_mb": round(before["VmRSS"], 1),
        "peak_rss_mb": round(after["VmHWM"], 1),
        "rss_after_mb": round(after["VmRSS"], 1),
        "fanout_complete": fan["complete"],
    }
    print(f"start-up and memory: {args.phones} phones, {args.rules} rules, spool on")
    print(
        f"  start to ready, median of {args.starts}    {result['ready_median_s']:.3f} s  ({ready})"
    )
    print(f"  RSS when ready                  {result['rss_at_ready_mb']:.1f} MB")
    print(
        f"  peak RSS after a fan-out        {result['peak_rss_mb']:.1f} MB"
        f" (every phone answered: {fan['complete']})"
    )
    c.write_record("startup_memory", {"args": vars(args), "phonepush": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
