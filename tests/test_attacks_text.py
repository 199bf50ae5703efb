"""Hostile data and text, round two: each test replays one attack through the surface it came in
by (the silences API over HTTP, a webhook, the daemon's stdout, ``phonepush check``, the URL a
simulated phone fetched) and asserts what the operator or the phone sees."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, RunProcess, eventually, free_port, start_run_process
from phonepush.sim.simulator import Fleet
from phonepush.store.spool import Spool, StoredSilence

TOKEN = "t0ken-for-text-attacks"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# (a+)+ once Python's verbose flag drops the spaces: exponential for a backtracking engine.
NESTED = "(?x)(a +) +"
# Forty a's and a mismatch: 2^40 steps for a backtracking engine, i.e. a frozen daemon.
EVIL_SUBJECT = "a" * 40 + "!"


def _silence(matcher: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "matchers": [matcher],
        "duration": "2h",
        "createdBy": "ops",
        "comment": "test",
        **extra,
    }


def _page_rule(fleet: Fleet, **rule: Any) -> dict[str, Any]:
    return {
        "webhook": {"token": TOKEN},
        "phones": [{"name": "desk", "host": fleet.phones[0].address}],
        "rules": [
            {"name": "page", "on": "webhook:page", "to": ["desk"], "execute": ["Key:Services"]}
            | rule
        ],
    }


async def _fire(url: str, payload: dict[str, Any], hook: str = "page") -> str:
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        answer = await client.post(f"/hooks/{hook}", json=payload)
    assert answer.status_code == 202, answer.text
    event_id: str = answer.json()["event"]
    return event_id


async def _deliveries(runner: DaemonRunner, event_id: str) -> list[tuple[str, str]]:
    assert runner.daemon is not None and runner.daemon.running is not None
    record = await runner.daemon.running.spool.events.get(event_id)
    assert record is not None
    return [(d.state, d.error) for d in record.deliveries]


async def _delivered(runner: DaemonRunner, event_id: str) -> bool:
    return await _deliveries(runner, event_id) == [("delivered", "")]


@pytest.fixture
async def desk(make_fleet: Any) -> Fleet:
    fleet: Fleet = await make_fleet(phones=1, names=["desk"], tone_ms=10)
    return fleet


# --- finding 1: a silence regex that backtracks -------------------------------------------------


async def test_finding_1_nested_quantifier_regex_cannot_freeze(
    daemon_runner: DaemonRunner, desk: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A silence stored before the fix (the spool outlives upgrades) must not freeze start-up.
    stored = json.dumps([{"name": "label.x", "value": NESTED, "isRegex": True, "isEqual": True}])
    now = time.time()
    async with Spool(daemon_runner.spool) as spool:
        await spool.silences.add(StoredSilence("old-bad", stored, now, now + 3600, now, "ops", ""))
    caplog.set_level(logging.ERROR, logger="phonepush.silences")
    await daemon_runner.start(_page_rule(desk))
    assert "old-bad" in caplog.text and "is ignored" in caplog.text

    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        assert (await client.get("/api/silences")).json() == []
        # The attack's own 38-byte matcher is refused with a reason...
        refused = await client.post(
            "/api/silences", json=_silence({"name": "label.x", "value": NESTED, "isRegex": True})
        )
        assert refused.status_code == 400 and "(?x)" in refused.json()["error"]
        # ...and the plain nested form is taken, because RE2 runs it in linear time.
        made = await client.post(
            "/api/silences",
            json=_silence({"name": "label.x", "value": "(a+)+", "isRegex": True}),
        )
        assert made.status_code == 201, made.text

    # Event data built to make (a+)+ backtrack: the page goes out, the loop keeps answering.
    event_id = await _fire(daemon_runner.url, {"x": EVIL_SUBJECT})
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.get("/healthz")).status_code == 200
    await eventually(lambda: _delivered(daemon_runner, event_id))
    # The same matcher does silence a value it matches.
    silenced = await _fire(daemon_runner.url, {"x": "a" * 40})
    (state, error) = (await _deliveries(daemon_runner, silenced))[0]
    assert state == "suppressed" and error.startswith("silenced by ")


# --- findings 6 and 8: what the daemon writes to stdout ------------------------------------------


@pytest.fixture
async def run_daemon(tmp_path: Path) -> AsyncIterator[Any]:
    """``phonepush run`` as a process with text logs; yields a starter taking the TOML body."""
    procs: list[RunProcess] = []

    async def start(body: str) -> tuple[RunProcess, str]:
        port = free_port()
        config = tmp_path / "phonepush.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\n'
            f'[spool]\npath = "{tmp_path / "spool.db"}"\n'
            f'[webhook]\ntoken = "{TOKEN}"\n'
            '[dispatch]\nretry_initial = "50ms"\nretry_max = "200ms"\n' + body
        )
        process = await start_run_process(config)
        procs.append(process)
        return process, f"http://127.0.0.1:{port}"

    yield start
    for process in procs:
        if process.proc.returncode is None:
            process.proc.terminate()
            await process.proc.wait()


async def test_finding_6_ack_webhook_credentials_and_query_are_masked_in_logs(
    run_daemon: Any, desk: Fleet
) -> None:
    closed = free_port()  # nothing listens: every ack webhook call fails and is logged
    hook = f"http://hook:HOOKPASS@127.0.0.1:{closed}/acked?token=HOOKTOKEN&v=2"
    process, url = await run_daemon(
        f'[ack]\nwebhook = "{hook}"\n'
        f'[[phones]]\nname = "desk"\nhost = "{desk.phones[0].address}"\n'
        '[[rules]]\nname = "page"\non = "webhook:page"\nto = ["desk"]\nack = true\n'
        'message = { title = "Disk", text = "{{ payload.text }}" }\n'
    )
    await _fire(url, {"text": "full"})
    phone = desk.phones[0]
    await eventually(lambda: any(k.name == "Ack" for k in phone.state.screen.softkeys))
    await phone.press(name="Ack")
    await eventually(lambda: "ack webhook" in process.output, 10)
    assert "HOOKPASS" not in process.output and "HOOKTOKEN" not in process.output
    assert f"http://***@127.0.0.1:{closed}/acked?token=***&v=***" in process.output


async def test_finding_8_text_logs_escape_control_characters_in_user_fields(
    run_daemon: Any, desk: Fleet
) -> None:
    process, url = await run_daemon(
        f'[[phones]]\nname = "desk"\nhost = "{desk.phones[0].address}"\n'
        '[[rules]]\nname = "page"\non = "webhook:page"\nto = ["desk"]\n'
        'execute = ["Dial:{{ payload.number }}"]\n'
    )
    forged = "2026-01-01 00:00:00,000 ERROR phonepush.app.daemon: FORGED"
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        made = await client.post(
            "/api/silences",
            json=_silence(
                {"name": "phone", "value": "nobody"},
                createdBy=f"ops\n{forged} by\rcreatedBy",
                comment="\x1b[2J\x1b[31mred\x85\u2028end",
            ),
        )
        assert made.status_code == 201, made.text
    await _fire(url, {"number": f"1\r\n{forged} in a URI"})
    await eventually(lambda: "FORGED in a URI" in process.output, 10)
    await eventually(lambda: "FORGED by" in process.output, 10)

    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ phonepush")
    for line in process.lines:
        assert "FORGED" not in line or not line.startswith("2026-01-01"), line
        assert not any(c in line.rstrip("\n") for c in "\r\x1b\x85\u2028"), repr(line)
        if "FORGED" in line:
            assert stamp.match(line) and "\\n" + forged in line, line
    assert "\\x1b[2J\\x1b[31mred\\x85\\u2028end" in process.output


# --- findings 9 and 10: what the simulated phone sees ------------------------------------------


async def test_finding_9_payload_keys_named_like_dict_methods_read_as_keys(
    daemon_runner: DaemonRunner, desk: Fleet
) -> None:
    text = "{{ payload.items }}|{{ payload.keys }}|{{ payload.get('values', 'none') }}"
    await daemon_runner.start(_page_rule(desk, execute=[], message={"title": "T", "text": text}))
    await _fire(daemon_runner.url, {"items": "3 parcels"})
    phone = desk.phones[0]
    await eventually(lambda: phone.state.screen.title == "T")
    # A key wins over dict.items; a missing one is empty; a called method still works.
    assert phone.state.screen.text == "3 parcels||none"
    assert "built-in" not in phone.state.screen.text


class _Recorder:
    """An HTTP server recording the paths it is asked for, answering a CiscoIPPhoneText."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _Recorder:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.paths.append(head.split(b" ")[1].decode())
        body = b'<?xml version="1.0" encoding="UTF-8"?><CiscoIPPhoneText><Text>ok</Text>'
        body += b"</CiscoIPPhoneText>"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()


