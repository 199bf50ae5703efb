"""``phonepush fire --config F (--mqtt TOPIC | --hook NAME) PAYLOAD [--dry-run]``, or
``phonepush fire --config F --schedule NAME --dry-run``.

With ``--dry-run``: which rules match the event and the exact requests each phone would get,
computed by the daemon's own intake code and pipeline builder; nothing is sent or stored
(cooldowns are not consulted). Without it: the event is injected the way a real sender would,
so the running daemon handles it: published to the configured broker (QoS 1), or POSTed to the
daemon's webhook with the configured token. A schedule's firing (the next one due) can only be
shown: it fires in the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import httpx

from phonepush import jsonlimits
from phonepush.app.builder import Services, build
from phonepush.commands import CONFIG_EXIT, add_config_option, bearer, daemon_url, load_or_report
from phonepush.config import Config
from phonepush.errors import PhonepushError
from phonepush.events import Event
from phonepush.metrics import Metrics
from phonepush.pipeline.intake import Intake, Plan, PlannedRule
from phonepush.redact import url_for_log
from phonepush.sources.schedule import firing_event
from phonepush.store.spool import Spool

__all__ = ["main"]

#: Shown where each phone's own token goes (as in the softkeys' ``/ack/<token>``).
_PLACEHOLDER: Final = "<token>"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Show what an event would do, or inject it into the daemon."
    )
    add_config_option(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mqtt", metavar="TOPIC", help="an MQTT message on TOPIC")
    source.add_argument("--hook", metavar="NAME", help="a webhook POST /hooks/NAME")
    source.add_argument(
        "--schedule", metavar="NAME", help="the next firing of [[schedules]] NAME (--dry-run)"
    )
    parser.add_argument(
        "payload", metavar="PAYLOAD", nargs="?", help="the message body (JSON or text)"
    )
    parser.add_argument("--dry-run", action="store_true", help="show, do not send")
    return parser


def main(argv: Sequence[str], prog: str = "phonepush fire") -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.schedule is not None and (args.payload is not None or not args.dry_run):
        parser.error(
            "--schedule takes no PAYLOAD and needs --dry-run (schedules fire in the daemon)"
        )
    if args.schedule is None and args.payload is None:
        parser.error("PAYLOAD is required with --mqtt or --hook")
    config = load_or_report(args.config)
    if config is None:
        return CONFIG_EXIT
    if args.schedule is not None:
        schedule = next((s for s in config.schedules if s.name == args.schedule), None)
        if schedule is None:
            print(f"fire: no schedule named {args.schedule!r}", file=sys.stderr)
            return 1
        event = firing_event(schedule, schedule.timetable.next_after(time.time()))
    else:
        payload = args.payload.encode()
        event = (
            Event("mqtt", args.mqtt, payload) if args.mqtt else Event("webhook", args.hook, payload)
        )
    try:
        if args.dry_run:
            plan, hooks = asyncio.run(_plan(config, event))
            print(_describe(plan, config, hooks))
            return 0
        return asyncio.run(_inject(config, event))
    except PhonepushError as exc:
        print(f"fire: {exc}", file=sys.stderr)
        return 1


async def _plan(config: Config, event: Event) -> tuple[Plan, frozenset[str]]:
    """The event's plan, and the hooks the rules listen on."""
    with tempfile.TemporaryDirectory(prefix="phonepush-fire-") as tmp:
        async with Spool(Path(tmp) / "spool.db") as spool:
            metrics = Metrics()
            # The daemon's own builder: the plan is what the daemon would make of the event.
            services = Services(spool, metrics, submit=lambda deliveries: None, tokens=_token)
            built = build(config, services)
            intake = Intake(built.pipeline, spool, metrics=metrics, submit=lambda deliveries: None)
            return await intake.plan(event), built.pipeline.book.hooks


def _token() -> str:
    """The dry run's stand-in for each phone's token: it makes none, as it stores none."""
    return _PLACEHOLDER


