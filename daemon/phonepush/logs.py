"""Logging to stdout, as text or one JSON object per line (``--log-format json``).

Services log to stdout and let systemd's journal or the container runtime keep it. Nothing here
formats secrets: no module logs a password, token or Authorization header in the first place.

Log messages carry text that events, API users and phones control (a silence's ``createdBy``, a
rendered URI, a phone's answer). Both formats keep one record on one line whatever it holds: the
text format escapes control characters (``\\n``, ``\\r``, ESC as ``\\x1b``, every other C0/C1
control, and the Unicode line and paragraph separators) in the message, so a value cannot forge
a second log line or send terminal escape sequences, and indents a traceback's lines (escaped the
same way) under its record; JSON escapes them by itself. Both mask the user information and
query values of any URL in a message (:func:`phonepush.redact.url_for_log`), a backstop for URLs
that arrive inside other text (a phone's error naming the URL it refused); call sites that log a
URL mask it themselves.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable
from typing import Any, Final, Literal

from phonepush.redact import url_for_log

__all__ = ["LogFormat", "counted", "setup_logging"]

LogFormat = Literal["text", "json"]


def counted(count: int, noun: str, plural: str = "") -> str:
    """``"1 phone"``, ``"3 phones"``: a count and its noun in the right number, for log lines and
    command output (``plural`` when adding ``s`` is wrong)."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def _message(record: logging.LogRecord) -> str:
    return url_for_log(record.getMessage())


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(_escape_control, _message(record))
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _continuation(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _continuation(super().formatStack(stack_info))


def _continuation(text: str) -> str:
    # A traceback spans lines by design, and its last line quotes the exception's message, which
    # may hold event data. Indented, no line of it can pass for a record of its own.
    return "\n".join(
        "    " + _CONTROL.sub(_escape_control, url_for_log(line)) for line in text.splitlines()
    )


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _message(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(fmt: LogFormat = "text", level: str = "info") -> None:
    """Send every log record to stdout in ``fmt`` at ``level``; called once by commands."""
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's per-request lines would double our own; keep its warnings and errors.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


class LogLimiter:
    """Whether to log for a key now: at most once per ``interval`` per key, with at most
    ``size`` keys remembered. When the table is full of keys still within their interval, new
    keys share one overflow slot, so a flood of distinct keys costs one line per interval.
    After :meth:`allow` says yes, :attr:`suppressed` is how many times it said no for that key
    since its previous line, for the line to say so."""

    _OVERFLOW: Final = "\x00overflow"

    def __init__(
        self, interval: float, size: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._size = size
        self._clock = clock
        #: key -> (when it was last allowed, refusals since)
        self._last: dict[str, tuple[float, int]] = {}
        self._pruned_at = -math.inf
        self.suppressed = 0

    def allow(self, key: str) -> bool:
        now = self._clock()
        if key not in self._last and len(self._last) >= self._size:
            # Pruning walks the whole table: at most once a second, not per call of a flood.
            if now - self._pruned_at >= 1.0:
                self._pruned_at = now
                cutoff = now - self._interval
                self._last = {k: v for k, v in self._last.items() if v[0] > cutoff}
            if len(self._last) >= self._size:
                key = self._OVERFLOW
        last, refused = self._last.get(key, (-math.inf, 0))
        if now - last < self._interval:
            self._last[key] = (last, refused + 1)
            return False
        self._last[key] = (now, 0)
        self.suppressed = refused
        return True
