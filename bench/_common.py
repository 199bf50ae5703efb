"""Shared parts of the daemon benchmarks: phones, broker, daemon, publisher, and measuring them.

* :class:`Phones`: a simulator ``Fleet`` in a child process pinned to one CPU, recording for every
  push the time its request arrived and the time its answer was ready, with the number the push
  carries (``Dial:<n>``), so any system under test (phonepush, mqttwarn, shell scripts) is timed
  the same way, at the phone.
* :class:`Mosquitto`: a local broker on a free port (``/usr/sbin/mosquitto``), no persistence.
* :class:`DaemonProcess`: ``phonepush run --config F`` as a subprocess; start-to-ready time
  (``/readyz``), CPU (``/proc/<pid>/stat``) and RSS (``/proc/<pid>/status``).
* :class:`Publisher`: a paho-mqtt QoS 1 publisher that timestamps each publish.
* helpers: venvs for the alternatives, percentiles, JSON records, machine facts.

The phones' clock and the publisher's are the same (``time.time()`` on one machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

RESULTS = ROOT / "bench" / "results"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
MOSQUITTO = "/usr/sbin/mosquitto"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_DIAL = re.compile(rb"Dial:(\d+)")

__all__ = [
    "RESULTS",
    "ROOT",
    "DaemonProcess",
    "Mosquitto",
    "Phones",
    "Publisher",
    "cpus",
    "ensure_venv",
    "free_port",
    "machine",
    "percentile",
    "write_record",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (checked by binding each)."""
    for _ in range(50):
        base = free_port()
        if base + count > 65000:
            continue
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                socks.append(sock)
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports")


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load": [round(x, 2) for x in os.getloadavg()],
    }


def versions(*distributions: str) -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name in distributions:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_record(bench: str, record: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    record = {
        "bench": bench,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine(),
        **record,
    }
    path = RESULTS / f"{bench}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def ensure_venv(path: Path, requirements: Sequence[str]) -> Path:
    """A virtualenv at ``path`` with ``requirements`` (pip from PyPI); made once, then reused."""
    python = path / "bin" / "python"
    marker = path / ".phonepush-bench"
    wanted = "\n".join(requirements)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"making {path} with {' '.join(requirements)} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *requirements],
        check=True,
    )
    marker.write_text(wanted)
    return python


# --- process measurements ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")": state is field 3; utime, stime, cutime, cstime are 14-17 (1-based).
    return sum(int(f) for f in fields[11:15]) / _CLK_TCK


