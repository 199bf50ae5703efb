"""What Home Assistant is told: the retained discovery configs and the topics they name.

Pure: a configuration and what health knows of each phone in, ``{topic: payload}`` out, so the
publisher can compare one load's set with the next and send only the difference. The keys are
Home Assistant's documented MQTT discovery keys, written out (no abbreviations).

Topics (``<node_id>`` is ``[homeassistant] node_id``, a phone, group or rule name as written):

* ``<discovery_prefix>/<component>/<node_id>/<object_id>/config``: the entity configs;
* ``<node_id>/phone/<phone>/notify``, ``<node_id>/group/<group>/notify``: a message published here
  pages that phone or group (the rule ``homeassistant.notify.<name>``);
* ``<node_id>/phone/<phone>/test``: the "Test page" button (``homeassistant.test.<phone>``);
* ``<node_id>/phone/<phone>/connectivity``: ``ON``/``OFF``, retained, from the health probes;
* ``<node_id>/rule/<rule>/acknowledged``: ``{"event_type": "acknowledged", ...}`` per ack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Final, Protocol

from phonepush import __version__
from phonepush.config import Config, HomeAssistantConfig, discovery_id
from phonepush.wire.cisco import DeviceInfo

__all__ = [
    "ACKNOWLEDGED",
    "PhoneState",
    "ack_event",
    "ack_topic",
    "configs",
    "connectivity",
    "connectivity_topic",
]

#: The one event type of a rule's ack entity.
ACKNOWLEDGED: Final = "acknowledged"
_MAC: Final = re.compile(r"[0-9A-Fa-f]{2}(?:[:-]?[0-9A-Fa-f]{2}){5}")


class PhoneState(Protocol):
    """What health knows of one phone (:class:`phonepush.health.monitor.PhoneHealth`)."""

    name: str
    reachable: bool | None
    info: DeviceInfo | None


def connectivity_topic(ha: HomeAssistantConfig, phone: str) -> str:
    return f"{ha.node_id}/phone/{phone}/connectivity"


def ack_topic(ha: HomeAssistantConfig, rule: str) -> str:
    return f"{ha.node_id}/rule/{rule}/acknowledged"


def connectivity(reachable: bool) -> bytes:
    return b"ON" if reachable else b"OFF"


def ack_event(ack: dict[str, object]) -> bytes:
    """An ack (``{rule, event, phone, at}``) as the event entity's payload."""
    return _json({"event_type": ACKNOWLEDGED, **ack})


def configs(config: Config, phone_state: Callable[[str], PhoneState | None]) -> dict[str, bytes]:
    """Every discovery config of ``config``, by topic; empty when ``[homeassistant]`` is off."""
    ha = config.homeassistant
    if not ha.enabled or config.mqtt is None:
        return {}
    node = ha.node_id
    common: dict[str, Any] = {
        "origin": {
            "name": "phonepush",
            "sw_version": __version__,
            "support_url": config.server.public_url,
        },
        "qos": 1,
    }
    if config.mqtt.status_topic:
        # The daemon's own birth and will (retained "online"/"offline"): every entity is
        # unavailable while phonepush is away.
        common["availability"] = [
            {
                "topic": config.mqtt.status_topic,
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ]
    hub = {
        "identifiers": [node],
        "name": "phonepush" if node == "phonepush" else f"phonepush {node}",
        "manufacturer": "phonepush",
        "model": "phonepush",
        "sw_version": __version__,
        "configuration_url": config.server.public_url,
    }
    out: dict[str, bytes] = {}

    def put(component: str, object_id: str, entity: dict[str, Any]) -> None:
        topic = f"{ha.discovery_prefix}/{component}/{node}/{object_id}/config"
        out[topic] = _json({**entity, "unique_id": f"{node}_{object_id}", **common})

    for phone in config.phones:
        oid = f"phone_{discovery_id(phone.name)}"
        state = phone_state(phone.name)
        device = _phone_device(node, oid, phone.name, state.info if state is not None else None)
        put(
            "notify",
            oid,
            {
                "name": "Page",
                "icon": "mdi:message-text",
                "command_topic": ha.command_topic("phone", phone.name, "notify"),
                "device": device,
            },
        )
        put(
            "binary_sensor",
            f"{oid}_connectivity",
            {
                "name": "Reachable",
                "device_class": "connectivity",
                "state_topic": connectivity_topic(ha, phone.name),
                "payload_on": "ON",
                "payload_off": "OFF",
                "device": device,
            },
        )
        put(
            "button",
            f"{oid}_test",
            {
                "name": "Test page",
                "icon": "mdi:message-check",
                "command_topic": ha.command_topic("phone", phone.name, "test"),
                "payload_press": "PRESS",
                "device": device,
            },
        )
    for group in config.groups():
        put(
            "notify",
            f"group_{discovery_id(group)}",
            {
                "name": f"Page {group}",
                "icon": "mdi:message-text",
                "command_topic": ha.command_topic("group", group, "notify"),
                "device": hub,
            },
        )
    for rule in config.all_rules:
        if rule.acked:
            put(
                "event",
                f"rule_{discovery_id(rule.name)}_ack",
                {
                    "name": f"{rule.name} acknowledged",
                    "icon": "mdi:check-circle",
                    "state_topic": ack_topic(ha, rule.name),
                    "event_types": [ACKNOWLEDGED],
                    "device": hub,
                },
            )
    return out


def _phone_device(node: str, oid: str, name: str, info: DeviceInfo | None) -> dict[str, Any]:
    device: dict[str, Any] = {
        "identifiers": [f"{node}_{oid}"],
        "name": name,
        "manufacturer": "Cisco",
    }
    if info is not None:
        # Known once the health probe read the phone's /DeviceInformationX.
        if info.model:
            device["model"] = info.model
        if info.firmware:
            device["sw_version"] = info.firmware
        if _MAC.fullmatch(info.mac):
            hexes = re.sub(r"[:-]", "", info.mac).lower()
            mac = ":".join(hexes[i : i + 2] for i in range(0, 12, 2))
            device["connections"] = [["mac", mac]]
    return device


def _json(value: dict[str, Any]) -> bytes:
    # Sorted and compact: the same config is the same bytes, so "changed" is a comparison.
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")
