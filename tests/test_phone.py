"""PhoneClient: which failure becomes which PhoneError, what goes on the wire, one push at a time.

Error mapping uses ``httpx.MockTransport`` (unit level); the wire, TLS and timeouts use real
sockets and simulated phones.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from _sim_fixtures import MakeFleet
from phonepush.errors import (
    InvalidTarget,
    PhoneAnswerTimeout,
    PhoneAuthError,
    PhoneBadResponse,
    PhoneConnectTimeout,
    PhoneError,
    PhoneHTTPBusy,
    PhoneHTTPError,
    PhoneNotSent,
    PhoneRejected,
    PhoneTimeout,
    PhoneUnconfirmed,
    PhoneUnreachable,
    WireError,
)
from phonepush.phone.client import PhoneClient, PhoneTarget, parse_host
from phonepush.sim.simulator import Fleet
from phonepush.wire.cisco import MAX_RESPONSE_BYTES, ResponseItem, execute_xml, response_xml
from phonepush.wire.uri import ExecuteItem

PROLOG = '<?xml version="1.0" encoding="UTF-8"?>'
OK = response_xml([ResponseItem("Key:Headset", "Success", 0)]).encode()
TARGET = PhoneTarget("desk-1", "192.0.2.10")


def _error(number: str) -> bytes:
    return f'{PROLOG}<CiscoIPPhoneError Number="{number}" />'.encode()


def _answer(status: int, content_type: str | None, body: bytes) -> httpx.MockTransport:
    headers = {"Content-Type": content_type} if content_type else {}
    return httpx.MockTransport(
        lambda request: httpx.Response(status, headers=headers, content=body)
    )


def _raise(exc: Exception) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return httpx.MockTransport(handler)


async def _push(
    transport: httpx.AsyncBaseTransport, *, receipts: bool = True
) -> list[ResponseItem]:
    async with PhoneClient(TARGET, transport=transport) as phone:
        return await phone.push(execute_xml([ExecuteItem("Key:Headset")]), receipts=receipts)


# --- parse_host and PhoneTarget -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("phone", ("phone", None)),
        ("192.0.2.1", ("192.0.2.1", None)),
        ("phone.example.com:8080", ("phone.example.com", 8080)),
        ("SEP001122334455:443", ("SEP001122334455", 443)),
    ],
)
def test_parse_host(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_host(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("phone:x", "Invalid port: x"),
        ("phone:0", "Invalid port: 0"),
        ("phone:65536", "Invalid port: 65536"),
        ("phone:", "Invalid port: "),
        ("bad_host", "Invalid host: bad_host"),
        ("a..b:80", "Invalid host: a..b"),
        ("::1", "Invalid host: :"),
        ("phone\n", "Invalid host: phone\n"),
        ("\u212a", "Invalid host: \u212a"),
    ],
)
def test_parse_host_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidTarget) as caught:
        parse_host(text)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)  # so config validators report it per field


@pytest.mark.parametrize(
    ("target", "url"),
    [
        (PhoneTarget("a", "192.0.2.1"), "http://192.0.2.1:80/CGI/Execute"),
        (PhoneTarget("a", "192.0.2.1", scheme="https"), "https://192.0.2.1:443/CGI/Execute"),
        (PhoneTarget("a", "p", certificate="/x.pem"), "https://p:443/CGI/Execute"),
        (PhoneTarget("a", "p", 8443, certificate="/x.pem"), "https://p:8443/CGI/Execute"),
        (PhoneTarget("a", "2001:db8::1"), "http://[2001:db8::1]:80/CGI/Execute"),
        (PhoneTarget("a", "p", 8080, username="u", password="pw"), "http://p:8080/CGI/Execute"),
    ],
)
def test_url_has_scheme_and_port_and_no_credentials(target: PhoneTarget, url: str) -> None:
    assert PhoneClient(target).url == url


def test_password_stays_out_of_reprs() -> None:
    target = PhoneTarget("a", "p", username="u", password="hunter2")
    assert "hunter2" not in repr(target)
    assert "hunter2" not in repr(PhoneClient(target))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "bad host"},
        {"host": ""},
        {"port": 0},
        {"port": 70000},
        {"scheme": "ftp"},
        {"timeout": 0},
        {"timeout": float("nan")},
    ],
)
def test_unusable_targets(kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {"name": "a", "host": "p", **kwargs}
    with pytest.raises(InvalidTarget):
        PhoneTarget(**arguments)  # type: ignore[arg-type]


# --- answers and errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "content_type", "body", "error", "retryable"),
    [
        (200, "text/xml", _error("1"), PhoneRejected, False),
        (200, "text/xml", _error("2"), PhoneRejected, False),
        (200, "text/xml", _error("3"), PhoneRejected, False),
        (200, "text/xml", _error("4"), PhoneAuthError, False),
        (401, "text/xml", _error("4"), PhoneAuthError, False),
        (200, "text/xml", _error("6"), PhoneRejected, True),
        (500, "text/xml", _error("6"), PhoneRejected, True),
        (401, "text/html", b"<html>denied</html>", PhoneAuthError, False),
        (401, None, b"", PhoneAuthError, False),
        (404, "text/html", b"<html>no</html>", PhoneHTTPError, False),
        (405, "text/plain", b"no", PhoneHTTPError, False),
        # Written and answered with no error object: the phone may have run it. Not retryable.
        (500, "text/plain", b"oops", PhoneHTTPError, False),
        # Busy, said in HTTP (multiplatform firmware): it ran nothing.
        (429, "text/plain", b"slow down", PhoneHTTPBusy, True),
        (503, "text/html", b"<html>Busy</html>", PhoneHTTPBusy, True),
        (503, None, b"", PhoneHTTPBusy, True),
        (502, "text/xml", b"<<<", PhoneHTTPError, False),
        (200, "text/xml", b"<CiscoIPPhoneError />", PhoneBadResponse, False),
        (200, "text/xml", b"<CiscoIPPhoneError Number=", PhoneBadResponse, False),
        (200, "text/xml", b"\x00\xffnot xml", PhoneBadResponse, False),
        (200, "text/xml", b"<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><x>&e;</x>",
         PhoneBadResponse, False),
    ],
)  # fmt: skip
async def test_answer_to_error(
    status: int,
    content_type: str | None,
    body: bytes,
    error: type[PhoneError],
    retryable: bool,
) -> None:
    with pytest.raises(PhoneError) as caught:
        await _push(_answer(status, content_type, body))
    assert type(caught.value) is error
    assert caught.value.retryable is retryable
    assert isinstance(caught.value, PhoneUnconfirmed) is (
        error in (PhoneHTTPError, PhoneBadResponse)
    )
    assert caught.value.phone == "desk-1"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", b"<html>ok</html>"),  # multiplatform (3PCC) firmware
        (None, b"<x/>"),
        ("text/plain", b"OK"),
        ("text/xml", b"<Unexpected/>"),
    ],
)
async def test_any_2xx_without_an_error_object_is_success(
    content_type: str | None, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="phonepush.cisco"):
        assert await _push(_answer(200, content_type, body)) == []
    assert repr(body[:20])[2:-1] in caplog.text


async def test_success_answers() -> None:
    two = response_xml([ResponseItem("Key:Headset", "Success", 0), ResponseItem("Dial:1", "x", 6)])
    assert await _push(_answer(200, "text/xml; charset=utf-8", two.encode())) == [
        ResponseItem("Key:Headset", "Success", 0),
        ResponseItem("Dial:1", "x", 6),
    ]
    # Multiplatform phones answer an empty 200.
    assert await _push(_answer(200, None, b"")) == []
    # setBackground/setRingTone: any 2xx without a CiscoIPPhoneError is success.
    assert await _push(_answer(200, "text/plain", b"OK"), receipts=False) == []
    with pytest.raises(PhoneAuthError):
        await _push(_answer(200, "text/xml", _error("4")), receipts=False)


async def test_oversized_answer_is_not_read_to_its_end() -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'<CiscoIPPhoneError Number="6">'
        while True:
            sent += 1
            yield b" " * 4096

    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, headers={"Content-Type": "text/xml"}, content=endless())
    )
    with pytest.raises(PhoneBadResponse, match="limit"):
        await _push(transport)
    assert sent * 4096 <= MAX_RESPONSE_BYTES + 4096


REQUEST = httpx.Request("POST", "http://192.0.2.10/CGI/Execute")


@pytest.mark.parametrize(
    ("exc", "error", "message"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused", request=REQUEST), PhoneUnreachable,
         "Cannot connect to 192.0.2.10:80: [Errno 111] Connection refused"),
        (httpx.ConnectTimeout("timed out", request=REQUEST), PhoneConnectTimeout,
         "Timed out after 10 s connecting to 192.0.2.10:80"),
        (httpx.WriteTimeout("timed out", request=REQUEST), PhoneConnectTimeout,
         "Timed out after 10 s writing to 192.0.2.10:80"),
        (httpx.PoolTimeout("timed out", request=REQUEST), PhoneConnectTimeout,
         "Timed out after 10 s connecting to 192.0.2.10:80"),
        (httpx.WriteError("broken pipe", request=REQUEST), PhoneUnreachable,
         "Connection to 192.0.2.10:80 failed before the request was written: broken pipe"),
    ],
)  # fmt: skip
async def test_transport_errors_before_the_request_was_written(
    exc: Exception, error: type[PhoneError], message: str
) -> None:
    with pytest.raises(PhoneError) as caught:
        await _push(_raise(exc))
    assert type(caught.value) is error
    assert isinstance(caught.value, PhoneNotSent)
    assert caught.value.retryable
    assert caught.value.phone == "desk-1"
    assert str(caught.value) == message
    assert caught.value.__cause__ is exc


@pytest.mark.parametrize(
    ("exc", "error", "message"),
    [
        (httpx.ReadTimeout("timed out", request=REQUEST), PhoneAnswerTimeout,
         "Timed out after 10 s waiting for 192.0.2.10:80"),
        (httpx.ReadError("reset", request=REQUEST), PhoneBadResponse,
         "Connection to 192.0.2.10:80 lost after the request was written: reset"),
        (httpx.RemoteProtocolError("Server disconnected", request=REQUEST), PhoneBadResponse,
         "Bad answer from 192.0.2.10:80: Server disconnected"),
        (ConnectionResetError(104, "Connection reset by peer"), PhoneBadResponse,
         "Connection to 192.0.2.10:80 lost after the request was written: "
         "Connection reset by peer"),
    ],
)  # fmt: skip
async def test_transport_errors_after_the_request_was_written(
    exc: Exception, error: type[PhoneError], message: str
) -> None:
    with pytest.raises(PhoneError) as caught:
        await _push(_raise(exc))
    assert type(caught.value) is error
    assert isinstance(caught.value, PhoneUnconfirmed)
    assert not caught.value.retryable
    assert str(caught.value) == message
    assert caught.value.__cause__ is exc


async def test_items_are_checked_before_sending() -> None:
    requests: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda r: requests.append(r) or httpx.Response(200))
    async with PhoneClient(TARGET, transport=transport) as phone:
        with pytest.raises(WireError):
            await phone.execute([ExecuteItem("Key:A")] * 4)
        with pytest.raises(WireError):
            await phone.execute([ExecuteItem("Bogus:1")])
        with pytest.raises(WireError):
            await phone.set_background("Key:A", "http://192.0.2.1/b.png")
        with pytest.raises(WireError):
            await phone.set_ringtone("ftp://192.0.2.1/r.raw")
    assert requests == []


# --- request shape ------------------------------------------------------------------------------


def _recording(requests: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, headers={"Content-Type": "text/xml"}, content=OK)

    return httpx.MockTransport(handler)


async def test_request_shape() -> None:
    requests: list[httpx.Request] = []
    target = PhoneTarget("desk-1", "192.0.2.10", 8080, username="admin", password="pä:ss")
    items = [ExecuteItem("Key:Headset"), ExecuteItem("http://192.0.2.1/p?a=1&b=<2>", 1)]
    async with PhoneClient(target, transport=_recording(requests)) as phone:
        await phone.execute(items)
    [request] = requests
    assert request.method == "POST"
    assert str(request.url) == "http://192.0.2.10:8080/CGI/Execute"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.headers["Content-Length"] == str(len(request.content))
    assert "Transfer-Encoding" not in request.headers
    assert "Expect" not in request.headers
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(
        "admin:pä:ss".encode()
    ).decode("ascii")
    assert parse_qs(request.content.decode("ascii")) == {"XML": [execute_xml(items)]}


async def test_non_latin1_credentials_go_as_utf8() -> None:
    requests: list[httpx.Request] = []
    target = PhoneTarget("desk-1", "192.0.2.10", username="ユーザー", password="€")
    async with PhoneClient(target, transport=_recording(requests)) as phone:
        await phone.execute([ExecuteItem("Key:Headset")])
    expected = base64.b64encode("ユーザー:€".encode()).decode("ascii")
    assert requests[0].headers["Authorization"] == f"Basic {expected}"


async def test_no_authorization_without_username() -> None:
    requests: list[httpx.Request] = []
    target = PhoneTarget("desk-1", "192.0.2.10", password="unused")
    async with PhoneClient(target, transport=_recording(requests)) as phone:
        await phone.execute([ExecuteItem("Key:Headset")])
    assert "Authorization" not in requests[0].headers


async def test_one_push_at_a_time_per_phone() -> None:
    in_flight, most = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx.Response(200, headers={"Content-Type": "text/xml"}, content=OK)

    async with PhoneClient(TARGET, transport=httpx.MockTransport(handler)) as phone:
        xml = execute_xml([ExecuteItem("Key:Headset")])
        results = await asyncio.gather(*(phone.push(xml) for _ in range(5)))
    assert most == 1
    assert all(r == [ResponseItem("Key:Headset", "Success", 0)] for r in results)


async def test_usable_without_async_with_until_closed() -> None:
    requests: list[httpx.Request] = []
    phone = PhoneClient(TARGET, transport=_recording(requests))
    await phone.execute([ExecuteItem("Key:Headset")])
    await phone.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await phone.execute([ExecuteItem("Key:Headset")])
    assert len(requests) == 1


# --- real sockets -------------------------------------------------------------------------------


async def test_on_the_wire_to_a_simulated_phone(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(phones=1, username="admin", password="pw")
    sim = fleet.phone(0)
    target = PhoneTarget("desk-1", sim.host, sim.port, username="admin", password="pw")
    async with PhoneClient(target) as phone:
        assert await phone.execute([ExecuteItem("Key:Headset")]) == [
            ResponseItem("Key:Headset", "Success", 0)
        ]
        await phone.set_background("http://192.0.2.1/i.png", "http://192.0.2.1/b.png")
        await phone.set_ringtone("http://192.0.2.1/r.raw")
    records = list(sim.state.requests)
    assert [r["answer"]["status"] for r in records] == [200, 200, 200]
    for record in records:
        headers = record["headers"]
        assert headers["content-type"] == "application/x-www-form-urlencoded"
        assert "content-length" in headers
        assert "transfer-encoding" not in headers
        assert "expect" not in headers
        assert record["user"] == "admin"
    assert sim.state.background == {
        "icon": "http://192.0.2.1/i.png",
        "image": "http://192.0.2.1/b.png",
    }
    assert sim.state.ringtone == "http://192.0.2.1/r.raw"


async def _counting_server(
    connections: list[int], *, ssl_context: ssl.SSLContext | None = None
) -> tuple[asyncio.Server, Callable[[], int]]:
    """A minimal keep-alive HTTP/1.1 server that answers every request OK and counts connections."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: "
                    + str(len(OK)).encode()
                    + b"\r\n\r\n"
                    + OK
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ssl_context)
    return server, lambda: int(server.sockets[0].getsockname()[1])


