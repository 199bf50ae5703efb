"""Home Assistant: phones, groups and acknowledging rules as devices and entities, by MQTT
discovery (``[homeassistant]``; docs/integrations/home-assistant.md)."""
