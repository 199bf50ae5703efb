"""Talking to one phone: ``PhoneTarget`` (where and how), ``PhoneClient`` (the HTTP side of a push).

Every httpx, ssl and OS error is translated here, once, into :mod:`phonepush.errors`; nothing
above this module sees an httpx exception.

Choices (see ``docs/design.md`` and ``docs/performance.md`` for the why):

* **One small client per phone.** Each ``PhoneClient`` owns one keep-alive connection and an
  ``asyncio.Lock`` so pushes to a phone go one at a time (phones take one push at a time). A
  single pool shared by hundreds of phones costs work per request proportional to its open
  connections. By default the connection is :mod:`phonepush.phone.http11`, a lean HTTP/1.1 client
  for this one request (about a fifth of httpx's CPU per push; see ``docs/performance.md``).
  An injected httpx ``transport`` (a test double, or any httpx transport) replaces it with an
  ``httpx.AsyncClient`` over that transport; it is owned by the client (closed with it) and
  brings its own TLS settings.
* **Request shape.** ``POST /CGI/Execute``, ``Content-Type: application/x-www-form-urlencoded``,
  one field ``XML``, always a ``Content-Length``; never chunked, never ``Expect:`` (phones answer
  404 or error 6 to those). No redirects, no proxies from the environment (phones are on the LAN),
  ``Accept-Encoding: identity`` (nothing to decompress, so nothing to bomb us with).
* **Basic credentials** are always UTF-8 (RFC 7617 ``charset="UTF-8"``), the encoding
  ``/authenticate`` compares and phones decode: ISO-8859-1 when it fits, as ``requests`` sends
  them, made ``pä`` a different password from the one configured.
* **HTTPS with a pinned certificate** (``certificate``): the peer must present a chain ending in
  that certificate (it may be the phone's own, self-signed or CA-issued); the host name is not
  checked, since a phone's certificate names its MAC, not its address. Because the key is pinned,
  the pinned path also allows TLS 1.0 when the local OpenSSL permits it (7900-series phones speak
  nothing newer); the newest version both sides speak is still negotiated.
* **HTTPS with a CA bundle** (``ca_file``) or neither: normal verification, host name included.
* **Answers** are read up to :data:`~phonepush.wire.cisco.MAX_RESPONSE_BYTES` (one byte more to
  detect overflow) and parsed by :func:`phonepush.wire.cisco.parse_response`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import ssl
import warnings
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

from phonepush import __version__
from phonepush.errors import (
    PhoneAnswerTimeout,
    PhoneBadResponse,
    PhoneConnectTimeout,
    PhoneError,
    PhoneUnreachable,
)
from phonepush.phone import http11 as _phonewire
from phonepush.wire import cisco
from phonepush.wire.cisco import DEVICE_INFORMATION_PATH, DeviceInfo, ResponseItem
from phonepush.wire.target import DEFAULT_TIMEOUT, PhoneTarget, Scheme, parse_host
from phonepush.wire.uri import ExecuteItem

if TYPE_CHECKING:
    # Loaded only for an injected transport (tests): the daemon never needs httpx to push.
    import httpx

__all__ = [
    "DEFAULT_TIMEOUT",
    "DeviceInfo",
    "PhoneClient",
    "PhoneTarget",
    "Scheme",
    "connect_probe",
    "parse_host",
]

_PATH: Final = "/CGI/Execute"
_FORM: Final = "application/x-www-form-urlencoded"


def _basic_auth(username: str, password: str) -> str:
    data = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(data).decode("ascii")


def _ssl_context(target: PhoneTarget) -> ssl.SSLContext:
    if target.certificate:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=target.certificate)
        # Pinning a CA-issued leaf (a phone's MIC/LSC) needs OpenSSL to accept a chain that ends at
        # a trusted certificate which is not self-signed.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        _allow_tls10(context)
        return context
    if target.ca_file:
        return ssl.create_default_context(cafile=target.ca_file)
    return ssl.create_default_context()


def _allow_tls10(context: ssl.SSLContext) -> None:
    # OpenSSL 3 refuses TLS 1.0/1.1 above security level 0; a build without them refuses the
    # settings, and then the defaults (TLS 1.2+) stay.
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            # Deprecated on purpose by Python; these phones have nothing newer.
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
    except (ssl.SSLError, ValueError):
        context.set_ciphers("DEFAULT")
        context.minimum_version = ssl.TLSVersion.TLSv1_2


def _reason(exc: BaseException) -> str:
    """The most specific human-readable cause in an exception chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"TLS certificate verify failed: {current.verify_message}"
        if isinstance(current, ssl.SSLError):
            return f"TLS error: {current.reason or current}"
        if isinstance(current, socket.gaierror) and current.strerror:
            return current.strerror
        if isinstance(current, OSError) and current.errno and current.errno > 0:
            # asyncio words a refused connection "Connect call failed (addr)"; the errno says it.
            return os.strerror(current.errno)
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        current = current.__cause__ or current.__context__
    return str(exc) or type(exc).__name__


