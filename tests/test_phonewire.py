"""PhoneClient's own HTTP/1.1 client against phones that frame their answers in every legal way,
and some illegal ones: what a user sees is the push's result or one clear PhoneError."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from phonepush.errors import (
    PhoneAnswerTimeout,
    PhoneBadResponse,
    PhoneNotSent,
    PhoneUnconfirmed,
    PhoneUnreachable,
)
from phonepush.phone.client import PhoneClient, PhoneTarget
from phonepush.wire.cisco import MAX_RESPONSE_BYTES, ResponseItem, response_xml
from phonepush.wire.uri import ExecuteItem

OK = response_xml([ResponseItem("Key:Headset", "Success", 0)]).encode()
ITEMS = [ExecuteItem("Key:Headset")]
SUCCESS = [ResponseItem("Key:Headset", "Success", 0)]

# Given the request head and body, returns the raw bytes to answer with and whether to hang up.
Answerer = Callable[[bytes, bytes], tuple[bytes, bool]]


class RawPhone:
    """A TCP server that reads whole requests and answers each with exactly the bytes given."""

    def __init__(self, answer: Answerer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                data, hang_up = self.answer(head, body)
                writer.write(data)
                await writer.drain()
                if hang_up:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
async def raw_phone() -> AsyncIterator[Callable[[Answerer], RawPhone]]:
    phones: list[RawPhone] = []

    def make(answer: Answerer) -> RawPhone:
        phone = RawPhone(answer)
        phones.append(phone)
        return phone

    yield make
    for phone in phones:
        if phone.server is not None:
            phone.server.close()
            await phone.server.wait_closed()


async def _start(phone: RawPhone) -> PhoneClient:
    phone.server = await asyncio.start_server(phone.serve, "127.0.0.1", 0)
    return PhoneClient(PhoneTarget("desk-1", "127.0.0.1", phone.port, timeout=3))


def _fixed(data: bytes, hang_up: bool = False) -> Answerer:
    return lambda head, body: (data, hang_up)


def _chunks(body: bytes, size: int) -> bytes:
    out = b"".join(
        b"%x;ext=1\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    )
    return out + b"0\r\nX-Trailer: y\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % len(OK) + OK,
        b"HTTP/1.1 200 OK\r\ncontent-type:text/xml\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _chunks(OK, 7),
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n"
        b"Content-Length: %d\r\n\r\n" % len(OK) + OK,
    ],
    ids=["content-length", "chunked", "interim-100"],
)
async def test_framed_answers_keep_the_connection(
    raw_phone: Callable[[Answerer], RawPhone], answer: bytes
) -> None:
    phone = raw_phone(_fixed(answer))
    async with await _start(phone) as client:
        for _ in range(3):
            assert await client.execute(ITEMS) == SUCCESS
    assert phone.connections == 1


async def test_answer_that_ends_with_the_connection(
    raw_phone: Callable[[Answerer], RawPhone],
) -> None:
    # HTTP/1.0 style, no Content-Length: the body is whatever comes before the phone hangs up.
    phone = raw_phone(_fixed(b"HTTP/1.0 200 OK\r\nContent-Type: text/xml\r\n\r\n" + OK, True))
    async with await _start(phone) as client:
        assert await client.execute(ITEMS) == SUCCESS
        assert await client.execute(ITEMS) == SUCCESS
    assert phone.connections == 2


async def test_connection_close_answer_then_a_new_connection(
    raw_phone: Callable[[Answerer], RawPhone],
) -> None:
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/xml\r\n"
    phone = raw_phone(_fixed(head + b"Content-Length: %d\r\n\r\n" % len(OK) + OK, True))
    async with await _start(phone) as client:
        for _ in range(2):
            assert await client.execute(ITEMS) == SUCCESS
    assert phone.connections == 2


async def test_request_bytes(raw_phone: Callable[[Answerer], RawPhone]) -> None:
    phone = raw_phone(_fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    phone.server = await asyncio.start_server(phone.serve, "127.0.0.1", 0)
    target = PhoneTarget("desk-1", "127.0.0.1", phone.port, username="admin", password="pw")
    async with PhoneClient(target) as client:
        assert await client.execute(ITEMS) == []
    [(head, body)] = phone.requests
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /CGI/Execute HTTP/1.1"
    headers = dict(line.split(b": ", 1) for line in lines[1:] if line)
    assert headers[b"Host"] == b"127.0.0.1:%d" % phone.port
    assert headers[b"Content-Type"] == b"application/x-www-form-urlencoded"
    assert headers[b"Content-Length"] == str(len(body)).encode()
    assert headers[b"Authorization"] == b"Basic YWRtaW46cHc="
    assert headers[b"Accept-Encoding"] == b"identity"
    assert b"Transfer-Encoding" not in headers and b"Expect" not in headers
    assert body.startswith(b"XML=")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"", "Server disconnected without sending a response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", "Server disconnected mid-answer"),
        (b"SIP/2.0 200 OK\r\n\r\n", "Not an HTTP/1.1 status line"),
        (b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n", "Malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "Unsupported Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "Bad chunk size"),
    ],
    ids=["nothing", "cut", "not-http", "header", "length", "encoding", "chunk"],
)
async def test_unreadable_answers(
    raw_phone: Callable[[Answerer], RawPhone], answer: bytes, message: str
) -> None:
    phone = raw_phone(_fixed(answer, True))
    async with await _start(phone) as client:
        with pytest.raises(PhoneBadResponse, match=message) as caught:
            await client.execute(ITEMS)
    # Written, then no readable answer: the phone may have run it, so it is not sent again.
    assert isinstance(caught.value, PhoneUnconfirmed)
    assert not caught.value.retryable
    assert caught.value.phone == "desk-1"


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close"])
async def test_oversized_answer_is_cut_at_the_cap(
    raw_phone: Callable[[Answerer], RawPhone], framing: str
) -> None:
    # An error object, so that what is cut matters (any other 2xx answer is success unread).
    big = b"<CiscoIPPhoneError>" + b" " * (MAX_RESPONSE_BYTES * 4)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n"
    if framing == "content-length":
        data = head + b"Content-Length: %d\r\n\r\n" % len(big) + big
    elif framing == "chunked":
        data = head + b"Transfer-Encoding: chunked\r\n\r\n" + _chunks(big, 8192)
    else:
        data = head + b"Connection: close\r\n\r\n" + big
    phone = raw_phone(_fixed(data, framing == "close"))
    async with await _start(phone) as client:
        with pytest.raises(PhoneBadResponse, match="limit"):
            await client.execute(ITEMS)


async def test_phone_gone_after_an_answer(raw_phone: Callable[[Answerer], RawPhone]) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % len(OK)
    phone = raw_phone(_fixed(ok + OK))
    client = await _start(phone)
    async with client:
        assert await client.execute(ITEMS) == SUCCESS
        assert phone.server is not None
        phone.server.close()
        for writer in phone.writers:
            writer.close()
        await phone.server.wait_closed()
        await asyncio.sleep(0.05)  # let the phone's FIN reach the client's loop
        # The idle connection was closed by the phone: the next push reconnects, and is refused.
        with pytest.raises(PhoneUnreachable, match="Connection refused"):
            await client.execute(ITEMS)


# --- written or not: what the phone can have run ------------------------------------------------


async def test_no_answer_after_the_request_was_written_is_unconfirmed(
    raw_phone: Callable[[Answerer], RawPhone],
) -> None:
    phone = raw_phone(_fixed(b""))  # reads the request, never answers
    phone.server = await asyncio.start_server(phone.serve, "127.0.0.1", 0)
    target = PhoneTarget("desk-1", "127.0.0.1", phone.port, timeout=0.3)
    async with PhoneClient(target) as client:
        with pytest.raises(PhoneAnswerTimeout) as caught:
            await client.execute(ITEMS)
        assert client.written
    assert isinstance(caught.value, PhoneUnconfirmed) and not caught.value.retryable
    assert len(phone.requests) == 1


async def test_a_cancelled_push_says_whether_it_was_written(
    raw_phone: Callable[[Answerer], RawPhone],
) -> None:
    phone = raw_phone(_fixed(b""))
    async with await _start(phone) as client:
        task = asyncio.create_task(client.execute(ITEMS))
        while not phone.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.written


async def test_a_refused_connection_was_not_written() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with PhoneClient(PhoneTarget("desk-1", "127.0.0.1", port)) as client:
        with pytest.raises(PhoneUnreachable) as caught:
            await client.execute(ITEMS)
        assert not client.written
    assert isinstance(caught.value, PhoneNotSent) and caught.value.retryable
