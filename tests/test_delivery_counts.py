"""``phonepush_deliveries_total`` counts every stored delivery once, by the state the spool
ends it in, whichever part of the daemon made it final: intake (cooldown, a URI that does not
validate), silences, the dispatcher (delivered, refused by the phone)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

import phonepush
from _daemon_fixtures import DaemonRunner, eventually
from _sim_fixtures import MakeFleet
from phonepush.store.records import Delivery, DeliveryState

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _counted(runner: DaemonRunner) -> Counter[tuple[str, str]]:
    counted: Counter[tuple[str, str]] = Counter()
    for family in runner.registry.collect():
        for sample in family.samples:
            if sample.name == "phonepush_deliveries_total" and sample.value:
                counted[sample.labels["phone"], sample.labels["result"]] += int(sample.value)
    return counted


async def test_every_stored_delivery_is_counted_once_by_its_final_state(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=3, names=["desk", "lobby", "broken"], tone_ms=10)
    await fleet.phone("broken").set_fault("error", number=4)
    running = await daemon_runner.start(
        {
            "webhook": {"token": TOKEN},
            "phones": [{"name": p.name, "host": p.address} for p in fleet.phones],
            "rules": [
                {
                    "name": "page",
                    "on": "webhook:ops",
                    "to": ["desk", "lobby", "broken"],
                    "message": {"title": "{{ payload.title }}"},
                },
                {
                    "name": "once",
                    "on": "webhook:ops",
                    "to": ["desk"],
                    "cooldown": "1h",
                    "message": {"title": "once: {{ payload.title }}"},
                },
                {
                    "name": "dial",
                    "on": "webhook:ops",
                    "to": ["desk"],
                    "execute": ["Dial:{{ payload.number }}"],
                },
            ],
        }
    )
    spool = running.spool
    payload: dict[str, Any] = {"title": "Boiler", "number": "not a number"}
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        made = await client.post(
            "/api/silences",
            json={
                "matchers": [{"name": "phone", "value": "lobby"}],
                "duration": "1h",
                "createdBy": "ops",
                "comment": "lobby closed",
            },
        )
        assert made.status_code == 201
        ids = []
        for _ in range(2):  # the second event finds "once" in its cooldown
            answer = await client.post("/hooks/ops", json=payload)
            assert answer.status_code == 202
            ids.append(answer.json()["event"])

    async def stored(event_id: str) -> list[Delivery]:
        record = await spool.events.get(event_id)
        assert record is not None
        return list(record.deliveries)

    async def finished() -> bool:
        deliveries = [d for i in ids for d in await stored(i)]
        return all(d.state != DeliveryState.PENDING for d in deliveries)

    await eventually(finished)
    second = {(d.rule, d.phone): (d.state, d.error) for d in await stored(ids[1])}
    assert {key: state for key, (state, _) in second.items()} == {
        ("page", "desk"): "delivered",
        ("page", "lobby"): "suppressed",
        ("page", "broken"): "failed",
        ("once", "desk"): "suppressed",
        ("dial", "desk"): "failed",
    }
    assert second["once", "desk"][1] == "cooldown"
    assert second["page", "lobby"][1].startswith("silenced by ")

    deliveries = await stored(ids[0]) + await stored(ids[1])
    counted = _counted(daemon_runner)
    assert sum(counted.values()) == len(deliveries) == 10
    assert counted == Counter((d.phone, str(d.state)) for d in deliveries)


def test_only_metrics_counts_deliveries() -> None:
    """One owner: a module that labels ``phonepush_deliveries_total`` itself could count a
    delivery another path already counted, or forget one; they go through ``Metrics.ended``."""
    package = Path(phonepush.__file__).parent
    counting = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "metrics.py" or path.parent != package
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute)
        and node.attr == "labels"
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "deliveries"
    ]
    assert counting == []
