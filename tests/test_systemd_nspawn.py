"""phonepush under a real systemd, as an operator runs it.

systemd boots as PID 1 in ``systemd-nspawn`` on a Debian bookworm root file system (mmdebstrap,
kept between runs by ``.ci/debian-rootfs``). A wheel built from this tree goes into a venv there
(``/opt/phonepush``, ``/usr/bin/phonepush`` linked to it), ``systemd/phonepush.service`` goes in
byte for byte, and the service is driven with ``systemctl`` while a ``phonepush simulate`` phone
runs on the host: the container shares the host's network, so both sides meet on 127.0.0.1.

Needs root, ``systemd-nspawn`` (Debian: systemd-container), ``mmdebstrap``, ``nsenter`` and
``setpriv`` (util-linux): skipped without them on a developer's machine, a failure in CI, where
``.ci/run`` installs them.
Figures (boot, install, connections, descriptors) print with ``-s``; docs/reliability.md keeps
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import eventually, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "phonepush.service"
#: What the machine needs beyond minbase: systemd as init (dbus, or logind fails and the system
#: counts as degraded), procps for the unit's ExecReload=/bin/kill (every Debian but minbase has
#: it) and Python for the venv.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "python3", "python3-venv")
TOKEN = "nspawn-test-token"
HELD_CONNECTIONS = 2000
#: The tone the simulated phone plays: a Play: holds the phone's answer this long.
TONE_MS = 3000
#: Container commands see a clean environment, not this process's.
CONTAINER_ENV = ("env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing in CI (.ci/run installs {package})")
        pytest.skip(f"{tool} is not installed (apt-get install {package})")
    return path


def _seconds(span: str) -> float:
    """A systemd time span as ``systemctl show`` prints it (``30s``, ``1min 30s``, ``500ms``)."""
    units = {"min": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(min|ms|us|s)\b", span)
    assert parts, f"not a time span: {span!r}"
    return sum(float(value) * units[unit] for value, unit in parts)


@dataclass
class Measured:
    """Figures of one run, printed at the end (docs/reliability.md keeps them)."""

    values: dict[str, Any] = field(default_factory=dict)
    _started: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        yield
        self.values[name] = round(time.monotonic() - start, 1)

    def report(self) -> str:
        self.values["test total s"] = round(time.monotonic() - self._started, 1)
        return "\n".join(f"  {key}: {value}" for key, value in self.values.items())


@pytest.fixture(scope="module")
def measured() -> Iterator[Measured]:
    figures = Measured()
    yield figures
    print(f"\nsystemd-nspawn run:\n{figures.report()}")


@pytest.fixture(scope="module")
def rootfs_tarball(measured: Measured) -> Path:
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn needs root")
    _require("systemd-nspawn", "systemd-container")
    _require("mmdebstrap", "mmdebstrap")
    _require("nsenter", "util-linux")
    _require("setpriv", "util-linux")
    with measured.timed("rootfs tarball s (cached unless first run)"):
        out = subprocess.run(
            [str(ROOT / ".ci" / "debian-rootfs"), *PACKAGES],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory, measured: Measured) -> Path:
    """phonepush's wheel and its dependencies', from this interpreter's pip (and its cache)."""
    house = tmp_path_factory.mktemp("wheelhouse")
    with measured.timed("wheelhouse s"):
        out = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(house), str(ROOT)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    return house