def fd_sampler(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Until ``stop``: the most descriptors ``pid`` holds, in ``peak[0]``, sampled every 20 ms."""
    fd_dir = Path(f"/proc/{pid}/fd")
    while not stop.wait(0.02):
        try:
            peak[0] = max(peak[0], len(os.listdir(fd_dir)))
        except OSError:
            return


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) in MB."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found


# --- phones --------------------------------------------------------------------------------------


def _serve_phones(
    conn: Connection,
    phones: int,
    port: int,
    delay_ms: float,
    cpu: int | None,
) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    # A phone is a listening socket: thousands of them need more than a default soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from phonepush.sim.simulator import Fleet, SimPhone

    log: list[tuple[int, int, float, float]] = []

    def on_push(phone: SimPhone, record: dict[str, Any]) -> None:
        xml = record.get("xml") or ""
        match = _DIAL.search(xml.encode())
        mark = int(match.group(1)) if match else -1
        log.append((phone.index, mark, record["time"], time.time()))

    async def run() -> None:
        async with Fleet(
            phones,
            port=port,
            delay_ms=delay_ms,
            tone_ms=0,
            on_push=on_push,
        ) as fleet:
            conn.send([p.port for p in fleet.phones])
            loop = asyncio.get_running_loop()
            commands: asyncio.Queue[str] = asyncio.Queue()
            loop.add_reader(conn.fileno(), lambda: commands.put_nowait(conn.recv()))
            while True:
                command = await commands.get()
                if command == "take":
                    taken = log[:]
                    log.clear()
                    conn.send((taken, sum(p.state.errors for p in fleet.phones)))
                elif command == "count":
                    conn.send(len(log))
                elif command == "counters":
                    conn.send(
                        {
                            "pushes": sum(p.state.pushes for p in fleet.phones),
                            "errors": sum(p.state.errors for p in fleet.phones),
                            "overlaps": sum(p.state.overlaps for p in fleet.phones),
                        }
                    )
                elif command == "stop":
                    loop.remove_reader(conn.fileno())
                    conn.send("stopped")
                    return

    asyncio.run(run())


class Phones:
    """Simulated phones in a child process (pinned to ``cpu``); every push is logged as
    ``(phone index, Dial number or -1, request arrived, answer ready)``."""

    def __init__(self, phones: int, *, delay_ms: float = 0.0, cpu: int | None = None) -> None:
        self.count = phones
        self.delay_ms = delay_ms
        self.cpu = cpu
        self.ports: list[int] = []
        self._conn: Connection | None = None
        self._process: mp.process.BaseProcess | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Phones:
        ours, theirs = mp.Pipe()
        self._conn = ours
        self._process = mp.get_context("fork").Process(
            target=_serve_phones,
            args=(theirs, self.count, 0, self.delay_ms, self.cpu),
            daemon=True,
        )
        self._process.start()
        self.ports = ours.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None and self._process is not None:
            with contextlib.suppress(OSError, EOFError):
                self._conn.send("stop")
                self._conn.recv()
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()

    @property
    def pid(self) -> int:
        assert self._process is not None and self._process.pid is not None
        return self._process.pid

    def _ask(self, command: str) -> Any:
        assert self._conn is not None
        with self._lock:
            self._conn.send(command)
            return self._conn.recv()

    def take(self) -> tuple[list[tuple[int, int, float, float]], int]:
        """The pushes logged since the last take, and the phones' error answers so far."""
        result: tuple[list[tuple[int, int, float, float]], int] = self._ask("take")
        return result

    def counters(self) -> dict[str, int]:
        """The fleet's totals so far: pushes, error answers, and overlaps (a push that came while
        the phone was still busy with another, answered busy)."""
        counters: dict[str, int] = self._ask("counters")
        return counters

    def count_logged(self) -> int:
        count: int = self._ask("count")
        return count

    def wait_for(self, pushes: int, timeout: float) -> bool:
        """Poll until ``pushes`` pushes are logged (since the last take)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count_logged() >= pushes:
                return True
            time.sleep(0.01)
        return False

    def toml(self, *, groups: Sequence[str] = ()) -> str:
        lines = []
        for i, port in enumerate(self.ports):
            lines += ["[[phones]]", f'name = "p{i}"', f'host = "127.0.0.1:{port}"']
            if groups:
                lines.append(f"groups = {json.dumps(list(groups))}")
        return "\n".join(lines) + "\n"


# --- broker --------------------------------------------------------------------------------------


class Mosquitto:
    """A local mosquitto on a free port, anonymous, in memory."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Mosquitto:
        if not Path(MOSQUITTO).exists():
            raise SystemExit("mosquitto is needed: apt-get install mosquitto")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\nmax_inflight_messages 0\n"
        )
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "mosquitto.log").open("wb"),
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(5)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


# --- the daemon ----------------------------------------------------------------------------------


def daemon_toml(
    *,
    workdir: Path,
    broker_port: int,
    phones: Phones,
    rules: str,
    server_port: int,
    extra: str = "",
) -> str:
    return (
        f'[server]\nlisten = "127.0.0.1:{server_port}"\n\n'
        f'[spool]\npath = "{workdir / "spool.db"}"\n\n'
        # The figures are the pushes' own: no health probes share the phones or the CPU
        # (their figures would need a benchmark of their own).
        '[health]\ninterval = "0"\n\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{broker_port}"\n'
        f'client_id = "phonepush-bench-{os.getpid()}"\nsession_expiry = 0\n'
        f"receive_maximum = 1000\n\n"
        f"{extra}\n"
        f"{phones.toml()}\n{rules}"
    )


