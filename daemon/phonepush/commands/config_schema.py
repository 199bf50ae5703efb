"""``phonepush config-schema [--markdown]``: the configuration's JSON Schema, or its reference page.

The schema is pydantic's for :class:`phonepush.config.Config`, adjusted to say what the models'
validators accept: durations are a number of seconds *or* a string such as ``"5m"``; secrets are
``writeOnly`` with ``format: password`` on the key itself and never carry a default. Each key's
``#:`` comment in ``config.py`` becomes its description.

``--markdown`` prints ``docs/config.md`` (``phonepush config-schema --markdown > docs/config.md``);
a test fails when the file in the repository differs from what this prints.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, Final

from pydantic import BaseModel, SecretStr

from phonepush.config import Config, format_duration, parse_duration

__all__ = ["NOTES", "config_schema", "main", "markdown"]

_FIELD_LINE: Final = re.compile(r"^\s+(\w+)\s*:")
_ROLE: Final = re.compile(r":(?:class|mod|func|data|meth):(`+[^`]+`+)")
_OWN_NAME: Final = re.compile(r"^``\[\[?[\w.]+\]\]?``[:.]\s*")
_SCHEMA_URI: Final = "https://json-schema.org/draft/2020-12/schema"
_DURATION_SCHEMA: Final = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d)?\s*$"},
    ]
}


#: Descriptions of keys whose model has no ``#:`` comment for them, by ``Model.key``. A test
#: checks each still names a field, so a renamed key cannot leave a stale line behind.
NOTES: Final[dict[str, str]] = {
    "ServerConfig.listen": "HOST:PORT the HTTP side listens on. Not loopback: `webhook.token` "
    "is then required.",
    "ServerConfig.public_url": "The URL phones fetch pages (and `/authenticate`) from; default "
    "`http://<listen>`; required when `listen` is a wildcard address.",
    "ServerConfig.max_body": "Largest webhook body accepted, in bytes (413 beyond).",
    "SpoolConfig.path": "The SQLite file (WAL) accepted events and deliveries wait in.",
    "SpoolConfig.max_pending": "Deliveries waiting at most; beyond it events are refused (503, "
    "MQTT left unacknowledged).",
    "SpoolConfig.synchronous": "`full` also survives power loss, at a cost per event.",
    "SpoolConfig.password": "With `url`: the database password (or `password_file`, "
    "`PHONEPUSH_SPOOL__PASSWORD`).",
    "SpoolConfig.password_file": "File holding the database password.",
    "MqttConfig.url": "`mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]` (TLS); no credentials in "
    "the URL.",
    "MqttConfig.username": "Broker user name; empty: anonymous.",
    "MqttConfig.password": "The broker password (or `password_file`, `PHONEPUSH_MQTT__PASSWORD`).",
    "MqttConfig.password_file": "File holding the broker password.",
    "MqttConfig.client_id": "Default `phonepush-<host name>`; the persistent session is kept "
    "under it.",
    "MqttConfig.share_group": "Subscribe as `$share/<group>/...` so several daemons split the "
    "messages.",
    "MqttConfig.ca_file": "CA certificate(s) to verify an `mqtts://` broker with.",
    "MqttConfig.cert_file": "Client certificate (with `key_file`).",
    "MqttConfig.qos": "QoS of the subscriptions; 1 or 2 for at-least-once.",
    "MqttConfig.status_topic": "Retained `online`/`offline` (last will) status.",
    "MqttConfig.outcome_topic": "When set, each finished delivery is published here.",
    "WebhookConfig.token": "Bearer token `/hooks/*` require (`Authorization: Bearer ...`); "
    "required when listening beyond loopback.",
    "WebhookConfig.token_file": "File holding the token.",
    "WebhookConfig.hmac_secret": "When set, hooks also need `X-Phonepush-Signature-256: "
    "sha256=<hex HMAC-SHA256 of the body>`.",
    "WebhookConfig.hmac_secret_file": "File holding the HMAC secret.",
    "PhoneConfig.name": "The phone's name in rules' `to` and in metrics.",
    "PhoneConfig.host": "`HOST[:PORT]` of the phone's web server.",
    "PhoneConfig.scheme": "Default `https` when `certificate` or `ca_file` is set, else `http`.",
    "PhoneConfig.username": "HTTP Basic user for pushes (checked by the phone's authentication "
    "URL).",
    "PhoneConfig.password": "HTTP Basic password for pushes.",
    "PhoneConfig.password_file": "File holding the phone's password.",
    "PhoneConfig.certificate": "The phone's own certificate, pinned (HTTPS; the host name is "
    "not checked).",
    "PhoneConfig.timeout": "Per request; `Play:` holds the answer until the tone ends, so keep "
    "it ≥ 10s.",
    "PhoneConfig.groups": "Groups this phone belongs to, for rules' `to`.",
    "RuleConfig.name": "Names the rule in logs, metrics and errors.",
    "RuleConfig.on": "`mqtt:<topic filter>` or `webhook:<name>` (`POST /hooks/<name>`).",
    "RuleConfig.when": "Template expression; the rule fires only when it is true.",
    "RuleConfig.to": "Phone names, group names, or `all`.",
    "RuleConfig.execute": "CGI Execute URIs (templates), each optionally `@PRIORITY`; empty "
    "results are left out.",
    "RuleConfig.priority": "0 now, 1 when idle, 2 only if idle.",
    "RuleConfig.ringtone": "URL of a ring tone to set (template).",
    "RuleConfig.dedupe": "Template: events with the same key within `cooldown` page once.",
    "RuleConfig.cooldown": "After a page, the same rule (and `dedupe` key) stays quiet this long.",
    "RuleConfig.ttl": "A delivery not done by then expires instead of ringing late.",
    "RuleConfig.retry_unconfirmed": "Send again a request the phone got but did not answer "
    "(timeout, reset, garbage). Only for content that does no harm twice (`Display:`, text "
    "pages): a `Dial:` or `Play:` could run twice. Off: such a delivery ends `unconfirmed`.",
    "RuleConfig.repeat": "Push an unacknowledged page again this often.",
    "RuleConfig.max_repeats": "At most this many repeats (default 5 with `repeat`).",
    "RuleConfig.resolve_when": "Template expression: a later event for which it holds resolves "
    "the earlier pages.",
    "RuleConfig.ack": "Pages carry Ack/Close softkeys (default: on for repeating pages).",
    "RuleConfig.ack_scope": "`any`: one phone's ack stops every phone's repeats; `phone`: each "
    "phone acks itself.",
    "RuleConfig.group_by": "Templates: events with the same values in `group_wait` share one page.",
    "RuleConfig.group_wait": "Collect a group's events this long (default 30s with `group_by`).",
    "RuleConfig.actions": "Softkeys on the page that act (at most 4, beside Ack/Close): each "
    "one of `mqtt`, `webhook` or `dial`; needs `message`.",
    "RuleConfig.action_ttl": "How long after the event the action softkeys work; then they show "
    "an expired page.",
    "ActionConfig.label": "The softkey's name; also the `action` label of "
    "`phonepush_actions_total`.",
    "ActionConfig.confirm": "The first press asks `LABEL?` with Yes/No; only Yes acts.",
    "ActionConfig.repeatable": 'Usable more than once (else a second press shows "already done").',
    "ActionConfig.dial": "A number the phone dials itself (softkey URL `Dial:NUMBER`).",
    "ActionMqttConfig.topic": "Template; where the message is published (no wildcards).",
    "ActionMqttConfig.payload": "Template; the message.",
    "ActionWebhookConfig.url": "Template; an http(s) URL, called with a 5 s timeout.",
    "ActionWebhookConfig.body": "Template; the request body (none when empty).",
    "ActionWebhookConfig.headers": "Request headers (kept in the spool with the page).",
    "MessageConfig.title": "Page title (≤ 32 characters shown).",
    "MessageConfig.text": "Page text (cut, marked ..., beyond what a page takes).",
    "MessageConfig.prompt": "Status-line prompt.",
    "EscalateConfig.after": "Unacknowledged rounds before escalating.",
    "EscalateConfig.to": "Phones, groups or `all` repeats also go to then.",
    "DispatchConfig.concurrency": "Phones pushed to at once.",
    "DispatchConfig.max_connections": "Open phone connections at most; beyond, the least "
    "recently used idle one is closed. Default: half the open-files limit at start (512 under "
    "the usual 1,024).",
    "DispatchConfig.retry_initial": "First retry delay after a transient failure (jittered, "
    "doubling).",
    "DispatchConfig.retry_max": "Longest retry delay.",
    "HealthConfig.interval": "How often each phone is probed (`GET /DeviceInformationX`, else a "
    "TCP connect), spread over the interval, in its lane (never during a push to it); a push "
    "counts as a probe. `0`: off.",
    "AckConfig.webhook_timeout": "Timeout of that POST.",
    "AuthUserConfig.name": "The `UserID` a phone forwards.",
    "AuthUserConfig.password": "Its password.",
    "AuthUserConfig.password_file": "File holding the password.",
    "AuthenticationConfig.users": "Accepted users, besides the phones' own credentials.",
    "AuthenticationConfig.failure_window": "How long failures count towards `max_failures`.",
}


def _models(root: type[BaseModel]) -> Iterator[type[BaseModel]]:
    """``root`` and every model reachable through its fields, each once."""
    seen: set[type[BaseModel]] = set()
    stack = [root]
    while stack:
        model = stack.pop()
        if model in seen:
            continue
        seen.add(model)
        yield model
        for field in model.model_fields.values():
            stack.extend(_nested_models(field.annotation))


def _nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _nested_models(arg)


def _is_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and any(
        _is_secret(a) for a in typing.get_args(annotation)
    )


def _has_duration(annotation: Any) -> bool:
    metadata = getattr(annotation, "__metadata__", ())
    if any(getattr(m, "func", None) is parse_duration for m in metadata):
        return True
    return any(_has_duration(a) for a in typing.get_args(annotation))


def _is_duration(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields[name]
    metadata = field.metadata
    return any(getattr(m, "func", None) is parse_duration for m in metadata) or _has_duration(
        field.annotation
    )


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """The ``#:`` comment lines right above each field in the model's source."""
    try:
        lines = inspect.getsource(model).splitlines()
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    pending: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = _FIELD_LINE.match(line)
        if match and pending and match.group(1) in model.model_fields:
            found[match.group(1)] = " ".join(pending)
        pending = []
    return found


