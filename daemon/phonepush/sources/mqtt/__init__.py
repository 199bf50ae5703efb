"""The MQTT source: a connection shaped like aiomqtt's ``Client`` (:mod:`.connection`) and the
source that turns its messages into committed events (:mod:`.source`)."""

from __future__ import annotations

from phonepush.sources.mqtt.source import MqttSource, packet_cap, publish_once, reconnect_delay

__all__ = ["MqttSource", "packet_cap", "publish_once", "reconnect_delay"]
