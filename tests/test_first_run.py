"""The first run: every error a newcomer meets is one line that says what to do, with the exit
status scripts rely on. Each runs the real command in its own process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from _daemon_fixtures import free_port


def phonepush(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run(
        [sys.executable, "-m", "phonepush", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --- ports ---------------------------------------------------------------------------------------


def test_demo_on_a_taken_port_names_the_option(taken_port: int) -> None:
    result = phonepush("demo", "--once", "--port", str(taken_port))
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"phonepush demo: port {taken_port} is taken; choose another with --port"
    )
    assert result.stdout == ""


def test_demo_picks_a_free_port_when_8080_is_taken() -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", 8080))
        except OSError:
            pass  # taken already: just as good
        else:
            sock.listen()
        result = phonepush("demo", "--once")
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()[:2]
    assert first.startswith("phonepush demo: port 8080 is taken; using ")
    assert first.endswith(" (choose one with --port)")
    port = first.split("using ")[1].split()[0]
    assert second.startswith(f"phonepush demo: daemon on http://127.0.0.1:{port},")
    # And the sample event went through on that port.
    assert "screen [Doorbell]" in result.stdout


def test_simulate_on_a_taken_port_names_the_option(taken_port: int) -> None:
    result = phonepush("simulate", "--port", str(taken_port), "--phones", "2")
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"phonepush simulate: port {taken_port} is taken (phones on {taken_port}-"
        f"{taken_port + 1}, control on {taken_port + 2}); choose another with --port "
        "(or --control-port)"
    )


def test_simulate_on_a_taken_control_port_names_that_option(taken_port: int) -> None:
    result = phonepush("simulate", "--port", str(free_port()), "--control-port", str(taken_port))
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"phonepush simulate: port {taken_port} is taken; choose another with --control-port"
    )


def test_run_on_a_taken_port_is_not_an_invalid_configuration(
    tmp_path: Path, taken_port: int
) -> None:
    config = tmp_path / "phonepush.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{taken_port}"\n[spool]\npath = "{tmp_path}/spool.db"\n'
        '[[phones]]\nname = "desk"\nhost = "127.0.0.1:9"\n'
    )
    result = phonepush("run", "--config", str(config))
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "invalid configuration" not in line
    assert line == (
        f"{config}: server.listen: cannot listen on 127.0.0.1:{taken_port}: Address already in "
        "use; stop what uses that port or set server.listen to another"
    )


# --- files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_missing_config_file_says_how_to_name_one(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "phonepush.toml"
    result = phonepush(command, "--config", str(missing))
    assert result.returncode == 2
    assert one_line(result.stderr) == (
        f"{missing}: no such file; name the config file with --config FILE "
        "(or $PHONEPUSH_CONFIG); config/phonepush.toml is a commented example"
    )


def test_missing_secret_files_name_the_folders_searched(tmp_path: Path) -> None:
    config = tmp_path / "phonepush.toml"
    config.write_text(
        '[webhook]\ntoken_file = "webhook-token"\n'
        '[[phones]]\nname = "desk"\nhost = "192.0.2.1"\nusername = "push"\n'
        'password_file = "phone-password"\n'
        '[[rules]]\nname = "bell"\non = "webhook:bell"\nto = ["desk"]\nexecute = ["Key:Info"]\n'
    )
    result = phonepush("check", "--config", str(config))
    assert result.returncode == 2
    # Only the files: not also "webhook.token: required ... set one (... or token_file)".
    assert result.stderr.splitlines() == [
        f"{config}: invalid configuration:",
        f"webhook.token_file: no such file: webhook-token (looked in {tmp_path}); create it there",
        f"phones[desk].password_file: no such file: phone-password (looked in {tmp_path}); "
        "create it there",
    ]


def test_check_reports_a_certificate_that_is_not_there(tmp_path: Path) -> None:
    config = tmp_path / "phonepush.toml"
    config.write_text(
        f'[[phones]]\nname = "desk"\nhost = "192.0.2.1"\ncertificate = "{tmp_path}/desk.pem"\n'
        f'[[phones]]\nname = "hall"\nhost = "192.0.2.2"\nca_file = "{tmp_path}/ca.pem"\n'
    )
    result = phonepush("check", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{config}: invalid configuration:",
        f"phones[desk].certificate: no such file: {tmp_path}/desk.pem",
        f"phones[hall].ca_file: no such file: {tmp_path}/ca.pem",
    ]
    (tmp_path / "desk.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert phonepush("check", "--config", str(config)).returncode == 0


def test_check_reports_a_phone_user_without_a_password(tmp_path: Path) -> None:
    config = tmp_path / "phonepush.toml"
    config.write_text('[[phones]]\nname = "desk"\nhost = "192.0.2.1"\nusername = "push"\n')
    result = phonepush("check", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{config}: invalid configuration:",
        "phones[desk].password: username 'push' is set but no password; set password or "
        "password_file (or remove username)",
    ]
    config.write_text(config.read_text() + 'password = "secret"\n')
    result = phonepush("check", "--config", str(config))
    assert result.returncode == 0, result.stderr


# --- plurals -------------------------------------------------------------------------------------


def test_one_argument_is_singular() -> None:
    result = phonepush("background", "-h", "192.0.2.1", "http://a/i.png")
    assert result.returncode == 1
    assert one_line(result.stderr) == "Expected ICON-URL and IMAGE-URL, got 1 argument"
    result = phonepush("ringtone", "-h", "192.0.2.1", "a", "b")
    assert one_line(result.stderr) == "Expected one URL, got 2 arguments"
