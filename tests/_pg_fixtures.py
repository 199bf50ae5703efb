"""A real, throwaway PostgreSQL for the tests: ``initdb`` in a temp folder, ``postgres`` on a free
loopback port with its socket in that folder, stopped at the end of the session.

Each pytest-xdist worker makes its own cluster (the session fixtures run once per worker), and
each test gets a database of its own in it (:func:`pg_url`), so tests never see each other's
rows. initdb refuses to run as root: as root the cluster is made and run as the ``postgres``
user, which owns the temp folder. Tests that need the server skip, saying why, where there is
no PostgreSQL to run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _bin_dir() -> Path | None:
    """Debian keeps the server binaries in /usr/lib/postgresql/<version>/bin, off PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgCluster:
    """One running PostgreSQL server: where it listens, and how to stop and start it again."""

    def __init__(self, bindir: Path, folder: Path) -> None:
        self.bindir = bindir
        self.folder = folder
        self.data = folder / "data"
        self.port = _free_port()
        self.user = "postgres"
        self._as_postgres = os.geteuid() == 0
        self._databases = 0

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(argv)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> None:
        if self._as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port}"
            f" -c unix_socket_directories={self.folder} -c fsync=off"
            " -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.folder / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        self._databases += 1
        name = f"t{os.getpid()}_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL server of this worker's own, for the whole session."""
    bindir = _bin_dir()
    if bindir is None:
        # As for mosquitto: a missing server fails the tests that need it, never hides them.
        pytest.fail(
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: the store tests need "
            "one (Debian: apt-get install postgresql; bash .ci/run installs it)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("psycopg is not installed: pip install -e '.[dev]' (or '.[postgres]')")
    folder = Path(tempfile.mkdtemp(prefix="phonepush-pg-"))
    cluster = PgCluster(bindir, folder)
    try:
        cluster.init()
        cluster.start()
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"cannot start PostgreSQL: {exc.stdout}{exc.stderr}")
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """The URL of an empty database of this test's own."""
    return pg_cluster.new_database()


def wait_until_accepting(cluster: PgCluster, timeout: float = 30.0) -> None:
    """Block until the server takes connections (after a restart)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(cluster.url(), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


#: Makes the store under test: ``open_store(**kw)``, an unopened store (``async with`` it).
OpenStore = Callable[..., Any]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which store a repository test runs against: both, with the same assertions."""
    return str(request.param)


@pytest.fixture
def open_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> OpenStore:
    """Makes the store under test; every call is on the same file or database, so a second
    store sees (and a reopened one resumes) what the first wrote."""
    from phonepush.store.spool import Spool

    if backend == "sqlite":
        return lambda **kw: Spool(tmp_path / "spool.db", **kw)
    from phonepush.store.postgres import PostgresStore

    url: str = request.getfixturevalue("pg_url")
    return lambda **kw: PostgresStore(url, **kw)
