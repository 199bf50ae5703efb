"""A lean HTTP/1.1 client for the one request phonepush makes: ``POST /CGI/Execute``.

Why not httpx or aiohttp here: a push is one small POST on a keep-alive connection, and general
clients spend most of their time on what phones never need (URL objects, header multidicts,
pools, tracing hooks). Measured in ``docs/performance.md``: httpx 0.74 ms of CPU per push,
aiohttp 0.25 ms, this client a fraction of that. It speaks only what phones speak:

* the request is built once per connection except the body: fixed headers, always a
  ``Content-Length``, never chunked, never ``Expect:``;
* the answer may be framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the end of
  the connection; interim ``1xx`` answers are skipped; only ``Content-Type`` is kept;
* the body is read up to a cap (one byte more than phonepush accepts, so overflow is seen) and
  nothing is decompressed; an answer cut at the cap closes the connection;
* one connection, one request at a time (the caller holds a lock), reused while the phone keeps
  it open.

Errors say whether the request reached the phone, since only then can the phone have run it:

* :class:`NotWritten` (and its :class:`ConnectFailed`): the request was not fully handed to the
  kernel (connect failed, or the connection failed or timed out while writing); ``__cause__`` is
  the ``OSError`` or ``TimeoutError``;
* after the write: :class:`BadAnswer` (the phone hung up, or sent what is not HTTP/1.1 we can
  read), or a plain ``OSError`` (reset) or ``TimeoutError`` (no answer in time).

:attr:`Connection.written` says the same for a request cut by a cancellation.
:mod:`phonepush.phone.client` turns them into ``PhoneError``\\ s.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Final

__all__ = ["Answer", "BadAnswer", "ConnectFailed", "Connection", "NotWritten", "request_head"]

_MAX_HEAD: Final = 16 * 1024
_CRLF: Final = b"\r\n"

Answer = tuple[int, str | None, bytes]


class BadAnswer(Exception):
    """The phone's answer is not readable HTTP/1.1 (or the phone hung up before answering)."""


class NotWritten(Exception):
    """The request was not fully written: the phone cannot have run it. ``__cause__`` is the
    ``OSError`` or ``TimeoutError``."""


class ConnectFailed(NotWritten):
    """Connecting failed; ``__cause__`` is the ``OSError`` or ``TimeoutError``."""


