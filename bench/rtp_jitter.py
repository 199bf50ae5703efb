"""How evenly the RTP sender paces packets, and what a stream costs in CPU.

1. One stream of ``--seconds`` (default 60) to a receiver in a child process: the deviation of
   each packet's send time from the 20 ms grid (p50/p99/max; target p99 <= 2 ms), plus what the
   receiver saw (loss, RFC 3550 jitter).
2. ``--streams`` (default 1,10,50) concurrent unicast streams of ``--cpu-seconds`` (default 10)
   each, one RtpStream per stream as the daemon would run them for separate pages: the sender
   process's CPU time per stream (percent of one core) and the send-time deviation under load.

Receivers run in a child process so their CPU is not counted. Prints a summary and writes a JSON
record to bench/results/.

    .venv/bin/python bench/rtp_jitter.py --seconds 60 --streams 1,10,50 --cpu-seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from phonepush.audio.clips import pcm16_to_ulaw
from phonepush.audio.rtp import RtpReceiver, RtpStream, SendStats

RESULTS = Path(__file__).resolve().parent / "results"


def _receive(conn: Connection, count: int) -> None:
    async def run() -> None:
        async with _Receivers(count) as receivers:
            conn.send([r.port for r in receivers])
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            loop.add_reader(conn.fileno(), stop.set)
            await stop.wait()
            loop.remove_reader(conn.fileno())
            conn.recv()
            await asyncio.sleep(0.2)  # the last packets in flight
            conn.send([r.stats.to_dict() for r in receivers])

    asyncio.run(run())


class _Receivers:
    def __init__(self, count: int) -> None:
        self._receivers = [RtpReceiver("127.0.0.1", 0) for _ in range(count)]

    async def __aenter__(self) -> list[RtpReceiver]:
        for receiver in self._receivers:
            await receiver.__aenter__()
        return self._receivers

    async def __aexit__(self, *exc: object) -> None:
        for receiver in self._receivers:
            await receiver.__aexit__(None, None, None)


def _audio(seconds: float) -> bytes:
    # A quiet ramp, not silence: the payload's content does not matter to pacing.
    return pcm16_to_ulaw([(n * 37) % 2000 - 1000 for n in range(round(8000 * seconds))])


def _percentiles(stats: list[SendStats]) -> dict[str, float]:
    offsets = sorted(abs(o) for s in stats for o in s.offsets_ms)

    def at(fraction: float) -> float:
        return offsets[min(len(offsets) - 1, max(0, round(fraction * len(offsets)) - 1))]

    return {
        "p50_ms": round(at(0.50), 3),
        "p99_ms": round(at(0.99), 3),
        "max_ms": round(offsets[-1], 3),
        "packets": len(offsets),
    }


async def _streams(ports: list[int], seconds: float) -> tuple[list[SendStats], float, float]:
    audio = _audio(seconds)
    async with _Streams(len(ports)) as streams:
        cpu0, wall0 = time.process_time(), time.monotonic()
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(stream.play(audio, [("127.0.0.1", port)]))
                for stream, port in zip(streams, ports, strict=True)
            ]
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return [t.result() for t in tasks], cpu, wall


class _Streams:
    def __init__(self, count: int) -> None:
        self._streams = [RtpStream(source=("127.0.0.1", 0)) for _ in range(count)]

    async def __aenter__(self) -> list[RtpStream]:
        for stream in self._streams:
            await stream.__aenter__()
        return self._streams

    async def __aexit__(self, *exc: object) -> None:
        for stream in self._streams:
            await stream.__aexit__(None, None, None)


def _run(count: int, seconds: float, cpu: int | None) -> dict[str, Any]:
    parent, child = mp.Pipe()
    process = mp.Process(target=_receive, args=(child, count), daemon=True)
    process.start()
    try:
        ports = parent.recv()
        stats, cpu_s, wall_s = asyncio.run(_streams(ports, seconds))
        parent.send("stop")
        received = parent.recv()
    finally:
        process.join(timeout=10)
    return {
        "streams": count,
        "seconds": seconds,
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),
        "cpu_percent_per_stream": round(100 * cpu_s / wall_s / count, 3),
        "send": _percentiles(stats),
        "resyncs": sum(s.resyncs for s in stats),
        "send_errors": sum(s.send_errors for s in stats),
        "received_packets": sum(r["packets"] for r in received),
        "lost": sum(r["lost"] for r in received),
        "max_jitter_ms": max(r["jitter_ms"] for r in received),
        "all_clean": all(
            not any(r[k] for k in ("lost", "duplicates", "out_of_order", "timestamp_errors"))
            for r in received
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the long stream")
    parser.add_argument("--streams", default="1,10,50", help="concurrent stream counts")
    parser.add_argument("--cpu-seconds", type=float, default=10.0, help="length of load runs")
    parser.add_argument("--cpu", type=int, default=None, help="pin the sender to this CPU")
    parser.add_argument(
        "--nice", type=int, default=0, help="add to the sender's niceness (negative needs root)"
    )
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.nice:
        os.nice(args.nice)

    print(f"load average {os.getloadavg()[0]:.2f}, sender niceness {os.nice(0)}")
    long_run = _run(1, args.seconds, args.cpu)
    send = long_run["send"]
    print(
        f"1 stream, {args.seconds:g} s: {send['packets']} packets, send-time deviation from the "
        f"20 ms grid p50 {send['p50_ms']:.3f} ms, p99 {send['p99_ms']:.3f} ms, "
        f"max {send['max_ms']:.3f} ms; received {long_run['received_packets']}, "
        f"lost {long_run['lost']}, RFC 3550 jitter {long_run['max_jitter_ms']:.3f} ms"
    )
    load_runs = []
    for count in (int(n) for n in args.streams.split(",") if n):
        run = _run(count, args.cpu_seconds, args.cpu)
        load_runs.append(run)
        send = run["send"]
        print(
            f"{count:3d} concurrent streams, {args.cpu_seconds:g} s: "
            f"CPU {run['cpu_percent_per_stream']:.3f} % of a core per stream; deviation "
            f"p50 {send['p50_ms']:.3f} / p99 {send['p99_ms']:.3f} / max {send['max_ms']:.3f} ms; "
            f"lost {run['lost']}, resyncs {run['resyncs']}"
        )
    record = {
        "bench": "rtp_jitter",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "nice": args.nice,
        "long_run": long_run,
        "load_runs": load_runs,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"rtp_jitter-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
