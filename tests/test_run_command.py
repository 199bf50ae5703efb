"""``phonepush run`` as a user runs it: a process, signals, stdout logs, exit codes."""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import RunProcess, eventually, free_port, start_run_process
from phonepush.app.limits import raise_open_files_limit
from phonepush.sim.simulator import Fleet

TOKEN = "run-test-token"


def write_config(path: Path, port: int, phone: str, spool: Path, *, extra: str = "") -> None:
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"

[spool]
path = "{spool}"

[webhook]
token = "{TOKEN}"

[dispatch]
retry_initial = "50ms"
retry_max = "200ms"

[[phones]]
name = "desk"
host = "{phone}"

[[rules]]
name = "page"
on = "webhook:page"
to = ["desk"]
execute = ["Dial:{{{{ payload.number }}}}"]
ttl = "1m"
{extra}
"""
    )


@pytest.fixture
async def start_run(tmp_path: Path) -> AsyncIterator[Any]:
    procs: list[RunProcess] = []

    async def start(config: Path, open_files: int | None = None) -> RunProcess:
        """``open_files``: the soft RLIMIT_NOFILE the process starts with, as a service
        manager would set it."""

        def lower_soft_limit() -> None:
            if open_files is not None:
                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, hard))

        process = await start_run_process(config, preexec_fn=lower_soft_limit)
        procs.append(process)
        return process

    yield start
    for process in procs:
        if process.proc.returncode is None:
            process.proc.kill()
            await process.proc.wait()


async def post(port: int, hook: str, payload: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"http://127.0.0.1:{port}/hooks/{hook}",
            json=payload,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )


async def test_sigterm_lets_the_request_on_the_wire_finish_and_exits_0(
    tmp_path: Path, make_fleet: Any, start_run: Any
) -> None:
    fleet: Fleet = await make_fleet(names=["desk"])
    phone = fleet.phones[0]
    await phone.set_fault("slow", delay_ms=1000)
    port = free_port()
    config = tmp_path / "phonepush.toml"
    write_config(config, port, phone.address, tmp_path / "spool.db")
    process = await start_run(config)

    assert (await post(port, "page", {"number": "1234"})).status_code == 202
    # The push itself, not just any request: the daemon's health probe may reach the phone first.
    await eventually(lambda: phone.state.pushes == 1)
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    assert list(phone.state.dialled) == ["1234"]
    assert "delivered" in process.output
    assert "0 deliveries left pending" in process.output


async def test_sighup_reloads_and_a_bad_file_keeps_the_running_config(
    tmp_path: Path, make_fleet: Any, start_run: Any
) -> None:
    fleet: Fleet = await make_fleet(names=["desk"])
    phone = fleet.phones[0]
    port = free_port()
    config = tmp_path / "phonepush.toml"
    spool = tmp_path / "spool.db"
    write_config(config, port, phone.address, spool)
    process = await start_run(config)
    # One phone and one rule read as such.
    assert f"phonepush ready: listening on 127.0.0.1:{port}, 1 phone, 1 rule\n" in process.output
    assert (await post(port, "backlight", {})).status_code == 404

    write_config(
        config,
        port,
        phone.address,
        spool,
        extra="""
[[rules]]
name = "backlight"
on = "webhook:backlight"
to = ["desk"]
execute = ["Display:On:5"]
""",
    )
    process.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "reloaded: 1 phone, 2 rules\n" in process.output)
    assert (await post(port, "backlight", {})).status_code == 202
    await eventually(lambda: phone.state.backlight.minutes == 5)

    config.write_text(config.read_text().replace('to = ["desk"]', 'to = ["nobody"]'))
    process.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "reload failed" in process.output)
    assert "rules[page].to" in process.output
    assert (await post(port, "backlight", {})).status_code == 202

    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0


def _open_files_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a running process, as the kernel reports it."""
    text = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", text, re.M)
    assert match, text
    return int(match[1]), int(match[2])


async def test_the_soft_open_files_limit_is_raised_to_the_hard_limit(
    tmp_path: Path, make_fleet: Any, start_run: Any
) -> None:
    # A service manager's default soft limit (1,024) is too few for thousands of phones; the
    # hard limit is what the administrator allows.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        pytest.skip(f"the hard open files limit ({hard}) leaves nothing to raise")
    fleet: Fleet = await make_fleet(names=["desk"])
    port = free_port()
    config = tmp_path / "phonepush.toml"
    write_config(config, port, fleet.phones[0].address, tmp_path / "spool.db")
    process = await start_run(config, open_files=256)

    assert _open_files_limits(process.proc.pid) == (hard, hard)
    assert f"open files limit: raised from 256 to {hard} (the hard limit)" in process.output
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0


async def test_an_open_files_limit_already_at_the_hard_limit_is_only_logged(
    tmp_path: Path, make_fleet: Any, start_run: Any
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fleet: Fleet = await make_fleet(names=["desk"])
    port = free_port()
    config = tmp_path / "phonepush.toml"
    write_config(config, port, fleet.phones[0].address, tmp_path / "spool.db")
    process = await start_run(config, open_files=hard)

    assert _open_files_limits(process.proc.pid) == (hard, hard)
    assert f"open files limit: {hard} (already the hard limit)" in process.output
    process.proc.send_signal(signal.SIGTERM)
    assert await process.wait() == 0


def test_a_refused_raise_is_a_warning_and_the_daemon_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # What a sandbox that forbids setrlimit does; the real call is exercised above.
    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 524288))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    with caplog.at_level(logging.INFO, logger="phonepush.limits"):
        assert raise_open_files_limit() == 1024
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "could not raise it from 1024 to the hard limit 524288" in record.getMessage()
    assert "Operation not permitted" in record.getMessage()


async def test_config_errors_exit_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[phones]]\nname = "desk"\nhost = "192.0.2.1:99999"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "phonepush",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "phones[desk].host" in err.decode() and "99999" in err.decode()
