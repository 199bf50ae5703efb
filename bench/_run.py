"""``bench/run``: every daemon benchmark in one run, then the tables in docs/performance.md.

Runs fanout.py (with the bare-client floor), fanout_large.py, throughput.py, latency.py,
startup_memory.py and alternatives.py one after the other (never at once: they share 2 CPUs),
then reads the JSON each wrote in this run and rewrites the text between
``<!-- bench:daemon:begin -->`` and ``<!-- bench:daemon:end -->`` in docs/performance.md.
``--quick`` passes ``--quick`` to every script, skips the bare-client floor (it needs a venv
with aiohttp) and leaves the docs alone (unless ``--docs``). ``--only`` may also name
``cluster`` (bench/cluster.py, several instances on a throwaway PostgreSQL): it has a section of
its own in docs/performance.md, so the full run leaves it out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

DOC = c.ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:daemon:begin -->", "<!-- bench:daemon:end -->"
SCRIPTS = {
    "fanout": ["bench/fanout.py", "--floor"],
    "fanout_large": ["bench/fanout_large.py"],
    "throughput": ["bench/throughput.py"],
    "latency": ["bench/latency.py"],
    "startup_memory": ["bench/startup_memory.py"],
    "alternatives": ["bench/alternatives.py"],
}
#: Benchmarks with a section of their own in docs/performance.md: run when named in ``--only``
#: (the smoke pass names them), never in the default full run nor in the table above.
SEPARATE = {
    "cluster": ["bench/cluster.py"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke pass; docs untouched")
    parser.add_argument("--docs", action="store_true", help="rewrite the docs even with --quick")
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated benches")
    parser.add_argument(
        "--render", action="store_true", help="run nothing: tables from the newest full runs"
    )
    args = parser.parse_args()
    if args.render:
        args.only = ""

    load_before = os.getloadavg()
    started = time.time()
    records: dict[str, dict[str, Any]] = {}
    for name in filter(None, args.only.split(",")):
        before = set(c.RESULTS.glob(f"{name}-*.json"))
        script = [x for x in (SCRIPTS | SEPARATE)[name] if not (args.quick and x == "--floor")]
        command = [sys.executable, *script, *(["--quick"] if args.quick else [])]
        print(f"\n$ {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True, cwd=c.ROOT)
        new = sorted(set(c.RESULTS.glob(f"{name}-*.json")) - before)
        if new:
            records[name] = json.loads(new[-1].read_text()) | {"file": new[-1].name}
    meta = {
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "minutes": round((time.time() - started) / 60, 1),
        "quick": args.quick,
    }
    if not args.quick:
        # A partial run (--only) fills the other rows from their newest full-run records.
        for name in SCRIPTS:
            if name not in records:
                older = sorted(c.RESULTS.glob(f"{name}-*.json"))
                full = [p for p in older if not json.loads(p.read_text())["args"].get("quick")]
                if full:
                    records[name] = json.loads(full[-1].read_text()) | {"file": full[-1].name}
        records = {name: records[name] for name in SCRIPTS if name in records}
    table = render({name: r for name, r in records.items() if name in SCRIPTS}, meta)
    print("\n" + table)
    if (not args.quick or args.docs) and set(SCRIPTS) <= set(records):
        update_doc(table)
        print(f"updated {DOC.relative_to(c.ROOT)}")
    return 0


def update_doc(table: str) -> None:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def _versions() -> dict[str, str]:
    import sqlite3

    found = {k: v or "?" for k, v in c.versions("phonepush", "paho-mqtt", "httpx").items()}
    found["SQLite"] = sqlite3.sqlite_version
    shown = subprocess.run([c.MOSQUITTO, "-h"], capture_output=True, text=True)
    first = (shown.stdout or shown.stderr).splitlines()[:1]
    found["mosquitto"] = first[0].split("version", 1)[-1].strip() if first else "?"
    return found


def _get(record: dict[str, Any] | None, *path: str) -> Any:
    value: Any = record
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _num(value: Any, fmt: str = "{:,.0f}") -> str:
    return fmt.format(value) if isinstance(value, int | float) else "—"


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def render(records: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    fan = records.get("fanout")
    thr = records.get("throughput")
    lat = records.get("latency")
    mem = records.get("startup_memory")
    alt = records.get("alternatives")
    machine = (fan or thr or {}).get("machine", {})
    versions = _versions()
    times = sorted(r.get("time", "") for r in records.values())
    loads = ", ".join(
        f"{name} {_num((_get(r, 'machine', 'load') or [None])[0], '{:.1f}')}"
        for name, r in records.items()
    )
    lines = [
        f"Runs of {times[0] if times else '?'} to {times[-1] if times else '?'}: "
        f"{machine.get('cpus')} CPUs ({machine.get('cpu_model') or 'unknown'}, virtualised, "
        f"shared with other work), Linux {machine.get('kernel')}, CPython "
        f"{machine.get('python')}; 1-minute load average as each bench ended: {loads}. Files: "
        + ", ".join(f"`bench/results/{r['file']}`" for r in records.values())
        + ".",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "| # | measure | target | result | met |",
        "|---|---|---|---|---|",
    ]
    warm = _get(fan, "phonepush", "warm_median_s")
    cold = _get(fan, "phonepush", "cold", "last_answer_s")
    lines.append(
        f"| 1 | fan-out: 1 event → 1,000 phones at 20 ms, publish → last answer "
        f"(warm, median of 5; first event after start: {_num(cold, '{:.2f}')} s) | ≤ 0.5 s | "
        f"{_num(warm, '{:.3f}')} s | {_met(None if warm is None else warm <= 0.5)} |"
    )
    rate = _get(thr, "phonepush", "median_per_second")
    ceiling = _get(thr, "simulator_ceiling", "pushes_per_s")
    share = _num(_get(thr, "ratio_to_ceiling"), "{:.2f}")
    lines.append(
        f"| 2 | throughput: events → 100 phones answering at once, deliveries/s (median of 3; "
        f"simulator alone: {_num(ceiling)}/s, ratio {share})"
        f" | ≥ 2,600/s | {_num(rate)}/s | {_met(None if rate is None else rate >= 2600)} |"
    )
    cpu_thr = _get(thr, "phonepush", "cpu_ms_per_delivery")
    cpu_fan = _get(fan, "phonepush", "cpu_ms_per_delivery")
    worst = max((x for x in (cpu_thr, cpu_fan) if x is not None), default=None)
    lines.append(
        f"| 3 | daemon CPU per delivery during (2) / (1) | ≤ 0.4 ms | "
        f"{_num(cpu_thr, '{:.3f}')} / {_num(cpu_fan, '{:.3f}')} ms | "
        f"{_met(None if worst is None else worst <= 0.4)} |"
    )
    floor = _get(fan, "floor") or {}
    bare = [
        (name, figures)
        for name, figures in floor.items()
        if isinstance(figures, dict) and "cpu_ms_per_push" in figures
    ]
    if bare:
        best = min(figures["cpu_ms_per_push"] for _, figures in bare)
        ratio = worst / best if worst is not None and best else None
        lines.append(
            f"| 3 | daemon CPU per delivery ÷ the cheapest bare client's CPU per push "
            f"({_num(best, '{:.3f}')} ms) | ≤ 3× | {_num(ratio, '{:.1f}')}× | "
            f"{_met(None if ratio is None else ratio <= 3)} |"
        )
    p50 = _get(lat, "phonepush", "p50_ms")
    p99 = _get(lat, "phonepush", "p99_ms")
    lines.append(
        f"| 4 | latency at 200 events/s, publish → request at the phone, p50 / p99 | ≤ 5 / ≤ 25 ms"
        f" | {_num(p50, '{:.2f}')} / {_num(p99, '{:.2f}')} ms | "
        f"{_met(None if p50 is None or p99 is None else p50 <= 5 and p99 <= 25)} |"
    )
    peak = _get(mem, "phonepush", "peak_rss_mb")
    ready = _get(mem, "phonepush", "ready_median_s")
    lines.append(
        f"| 5 | peak RSS, 1,000 phones and 200 rules, after a fan-out | ≤ 100 MB | "
        f"{_num(peak, '{:.1f}')} MB | {_met(None if peak is None else peak <= 100)} |"
    )
    lines.append(
        f"| 5 | start to ready (`/readyz`), median of 5 | ≤ 1.5 s | {_num(ready, '{:.2f}')} s | "
        f"{_met(None if ready is None else ready <= 1.5)} |"
    )
    if bare:
        lines += [
            "",
            "Bare clients, no daemon: 1,000 concurrent pushes to the same 1,000 phones "
            "(`bench/client_fanout.py`, warm round, same run):",
            "",
            "| client | wall s | CPU ms per push |",
            "|---|---|---|",
        ]
        names = {
            "aiohttp": "plain aiohttp, one session",
            "phoneclient+aiohttp": "PhoneClient over httpx + httpx-aiohttp",
            "phoneclient+httpx": "PhoneClient over one small httpx client per phone (before)",
            "phoneclient": "PhoneClient, its own HTTP/1.1 client (now)",
            "shared-httpx": "one shared httpx client",
        }
        for name, figures in bare:
            capped = " (capped)" if figures.get("capped") else ""
            lines.append(
                f"| {names.get(name, name)} | {figures['wall_s']:.2f}{capped} | "
                f"{figures['cpu_ms_per_push']:.3f} |"
            )
    large = records.get("fanout_large")
    if large:
        lines += _render_large(large)
    if alt:
        lines += _render_alternatives(alt)
    return "\n".join(lines)


def _render_large(large: dict[str, Any]) -> list[str]:
    """(7) one event to 5,000 and 10,000 phones, the daemon held to 1,024 open files."""
    limits = {5000: 2.5, 10000: 5.0}
    lines = [
        "",
        f"Large fan-out (`bench/fanout_large.py`): one event to N phones at 20 ms, the daemon "
        f"held to {large.get('daemon_nofile', 1024)} open files (soft and hard), median of "
        f"{_get(large, 'args', 'rounds')} rounds; the floor is bare PhoneClients pushing to the "
        "same phones in the same run, 256 at a time, a fresh connection each:",
        "",
        "| phones | publish → last answer (target) | floor | daemon CPU per delivery (≤ 0.3 ms) "
        "| floor CPU per push | simulator CPU per push | peak RSS (≤ 200 MB) | most fds | "
        "all answered, no EMFILE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in large.get("results", []):
        ours, floor = result["phonepush"], result["floor"]
        phones = result["phones"]
        target = limits.get(phones)
        wall = ours.get("median_s")
        cpu = ours.get("cpu_ms_per_delivery")
        rss = _get(ours, "memory_mb", "VmHWM")
        lines.append(
            f"| {phones:,} | {_num(wall, '{:.2f}')} s (≤ {_num(target, '{:g}')} s: "
            f"{_met(None if target is None or wall is None else wall <= target)}) | "
            f"{_num(floor.get('median_s'), '{:.2f}')} s | {_num(cpu, '{:.3f}')} ms "
            f"({_met(None if cpu is None else cpu <= 0.3)}) | "
            f"{_num(floor.get('cpu_ms_per_push'), '{:.3f}')} ms | "
            f"{_num(ours.get('simulator_cpu_ms_per_push'), '{:.3f}')} ms | "
            f"{_num(rss, '{:.0f}')} MB ({_met(None if rss is None else rss <= 200)}) | "
            f"{ours.get('peak_fds')} | "
            f"{_met(bool(ours.get('all_complete')) and not ours.get('emfile_in_log'))} |"
        )
    return lines


def _render_alternatives(alt: dict[str, Any]) -> list[str]:
    results = alt.get("results", {})
    phones = _get(alt, "args", "phones")
    lines = [
        "",
        f"Side by side (`bench/alternatives.py`, same broker and simulated phones; mqttwarn "
        f"{_get(alt, 'versions', 'mqttwarn') or '?'} in its own venv):",
        "",
        f"| system | (1) fan-out, {phones} phones at 20 ms | (2) deliveries/s, 100 phones | "
        "deliveries/s, 1 phone | CPU ms per delivery (2) | (4) latency p50 / p99 at 200/s |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "phonepush": "phonepush (spool on)",
        "mqttwarn-w1": "mqttwarn, 1 worker (nothing durable)",
        "mqttwarn-w10": "mqttwarn, 10 workers (nothing durable)",
        "script-par8": "`phonepush send` per event and phone, 8 at once",
        "script-seq": "`phonepush send` per event and phone, one at a time",
    }
    for system, measures in results.items():
        fan = measures.get("fanout", {})
        lines.append(
            f"| {labels.get(system, system)} | {_num(fan.get('median_s'), '{:.2f}')} s | "
            f"{_num(_get(measures, 'throughput', 'per_second'))} | "
            f"{_num(_get(measures, 'single', 'per_second'))} | "
            f"{_num(_get(measures, 'throughput', 'cpu_ms_per_delivery'), '{:.2f}')} | "
            f"{_num(_get(measures, 'latency', 'p50_ms'), '{:.1f}')} / "
            f"{_num(_get(measures, 'latency', 'p99_ms'), '{:.1f}')} ms |"
        )

    def fig(system: str, *path: str) -> float | None:
        value = _get(results, system, *path)
        return float(value) if isinstance(value, int | float) else None

    ours_fan = fig("phonepush", "fanout", "median_s")
    ours_tp = fig("phonepush", "throughput", "per_second")
    ours_single = fig("phonepush", "single", "per_second")
    ours_p50 = fig("phonepush", "latency", "p50_ms")
    warn = [
        x
        for x in (
            fig("mqttwarn-w1", "fanout", "median_s"),
            fig("mqttwarn-w10", "fanout", "median_s"),
        )
        if x
    ]
    warn_tp = [
        x
        for x in (
            fig("mqttwarn-w1", "throughput", "per_second"),
            fig("mqttwarn-w10", "throughput", "per_second"),
        )
        if x
    ]
    warn_single = [
        x
        for x in (
            fig("mqttwarn-w1", "single", "per_second"),
            fig("mqttwarn-w10", "single", "per_second"),
        )
        if x
    ]
    warn_p50 = [
        x
        for x in (fig("mqttwarn-w1", "latency", "p50_ms"), fig("mqttwarn-w10", "latency", "p50_ms"))
        if x
    ]
    script_fan = fig("script-par8", "fanout", "median_s")
    script_seq = fig("script-seq", "fanout", "median_s")
    script_p50 = fig("script-par8", "latency", "p50_ms")

    def ratio(theirs: float | None, ours: float | None) -> float | None:
        return theirs / ours if theirs and ours else None

    rows = [
        (
            "fan-out, × faster than the scripts (8 at once / one at a time)",
            "≥ 100×",
            ratio(script_fan, ours_fan),
            ratio(script_seq, ours_fan),
            100,
        ),
        (
            "fan-out, × faster than mqttwarn's best",
            "≥ 30×",
            ratio(min(warn) if warn else None, ours_fan),
            None,
            30,
        ),
        (
            "throughput (100 phones), × mqttwarn's best",
            "≥ 1.5×",
            ratio(ours_tp, max(warn_tp) if warn_tp else None),
            None,
            1.5,
        ),
        (
            "throughput (1 phone), × mqttwarn's best",
            "—",
            ratio(ours_single, max(warn_single) if warn_single else None),
            None,
            None,
        ),
        (
            "latency p50, × lower than mqttwarn's best / the scripts (8 at once)",
            "—",
            ratio(min(warn_p50) if warn_p50 else None, ours_p50),
            ratio(script_p50, ours_p50),
            None,
        ),
    ]
    lines += ["", "| ratio | target | result | met |", "|---|---|---|---|"]
    for label, target, first, second, threshold in rows:
        shown = _num(first, "{:,.1f}×") + (
            f" / {_num(second, '{:,.1f}×')}" if second is not None else ""
        )
        met = None if threshold is None or first is None else first >= threshold
        if met is not None and second is not None:
            met = met and second >= threshold
        lines.append(f"| {label} | {target} | {shown} | {_met(met)} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