async def test_finding_10_event_data_cannot_move_a_pushed_url_to_another_host(
    daemon_runner: DaemonRunner, desk: Fleet
) -> None:
    async with _Recorder() as news, _Recorder() as steal:
        base = f"http://127.0.0.1:{news.port}"
        data = _page_rule(
            desk, execute=[f"{base}/news/{{{{ payload.who }}}}?q={{{{ payload.q }}}}"]
        )
        rules = data["rules"]
        for name, entry in (
            ("joined", f"{base}{{{{ payload.path }}}}"),
            ("raw", f"{base}{{{{ payload.path | safe_url }}}}"),
        ):
            rules.append(rules[0] | {"name": name, "execute": [entry]})
        rules.append(
            rules[0] | {"name": "trusted", "execute": [f"{base}/{{{{ payload.rest | safe_url }}}}"]}
        )
        await daemon_runner.start(data)
        attack = f"@127.0.0.2:{steal.port}/steal"
        event_id = await _fire(
            daemon_runner.url,
            {"who": attack, "q": "a&b=c#d", "path": attack, "rest": "news/x?y=1"},
        )
        phone = desk.phones[0]
        await eventually(lambda: len(news.paths) == 2)

    # Encoded data stays inside the path and query the rule wrote...
    assert f"/news/%40127.0.0.2%3A{steal.port}%2Fsteal?q=a%26b%3Dc%23d" in news.paths
    # ...and a value the rule marks raw is taken as it is.
    assert "/news/x?y=1" in news.paths
    assert steal.paths == []
    pushed = [i["url"] for r in phone.state.requests for i in r["items"]]
    assert all(u.startswith(f"{base}/") for u in pushed), pushed
    record = dict(
        zip(
            ("page", "joined", "raw", "trusted"),
            await _deliveries(daemon_runner, event_id),
            strict=True,
        )
    )
    assert record["page"] == ("delivered", "") and record["trusted"] == ("delivered", "")
    assert record["joined"][0] == "failed" and "not a URL" in record["joined"][1]
    assert record["raw"][0] == "failed"
    assert f"goes to '127.0.0.2:{steal.port}'" in record["raw"][1]


