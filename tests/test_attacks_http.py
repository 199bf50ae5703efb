"""Attacks on the daemon's HTTP side, round two: one regression test per finding, against the
real daemon (or the real uvicorn server with the daemon's protocol) over sockets.

Finding 3: slow and idle connections; 4: deeply nested JSON; 5: the /authenticate throttle;
11: Content-Length with Transfer-Encoding; 14: TCP_NODELAY. And the two /authenticate items of
delivery semantics: no lockout of the push user by third parties, one credential encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any, Final

import h11
import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from _daemon_fixtures import DaemonRunner, eventually
from _mqtt_fixtures import Broker
from _sim_fixtures import MakeFleet
from phonepush.app.daemon import _bind
from phonepush.config import ServerConfig, parse_config
from phonepush.errors import ConfigError, PhoneError
from phonepush.http.authenticate import Authenticator
from phonepush.http.server import http_protocol, uvicorn_config
from phonepush.phone.client import PhoneClient, PhoneTarget
from phonepush.sim.simulator import Fleet
from phonepush.wire.uri import ExecuteItem

TOKEN: Final = "attacks-http-token"
#: Far deeper than any event, far shallower than what breaks json.loads on its own (~1,000).
DEEP: Final = 1000


def _deep(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes (the guard only stops a hang)."""
    chunks = []
    async with asyncio.timeout(15):
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    return b"".join(chunks)


@contextlib.asynccontextmanager
async def _closing(
    writers: list[asyncio.StreamWriter],
) -> AsyncIterator[list[asyncio.StreamWriter]]:
    try:
        yield writers
    finally:
        for writer in writers:
            writer.close()


