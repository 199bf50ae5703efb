"""Event sources: where events come from before intake (MQTT here; webhooks live in the server)."""

from __future__ import annotations

__all__: list[str] = []
