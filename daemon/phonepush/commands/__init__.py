"""One module per CLI command; see :mod:`phonepush.cli`.

What several commands share: the ``--config`` option and loading it with errors reported the
same way (``FILE: invalid configuration:`` then one line per problem, exit status 2). A file that
is not there and a listen port that is taken are not problems of the configuration: each is one
line saying what to do, with the same exit status. And where the commands that talk to a running
daemon (``fire``, ``phones``, ``silence``) find it: :func:`daemon_url`, :func:`bearer`.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from phonepush.errors import ConfigError
from phonepush.redact import url_for_log

if TYPE_CHECKING:
    from phonepush.config import Config

__all__ = [
    "CONFIG_EXIT",
    "DEFAULT_CONFIG",
    "add_config_option",
    "bearer",
    "daemon_url",
    "load_or_report",
]

#: Where the systemd unit and the container image keep the config.
DEFAULT_CONFIG = "/etc/phonepush/phonepush.toml"
#: Exit status for an invalid configuration.
CONFIG_EXIT = 2


def daemon_url(config: Config) -> str:
    """``http://HOST:PORT`` of the daemon ``config`` runs, as a command on the same machine
    reaches it: a wildcard listen address on loopback, an IPv6 address in brackets."""
    host, port = config.server.address
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def bearer(config: Config) -> dict[str, str]:
    """The ``Authorization`` header for the daemon's API (none without ``webhook.token``)."""
    token = config.webhook.token
    return {} if token is None else {"Authorization": f"Bearer {token.get_secret_value()}"}


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``-c/--config FILE``, defaulting to ``$PHONEPUSH_CONFIG`` or :data:`DEFAULT_CONFIG`."""
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=Path(os.environ.get("PHONEPUSH_CONFIG", DEFAULT_CONFIG)),
        help="the TOML config file (default: $PHONEPUSH_CONFIG or %(default)s)",
    )


def load_or_report(path: Path) -> Config | None:
    """Load ``path``, or print why it is invalid to stderr and return None."""
    # Imported here: `phonepush send` and `simulate` live in this package too and need no config.
    from phonepush.config import load_config

    try:
        return load_config(path, environ=os.environ)
    except ConfigError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.ENOENT:
            print(
                f"{path}: no such file; name the config file with --config FILE "
                "(or $PHONEPUSH_CONFIG); config/phonepush.toml is a commented example",
                file=sys.stderr,
            )
            return None
        report_config_error(path, exc)
        return None


#: How the daemon says its listen port is taken (phonepush.app.daemon._bind).
_BUSY = "server.listen: cannot listen on "


def report_config_error(path: Path, exc: ConfigError) -> None:
    message = url_for_log(str(exc))
    if message.startswith(_BUSY) and "\n" not in message:
        # Nothing in the file is wrong: something else holds the port.
        print(
            f"{path}: {message}; stop what uses that port or set server.listen to another",
            file=sys.stderr,
        )
        return
    # Rule and audio compilation raise their own ConfigErrors; a URL they quote is masked too.
    print(f"{path}: invalid configuration:\n{message}", file=sys.stderr)
