"""How fast the spool commits events and records delivery outcomes, on a real file.

For ``synchronous`` normal and full, on a fresh temporary database in ``--dir`` (default: the
system temp directory, which should be on the disk the daemon would use, not a tmpfs):

* ``commit_event`` with 1 and with 10 deliveries per event (each event also stores one page and
  sets one cooldown, as a rule with a ``message`` and a ``cooldown`` does): events/s,
  deliveries/s, and per-call latency percentiles (each call blocks the event loop that long);
* ``progress`` + ``finish`` of each pending delivery (what the dispatcher does for a one-request
  delivery): deliveries/s;
* ``pending()`` on reopening the file of the 10-delivery run: how long resuming takes.

Each call is followed by ``await asyncio.sleep(0)``, as the daemon's loop runs other work between
events (this is also when the spool's background checkpoints are scheduled). Modes are run
interleaved ``--repeat`` times; the table shows medians, the JSON record every run.

    .venv/bin/python bench/spool_throughput.py --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from phonepush.events import Event
from phonepush.store.commit import commit_event
from phonepush.store.spool import NewDelivery, PushRequest, Spool
from phonepush.wire.cisco import TextPage, execute_xml, text_xml
from phonepush.wire.uri import ExecuteItem

RESULTS = Path(__file__).resolve().parent / "results"
PAYLOAD = json.dumps(
    {"state": "open", "door": "front", "battery": 87, "ts": "2026-11-26T10:00:00Z"}
).encode()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _requests(page_url: str) -> tuple[PushRequest, ...]:
    xml = execute_xml(
        [ExecuteItem(page_url, 1), ExecuteItem("Play:Chime.raw"), ExecuteItem("Display:On:10")]
    )
    return (PushRequest("execute", xml),)


async def _add_events(
    spool: Spool, per_event: int, seconds: float
) -> tuple[dict[str, float], list[int]]:
    page = text_xml(TextPage(title="Front door", text="The front door was opened at 10:00."))
    latencies: list[float] = []
    ids: list[int] = []
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    cpu_before = time.process_time()
    loop_cpu = 0.0
    while time.perf_counter() < deadline:
        event = Event("mqtt", "home/door/front", PAYLOAD, {})
        page_id = f"{event.id}-0"
        requests = _requests(f"http://192.0.2.1:8080/pages/{page_id}")
        deliveries = [
            NewDelivery("door", f"desk-{n}", requests, event.received_at + 300)
            for n in range(per_event)
        ]
        before, cpu_at = time.perf_counter(), time.thread_time()
        stored = await commit_event(
            spool,
            event,
            rules=["door"],
            deliveries=deliveries,
            pages={page_id: page},
            cooldowns=[("door", "front", event.received_at + 60)],
        )
        loop_cpu += time.thread_time() - cpu_at
        latencies.append(time.perf_counter() - before)
        ids.extend(d.id for d in stored)
        # The daemon's loop runs other work between events; this is also when the spool's
        # background checkpoints get scheduled.
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    latencies.sort()
    events = len(latencies)
    return {
        "events": events,
        "deliveries": len(ids),
        "seconds": elapsed,
        "events_per_s": events / elapsed,
        "deliveries_per_s": len(ids) / elapsed,
        "cpu_share": cpu / elapsed,
        # Events per second of time spent inside commit_event: the rate if the loop did nothing
        # else.
        "events_per_call_s": events / max(sum(latencies), 1e-9),
        "loop_cpu_per_event_us": loop_cpu / max(events, 1) * 1e6,
        "latency_p50_ms": _percentile(latencies, 0.50) * 1000,
        "latency_p99_ms": _percentile(latencies, 0.99) * 1000,
        "latency_max_ms": latencies[-1] * 1000 if latencies else 0.0,
    }, ids


async def _progress_finish(spool: Spool, ids: list[int], seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    loop_cpu = 0.0
    for delivery_id in ids:
        if time.perf_counter() >= deadline:
            break
        before, cpu_at = time.perf_counter(), time.thread_time()
        await spool.deliveries.progress(delivery_id, sent=1, attempts=1)
        await spool.deliveries.finish(delivery_id, "delivered")
        loop_cpu += time.thread_time() - cpu_at
        latencies.append(time.perf_counter() - before)
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "deliveries": len(latencies),
        "seconds": elapsed,
        "deliveries_per_s": len(latencies) / elapsed,
        "deliveries_per_call_s": len(latencies) / max(sum(latencies), 1e-9),
        "loop_cpu_per_delivery_us": loop_cpu / max(len(latencies), 1) * 1e6,
        "latency_p50_ms": _percentile(latencies, 0.50) * 1000,
        "latency_p99_ms": _percentile(latencies, 0.99) * 1000,
    }


async def _run_case(directory: Path, synchronous: str, seconds: float) -> dict[str, Any]:
    result: dict[str, Any] = {"synchronous": synchronous}
    for per_event in (1, 10):
        path = directory / f"spool-{synchronous}-{per_event}.db"
        async with Spool(path, synchronous=synchronous, max_pending=10_000_000) as spool:
            added, ids = await _add_events(spool, per_event, seconds)
            result[f"add_event_{per_event}"] = added
            if per_event == 1:
                result["progress_finish"] = await _progress_finish(spool, ids, seconds)
        async with Spool(path, synchronous=synchronous, max_pending=10_000_000) as spool:
            before = time.perf_counter()
            backlog = await spool.deliveries.pending()
            result[f"resume_{per_event}"] = {
                "pending": len(backlog),
                "seconds": time.perf_counter() - before,
            }
        result[f"file_bytes_{per_event}"] = sum(
            p.stat().st_size for p in directory.glob(f"spool-{synchronous}-{per_event}.db*")
        )
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _filesystem(directory: Path) -> str:
    best, fstype = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mountpoint, kind, *_ = line.split()
            if str(directory).startswith(mountpoint) and len(mountpoint) > len(best):
                best, fstype = mountpoint, kind
    except OSError:
        pass
    return fstype


def _median(runs: list[dict[str, Any]], key: str, field: str) -> float:
    return float(statistics.median(run[key][field] for run in runs))


def _report(runs_by_mode: dict[str, list[dict[str, Any]]]) -> None:
    print(
        f"{'synchronous':<11} {'measure':<27} {'events/s':>9} {'deliv/s':>9} {'in-call':>8}"
        f" {'loop us':>8} {'p50 ms':>7} {'p99 ms':>7}"
    )
    for mode, runs in runs_by_mode.items():
        for per_event in (1, 10):
            key = f"add_event_{per_event}"
            print(
                f"{mode:<11} {f'commit_event, {per_event} deliveries':<27}"
                f" {_median(runs, key, 'events_per_s'):>9.0f}"
                f" {_median(runs, key, 'deliveries_per_s'):>9.0f}"
                f" {_median(runs, key, 'events_per_call_s'):>8.0f}"
                f" {_median(runs, key, 'loop_cpu_per_event_us'):>8.0f}"
                f" {_median(runs, key, 'latency_p50_ms'):>7.3f}"
                f" {_median(runs, key, 'latency_p99_ms'):>7.3f}"
            )
        key = "progress_finish"
        print(
            f"{mode:<11} {'progress + finish':<27} {'':>9}"
            f" {_median(runs, key, 'deliveries_per_s'):>9.0f}"
            f" {_median(runs, key, 'deliveries_per_call_s'):>8.0f}"
            f" {_median(runs, key, 'loop_cpu_per_delivery_us'):>8.0f}"
            f" {_median(runs, key, 'latency_p50_ms'):>7.3f}"
            f" {_median(runs, key, 'latency_p99_ms'):>7.3f}"
        )
        rows = _median(runs, "resume_10", "pending")
        per_row = statistics.median(
            run["resume_10"]["seconds"] / max(run["resume_10"]["pending"], 1) for run in runs
        )
        print(
            f"{mode:<11} {'pending() at start':<27} {rows:>9.0f} rows,"
            f" {per_row * 1e6:.1f} us/row ({per_row * 100_000:.2f} s for 100,000)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode; medians are shown")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temporary files")
    parser.add_argument(
        "--synchronous", nargs="+", default=["normal", "full"], choices=["normal", "full"]
    )
    args = parser.parse_args(argv)

    runs_by_mode: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.synchronous}
    with tempfile.TemporaryDirectory(prefix="spool-bench-", dir=args.dir) as tmp:
        directory = Path(tmp).resolve()
        fstype = _filesystem(directory)
        # Modes interleaved, so a burst of load from elsewhere does not land on one mode only.
        for repeat in range(args.repeat):
            for mode in args.synchronous:
                run_dir = directory / f"{mode}-{repeat}"
                run_dir.mkdir()
                runs_by_mode[mode].append(asyncio.run(_run_case(run_dir, mode, args.seconds)))

    print(
        f"spool throughput: {fstype}, {args.seconds:g} s per measurement,"
        f" median of {args.repeat} runs\n"
        "in-call = calls per second of time spent inside the spool (wall);"
        " loop us = event-loop thread CPU per call"
    )
    _report(runs_by_mode)

    record = {
        "bench": "spool_throughput",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "filesystem": fstype,
        "runs": runs_by_mode,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"spool_throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