class DaemonProcess:
    """``phonepush run --config F`` in a subprocess; ``ready_seconds`` is start to ``/readyz``.
    ``nofile`` sets its open-files limit: soft and hard, or with ``soft_only`` the soft limit
    alone (``ulimit -Sn``: the daemon raises it to the hard limit at start)."""

    def __init__(
        self,
        workdir: Path,
        config: str,
        *,
        server_port: int,
        nofile: int | None = None,
        soft_only: bool = False,
        ready_timeout: float = 30.0,
    ) -> None:
        self.nofile = nofile
        self.soft_only = soft_only
        self.ready_timeout = ready_timeout
        self.workdir = workdir
        self.config_path = workdir / "phonepush.toml"
        self.config_path.write_text(config)
        self.server_port = server_port
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_seconds = float("nan")

    def __enter__(self) -> DaemonProcess:
        spool = self.workdir / "spool.db"
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{spool}{suffix}").unlink()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PHONEPUSH_")}
        started = time.perf_counter()
        nofile, soft_only = self.nofile, self.soft_only

        def limit() -> None:
            if nofile is not None:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if soft_only else nofile
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        self.process = subprocess.Popen(
            [str(VENV_PYTHON), "-m", "phonepush", "run", "--config", str(self.config_path)],
            stdout=(self.workdir / "daemon.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=limit if nofile is not None else None,
        )
        url = f"http://127.0.0.1:{self.server_port}/readyz"
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    "daemon exited: " + (self.workdir / "daemon.log").read_text()[-2000:]
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as answer:
                    if answer.status == 200:
                        self.ready_seconds = time.perf_counter() - started
                        return self
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"daemon not ready in {self.ready_timeout:g} s")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, float]:
        return memory(self.pid)


# --- publisher -----------------------------------------------------------------------------------


