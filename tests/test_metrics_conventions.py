"""/metrics follows Prometheus conventions, and the shipped alert rules and Grafana dashboard use
only metrics phonepush exports. Checked with the real ``promtool`` (Debian package
``prometheus``) against a real daemon's exposition after real traffic."""

from __future__ import annotations

import asyncio
import json
import re
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from _daemon_fixtures import DaemonRunner, eventually, free_port
from _mqtt_fixtures import Broker
from _sim_fixtures import MakeFleet
from phonepush.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docs" / "prometheus" / "phonepush-alerts.yml"
ALERT_TESTS = ROOT / "docs" / "prometheus" / "phonepush-alerts.test.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "phonepush.json"
_METRIC = re.compile(r"\bphonepush_[a-z0-9_]+")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: these checks need it; install it with "
            "`apt-get install prometheus` (do not start the service it brings)"
        )
    return path


def _exported_names() -> set[str]:
    """Every sample name phonepush can expose (``_total``, ``_bucket``... included)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
    }
    names: set[str] = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


async def test_metrics_after_real_traffic_pass_promtool_check_metrics(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, mosquitto: Broker
) -> None:
    promtool = _promtool()
    fleet = await make_fleet(phones=2, names=["desk", "spare"], tone_ms=10)
    await daemon_runner.start(
        {
            "mqtt": {"url": mosquitto.url, "client_id": "metrics-test"},
            "authentication": {"users": [{"name": "push", "password": "pw"}]},
            "phones": [
                {"name": "desk", "host": fleet.phones[0].address},
                # Never pushed to: its health probes alone give it phone_up and phone_info.
                {"name": "spare", "host": fleet.phones[1].address},
                # Nothing listens there: pushes fail, retry, and expire.
                {"name": "gone", "host": f"127.0.0.1:{free_port()}", "timeout": "1s"},
            ],
            "rules": [
                {
                    "name": "bell",
                    "on": "webhook:bell",
                    "to": ["desk", "gone"],
                    "execute": ["Key:Headset"],
                    "ttl": "300ms",
                },
                {
                    "name": "btn",
                    "on": "mqtt:button/+",
                    "when": "payload.action != 'release'",
                    "to": ["desk"],
                    "execute": ["Key:Speaker"],
                },
            ],
        }
    )
    assert daemon_runner.daemon is not None
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.post("/hooks/bell", json={"x": 1})).status_code == 202
        bad = await client.post(
            "/hooks/bell", content=b"{", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400
        for password in ("pw", "wrong"):
            await client.get("/authenticate", params={"UserID": "push", "Password": password})
        # A release no rule takes: counted as unmatched (MQTT messages arrive in order).
        await asyncio.to_thread(mosquitto.publish, "button/hall", b'{"action": "release"}')
        await asyncio.to_thread(mosquitto.publish, "button/hall", b"{}")
        daemon_runner.daemon.reload()  # no config file: counted as a failed reload

        await eventually(
            lambda: (
                daemon_runner.metric("phonepush_deliveries_total", phone="gone", result="expired")
                == 1
                and daemon_runner.metric(
                    "phonepush_deliveries_total", phone="desk", result="delivered"
                )
                == 2
                and daemon_runner.metric("phonepush_config_reloads_total", result="error") == 1
                and daemon_runner.metric("phonepush_phone_up", phone="spare") == 1
            )
        )
        answer = await client.get("/metrics")
    assert answer.status_code == 200

    checked = subprocess.run(
        [promtool, "check", "metrics"], input=answer.content, capture_output=True, timeout=30
    )
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, b"")

    text = answer.text
    for sample in (
        'phonepush_events_total{rule="bell",source="webhook"} 1.0',
        'phonepush_events_rejected_total{reason="400",source="webhook"} 1.0',
        'phonepush_phone_up{phone="desk"} 1.0',
        'phonepush_phone_up{phone="gone"} 0.0',
        'phonepush_phone_up{phone="spare"} 1.0',
        'phonepush_phone_info{firmware="14.2(1)",model="CP-8841",phone="spare"} 1.0',
        'phonepush_phone_info{firmware="14.2(1)",model="CP-8841",phone="desk"} 1.0',
        "phonepush_mqtt_connected 1.0",
        "phonepush_mqtt_configured 1.0",
        "phonepush_mqtt_messages_total 2.0",
        'phonepush_events_unmatched_total{source="mqtt"} 1.0',
        'phonepush_events_total{rule="btn",source="mqtt"} 1.0',
        'phonepush_authenticate_total{result="authorized"} 1.0',
        'phonepush_authenticate_total{result="unauthorized"} 1.0',
        "phonepush_spool_pending 0.0",
    ):
        assert sample in text.splitlines(), sample
    assert re.search(r'^phonepush_delivery_retries_total\{phone="gone"\} [1-9]', text, re.M)
    assert re.search(r'^phonepush_delivery_duration_seconds_count\{phone="desk"\} 2', text, re.M)
    # The process metrics an operator watches the open-files limit with; the daemon here runs
    # in this test's process, so they describe it.
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert f"process_max_fds {float(soft_limit)}" in text.splitlines()
    open_fds = re.search(r"^process_open_fds (\d+\.\d+)$", text, re.M)
    assert open_fds and 0 < float(open_fds[1]) <= soft_limit
    assert re.search(r"^process_resident_memory_bytes \d", text, re.M)
    # Everything exposed is documented in the contract (Metrics), nothing else sneaks in.
    exposed = {m.group(0) for m in re.finditer(r"^phonepush_[a-z0-9_]+", text, re.M)}
    assert exposed <= _exported_names()


async def test_action_presses_are_counted_by_rule_action_and_result(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, mosquitto: Broker
) -> None:
    promtool = _promtool()
    fleet = await make_fleet(phones=1, names=["desk"], tone_ms=10)
    await daemon_runner.start(
        {
            "mqtt": {"url": mosquitto.url, "client_id": "metrics-actions"},
            "phones": [{"name": "desk", "host": fleet.phones[0].address}],
            "rules": [
                {
                    "name": "doorbell",
                    "on": "webhook:door",
                    "to": ["desk"],
                    "message": {"title": "Doorbell"},
                    "actions": [{"label": "Open", "mqtt": {"topic": "door/set", "payload": "1"}}],
                }
            ],
        }
    )
    desk = fleet.phone("desk")
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.post("/hooks/door", json={})).status_code == 202
        await eventually(lambda: any(k.name == "Open" for k in desk.state.screen.softkeys))
        page = desk.state.screen
        await desk.press(name="Open")
        desk.state.screen = page
        await desk.press(name="Open")
        answer = await client.get("/metrics")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=answer.content, capture_output=True, timeout=30
    )
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, b"")
    lines = answer.text.splitlines()
    for result in ("ok", "already_done"):
        sample = f'phonepush_actions_total{{action="Open",result="{result}",rule="doorbell"}} 1.0'
        assert sample in lines, sample
    assert "phonepush_actions_total" in _exported_names()


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = _promtool()
    checked = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_alerts_cover_the_issue_and_use_only_exported_metrics() -> None:
    text = ALERTS.read_text()
    alerts = re.findall(r"^\s*- alert: (\w+)", text, re.M)
    assert {
        "PhonepushPhoneDown",
        "PhonepushDeliveriesFailing",
        "PhonepushSpoolBacklog",
        "PhonepushMqttDisconnected",
    } <= set(alerts)
    exprs = "\n".join(re.findall(r"expr: (\|\n(?:\s{10}.*\n)+|.*)", text))
    used = set(_METRIC.findall(exprs))
    assert used, "no phonepush metric in any expr"
    assert used <= _exported_names(), used - _exported_names()


def test_dashboard_queries_use_only_exported_metrics_and_parse(tmp_path: Path) -> None:
    promtool = _promtool()
    exprs = _dashboard_exprs()
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = set(_METRIC.findall(expr))
        assert names, f"a query uses no phonepush metric: {expr}"
        used |= names
    assert used <= _exported_names(), used - _exported_names()
    for key in ("phonepush_phone_up", "phonepush_deliveries_total", "phonepush_spool_pending"):
        assert key in used
    # promtool parses PromQL through a rules file; Grafana's variables get plain values first.
    rules: list[dict[str, Any]] = []
    for i, expr in enumerate(exprs):
        if expr.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        promql = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query{i}", "expr": promql})
    # JSON is YAML: no YAML library needed to write the file.
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