class PhoneClient:
    """Pushes to one phone. Use as ``async with PhoneClient(target) as phone: ...``; the HTTP
    client is opened on entry or on the first push, and closed on exit or by :meth:`aclose`.

    Every method raises only :class:`~phonepush.errors.PhoneError` subclasses (with ``phone`` set
    to the target's name) for failures of the push, or :class:`~phonepush.errors.WireError` for
    objects that cannot be built.
    """

    def __init__(
        self, target: PhoneTarget, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.target = target
        self.url = f"{target.scheme}://{target.authority}{_PATH}"
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._wire: _phonewire.Connection | None = None
        self._info_head = b""
        self._closed = False
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"PhoneClient({self.target.name!r}, {self.url!r})"

    async def __aenter__(self) -> Self:
        if self._transport is None:
            self._open_wire()
        else:
            self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection. Also for owners that keep the client without ``async with``
        (the dispatcher makes clients on first use and closes them on reload or shutdown)."""
        self._closed = True
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    @property
    def connected(self) -> bool:
        """A connection to the phone is held open (what ``dispatch.max_connections`` counts)."""
        if self._wire is not None:
            return self._wire.is_open
        return self._client is not None

    @property
    def written(self) -> bool:
        """Whether the last push's request was fully written, so the phone may have run it;
        read after a push was cancelled. Over an injected transport it is assumed."""
        if self._wire is not None:
            return self._wire.written
        return True

    async def disconnect(self) -> None:
        """Close the connection but keep the client: the next push connects again."""
        if self._wire is not None:
            self._wire.close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"phonepush/{__version__}", "Accept-Encoding": "identity"}
        if self.target.username:
            headers["Authorization"] = _basic_auth(self.target.username, self.target.password)
        return headers

    def _open_wire(self) -> _phonewire.Connection:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._wire is not None:
            return self._wire
        target = self.target
        try:
            context = _ssl_context(target) if target.scheme == "https" else None
        except (OSError, ssl.SSLError) as exc:
            raise PhoneUnreachable(
                f"Cannot use certificate {target.certificate or target.ca_file}: {_reason(exc)}",
                phone=target.name,
            ) from exc
        # Host as httpx and requests send it: without the scheme's default port.
        host = f"[{target.host}]" if ":" in target.host else target.host
        if target.port is not None and target.port != (443 if target.scheme == "https" else 80):
            host = f"{host}:{target.port}"
        headers = {
            **self._headers(),
            "Accept": "*/*",
            "Connection": "keep-alive",
            "Content-Type": _FORM,
        }
        self._info_head = _phonewire.request_head(
            host,
            {k: v for k, v in headers.items() if k != "Content-Type"},
            method="GET",
            path=DEVICE_INFORMATION_PATH,
        )
        self._wire = _phonewire.Connection(
            target.host,
            target.effective_port,
            _phonewire.request_head(host, headers),
            ssl_context=context,
            cap=cisco.MAX_RESPONSE_BYTES + 1,
            timeout=target.timeout,
        )
        return self._wire

    def _open(self) -> httpx.AsyncClient:
        import httpx

        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._client is not None:
            return self._client
        transport = self._transport
        if transport is None:
            try:
                context = _ssl_context(self.target) if self.target.scheme == "https" else None
            except (OSError, ssl.SSLError) as exc:
                raise PhoneUnreachable(
                    f"Cannot use certificate {self.target.certificate or self.target.ca_file}: "
                    f"{_reason(exc)}",
                    phone=self.target.name,
                ) from exc
            transport = httpx.AsyncHTTPTransport(
                # False for http: a default context would load the CA bundle, milliseconds of
                # CPU per phone, for TLS that plain HTTP never uses.
                verify=context if context is not None else False,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                retries=0,
            )
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(self.target.timeout),
            headers=self._headers(),
            follow_redirects=False,
            trust_env=False,
        )
        return self._client

    async def push(self, xml: str, *, receipts: bool = True) -> list[ResponseItem]:
        """POST one XML object; return the phone's ResponseItems (in its completion order).

        ``receipts=False`` is for objects whose success answer is undocumented (setBackground,
        setRingTone): any 2xx answer that is not a CiscoIPPhoneError counts as success.
        """
        body = cisco.form_body(xml)
        async with self._lock:
            if self._transport is None:
                status, content_type, answer = await self._post_wire(self._open_wire(), body)
            else:
                status, content_type, answer = await self._post(self._open(), body)
        try:
            return cisco.parse_response(answer, content_type, status, receipts=receipts)
        except PhoneError as exc:
            exc.phone = self.target.name
            raise

    async def describe(self) -> DeviceInfo | None:
        """``GET /DeviceInformationX`` on the push connection: the phone's model, firmware, MAC
        and host name, or ``None`` when it answered without them (web pages disabled: 404,
        401, not XML). Raises a :class:`~phonepush.errors.PhoneError` when no answer came,
        as :meth:`push` does; the request changes nothing on the phone."""
        async with self._lock:
            if self._transport is None:
                wire = self._open_wire()
                status, content_type, answer = await self._post_wire(wire, b"", self._info_head)
            else:
                status, content_type, answer = await self._post(
                    self._open(), b"", path=DEVICE_INFORMATION_PATH
                )
        return cisco.parse_device_information(answer, content_type, status)

    async def execute(self, items: Sequence[ExecuteItem]) -> list[ResponseItem]:
        """Send 1-3 items in one CiscoIPPhoneExecute request (see ``cisco.pack``)."""
        return await self.push(cisco.execute_xml(items))

    async def set_background(self, icon: str, image: str) -> None:
        """Push a setBackground (thumbnail ``icon`` and full-size ``image`` URLs)."""
        await self.push(cisco.background_xml(icon, image), receipts=False)

    async def set_ringtone(self, url: str) -> None:
        """Push a setRingTone (URL of a raw µ-law 8 kHz file)."""
        await self.push(cisco.ringtone_xml(url), receipts=False)

    async def _post_wire(
        self, wire: _phonewire.Connection, body: bytes, head: bytes | None = None
    ) -> tuple[int, str | None, bytes]:
        target = self.target
        try:
            return await wire.request(body, head=head)
        except _phonewire.NotWritten as exc:
            cause = exc.__cause__ or exc
            connecting = isinstance(exc, _phonewire.ConnectFailed)
            if isinstance(cause, TimeoutError):
                doing = "connecting to" if connecting else "writing to"
                raise PhoneConnectTimeout(
                    f"Timed out after {target.timeout:g} s {doing} {target.authority}",
                    phone=target.name,
                ) from cause
            if connecting:
                raise PhoneUnreachable(
                    f"Cannot connect to {target.authority}: {_reason(cause)}", phone=target.name
                ) from cause
            raise PhoneUnreachable(
                f"Connection to {target.authority} failed before the request was written: "
                f"{_reason(cause)}",
                phone=target.name,
            ) from cause
        except TimeoutError as exc:
            raise PhoneAnswerTimeout(
                f"Timed out after {target.timeout:g} s waiting for {target.authority}",
                phone=target.name,
            ) from exc
        except _phonewire.BadAnswer as exc:
            raise PhoneBadResponse(
                f"Bad answer from {target.authority}: {exc}", phone=target.name
            ) from exc
        except OSError as exc:
            raise PhoneBadResponse(
                f"Connection to {target.authority} lost after the request was written: "
                f"{_reason(exc)}",
                phone=target.name,
            ) from exc

    async def _post(
        self, client: httpx.AsyncClient, body: bytes, *, path: str = ""
    ) -> tuple[int, str | None, bytes]:
        """POST ``body`` to /CGI/Execute, or with ``path`` GET that path."""
        import httpx

        target = self.target
        if path:
            request = client.stream("GET", f"{target.scheme}://{target.authority}{path}")
        else:
            request = client.stream("POST", self.url, content=body, headers={"Content-Type": _FORM})
        try:
            async with request as response:
                answer = await _read_capped(response, cisco.MAX_RESPONSE_BYTES + 1)
                return response.status_code, response.headers.get("Content-Type"), answer
        except (httpx.ConnectTimeout, httpx.PoolTimeout, httpx.WriteTimeout) as exc:
            doing = "writing to" if isinstance(exc, httpx.WriteTimeout) else "connecting to"
            raise PhoneConnectTimeout(
                f"Timed out after {target.timeout:g} s {doing} {target.authority}",
                phone=target.name,
            ) from exc
        except httpx.TimeoutException as exc:
            raise PhoneAnswerTimeout(
                f"Timed out after {target.timeout:g} s waiting for {target.authority}",
                phone=target.name,
            ) from exc
        except httpx.ConnectError as exc:
            raise PhoneUnreachable(
                f"Cannot connect to {target.authority}: {_reason(exc)}", phone=target.name
            ) from exc
        except httpx.WriteError as exc:
            raise PhoneUnreachable(
                f"Connection to {target.authority} failed before the request was written: "
                f"{_reason(exc)}",
                phone=target.name,
            ) from exc
        except httpx.RemoteProtocolError as exc:
            # The phone closed the connection or sent something that is not HTTP/1.1.
            raise PhoneBadResponse(
                f"Bad answer from {target.authority}: {_reason(exc)}", phone=target.name
            ) from exc
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            # A read error, or one httpx does not place: the request may have reached the phone.
            raise PhoneBadResponse(
                f"Connection to {target.authority} lost after the request was written: "
                f"{_reason(exc)}",
                phone=target.name,
            ) from exc


async def _read_capped(response: httpx.Response, cap: int) -> bytes:
    import httpx

    # Raw bytes: nothing is decompressed, so the cap bounds memory whatever the phone sends.
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
            size += len(chunk)
            if size >= cap:
                break
    except httpx.StreamConsumed:
        # A transport that hands over a response already in memory (test doubles, some
        # adapters): there is nothing left to bound.
        return response.content[:cap]
    return b"".join(chunks)[:cap]


async def connect_probe(target: PhoneTarget) -> None:
    """Open and close a TCP connection to the phone's push port: the health check for a phone
    whose web pages say nothing. Raises :class:`~phonepush.errors.PhoneUnreachable` or
    :class:`~phonepush.errors.PhoneConnectTimeout`."""
    try:
        async with asyncio.timeout(target.timeout):
            _, writer = await asyncio.open_connection(target.host, target.effective_port)
    except TimeoutError as exc:
        raise PhoneConnectTimeout(
            f"Timed out after {target.timeout:g} s connecting to {target.authority}",
            phone=target.name,
        ) from exc
    except OSError as exc:
        raise PhoneUnreachable(
            f"Cannot connect to {target.authority}: {_reason(exc)}", phone=target.name
        ) from exc
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
