"""Where a phone is and how to reach it: :class:`PhoneTarget` and the ``HOST[:PORT]`` grammar.

Kept apart from :mod:`phonepush.phone.client` (which needs httpx and ssl) so the configuration
can build targets without loading any I/O library.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Final, Literal

from phonepush.errors import InvalidTarget

__all__ = ["DEFAULT_TIMEOUT", "PhoneTarget", "Scheme", "parse_host"]

Scheme = Literal["http", "https"]

#: Seconds to wait for a phone; ``Play:`` holds the answer until the tone has played.
DEFAULT_TIMEOUT: Final = 10.0
# The reference client's host grammar, ASCII only (its IGNORECASE also lets e.g. U+212A through).
_HOSTNAME: Final = re.compile(r"(?:[A-Za-z0-9\-]+\.)*[A-Za-z0-9\-]+")


def parse_host(text: str) -> tuple[str, int | None]:
    """Split ``HOST[:PORT]`` as the reference client does, with its error messages.

    The port is whatever follows the last ``:`` and is checked first (``Invalid port: X``), then
    the host against the host-name grammar (``Invalid host: X``); both raise
    :class:`~phonepush.errors.InvalidTarget`. IPv6 literals are not accepted here.
    """
    host, port = text, None
    if ":" in text:
        host, port_text = text.rsplit(":", maxsplit=1)
        try:
            port = int(port_text)
        except ValueError:
            raise InvalidTarget(f"Invalid port: {port_text}") from None
        if not 1 <= port <= 65535:
            raise InvalidTarget(f"Invalid port: {port}")
    if not _HOSTNAME.fullmatch(host):
        raise InvalidTarget(f"Invalid host: {host}")
    return host, port


def _valid_host(host: str) -> bool:
    if _HOSTNAME.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class PhoneTarget:
    """Where a phone is and how to reach it.

    ``port`` defaults to 80 for http and 443 for https; setting ``certificate`` implies https.
    ``host`` is a host name, an IPv4 or a bare IPv6 address. Raises
    :class:`~phonepush.errors.InvalidTarget` for an unusable value.
    """

    name: str
    host: str
    port: int | None = None
    scheme: Scheme = "http"
    username: str = ""
    password: str = field(default="", repr=False)
    certificate: str | None = None
    ca_file: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.certificate:
            object.__setattr__(self, "scheme", "https")
        if self.scheme not in ("http", "https"):
            raise InvalidTarget(f"Invalid scheme: {self.scheme}")
        if not _valid_host(self.host):
            raise InvalidTarget(f"Invalid host: {self.host}")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise InvalidTarget(f"Invalid port: {self.port}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise InvalidTarget(f"Invalid timeout: {self.timeout}")

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 443 if self.scheme == "https" else 80

    @property
    def authority(self) -> str:
        """``host:port`` as it appears in a URL (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.effective_port}"
