"""How fast the housekeeper evicts finished events, and how long it holds the event loop.

A spool in ``--dir`` is filled with ``--events`` finished events (one suppressed delivery, one
page and a ``--payload``-byte body each, as traffic leaves them), then emptied two ways:

* ``batched``: :meth:`Housekeeper.purge` as the daemon runs it (adaptive batches of about 4 ms,
  the loop given back between them), with a probe task on the same loop that sleeps 1 ms at a
  time and records how late it wakes: the longest stall anything else on the loop would see;
* ``all at once``: :meth:`Spool.purge`, everything in one call, as the daemon did before: the
  whole call is one stall.

Reported: events evicted per second, MiB of live pages freed per second, the longest single
purge transaction, the longest loop stall, and the batch size the housekeeper settled on.

    .venv/bin/python bench/spool_purge.py --events 50000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from phonepush.events import Event
from phonepush.store.commit import commit_event
from phonepush.store.housekeeping import Housekeeper
from phonepush.store.spool import NewDelivery, PushRequest, Spool

RESULTS = Path(__file__).resolve().parent / "results"


async def _fill(spool: Spool, events: int, payload: bytes) -> None:
    requests = (PushRequest("execute", "<CiscoIPPhoneExecute/>" * 8),)
    page = "<CiscoIPPhoneText><Title>Door</Title><Text>" + "x" * 200 + "</Text></CiscoIPPhoneText>"
    for i in range(events):
        event = Event("mqtt", "home/door", payload, {}, id=f"e{i:08d}", received_at=1000.0 + i)
        await commit_event(
            spool,
            event,
            rules=["door"],
            deliveries=[NewDelivery("door", "desk", requests, 2000.0 + i, "suppressed", "bench")],
            pages={f"p{i:08d}": page},
            cooldowns=(),
        )
        if i % 500 == 0:
            await asyncio.sleep(0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class _Probe:
    """Sleeps 1 ms at a time on the loop and records how late each wake-up is."""

    def __init__(self) -> None:
        self.lates: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lates.append(time.perf_counter() - asked - 0.001)

    def __enter__(self) -> _Probe:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def _case(directory: Path, events: int, payload_bytes: int, batched: bool) -> dict[str, Any]:
    path = directory / f"purge-{'batched' if batched else 'single'}.db"
    async with Spool(path, max_pending=10_000_000) as spool:
        await _fill(spool, events, os.urandom(payload_bytes))
        live = await spool.live_bytes()
        keeper = Housekeeper(spool, retention=86400, max_size=None)
        times: list[float] = []
        purge_batch = spool.events.purge_batch

        async def timed(*args: Any) -> tuple[int, tuple[float, int]]:
            started = time.perf_counter()
            try:
                return await purge_batch(*args)
            finally:
                times.append(time.perf_counter() - started)

        spool.events.purge_batch = timed  # type: ignore[method-assign]
        with _Probe() as probe:
            await asyncio.sleep(0.01)
            started = time.perf_counter()
            if batched:
                removed = await keeper.purge(math.inf)
                longest = keeper.longest_batch
            else:
                removed = await spool.events.purge(math.inf)
                longest = time.perf_counter() - started
            elapsed = time.perf_counter() - started
            await asyncio.sleep(0.01)
        freed = live - await spool.live_bytes()
    return {
        "mode": "batched" if batched else "all at once",
        "events": removed,
        "seconds": elapsed,
        "events_per_s": removed / elapsed,
        "mib_per_s": freed / 2**20 / elapsed,
        "live_mib_before": live / 2**20,
        "longest_transaction_ms": longest * 1000,
        "transaction_p50_ms": _percentile(times, 0.5) * 1000,
        "transaction_p99_ms": _percentile(times, 0.99) * 1000,
        "transactions": len(times) if batched else 1,
        "longest_loop_stall_ms": max(probe.lates, default=0.0) * 1000,
        "batch_at_end": keeper.batch if batched else removed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--payload", type=int, default=300, help="bytes of body per event")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temporary files")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="purge-bench-", dir=args.dir) as tmp:
        for batched in (True, False):
            results.append(asyncio.run(_case(Path(tmp), args.events, args.payload, batched)))
    print(
        f"spool purge: {args.events} finished events of {args.payload} bytes"
        f" ({results[0]['live_mib_before']:.1f} MiB of live pages)"
    )
    print(
        f"{'mode':<16} {'events/s':>9} {'MiB/s':>7} {'tx':>6} {'tx p50 ms':>10} {'p99 ms':>7}"
        f" {'max ms':>8} {'loop stall ms':>14} {'batch':>6}"
    )
    for r in results:
        print(
            f"{r['mode']:<16} {r['events_per_s']:>9.0f} {r['mib_per_s']:>7.1f}"
            f" {r['transactions']:>6} {r['transaction_p50_ms']:>10.2f}"
            f" {r['transaction_p99_ms']:>7.2f} {r['longest_transaction_ms']:>8.2f}"
            f" {r['longest_loop_stall_ms']:>14.2f} {r['batch_at_end']:>6}"
        )
    record = {
        "bench": "spool_purge",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "load": os.getloadavg(),
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"spool_purge-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