async def test_keeps_one_connection_alive_across_pushes() -> None:
    connections: list[int] = []
    server, port = await _counting_server(connections)
    async with server, PhoneClient(PhoneTarget("desk-1", "127.0.0.1", port())) as phone:
        xml = execute_xml([ExecuteItem("Key:Headset")])
        for _ in range(3):
            await phone.push(xml)
        await asyncio.gather(*(phone.push(xml) for _ in range(3)))
    assert len(connections) == 1


async def test_refused_connection() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with PhoneClient(PhoneTarget("desk-1", "127.0.0.1", port)) as phone:
        with pytest.raises(PhoneUnreachable) as caught:
            await phone.execute([ExecuteItem("Key:Headset")])
    assert str(caught.value) == f"Cannot connect to 127.0.0.1:{port}: Connection refused"
    assert caught.value.retryable
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


async def test_timeout_on_a_hanging_phone(fleet: Fleet) -> None:
    sim = fleet.phone(0)
    await sim.set_fault("hang")
    target = PhoneTarget("desk-1", sim.host, sim.port, timeout=0.3)
    async with PhoneClient(target) as phone:
        with pytest.raises(PhoneTimeout, match=r"Timed out after 0\.3 s waiting for"):
            await phone.execute([ExecuteItem("Key:Headset")])


