"""``phonepush config-schema``: the JSON Schema of phonepush.toml, and docs/config.md from it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from phonepush.commands.config_schema import NOTES, config_schema, markdown
from phonepush.config import Config

ROOT = Path(__file__).resolve().parent.parent
CONFIG_MD = ROOT / "docs" / "config.md"
EXAMPLES = [*sorted((ROOT / "config" / "examples").glob("*.toml")), ROOT / "config/phonepush.toml"]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return config_schema()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phonepush", "config-schema", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        resolved: dict[str, Any] = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
        return resolved
    return node


def _objects(schema: dict[str, Any], node: dict[str, Any]) -> list[dict[str, Any]]:
    node = _resolve(schema, node)
    found = [node] if "properties" in node else []
    for option in node.get("anyOf", []):
        found += _objects(schema, option)
    if isinstance(node.get("items"), dict):
        found += _objects(schema, node["items"])
    return found


def _unknown_keys(schema: dict[str, Any], node: dict[str, Any], data: Any, where: str) -> list[str]:
    """Keys in ``data`` the schema does not describe (recursively)."""
    if isinstance(data, list):
        return [
            problem
            for i, item in enumerate(data)
            for problem in _unknown_keys(schema, node, item, f"{where}[{i}]")
        ]
    if not isinstance(data, dict):
        return []
    objects = _objects(schema, node)
    if not objects:
        return [f"{where}: a table where the schema has none"]
    properties = objects[0]["properties"]
    problems = []
    for key, value in data.items():
        if key not in properties:
            problems.append(f"{where}.{key}")
        else:
            problems += _unknown_keys(schema, properties[key], value, f"{where}.{key}")
    return problems


def _secret_properties(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {}
    for name, definition in [("Config", schema), *schema["$defs"].items()]:
        for key, prop in definition.get("properties", {}).items():
            if key in ("password", "token", "hmac_secret"):
                found[f"{name}.{key}"] = prop
    return found


def test_the_command_prints_the_schema_as_json(schema: dict[str, Any]) -> None:
    done = _run()
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed == json.loads(json.dumps(schema))
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["additionalProperties"] is False
    assert {"server", "spool", "mqtt", "webhook", "phones", "rules", "authentication"} <= set(
        schema["properties"]
    )


def test_secrets_are_write_only_passwords_without_defaults(schema: dict[str, Any]) -> None:
    secrets = _secret_properties(schema)
    assert {
        "MqttConfig.password",
        "WebhookConfig.token",
        "WebhookConfig.hmac_secret",
        "PhoneConfig.password",
        "AuthUserConfig.password",
    } <= set(secrets)
    for where, prop in secrets.items():
        assert prop.get("writeOnly") is True, where
        assert prop.get("format") == "password", where
        assert "default" not in prop, where


def test_durations_take_numbers_and_strings(schema: dict[str, Any]) -> None:
    ttl = schema["$defs"]["RuleConfig"]["properties"]["ttl"]
    kinds = {option["type"] for option in ttl["anyOf"]}
    assert kinds == {"number", "string"}
    assert ttl["default"] == "5m"
    cooldown = schema["$defs"]["RuleConfig"]["properties"]["cooldown"]
    assert {option["type"] for option in cooldown["anyOf"]} == {"number", "string", "null"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_schema_describes_every_key_of_the_shipped_configs(
    path: Path, schema: dict[str, Any]
) -> None:
    data = tomllib.loads(path.read_text())
    assert _unknown_keys(schema, schema, data, "config") == []


def test_the_schema_knows_no_more_keys_than_the_models_accept(schema: dict[str, Any]) -> None:
    assert _unknown_keys(schema, schema, {"srever": {}}, "config") == ["config.srever"]
    assert list(schema["properties"]) == list(Config.model_fields)


def test_every_note_describes_an_existing_key(schema: dict[str, Any]) -> None:
    definitions = schema["$defs"]
    for key in NOTES:
        model, field = key.split(".")
        assert field in definitions[model]["properties"], key


def test_docs_config_md_is_generated_from_the_models(schema: dict[str, Any]) -> None:
    expected = markdown(schema)
    assert CONFIG_MD.read_text() == expected, (
        "docs/config.md is out of date: run "
        "`.venv/bin/python -m phonepush config-schema --markdown > docs/config.md`"
    )
    done = _run("--markdown")
    assert done.returncode == 0 and done.stdout == expected
    # Every key of every section is in the reference, secrets flagged as such.
    for definition in schema["$defs"].values():
        for key in definition.get("properties", {}):
            assert f"| `{key}` |" in expected, key
    assert "| `password` | secret string | unset |" in expected


def test_the_cli_reference_covers_every_command() -> None:
    from phonepush.cli import COMMANDS

    text = (ROOT / "docs" / "cli.md").read_text()
    headings = set(re.findall(r"^## phonepush (.+)$", text, re.M))
    covered = {name.strip() for heading in headings for name in heading.split(",")}
    assert set(COMMANDS) <= covered, set(COMMANDS) - covered


@pytest.mark.parametrize(
    "doc",
    [
        "install.md",
        "cli.md",
        "troubleshooting.md",
        "config.md",
        *(
            f"integrations/{n}"
            for n in (
                "zigbee2mqtt.md",
                "frigate.md",
                "alertmanager.md",
                "grafana.md",
                "home-assistant.md",
                "shelly-tasmota.md",
            )
        ),
    ],
)
def test_relative_links_in_the_docs_lead_somewhere(doc: str) -> None:
    path = ROOT / "docs" / doc
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / target).exists(), f"{doc}: broken link to {target}"
