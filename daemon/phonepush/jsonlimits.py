"""JSON from outside the process, decoded within a bound on nesting depth.

The standard decoder recurses once per nesting level, so a 2 KB document of ``[[[[…`` raises
:class:`RecursionError` (a 500 with a traceback, or an event dropped as an intake failure)
instead of a clear refusal; and how deep it gets before that depends on the stack it was called
from. :func:`loads` measures the depth before parsing and refuses with :class:`JsonTooDeep` —
a :class:`ValueError`, like malformed JSON, so every caller that already answers malformed
JSON with a 400 (or treats it as text) does the same for these.

Every decode of network data goes through here: webhook bodies, ``/api/silences``, event
payloads as rules and silences see them (:func:`phonepush.events.decode_payload`) and the
``fromjson`` template filter. Their sizes are bounded before they get here, where the bytes
arrive: ``server.max_body`` (413), the silences API's 64 KiB (413), MQTT's payload limit.
"""

from __future__ import annotations

import json
import re
from array import array
from itertools import accumulate
from typing import Any, Final

__all__ = ["MAX_DEPTH", "JsonTooDeep", "json_depth", "loads"]

#: Nesting levels accepted. Alertmanager, Grafana and Home Assistant payloads nest about six
#: deep; the standard decoder gives up near a thousand, depending on the caller's stack.
MAX_DEPTH: Final = 64

# A complete JSON string literal (unrolled loop: linear, no backtracking between alternatives).
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Opening brackets become +1, closing -1 (as signed bytes), everything else is deleted.
_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS: Final = bytes(set(range(256)) - set(b"[]{}"))


class JsonTooDeep(ValueError):
    """JSON refused for its depth, before being parsed."""


def json_depth(data: bytes) -> int:
    """How deep the arrays and objects of ``data`` nest (0 for a scalar), brackets inside
    strings not counted. Exact for valid JSON; for invalid JSON an estimate, which is fine: it
    is refused either way."""
    outside_strings = _STRING.sub(b"", data) if b'"' in data else data
    steps = array("b", outside_strings.translate(_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0)


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(data)``, refusing with :class:`JsonTooDeep` (a :class:`ValueError`) past
    ``max_depth`` levels."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    # Cheap first: fewer brackets than the limit cannot nest past it.
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(raw) > max_depth:
        raise JsonTooDeep(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except RecursionError:
        # Within the limit but called from a deep stack already: still a refusal, not a crash.
        raise JsonTooDeep(f"JSON nested too deep to decode here (limit {max_depth})") from None