def config_schema() -> dict[str, Any]:
    """The JSON Schema of ``phonepush.toml``."""
    schema = Config.model_json_schema()
    definitions: dict[str, Any] = schema.get("$defs", {})
    for model in _models(Config):
        target = schema if model is Config else definitions.get(model.__name__)
        if target is None:
            continue
        properties: dict[str, Any] = target.get("properties", {})
        comments = _comments(model)
        for name, field in model.model_fields.items():
            prop = properties.get(field.alias or name)
            if prop is None:
                continue
            note = comments.get(name) or NOTES.get(f"{model.__name__}.{name}")
            if note and "description" not in prop:
                prop["description"] = note
            if _is_secret(field.annotation):
                prop.pop("default", None)
                prop.update(writeOnly=True, format="password")
            if _is_duration(model, name):
                optional = field.default is None
                for key in ("type", "anyOf", "minimum", "exclusiveMinimum"):
                    prop.pop(key, None)
                kinds = [*_DURATION_SCHEMA["anyOf"], *([{"type": "null"}] if optional else [])]
                prop["anyOf"] = kinds
                if isinstance(prop.get("default"), int | float):
                    prop["default"] = format_duration(float(prop["default"]))
            if (
                "default" not in prop
                and field.default_factory is not None
                and not field.is_required()
            ):
                made = field.default_factory()  # type: ignore[call-arg]
                # Lists and tables are shown; a computed scalar (the host name) is not.
                if isinstance(made, list):
                    prop["default"] = made
    return {"$schema": _SCHEMA_URI, "title": "phonepush.toml", **schema}


