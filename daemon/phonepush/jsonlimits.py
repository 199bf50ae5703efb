"""JSON from outside the process, decoded within bounds on size and nesting depth.

The standard decoder recurses once per nesting level, so a 2 KB document of ``[[[[…`` raises
:class:`RecursionError` (a 500 with a traceback, or an event dropped as an intake failure)
instead of a clear refusal; and how deep it gets before that depends on the stack it was called
from. :func:`loads` measures the depth before parsing and refuses with :class:`JsonTooDeep` —
a :class:`ValueError`, like malformed JSON, so every caller that already answers malformed
JSON with a 400 (or treats it as text) does the same for these.

Every decode of network data goes through here: webhook bodies, ``/api/silences``, event
payloads as rules and silences see them (:func:`phonepush.events.decode_payload`) and the
``fromjson`` template filter.
"""

from __future__ import annotations

import json
import re
from array import array
from itertools import accumulate
from typing import Any, Final

__all__ = ["MAX_DEPTH", "JsonLimitError", "JsonTooDeep", "JsonTooLarge", "json_depth", "loads"]

#: Nesting levels accepted. Alertmanager, Grafana and Home Assistant payloads nest about six
#: deep; the standard decoder gives up near a thousand, depending on the caller's stack.
MAX_DEPTH: Final = 64

# A complete JSON string literal (unrolled loop: linear, no backtracking between alternatives).
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Opening brackets become +1, closing -1 (as signed bytes), everything else is deleted.
_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS: Final = bytes(set(range(256)) - set(b"[]{}"))


class JsonLimitError(ValueError):
    """JSON refused for its size or depth, before being parsed."""


class JsonTooDeep(JsonLimitError):
    pass


class JsonTooLarge(JsonLimitError):
    pass


def json_depth(data: bytes) -> int:
    """How deep the arrays and objects of ``data`` nest (0 for a scalar), brackets inside
    strings not counted. Exact for valid JSON; for invalid JSON an estimate, which is fine: it
    is refused either way."""
    outside_strings = _STRING.sub(b"", data) if b'"' in data else data
    steps = array("b", outside_strings.translate(_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0)


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH, max_bytes: int | None = None) -> Any:
    """``json.loads(data)``, refusing with :class:`JsonTooLarge` past ``max_bytes`` and with
    :class:`JsonTooDeep` past ``max_depth`` levels (both :class:`ValueError`)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if max_bytes is not None and len(raw) > max_bytes:
        raise JsonTooLarge(f"JSON over the {max_bytes}-byte limit")
    # Cheap first: fewer brackets than the limit cannot nest past it.
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(raw) > max_depth:
        raise JsonTooDeep(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except RecursionError:
        # Within the limit but called from a deep stack already: still a refusal, not a crash.
        raise JsonTooDeep(f"JSON nested too deep to decode here (limit {max_depth})") from None
