"""Talking to systemd without libsystemd: ``sd_notify`` datagrams and service credentials.

Under ``Type=notify`` systemd waits for ``READY=1`` before it calls the unit started, and with
``WatchdogSec=`` it restarts the service when the ``WATCHDOG=1`` pings stop. Both travel as
datagrams to the AF_UNIX socket named in ``$NOTIFY_SOCKET``; outside systemd (a shell, a
container, the tests) that variable is unset and every call here does nothing.

Sending never raises: a lost status line must not take the daemon down. The first failure is
logged as a warning, later ones at debug level, so a broken socket does not flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from phonepush.errors import ConfigError

__all__ = ["Notifier", "credential_path"]

log = logging.getLogger("phonepush.systemd")


class Notifier:
    """Sends service state to systemd; a no-op when ``$NOTIFY_SOCKET`` is unset.

    ``environ`` defaults to :data:`os.environ`; ``monotonic_ns`` and ``getpid`` are there so the
    reload timestamp and the watchdog PID check can be pinned in tests.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        getpid: Callable[[], int] = os.getpid,
    ) -> None:
        env = os.environ if environ is None else environ
        self._monotonic_ns = monotonic_ns
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._warned = False
        self.watchdog_interval: float | None = (
            _watchdog_interval(env, getpid()) if self._address is not None else None
        )

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to talk to."""
        return self._address is not None

    def ready(self, status: str = "") -> None:
        """Startup (or a reload) finished: the service is serving."""
        self._send("READY=1", *((f"STATUS={_one_line(status)}",) if status else ()))

    def stopping(self) -> None:
        """Shutdown began; systemd stops waiting for pings and counts ``TimeoutStopSec``."""
        self._send("STOPPING=1")

    def reloading(self) -> None:
        """A reload began; call :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` is what ``Type=notify-reload`` (systemd 253+) needs to tell this
        reload from an earlier one; older systemd ignores both fields.
        """
        self._send("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_ns() // 1000}")

    def status(self, text: str) -> None:
        """A one-line status for ``systemctl status``."""
        self._send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        """Tells the watchdog the service is alive."""
        self._send("WATCHDOG=1")

    async def watchdog_loop(self) -> None:
        """Pings the watchdog every :attr:`watchdog_interval` until cancelled.

        Run it as a task beside the daemon's other work: the pings come from the event loop, so
        a loop that stops turning (a blocking call, a deadlock) stops them and systemd restarts
        the service. Returns at once when systemd asked for no watchdog.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def _send(self, *fields: str) -> None:
        if self._address is None:
            return
        message = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never block the event loop: systemd's queue is deep, a full one means trouble
                # that waiting here would not fix.
                sock.setblocking(False)
                sock.sendto(message, self._address)
        except OSError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "cannot notify systemd (%s): %s", fields[0], exc)


def credential_path(name: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """The file systemd put credential ``name`` in (``LoadCredential=``), if there is one.

    ``None`` when ``$CREDENTIALS_DIRECTORY`` is unset or holds no such file, so callers can fall
    back to other places. A name with a path separator is refused: credentials are flat files
    and such a name could reach outside the directory.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"credential name {name!r}: must be a plain file name")
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        return None
    path = Path(directory) / name
    return path if path.is_file() else None


def state_directories(environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """The folders systemd made for the service (``StateDirectory=``, as ``$STATE_DIRECTORY``).

    Under ``DynamicUser=yes`` each is a symbolic link systemd made, as root, to
    ``private/<name>``: the spool trusts exactly these links (see ``Spool(trusted_links=)``).
    """
    env = os.environ if environ is None else environ
    return tuple(Path(item) for item in env.get("STATE_DIRECTORY", "").split(":") if item)


def _socket_address(value: str) -> str | None:
    """``$NOTIFY_SOCKET`` as a ``sendto`` address: a path, or ``@name`` (abstract namespace)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value:
        # vsock: and other transports are for VMs; a daemon in a service never sees them.
        log.warning("ignoring NOTIFY_SOCKET=%r: not a path or an abstract socket name", value)
    return None


def _watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, as sd_watchdog_enabled(3) advises.

    ``$WATCHDOG_PID``, when set, names the process the pings are for; another process (a child
    that inherited the environment) must not ping.
    """
    watchdog_pid = env.get("WATCHDOG_PID", "")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    # A newline would start a new field and let status text forge READY=1 or the like.
    return " ".join(text.splitlines())
