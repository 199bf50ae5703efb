"""Event sources: where events come from before intake (MQTT and schedules here; webhooks live
in the server)."""

from __future__ import annotations

__all__: list[str] = []
