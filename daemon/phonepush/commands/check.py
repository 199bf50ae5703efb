"""``phonepush check --config FILE [--probe]``: validate a configuration and print what it sets
up; with ``--probe`` also reach every phone.

Exit status 0 when the file is valid, 2 (with the problems on stderr, one a line) when not, 1
when ``--probe`` found a phone out of reach.
Nothing secret is printed: not passwords or tokens, and not the MQTT user name either.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from phonepush.audio.announce import compile_actions
from phonepush.commands import (
    CONFIG_EXIT,
    add_config_option,
    load_or_report,
    report_config_error,
)
from phonepush.config import Config, format_duration
from phonepush.errors import ConfigError
from phonepush.logs import counted
from phonepush.redact import url_for_log
from phonepush.rules.book import RuleBook

__all__ = ["files_and_credentials", "main", "summary"]


def main(argv: Sequence[str], prog: str = "phonepush check") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Validate a phonepush config file and print a summary."
    )
    add_config_option(parser)
    parser.add_argument(
        "--probe",
        action="store_true",
        help="also reach every phone and report the unreachable ones (exit 1 if any)",
    )
    args = parser.parse_args(list(argv))
    config = load_or_report(args.config)
    if config is None:
        return CONFIG_EXIT
    if problems := files_and_credentials(config):
        report_config_error(args.config, ConfigError("\n".join(problems)))
        return CONFIG_EXIT
    try:
        rules = RuleBook.compile(config)
        # Audio files are loaded as the daemon would, so a missing one is caught here too.
        compile_actions(config, base_dir=args.config.parent)
    except ConfigError as exc:
        report_config_error(args.config, exc)
        return CONFIG_EXIT
    print(summary(config, rules, args.config))
    if args.probe:
        return _probe(config)
    return 0


def _probe(config: Config) -> int:
    # Imported here: plain validation needs no phone client.
    from phonepush.commands.phones import probe_phones

    phones = asyncio.run(probe_phones(config))
    down = [p for p in phones if p["reachable"] is not True]
    print(f"probe: {len(phones) - len(down)} of {counted(len(phones), 'phone')} reachable")
    for phone in down:
        print(f"  {phone['name']} ({phone['host']}): unreachable: {phone['error']}")
    return 1 if down else 0


def files_and_credentials(config: Config) -> list[str]:
    """What the daemon would only find out at the first push or connection: a certificate file
    that is not there, a phone user without a password (the phone answers "Authentication
    error")."""
    problems: list[str] = []
    files: list[tuple[str, str | None]] = []
    for phone in config.phones:
        where = f"phones[{phone.name}]"
        files += [(f"{where}.certificate", phone.certificate), (f"{where}.ca_file", phone.ca_file)]
        if phone.username and phone.password is None:
            problems.append(
                f"{where}.password: username {phone.username!r} is set but no password; "
                "set password or password_file (or remove username)"
            )
    if config.mqtt is not None:
        mqtt = config.mqtt
        files += [("mqtt.ca_file", mqtt.ca_file), ("mqtt.cert_file", mqtt.cert_file)]
        files.append(("mqtt.key_file", mqtt.key_file))
    for key, path in files:
        if path is not None and not Path(path).is_file():
            problems.append(f"{key}: no such file: {path}")
    return problems


def summary(config: Config, rules: RuleBook, path: Path | None = None) -> str:
    """A human-readable description of ``config``, free of secrets."""
    lines = [f"{path}: OK" if path else "configuration: OK"]
    server = config.server
    lines.append(
        f"server: listening on {server.listen}, phones fetch pages from "
        f"{url_for_log(server.public_url)}, "
        f"webhook bodies up to {server.max_body} bytes"
    )
    spool = config.spool
    if spool.url:
        auth = "with a password" if spool.password is not None else "without a password"
        lines.append(
            f"spool: PostgreSQL at {url_for_log(spool.url)} ({auth}, pool of at most"
            f" {spool.pool_size} connections, at most {spool.max_pending} pending)"
        )
    else:
        lines.append(
            f"spool: {spool.path} (synchronous={spool.synchronous}, "
            f"at most {spool.max_pending} pending)"
        )
    if config.mqtt is None:
        lines.append("mqtt: off (no [mqtt] section)")
    else:
        mqtt = config.mqtt
        share = f", shared as $share/{mqtt.share_group}" if mqtt.share_group else ""
        auth = "with credentials" if mqtt.username or mqtt.password else "anonymous"
        lines.append(
            f"mqtt: {mqtt.endpoint} as {mqtt.client_id!r}, {auth}, MQTT {mqtt.protocol}, "
            f"QoS {mqtt.qos}{share}"
        )
        for topic_filter in rules.mqtt_filters:
            lines.append(f"  subscribes to {topic_filter}")
    ha = config.homeassistant
    if ha.enabled:
        lines.append(
            f"homeassistant: discovery under {ha.discovery_prefix}/<component>/{ha.node_id}/, "
            f"commands and states under {ha.node_id}/, pages titled {ha.title!r}"
        )
    webhook = config.webhook
    hooks = ", ".join(f"/hooks/{name}" for name in sorted(rules.hooks)) or "none"
    checks = [
        "bearer token" if webhook.token is not None else "no token (loopback only)",
        *(["HMAC signature"] if webhook.hmac_secret is not None else []),
    ]
    lines.append(f"webhook: {hooks}; requires {' and '.join(checks)}")
    lines.append(
        f"dispatch: {counted(config.dispatch.concurrency, 'push', 'pushes')} at once, retries "
        f"{format_duration(config.dispatch.retry_initial)}..."
        f"{format_duration(config.dispatch.retry_max)}"
    )

    lines.append(f"phones ({len(config.phones)}):")
    targets = config.phone_targets()
    for phone in config.phones:
        target = targets[phone.name]
        port = f":{target.port}" if target.port else ""
        pinned = " (pinned certificate)" if phone.certificate else ""
        groups = f"  groups: {', '.join(phone.groups)}" if phone.groups else ""
        lines.append(f"  {phone.name}: {target.scheme}://{target.host}{port}{pinned}{groups}")
    for group, members in config.groups().items():
        lines.append(f"  group {group}: {', '.join(members)}")

    lines.append(f"rules ({len(rules.rules)}):")
    for rule in rules.rules:
        cooldown = (
            f", cooldown {format_duration(rule.cooldown)}" if rule.cooldown is not None else ""
        )
        phones = ", ".join(rule.phones) or "no phones"
        lines.append(
            f"  {rule.name}: {rule.source}:{rule.pattern} -> {phones}"
            f" (ttl {format_duration(rule.ttl)}{cooldown}, priority {rule.priority})"
        )
        lines.extend(_actions(config, rule.name))
    if config.schedules:
        lines.append(f"schedules ({len(config.schedules)}):")
        now = time.time()
        for schedule in config.schedules:
            when = (
                f"every {format_duration(schedule.every)} (from the epoch, UTC)"
                if schedule.every is not None
                else f"cron {schedule.cron!r} in {schedule.timezone}"
            )
            lines.append(
                f"  {schedule.name}: {when}, "
                + (
                    f"catch_up {format_duration(schedule.catch_up)}"
                    if schedule.catch_up
                    else "missed firings skipped (no catch_up)"
                )
            )
            upcoming = schedule.timetable.upcoming(now, 3)
            lines.append(
                "    next: " + ", ".join(t.strftime("%a %Y-%m-%d %H:%M:%S %Z") for t in upcoming)
            )
    return "\n".join(lines)


def _actions(config: Config, name: str) -> list[str]:
    """A rule's action softkeys as written (templates unrendered), URLs without secrets."""
    rule = next((r for r in config.rules if r.name == name), None)
    if rule is None or not rule.actions:
        return []
    lines: list[str] = []
    for action in rule.actions:
        flags = [f for f in ("confirm", "repeatable") if getattr(action, f)]
        shown = f" ({', '.join(flags)})" if flags else ""
        if action.mqtt is not None:
            retain = ", retained" if action.mqtt.retain else ""
            what = f"mqtt {action.mqtt.topic} (QoS {action.mqtt.qos}{retain})"
        elif action.webhook is not None:
            what = f"webhook {action.webhook.method} {url_for_log(action.webhook.url)}"
        else:
            what = f"dial {action.dial}"
        lines.append(f"    action {action.label}{shown}: {what}")
    lines.append(f"    action softkeys work for {format_duration(rule.action_ttl)} after the event")
    return lines