async def test_tls_pinned_certificate(make_fleet: MakeFleet, tmp_path: Path) -> None:
    fleet = await make_fleet(phones=1, tls=True, cert_dir=tmp_path / "phone")
    other = await make_fleet(phones=1, tls=True, cert_dir=tmp_path / "other")
    sim = fleet.phone(0)
    assert fleet.certificate is not None and other.certificate is not None

    def target(**kwargs: str) -> PhoneTarget:
        return PhoneTarget("desk-1", sim.host, sim.port, timeout=5, **kwargs)  # type: ignore[arg-type]

    items = [ExecuteItem("Key:Headset")]
    # The certificate names SEP<MAC>, not 127.0.0.1: pinning ignores the name.
    async with PhoneClient(target(certificate=str(fleet.certificate))) as phone:
        assert phone.url.startswith("https://")
        assert await phone.execute(items) == [ResponseItem("Key:Headset", "Success", 0)]
    async with PhoneClient(target(certificate=str(other.certificate))) as phone:
        with pytest.raises(PhoneUnreachable, match="TLS certificate verify failed") as caught:
            await phone.execute(items)
        assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
    # As a CA bundle the host name is checked, and 127.0.0.1 is not the certificate's name.
    async with PhoneClient(target(scheme="https", ca_file=str(fleet.certificate))) as phone:
        with pytest.raises(PhoneUnreachable, match="TLS certificate verify failed"):
            await phone.execute(items)
    with pytest.raises(PhoneUnreachable, match="Cannot use certificate"):
        async with PhoneClient(target(certificate=str(tmp_path / "missing.pem"))):
            pass


async def test_pinned_tls10_phone(tmp_path: Path) -> None:
    """7900-series phones speak TLS 1.0 only; the pinned path reaches them if OpenSSL can."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=SEP001122334455", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    try:
        server_tls.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server_tls.minimum_version = ssl.TLSVersion.TLSv1
            server_tls.maximum_version = ssl.TLSVersion.TLSv1
    except (ssl.SSLError, ValueError) as exc:
        pytest.skip(f"this OpenSSL cannot serve TLS 1.0: {exc}")
    connections: list[int] = []
    server, port = await _counting_server(connections, ssl_context=server_tls)
    async with server:
        target = PhoneTarget("desk-1", "127.0.0.1", port(), certificate=str(cert), timeout=5)
        async with PhoneClient(target) as phone:
            assert await phone.execute([ExecuteItem("Key:Headset")]) == [
                ResponseItem("Key:Headset", "Success", 0)
            ]
