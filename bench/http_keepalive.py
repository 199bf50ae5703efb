"""Keep-alive request latency of the daemon's HTTP side, with and without TCP_NODELAY.

One client connection sends ``GET /healthz`` ``--requests`` times, one after another, on a
kept-alive connection to a running daemon (in this process, its own event loop and socket,
bound as ``phonepush run`` binds it). Twice: with the daemon's protocol (TCP_NODELAY on accepted
sockets) and with uvicorn's stock h11 protocol in its place, which is what the daemon served
with before. Prints p50/p90/p99/max per variant.

    .venv/bin/python bench/http_keepalive.py [--requests 500]

Why it matters: the answer goes out as two writes (head, then body). Without TCP_NODELAY the
second waits until the client ACKs the first, and a client delays that ACK (Linux: ~40 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

from prometheus_client import CollectorRegistry  # noqa: E402
from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402

from phonepush.app.daemon import Daemon  # noqa: E402
from phonepush.config import parse_config  # noqa: E402
from phonepush.http import server  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _measure(port: int, requests: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"
    times: list[float] = []
    try:
        for _ in range(requests + 20):
            start = time.perf_counter()
            writer.write(request)
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)  # "ok"
            times.append(time.perf_counter() - start)
    finally:
        writer.close()
    return times[20:]  # the first ones warm up both sides


async def _run(variant: str, requests: int) -> list[float]:
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="phonepush-keepalive-") as tmp:
        config = parse_config(
            {
                "server": {"listen": f"127.0.0.1:{port}"},
                "spool": {"path": str(Path(tmp) / "spool.db")},
                "webhook": {"allow_anonymous": True},
            },
            environ={},
        )
        daemon = Daemon(config, registry=CollectorRegistry())
        task = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 10)
        try:
            return await _measure(port, requests)
        finally:
            daemon.stop()
            await task


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    ours = server.http_protocol
    print(f"{'variant':<28} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}  (ms, {args.requests} req)")
    for variant in ("stock h11 (no TCP_NODELAY)", "phonepush (TCP_NODELAY)"):
        # The daemon builds its uvicorn config through server.http_protocol: swap it.
        server.http_protocol = (  # type: ignore[assignment]
            (lambda timeout: H11Protocol) if variant.startswith("stock") else ours
        )
        times = asyncio.run(_run(variant, args.requests))
        row = [_percentile(times, p) * 1000 for p in (50, 90, 99)] + [max(times) * 1000]
        print(f"{variant:<28} " + " ".join(f"{v:8.2f}" for v in row))
    server.http_protocol = ours  # type: ignore[assignment]
    return 0


if __name__ == "__main__":
    sys.exit(main())
