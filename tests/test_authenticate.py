"""phonepush as the phones' authentication URL: simulated phones ask our /authenticate."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually
from _sim_fixtures import MakeFleet
from phonepush.commands import send
from phonepush.config import parse_config
from phonepush.errors import ConfigError
from phonepush.http.authenticate import Authenticator
from phonepush.sim.simulator import Fleet

SECRET = "s3cret & <ok>"


async def _send(*args: str) -> tuple[int, str, str]:
    # A subprocess, so the simulated phones and the daemon in this loop keep answering.
    env = {k: v for k, v in os.environ.items() if k != send.PASSWORD_ENV}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "phonepush",
        "send",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _config(fleet: Fleet | None = None, **authentication: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "authentication": {"users": [{"name": "push", "password": SECRET}], **authentication}
    }
    if fleet is not None:
        data["phones"] = [
            {"name": "desk", "host": fleet.phones[0].address, "username": "daemon", "password": "d"}
        ]
        data["rules"] = [
            {"name": "bell", "on": "webhook:bell", "to": ["desk"], "execute": ["Key:Headset"]}
        ]
    return data


async def _auth_fleet(make_fleet: MakeFleet, runner: DaemonRunner) -> Fleet:
    fleet: Fleet = await make_fleet(phones=1, auth_url=f"{runner.url}/authenticate", tone_ms=10)
    return fleet


async def test_push_with_right_credentials_succeeds_and_wrong_ones_get_error_4(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, caplog: pytest.LogCaptureFixture
) -> None:
    phones = await _auth_fleet(make_fleet, daemon_runner)
    await daemon_runner.start(_config())
    phone = phones.phones[0]

    with caplog.at_level(logging.DEBUG, logger="phonepush"):
        ok = await _send("-h", phone.address, "-u", "push", "-p", SECRET, "Key:Headset")
        wrong = await _send("-h", phone.address, "-u", "push", "-p", "guess", "Key:Headset")
        nobody = await _send("-h", phone.address, "-u", "mallory", "-p", SECRET, "Key:Headset")

    assert ok == (0, "Key:Headset: Success\n", "")
    assert wrong == (1, "", "Error: Authentication error\n")
    assert nobody == (1, "", "Error: Authentication error\n")
    assert list(phone.state.keys) == ["Key:Headset"]
    assert daemon_runner.metric("phonepush_authenticate_total", result="authorized") == 1
    assert daemon_runner.metric("phonepush_authenticate_total", result="unauthorized") == 2
    # Who failed is logged; no password, right or wrong, ever is.
    assert "mallory" in caplog.text
    assert "guess" not in caplog.text and SECRET not in caplog.text


async def test_the_daemons_own_pushes_pass_with_the_phones_credentials(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    phones = await _auth_fleet(make_fleet, daemon_runner)
    await daemon_runner.start(_config(phones))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.post("/hooks/bell", json={})).status_code == 202
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="desk", result="delivered")
            == 1
        )
    )
    assert list(phones.phones[0].state.keys) == ["Key:Headset"]


async def test_phone_credentials_false_accepts_only_the_listed_users(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    phones = await _auth_fleet(make_fleet, daemon_runner)
    await daemon_runner.start(_config(phones, phone_credentials=False))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.post("/hooks/bell", json={})).status_code == 202
    # Error 4 is final: the delivery fails instead of retrying.
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="desk", result="failed") == 1
        )
    )
    assert list(phones.phones[0].state.keys) == []


async def test_reply_is_the_bare_word_for_get_and_post(daemon_runner: DaemonRunner) -> None:
    await daemon_runner.start(_config())
    good = {"UserID": "push", "Password": SECRET, "devicename": "SEP001122334455"}
    bad = dict(good, Password="nope")
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        answers = [
            await client.get("/authenticate", params=good),
            await client.post("/authenticate", data=good),
            await client.get("/authenticate", params=bad),
            await client.post("/authenticate", data=bad),
            await client.get("/authenticate"),
        ]
    assert [a.content for a in answers] == [
        b"AUTHORIZED",
        b"AUTHORIZED",
        b"UNAUTHORIZED",
        b"UNAUTHORIZED",
        b"UNAUTHORIZED",
    ]
    for answer in answers:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain")


async def test_without_an_authentication_section_the_route_is_absent(
    daemon_runner: DaemonRunner,
) -> None:
    await daemon_runner.start({})
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        answer = await client.get("/authenticate", params={"UserID": "a", "Password": "b"})
    assert answer.status_code == 404
    assert answer.content != b"AUTHORIZED"


async def test_failures_never_lock_out_a_configured_user_but_throttle_unknown_names(
    daemon_runner: DaemonRunner,
) -> None:
    await daemon_runner.start(_config(max_failures=3))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        for _ in range(5):
            await client.get("/authenticate", params={"UserID": "push", "Password": "x"})
        right = await client.get("/authenticate", params={"UserID": "push", "Password": SECRET})
        for name in ("p1", "p2", "p3", "p4"):
            await client.get("/authenticate", params={"UserID": name, "Password": "x"})
        still_right = await client.get(
            "/authenticate", params={"UserID": "push", "Password": SECRET}
        )
    assert right.content == b"AUTHORIZED" and still_right.content == b"AUTHORIZED"
    assert daemon_runner.metric("phonepush_authenticate_total", result="throttled") == 1
    assert daemon_runner.metric("phonepush_authenticate_total", result="unauthorized") == 8
    assert daemon_runner.metric("phonepush_authenticate_failures_total", user="push") == 5
    assert daemon_runner.metric("phonepush_authenticate_failures_total", user="") == 3


def test_unknown_names_are_throttled_per_address_for_the_window() -> None:
    now = [0.0]
    auth = Authenticator([("push", "pw")], max_failures=2, failure_window=60, clock=lambda: now[0])
    assert [auth.check(f"u{i}", "x", "10.0.0.1") for i in range(3)] == [
        "unauthorized",
        "unauthorized",
        "throttled",
    ]
    assert auth.check("push", "pw", "10.0.0.1") == "authorized"  # the push user is unaffected
    assert auth.check("u9", "x", "10.0.0.2") == "unauthorized"  # another phone is unaffected
    now[0] = 61.0
    assert auth.check("u3", "x", "10.0.0.1") == "unauthorized"


def test_a_configured_users_failures_are_logged_a_line_per_window_with_the_count_between(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    auth = Authenticator([("push", "pw")], failure_window=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="phonepush"):
        for _ in range(4):
            assert auth.check("push", "guess-4711", "10.0.0.1") == "unauthorized"
        now[0] = 61.0
        assert auth.check("push", "guess-4711", "10.0.0.2") == "unauthorized"
    lines = [r.getMessage() for r in caplog.records if "configured user 'push'" in r.getMessage()]
    assert len(lines) == 2
    assert "more wrong" not in lines[0]
    assert "from 10.0.0.2 (3 more wrong since the last such line)" in lines[1]
    assert not any("guess-4711" in line for line in lines)  # the password is never logged
    assert auth.check("push", "pw", "10.0.0.1") == "authorized"


def test_an_empty_user_name_never_authorizes() -> None:
    auth = Authenticator([("", "")])
    assert auth.check("", "") == "unauthorized"


def test_passwords_come_from_files_and_are_required(tmp_path: Path) -> None:
    (tmp_path / "push-password").write_text("from-file\n")
    config = parse_config(
        {"authentication": {"users": [{"name": "push", "password_file": "push-password"}]}},
        environ={},
        base_dir=tmp_path,
    )
    auth = Authenticator.from_config(config)
    assert auth is not None and auth.check("push", "from-file") == "authorized"

    with pytest.raises(ConfigError) as missing:
        parse_config({"authentication": {"users": [{"name": "push"}]}}, environ={})
    assert (
        str(missing.value) == "authentication.users[push].password: give password or password_file"
    )
    with pytest.raises(ConfigError) as twice:
        parse_config(
            {"authentication": {"users": [{"name": "a", "password": "1"}] * 2}}, environ={}
        )
    assert "more than one user named 'a'" in str(twice.value)
    # The secret stays out of the config's repr.
    assert "from-file" not in repr(config)
