"""Fixtures for simulated phones (filled in with the simulator)."""
