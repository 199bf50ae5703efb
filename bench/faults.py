"""Fault injection at full size: the scenarios of tests/test_faults.py with the issue's numbers.

Each scenario runs ``phonepush run`` as a process against a real mosquitto and 50 simulated
phones, injects its fault, and counts events sent / accepted / delivered / duplicated / lost.
Prints one table row per scenario (the table in docs/reliability.md) and writes a JSON record to
bench/results/.

    .venv/bin/python bench/faults.py                    # all six, full size
    .venv/bin/python bench/faults.py sigkill burst      # some of them
    .venv/bin/python bench/faults.py --scale 0.3        # the size the tests run

The full-disk scenario mounts a tmpfs, so it needs root (or CAP_SYS_ADMIN).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# The scenarios live with the tests, so the suite and the figures come from the same code.
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "daemon"))

import test_faults as faults  # noqa: E402

Scenario = Callable[[Path, float], Awaitable[faults.Figures]]

SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "sigkill": (
        "SIGKILL mid-burst, restart",
        lambda work, scale: faults.scenario_sigkill(work, round(1000 * scale)),
    ),
    "broker_restart": (
        "mosquitto restart mid-burst",
        lambda work, scale: faults.scenario_broker_restart(work, round(1000 * scale)),
    ),
    "sick_phones": (
        "6 sick phones of 50 (deliveries)",
        lambda work, scale: faults.scenario_sick_phones(work, round(200 * scale), ttl=10.0),
    ),
    "burst": (
        "10,000-event burst over the spool limit",
        lambda work, scale: faults.scenario_burst(
            work, round(10_000 * scale), round(1000 * scale), max_pending=500
        ),
    ),
    "spool_full": (
        "spool disk full, then freed",
        lambda work, scale: faults.scenario_spool_full(work, round(1000 * scale)),
    ),
    "share_group": (
        "share group of 2, one SIGKILLed",
        lambda work, scale: faults.scenario_share_group(work, round(1000 * scale)),
    ),
}


def _rerun(name: str) -> str:
    return f".venv/bin/python bench/faults.py {name}"


async def _run(names: list[str], scale: float, work: Path) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        title, scenario = SCENARIOS[name]
        started = time.monotonic()
        figures = await scenario(work / name, scale)
        row = figures.row()
        row["title"] = title
        row["wall_s"] = round(time.monotonic() - started, 1)
        rows.append(row)
        print(
            f"| {title} | {figures.sent:,} | {figures.accepted:,} | {figures.delivered:,} "
            f"| {figures.duplicated:,} | {figures.lost:,} | `{_rerun(name)}` |",
            flush=True,
        )
        details = {k: v for k, v in row.items() if k not in ("scenario", "title")}
        print(f"    {json.dumps(details, default=str)}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], default=[])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of full size")
    parser.add_argument("--work", type=Path, help="keep logs and spools here (default: temp)")
    args = parser.parse_args()
    names = args.scenarios or list(SCENARIOS)
    print("| fault | sent | accepted | delivered | duplicated | lost | rerun |")
    print("|---|---:|---:|---:|---:|---:|---|")
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        rows = asyncio.run(_run(names, args.scale, args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="phonepush-faults-") as tmp:
            rows = asyncio.run(_run(names, args.scale, Path(tmp)))
    RESULTS.mkdir(exist_ok=True)
    record = {
        "bench": "faults",
        "scale": args.scale,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
    }
    out = RESULTS / f"faults-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
