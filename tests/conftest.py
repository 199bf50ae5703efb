"""Shared fixtures live in one module per concern, loaded as plugins."""

pytest_plugins = [
    "_sim_fixtures",
    "_mqtt_fixtures",
    "_daemon_fixtures",
    "_pg_fixtures",
    "_cluster_fixtures",
]
