"""A real, throwaway PostgreSQL for the tests: ``initdb`` in a temp folder, ``postgres`` on a free
loopback port with its socket in that folder (made by _pg_cluster), stopped at the end of the
session.

Each pytest-xdist worker makes its own cluster (the session fixtures run once per worker), and
each test gets a database of its own in it (:func:`pg_url`), so tests never see each other's
rows. initdb refuses to run as root: as root the cluster is made and run as the ``postgres``
user, which owns the temp folder. Tests that need the server skip, saying why, where there is
no PostgreSQL to run.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _pg_cluster import PgCluster, bin_dir, wait_until_accepting

__all__ = ["OpenStore", "PgCluster", "wait_until_accepting"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL server of this worker's own, for the whole session."""
    bindir = bin_dir()
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