# --- markdown ------------------------------------------------------------------------------------

_INTRO: Final = """\
# Configuration reference

<!-- Generated by `phonepush config-schema --markdown > docs/config.md`; do not edit by hand:
     tests/test_config_schema.py fails when this file and the models disagree. -->

phonepush reads one TOML file (`phonepush run --config FILE`, default
`/etc/phonepush/phonepush.toml` or `$PHONEPUSH_CONFIG`). `phonepush check --config FILE`
validates it and prints what it sets up; `phonepush config-schema` prints the JSON Schema this
page is generated from (for editors and CI checks).

* **Unknown keys are errors**, so a typo cannot silently switch a feature off.
* **Environment variables** override the file: `PHONEPUSH_` plus the key path joined with `__`,
  e.g. `PHONEPUSH_MQTT__PASSWORD`, `PHONEPUSH_WEBHOOK__TOKEN`, `PHONEPUSH_SERVER__LISTEN`.
* **Secrets** (marked *secret*) may instead be read from a file: `password_file`, `token_file`,
  `hmac_secret_file`. A relative name is looked up in `$CREDENTIALS_DIRECTORY` (systemd
  `LoadCredential=`) first, then next to the config file; a final newline is dropped. Secrets
  never appear in messages, logs or `phonepush check` output.
* **Durations** are a number of seconds or a string: `"500ms"`, `"15s"`, `"5m"`, `"1h"`, `"1d"`.
* **Templates**: rule keys marked *template* are Jinja2 (sandboxed) with `payload`, `topic`,
  `event` and friends; see the integration guides in `docs/integrations/` for worked examples.
  `payload.items` is the event's key `items`, never the dict method (call `payload.items()` for
  that). In URL templates (`execute` items written as `http(s)://...`, `background`, `ringtone`)
  every `{{ value }}` is URL-encoded unless written `{{ value | safe_url }}`, and a rendered URL
  must keep the scheme, host and port the rule wrote, else that delivery fails saying so.

Sections: {sections}
"""


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str):
        resolved: dict[str, Any] = schema["$defs"][ref.rsplit("/", 1)[1]]
        return resolved
    return node


