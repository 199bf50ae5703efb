"""Process resource limits the daemon sets for itself at start-up.

Every phone connection, HTTP client, spool file and log stream is a file descriptor. Service
managers start services with a soft ``RLIMIT_NOFILE`` of 1,024 (systemd's default, kept low for
programs that still use ``select()``) under a far higher hard limit: a fan-out to thousands of
phones, or thousands of held HTTP clients, would hit EMFILE long before the hard limit. The daemon
uses epoll (asyncio) only, so it takes the whole hard limit.
"""

from __future__ import annotations

import logging
import resource

__all__ = ["default_max_connections", "raise_open_files_limit"]

log = logging.getLogger("phonepush.limits")

#: Phone connections never fall below this, whatever the limit says (a limit this low fails
#: elsewhere first).
_MIN_CONNECTIONS = 64


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the soft limit now in force.

    Both values are logged. A failure to raise (a sandbox refusing it) is a warning, not an
    error: the daemon still runs, with fewer connections at once.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        log.info("open files limit: %s (already the hard limit)", _show(soft))
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning(
            "open files limit: could not raise it from %s to the hard limit %s (%s); "
            "connections beyond it fail with EMFILE",
            _show(soft),
            _show(hard),
            exc,
        )
        return soft
    log.info("open files limit: raised from %s to %s (the hard limit)", _show(soft), _show(hard))
    return hard


def _show(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def default_max_connections() -> int:
    """``dispatch.max_connections`` when unset: half the soft open-files limit in force (512
    under the usual 1,024; read after :func:`raise_open_files_limit`), so a larger limit keeps
    more phones' connections open between pushes, and a small one is never exhausted by phone
    connections alone."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(_MIN_CONNECTIONS, soft // 2)
