"""Several instances on one PostgreSQL store: throughput and fan-out with 1, 2 and 3 instances
beside one on SQLite, and how long the work of an instance killed with SIGKILL waits for another.

Setup: a throwaway PostgreSQL server made for the run (``initdb`` and ``pg_ctl`` from
/usr/lib/postgresql/*/bin in a temp folder, on a loopback port, ``fsync`` off; as root run as
the ``postgres`` user: ``tests/_pg_cluster.py``, the tests' own), a fresh database for every
setup; simulated phones in a child process pinned to the first CPU; 1, 2 or 3 ``phonepush run``
with the same configuration (``[spool] url`` on that database, ``[cluster] lease``; each on its
own HTTP port), and one on an SQLite spool as the baseline. ``[cluster]`` is passed only when
``phonepush check`` takes it: without it the instances do not coordinate, and each pushes what it
took in, whatever the others do (the figures then say what no coordination costs).

* **throughput**: ``--events`` webhook events posted round-robin over the instances
  (``--senders`` kept-alive connections, each in a thread, per instance), event i to the
  ``--per-event`` phones of group i mod (phones / per-event); events/s and deliveries/s from the
  first post to the last (event, phone) answered, timed at the phones. CPU per delivery: the
  daemons' user+sys CPU (``/proc/<pid>/stat``) plus the PostgreSQL server's (the postmaster with
  the backends it reaped, and its live backends), from the first post until the finishes are
  committed, divided by the (event, phone) pairs delivered.
* **fan-out**: one event to all phones, posted to the instances in turn, post -> the last phone's
  first answer; a warm-up round, then the median of ``--rounds``.
* **takeover**: two instances, ``--takeover-phones`` phones that take ``--delay-ms`` per push,
  ``--takeover-events`` events each to all of them posted to both; ``--kill-after`` seconds later
  one instance gets SIGKILL. An instance's phones are those it holds connections to and the other
  does not (``/proc/<pid>/fd`` against ``/proc/net/tcp``: instances that share the phones out
  push each to their own; instances that do not both hold connections to every phone, and no
  phone is either one's alone); the one with more phones of its own is killed (the second on a
  tie), so that it leaves work to take over. Owed at the kill: the
  (event, phone) pairs no push had reached (a push under way is finished by the phone, but the
  killed instance never recorded it). Figures: kill -> the first push (request at the phone) by
  the survivor of an owed pair on one of the killed instance's phones; kill -> every pair
  answered; the owed pairs the killed instance took in, and how many of them were delivered;
  pairs never delivered; duplicates (an (event, phone) answered more than once, bounded by the
  pushes under way at the kill once the instances coordinate) and overlaps (a push that reached a
  phone still busy with another; the simulator counts them and answers busy).

On 2 CPUs shared by the phones, the daemons and PostgreSQL, the point is the cost per delivery
and the takeover time, not a speed-up.

    .venv/bin/python bench/cluster.py [--quick] [--instances 1,2,3] [--lease 2s]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

sys.path.insert(0, str(c.ROOT / "tests"))

from _pg_cluster import PgCluster, bin_dir

TOKEN = "bench-token"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: A pushed (event, phone): the event's number and the phone's index.
Pair = tuple[int, int]


# --- PostgreSQL ----------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres() -> Iterator[PgCluster]:
    bindir = bin_dir()
    if bindir is None:
        raise SystemExit(
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: apt-get install postgresql"
        )
    folder = Path(tempfile.mkdtemp(prefix="phonepush-bench-pg-"))
    cluster = PgCluster(bindir, folder)
    try:
        try:
            cluster.init()
            cluster.start()
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"cannot start PostgreSQL: {exc.stdout}{exc.stderr}") from None
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


def _stat_cpu(fields: Sequence[str]) -> float:
    return sum(int(f) for f in fields[11:15]) / _CLK_TCK


def postgres_cpu(cluster: PgCluster) -> float:
    """User + system CPU seconds of the server: the postmaster with the backends it has reaped,
    and its live children (backends, checkpointer, WAL writer...)."""
    master = int((cluster.data / "postmaster.pid").read_text().split()[0])
    total = c.cpu_seconds(master)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone since the listing
            continue
        if int(fields[1]) == master:
            total += _stat_cpu(fields)
    return total


# --- configuration and instances -----------------------------------------------------------------


def phones_toml(phones: c.Phones, per_group: int) -> str:
    lines = []
    for i, port in enumerate(phones.ports):
        lines += [
            "[[phones]]",
            f'name = "p{i}"',
            f'host = "127.0.0.1:{port}"',
            f'groups = ["g{i // per_group}"]',
        ]
    return "\n".join(lines) + "\n"


def rules_toml(groups: int) -> str:
    rules = [
        '[[rules]]\nname = "all"\non = "webhook:all"\nto = ["all"]\n'
        'execute = ["Dial:{{ payload.n }}"]\nttl = "300s"\n'
    ]
    for g in range(groups):
        rules.append(
            f'[[rules]]\nname = "g{g}"\non = "webhook:g{g}"\nto = ["g{g}"]\n'
            'execute = ["Dial:{{ payload.n }}"]\nttl = "300s"\n'
        )
    return "\n".join(rules)


def config_toml(*, spool: str, server_port: int, phones: str, rules: str, cluster: str) -> str:
    return (
        f'[server]\nlisten = "127.0.0.1:{server_port}"\n\n'
        f"[spool]\n{spool}\n\n"
        f'[webhook]\ntoken = "{TOKEN}"\n\n'
        # The pushes' own figures: no health probes share the phones or the CPU.
        '[health]\ninterval = "0"\n\n'
        f"{cluster}\n{phones}\n{rules}"
    )


def cluster_section(lease: str, workdir: Path) -> str:
    """``[cluster] lease = …`` if this phonepush takes the section (``phonepush check``), else
    nothing: the instances then run side by side without coordinating."""
    if not lease:
        return ""
    section = f'[cluster]\nlease = "{lease}"\n'
    probe = workdir / "probe.toml"
    probe.write_text(
        config_toml(
            spool=f'path = "{workdir / "probe.db"}"',
            server_port=c.free_port(),
            phones='[[phones]]\nname = "p0"\nhost = "127.0.0.1:9"\n',
            rules="",
            cluster=section,
        )
    )
    checked = subprocess.run(
        [str(c.VENV_PYTHON), "-m", "phonepush", "check", "--config", str(probe)],
        capture_output=True,
        text=True,
    )
    return section if checked.returncode == 0 else ""


@contextlib.contextmanager
def instances(
    workdir: Path, count: int, *, spool: str, phones: str, rules: str, cluster: str
) -> Iterator[list[c.DaemonProcess]]:
    """``count`` daemons with one configuration but their HTTP ports, started one after the
    other (the first makes the schema), each in a folder of its own."""
    with contextlib.ExitStack() as stack:
        started = []
        for k in range(count):
            folder = workdir / f"instance{k}"
            folder.mkdir(parents=True, exist_ok=True)
            port = c.free_port()
            config = config_toml(
                spool=spool, server_port=port, phones=phones, rules=rules, cluster=cluster
            )
            started.append(stack.enter_context(c.DaemonProcess(folder, config, server_port=port)))
        yield started


class Poster:
    """Webhook posts to one instance on one kept-alive connection; ``post`` returns when it was
    sent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, hook: str, mark: int) -> float:
        body = json.dumps({"n": mark}).encode()
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        for attempt in (1, 2):
            sent = time.time()
            try:
                self._conn.request("POST", f"/hooks/{hook}", body, headers)
                answer = self._conn.getresponse()
                answer.read()
            except (http.client.HTTPException, ConnectionError):
                # The server closed the kept-alive connection between two posts: once more.
                self._conn.close()
                if attempt == 2:
                    raise
                continue
            if answer.status != 202:
                raise RuntimeError(f"POST /hooks/{hook} on :{self.port}: {answer.status}")
            return sent
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._conn.close()


