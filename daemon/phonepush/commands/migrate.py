"""``phonepush migrate --from PATH --to URL [--password-file FILE]``: move a deployment's SQLite
spool into an empty PostgreSQL database, to run one or more daemons on it (``[spool] url``).

Everything is copied (events, deliveries and their progress, pages, cooldowns, alerts with their
phones, ack tokens, rounds, actions and presses, grouping windows and their events, silences,
schedule firings), ids kept, in one transaction: a failure leaves the database without any of
it. The spool file is only read. Prints one line per table with the rows copied, then
``migrated N events (M pending deliveries) from PATH to URL``.

Exit status 0, or 2 with one line naming the flag at fault: a ``--from`` that is missing, not a
spool, or open in a running daemon; a ``--to`` that is not a PostgreSQL URL, holds a password,
cannot be reached, or already holds data.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pydantic import ValidationError

from phonepush.config import SpoolConfig
from phonepush.errors import SpoolError
from phonepush.logs import counted

if TYPE_CHECKING:
    from phonepush.store.migrate import Copied

__all__ = ["main"]

#: Exit status for every refusal, as for a bad configuration.
_USAGE: Final = 2

_DESCRIPTION = """\
Copy the SQLite spool at --from into the PostgreSQL database at --to, for [spool] url.

Stop the daemon first: a spool a running daemon has open is refused where that can be
told, and what it writes after the copy would not be moved. The spool file is only read.
The database's schema is created if it is not there; the copy is one transaction, so a
failure leaves none of it behind.

The database must hold no phonepush data yet. A second migrate into it is refused, so
that a migration repeated by mistake, or a daemon already started on the database, never
leaves a mix of two stores. To start over, drop the database and create it again (or
name a new one).

The password is never part of the URL: give --password-file, or set PGPASSWORD (libpq
reads it, as it reads ~/.pgpass and PGSSLMODE and the rest of its environment).
"""


class _Refused(Exception):
    """One line for stderr, naming the flag at fault."""


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        required=True,
        metavar="PATH",
        help="the SQLite spool file ([spool] path, e.g. /var/lib/phonepush/spool.db)",
    )
    parser.add_argument(
        "--to",
        dest="url",
        required=True,
        metavar="URL",
        help="the PostgreSQL database, postgresql://USER@HOST[:PORT]/DATABASE, no password",
    )
    parser.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="a file holding the database password (default: $PGPASSWORD, if set)",
    )
    return parser


def main(argv: Sequence[str], prog: str = "phonepush migrate") -> int:
    args = _parser(prog).parse_args(list(argv))
    try:
        url = _url(args.url)
        password = _password(args.password_file)
        copied = asyncio.run(_migrate(args.source, url, password))
    except _Refused as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return _USAGE
    from phonepush.store.postgres import redact_url

    width = max((len(name) for name, _ in copied.tables), default=0)
    for name, rows in copied.tables:
        print(f"{name:<{width}}  {rows}")
    print(
        f"migrated {counted(copied.events, 'event')}"
        f" ({counted(copied.pending, 'pending delivery', 'pending deliveries')})"
        f" from {args.source} to {redact_url(url)}"
    )
    return 0


def _url(url: str) -> str:
    """``url`` if the daemon would take it as ``[spool] url``; the same checks, the same words,
    but for where this command takes the password."""
    try:
        SpoolConfig(url=url)
    except ValidationError as exc:
        message = str(exc.errors(include_input=False)[0]["msg"]).removeprefix("Value error, ")
        message = message.replace(
            "spool.password or spool.password_file", "--password-file or $PGPASSWORD"
        )
        raise _Refused(f"--to: {message}") from None
    if not url:
        raise _Refused("--to: give the PostgreSQL database's URL (postgresql://...)")
    return url


def _password(path: Path | None) -> str | None:
    if path is None:
        return None  # libpq reads $PGPASSWORD (or ~/.pgpass) itself
    try:
        # Editors and `echo` add a final newline that is not part of the password.
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise _Refused(f"--password-file: cannot read {path}: {exc}") from None


async def _migrate(source: Path, url: str, password: str | None) -> Copied:
    try:
        from phonepush.store.migrate import copy_spool, holder_of, snapshot
        from phonepush.store.postgres import PostgresStore
    except ImportError as exc:
        raise _Refused(
            f"--to: PostgreSQL needs psycopg ({exc.name} is not installed):"
            " pip install 'phonepush[postgres]'"
        ) from None
    holder = holder_of(source)
    if holder is not None:
        by = f" (process {holder})" if holder else ""
        raise _Refused(f"--from: {source} is open in a running daemon{by}: stop it first")
    try:
        async with snapshot(source) as spool:
            try:
                async with PostgresStore(url, password=password, pool_size=1) as store:
                    return await copy_spool(spool, store)
            except SpoolError as exc:
                raise _Refused(f"--to: {exc}") from None
    except SpoolError as exc:
        raise _Refused(f"--from: {exc}") from None