class Machine:
    """A booted container: systemd as PID 1, reached with nsenter."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.name = f"phonepush-ci-{secrets.token_hex(3)}"
        self._log = log
        self._nspawn: asyncio.subprocess.Process | None = None
        self.leader = 0
        self.state = ""

    async def boot(self) -> None:
        argv = [
            "systemd-nspawn",
            "--quiet",
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--boot",
            # No systemd-machined on the host to register with, and without a host systemd no
            # scope unit to create: the container stays in this process's cgroup.
            "--register=no",
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
        ]
        if not Path("/run/systemd/system").is_dir():
            argv.append("--keep-unit")
        # If this test process dies, nspawn gets SIGTERM and shuts the machine down: no
        # container is left running. setpriv execs nspawn, so the pid stays nspawn's.
        argv = ["setpriv", "--pdeathsig=TERM", *argv]
        with self._log.open("wb") as log:
            self._nspawn = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.leader = await self._find_leader()
        # Until PID 1 listens, systemctl cannot reach it; then --wait waits for the boot's end.
        state = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            _, state = await self.run("systemctl", "is-system-running", "--wait", check=False)
            if state.strip() in ("running", "degraded"):
                break
            await asyncio.sleep(0.2)
        self.state = state.strip()
        # "degraded": some unit of the machine failed; phonepush's own checks say the rest.
        assert self.state in ("running", "degraded"), (
            f"boot ended {state.strip()!r}:\n"
            + (await self.run("systemctl", "--failed", "--no-pager", check=False))[1]
            + self._log.read_text(errors="replace")[-3000:]
        )

    async def _find_leader(self) -> int:
        """The container's PID 1, as this machine sees it: nspawn's child running systemd."""
        assert self._nspawn is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self._nspawn.returncode is None, self._log.read_text(errors="replace")
            for stat in Path("/proc").glob("[0-9]*/stat"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    # pid (comm) state ppid ...: comm may hold spaces, so split after ")".
                    text = stat.read_text()
                    comm = text[text.index("(") + 1 : text.rindex(")")]
                    ppid = int(text[text.rindex(")") + 2 :].split()[1])
                    if ppid == self._nspawn.pid and comm == "systemd":
                        return int(stat.parent.name)
            await asyncio.sleep(0.05)
        raise AssertionError("systemd never started in the container:\n" + self._log.read_text())

    async def run(self, *argv: str, check: bool = True, timeout: float = 120) -> tuple[int, str]:
        """Runs a command inside the container; (exit status, stdout and stderr)."""
        proc = await asyncio.create_subprocess_exec(
            "nsenter",
            f"--target={self.leader}",
            "--all",
            *CONTAINER_ENV,
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"{' '.join(argv)}: no answer in {timeout} s") from None
        text = out.decode(errors="replace")
        assert not check or proc.returncode == 0, f"{' '.join(argv)}: {proc.returncode}\n{text}"
        assert proc.returncode is not None
        return proc.returncode, text

    async def show(self, unit: str, *properties: str) -> dict[str, str]:
        args = [f"--property={p}" for p in properties]
        _, text = await self.run("systemctl", "show", *args, unit)
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    async def journal(self, unit: str) -> str:
        return (await self.run("journalctl", "--no-pager", "--output=cat", f"--unit={unit}"))[1]

    async def shutdown(self) -> None:
        if self._nspawn is None or self._nspawn.returncode is not None:
            return
        # nspawn turns SIGTERM into an orderly shutdown of the container.
        self._nspawn.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._nspawn.wait(), 60)
        except TimeoutError:
            self._nspawn.kill()
            await self._nspawn.wait()


@pytest.fixture
async def machine(
    rootfs_tarball: Path, wheelhouse: Path, tmp_path: Path, measured: Measured
) -> AsyncIterator[Machine]:
    """The booted machine, phonepush installed, the unit in place (not started)."""
    root = tmp_path / "root"
    root.mkdir()
    with measured.timed("unpack rootfs s"):
        out = subprocess.run(
            ["tar", "-C", str(root), "-xf", str(rootfs_tarball)], capture_output=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not (root / "usr" / "bin" / python).exists():
        pytest.fail(f"the wheelhouse is built for {python}, which the Debian machine lacks")
    shutil.copytree(wheelhouse, root / "var" / "tmp" / "wheels")
    # The unit as shipped, byte for byte.
    unit = root / "etc" / "systemd" / "system" / "phonepush.service"
    shutil.copyfile(UNIT, unit)
    assert unit.read_bytes() == UNIT.read_bytes()

    box = Machine(root, tmp_path / "console.log")
    try:
        with measured.timed("boot to running s"):
            await box.boot()
        with measured.timed("install wheel s"):
            # As docs/install.md does it, from the wheelhouse instead of PyPI.
            await box.run("python3", "-m", "venv", "/opt/phonepush")
            await box.run(
                "/opt/phonepush/bin/pip",
                "install",
                "--quiet",
                "--no-index",
                "--find-links=/var/tmp/wheels",
                "phonepush",
            )
            await box.run("ln", "-s", "/opt/phonepush/bin/phonepush", "/usr/bin/phonepush")
            await box.run("systemctl", "daemon-reload")
        yield box
    finally:
        if box.leader:
            # Shown with a failure (pytest prints a test's captured output then).
            _, journal = await box.run(
                "journalctl", "--no-pager", "--unit=phonepush", "--lines=80", check=False
            )
            print(f"\njournalctl -u phonepush, last lines:\n{journal}")
        await box.shutdown()
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class SimulatedPhone:
    address: str
    control: str


@pytest.fixture
async def simulator() -> AsyncIterator[SimulatedPhone]:
    """``phonepush simulate`` on the host, one phone."""
    phone_port, control_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "phonepush",
        "simulate",
        "--host=127.0.0.1",
        f"--port={phone_port}",
        f"--control-port={control_port}",
        f"--tone-ms={TONE_MS}",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    control = f"http://127.0.0.1:{control_port}"

    async def up() -> bool:
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{control}/phones/0")).status_code == 200
        except httpx.TransportError:
            return False

    try:
        await eventually(up, timeout=30)
        yield SimulatedPhone(f"127.0.0.1:{phone_port}", control)
    finally:
        proc.terminate()
        await proc.wait()


def _config(port: int, phone: str, *, extra: str = "") -> str:
    return f"""
