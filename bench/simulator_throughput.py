"""How many pushes a second the phone simulator serves on one core.

The simulator (a Fleet of N phones) runs in a child process pinned to one CPU; this process,
pinned to another, drives it over keep-alive connections with a lean raw-asyncio client (one
request in flight per connection, as a real client does with a phone). Prints pushes/s and
writes a JSON record to bench/results/.

    .venv/bin/python bench/simulator_throughput.py --phones 100 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from phonepush.sim.simulator import Fleet
from phonepush.wire.cisco import execute_xml, form_body
from phonepush.wire.uri import ExecuteItem

RESULTS = Path(__file__).resolve().parent / "results"
ITEMS = [ExecuteItem("Play:Chime.raw"), ExecuteItem("Display:On:10"), ExecuteItem("Key:Services")]


def _serve(conn: Connection, phones: int, delay_ms: float, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})

    async def run() -> None:
        # tone_ms=0: the benchmark measures request handling, not how long a tone plays.
        async with Fleet(phones, delay_ms=delay_ms, tone_ms=0) as fleet:
            conn.send([p.port for p in fleet.phones])
            cpu_start = time.process_time()
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            loop.add_reader(conn.fileno(), stop.set)
            await stop.wait()
            loop.remove_reader(conn.fileno())
            conn.send(
                {
                    "pushes": sum(p.state.pushes for p in fleet.phones),
                    "cpu_s": time.process_time() - cpu_start,
                }
            )

    asyncio.run(run())


class _Client(asyncio.Protocol):
    """Sends one push, reads the whole answer, sends the next: keep-alive, no pipelining."""

    def __init__(self, request: bytes, counts: dict[str, int], stop: asyncio.Event) -> None:
        self._request = request
        self._counts = counts
        self._stop = stop
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self._buf[:end]
        start = head.find(b"Content-Length: ") + 16
        length = int(head[start : head.find(b"\r\n", start)])
        if len(self._buf) < end + 4 + length:
            return
        body = self._buf[end + 4 : end + 4 + length]
        self._buf = self._buf[end + 4 + length :]
        ok = head.startswith(b"HTTP/1.1 200") and b"CiscoIPPhoneResponse" in body
        self._counts["ok" if ok else "bad"] += 1
        assert self._transport is not None
        if self._stop.is_set():
            self._transport.close()
        else:
            self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _drive(
    ports: list[int], per_phone: int, warmup: float, seconds: float
) -> dict[str, float]:
    body = form_body(execute_xml(ITEMS))
    counts = {"ok": 0, "bad": 0}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    clients: list[_Client] = []
    for port in ports:
        request = (
            f"POST /CGI/Execute HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        for _ in range(per_phone):
            _, client = await loop.create_connection(
                functools.partial(_Client, request, counts, stop), "127.0.0.1", port
            )
            clients.append(client)
    await asyncio.sleep(warmup)
    before, started = counts["ok"], time.perf_counter()
    cpu_before = time.process_time()
    await asyncio.sleep(seconds)
    done, elapsed = counts["ok"] - before, time.perf_counter() - started
    client_cpu = (time.process_time() - cpu_before) / elapsed
    stop.set()
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 10)
    return {
        "pushes": done,
        "seconds": elapsed,
        "pushes_per_s": done / elapsed,
        "bad_answers": counts["bad"],
        "client_cpu_share": client_cpu,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phones", type=int, default=100)
    parser.add_argument("--per-phone", type=int, default=1, help="connections per phone")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    args = parser.parse_args(argv)

    cpus = os.sched_getaffinity(0)
    client_cpu = args.client_cpu if args.client_cpu in cpus else args.server_cpu
    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(
        target=_serve, args=(child, args.phones, args.delay_ms, args.server_cpu)
    )
    server.start()
    try:
        ports = parent.recv()
        os.sched_setaffinity(0, {client_cpu})
        result = asyncio.run(_drive(ports, args.per_phone, args.warmup, args.seconds))
        parent.send("stop")
        server_total = parent.recv()
    finally:
        server.join(10)
        if server.is_alive():
            server.terminate()
    record: dict[str, Any] = {
        "bench": "simulator_throughput",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "server_cpu": args.server_cpu,
        "client_cpu": client_cpu,
        "phones": args.phones,
        "connections": args.phones * args.per_phone,
        "delay_ms": args.delay_ms,
        "server_pushes_total": server_total["pushes"],
        "server_cpu_s": server_total["cpu_s"],
        # Robust to other load on the machine: pushes per second of the server's own CPU time.
        "pushes_per_server_cpu_s": server_total["pushes"] / max(server_total["cpu_s"], 1e-9),
        **result,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"simulator_throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"{record['pushes_per_s']:.0f} pushes/s ({record['pushes']} in {record['seconds']:.1f} s, "
        f"{args.phones} phones, {record['connections']} connections, delay {args.delay_ms} ms, "
        f"bad answers {record['bad_answers']}, client CPU {record['client_cpu_share']:.0%})"
    )
    print(
        f"server: {record['pushes_per_server_cpu_s']:.0f} pushes per CPU-second "
        f"({server_total['pushes']} pushes, {server_total['cpu_s']:.1f} s CPU, warm-up included)"
    )
    print(f"wrote {out}")
    return 0 if record["bad_answers"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