class Pushes:
    """Every push the phones logged since it was made: ``(phone, Dial number, request arrived,
    answer ready)``; busy and error answers carry no number (-1)."""

    def __init__(self, phones: c.Phones) -> None:
        self.phones = phones
        phones.take()
        self.log: list[tuple[int, int, float, float]] = []
        self._seen: set[Pair] = set()

    def drain(self) -> None:
        taken, _ = self.phones.take()
        self.log += taken
        self._seen.update((mark, phone) for phone, mark, _, _ in taken if mark >= 0)

    def wait_for(self, pairs: set[Pair], timeout: float) -> bool:
        """Poll until every (event, phone) in ``pairs`` has been answered once."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            if pairs <= self._seen:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def first_answers(self, pairs: set[Pair]) -> dict[Pair, float]:
        """When each of ``pairs`` was first answered."""
        first: dict[Pair, float] = {}
        for phone, mark, _, answered in self.log:
            pair = (mark, phone)
            if pair in pairs and (pair not in first or answered < first[pair]):
                first[pair] = answered
        return first

    def duplicates(self, pairs: set[Pair]) -> int:
        """Answers beyond the first to the same (event, phone)."""
        counts = Counter((mark, phone) for phone, mark, _, _ in self.log if (mark, phone) in pairs)
        return sum(n - 1 for n in counts.values())


def _busy_cpu(daemons: Sequence[c.DaemonProcess], cluster: PgCluster | None) -> tuple[float, float]:
    ours = sum(d.cpu() for d in daemons if d.process is not None and d.process.poll() is None)
    return ours, postgres_cpu(cluster) if cluster is not None else 0.0


# --- scenarios -----------------------------------------------------------------------------------


def throughput(
    daemons: Sequence[c.DaemonProcess],
    phones: c.Phones,
    cluster: PgCluster | None,
    args: argparse.Namespace,
    first_mark: int,
) -> dict[str, Any]:
    groups = args.phones // args.per_event
    marks = range(first_mark, first_mark + args.events)
    pairs = {
        (mark, (i % groups) * args.per_event + j)
        for i, mark in enumerate(marks)
        for j in range(args.per_event)
    }
    pushes = Pushes(phones)
    counters = phones.counters()
    daemons_before, pg_before = _busy_cpu(daemons, cluster)
    sent: list[float] = []
    waited: list[float] = []
    posted: list[float] = []

    def post_share(k: int, sender: int) -> None:
        poster = Poster(daemons[k].server_port)
        step = len(daemons) * args.senders
        try:
            for i in range(k + sender * len(daemons), args.events, step):
                sent.append(poster.post(f"g{i % groups}", first_mark + i))
                waited.append(time.time() - sent[-1])
            posted.append(time.time())
        finally:
            poster.close()

    threads = [
        threading.Thread(target=post_share, args=(k, sender))
        for k in range(len(daemons))
        for sender in range(args.senders)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    complete = pushes.wait_for(pairs, args.timeout)
    time.sleep(0.5)  # the finishes are committed after the answers
    pushes.drain()
    daemons_after, pg_after = _busy_cpu(daemons, cluster)
    after = phones.counters()
    first = pushes.first_answers(pairs)
    start = min(sent)
    seconds = max(first.values()) - start if first else float("nan")
    delivered = len(first)
    return {
        "events": args.events,
        "pairs": len(pairs),
        "delivered": delivered,
        "complete": complete,
        "post_s": round(max(posted) - start, 3) if posted else None,
        # Post -> 202: the event committed to the store (intake's latency under this load).
        "accept_ms_p50": round(c.percentile(waited, 50) * 1000, 1),
        "accept_ms_p99": round(c.percentile(waited, 99) * 1000, 1),
        "seconds": round(seconds, 3),
        "events_per_s": round(args.events / seconds, 1),
        "deliveries_per_s": round(delivered / seconds, 1),
        "cpu_ms_per_delivery_daemons": round(
            (daemons_after - daemons_before) * 1000 / max(1, delivered), 3
        ),
        "cpu_ms_per_delivery_postgres": round((pg_after - pg_before) * 1000 / max(1, delivered), 3),
        "duplicates": pushes.duplicates(pairs),
        "overlaps": after["overlaps"] - counters["overlaps"],
        "busy_or_error_answers": after["errors"] - counters["errors"],
    }


def fanout(
    daemons: Sequence[c.DaemonProcess], phones: c.Phones, args: argparse.Namespace, first_mark: int
) -> dict[str, Any]:
    posters = [Poster(d.server_port) for d in daemons]
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds + 1):
            mark = first_mark + r
            pairs = {(mark, phone) for phone in range(phones.count)}
            pushes = Pushes(phones)
            sent = posters[r % len(posters)].post("all", mark)
            complete = pushes.wait_for(pairs, args.timeout)
            time.sleep(0.05)
            pushes.drain()
            first = pushes.first_answers(pairs)
            rounds.append(
                {
                    "complete": complete,
                    "last_answer_s": round(max(first.values()) - sent, 4) if first else None,
                    "duplicates": pushes.duplicates(pairs),
                }
            )
            time.sleep(0.3)
    finally:
        for poster in posters:
            poster.close()
    measured = rounds[1:]
    return {
        "warmup": rounds[0],
        "rounds": measured,
        "median_s": c.median([r["last_answer_s"] or float("nan") for r in measured]),
        "all_complete": all(r["complete"] for r in rounds),
        "duplicates": sum(r["duplicates"] for r in measured),
    }


def connected_phones(pid: int, ports: Sequence[int]) -> set[int]:
    """The phones (indexes) process ``pid`` holds a TCP connection to: its socket descriptors
    looked up in the kernel's TCP table by inode, the remote port naming the phone."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    index = {port: i for i, port in enumerate(ports)}
    found = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[9] in inodes and remote_port in index:
                    found.add(index[remote_port])
    return found


