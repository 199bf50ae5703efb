"""The event: what a source hands to intake, whatever it came from."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from phonepush import jsonlimits

__all__ = ["Event", "Source", "decode_payload", "new_event_id"]

#: Where an event comes from. ``console`` is a page sent by hand (the console's test page,
#: :mod:`phonepush.pipeline.direct`): no rule matches it, it names its own phones.
Source = Literal["mqtt", "webhook", "schedule", "console"]


def new_event_id() -> str:
    """A time-ordered, unguessable id: 12 hex digits of milliseconds, then 16 random hex digits.

    Unguessable because page and acknowledgement URLs handed to phones derive from it.
    """
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class Event:
    """One received event.

    ``topic`` is the MQTT topic, the hook name for a webhook (``POST /hooks/<name>``), or the
    schedule's name for a ``[[schedules]]`` firing.
    ``payload`` is kept as bytes; rules see :func:`decode_payload` of it.
    """

    source: Source
    topic: str
    payload: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    id: str = field(default_factory=new_event_id)
    received_at: float = field(default_factory=time.time)

    @property
    def key(self) -> str:
        """How rules name this event's origin: ``mqtt:<topic>``, ``webhook:<name>``
        or ``schedule:<name>``."""
        return f"{self.source}:{self.topic}"


def decode_payload(payload: bytes) -> Any:
    """What rules see as ``payload``: parsed JSON when the body is JSON, else the text.

    Bytes that are not UTF-8 are decoded with replacement characters rather than refused: the
    event still reaches rules, and nothing in it can break the XML we build later. JSON nested
    deeper than :data:`phonepush.jsonlimits.MAX_DEPTH` is treated like malformed JSON: the text.
    """
    text = payload.decode("utf-8", errors="replace")
    stripped = text.strip()
    if (
        stripped[:1] in ("{", "[", '"')
        or stripped in ("true", "false", "null")
        or _numeric(stripped)
    ):
        try:
            return jsonlimits.loads(stripped)
        except ValueError:
            return text
    return text


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
