"""URLs as logs and error messages may show them: no user information, no query values.

A URL in a configuration or in event data can carry a secret two ways: ``user:password@`` in
its authority, or a token in its query (``?token=...``, ``?X-Amz-Signature=...``). Every place
that logs or prints a URL goes through :func:`url_for_log`; it masks every URL it finds in a
text, so messages that hold URLs among other words (configuration errors) go through it too.
Path and host stay readable: they are what an operator needs to find the failing endpoint.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MASK", "url_for_log"]

MASK: Final = "***"
# scheme://[userinfo@]rest: the userinfo is everything up to the last "@" before the path, so a
# password holding "@" or ":" is masked whole. The scheme starts where no scheme character
# precedes it and is at most 32 characters: unbounded, "a.a.a.a..." in a long message would be
# scanned from every position (quadratic; 64 KB took 19 s), and messages quote event data.
_URL: Final = re.compile(
    r"(?i)(?<![a-z0-9+.\-])([a-z][a-z0-9+.\-]{0,31}://)([^\s/?#]*@)?([^\s?#]*)(\?[^\s#]*)?(#\S*)?"
)
_QUERY_VALUE: Final = re.compile(r"=[^&;]*")


def _mask(match: re.Match[str]) -> str:
    scheme, userinfo, rest, query, fragment = match.groups()
    out = scheme + (f"{MASK}@" if userinfo else "") + rest
    if query:
        out += _QUERY_VALUE.sub(f"={MASK}", query)
    if fragment:
        out += f"#{MASK}"
    return out


def url_for_log(url: str) -> str:
    """``url`` with its user information and every query value masked:
    ``https://u:p@h/x?token=s`` becomes ``https://***@h/x?token=***``. Text that is not a
    ``scheme://`` URL is returned masked the same way wherever it holds one."""
    # Every log line passes through here (the formatters' backstop): most hold no URL, and the
    # substring test is a hundred times cheaper than the regex's scan.
    if "://" not in url:
        return url
    return _URL.sub(_mask, url)
