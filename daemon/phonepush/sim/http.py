"""The simulator's HTTP/1.1: a minimal server protocol and a minimal GET client, on raw asyncio.

Hand-written rather than starlette/uvicorn for two reasons: the simulator is the phone fleet of
our benchmarks and must serve thousands of pushes a second on one core, and it must see exactly
what a client sent (a chunked upload, an ``Expect`` header) to answer as a phone's web server does.

Only what phones and their clients use is implemented: requests with a ``Content-Length`` body
(or none), keep-alive, pipelined requests answered in order. A chunked or ``Expect:
100-continue`` request is handed over without its body and the connection is closed after the
answer, since the rest of the stream cannot be framed any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

__all__ = [
    "FetchBadAnswer",
    "FetchError",
    "FetchTimeout",
    "FetchUnreachable",
    "HTTPResult",
    "HTTPServerProtocol",
    "Handler",
    "Request",
    "Response",
    "http_get",
]

logger = logging.getLogger("phonepush._simhttp")

MAX_HEAD: Final = 16 * 1024
MAX_BODY: Final = 64 * 1024
MAX_FETCH: Final = 256 * 1024
#: How long a connection we are done with is drained before it is closed.
LINGER_S: Final = 2.0

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
}


@dataclass(slots=True)
class Request:
    """One parsed request. ``headers`` keys are lower case; the last of repeated headers wins."""

    method: str
    target: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    body: bytes = b""
    #: A ``Content-Length`` header was sent (a chunked or Expect request's body is not read).
    has_length: bool = False
    chunked: bool = False
    expect_continue: bool = False
    keep_alive: bool = True


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/xml"
    close: bool = False
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    #: The phone did what it was asked (for its ``errors`` counter; not sent).
    success: bool = False

    def encode(self, keep_alive: bool) -> bytes:
        reason = _REASONS.get(self.status, "Unknown")
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers)
        head = (
            f"HTTP/1.1 {self.status} {reason}\r\nContent-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n{extra}"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        return head.encode("latin-1") + self.body


class FetchError(Exception):
    """A phone's GET failed (to the pusher: ``URI not found``)."""


class FetchUnreachable(FetchError):
    """No connection to the server."""


class FetchTimeout(FetchError):
    """No complete answer in time."""


class FetchBadAnswer(FetchError):
    """Not an HTTP/1.x answer, too large, or not an http(s) URL."""


#: Answers one request; ``None`` means never answer (a hung phone).
Handler = Callable[[Request], Awaitable[Response | None]]


def _plain(status: int, text: str) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8", close=True)


