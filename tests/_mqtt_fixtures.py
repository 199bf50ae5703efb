"""Fixtures for a real mosquitto broker (filled in with the MQTT source)."""
