"""The sd_notify client against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from phonepush.app.systemd import Notifier, credential_path
from phonepush.errors import ConfigError


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: a bound datagram socket, like PID 1's."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self) -> list[str]:
        """The fields of the next datagram (waits up to 5 s so a lost message fails the test)."""
        self.sock.settimeout(5)
        return self.sock.recv(4096).decode("utf-8").split("\n")

    def pending(self) -> bool:
        self.sock.settimeout(0)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        return True

    async def receive_async(self) -> list[str]:
        self.sock.setblocking(False)
        data = await asyncio.get_running_loop().sock_recv(self.sock, 4096)
        return data.decode("utf-8").split("\n")


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield FakeSystemd(sock, str(path))


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    name = f"phonepush-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield FakeSystemd(sock, "@" + name)


def test_ready_reaches_systemd(systemd: FakeSystemd) -> None:
    Notifier({"NOTIFY_SOCKET": systemd.env_value}).ready()
    assert systemd.receive() == ["READY=1"]


def test_ready_carries_status(systemd: FakeSystemd) -> None:
    Notifier({"NOTIFY_SOCKET": systemd.env_value}).ready("serving 3 phones")
    assert systemd.receive() == ["READY=1", "STATUS=serving 3 phones"]


def test_each_state_change_is_its_own_message(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": systemd.env_value}, monotonic_ns=lambda: 123_456_789_000)
    notifier.status("connecting to broker")
    notifier.reloading()
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()
    assert systemd.receive() == ["STATUS=connecting to broker"]
    assert systemd.receive() == ["RELOADING=1", "MONOTONIC_USEC=123456789"]
    assert systemd.receive() == ["READY=1"]
    assert systemd.receive() == ["WATCHDOG=1"]
    assert systemd.receive() == ["STOPPING=1"]


def test_reload_timestamp_is_the_monotonic_clock_in_microseconds(systemd: FakeSystemd) -> None:
    # systemd compares MONOTONIC_USEC with its own CLOCK_MONOTONIC reading of the reload request.
    notifier = Notifier({"NOTIFY_SOCKET": systemd.env_value})
    before = time.monotonic_ns() // 1000
    notifier.reloading()
    after = time.monotonic_ns() // 1000
    fields = dict(field.split("=", 1) for field in systemd.receive())
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_status_text_cannot_forge_fields(systemd: FakeSystemd) -> None:
    Notifier({"NOTIFY_SOCKET": systemd.env_value}).status("phone says\nREADY=1")
    assert systemd.receive() == ["STATUS=phone says READY=1"]


def test_abstract_socket(abstract_systemd: FakeSystemd) -> None:
    Notifier({"NOTIFY_SOCKET": abstract_systemd.env_value}).ready("up")
    assert abstract_systemd.receive() == ["READY=1", "STATUS=up"]


def test_without_notify_socket_nothing_is_sent(systemd: FakeSystemd) -> None:
    notifier = Notifier({"WATCHDOG_USEC": "30000000"})
    notifier.ready("up")
    notifier.watchdog()
    notifier.stopping()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not systemd.pending()


async def test_watchdog_loop_returns_at_once_without_systemd() -> None:
    await asyncio.wait_for(Notifier({}).watchdog_loop(), timeout=5)


def test_send_failure_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.DEBUG, logger="phonepush.systemd"):
        notifier.ready()
        notifier.watchdog()
        notifier.stopping()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "READY=1" in warnings[0].getMessage()


def test_unknown_socket_kind_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="phonepush.systemd"):
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    notifier.ready()
    assert not notifier.enabled
    assert "vsock:2:1234" in caplog.text


@pytest.mark.parametrize(
    ("usec", "expected"),
    [("30000000", 15.0), ("1000000", 0.5), ("5", 2.5e-6), ("0", None), ("-1", None), ("x", None)],
)
def test_watchdog_interval_is_half_the_timeout(
    systemd: FakeSystemd, usec: str, expected: float | None
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": usec})
    assert notifier.watchdog_interval == expected


def test_no_watchdog_interval_without_watchdog_usec(systemd: FakeSystemd) -> None:
    assert Notifier({"NOTIFY_SOCKET": systemd.env_value}).watchdog_interval is None


def test_watchdog_pid_of_this_process_enables_pings(systemd: FakeSystemd) -> None:
    env = {
        "NOTIFY_SOCKET": systemd.env_value,
        "WATCHDOG_USEC": "20000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    assert Notifier(env).watchdog_interval == 10.0


def test_watchdog_pid_of_another_process_disables_pings(systemd: FakeSystemd) -> None:
    # A child that inherited the variables must not keep a hung parent alive.
    env = {"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}
    assert Notifier(env, getpid=lambda: 4242).watchdog_interval is None
    env["WATCHDOG_PID"] = "4242"
    assert Notifier(env, getpid=lambda: 4242).watchdog_interval == 10.0
    env["WATCHDOG_PID"] = "not-a-pid"
    assert Notifier(env, getpid=lambda: 4242).watchdog_interval is None


async def test_watchdog_loop_pings_until_cancelled(systemd: FakeSystemd) -> None:
    # 20 ms timeout: pings every 10 ms, so three arrive quickly.
    notifier = Notifier({"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "20000"})
    task = asyncio.create_task(notifier.watchdog_loop())
    for _ in range(3):
        assert await asyncio.wait_for(systemd.receive_async(), timeout=5) == ["WATCHDOG=1"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    while systemd.pending():
        systemd.sock.recv(4096)
    await asyncio.sleep(0.05)
    assert not systemd.pending()


def test_credential_path_finds_loaded_credential(tmp_path: Path) -> None:
    (tmp_path / "mqtt-password").write_text("s3cret")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert credential_path("mqtt-password", env) == tmp_path / "mqtt-password"
    assert credential_path("webhook-token", env) is None


def test_credential_path_outside_systemd() -> None:
    assert credential_path("mqtt-password", {}) is None


@pytest.mark.parametrize("name", ["", ".", "..", "../etc/shadow", "sub/name"])
def test_credential_path_refuses_paths(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="credential name"):
        credential_path(name, {"CREDENTIALS_DIRECTORY": str(tmp_path)})


# --- the daemon as systemd starts it --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _fields(message: list[str]) -> dict[str, str]:
    return dict(field.split("=", 1) for field in message)


def _next_state(systemd: FakeSystemd) -> dict[str, str]:
    """The next message that is not a watchdog ping."""
    while True:
        fields = _fields(systemd.receive())
        if "WATCHDOG" not in fields:
            return fields


def test_phonepush_run_under_systemd(tmp_path: Path, systemd: FakeSystemd) -> None:
    """What Type=notify, WatchdogSec= and ExecReload= in systemd/phonepush.service rely on."""
    port = _free_port()
    config = tmp_path / "phonepush.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\n')
    env = {
        **os.environ,
        "NOTIFY_SOCKET": systemd.env_value,
        "WATCHDOG_USEC": "200000",
        "PHONEPUSH_SPOOL__PATH": str(tmp_path / "spool.db"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "phonepush", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ready = _next_state(systemd)
        assert ready["READY"] == "1"
        # READY=1 means serving: systemd starts dependent units at this point.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            assert answer.status == 200
        # WATCHDOG_USEC=200000: a ping every 0.1 s keeps the service from being killed.
        while (ping := _fields(systemd.receive())) != {"WATCHDOG": "1"}:
            assert "READY" not in ping and "STOPPING" not in ping, ping

        proc.send_signal(signal.SIGHUP)  # ExecReload=/bin/kill -HUP $MAINPID
        reloading = _next_state(systemd)
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert _next_state(systemd)["READY"] == "1"

        proc.send_signal(signal.SIGTERM)
        assert _next_state(systemd) == {"STOPPING": "1"}
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