def _object_of(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any] | None:
    """The object schema ``node`` holds (directly, in an anyOf, or as array items), if any."""
    node = _resolve(schema, node)
    if node.get("type") == "object" and "properties" in node:
        return node
    for option in node.get("anyOf", []):
        found = _object_of(schema, option)
        if found is not None:
            return found
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        return _object_of(schema, node["items"])
    return None


def _type(schema: dict[str, Any], node: dict[str, Any]) -> str:
    if node.get("format") == "password":
        return "secret string"
    node = _resolve(schema, node)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if any(o.get("pattern", "").endswith("(ms|s|m|h|d)?\\s*$") for o in options):
            return "duration"
        return " or ".join(dict.fromkeys(_type(schema, o) for o in options))
    if "enum" in node:
        return " or ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    kind = node.get("type")
    if kind == "array":
        items = node.get("items", {})
        return f"list of {_type(schema, items)}" if items else "list"
    if kind == "object":
        return "table" if "title" not in node else f"table ({node['title']})"
    names = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}
    text = names.get(str(kind), str(kind))
    limits = [
        f"{sign} {node[key]}"
        for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"))
        if key in node
    ]
    if "minLength" in node or "maxLength" in node:
        limits.append(f"{node.get('minLength', 0)}–{node.get('maxLength', '…')} characters")
    return f"{text} ({', '.join(limits)})" if limits else text


def _default(node: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in node:
        return "computed" if node.get("format") != "password" else "unset"
    value = node["default"]
    if value is None:
        return "unset"
    if value in ("", [], {}):
        return f"`{json.dumps(value)}`"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _prose(text: str) -> str:
    """A docstring as Markdown: Sphinx roles dropped, the section's own name not repeated."""
    text = _ROLE.sub(r"\1", inspect.cleandoc(text))
    return _OWN_NAME.sub("", text)


def _table(schema: dict[str, Any], obj: dict[str, Any], path: str) -> list[str]:
    required = set(obj.get("required", []))
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, node in obj.get("properties", {}).items():
        description = node.get("description", "")
        if not description and _object_of(schema, node) is not None:
            description = f"see [`{path}.{key}`](#{_anchor(f'{path}.{key}')})"
        description = _prose(description)
        lines.append(
            f"| `{key}` | {_cell(_type(schema, node))} | {_cell(_default(node, key in required))} "
            f"| {_cell(description)} |"
        )
    return lines


def _section(schema: dict[str, Any], path: str, node: dict[str, Any], depth: int) -> list[str]:
    obj = _object_of(schema, node)
    assert obj is not None
    resolved = _resolve(schema, node)
    array = resolved.get("type") == "array"
    heading = f"[[{path}]]" if array else f"[{path}]" if depth == 2 else path
    lines = ["", f"{'#' * depth} `{heading}`", ""]
    if description := _prose(obj.get("description", "")):
        lines += [description[:1].upper() + description[1:], ""]
    if depth == 2 and any(o.get("type") == "null" for o in node.get("anyOf", [])):
        lines += ["Optional section: leave it out to turn the feature off.", ""]
    lines += _table(schema, obj, path)
    for key, child in obj.get("properties", {}).items():
        if _object_of(schema, child) is not None:
            lines += _section(schema, f"{path}.{key}", child, min(depth + 1, 4))
    return lines


def markdown(schema: dict[str, Any] | None = None) -> str:
    """``docs/config.md``: the reference page generated from :func:`config_schema`."""
    schema = config_schema() if schema is None else schema
    top: dict[str, Any] = schema["properties"]
    sections = ", ".join(f"[`{key}`](#{_anchor(key)})" for key, node in top.items())
    lines = [_INTRO.replace("{sections}", sections).rstrip("\n")]
    for key, node in top.items():
        lines += _section(schema, key, node, 2)
    return "\n".join(lines).replace("``", "`") + "\n"


def _anchor(key: str) -> str:
    # GitHub's anchor for a heading such as "`[[phones]]`" or "`rules.message`": punctuation
    # dropped.
    return re.sub(r"[^a-z0-9_-]", "", key.lower())


def main(argv: Sequence[str], prog: str = "phonepush config-schema") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Print the JSON Schema of phonepush.toml (or, with --markdown, the "
        "configuration reference page).",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print docs/config.md instead of the schema"
    )
    args = parser.parse_args(list(argv))
    if args.markdown:
        sys.stdout.write(markdown())
    else:
        sys.stdout.write(json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n")
    return 0
