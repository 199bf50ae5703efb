"""Health probes at scale: how soon every phone's state is known, what probing costs, and what it
does to a page sent while it runs.

Setup: ``--phones`` simulated phones (default 2,000; 20 ms per request, one at a time each) in
a child process pinned to the first CPU; beside them ``--off`` phones that refuse connections (a
port nothing listens on: a phone switched off on a network that answers with a reset) and
``--silent`` phones that drop connection attempts (a listening socket whose one-place queue is
kept full: what a phone unplugged behind a switch looks like, every connect waits out the phone
``timeout``, 10 s by default). ``phonepush run`` with its open-files limit at 1,024 (soft and hard,
the worst case), ``[health] interval`` (default 60 s), the default phone ``timeout``, and one
webhook rule that dials every live phone.

Figures:

* **first picture**: from ``/readyz`` answering until ``GET /api/phones`` knows every phone
  (``reachable`` not null), and how many it calls reachable and unreachable, against the truth;
* **CPU per probe**: the daemon's CPU over one whole steady interval after the first round,
  divided by the probes the phones answered in it;
* **descriptors**: the most the daemon held while probing;
* **pages beside probes**: a webhook event to every live phone, publish → last phone's answer:
  once while the first round runs, three times in the steady state (probes going on), and three
  times after a reload (SIGHUP) set ``interval = "0"``, so no probe shares the phones or the CPU.

    .venv/bin/python bench/health_probes.py [--quick] [--phones 2000] [--off 100] [--silent 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
from fanout_large import DAEMON_NOFILE

TOKEN = "bench-token"


def _refusing_ports(count: int) -> list[int]:
    """Ports nothing listens on: bound for a moment to learn a free one, then closed."""
    ports = []
    for _ in range(count):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    return ports


@contextlib.contextmanager
def _silent_phones(count: int) -> Any:
    """Listening sockets whose accept queue (one place) is full: new connects are dropped."""
    held: list[socket.socket] = []
    ports = []
    try:
        for _ in range(count):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            filler = socket.create_connection(listener.getsockname(), timeout=2)
            held += [listener, filler]
            ports.append(listener.getsockname()[1])
        yield ports
    finally:
        for sock in held:
            sock.close()


def _phones_api(port: int) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/phones", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        phones: list[dict[str, Any]] = json.load(answer)
        return phones


def _fire(port: int, mark: int) -> float:
    body = json.dumps({"n": mark}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/hooks/fire",
        data=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    sent = time.time()
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 202
    return sent


def _config(
    workdir: Path,
    server_port: int,
    phones: c.Phones,
    off: list[int],
    silent: list[int],
    interval: str,
) -> str:
    lines = [
        f'[server]\nlisten = "127.0.0.1:{server_port}"\n',
        f'[spool]\npath = "{workdir / "spool.db"}"\n',
        f'[webhook]\ntoken = "{TOKEN}"\n',
        f'[health]\ninterval = "{interval}"\n',
        phones.toml(groups=["live"]),
    ]
    for i, port in enumerate(off):
        lines.append(f'[[phones]]\nname = "off{i}"\nhost = "127.0.0.1:{port}"\n')
    for i, port in enumerate(silent):
        lines.append(f'[[phones]]\nname = "silent{i}"\nhost = "127.0.0.1:{port}"\n')
    lines.append(
        "[[rules]]\n"
        'name = "fire"\non = "webhook:fire"\nto = ["live"]\n'
        'execute = ["Dial:{{ payload.n }}"]\nttl = "120s"\n'
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cpus = c.cpus()
    interval = float(args.interval.rstrip("s"))
    with (
        c.workdir("phonepush-health-") as tmp,
        c.Phones(
            args.phones, delay_ms=args.delay_ms, cpu=cpus[0] if len(cpus) > 1 else None
        ) as phones,
        _silent_phones(args.silent) as silent,
    ):
        off = _refusing_ports(args.off)
        server_port = c.free_port()
        config = _config(tmp, server_port, phones, off, silent, args.interval)
        total = args.phones + args.off + args.silent
        with c.DaemonProcess(
            tmp, config, server_port=server_port, nofile=DAEMON_NOFILE, ready_timeout=120
        ) as daemon:
            ready_at = time.time()
            stop = threading.Event()
            peak_fds = [0]
            sampler = threading.Thread(
                target=c.fd_sampler, args=(daemon.pid, stop, peak_fds), daemon=True
            )
            sampler.start()
            # A page while the first round runs (a third of the way into its ramp).
            time.sleep(min(interval, total * 0.02) / 3)
            during = c.fanout_round(phones, lambda m: _fire(server_port, m), 1, args.phones, 60)

            known_at = None
            picture: list[dict[str, Any]] = []
            deadline = ready_at + interval * 3 + 60
            while time.time() < deadline:
                picture = _phones_api(server_port)
                if all(p["reachable"] is not None for p in picture):
                    known_at = time.time()
                    break
                time.sleep(0.25)
            first_round_end = time.time()

            # One whole steady interval: probes counted at the phones (the pushes log only
            # CGI Execute, so the simulator's request count is read off the CPU it spent).
            phones.take()
            cpu_before, sim_before = daemon.cpu(), c.cpu_seconds(phones.pid)
            time.sleep(interval)
            cpu_steady = daemon.cpu() - cpu_before
            sim_steady = c.cpu_seconds(phones.pid) - sim_before
            steady = [
                c.fanout_round(phones, lambda m: _fire(server_port, m), mark, args.phones, 60)
                for mark in (2, 3, 4)
            ]
            daemon.config_path.write_text(
                config.replace(f'interval = "{args.interval}"', 'interval = "0"')
            )
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGHUP)
            time.sleep(2)
            unprobed = [
                c.fanout_round(phones, lambda m: _fire(server_port, m), mark, args.phones, 60)
                for mark in (5, 6, 7)
            ]
            stop.set()
            sampler.join()
            log = (tmp / "daemon.log").read_text(errors="replace")

    reachable = {p["name"] for p in picture if p["reachable"]}
    unreachable = {p["name"] for p in picture if p["reachable"] is False}
    live = {f"p{i}" for i in range(args.phones)}
    dead = {f"off{i}" for i in range(args.off)} | {f"silent{i}" for i in range(args.silent)}
    # Every phone is probed once per interval in the steady state (none was pushed to in it
    # but the quiet page, sent after the measurement).
    return {
        "phones": {"live": args.phones, "off": args.off, "silent": args.silent},
        "interval_s": interval,
        "first_picture_s": None if known_at is None else round(known_at - ready_at, 2),
        "first_round_measured_until_s": round(first_round_end - ready_at, 2),
        "reachable_right": len(reachable & live),
        "unreachable_right": len(unreachable & dead),
        "wrong": sorted((reachable & dead) | (unreachable & live)),
        # When the first round settled each kind of phone, seconds after ready (the last one).
        "settled_s": {
            kind: round(
                max((p["since"] or 0) for p in picture if p["name"].startswith(kind)) - ready_at, 2
            )
            for kind in ("p", "off", "silent")
            if any(p["name"].startswith(kind) for p in picture)
        },
        "cpu_ms_per_probe": round(cpu_steady * 1000 / total, 3),
        "daemon_cpu_share_steady": round(cpu_steady / interval, 4),
        "simulator_cpu_ms_per_probe": round(sim_steady * 1000 / max(1, args.phones), 3),
        "peak_fds": peak_fds[0],
        "page_during_first_round": during,
        "pages_steady": steady,
        "pages_probes_off": unprobed,
        "reloaded": "reload" in log.lower(),
        "emfile_in_log": "Too many open files" in log,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phones", type=int, default=2000, help="live simulated phones")
    parser.add_argument("--off", type=int, default=100, help="phones that refuse connections")
    parser.add_argument("--silent", type=int, default=100, help="phones that drop connects")
    parser.add_argument("--interval", default="60s", help="[health] interval, in seconds")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="smoke pass: 200 + 10 + 5, 10 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.phones, args.off, args.silent, args.interval = 200, 10, 5, "10s"
    result = run(args)
    print(
        f"health probes: {args.phones} live + {args.off} refusing + {args.silent} silent phones, "
        f"interval {args.interval}, daemon limited to {DAEMON_NOFILE} open files"
    )
    print(f"  ready -> every phone known            {result['first_picture_s']} s")
    print(
        f"  right: {result['reachable_right']} reachable, {result['unreachable_right']} "
        f"unreachable; wrong: {len(result['wrong'])} {' '.join(result['wrong'][:5])}"
    )
    print(f"  settled by kind (last, after ready)   {result['settled_s']}")
    print(f"  daemon CPU per probe (steady)         {result['cpu_ms_per_probe']:.3f} ms")
    print(f"  daemon CPU share (steady)             {result['daemon_cpu_share_steady']:.2%}")
    print(f"  simulator CPU per probe               {result['simulator_cpu_ms_per_probe']:.3f} ms")
    print(f"  most descriptors held                 {result['peak_fds']}")
    page = result["page_during_first_round"]
    print(
        f"  page during the first round           {page.get('last_answer_s')} s to the last of "
        f"{page.get('phones')} phones (complete: {page['complete']})"
    )
    for name, label in (("pages_steady", "probing"), ("pages_probes_off", "probes off")):
        pages = result[name]
        print(
            f"  pages, {label:31}{', '.join(str(p.get('last_answer_s')) for p in pages)} s "
            f"(complete: {all(p['complete'] for p in pages)})"
        )
    print(f"  EMFILE in the daemon's log            {result['emfile_in_log']}")
    c.write_record("health_probes", {"args": vars(args), "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