def _responses(data: bytes) -> list[tuple[int, bytes]]:
    """The complete HTTP responses in ``data`` (status, body), parsed strictly by h11."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    out: list[tuple[int, bytes]] = []
    status, body = 0, b""
    while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        if isinstance(event, h11.Response):
            status, body = event.status_code, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, body))
        elif isinstance(event, h11.ConnectionClosed):
            break
    return out


def _server(port: int, **server: Any) -> dict[str, Any]:
    return {"listen": f"127.0.0.1:{port}", **server}


# --- finding 3: slow and idle connections ---------------------------------------------------


async def test_finding_3_idle_connections_are_closed(daemon_runner: DaemonRunner) -> None:
    await daemon_runner.start({"server": _server(daemon_runner.port, header_timeout="300ms")})
    silent = [await _open(daemon_runner.port) for _ in range(20)]
    slow = [await _open(daemon_runner.port) for _ in range(5)]

    async def trickle(writer: asyncio.StreamWriter) -> None:
        # A head that never ends, one byte at a time: each byte would have reset an idle timer.
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                await asyncio.sleep(0.05)
                if writer.is_closing():
                    return
                writer.write(b"a")
                await writer.drain()

    async with _closing([w for _, w in silent + slow]):
        trickles = [asyncio.create_task(trickle(w)) for _, w in slow]
        silent_got = [await _read_to_eof(r) for r, _ in silent]
        slow_got = [await _read_to_eof(r) for r, _ in slow]
        for task in trickles:
            task.cancel()
    assert silent_got == [b""] * 20
    assert [_responses(got) for got in slow_got] == [
        [(408, b"request head not complete in time\n")]
    ] * 5
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.get("/healthz")).status_code == 200


async def test_finding_3_idle_sockets_cannot_make_every_request_503(
    daemon_runner: DaemonRunner,
) -> None:
    # The header timeout is out of play here: idle connections must give way at the limit.
    await daemon_runner.start(
        {"server": _server(daemon_runner.port, max_connections=10, header_timeout="60s")}
    )
    idle = [await _open(daemon_runner.port) for _ in range(15)]
    partial = [await _open(daemon_runner.port) for _ in range(5)]
    for _, writer in partial:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    async with _closing([w for _, w in idle + partial]):
        await asyncio.sleep(0.1)  # let the server take them all in
        async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
            answers = [(await client.get("/healthz")).status_code for _ in range(3)]
        # The oldest idle ones were closed to make room.
        assert await _read_to_eof(idle[0][0]) == b""
    assert answers == [200, 200, 200]


async def test_finding_3_a_kept_alive_connection_must_finish_its_next_head_in_time(
    daemon_runner: DaemonRunner,
) -> None:
    await daemon_runner.start(
        {"server": _server(daemon_runner.port, header_timeout="300ms", keepalive_timeout="60s")}
    )
    reader, writer = await _open(daemon_runner.port)
    async with _closing([writer]):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await reader.readuntil(b"ok")
        # The next request starts but its head never completes.
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        rest = await _read_to_eof(reader)
    assert first.startswith(b"HTTP/1.1 200 ")
    assert rest.startswith(b"HTTP/1.1 408 ")


async def test_finding_3_an_idle_kept_alive_connection_is_closed(
    daemon_runner: DaemonRunner,
) -> None:
    await daemon_runner.start({"server": _server(daemon_runner.port, keepalive_timeout="1s")})
    reader, writer = await _open(daemon_runner.port)
    async with _closing([writer]):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        got = await _read_to_eof(reader)
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"ok")


# --- finding 4: deeply nested JSON --------------------------------------------------------------


def _bell(fleet: Fleet) -> dict[str, Any]:
    return {
        "phones": [{"name": "desk", "host": fleet.phones[0].address}],
        "rules": [{"name": "bell", "on": "webhook:bell", "to": "desk", "execute": ["Key:Headset"]}],
    }


async def test_finding_4_deep_json_is_400(daemon_runner: DaemonRunner, fleet: Fleet) -> None:
    await daemon_runner.start({"webhook": {"token": TOKEN}, **_bell(fleet)})
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=daemon_runner.url, headers=auth) as client:
        hook = await client.post("/hooks/bell", content=_deep(DEEP))
        arrays = await client.post("/hooks/bell", content=b"[" * DEEP + b"]" * DEEP)
        silence = await client.post("/api/silences", content=_deep(DEEP))
        matchers = await client.post(
            "/api/silences",
            content=b'{"matchers": [{"name": "x", "value": ' + _deep(DEEP) + b"}]}",
        )
        # As deep as the limit is still an event.
        at_limit = await client.post("/hooks/bell", content=_deep(63))
        assert (await client.get("/readyz")).status_code == 200
    for answer in (hook, arrays, silence, matchers):
        assert answer.status_code == 400, answer.text
        assert "nested deeper than 64 levels" in answer.json()["error"]
    assert at_limit.status_code == 202
    assert daemon_runner.metric("phonepush_events_rejected_total", source="webhook", reason="400")


async def test_finding_4_deep_mqtt_and_text_payloads_are_text_as_malformed_json_is(
    daemon_runner: DaemonRunner, mosquitto: Broker, make_fleet: MakeFleet
) -> None:
    fleet: Fleet = await make_fleet(names=["desk"], tone_ms=1)
    rule = {"to": "desk", "when": "payload is string", "execute": ["Key:Headset"]}
    await daemon_runner.start(
        {
            "mqtt": {"url": mosquitto.url},
            "phones": [{"name": "desk", "host": fleet.phones[0].address}],
            "rules": [
                {"name": "deep-mqtt", "on": "mqtt:deep/#", **rule},
                {"name": "deep-hook", "on": "webhook:deep", **rule},
            ],
        }
    )
    await asyncio.to_thread(mosquitto.publish, "deep/1", _deep(DEEP))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        posted = await client.post(
            "/hooks/deep", content=_deep(DEEP), headers={"Content-Type": "text/plain"}
        )
    assert posted.status_code == 202
    await eventually(lambda: fleet.phones[0].state.pushes == 2, timeout=10)
    assert daemon_runner.metric("phonepush_events_total", source="mqtt", rule="deep-mqtt") == 1
    assert (
        daemon_runner.metric("phonepush_events_rejected_total", source="mqtt", reason="error") == 0
    )


# --- finding 5: the /authenticate throttle --------------------------------------------------


def _auth_config(port: int, **server: Any) -> dict[str, Any]:
    return {
        "server": _server(port, **server),
        "authentication": {"users": [{"name": "push", "password": "right"}], "max_failures": 3},
    }


async def _ask(client: httpx.AsyncClient, user: str, password: str, forwarded: str = "") -> bytes:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    answer = await client.get(
        "/authenticate", params={"UserID": user, "Password": password}, headers=headers
    )
    return answer.content


async def test_finding_5_forwarded_for_is_not_believed_by_default(
    daemon_runner: DaemonRunner,
) -> None:
    await daemon_runner.start(_auth_config(daemon_runner.port))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        # A rotating X-Forwarded-For would make every guess come from a new client.
        for i in range(4):
            await _ask(client, f"guess{i}", "x", forwarded=f"203.0.113.{i}")
    assert daemon_runner.metric("phonepush_authenticate_total", result="unauthorized") == 3
    assert daemon_runner.metric("phonepush_authenticate_total", result="throttled") == 1


async def test_finding_5_forwarded_for_is_believed_from_trusted_proxies(
    daemon_runner: DaemonRunner,
) -> None:
    await daemon_runner.start(_auth_config(daemon_runner.port, trusted_proxies=["127.0.0.1"]))
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        for i in range(4):
            await _ask(client, f"guess{i}", "x", forwarded="203.0.113.1")
        other = await _ask(client, "guess9", "x", forwarded="203.0.113.2")
    assert other == b"UNAUTHORIZED"
    assert daemon_runner.metric("phonepush_authenticate_total", result="unauthorized") == 4
    assert daemon_runner.metric("phonepush_authenticate_total", result="throttled") == 1


def test_finding_5_trusted_proxies_and_timeouts_are_checked_naming_the_key() -> None:
    config = parse_config(
        {"server": {"trusted_proxies": ["10.0.0.5", " 10.1.0.0/16 "]}}, environ={}
    )
    assert config.server.trusted_proxies == ["10.0.0.5/32", "10.1.0.0/16"]
    for server, message in (
        ({"trusted_proxies": ["*"]}, "server.trusted_proxies: '*' is not an IP address or network"),
        ({"trusted_proxies": ["proxy.lan"]}, "server.trusted_proxies: 'proxy.lan' is not an IP"),
        ({"header_timeout": "0s"}, "server.header_timeout: must be more than 0s"),
        ({"keepalive_timeout": "-1s"}, "server.keepalive_timeout: "),
    ):
        with pytest.raises(ConfigError) as error:
            parse_config({"server": server}, environ={})
        assert str(error.value).startswith(message), str(error.value)


def test_finding_5_distinct_user_names_and_addresses_cannot_flush_the_throttle() -> None:
    auth = Authenticator([("push", "right")], max_failures=3)
    for i in range(3):
        auth.check(f"guess{i}", "x", "10.0.0.1")
    assert auth.check("guess", "x", "10.0.0.1") == "throttled"
    # Formerly 10,001 distinct (address, name) pairs pushed the first one out of the table.
    results = {auth.check(f"name{i}", "x", f"10.1.{i // 256}.{i % 256}") for i in range(20_000)}
    assert results == {"unauthorized", "throttled"}
    assert auth.check("guess", "x", "10.0.0.1") == "throttled"
    assert auth.check("push", "right", "10.0.0.1") == "authorized"


# --- finding 11: Content-Length with Transfer-Encoding ------------------------------------------


async def test_finding_11_content_length_with_chunked_is_refused(
    daemon_runner: DaemonRunner, fleet: Fleet
) -> None:
    await daemon_runner.start(_bell(fleet))
    smuggled = (
        b"POST /hooks/bell HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    reader, writer = await _open(daemon_runner.port)
    async with _closing([writer]):
        writer.write(smuggled)
        got = await _read_to_eof(reader)
    [(status, body)] = _responses(got)  # one answer: the pipelined request was not served
    assert status == 400 and b"Transfer-Encoding" in body
    assert got.count(b"HTTP/1.1") == 1
    assert daemon_runner.metric("phonepush_events_total", source="webhook", rule="bell") == 0


# --- finding 14: TCP_NODELAY --------------------------------------------------------------------


async def test_finding_14_accepted_sockets_get_tcp_nodelay() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    seen: list[int] = []

    class Recording(http_protocol(10.0)):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    config = uvicorn_config(app, ServerConfig())
    config.http = Recording
    # Bound as the daemon binds it: socket(AF_INET, SOCK_STREAM), proto 0, where asyncio's own
    # TCP_NODELAY is skipped.
    sock = _bind("127.0.0.1:0")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started)
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        assert answer.status_code == 200
    finally:
        server.should_exit = True
        await task
        sock.close()
    assert seen == [1]


# --- issue 11: /authenticate cannot be turned against the push user; one credential encoding -


async def test_third_party_failures_do_not_lock_out_the_push_user(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet: Fleet = await make_fleet(
        names=["desk"], auth_url=f"{daemon_runner.url}/authenticate", tone_ms=1
    )
    phone = fleet.phones[0]
    await daemon_runner.start(
        {
            "authentication": {"max_failures": 3},
            "phones": [
                {"name": "desk", "host": phone.address, "username": "push", "password": "right"}
            ],
            "rules": [
                {"name": "bell", "on": "webhook:bell", "to": "desk", "execute": ["Key:Headset"]}
            ],
        }
    )
    # Anyone who can reach the phone pushes with the daemon's user name and wrong passwords.
    mallory = PhoneTarget("desk", phone.host, phone.port, username="push", password="guess")
    async with PhoneClient(mallory) as client:
        for _ in range(10):
            with pytest.raises(PhoneError):
                await client.execute([ExecuteItem("Key:Settings")])
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.post("/hooks/bell", json={})).status_code == 202
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="desk", result="delivered")
            == 1
        )
    )
    assert list(phone.state.keys) == ["Key:Headset"]
    assert daemon_runner.metric("phonepush_authenticate_failures_total", user="push") == 10
    assert daemon_runner.metric("phonepush_authenticate_total", result="throttled") == 0


async def test_a_non_ascii_password_works_end_to_end(
    daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    password = "pässwörd €ünf"
    fleet: Fleet = await make_fleet(
        names=["desk"], auth_url=f"{daemon_runner.url}/authenticate", tone_ms=1
    )
    phone = fleet.phones[0]
    await daemon_runner.start(
        {
            "authentication": {"users": [{"name": "pagér", "password": password}]},
            "phones": [
                {"name": "desk", "host": phone.address, "username": "pagér", "password": password}
            ],
            "rules": [
                {"name": "bell", "on": "webhook:bell", "to": "desk", "execute": ["Key:Headset"]}
            ],
        }
    )
    # The daemon's own push: client -> simulated phone -> our /authenticate.
    async with httpx.AsyncClient(base_url=daemon_runner.url) as client:
        assert (await client.post("/hooks/bell", json={})).status_code == 202
    await eventually(
        lambda: (
            daemon_runner.metric("phonepush_deliveries_total", phone="desk", result="delivered")
            == 1
        )
    )
    # A client of its own, and the same password in another normal form, which is not it.
    target = PhoneTarget("desk", phone.host, phone.port, username="pagér", password=password)
    async with PhoneClient(target) as client:
        await client.execute([ExecuteItem("Key:Settings")])
    decomposed = PhoneTarget(
        "desk", phone.host, phone.port, username="pagér", password=password.replace("ä", "a\u0308")
    )
    async with PhoneClient(decomposed) as client:
        with pytest.raises(PhoneError):
            await client.execute([ExecuteItem("Key:Services")])
    assert list(phone.state.keys) == ["Key:Headset", "Key:Settings"]
    assert daemon_runner.metric("phonepush_authenticate_total", result="authorized") == 2