class Publisher:
    """A paho-mqtt (2.x) client in its own thread; ``publish`` returns the time it was sent."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}")
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._port = port

    def __enter__(self) -> Publisher:
        self._client.connect("127.0.0.1", self._port)
        self._client.loop_start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def publish(self, topic: str, payload: str | bytes, qos: int = 1) -> float:
        sent = time.time()
        self._client.publish(topic, payload, qos=qos)
        return sent


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(path, ignore_errors=True)


def pace(rate: float, count: int) -> Iterator[int]:
    """Yield 0..count-1 at ``rate`` per second (sleeping between, never bursting to catch up
    more than 10 ms of lag)."""
    start = time.perf_counter()
    for i in range(count):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield i


# --- scenarios: rules and measurements shared by every system under test -------------------------


def phonepush_rules(
    *, phones: int, fire: bool = True, stream: bool = False, single: int = 0, extra: int = 0
) -> str:
    """Rules for the daemon: ``bench/fire`` and ``bench/stream`` to all phones, ``bench/one/p<i>``
    to phone i (for ``single`` phones), and ``extra`` rules on topics no event uses, each with
    a ``when`` (the same for all) and a message whose text template is distinct per rule, so
    start-up compiles one template per rule as a varied real configuration would."""
    parts = []
    if fire:
        parts.append(
            '[[rules]]\nname = "fire"\non = "mqtt:bench/fire"\nto = ["all"]\n'
            'execute = ["Dial:{{ payload.n }}"]\nttl = "120s"\n'
        )
    if stream:
        parts.append(
            '[[rules]]\nname = "stream"\non = "mqtt:bench/stream"\nto = ["all"]\n'
            'execute = ["Dial:{{ payload.n }}"]\nttl = "300s"\n'
        )
    for i in range(single):
        parts.append(
            f'[[rules]]\nname = "one-{i}"\non = "mqtt:bench/one/p{i}"\nto = ["p{i}"]\n'
            'execute = ["Dial:{{ payload.n }}"]\nttl = "60s"\n'
        )
    for i in range(extra):
        parts.append(
            f'[[rules]]\nname = "idle-{i}"\non = "mqtt:bench/idle/{i}/+"\n'
            f'to = ["p{i % phones}"]\nexecute = ["Play:Chime.raw"]\n'
            f'message = {{ title = "Alarm {i}", text = "Zone {i}: {{{{ payload.text }}}} on '
            f"{{{{ topic.split('/')[3] }}}}\" }}\n"
            'when = "payload.level > 2"\nttl = "60s"\n'
        )
    return "\n".join(parts)


def fanout_round(
    phones: Phones, publish: Any, mark: int, expected: int, timeout: float
) -> dict[str, Any]:
    """Publish event ``mark`` (``publish(mark) -> publish time``), wait for ``expected`` pushes
    carrying it; time to the last answer and to the first and last request."""
    phones.take()
    sent = publish(mark)
    complete = phones.wait_for(expected, timeout)
    time.sleep(0.05)
    log, errors = phones.take()
    mine = [entry for entry in log if entry[1] == mark]
    if not mine:
        return {"complete": False, "pushes": 0, "errors": errors}
    return {
        "complete": complete and len(mine) >= expected,
        "pushes": len(mine),
        "phones": len({entry[0] for entry in mine}),
        "last_answer_s": round(max(e[3] for e in mine) - sent, 4),
        "first_request_s": round(min(e[2] for e in mine) - sent, 4),
        "last_request_s": round(max(e[2] for e in mine) - sent, 4),
        "errors": errors,
    }


def stream_run(
    phones: Phones,
    publish: Any,
    events: int,
    per_event: int,
    first_mark: int,
    timeout: float,
    rate: float | None = None,
) -> dict[str, Any]:
    """Publish ``events`` events (as fast as the publisher goes, or at ``rate``/s), each to
    ``per_event`` phones; deliveries per second from the first publish to the last answer."""
    phones.take()
    expected = events * per_event
    iterator = pace(rate, events) if rate else range(events)
    first = None
    for i in iterator:
        sent = publish(first_mark + i)
        first = sent if first is None else first
    assert first is not None
    complete = phones.wait_for(expected, timeout)
    time.sleep(0.05)
    log, errors = phones.take()
    mine = [e for e in log if first_mark <= e[1] < first_mark + events]
    if not mine:
        return {"complete": False, "deliveries": 0, "errors": errors}
    last = max(e[3] for e in mine)
    answers = sorted(e[3] for e in mine)
    # Steady state: the middle 80% of answers, free of the start-up ramp and the tail.
    lo, hi = answers[len(answers) // 10], answers[(len(answers) * 9) // 10]
    steady = (len(answers) * 8 // 10) / (hi - lo) if hi > lo else float("nan")
    return {
        "complete": complete and len(mine) >= expected,
        "deliveries": len(mine),
        "seconds": round(last - first, 3),
        "per_second": round(len(mine) / (last - first), 1),
        "steady_per_second": round(steady, 1),
        "errors": errors,
    }


def latency_run(
    phones: Phones, publish: Any, rate: float, seconds: float, first_mark: int, settle: float = 2.0
) -> dict[str, Any]:
    """Publish one event every 1/``rate`` s for ``seconds``, event k to phone k mod N (the
    publisher picks the topic); publish -> request arriving at the phone, per event."""
    phones.take()
    count = int(rate * seconds)
    sent: dict[int, float] = {}
    for i in pace(rate, count):
        sent[first_mark + i] = publish(first_mark + i)
    phones.wait_for(count, settle + 5)
    time.sleep(0.05)
    log, errors = phones.take()
    latencies = [(e[2] - sent[e[1]]) * 1000 for e in log if e[1] in sent]
    return {
        "events": count,
        "received": len(latencies),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p90_ms": round(percentile(latencies, 90), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2) if latencies else float("nan"),
        "errors": errors,
    }


def profile(pid: int, output: str) -> subprocess.Popen[bytes]:
    """Sample ``pid`` with py-spy (``pip install py-spy``) into ``output`` as collapsed stacks,
    until :func:`stop_profile`."""
    spy = shutil.which("py-spy") or str(VENV_PYTHON.parent / "py-spy")
    process = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            output,
            "--rate",
            "250",
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return process


def stop_profile(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    process.wait(20)
