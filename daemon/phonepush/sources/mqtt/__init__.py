"""The MQTT source: a connection shaped like aiomqtt's ``Client`` (:mod:`.connection`: paho on
the event loop, reconnects, session, subscriptions, publishes, manual acks) and the source that
turns its messages into committed events (:mod:`.source`)."""

from __future__ import annotations

from phonepush.sources.mqtt.connection import packet_cap, publish_once, reconnect_delay
from phonepush.sources.mqtt.source import MqttSource

__all__ = ["MqttSource", "packet_cap", "publish_once", "reconnect_delay"]
