"""An MQTT connection: paho-mqtt 2.x on the asyncio loop, shaped like aiomqtt's ``Client``.

``async with``, ``subscribe``, ``unsubscribe``, ``publish`` and an async ``messages`` iterator
as there; unlike aiomqtt's client, this one keeps itself connected (:meth:`MqttConnection.run`
reconnects with capped, jittered backoff), keeps a persistent session (stable client id,
``clean_start``/``clean_session`` off, Session Expiry Interval) and leaves acknowledging to the
caller (:meth:`MqttConnection.ack`): a message is PUBACKed when whoever took it says so, so the
broker redelivers what was never taken. What a message means is not its business.

Why paho runs on the event loop (``add_reader``/``add_writer`` on its socket with
``loop_read``/``loop_write``/``loop_misc``) rather than in its own thread (``loop_start``):
acknowledgements, publishes and subscriptions then all happen on the loop thread, so nothing
in paho's state is shared between threads and no lock ordering has to be reasoned about. The
single exception is the blocking TCP connect, TLS handshake and DNS lookup inside
``Client.connect``; it runs in the default executor while the loop thread leaves the client
alone (every other use of the client waits for the CONNACK). Socket callbacks paho makes from
that thread are ignored: the socket is registered with the loop once the connect returns.

Retained messages are past state, not news: MQTT 5 subscriptions ask the broker not to send
them at all (Retain Handling 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random as _random
import secrets
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Final, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from phonepush.config import MqttConfig
from phonepush.errors import ConfigError, MqttError

__all__ = [
    "Message",
    "Messages",
    "MqttConnection",
    "packet_cap",
    "publish_once",
    "reconnect_delay",
]

#: How long to wait for the broker's CONNACK after the TCP (and TLS) connection is up.
_CONNACK_TIMEOUT: Final = 10.0
#: How long a clean shutdown waits for the ``offline`` status and the DISCONNECT to go out.
_CLOSE_TIMEOUT: Final = 2.0
#: How long shutdown waits for a connect still running in the executor (paho's connect timeout
#: bounds the TCP connect and TLS handshake to 5 s; a DNS lookup is not bounded by it).
_CONNECT_JOB_TIMEOUT: Final = 10.0
#: Outgoing QoS 1 publishes paho keeps while the broker is away, at most: a long outage must
#: not grow memory without bound.
_MAX_QUEUED_PUBLISHES: Final = 1000
#: How long publish_once() tries before giving up.
_ONCE_TIMEOUT: Final = 10.0
#: paho's keepalive and timeout bookkeeping wants calling about once a second.
_MISC_INTERVAL: Final = 1.0
#: Exponent cap of the backoff, so 2**attempt stays a small float.
_MAX_BACKOFF_EXPONENT: Final = 32
#: MQTT 5 Maximum Packet Size asked of the broker: this many times ``max_payload``, at least
#: :data:`_MIN_PACKET_CAP`. Between ``max_payload`` and the cap a message reaches us and is
#: counted; beyond it the broker drops it without sending, so paho (which buffers a whole
#: packet before we see it) never holds more than the cap.
_PACKET_CAP_FACTOR: Final = 16
_MIN_PACKET_CAP: Final = 1 << 20
_MAX_PACKET_CAP: Final = 268_435_460  # the largest an MQTT packet can be, with its fixed header


def packet_cap(max_payload: int) -> int:
    """The Maximum Packet Size an MQTT 5 connection asks the broker for."""
    return min(_MAX_PACKET_CAP, max(_MIN_PACKET_CAP, _PACKET_CAP_FACTOR * max_payload))


def reconnect_delay(
    attempt: int, low: float, high: float, rand: Callable[[], float] = _random.random
) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): capped exponential backoff
    with full jitter between ``low`` and the cap ``min(high, low * 2**attempt)``.

    The jitter keeps many daemons (or many retries) from hammering a recovering broker or
    spool in lock-step; ``low`` stays the floor so a flapping link is never retried in a
    tight loop.
    """
    cap = min(high, low * 2.0 ** min(attempt, _MAX_BACKOFF_EXPONENT))
    return low + (max(cap, low) - low) * rand()


