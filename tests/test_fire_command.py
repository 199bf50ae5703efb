"""``phonepush fire --dry-run``: what the daemon would do with an event, planned by its builder."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _daemon_fixtures import DaemonRunner, eventually
from phonepush.sim.simulator import Fleet

CONFIG = """
[server]
listen = "127.0.0.1:8080"
public_url = "http://192.0.2.10:8080"

[webhook]
allow_anonymous = true

[[phones]]
name = "lobby"
host = "192.0.2.21"

[[phones]]
name = "office"
host = "192.0.2.22:8081"
"""


def phonepush(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phonepush", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def config(tmp_path: Path, rules: str) -> Path:
    path = tmp_path / "phonepush.toml"
    path.write_text(CONFIG + textwrap.dedent(rules), encoding="utf-8")
    return path


def test_an_audio_only_rule_dry_runs_as_a_page_as_check_accepts_it(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        """
        [[rules]]
        name = "evacuate"
        on = "webhook:alarm"
        to = "all"
        audio = { say = "Leave the building by {{ payload.exit }}" }
        """,
    )
    assert phonepush("check", "--config", str(path)).returncode == 0
    result = phonepush(
        "fire", "--config", str(path), "--hook", "alarm", '{"exit": "B"}', "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:] == ["rule evacuate: pending, 2 phone(s)", "  audio page to lobby, office"]


def test_a_page_dry_runs_with_each_phones_request_and_the_page(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        """
        [[rules]]
        name = "door"
        on = "webhook:door"
        to = "office"
        priority = 1
        message = { title = "Door", text = "{{ payload.who }} rang" }
        execute = ["Play:Chime.raw"]
        """,
    )
    result = phonepush(
        "fire", "--config", str(path), "--hook", "door", '{"who": "Ann"}', "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rule door: pending, 1 phone(s)" in out
    assert "  office: POST http://192.0.2.22:8081/CGI/Execute" in out
    assert "Play:Chime.raw" in out
    page = next(line for line in out.splitlines() if line.startswith("  page "))
    assert page.startswith("  page http://192.0.2.10:8080/pages/")
    assert "<Text>Ann rang</Text>" in out


def test_a_rule_that_renders_nothing_still_fails_the_dry_run(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        """
        [[rules]]
        name = "maybe"
        on = "webhook:x"
        to = "lobby"
        execute = ["{{ 'Play:Alarm.raw' if payload.critical }}"]
        """,
    )
    result = phonepush("fire", "--config", str(path), "--hook", "x", "{}", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "rule maybe: failed (the rule renders nothing to push), 1 phone(s)" in result.stdout


def test_a_hook_no_rule_listens_on_dry_runs_as_the_server_answers(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        """
        [[rules]]
        name = "door"
        on = "webhook:doorbell"
        when = "payload.action == 'press'"
        to = "lobby"
        execute = ["Play:Chime.raw"]

        [mqtt]
        url = "mqtt://127.0.0.1:1883"

        [[rules]]
        name = "button"
        on = "mqtt:buttons/+"
        when = "payload.action == 'press'"
        to = "lobby"
        execute = ["Play:Chime.raw"]
        """,
    )
    typo = phonepush("fire", "--config", str(path), "--hook", "doorbel", "{}", "--dry-run")
    assert typo.returncode == 0, typo.stderr
    assert typo.stdout.splitlines()[1:] == ["  no rule listens on webhook:doorbel"]
    # A hook a rule listens on whose when passes the event over, and MQTT: no rule matches.
    passed = phonepush("fire", "--config", str(path), "--hook", "doorbell", "{}", "--dry-run")
    assert passed.stdout.splitlines()[1:] == ["  no rule matches"]
    mqtt = phonepush("fire", "--config", str(path), "--mqtt", "lights/hall", "{}", "--dry-run")
    assert mqtt.stdout.splitlines()[1:] == ["  no rule matches"]


@pytest.mark.parametrize(
    "extra",
    [
        "ack = true",
        '[[rules.actions]]\nlabel = "Open"\nwebhook = { url = "http://door.lan/open" }',
    ],
    ids=["ack", "actions"],
)
def test_a_rule_with_acks_or_actions_dry_runs_with_each_phones_own_page(
    tmp_path: Path, extra: str
) -> None:
    # Each phone's token says who pressed: the phones fetch /pages/<id>/<token>, never the
    # page shared by id alone, and the dry run shows that URL without making a token.
    path = config(
        tmp_path,
        f"""
        [spool]
        path = "{tmp_path / "spool.db"}"

        [[rules]]
        name = "door"
        on = "webhook:door"
        to = ["lobby", "office"]
        message = {{ title = "Door" }}
        """
        + extra,
    )
    result = phonepush("fire", "--config", str(path), "--hook", "door", "{}", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    page = next(line for line in lines if line.startswith("  page "))
    page_url = page.removeprefix("  page ").removesuffix(":")
    assert re.fullmatch(r"http://192\.0\.2\.10:8080/pages/\w+/<token>", page_url), page
    requests = [line for line in lines if line.startswith("    request ")]
    assert len(requests) == 2
    for request in requests:
        assert f'URL="{page_url}"' in request
    assert not (tmp_path / "spool.db").exists()


async def test_fire_reaches_a_daemon_listening_on_ipv6_loopback(
    tmp_path: Path, daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    # `fire` (not a dry run) posts to the address in server.listen; an IPv6 one needs brackets
    # in the URL, which `fire` once left out.
    phone = fleet.phones[0]
    port = daemon_runner.port
    text = textwrap.dedent(
        f"""
        [server]
        listen = "[::1]:{port}"
        [spool]
        path = "{tmp_path / "spool.db"}"
        [webhook]
        token = "t0ken-for-fire"
        [[phones]]
        name = "lobby"
        host = "{phone.address}"
        [[rules]]
        name = "door"
        on = "webhook:door"
        to = ["lobby"]
        execute = ["Dial:{{{{ payload.n }}}}"]
        """
    )
    path = tmp_path / "phonepush.toml"
    path.write_text(text, encoding="utf-8")
    await daemon_runner.start_file(path)
    result = await asyncio.to_thread(
        phonepush, "fire", "--config", str(path), "--hook", "door", '{"n": 42}'
    )
    assert result.returncode == 0, result.stderr
    await eventually(lambda: "Dial:42" in phone.state.executed)