# --- finding 13: phonepush check ------------------------------------------------------------------


def _check(tmp_path: Path, body: str) -> tuple[int, str]:
    import subprocess

    config = tmp_path / "check.toml"
    config.write_text(body)
    done = subprocess.run(
        [sys.executable, "-m", "phonepush", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("PHONEPUSH_")},
    )
    return done.returncode, done.stdout + done.stderr


RULE = '[[rules]]\nname = "r"\non = "webhook:x"\nto = ["a"]\nexecute = ["Key:Services"]\n'


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ('[[phones]]\nname = "a"\nhost = "push:SECRET@10.0.0.5"\n' + RULE, "phones[a].host"),
        ('[[phones]]\nname = "a"\nhost = "push:SECRET@10.0.0.5:80"\n' + RULE, "phones[a].host"),
        ('[[phones]]\nname = "a"\nhost = "http://push:SECRET@h"\n' + RULE, "phones[a].host"),
        ('[mqtt]\nurl = "mqtt://user:SECRET@broker:1883"\n', "mqtt.url"),
        ('[mqtt]\nurl = "mqtt://user:SECRET"\n', "mqtt.url"),
        ('[mqtt]\nurl = "mqtt://b:1883"\npassword = ["SECRET"]\n', "mqtt.password"),
        ("[webhook]\ntoken = 7\nhmac_secret = {SECRET = 1}\n", "webhook.token"),
        (
            '[server]\nlisten = "0.0.0.0:8080"\npublic_url = "ftp://u:SECRET@h/?t=SECRET"\n',
            "server.public_url",
        ),
        ('[ack]\nwebhook = "http://u:SECRET@/x?token=SECRET"\n', "ack.webhook"),
        (
            '[[phones]]\nname = "a"\nhost = "h"\n'
            + RULE.replace("Key:Services", "http://u:SECRET@h/" + "x" * 300),
            "rules[r].execute[0]",
        ),
    ],
)
def test_finding_13_check_and_config_errors_print_no_secret(
    tmp_path: Path, body: str, where: str
) -> None:
    code, output = _check(tmp_path, body)
    assert code == 2, output
    assert f"{where}: " in output, output
    assert "SECRET" not in output, output


def test_finding_13_check_summary_masks_credentials_in_urls(tmp_path: Path) -> None:
    code, output = _check(
        tmp_path,
        '[server]\npublic_url = "http://pages:SECRET@127.0.0.1:8080/?key=SECRET"\n'
        '[ack]\nwebhook = "http://hook:SECRET@127.0.0.1:9/x"\n'
        '[webhook]\nallow_anonymous = true\n[[phones]]\nname = "a"\nhost = "10.0.0.5"\n' + RULE,
    )
    assert code == 0, output
    assert "phones fetch pages from http://***@127.0.0.1:8080/?key=***" in output
    assert "SECRET" not in output