class Message:
    """A message as the broker sent it, marked with the connection and the broker session it
    arrived on: an ack goes only on that connection, a redelivery happens only in that session."""

    __slots__ = ("_message", "connection", "received_at", "session")

    def __init__(
        self, message: paho.MQTTMessage, *, connection: int, session: int, received_at: float
    ) -> None:
        self._message = message
        self.connection = connection
        self.session = session
        self.received_at = received_at

    @property
    def topic(self) -> str:
        """The topic; raises :class:`UnicodeDecodeError` when the broker sent one not UTF-8."""
        return self._message.topic

    @property
    def payload(self) -> bytes | bytearray:
        return self._message.payload

    @property
    def qos(self) -> int:
        return self._message.qos

    @property
    def retain(self) -> bool:
        return self._message.retain

    @property
    def mid(self) -> int:
        """The packet id, taken in the session until the message is acknowledged."""
        return self._message.mid

    @property
    def properties(self) -> Properties | None:
        """MQTT 5 properties (user properties, content type); ``None`` on MQTT 3.1.1."""
        return self._message.properties


class Messages:
    """The messages the connection's screen let through, in arrival order:
    ``async for message in connection.messages``; ``len()`` is how many wait."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Message] = asyncio.Queue()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        return await self._queue.get()

    def __len__(self) -> int:
        return self._queue.qsize()

    def put(self, message: Message) -> None:
        self._queue.put_nowait(message)


class _ConnectFailed(Exception):
    """One connection attempt failed; the text says why (never with credentials)."""


def _tls_context(config: MqttConfig) -> ssl.SSLContext:
    try:
        # No ca_file: the system's CAs, as any TLS client would.
        context = ssl.create_default_context(cafile=config.ca_file or None)
        if config.cert_file:
            context.load_cert_chain(config.cert_file, config.key_file or None)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"mqtt: cannot load the TLS files: {exc}") from exc
    return context


def _paho_client(config: MqttConfig) -> paho.Client:
    v5 = config.protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=config.client_id,
        # MQTT 5 says clean_start per CONNECT; 3.1.1 says clean_session here, and has no
        # expiry: session_expiry = 0 (no session kept after disconnect) maps to a clean one.
        clean_session=None if v5 else config.session_expiry == 0,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        manual_ack=True,
        # Otherwise a 3.1.1 refusal makes paho reconnect as 3.1, blocking, by itself.
        reconnect_on_failure=False,
    )
    password = config.password.get_secret_value() if config.password is not None else None
    if config.username or password:
        client.username_pw_set(config.username or None, password)
    if config.tls:
        client.tls_set_context(_tls_context(config))
    if config.status_topic:
        client.will_set(config.status_topic, b"offline", qos=1, retain=True)
    client.max_queued_messages_set(_MAX_QUEUED_PUBLISHES)
    return client


def _reason_text(reason: ReasonCode | None) -> str:
    return "connection lost" if reason is None else str(reason)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Done-callback for futures nobody may await: mark their exception as seen."""
    if not future.cancelled():
        future.exception()