def request_head(
    authority: str, headers: dict[str, str], *, method: str = "POST", path: str = "/CGI/Execute"
) -> bytes:
    """The request line and fixed headers of every push (or of another request on the same
    connection: a health probe's GET), up to (not including) Content-Length."""
    lines = [f"{method} {path} HTTP/1.1\r\nHost: {authority}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    # Latin-1 like http.client: header values were checked or encoded by the caller.
    return "".join(lines).encode("latin-1")


class _Protocol(asyncio.Protocol):
    """Collects bytes; wakes the waiting request when its answer is complete or the link ends."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.lost: BaseException | None = None
        self.eof = False
        # Set while the transport holds bytes the kernel has not taken (write buffer above 0).
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Told (pause_writing) whenever a write leaves bytes in our buffer: until the kernel has
        # them all, the request is not written.
        transport.set_write_buffer_limits(high=0, low=0)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif waiter is None and len(self.buffer) > self.cap + _MAX_HEAD:
            # Unsolicited bytes with nobody reading: drop the connection, not memory.
            self.buffer.clear()
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connection:
    """One keep-alive connection to one phone (made on first use, remade when the phone closed
    it). Not safe for concurrent requests: the caller serialises them."""

    def __init__(
        self,
        host: str,
        port: int,
        head: bytes,
        *,
        ssl_context: ssl.SSLContext | None,
        cap: int,
        timeout: float,
    ) -> None:
        self._host = host
        self._port = port
        self._head = head
        self._ssl = ssl_context
        self._cap = cap
        # Seconds for the connect, and again for the exchange (send and whole answer).
        self._timeout = timeout
        self._proto: _Protocol | None = None
        #: Whether the last request was fully written (the phone may have run it), also when
        #: it was cut by a cancellation.
        self.written = False

    @property
    def is_open(self) -> bool:
        """A connection is held (it may still be closed by the phone unnoticed)."""
        proto = self._proto
        return proto is not None and not proto.eof

    def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    async def request(self, body: bytes, *, head: bytes | None = None) -> Answer:
        """Send one push (or, with another ``head``, another request) and return (status,
        Content-Type, body capped at ``cap`` bytes)."""
        self.written = False
        proto = self._proto
        if proto is None or proto.eof or proto.buffer:
            # Closed by the phone while idle, or it sent something unasked: start afresh.
            self.close()
            proto = await self._connect()
        assert proto.transport is not None
        done = False
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    proto.transport.write(
                        b"%sContent-Length: %d\r\n\r\n%s"
                        % (self._head if head is None else head, len(body), body)
                    )
                    await self._drain(proto)
                except OSError as exc:
                    raise NotWritten(str(exc) or type(exc).__name__) from exc
                self.written = True
                answer, reusable = await self._read(proto)
            done = reusable
            return answer
        except TimeoutError as exc:
            if not self.written:
                raise NotWritten(f"timed out writing the request: {exc}") from exc
            raise
        finally:
            # A timeout, a cancellation or a bad answer leaves the connection mid-exchange.
            if not done:
                self.close()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        proto = _Protocol(self._cap)
        try:
            async with asyncio.timeout(self._timeout):
                await loop.create_connection(lambda: proto, self._host, self._port, ssl=self._ssl)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(str(exc)) from exc
        self._proto = proto
        return proto

    async def _drain(self, proto: _Protocol) -> None:
        """Wait until the kernel has taken the whole request (usually at once: it is small)."""
        loop = asyncio.get_running_loop()
        while proto.paused:
            if proto.eof:
                raise proto.lost or ConnectionResetError("connection closed while writing")
            proto.waiter = loop.create_future()
            try:
                await proto.waiter
            finally:
                proto.waiter = None
        assert proto.transport is not None
        if proto.transport.is_closing():
            # The write itself failed (reset, broken pipe): the transport closed at once.
            raise proto.lost or ConnectionResetError("connection closed while writing")

    async def _read(self, proto: _Protocol) -> tuple[Answer, bool]:
        loop = asyncio.get_running_loop()
        buffer = proto.buffer
        while True:
            answer = _parse(buffer, self._cap, proto.eof)
            if answer is not None:
                status, content_type, body, end, reusable = answer
                if status < 200:
                    # Interim answer (100 Continue and the like): the real one follows.
                    del buffer[:end]
                    continue
                del buffer[:end]
                return (status, content_type, body), reusable and not proto.eof
            if proto.eof:
                if proto.lost is not None:
                    raise proto.lost
                if not buffer:
                    raise BadAnswer("Server disconnected without sending a response.")
                raise BadAnswer("Server disconnected mid-answer.")
            proto.waiter = loop.create_future()
            try:
                await proto.waiter
            finally:
                proto.waiter = None


def _parse(
    buffer: bytearray, cap: int, eof: bool
) -> tuple[int, str | None, bytes, int, bool] | None:
    """Parse one answer from ``buffer``: (status, Content-Type, body, bytes used, reusable), or
    None if more bytes are needed. Raises :class:`BadAnswer`."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        if len(buffer) > _MAX_HEAD:
            raise BadAnswer("Answer head too long.")
        return None
    lines = bytes(buffer[:head_end]).split(_CRLF)
    version, _, rest = lines[0].partition(b" ")
    status_text = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not status_text.isdigit():
        raise BadAnswer(f"Not an HTTP/1.1 status line: {lines[0][:60]!r}")
    status = int(status_text)
    content_type: str | None = None
    length: int | None = None
    chunked = False
    keep_alive = version == b"HTTP/1.1"
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:] in b" \t":
            raise BadAnswer(f"Malformed header line: {line[:60]!r}")
        name = name.lower()
        value = value.strip()
        if name == b"content-type":
            content_type = value.decode("latin-1")
        elif name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise BadAnswer(f"Bad Content-Length: {value[:30]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
            if not chunked:
                raise BadAnswer(f"Unsupported Transfer-Encoding: {value[:30]!r}")
        elif name == b"connection":
            tokens = value.lower()
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
    start = head_end + 4
    if status < 200 or status in (204, 304):
        return status, content_type, b"", start, keep_alive
    if chunked:
        return _chunked(buffer, start, cap, status, content_type, keep_alive)
    if length is not None:
        if length >= cap:
            # Read what the cap allows and drop the connection rather than drain the rest.
            if len(buffer) - start < cap:
                return None
            return status, content_type, bytes(buffer[start : start + cap]), start + cap, False
        if len(buffer) - start < length:
            return None
        return (
            status,
            content_type,
            bytes(buffer[start : start + length]),
            start + length,
            keep_alive,
        )
    # No framing: the body runs to the end of the connection.
    if len(buffer) - start >= cap:
        return status, content_type, bytes(buffer[start : start + cap]), start + cap, False
    if not eof:
        return None
    return status, content_type, bytes(buffer[start:]), len(buffer), False


def _chunked(
    buffer: bytearray,
    pos: int,
    cap: int,
    status: int,
    content_type: str | None,
    keep_alive: bool,
) -> tuple[int, str | None, bytes, int, bool] | None:
    body = bytearray()
    while True:
        line_end = buffer.find(_CRLF, pos)
        if line_end < 0:
            if len(buffer) - pos > 1024:
                raise BadAnswer("Chunk size line too long.")
            return None
        size_text = bytes(buffer[pos:line_end]).partition(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadAnswer(f"Bad chunk size: {size_text[:20]!r}") from None
        if size < 0:
            raise BadAnswer(f"Bad chunk size: {size_text[:20]!r}")
        data_start = line_end + 2
        if size == 0:
            # Trailers (if any) end with an empty line.
            trailers_end = buffer.find(b"\r\n", data_start)
            while trailers_end > data_start:
                data_start = trailers_end + 2
                trailers_end = buffer.find(b"\r\n", data_start)
            if trailers_end < 0:
                return None
            return status, content_type, bytes(body), trailers_end + 2, keep_alive
        available = len(buffer) - data_start
        if len(body) + min(size, available) >= cap:
            body += buffer[data_start : data_start + cap - len(body)]
            return status, content_type, bytes(body), len(buffer), False
        if available < size + 2:
            return None
        if buffer[data_start + size : data_start + size + 2] != _CRLF:
            raise BadAnswer("Chunk not followed by CRLF.")
        body += buffer[data_start : data_start + size]
        pos = data_start + size + 2
