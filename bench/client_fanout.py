"""How long 1,000 concurrent pushes to 1,000 phones take from the client side, per HTTP client.

The phones are a simulator Fleet (each push takes ``--delay-ms``, 20 ms) in a child process pinned
to one CPU; this process, pinned to another, sends one push to every phone at once, twice: a cold
round (clients made, connections opened) and a warm round (keep-alive). For each variant it
prints wall time and this process's CPU ms per push:

* ``phoneclient``: phonepush's ``PhoneClient``, one per phone (what the daemon does; since the
  performance pass its own lean HTTP/1.1 client);
* ``phoneclient+httpx``: ``PhoneClient`` per phone over an injected ``httpx.AsyncHTTPTransport``
  (what it was before: one small httpx client per phone);
* ``shared-httpx``: one ``httpx.AsyncClient`` for all phones (the trap; capped by
  ``--shared-cap`` seconds per round);
* ``phoneclient+aiohttp``: ``PhoneClient`` per phone over the ``httpx-aiohttp`` transport;
* ``aiohttp``: plain aiohttp, one ``ClientSession`` with one connection per phone.

Variants whose packages are not importable print "not installed". The last two need
``aiohttp`` and ``httpx-aiohttp``, which are not phonepush dependencies; run with an interpreter
that has them, e.g.::

    .venv/bin/python bench/client_fanout.py
    /tmp/probe-venv/bin/python bench/client_fanout.py     # with aiohttp + httpx-aiohttp

Writes a JSON record to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# Run from a checkout with any interpreter that has the dependencies: use this tree's source.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

import httpx

from phonepush.phone.client import PhoneClient, PhoneTarget
from phonepush.sim.simulator import Fleet
from phonepush.wire.cisco import execute_xml, form_body, parse_response
from phonepush.wire.uri import ExecuteItem

RESULTS = Path(__file__).resolve().parent / "results"
ITEMS = [ExecuteItem("Key:Headset"), ExecuteItem("Display:On:10")]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
VARIANTS = ("phoneclient", "phoneclient+httpx", "shared-httpx", "phoneclient+aiohttp", "aiohttp")
NEEDS = {"phoneclient+aiohttp": ("aiohttp", "httpx_aiohttp"), "aiohttp": ("aiohttp",)}


def _serve(conn: Connection, phones: int, delay_ms: float, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    async def run() -> None:
        async with Fleet(phones, delay_ms=delay_ms, tone_ms=0) as fleet:
            conn.send([p.port for p in fleet.phones])
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            loop.add_reader(conn.fileno(), stop.set)
            await stop.wait()
            loop.remove_reader(conn.fileno())
            conn.send(sum(p.state.pushes for p in fleet.phones))

    asyncio.run(run())


Push = Callable[[int], Awaitable[None]]


async def _round(ports: list[int], push: Push, cap: float) -> dict[str, Any]:
    """One push to every phone at once; wall time, CPU ms per push, failures."""
    failures: list[str] = []

    async def one(index: int) -> None:
        try:
            await push(index)
        except Exception as exc:  # noqa: BLE001 - a bench counts failures of any kind
            failures.append(f"{type(exc).__name__}: {exc}")

    cpu0, wall0 = time.process_time(), time.perf_counter()
    tasks = [asyncio.ensure_future(one(i)) for i in range(len(ports))]
    done, pending = await asyncio.wait(tasks, timeout=cap)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return {
        "wall_s": round(wall, 3),
        "cpu_ms_per_push": round(cpu * 1000 / len(ports), 3),
        "completed": len(done) - len(failures),
        "failed": len(failures),
        "capped": bool(pending),
        "first_failure": failures[0] if failures else "",
    }


async def _phoneclient(
    ports: list[int], cap: float, aiohttp_transport: bool, httpx_transport: bool = False
) -> list[dict[str, Any]]:
    xml = execute_xml(ITEMS)

    def transport() -> httpx.AsyncBaseTransport | None:
        if httpx_transport:
            return httpx.AsyncHTTPTransport(
                verify=False,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                retries=0,
            )
        if not aiohttp_transport:
            return None
        from httpx_aiohttp import AiohttpTransport

        return AiohttpTransport(
            verify=False,  # plain HTTP; a verifying context would load the CA bundle per phone
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            trust_env=False,
        )

    # Cheap to make; each opens its HTTP client and connection on its first push (cold round),
    # as the daemon's clients do.
    clients = [
        PhoneClient(PhoneTarget(f"p{i}", "127.0.0.1", port), transport=transport())
        for i, port in enumerate(ports)
    ]

    async def push(index: int) -> None:
        await clients[index].push(xml)

    try:
        return [await _round(ports, push, cap) for _ in range(2)]
    finally:
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)


async def _shared_httpx(ports: list[int], cap: float) -> list[dict[str, Any]]:
    body = form_body(execute_xml(ITEMS))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=cap, trust_env=False) as client:

        async def push(index: int) -> None:
            url = f"http://127.0.0.1:{ports[index]}/CGI/Execute"
            response = await client.post(url, content=body, headers=FORM)
            parse_response(response.content, response.headers.get("Content-Type"), 200)

        return [await _round(ports, push, cap) for _ in range(2)]


async def _aiohttp(ports: list[int], cap: float) -> list[dict[str, Any]]:
    import aiohttp

    body = form_body(execute_xml(ITEMS))
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=1)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def push(index: int) -> None:
            url = f"http://127.0.0.1:{ports[index]}/CGI/Execute"
            async with session.post(url, data=body, headers=FORM) as response:
                content = await response.read()
                parse_response(content, response.headers.get("Content-Type"), response.status)

        return [await _round(ports, push, cap) for _ in range(2)]


async def _variant(name: str, ports: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    if name == "phoneclient":
        return await _phoneclient(ports, args.cap, aiohttp_transport=False)
    if name == "phoneclient+httpx":
        return await _phoneclient(ports, args.cap, aiohttp_transport=False, httpx_transport=True)
    if name == "phoneclient+aiohttp":
        return await _phoneclient(ports, args.cap, aiohttp_transport=True)
    if name == "shared-httpx":
        return await _shared_httpx(ports, args.shared_cap)
    return await _aiohttp(ports, args.cap)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phones", type=int, default=1000)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--cap", type=float, default=60.0, help="seconds per round at most")
    parser.add_argument(
        "--shared-cap", type=float, default=40.0, help="seconds per round of shared-httpx"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    results: dict[str, Any] = {}
    for name in args.variants.split(","):
        missing = [m for m in NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]
        if missing:
            results[name] = {"not_installed": missing}
            continue
        # A fresh fleet per variant, so no variant inherits another's connections.
        ours, theirs = mp.Pipe()
        child = mp.get_context("fork").Process(
            target=_serve, args=(theirs, args.phones, args.delay_ms, server_cpu)
        )
        child.start()
        try:
            ports = ours.recv()
            if client_cpu is not None:
                os.sched_setaffinity(0, {client_cpu})
            rounds = asyncio.run(_variant(name, ports, args))
            ours.send("stop")
            served = ours.recv()
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
            os.sched_setaffinity(0, cpus)
        results[name] = {"rounds": rounds, "pushes_served": served}

    print(f"{args.phones} concurrent pushes to {args.phones} phones, {args.delay_ms:g} ms each")
    print(f"{'variant':<22}{'round':<7}{'wall s':>9}{'CPU ms/push':>13}{'ok':>7}{'failed':>8}")
    for name, result in results.items():
        if "not_installed" in result:
            print(f"{name:<22}not installed ({', '.join(result['not_installed'])})")
            continue
        for label, r in zip(("cold", "warm"), result["rounds"], strict=True):
            capped = "  (capped)" if r["capped"] else ""
            print(
                f"{name:<22}{label:<7}{r['wall_s']:>9.2f}{r['cpu_ms_per_push']:>13.2f}"
                f"{r['completed']:>7}{r['failed']:>8}{capped}"
            )
            if r["first_failure"]:
                print(f"{'':<29}first failure: {r['first_failure'][:100]}")

    RESULTS.mkdir(exist_ok=True)
    record = {
        "bench": "client_fanout",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "machine": platform.machine(),
        "cpus": len(cpus),
        "load": os.getloadavg(),
        "phones": args.phones,
        "delay_ms": args.delay_ms,
        "versions": {m: _version(m) for m in ("httpx", "httpcore", "aiohttp", "httpx-aiohttp")},
        "results": results,
    }
    path = RESULTS / f"client_fanout-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