async def _first(*waits: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


class _SocketWatch:
    """paho's socket on the event loop: read when it is readable, write while paho has bytes to
    send, and paho's keepalive bookkeeping once a second while a connection is up."""

    def __init__(self, client: paho.Client) -> None:
        self._client = client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._fd: int | None = None
        self._writing = False
        self._misc: asyncio.Task[None] | None = None
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the client lives on: the running one, the first time this is asked."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        return self._loop

    def watch(self) -> None:
        sock = self._client.socket()
        if sock is None:
            return
        loop = self.loop()
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self._on_readable)
        if self._client.want_write():  # the CONNECT paho queued from the executor thread
            loop.add_writer(self._fd, self._on_writable)
            self._writing = True
        self._misc = loop.create_task(self._misc_loop(), name="mqtt-keepalive")

    def unwatch(self) -> None:
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._fd = None
        self._writing = False
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    def drop_socket(self) -> None:
        """Close the connection without a DISCONNECT (the broker then publishes our will)."""
        self.unwatch()
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    def _on_readable(self) -> None:
        rc = self._client.loop_read()
        # TLS may have decrypted more than paho read: that data is in the SSL object, not the
        # kernel socket, so the loop would not call us again for it.
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            sock = self._client.socket()
            pending = getattr(sock, "pending", None)
            if sock is None or pending is None or pending() <= 0:
                break
            rc = self._client.loop_read()

    def _on_writable(self) -> None:
        self._client.loop_write()

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(_MISC_INTERVAL)
            if self._client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    # paho's socket callbacks: on the loop thread unless noted; they must not raise.

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Called from the executor thread during connect(); MqttConnection registers the socket.
        return

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread():
            self.unwatch()
        # From the executor thread this is reconnect() closing a socket already unregistered
        # before the client was handed over.

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread() and self._fd is not None and not self._writing:
            self.loop().add_writer(self._fd, self._on_writable)
            self._writing = True

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread() and self._fd is not None and self._writing:
            self.loop().remove_writer(self._fd)
            self._writing = False


class _Subscriptions:
    """The filters wanted and the ones to drop, kept across connections: each connect drops
    the stale and subscribes all wanted; while connected, changes go out at once."""

    def __init__(self, client: paho.Client, config: MqttConfig, log: logging.Logger) -> None:
        self._client = client
        self._share_group = config.share_group
        self._v5 = config.protocol == "5"
        self._log = log
        self._wanted: dict[str, int] = {}  # filter -> QoS
        self._stale: set[str] = set()
        self._requests: dict[int, tuple[str, ...]] = {}  # SUBSCRIBE packet id -> its filters
        #: Filters of this instance alone: never shared, retained messages sent.
        self._own: set[str] = set()

    def add(self, filters: Sequence[str], qos: int, *, now: bool, own: bool = False) -> None:
        new = [f for f in dict.fromkeys(filters) if f not in self._wanted]
        for topic_filter in new:
            self._wanted[topic_filter] = qos
            if own:
                self._own.add(topic_filter)
            else:
                self._own.discard(topic_filter)
        self._stale.difference_update(new)
        if now:
            self._subscribe(new)

    def remove(self, filters: Sequence[str], *, now: bool) -> None:
        gone = [f for f in dict.fromkeys(filters) if f in self._wanted]
        for topic_filter in gone:
            del self._wanted[topic_filter]
        self._stale.update(gone)
        if now:
            self._unsubscribe_stale()

    def restore(self) -> int | None:
        """On a new connection: drop the stale, subscribe all wanted; the SUBSCRIBE's packet
        id, or ``None`` when nothing was asked for."""
        self._unsubscribe_stale()
        return self._subscribe(list(self._wanted))

    def acknowledged(self, mid: int, reasons: list[ReasonCode]) -> None:
        filters = self._requests.pop(mid, ())
        for topic, reason in zip(filters, reasons, strict=False):
            if reason.is_failure:
                self._log.error("subscription to %r refused by the broker: %s", topic, reason)

    def _subscription(self, topic_filter: str) -> str:
        group = self._share_group
        if not group or topic_filter in self._own:
            return topic_filter
        return f"$share/{group}/{topic_filter}"

    def _subscribe(self, filters: Sequence[str]) -> int | None:
        if not filters:
            return None
        topics: list[tuple[str, Any]]
        if self._v5:
            topics = [
                (
                    self._subscription(f),
                    SubscribeOptions(
                        qos=self._wanted[f],
                        retainHandling=(
                            SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
                            if f in self._own
                            else SubscribeOptions.RETAIN_DO_NOT_SEND
                        ),
                    ),
                )
                for f in filters
            ]
        else:
            topics = [(self._subscription(f), self._wanted[f]) for f in filters]
        rc, mid = self._client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            self._log.error("cannot subscribe to %s: %s", list(filters), paho.error_string(rc))
            return None
        self._requests[mid] = tuple(filters)
        return mid

    def _unsubscribe_stale(self) -> None:
        if not self._stale:
            return
        stale = sorted(self._stale)
        self._stale.clear()
        rc, _ = self._client.unsubscribe([self._subscription(f) for f in stale])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._log.error("cannot unsubscribe from %s: %s", stale, paho.error_string(rc))


