"""Fixtures that run the real daemon in the test's event loop, against simulated phones."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import CollectorRegistry

from _ports import free_port
from phonepush.config import Config, parse_config

if TYPE_CHECKING:
    from phonepush.app.daemon import Daemon, Running


class DaemonRunner:
    """Starts and stops daemons on one spool; what each run exposes is ``running``."""

    def __init__(self, tmp: Path) -> None:
        self.spool = tmp / "spool.db"
        self.port = free_port()
        self._task: asyncio.Task[None] | None = None
        self.daemon: Daemon | None = None
        self.registry = CollectorRegistry()

    def config(self, data: Mapping[str, Any]) -> Config:
        merged = dict(data)
        merged.setdefault("server", {"listen": f"127.0.0.1:{self.port}"})
        merged.setdefault("spool", {"path": str(self.spool)})
        merged.setdefault("dispatch", {"retry_initial": "50ms", "retry_max": "200ms"})
        # Tests that do not exercise authentication post hooks without a token, on loopback.
        merged.setdefault("webhook", {"allow_anonymous": True})
        return parse_config(merged, environ={})

    async def start(self, data: Mapping[str, Any]) -> Running:
        return await self._start(self.config(data), None)

    async def start_file(self, path: Path) -> Running:
        """Run the daemon on a config file, as ``phonepush run`` does: it can reload it."""
        from phonepush.config import load_config

        return await self._start(load_config(path, environ={}), path)

    async def _start(self, config: Config, path: Path | None) -> Running:
        from phonepush.app.daemon import Daemon

        self.registry = CollectorRegistry()
        self.daemon = Daemon(config, config_path=path, registry=self.registry, drain_timeout=2)
        self._task = asyncio.create_task(self.daemon.run(), name="daemon-under-test")
        ready = asyncio.ensure_future(self.daemon.ready.wait())
        done, _ = await asyncio.wait(
            {ready, self._task}, timeout=10, return_when=asyncio.FIRST_COMPLETED
        )
        if self._task in done:
            ready.cancel()
            self._task.result()
        assert ready in done, "daemon did not become ready in 10 s"
        assert self.daemon.running is not None
        return self.daemon.running

    async def stop(self) -> None:
        if self.daemon is not None and self._task is not None:
            self.daemon.stop()
            await asyncio.wait_for(self._task, timeout=15)
            self._task = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
async def daemon_runner(tmp_path: Path) -> AsyncIterator[DaemonRunner]:
    runner = DaemonRunner(tmp_path)
    try:
        yield runner
    finally:
        with contextlib.suppress(Exception):
            await runner.stop()


async def phonepush(*args: str) -> tuple[int, str, str]:
    """``python -m phonepush ARGS`` in a subprocess: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "phonepush",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll ``check`` until true; fail with its last state after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class RunProcess:
    """``phonepush run --config F`` as a process, its stdout and stderr collected line by line
    (see :func:`start_run_process`)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        assert proc.stdout is not None
        self._reader = asyncio.create_task(self._read(proc.stdout))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.lines.append(line.decode("utf-8", "replace"))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def wait(self, timeout: float = 20) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code


async def start_run_process(
    config: Path, *, preexec_fn: Callable[[], object] | None = None
) -> RunProcess:
    """Start ``phonepush run`` on ``config`` and wait until it says it is ready (or ends)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "phonepush",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=preexec_fn,
    )
    process = RunProcess(proc)
    try:
        await eventually(
            lambda: "phonepush ready" in process.output or proc.returncode is not None, 30
        )
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        raise
    assert "phonepush ready" in process.output, process.output
    return process