def _describe(plan: Plan, config: Config, hooks: frozenset[str]) -> str:
    event = plan.event
    lines = [f"event {event.key} ({len(event.payload)} bytes)"]
    if event.source == "webhook" and event.topic not in hooks:
        # What the daemon answers such a POST (404), word for word.
        lines.append(f"  no rule listens on webhook:{event.topic}")
    elif not plan.rules:
        lines.append("  no rule matches")
    targets = config.phone_targets()
    for rule in plan.rules:
        lines.append(
            f"rule {rule.rule}: {rule.state}"
            + (f" ({rule.error})" if rule.error else "")
            + f", {len(rule.phones)} phone(s)"
        )
        if rule.state == "pending" and not rule.requests:
            # An audio-only rule: its page is played, nothing is pushed as XML.
            lines.append(f"  audio page to {', '.join(rule.phones)}")
        # With acks or actions each phone gets its own page URL (its token says who pressed):
        # what the daemon would store for each phone, not the page shared by id.
        own = {a.phone: a.requests for a in rule.alert.phones} if rule.alert else {}
        for phone in rule.phones if rule.requests else ():
            target = targets[phone]
            lines.append(f"  {phone}: POST {target.scheme}://{target.authority}/CGI/Execute")
            for n, request in enumerate(own.get(phone, rule.requests), 1):
                lines.append(f"    request {n} ({request.kind}): XML={request.xml}")
        if rule.page_id:
            base = config.server.public_url.rstrip("/")
            alert = rule.alert
            mine = f"/{_PLACEHOLDER}" if alert and any(a.token for a in alert.phones) else ""
            lines.append(f"  page {base}/pages/{rule.page_id}{mine}:")
            lines.append(f"    {plan.pages[rule.page_id]}")
        lines.extend(_softkeys(rule, config.server.public_url.rstrip("/")))
    return "\n".join(lines)


def _softkeys(rule: PlannedRule, base: str) -> list[str]:
    """The softkeys each phone's own page gets when it fetches it (acks, actions)."""
    alert = rule.alert
    if alert is None or not alert.phones or alert.phones[0].token is None:
        return []
    first = alert.phones[0]
    lines = ["  softkeys added to each phone's page (each phone its own <token>):"]
    if first.with_ack:
        lines.append(f"    Ack -> {base}/ack/{_PLACEHOLDER}")
    for action in first.actions:
        spec = json.loads(action.spec)
        flags = [f for f in ("confirm", "repeatable") if getattr(action, f)]
        shown = f" ({', '.join(flags)})" if flags else ""
        if "dial" in spec:
            lines.append(f"    {action.label}{shown} -> Dial:{spec['dial']}")
            continue
        if "mqtt" in spec:
            does = f"publishes {spec['mqtt']['payload']!r} to {spec['mqtt']['topic']}"
        else:
            hook = spec["webhook"]
            does = f"{hook['method']} {url_for_log(hook['url'])}"
        lines.append(f"    {action.label}{shown} -> {base}/act/{_PLACEHOLDER}: {does}")
    lines.append("    Close -> SoftKey:Exit")
    return lines


async def _inject(config: Config, event: Event) -> int:
    if event.source == "webhook":
        url = f"{daemon_url(config)}/hooks/{event.topic}"
        headers = {"Content-Type": _content_type(event.payload), **bearer(config)}
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                answer = await client.post(url, content=event.payload, headers=headers)
        except httpx.HTTPError as exc:
            print(f"fire: cannot reach the daemon at {url}: {exc}", file=sys.stderr)
            return 1
        print(f"POST {url} -> {answer.status_code} {answer.text}")
        return 0 if answer.status_code == 202 else 1
    if config.mqtt is None:
        print("fire: the config has no [mqtt] section to publish to", file=sys.stderr)
        return 1
    from phonepush.sources.mqtt import publish_once

    await publish_once(config.mqtt, event.topic, event.payload)
    print(f"published {len(event.payload)} bytes to {event.topic} on {config.mqtt.endpoint}")
    return 0


def _content_type(payload: bytes) -> str:
    try:
        jsonlimits.loads(payload)
    except ValueError:
        return "text/plain; charset=utf-8"
    return "application/json"