class MqttConnection:
    """One client id's connection to the broker, kept up by :meth:`run` until :meth:`aclose`.

    ``screen(message)`` runs on receipt, on the loop thread, and returns whether the message
    goes to :attr:`messages`; one it keeps out it must :meth:`ack` itself or leave for
    redelivery. ``on_link(up)`` hears of every CONNACK (``True``) and every loss or close
    (``False``). With ``mqtt.status_topic`` set, ``online`` is published (retained) once the
    subscriptions are asked for, ``offline`` on :meth:`aclose` and as the will otherwise.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        screen: Callable[[Message], bool] | None = None,
        on_link: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.time,
        random: Callable[[], float] = _random.random,
        logger: logging.Logger | None = None,
    ) -> None:
        self._config = config
        self._endpoint = config.endpoint  # scheme://host:port, never credentials
        self._screen = screen
        self._on_link = on_link
        self._clock = clock
        self._random = random
        self._log = logger if logger is not None else logging.getLogger("phonepush.mqtt")
        self._client = _paho_client(config)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._io = _SocketWatch(self._client)
        self._subscriptions = _Subscriptions(self._client, config, self._log)
        self._messages = Messages()

        self._connect_job: asyncio.Future[MQTTErrorCode] | None = None
        self._connack: asyncio.Future[bool] | None = None
        self._link_up = False  # CONNACK received and the socket still open
        self._ready = False  # ... and the subscriptions made at connect acknowledged
        self._link = asyncio.Event()
        self._lost = asyncio.Event()
        self._closed = asyncio.Event()
        self._closing = False
        self._generation = 0
        self._epoch = 0
        self._ready_mid: int | None = None
        self._publishes: dict[int, asyncio.Future[None]] = {}

    @property
    def connected(self) -> bool:
        """True while connected to the broker with our subscriptions acknowledged."""
        return self._ready

    @property
    def linked(self) -> bool:
        """True while a publish goes out at once: connected (CONNACK) and not closing."""
        return self._link_up and not self._closing

    @property
    def session(self) -> int:
        """Which broker session is current: it changes when the broker kept nothing of ours."""
        return self._epoch

    @property
    def messages(self) -> Messages:
        return self._messages

    async def __aenter__(self) -> Self:
        self._io.loop()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def run(self) -> None:
        """Connect, and reconnect whenever the connection is lost; until cancelled or closed."""
        self._io.loop()
        attempt = 0
        while not self._closing:
            self._log.debug("connecting to %s (attempt %d)", self._endpoint, attempt + 1)
            try:
                await self._connect()
            except _ConnectFailed as exc:
                if self._closing:
                    return
                delay = reconnect_delay(
                    attempt, self._config.reconnect_min, self._config.reconnect_max, self._random
                )
                attempt += 1
                self._log.warning(
                    "cannot connect to %s (attempt %d): %s; next attempt in %.2f s",
                    self._endpoint,
                    attempt,
                    exc,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), delay)
                continue
            attempt = 0
            await self._lost.wait()
            if not self._closing:
                # Not straight back: a broker that drops us at once (another client with our
                # id, a failing ACL) must not turn this into a tight loop.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), self._config.reconnect_min)

    def subscribe(self, filters: Sequence[str], qos: int = 1, *, own: bool = False) -> None:
        """Subscribe to ``filters`` now if connected, and on every connect from now on.

        ``own``: for this instance alone (never under ``mqtt.share_group``), with the retained
        messages sent (state to read, not events).
        """
        self._subscriptions.add(filters, qos, now=self._link_up, own=own)

    def unsubscribe(self, filters: Sequence[str]) -> None:
        """Unsubscribe from ``filters`` now if connected, else on the next connect (the
        persistent session would otherwise keep them)."""
        self._subscriptions.remove(filters, now=self._link_up)

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish and wait until the broker took it (PUBACK for QoS 1).

        Waits for the connection when the broker is away (bound it with a timeout); raises
        :class:`~phonepush.errors.MqttError` if the broker refuses it or the connection closes.
        """
        while not self._link_up:
            if self._closing:
                raise MqttError("the MQTT source is closed")
            await _first(self._link.wait(), self._closed.wait())
        await self.publish_nowait(topic, payload, qos=qos, retain=retain)

    def publish_nowait(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Hand a publish to paho (connected, on the loop thread); the future ends with its ack.

        Raises :class:`~phonepush.errors.MqttError` when paho will not take it.
        """
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:  # bad topic, QoS or size
            raise MqttError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not (
            qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN  # kept and resent by paho
        ):
            raise MqttError(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        future: asyncio.Future[None] = self._io.loop().create_future()
        self._publishes[info.mid] = future
        return future

    def ack(self, message: Message) -> bool:
        """Acknowledge ``message`` (PUBACK for QoS 1); False when the connection it came on is
        gone, so only the broker's redelivery of it can still be acknowledged."""
        if message.qos == 0:
            return True
        if message.connection != self._generation or not self._link_up:
            return False
        self._client.ack(message.mid, message.qos)
        return True

    async def aclose(self) -> None:
        """Publish ``offline`` (retained), disconnect cleanly, release the socket."""
        if self._closing:
            return
        self._closing = True
        self._closed.set()
        job = self._connect_job
        if job is not None and not job.done():
            # The executor still owns the client; touching it now would race that thread.
            await asyncio.wait([job], timeout=_CONNECT_JOB_TIMEOUT)
        if self._link_up:
            if self._config.status_topic:
                with contextlib.suppress(MqttError, TimeoutError):
                    async with asyncio.timeout(_CLOSE_TIMEOUT):
                        await self.publish_nowait(
                            self._config.status_topic, b"offline", qos=1, retain=True
                        )
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await self._lost.wait()
        self._io.drop_socket()
        self._link_up = self._ready = False
        self._link.clear()
        self._lost.set()
        if self._on_link is not None:
            self._on_link(False)
        for future in self._publishes.values():
            if not future.done():
                future.set_exception(MqttError("the MQTT source closed before the broker acked"))
        self._publishes.clear()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(_ConnectFailed("closed"))

    async def _connect(self) -> None:
        loop = self._io.loop()
        self._io.unwatch()  # whatever the last connection left, before the executor has the client
        self._lost.clear()
        self._connack = loop.create_future()
        self._connack.add_done_callback(_retrieve)
        config = self._config
        if config.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = config.session_expiry
            props.ReceiveMaximum = config.receive_maximum
            props.MaximumPacketSize = packet_cap(config.max_payload)
            connect = functools.partial(
                self._client.connect,
                config.host,
                config.port,
                config.keepalive,
                clean_start=False,
                properties=props,
            )
        else:
            connect = functools.partial(
                self._client.connect, config.host, config.port, config.keepalive
            )
        job = loop.run_in_executor(None, connect)
        job.add_done_callback(_retrieve)
        self._connect_job = job
        try:
            # Shielded: a cancelled run() must not leave the thread's socket unaccounted for;
            # aclose() waits for the job before it touches the client.
            await asyncio.shield(job)
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            raise _ConnectFailed(str(exc) or type(exc).__name__) from exc
        if self._closing:
            raise _ConnectFailed("closed")
        self._io.watch()
        try:
            async with asyncio.timeout(_CONNACK_TIMEOUT):
                await self._connack
        except TimeoutError:
            self._io.drop_socket()
            raise _ConnectFailed(f"no CONNACK within {_CONNACK_TIMEOUT:.0f} s") from None

    # paho callbacks, on the loop thread; they must not raise.

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        connack = self._connack
        if reason.is_failure:
            if connack is not None and not connack.done():
                connack.set_exception(_ConnectFailed(f"refused by the broker: {reason}"))
            return
        self._generation += 1
        if not flags.session_present:
            # The broker kept nothing of ours: nothing will be redelivered.
            self._epoch += 1
        self._link_up = True
        self._link.set()
        if self._on_link is not None:
            self._on_link(True)
        self._log.info(
            "connected to %s as %r (%s session)",
            self._endpoint,
            self._config.client_id,
            "resumed" if flags.session_present else "new",
        )
        # Subscribe before announcing ourselves: the broker handles packets in order, so
        # whoever sees "online" knows the subscriptions are in place.
        self._ready_mid = self._subscriptions.restore()
        if self._ready_mid is None:
            self._ready = True
        if self._config.status_topic:
            with contextlib.suppress(MqttError):
                self.publish_nowait(self._config.status_topic, b"online", qos=1, retain=True)
        if connack is not None and not connack.done():
            connack.set_result(bool(flags.session_present))

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode | None,
        properties: Properties | None,
    ) -> None:
        connack = self._connack
        if connack is not None and not connack.done():
            connack.set_exception(_ConnectFailed(_reason_text(reason)))
        if self._link_up:
            if self._closing:
                self._log.info("disconnected from %s", self._endpoint)
            else:
                self._log.warning("disconnected from %s: %s", self._endpoint, _reason_text(reason))
        self._link_up = self._ready = False
        self._link.clear()
        self._lost.set()
        if self._on_link is not None:
            self._on_link(False)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._subscriptions.acknowledged(mid, reasons)
        if mid == self._ready_mid and self._link_up:
            self._ready = True

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        future = self._publishes.pop(mid, None)
        if future is None or future.done():
            return
        if reason.is_failure:
            future.set_exception(MqttError(f"the broker refused the publish: {reason}"))
        else:
            future.set_result(None)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        received = Message(
            message,
            connection=self._generation,
            session=self._epoch,
            received_at=self._clock(),
        )
        if self._screen is None or self._screen(received):
            self._messages.put(received)