def takeover(
    workdir: Path, cluster: PgCluster, section: str, args: argparse.Namespace
) -> dict[str, Any]:
    cpus = c.cpus()
    with c.Phones(
        args.takeover_phones, delay_ms=args.delay_ms, cpu=cpus[0] if len(cpus) > 1 else None
    ) as phones:
        url = cluster.new_database()
        with instances(
            workdir / "takeover",
            2,
            spool=f'url = "{url}"',
            phones=phones_toml(phones, args.takeover_phones),
            rules=rules_toml(1),
            cluster=section,
        ) as daemons:
            marks = range(1, args.takeover_events + 1)
            pairs = {(mark, phone) for mark in marks for phone in range(phones.count)}
            pushes = Pushes(phones)
            counters = phones.counters()
            taken_in: dict[int, int] = {}
            posters = [Poster(d.server_port) for d in daemons]
            try:
                for i, mark in enumerate(marks):
                    posters[i % 2].post("all", mark)
                    taken_in[mark] = i % 2
            finally:
                for poster in posters:
                    poster.close()
            time.sleep(args.kill_after)
            # An instance's phones: those it holds connections to and the other does not
            # (instances that share the phones out push each to their own). The one holding
            # more of them alone is killed (the second on a tie), so there is work to take over.
            held = [connected_phones(d.pid, phones.ports) for d in daemons]
            alone = [held[0] - held[1], held[1] - held[0]]
            k = 0 if len(alone[0]) > len(alone[1]) else 1
            survivor, victim = daemons[1 - k], daemons[k]
            victims_phones, working_on = held[k], alone[k]
            assert victim.process is not None
            victim.process.send_signal(signal.SIGKILL)
            killed = time.time()
            victim.process.wait()
            # Requests the killed instance sent just before it died are read by the phones a
            # little later (their event loop lags under load): two round trips to the phones'
            # process, and what they logged until then was sent by the dead. (Taking over needs
            # a lease to run out: no survivor's push comes this soon.)
            phones.counters()
            phones.counters()
            fence = time.time()
            pushes.drain()
            # A push under way at the kill is finished by the phone (it was executing), but
            # the killed instance never recorded it: owed is what no push had reached.
            reached = {
                (mark, phone)
                for phone, mark, arrived, _ in pushes.log
                if mark >= 0 and arrived <= fence
            }
            owed = pairs - reached
            complete = pushes.wait_for(pairs, args.takeover_timeout)
            time.sleep(0.3)
            pushes.drain()
            after = phones.counters()
            alive = survivor.process is not None and survivor.process.poll() is None

    # The survivor's first push to a phone the killed instance was working on and still owed.
    owed_phones = {phone for _, phone in owed} & working_on
    taken_over = [
        arrived - killed
        for phone, mark, arrived, _ in pushes.log
        if arrived > fence and phone in owed_phones and (mark, phone) in owed
    ]
    first = pushes.first_answers(pairs)
    victims = {pair for pair in owed if taken_in[pair[0]] == k}
    victims_done = [first[pair] - killed for pair in victims if pair in first]
    # Pushes a phone had taken in and not yet answered when the killed instance died (the phone
    # finishes them; the dead instance never hears the answer): what may be pushed twice.
    in_flight = sum(
        1
        for phone, mark, arrived, answered in pushes.log
        if mark >= 0 and arrived <= killed < answered and phone in victims_phones
    )
    return {
        "phones": phones.count,
        "events": args.takeover_events,
        "pairs": len(pairs),
        "owed_at_kill": len(owed),
        "killed": "first" if k == 0 else "second",
        "phones_connected": len(victims_phones),
        "phones_working_on": len(working_on),
        "in_flight_at_kill": in_flight,
        "takeover_first_push_s": round(min(taken_over), 3) if taken_over else None,
        "all_done_s": round(max(first.values()) - killed, 3) if complete else None,
        "complete": complete,
        "undelivered": len(pairs - set(first)),
        "killed_intake_owed": len(victims),
        "killed_intake_delivered": len(victims_done),
        "killed_intake_last_s": round(max(victims_done), 3) if victims_done else None,
        "duplicates": pushes.duplicates(pairs),
        "overlaps": after["overlaps"] - counters["overlaps"],
        "busy_or_error_answers": after["errors"] - counters["errors"],
        "survivor_alive": alive,
    }


