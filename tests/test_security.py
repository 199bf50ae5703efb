"""Security: webhook authentication, secrets kept out of every output, the template sandbox under
published escape payloads, the HTTP server's bounds, and TLS to phones. All against the real
daemon over real sockets, with simulated phones."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import httpx
import pytest

from _daemon_fixtures import DaemonRunner, eventually, free_port
from _sim_fixtures import MakeFleet
from phonepush.config import parse_config
from phonepush.errors import ConfigError
from phonepush.sim.simulator import Fleet

TOKEN: Final = "tok-Sekr1t-9f8e7d6c5b4a"
HMAC_SECRET: Final = "hmac-Sekr1t-0a1b2c3d4e5f"
PHONE_PASSWORD: Final = "pw-Sekr1t-abcdef123456"
WRONG_PHONE_PASSWORD: Final = "pw-Sekr1t-wrong-77777"
MQTT_PASSWORD: Final = "mqtt-Sekr1t-5150deadbeef"
SECRETS: Final = (TOKEN, HMAC_SECRET, PHONE_PASSWORD, WRONG_PHONE_PASSWORD, MQTT_PASSWORD)
AUTH: Final = {"Authorization": f"Bearer {TOKEN}"}


def _sign(body: bytes, secret: str = HMAC_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _rules(**extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": "bell",
            "on": "webhook:bell",
            "to": "all",
            "execute": ["Play:Chime.raw"],
            "message": {"title": "Door", "text": "{{ payload.who }}"},
            **extra,
        }
    ]


def _phones(fleet: Fleet, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": p.name, "host": p.address, **extra} for p in fleet.phones]


# --- webhook authentication ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:8080", "[::]:8080", "192.0.2.10:8080", "phones.lan:80"]
)
def test_listening_beyond_loopback_without_a_token_is_refused(listen: str) -> None:
    data = {"server": {"listen": listen, "public_url": "http://192.0.2.10:8080"}}
    with pytest.raises(ConfigError, match=r"webhook\.token: required when server\.listen"):
        parse_config(data, environ={})
    data["webhook"] = {"token": TOKEN}
    parse_config(data, environ={})


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8080", "127.0.0.2:8080", "[::1]:8080", "localhost:80"]
)
def test_loopback_may_go_without_a_token(listen: str) -> None:
    parse_config({"server": {"listen": listen}}, environ={})


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"webhook\.token: cannot be empty"):
        parse_config({"webhook": {"token": ""}}, environ={})


async def test_only_the_exact_token_is_accepted(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=1, tone_ms=1)
    await daemon_runner.start(
        {"webhook": {"token": TOKEN}, "phones": _phones(fleet), "rules": _rules()}
    )
    near_misses = [
        None,
        "",
        "Bearer",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN.upper()}",
        f"Bearer {TOKEN[1:]}",
        f"Basic {TOKEN}",
        f"Token {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN}\u00e9",
        f"Bearer {'x' * 10_000}",
        f"Bearer {TOKEN} {TOKEN}",
    ]
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        for header in near_misses:
            headers: dict[bytes, bytes] = (
                {} if header is None else {b"Authorization": header.encode("latin-1", "replace")}
            )
            answer = await client.post("/hooks/bell", json={"who": "x"}, headers=headers)
            assert answer.status_code == 401, header
            assert answer.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in answer.text
        # Unknown hooks are not revealed before authentication.
        assert (await client.post("/hooks/nosuch", json={})).status_code == 401
        answer = await client.post("/hooks/bell", json={"who": "ok"}, headers=AUTH)
        assert answer.status_code == 202
    await eventually(lambda: fleet.phones[0].state.pushes == 1)


async def test_hmac_signature_right_wrong_and_missing(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=1, tone_ms=1)
    await daemon_runner.start(
        {
            "webhook": {"token": TOKEN, "hmac_secret": HMAC_SECRET},
            "phones": _phones(fleet),
            "rules": _rules(),
        }
    )
    body = json.dumps({"who": "signed"}).encode()
    json_type = {"Content-Type": "application/json"}
    refused = {
        "missing": {},
        "empty": {"X-Phonepush-Signature-256": ""},
        "no prefix": {"X-Phonepush-Signature-256": _sign(body).removeprefix("sha256=")},
        "sha1 prefix": {"X-Phonepush-Signature-256": "sha1=" + _sign(body)[7:]},
        "other body": {"X-Phonepush-Signature-256": _sign(body + b" ")},
        "other secret": {"X-Phonepush-Signature-256": _sign(body, HMAC_SECRET + "x")},
        "the token as key": {"X-Phonepush-Signature-256": _sign(body, TOKEN)},
        "truncated": {"X-Phonepush-Signature-256": _sign(body)[:-2]},
        "garbage": {"X-Phonepush-Signature-256": "sha256=zz" + "0" * 62},
    }
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        for name, headers in refused.items():
            answer = await client.post(
                "/hooks/bell", content=body, headers={**AUTH, **json_type, **headers}
            )
            assert answer.status_code == 401, name
            assert "signature" in answer.json()["error"]
            assert HMAC_SECRET not in answer.text
        # A right signature does not stand in for the token.
        answer = await client.post(
            "/hooks/bell",
            content=body,
            headers={"X-Phonepush-Signature-256": _sign(body), **json_type},
        )
        assert answer.status_code == 401
        answer = await client.post(
            "/hooks/bell",
            content=body,
            headers={**AUTH, **json_type, "X-Phonepush-Signature-256": _sign(body)},
        )
        assert answer.status_code == 202
    phone = fleet.phones[0]
    await eventually(lambda: phone.state.screen.text == "signed")
    assert phone.state.pushes == 1
    assert daemon_runner.metric(
        "phonepush_events_rejected_total", source="webhook", reason="401"
    ) == len(refused)


# --- secrets never leave ------------------------------------------------------------------------


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def _config_toml(
    fleet: Fleet, dead_port: int, port: int, spool: Path, mqtt_port: int | None
) -> str:
    good, bad = fleet.phones
    mqtt = (
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{mqtt_port}"\nusername = "phonepush"\n'
        f'password = "{MQTT_PASSWORD}"\nclient_id = "sec-test"\n\n'
        if mqtt_port is not None
        else ""
    )
    return (
        f'[server]\nlisten = "127.0.0.1:{port}"\n\n'
        f'[spool]\npath = "{spool}"\n\n'
        f'[dispatch]\nretry_initial = "50ms"\nretry_max = "100ms"\n\n'
        f'[webhook]\ntoken = "{TOKEN}"\nhmac_secret = "{HMAC_SECRET}"\n\n'
        f"{mqtt}"
        f'[[phones]]\nname = "good"\nhost = "{good.address}"\nusername = "admin"\n'
        f'password = "{PHONE_PASSWORD}"\n\n'
        f'[[phones]]\nname = "wrong-password"\nhost = "{bad.address}"\nusername = "admin"\n'
        f'password = "{WRONG_PHONE_PASSWORD}"\n\n'
        f'[[phones]]\nname = "unreachable"\nhost = "127.0.0.1:{dead_port}"\nusername = "admin"\n'
        f'password = "{PHONE_PASSWORD}"\ntimeout = "1s"\n\n'
        f'[[rules]]\nname = "bell"\non = "webhook:bell"\nto = "all"\nexecute = ["Play:Chime.raw"]\n'
        f'ttl = "2s"\n'
        + ('\n[[rules]]\nname = "mq"\non = "mqtt:door/#"\nto = "good"\nexecute = ["Key:Services"]\n'
           if mqtt_port is not None else "")
    )  # fmt: skip


async def test_secrets_appear_in_no_log_metric_readyz_error_or_check_output(
    daemon_runner: DaemonRunner,
    make_fleet: MakeFleet,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    caplog.set_level(logging.DEBUG)
    mqtt_port: int | None = None
    broker = None
    with contextlib.suppress(pytest.FixtureLookupError):
        start_mosquitto = request.getfixturevalue("start_mosquitto")
        broker = start_mosquitto(users={"phonepush": MQTT_PASSWORD})
        mqtt_port = broker.port
    fleet = await make_fleet(phones=2, username="admin", password=PHONE_PASSWORD, tone_ms=1)
    dead_port = free_port()
    path = tmp_path / "phonepush.toml"
    path.write_text(
        _config_toml(fleet, dead_port, daemon_runner.port, daemon_runner.spool, mqtt_port)
    )
    from phonepush.config import load_config

    config = load_config(path, environ={})
    assert not _leaks(repr(config)) and not _leaks(str(config))
    assert not _leaks(repr(config.phone_targets()))

    from phonepush.app.daemon import Daemon

    runner_daemon = Daemon(config, config_path=path, registry=daemon_runner.registry)
    task = asyncio.create_task(runner_daemon.run())
    outputs: list[str] = []
    try:
        await asyncio.wait_for(runner_daemon.ready.wait(), 15)
        body = json.dumps({"who": "x"}).encode()
        signed = {**AUTH, "X-Phonepush-Signature-256": _sign(body)}
        async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
            for headers in (
                {},
                {"Authorization": f"Bearer {TOKEN}x"},
                {"Authorization": f"Bearer {TOKEN[:-3]}"},
                AUTH,
                {**AUTH, "X-Phonepush-Signature-256": _sign(body, TOKEN)},
            ):
                answer = await client.post("/hooks/bell", content=body, headers=headers)
                assert answer.status_code == 401
                outputs.append(answer.text + str(answer.headers))
            answer = await client.post("/hooks/nosuch", content=body, headers=signed)
            outputs.append(answer.text)
            answer = await client.post("/hooks/bell", content=b"{", headers=signed)
            outputs.append(answer.text)
            answer = await client.post(
                "/hooks/bell",
                content=body,
                headers={**signed, "Content-Type": "application/json", "Cookie": TOKEN},
            )
            assert answer.status_code == 202
            if broker is not None:
                broker.publish("door/front", b"{}")
            # The good phone takes it; the others fail (auth error 4, refused) until the TTL.
            good = fleet.phone(0)
            await eventually(lambda: good.state.pushes >= 1)
            await eventually(
                lambda: (
                    daemon_runner.metric(
                        "phonepush_deliveries_total", phone="wrong-password", result="failed"
                    )
                    == 1
                    and sum(
                        daemon_runner.metric(
                            "phonepush_deliveries_total", phone="unreachable", result=result
                        )
                        for result in ("expired", "failed")
                    )
                    == 1
                ),
                timeout=20,
            )
            for route in ("/metrics", "/readyz", "/healthz", "/pages/nope"):
                outputs.append((await client.get(route)).text)
        assert fleet.phone(1).state.errors >= 1  # the wrong password really was refused
        # Secrets also stay out of what the spool keeps (event headers).
        for file in tmp_path.glob("spool.db*"):
            outputs.append(file.read_bytes().decode("latin-1"))
    finally:
        runner_daemon.stop()
        await asyncio.wait_for(task, 15)

    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    log_text = "\n".join(formatter.format(record) for record in caplog.records)
    assert "wrong-password" in log_text and "unreachable" in log_text  # the failures were logged
    assert not _leaks(log_text), _leaks(log_text)
    for output in outputs:
        assert not _leaks(output), (_leaks(output), output[:300])

    # `phonepush check` on the same file, valid and then broken around the secrets.
    check = subprocess.run(
        [sys.executable, "-m", "phonepush", "check", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert not _leaks(check.stdout + check.stderr)
    path.write_text(
        path.read_text().replace('hmac_secret = "', 'hmac_secrte = "')
        + f'\n[[phones]]\nname = "x"\nhost = "{PHONE_PASSWORD}:99999"\n'
    )
    check = subprocess.run(
        [sys.executable, "-m", "phonepush", "check", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 2 and "webhook.hmac_secrte" in check.stderr
    assert not _leaks(check.stdout + check.stderr.replace(f"{PHONE_PASSWORD}:", "")), check.stderr


def test_secret_values_in_wrong_places_are_not_echoed() -> None:
    cases: list[dict[str, Any]] = [
        {"mqtt": {"url": f"mqtt://user:{MQTT_PASSWORD}@broker"}},
        {"webhook": {"token": [TOKEN]}},
        {"webhook": {"token": TOKEN, "token_file": "/nonexistent/" + "x"}},
        {"phones": [{"name": "a", "host": "10.0.0.1", "password": {"v": PHONE_PASSWORD}}]},
        {"mqtt": {"url": "mqtt://broker", "password": 12345, "password_file": MQTT_PASSWORD}},
    ]
    for data in cases:
        with pytest.raises(ConfigError) as caught:
            parse_config(data, environ={})
        message = str(caught.value)
        assert message and not _leaks(message.replace(f"/{MQTT_PASSWORD}", "")), message


@pytest.mark.slow
async def test_a_refused_mqtt_password_is_not_logged(
    daemon_runner: DaemonRunner,
    make_fleet: MakeFleet,
    caplog: pytest.LogCaptureFixture,
    start_mosquitto: Any,
) -> None:
    caplog.set_level(logging.DEBUG)
    broker = start_mosquitto(users={"phonepush": "the-right-one"})
    fleet = await make_fleet(phones=1)
    config = daemon_runner.config(
        {
            "mqtt": {
                "url": f"mqtt://127.0.0.1:{broker.port}",
                "username": "phonepush",
                "password": MQTT_PASSWORD,
            },
            "phones": _phones(fleet),
            "rules": [{"name": "m", "on": "mqtt:x", "to": "all", "execute": ["Key:Services"]}],
        }
    )
    from phonepush.app.daemon import Daemon

    # Started by hand: start-up waits up to 10 s for a broker that will keep refusing.
    daemon = Daemon(config, registry=daemon_runner.registry)
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.ready.wait(), 20)
        async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
            ready = await client.get("/readyz")
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 15)
    assert ready.status_code == 503 and ready.json()["checks"]["mqtt"] != "ok"
    formatter = logging.Formatter("%(message)s")
    log_text = "\n".join(formatter.format(r) for r in caplog.records)
    assert "phonepush" in log_text.lower()
    assert not _leaks(log_text + ready.text)


# --- the template sandbox, end to end -----------------------------------------------------------

#: Published Jinja2 SSTI payloads (PayloadsAllTheThings, HackTricks, PortSwigger research), and
#: filter-based bypasses of attribute checks.
ESCAPES: Final = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__()[59].__init__.__globals__['sys'].modules['os'] }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__.os.popen('id').read() }}",
    "{{ namespace.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('id').read() }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ range.__globals__['__builtins__']['__import__']('os').popen('id').read() }}",
    "{{ ''|attr('__class__')|attr('__mro__') }}",
    "{{ ()|attr('\\x5f\\x5fclass\\x5f\\x5f') }}",
    "{{ ''['\\x5f\\x5fclass\\x5f\\x5f'] }}",
    "{{ payload|attr('__class__') }}",
    "{{ [payload]|map(attribute='__class__')|list }}",
    "{{ [payload]|sort(attribute='__class__.__name__') }}",
    "{{ '{0.__class__.__mro__}'.format(payload) }}",
    "{{ '%s'|format(payload.__class__) }}",
    "{{ payload.items.__self__.__class__ }}",
    "{{ dict.__mro__ }}",
    "{{ (payload|tojson).__class__.__base__.__subclasses__() }}",
    "{% set x = ''.__class__.__mro__ %}{{ x }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
]


async def test_published_sandbox_escapes_fail_the_rule_and_push_nothing(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=1, tone_ms=1)
    rules = [
        {
            "name": f"esc{i}",
            "on": f"webhook:esc{i}",
            "to": "all",
            "message": {"title": "x", "text": source},
        }
        for i, source in enumerate(ESCAPES)
    ]
    await daemon_runner.start(
        {"webhook": {"token": TOKEN}, "phones": _phones(fleet), "rules": rules}
    )
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        for i in range(len(ESCAPES)):
            answer = await client.post(f"/hooks/esc{i}", json={"a": 1})
            assert answer.status_code == 202
            assert daemon_runner.metric("phonepush_template_errors_total", rule=f"esc{i}") == 1, (
                ESCAPES[i]
            )
    assert fleet.phones[0].state.pushes == 0


async def test_escape_payloads_in_event_data_are_shown_as_text(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=1, tone_ms=1)
    await daemon_runner.start(
        {"webhook": {"token": TOKEN}, "phones": _phones(fleet), "rules": _rules()}
    )
    phone = fleet.phones[0]
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        for source in ESCAPES[:4]:
            await client.post("/hooks/bell", json={"who": source})

            def shown(text: str = source) -> bool:
                return phone.state.screen.text == text

            await eventually(shown)


# --- HTTP server bounds -------------------------------------------------------------------------


async def _raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        chunks = []
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    break
        return b"".join(chunks)
    except ConnectionError:
        return b""
    finally:
        writer.close()


@pytest.fixture
async def bell(daemon_runner: DaemonRunner, make_fleet: MakeFleet) -> AsyncIterator[Fleet]:
    fleet = await make_fleet(phones=1, tone_ms=1)
    await daemon_runner.start(
        {
            "webhook": {"token": TOKEN},
            "server": {"listen": f"127.0.0.1:{daemon_runner.port}", "max_connections": 4},
            "phones": _phones(fleet),
            "rules": _rules(),
        }
    )
    yield fleet


def _post(extra_headers: bytes = b"", body: bytes = b'{"who": "raw"}') -> bytes:
    return (
        b"POST /hooks/bell HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n".encode()
        + extra_headers
        + b"\r\n"
        + body
    )


async def test_headers_over_16_kib_are_refused(daemon_runner: DaemonRunner, bell: Fleet) -> None:
    ok = await _raw_exchange(daemon_runner.port, _post(b"X-Pad: " + b"a" * 8000 + b"\r\n"))
    assert ok.startswith(b"HTTP/1.1 202")
    for pad in (
        b"X-Pad: " + b"a" * 20_000 + b"\r\n",
        b"".join(b"X-P%d: aaaaaaaaaa\r\n" % i for i in range(2000)),
    ):
        answer = await _raw_exchange(daemon_runner.port, _post(pad))
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
    await eventually(lambda: bell.phones[0].state.pushes == 1)
    assert daemon_runner.metric("phonepush_events_total", source="webhook", rule="bell") == 1


async def test_bodies_over_the_limit_are_refused_however_sent(
    daemon_runner: DaemonRunner, bell: Fleet
) -> None:
    big = b'{"who": "' + b"a" * 70_000 + b'"}'
    answer = await _raw_exchange(daemon_runner.port, _post(body=big))
    assert answer.startswith(b"HTTP/1.1 413")
    # Chunked, with no Content-Length to check up front.
    head = (
        b"POST /hooks/bell HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    chunks = b"".join(b"%x\r\n%s\r\n" % (8192, b"a" * 8192) for _ in range(10)) + b"0\r\n\r\n"
    answer = await _raw_exchange(daemon_runner.port, head + chunks)
    assert answer.startswith(b"HTTP/1.1 413")
    # A Content-Length that lies low is framed by it: the rest is not part of the body.
    lying = _post(body=b'{"who": "a"}').replace(b"Content-Length: 12", b"Content-Length: 5")
    answer = await _raw_exchange(daemon_runner.port, lying)
    assert answer.startswith(b"HTTP/1.1 400")
    assert bell.phones[0].state.pushes == 0


async def test_connections_beyond_the_limit_get_503(
    daemon_runner: DaemonRunner, bell: Fleet
) -> None:
    # Requests in progress fill the limit (idle connections give way: test_attacks_http.py):
    # each of these has sent its head and part of its body.
    held = [socket.create_connection(("127.0.0.1", daemon_runner.port)) for _ in range(4)]
    for sock in held:
        sock.sendall(_post(body=b'{"who": "slow", "pad": "' + b"a" * 100 + b'"}')[:-20])
    try:
        await asyncio.sleep(0.2)  # let the server register them
        async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
            answer = await client.get("/healthz")
            assert answer.status_code == 503
    finally:
        for sock in held:
            sock.close()

    async def healthy() -> bool:
        async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
            return (await client.get("/healthz")).status_code == 200

    await eventually(healthy)


# --- TLS to phones ------------------------------------------------------------------------------


async def _one_bell(daemon_runner: DaemonRunner, phone: dict[str, Any]) -> str:
    await daemon_runner.start(
        {
            "webhook": {"token": TOKEN},
            "phones": [phone],
            "rules": _rules(ttl="1s"),
        }
    )
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=AUTH) as client:
        assert (await client.post("/hooks/bell", json={"who": "tls"})).status_code == 202
    outcomes = ("delivered", "failed", "expired")

    def outcome() -> str:
        for result in outcomes:
            if daemon_runner.metric(
                "phonepush_deliveries_total", phone=phone["name"], result=result
            ):
                return result
        return ""

    await eventually(lambda: outcome() != "", timeout=10)
    return outcome()


async def test_https_phone_with_a_pinned_certificate_is_delivered(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=1, tls=True, tone_ms=1)
    phone = {"name": "p", "host": fleet.phones[0].address, "certificate": str(fleet.certificate)}
    assert await _one_bell(daemon_runner, phone) == "delivered"
    assert fleet.phones[0].state.pushes == 1


async def test_https_without_a_trusted_certificate_is_refused(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = await make_fleet(phones=1, tls=True, tone_ms=1)
    phone = {"name": "p", "host": fleet.phones[0].address, "scheme": "https"}
    assert await _one_bell(daemon_runner, phone) != "delivered"
    assert fleet.phones[0].state.pushes == 0
    assert "certificate verify failed" in caplog.text


async def test_a_ca_file_checks_the_host_name(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet, caplog: pytest.LogCaptureFixture
) -> None:
    # The simulated phone's certificate names SEP…, not 127.0.0.1: with a CA bundle (not a
    # pinned certificate) the name must match, so the push is refused.
    fleet = await make_fleet(phones=1, tls=True, tone_ms=1)
    phone = {"name": "p", "host": fleet.phones[0].address, "ca_file": str(fleet.certificate)}
    assert await _one_bell(daemon_runner, phone) != "delivered"
    assert fleet.phones[0].state.pushes == 0
    assert "certificate verify failed" in caplog.text


async def test_scheme_https_refuses_a_phone_that_speaks_plain_http(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=1, tone_ms=1)
    # The phone waits for a request line that never comes; the client for a ServerHello.
    phone = {"name": "p", "host": fleet.phones[0].address, "scheme": "https", "timeout": "1s"}
    assert await _one_bell(daemon_runner, phone) != "delivered"
    # Nothing readable reached the phone: no push, no XML in the clear.
    assert fleet.phones[0].state.pushes == 0
    assert all(record["xml"] is None for record in fleet.phones[0].state.requests)


def test_certificate_settings_with_plain_http_are_refused() -> None:
    for key in ("certificate", "ca_file"):
        data = {"phones": [{"name": "p", "host": "10.0.0.9", "scheme": "http", key: "/x.pem"}]}
        with pytest.raises(
            ConfigError, match=r"phones\[p\]\.scheme: certificate and ca_file need https"
        ):
            parse_config(data, environ={})
    config = parse_config(
        {"phones": [{"name": "p", "host": "10.0.0.9", "certificate": "/x.pem"}]}, environ={}
    )
    assert config.phone_targets()["p"].scheme == "https"