async def publish_once(
    config: MqttConfig,
    topic: str,
    payload: bytes | str,
    *,
    qos: int = 1,
    retain: bool = False,
) -> None:
    """Connect, publish one message, wait for the broker's ack, disconnect (``phonepush fire``).

    Uses its own client id and no session, status or will, so it never takes over the
    daemon's session. Raises :class:`~phonepush.errors.MqttError` if the message is not
    acknowledged within 10 seconds.
    """
    one_off = config.model_copy(
        update={
            "client_id": f"{config.client_id}-once-{secrets.token_hex(4)}",
            "session_expiry": 0,
            "status_topic": "",
            "outcome_topic": "",
        }
    )
    # Subscribed to nothing, in a session of its own: nothing can arrive, nothing is screened.
    connection = MqttConnection(one_off)
    failure: MqttError | None = None
    # Raised outside the task group, which would otherwise wrap it in an ExceptionGroup.
    async with connection, asyncio.TaskGroup() as tasks:
        runner = tasks.create_task(connection.run(), name="mqtt-once")
        try:
            async with asyncio.timeout(_ONCE_TIMEOUT):
                await connection.publish(topic, payload, qos=qos, retain=retain)
        except TimeoutError:
            failure = MqttError(
                f"no acknowledgement from {config.endpoint} within {_ONCE_TIMEOUT:g} s"
            )
        except MqttError as exc:
            failure = exc
        finally:
            runner.cancel()
    if failure is not None:
        raise failure