def run_setup(
    workdir: Path,
    label: str,
    count: int,
    spool: str,
    cluster: PgCluster | None,
    section: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    cpus = c.cpus()
    with c.Phones(args.phones, cpu=cpus[0] if len(cpus) > 1 else None) as phones:
        groups = args.phones // args.per_event
        with instances(
            workdir / label,
            count,
            spool=spool,
            phones=phones_toml(phones, args.per_event),
            rules=rules_toml(groups),
            cluster=section,
        ) as daemons:
            fan = fanout(daemons, phones, args, first_mark=1)
            thr = throughput(daemons, phones, cluster, args, first_mark=1000)
            logs = [(d.workdir / "daemon.log").read_text(errors="replace") for d in daemons]
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                for number, log_text in enumerate(logs):
                    (args.logs / f"{label}-{number}.log").write_text(log_text)
    return {
        "setup": label,
        "instances": count,
        "backend": "postgresql" if cluster is not None else "sqlite",
        "throughput": thr,
        "fanout": fan,
        "errors_in_logs": sum(log.count(" ERROR ") for log in logs),
    }


def _fmt(value: Any, fmt: str = "{:,.0f}") -> str:
    return fmt.format(value) if isinstance(value, int | float) else "—"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", default="1,2,3", help="instance counts on PostgreSQL")
    parser.add_argument("--phones", type=int, default=100)
    parser.add_argument("--per-event", type=int, default=10, help="phones per throughput event")
    parser.add_argument("--events", type=int, default=500, help="throughput events per setup")
    parser.add_argument(
        "--senders", type=int, default=4, help="webhook connections (threads) per instance"
    )
    parser.add_argument("--rounds", type=int, default=3, help="fan-out rounds after a warm-up")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--lease", default="2s", help="[cluster] lease, if phonepush takes it ('' for none)"
    )
    parser.add_argument("--takeover-phones", type=int, default=20)
    parser.add_argument("--takeover-events", type=int, default=20, help="each to every phone")
    parser.add_argument("--delay-ms", type=float, default=200.0, help="takeover phones' delay")
    parser.add_argument("--kill-after", type=float, default=1.0, help="seconds after the burst")
    parser.add_argument("--takeover-timeout", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="smoke pass: 20 phones, 2 instances")
    parser.add_argument(
        "--logs", type=Path, default=None, help="keep each setup's daemon logs in this folder"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.instances, args.phones, args.per_event, args.events, args.rounds = "2", 20, 5, 40, 1
        args.takeover_phones, args.takeover_events, args.delay_ms = 6, 6, 100.0
        args.kill_after, args.takeover_timeout, args.timeout = 0.4, 3.0, 30.0
    if args.phones % args.per_event:
        raise SystemExit("--phones must be a multiple of --per-event")

    counts = [int(n) for n in args.instances.split(",") if n]
    results = []
    with c.workdir("phonepush-cluster-") as tmp, postgres() as cluster:
        section = cluster_section(args.lease, tmp)
        results.append(
            run_setup(
                tmp,
                "sqlite",
                1,
                f'path = "{tmp / "sqlite" / "instance0" / "spool.db"}"',
                None,
                "",
                args,
            )
        )
        for count in counts:
            url = cluster.new_database()
            results.append(
                run_setup(
                    tmp, f"postgresql-{count}", count, f'url = "{url}"', cluster, section, args
                )
            )
        took = takeover(tmp, cluster, section, args)

    coordinated = "with [cluster] lease = " + args.lease if section else "no [cluster] section"
    print(
        f"several instances: {args.phones} phones (no delay), {args.events} webhook events each "
        f"to {args.per_event} phones, posted round-robin ({args.senders} connections per "
        f"instance); {coordinated}"
    )
    print(
        f"  {'setup':<14} {'events/s':>9} {'deliveries/s':>13} {'CPU ms/delivery':>22} "
        f"{'202 p50/p99 ms':>15} {'fan-out s':>10} {'dupl.':>6} {'overl.':>7}"
    )
    for result in results:
        thr, fan = result["throughput"], result["fanout"]
        cpu = thr["cpu_ms_per_delivery_daemons"] + thr["cpu_ms_per_delivery_postgres"]
        split = f"{cpu:.3f} ({thr['cpu_ms_per_delivery_postgres']:.3f} pg)"
        print(
            f"  {result['setup']:<14} {_fmt(thr['events_per_s']):>9} "
            f"{_fmt(thr['deliveries_per_s']):>13} {split:>22} "
            f"{thr['accept_ms_p50']:>7.1f}/{thr['accept_ms_p99']:<7.1f} "
            f"{_fmt(fan['median_s'], '{:.3f}'):>10} "
            f"{thr['duplicates'] + fan['duplicates']:>6} {thr['overlaps']:>7}"
            + ("" if thr["complete"] and fan["all_complete"] else "  INCOMPLETE")
        )
    print(
        f"takeover: 2 instances, {took['phones']} phones at {args.delay_ms:g} ms, "
        f"{took['events']} events to all, SIGKILL to the {took['killed']} "
        f"{args.kill_after:g} s after the burst"
    )
    print(f"  owed at the kill                      {took['owed_at_kill']} of {took['pairs']}")
    print(
        f"  phones the killed instance was on     {took['phones_working_on']} (it held "
        f"connections to {took['phones_connected']}; those the survivor held too left out)"
    )
    print(f"  pushes under way at the kill          {took['in_flight_at_kill']}")
    print(
        f"  kill -> survivor's first push to them {_fmt(took['takeover_first_push_s'], '{:.3f}')} s"
    )
    print(f"  kill -> all work done                 {_fmt(took['all_done_s'], '{:.3f}')} s")
    print(
        f"  killed instance's intake, owed        {took['killed_intake_owed']}, delivered "
        f"{took['killed_intake_delivered']} (last {_fmt(took['killed_intake_last_s'], '{:.3f}')} s)"
    )
    print(f"  never delivered                       {took['undelivered']}")
    print(f"  duplicates / overlaps                 {took['duplicates']} / {took['overlaps']}")
    c.write_record(
        "cluster",
        {
            "args": vars(args),
            "cluster_section": bool(section),
            "results": results,
            "takeover": took,
            "postgresql": str(cluster.bindir.parent.name),
            "versions": c.versions("phonepush", "psycopg"),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