[server]
listen = "127.0.0.1:{port}"
# More than the held connections: beyond it the HTTP server answers 503.
max_connections = 4096

[webhook]
# From /etc/credstore/webhook-token through the unit's LoadCredential=.
token_file = "webhook-token"

[[phones]]
name = "desk"
host = "{phone}"

[[rules]]
name = "door"
on = "webhook:door"
to = ["desk"]
execute = ["Play:Chime.raw"]
{extra}
"""


LIGHT_RULE = """
[[rules]]
name = "light"
on = "webhook:light"
to = ["desk"]
execute = ["Display:On:5"]
"""


async def _hold(port: int, count: int) -> list[tuple[asyncio.StreamWriter, str]]:
    """``count`` connections at once, each with one GET /healthz answered; kept open."""

    async def one() -> tuple[asyncio.StreamWriter, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: phonepush\r\n\r\n")
        status = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        return writer, status.decode(errors="replace").strip()

    # Bounded: a server that stops accepting fails the test instead of hanging it.
    return list(await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 120))


def _metric(text: str, sample: str) -> float | None:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(match[1]) if match else None


async def test_the_unit_under_systemd_as_pid_1(
    machine: Machine, simulator: SimulatedPhone, measured: Measured
) -> None:
    control, phone = simulator.control, simulator.address
    measured.values["machine state after boot"] = machine.state
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    root = machine.root
    config = root / "etc" / "phonepush" / "phonepush.toml"
    config.parent.mkdir(mode=0o755)
    config.write_text(_config(port, phone))
    credstore = root / "etc" / "credstore"
    credstore.mkdir(mode=0o700)
    (credstore / "webhook-token").write_text(TOKEN)
    (credstore / "webhook-token").chmod(0o600)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < HELD_CONNECTIONS + 500:
        pytest.fail(f"this process may open {hard} files, fewer than the connections it holds")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held: list[tuple[asyncio.StreamWriter, str]] = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:

        async def phone_state() -> dict[str, Any]:
            answer = await client.get(f"{control}/phones/0")
            state: dict[str, Any] = answer.json()
            return state

        try:
            # --- READY: Type=notify, so start returns once the daemon said READY=1 ---
            with measured.timed("systemctl start (to READY) s"):
                await machine.run("systemctl", "start", "phonepush")
            ready_at = time.monotonic()
            # Listening already, not just "started".
            assert (await client.get("/healthz")).status_code == 200
            service = await machine.show(
                "phonepush", "Type", "ActiveState", "MainPID", "WatchdogUSec", "StatusText"
            )
            assert service["Type"] == "notify"
            assert service["ActiveState"] == "active"
            assert service["StatusText"] == "listening"
            main_pid = service["MainPID"]
            watchdog = _seconds(service["WatchdogUSec"])
            assert watchdog > 0

            # LimitNOFILE= (systemd cannot give more than its own hard limit), soft = hard.
            _, pid1_limits = await machine.run("cat", "/proc/1/limits")
            _, limits = await machine.run("cat", f"/proc/{main_pid}/limits")
            pid1_hard = int(re.findall(r"^Max open files\s+\d+\s+(\d+)", pid1_limits, re.M)[0])
            service_soft, service_hard = map(
                int, re.findall(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M)[0]
            )
            assert service_soft == service_hard == min(65536, pid1_hard)
            measured.values["service open files limit"] = service_soft
            assert "open files limit:" in await machine.journal("phonepush")

            # --- a webhook reaches the phone ---
            answer = await client.post("/hooks/door", json={"who": "courier"})
            assert answer.status_code == 202, answer.text

            async def chimed() -> bool:
                state = await phone_state()
                return state["tones"] == ["Chime.raw"] and "answer" in state["requests"][-1]

            await eventually(chimed, timeout=TONE_MS / 1000 + 10)

            # --- /metrics, the process metrics included ---
            async def delivered(count: int) -> bool:
                text = (await client.get("/metrics")).text
                sample = 'phonepush_deliveries_total{phone="desk",result="delivered"}'
                return _metric(text, sample) == count

            await eventually(lambda: delivered(1), timeout=10)
            metrics = (await client.get("/metrics")).text
            assert _metric(metrics, "process_max_fds") == service_soft
            baseline_fds = _metric(metrics, "process_open_fds")
            assert baseline_fds is not None and baseline_fds > 0
            measured.values["open fds at rest"] = int(baseline_fds)

            # --- reload: a new rule takes effect ---
            assert (await client.post("/hooks/light", json={})).status_code == 404
            config.write_text(_config(port, phone, extra=LIGHT_RULE))
            await machine.run("systemctl", "reload", "phonepush")

            # systemd 252 ends the reload job when ExecReload's kill exits, before the daemon's
            # RELOADING=1 ... READY=1: the new rule arrives shortly after, not at once.
            async def light_hook_open() -> bool:
                return (await client.post("/hooks/light", json={})).status_code == 202

            await eventually(light_hook_open, timeout=10)
            await eventually(
                lambda: _backlight_is(phone_state, {"state": "On", "minutes": 5}), timeout=10
            )
            metrics = (await client.get("/metrics")).text
            assert _metric(metrics, 'phonepush_config_reloads_total{result="ok"}') == 1

            # --- held client connections, through the watchdog window ---
            with measured.timed(f"open {HELD_CONNECTIONS} connections s"):
                held = await _hold(port, HELD_CONNECTIONS)
            statuses = [status for _, status in held]
            assert statuses == ["HTTP/1.1 200 OK"] * HELD_CONNECTIONS, {
                s: statuses.count(s) for s in set(statuses)
            }
            measured.values["connections held"] = len(held)
            # While they are held: the daemon still serves and counts them.
            metrics = (await client.get("/metrics")).text
            open_fds = _metric(metrics, "process_open_fds")
            assert open_fds is not None and open_fds >= HELD_CONNECTIONS
            measured.values["open fds while held"] = int(open_fds)
            assert (await client.post("/hooks/light", json={})).status_code == 202

            # Watchdog pings keep coming: no restart over twice WatchdogSec since READY.
            window = 2 * watchdog + 2
            await asyncio.sleep(max(0.0, ready_at + window - time.monotonic()))
            measured.values["watchdog window s"] = window
            service = await machine.show("phonepush", "ActiveState", "MainPID", "NRestarts")
            assert service == {"ActiveState": "active", "MainPID": main_pid, "NRestarts": "0"}
            journal = await machine.journal("phonepush")
            for sign in ("Too many open files", "EMFILE", "Watchdog timeout", "Traceback"):
                assert sign not in journal, journal[-3000:]
        finally:
            for writer, _ in held:
                writer.close()
            held.clear()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        # --- stop with a Play: in flight: the push finishes, the daemon exits cleanly ---
        async def idle() -> bool:
            return all("answer" in request for request in (await phone_state())["requests"])

        await eventually(idle, timeout=10)
        before = await phone_state()
        assert (await client.post("/hooks/door", json={"who": "late"})).status_code == 202

        async def playing() -> bool:
            state = await phone_state()
            return state["pushes"] == before["pushes"] + 1 and "answer" not in state["requests"][-1]

        await eventually(playing, timeout=10)
        with measured.timed("systemctl stop (Play: in flight) s"):
            await machine.run("systemctl", "stop", "phonepush")
        after = await phone_state()
        assert after["pushes"] == before["pushes"] + 1
        assert after["requests"][-1]["answer"]["status"] == 200
        assert after["tones"] == ["Chime.raw", "Chime.raw"]
        service = await machine.show(
            "phonepush", "ActiveState", "Result", "ExecMainStatus", "NRestarts"
        )
        # Result=success: neither killed (signal, timeout) nor failed (exit-code).
        assert service == {
            "ActiveState": "inactive",
            "Result": "success",
            "ExecMainStatus": "0",
            "NRestarts": "0",
        }
        journal = await machine.journal("phonepush")
        assert "stopped; 0 deliveries left pending in the spool" in journal, journal[-3000:]


async def _backlight_is(phone_state: Any, expected: dict[str, Any]) -> bool:
    state = await phone_state()
    return bool(state["backlight"] == expected)