class HTTPServerProtocol(asyncio.Protocol):
    """Serves one connection: parses requests, hands each to ``handler``, one at a time."""

    def __init__(self, handler: Handler, connections: set[HTTPServerProtocol]) -> None:
        self._handler = handler
        self._connections = connections
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # A request whose head is parsed and whose body is still arriving.
        self._pending: Request | None = None
        self._need = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._connections.discard(self)
        if self._task is not None:
            self._task.cancel()

    def abort(self) -> None:
        """Drop the connection at once (fault modes, shutdown)."""
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._buf += data
        if self._task is None:
            self._next()

    def _next(self) -> None:
        if self._closed or self._task is not None:
            return
        request = self._parse()
        if request is not None:
            self._task = asyncio.get_running_loop().create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        try:
            response = await self._handler(request)
        except Exception:
            logger.exception("simulator handler failed on %s %s", request.method, request.path)
            response = _plain(500, "internal error\n")
        if response is None:
            # Hang: stay connected and read nothing more, like a wedged phone.
            self._closed = True
            return
        self._answer(response, request.keep_alive and not response.close)
        self._task = None
        if self._buf:
            self._next()

    def _answer(self, response: Response, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(response.encode(keep_alive))
        if not keep_alive:
            self._closed = True
            self._buf.clear()
            if transport.can_write_eof():
                # Lingering close: a client may still be sending a body we never read (chunked,
                # Expect). Closing with unread data makes the kernel send RST, which can destroy
                # the answer before the client reads it; so half-close, drain, then close.
                transport.write_eof()
                asyncio.get_running_loop().call_later(LINGER_S, transport.close)
            else:
                transport.close()

    def _fail(self, status: int, text: str) -> None:
        self._answer(_plain(status, text), False)

    def _parse(self) -> Request | None:
        buf = self._buf
        if self._pending is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._fail(431, "request head too large\n")
                return None
            if end > MAX_HEAD:
                self._fail(431, "request head too large\n")
                return None
            head = bytes(buf[:end]).decode("latin-1")
            del buf[: end + 4]
            request = _parse_head(head)
            if request is None:
                self._fail(400, "malformed request\n")
                return None
            if request.chunked or request.expect_continue:
                request.keep_alive = False
                return request
            length_text = request.headers.get("content-length")
            if length_text is None:
                return request
            if not length_text.isdigit():
                self._fail(400, "bad Content-Length\n")
                return None
            request.has_length = True
            self._need = int(length_text)
            if self._need > MAX_BODY:
                self._fail(413, "body too large\n")
                return None
            self._pending = request
        if len(buf) < self._need:
            return None
        request = self._pending
        self._pending = None
        request.body = bytes(buf[: self._need])
        del buf[: self._need]
        return request


def _parse_head(head: str) -> Request | None:
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        # Obsolete line folding and names with white space are refused, as RFC 9112 asks.
        if not sep or not name or name[0] in " \t" or name[-1] in " \t":
            return None
        headers[name.lower()] = value.strip()
    path, _, query = target.partition("?")
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return Request(
        method,
        target,
        path,
        query,
        version,
        headers,
        chunked="transfer-encoding" in headers,
        expect_continue=headers.get("expect", "").lower() == "100-continue",
        keep_alive=keep_alive,
    )


# --- client -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HTTPResult:
    status: int
    headers: Mapping[str, str]
    body: bytes


async def http_get(
    url: str,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> HTTPResult:
    """GET ``url`` on a fresh connection, as a phone fetches a page.

    Raises :class:`FetchUnreachable` (cannot connect), :class:`FetchTimeout`, or
    :class:`FetchBadAnswer` (not HTTP/1.x, over :data:`MAX_FETCH` bytes). Any status is returned.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise FetchBadAnswer(f"not an http(s) URL: {url!r}")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise FetchBadAnswer(f"bad port in {url!r}") from exc
    host = parts.hostname
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    tls: ssl.SSLContext | None = None
    if scheme == "https":
        tls = ssl_context or ssl.create_default_context()
    host_header = parts.netloc.rpartition("@")[2]
    lines = [f"GET {target} HTTP/1.1", f"Host: {host_header}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    try:
        async with asyncio.timeout(timeout_s):
            raw = await _exchange(host, port, tls, request)
    except TimeoutError as exc:
        raise FetchTimeout(f"no answer from {host}:{port} in {timeout_s} s") from exc
    except (OSError, ssl.SSLError) as exc:
        raise FetchUnreachable(f"cannot fetch from {host}:{port}: {exc}") from exc
    return _parse_result(raw)


async def _exchange(host: str, port: int, tls: ssl.SSLContext | None, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls, server_hostname=host if tls else None
    )
    try:
        writer.write(request)
        await writer.drain()
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FETCH:
            chunk = await reader.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        writer.close()
        # The answer is in hand; a peer that resets instead of closing changes nothing.
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def _parse_result(raw: bytes) -> HTTPResult:
    if len(raw) > MAX_FETCH:
        raise FetchBadAnswer(f"answer over {MAX_FETCH} bytes")
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        raise FetchBadAnswer("no complete HTTP answer")
    lines = raw[:end].decode("latin-1").split("\r\n")
    status_parts = lines[0].split(" ", 2)
    if (
        len(status_parts) < 2
        or not status_parts[0].startswith("HTTP/1.")
        or not (status_parts[1].isdigit())
    ):
        raise FetchBadAnswer(f"not an HTTP answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = raw[end + 4 :]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif (length := headers.get("content-length", "")).isdigit():
        body = body[: int(length)]
    return HTTPResult(int(status_parts[1]), headers, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            raise FetchBadAnswer("truncated chunked answer")
        size_text = data[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as exc:
            raise FetchBadAnswer("bad chunk size") from exc
        if size == 0:
            return bytes(out)
        start = eol + 2
        if start + size > len(data):
            raise FetchBadAnswer("truncated chunked answer")
        out += data[start : start + size]
        pos = start + size + 2
