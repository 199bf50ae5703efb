"""The MQTT source: paho-mqtt 2.x on the asyncio loop, QoS 1, manual acknowledgement.

A message is acknowledged (PUBACK) only after ``accept(event)`` returned, i.e. after intake
committed the event to the spool. Until then the broker holds it in our persistent session
(stable client id, ``clean_start``/``clean_session`` off, Session Expiry Interval) and
redelivers it after a reconnect or a restart, so delivery is at-least-once. The MQTT 5
Receive Maximum bounds how many unacknowledged messages the broker sends us at once: it is
our flow control when the spool pushes back. (MQTT 3.1.1 has no such property; the broker's
own in-flight limit applies, ``max_inflight_messages`` in mosquitto.)

Why paho runs on the event loop (``add_reader``/``add_writer`` on its socket with
``loop_read``/``loop_write``/``loop_misc``) rather than in its own thread (``loop_start``):
acknowledgements, publishes and subscriptions then all happen on the loop thread, so nothing
in paho's state is shared between threads and no lock ordering has to be reasoned about. The
single exception is the blocking TCP connect, TLS handshake and DNS lookup inside
``Client.connect``; it runs in the default executor while the loop thread leaves the client
alone (every other use of the client waits for the CONNACK). Socket callbacks paho makes from
that thread are ignored: the socket is registered with the loop once the connect returns.

Retained messages are not events: a retained message arriving because we (re)subscribed is a
past state (yesterday's doorbell press), and ringing phones for it would be wrong. MQTT 5
subscriptions ask the broker not to send them at all (Retain Handling 2); any message still
flagged retained is acknowledged and skipped. Messages on our own status and outcome topics
are skipped too, so a ``#`` filter cannot feed our outcomes back in as events.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random as _random
import secrets
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from phonepush.config import MqttConfig
from phonepush.errors import ConfigError, MqttError, SpoolError, SpoolFull
from phonepush.events import Event
from phonepush.logs import LogLimiter
from phonepush.metrics import Metrics

__all__ = ["MqttSource", "packet_cap", "publish_once", "reconnect_delay"]

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
# Topics remembered as matching our filters or not; cleared when full or the filters change.
_MATCH_MEMO: Final = 4096
#: An oversized message is logged once per topic in this many seconds ...
_TOO_LARGE_LOG_INTERVAL: Final = 60.0
#: ... with at most this many topics remembered (a flood of distinct topics shares one line) ...
_TOO_LARGE_TOPICS: Final = 1024
#: ... each by at most this many characters of its name (a topic may be 64 KiB long).
_TOPIC_LOG_CHARS: Final = 200
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


def _tls_context(config: MqttConfig) -> ssl.SSLContext:
    try:
        # No ca_file: the system's CAs, as any TLS client would.
        context = ssl.create_default_context(cafile=config.ca_file or None)
        if config.cert_file:
            context.load_cert_chain(config.cert_file, config.key_file or None)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"mqtt: cannot load the TLS files: {exc}") from exc
    return context


class _ConnectFailed(Exception):
    """One connection attempt failed; the text says why (never with credentials)."""


@dataclass(frozen=True, slots=True)
class _Inbound:
    """A message handed from paho's callback to the consumer, with the connection it came on."""

    event: Event
    mid: int
    qos: int
    generation: int  # which connection (CONNACK) it arrived on: acks go only on that one
    epoch: int  # which broker session: a redelivery is only recognised within the same one


def _headers(message: paho.MQTTMessage) -> dict[str, str]:
    """MQTT 5 user properties (and Content Type) as event headers, keys in lower case."""
    props = message.properties
    if props is None:
        return {}
    headers: dict[str, str] = {}
    for key, value in getattr(props, "UserProperty", None) or []:
        name = str(key).lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else str(value)
    content_type = getattr(props, "ContentType", None)
    if content_type and "content-type" not in headers:
        headers["content-type"] = str(content_type)
    return headers


def _unique(filters: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(filters))


def _reason_text(reason: ReasonCode | None) -> str:
    return "connection lost" if reason is None else str(reason)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Done-callback for futures nobody may await: mark their exception as seen."""
    if not future.cancelled():
        future.exception()


class MqttSource:
    """The MQTT source. An async context manager; :meth:`run` is its long-lived task body.

    ``accept(event)`` must commit the event (intake → spool) and return, or raise
    :class:`~phonepush.errors.SpoolError` when it cannot; the message is then retried, in
    order and unacknowledged, with capped backoff between ``retry_min`` and ``retry_max``
    seconds, each refusal counted in ``phonepush_events_rejected_total{source="mqtt"}``.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        filters: Sequence[str],
        accept: Callable[[Event], Awaitable[object]],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        random: Callable[[], float] = _random.random,
        retry_min: float = 0.1,
        retry_max: float = 5.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self._config = config
        self._endpoint = config.endpoint  # scheme://host:port, never credentials
        self._filters = _unique(filters)
        # topic_matches_sub builds a matcher per call: with a filter per rule, checking every
        # message against all of them cost more than the rest of intake.
        self._matched: dict[str, bool] = {}
        self._too_large_log = LogLimiter(_TOO_LARGE_LOG_INTERVAL, _TOO_LARGE_TOPICS)
        self._accept = accept
        self._metrics = metrics
        self._clock = clock
        self._random = random
        self._retry = (retry_min, retry_max)
        self._log = logger if logger is not None else logging.getLogger("phonepush.mqtt")
        self._v5 = config.protocol == "5"
        if config.qos > 1:
            # A QoS 2 PUBREC would tell the broker the message is ours before intake has
            # committed it; QoS 1 with manual PUBACK is the guarantee this source gives.
            self._log.warning("mqtt.qos = %d: subscribing with QoS 1", config.qos)
        self._qos = min(config.qos, 1)
        self._client = self._make_client()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._fd: int | None = None
        self._writing = False
        self._misc: asyncio.Task[None] | None = None
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
        self._sub_requests: dict[int, tuple[str, ...]] = {}
        self._stale_filters: set[str] = set()
        self._publishes: dict[int, asyncio.Future[None]] = {}

        self._queue: asyncio.Queue[_Inbound] = asyncio.Queue()
        # Events committed whose PUBACK could not go out (the connection went first), by packet
        # id: the broker redelivers them on the resumed session and we ack without a second
        # accept. The id stays taken in the session until acked, so it cannot name another one.
        self._committed: dict[int, tuple[int, str, bytes]] = {}
        self._intake_stopped = False
        self._intake_stop = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- public ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while connected to the broker with our subscriptions acknowledged."""
        return self._ready

    async def __aenter__(self) -> Self:
        self._bind_loop()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def run(self) -> None:
        """Connect, subscribe, take messages, reconnect; until cancelled or closed.

        On cancellation, messages not yet committed stay unacknowledged: the broker redelivers
        them to the next connection with our client id.
        """
        self._bind_loop()
        async with asyncio.TaskGroup() as tasks:
            consumer = tasks.create_task(self._consume(), name="mqtt-consume")
            await self._maintain()
            consumer.cancel()

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish and wait until the broker took it (PUBACK for QoS 1).

        Waits for the connection when the broker is away (bound it with a timeout); raises
        :class:`~phonepush.errors.MqttError` if the broker refuses it or the source closes.
        """
        while not self._link_up:
            if self._closing:
                raise MqttError("the MQTT source is closed")
            await self._first(self._link.wait(), self._closed.wait())
        await self._send(topic, payload, qos=qos, retain=retain)

    async def publish_outcome(self, outcome: Mapping[str, object]) -> None:
        """Publish a delivery outcome as JSON to ``outcome_topic`` (QoS 1), if one is set.

        Best effort, never waiting for the broker: outcomes are information, and the dispatcher
        must not stall on them. One produced while the broker is unreachable is dropped.
        """
        topic = self._config.outcome_topic
        if not topic:
            return
        if not self._link_up or self._closing:
            self._log.debug("outcome not published to %s: not connected", topic)
            return
        body = json.dumps(outcome, separators=(",", ":"), default=str)
        try:
            future = self._send_now(topic, body, qos=1, retain=False)
        except MqttError as exc:
            self._log.warning("outcome not published to %s: %s", topic, exc)
            return
        future.add_done_callback(self._outcome_done)

    def update_filters(self, filters: Sequence[str]) -> None:
        """Take a new filter list (config reload): subscribe the new ones, drop the removed."""
        new = _unique(filters)
        added = [f for f in new if f not in self._filters]
        removed = [f for f in self._filters if f not in new]
        self._filters = new
        self._matched.clear()
        self._stale_filters.update(removed)
        self._stale_filters.difference_update(new)
        if not self._link_up:
            return  # the next connect subscribes what is current and drops what is stale
        self._unsubscribe_stale()
        self._subscribe(added)

    async def stop_intake(self) -> None:
        """Shutdown, step 1: take no more messages; finish (and ack) the one being committed.

        Nothing is unsubscribed: the persistent session keeps collecting messages for the next
        start. Messages received but not yet committed stay unacknowledged for redelivery.
        """
        self._intake_stopped = True
        self._intake_stop.set()
        while not self._queue.empty():
            self._queue.get_nowait()
        await self._idle.wait()

    async def aclose(self) -> None:
        """Publish ``offline`` (retained), disconnect cleanly, release the socket."""
        if self._closing:
            return
        self._closing = True
        self._closed.set()
        self._intake_stopped = True
        self._intake_stop.set()
        job = self._connect_job
        if job is not None and not job.done():
            # The executor still owns the client; touching it now would race that thread.
            await asyncio.wait([job], timeout=_CONNECT_JOB_TIMEOUT)
        if self._link_up:
            if self._config.status_topic:
                with contextlib.suppress(MqttError, TimeoutError):
                    async with asyncio.timeout(_CLOSE_TIMEOUT):
                        await self._send(self._config.status_topic, b"offline", qos=1, retain=True)
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await self._lost.wait()
        self._drop_socket()
        self._link_up = self._ready = False
        self._link.clear()
        self._lost.set()
        self._metrics.mqtt_connected.set(0)
        for future in self._publishes.values():
            if not future.done():
                future.set_exception(MqttError("the MQTT source closed before the broker acked"))
        self._publishes.clear()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(_ConnectFailed("closed"))

    # -- connection ---------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        config = self._config
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            # MQTT 5 says clean_start per CONNECT; 3.1.1 says clean_session here, and has no
            # expiry: session_expiry = 0 (no session kept after disconnect) maps to a clean one.
            clean_session=None if self._v5 else config.session_expiry == 0,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
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
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    def _bind_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._bind_loop()
        assert self._loop is not None
        return self._loop

    async def _maintain(self) -> None:
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

    async def _connect(self) -> None:
        loop = self._running_loop()
        self._unwatch()  # whatever the last connection left, before the executor takes the client
        self._lost.clear()
        self._connack = loop.create_future()
        self._connack.add_done_callback(_retrieve)
        config = self._config
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = config.session_expiry
            props.ReceiveMaximum = config.receive_maximum
            props.MaximumPacketSize = packet_cap(config.max_payload)
            connect = functools.partial(
                self._client.connect,
                self._config.host,
                self._config.port,
                config.keepalive,
                clean_start=False,
                properties=props,
            )
        else:
            connect = functools.partial(
                self._client.connect, self._config.host, self._config.port, config.keepalive
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
        self._watch()
        try:
            async with asyncio.timeout(_CONNACK_TIMEOUT):
                await self._connack
        except TimeoutError:
            self._drop_socket()
            raise _ConnectFailed(f"no CONNACK within {_CONNACK_TIMEOUT:.0f} s") from None

    def _watch(self) -> None:
        sock = self._client.socket()
        if sock is None:
            return
        loop = self._running_loop()
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self._on_readable)
        if self._client.want_write():  # the CONNECT paho queued from the executor thread
            loop.add_writer(self._fd, self._on_writable)
            self._writing = True
        self._misc = loop.create_task(self._misc_loop(), name="mqtt-keepalive")

    def _unwatch(self) -> None:
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._fd = None
        self._writing = False
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    def _drop_socket(self) -> None:
        """Close the connection without a DISCONNECT (the broker then publishes our will)."""
        self._unwatch()
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

    # paho callbacks. On the loop thread unless noted; they must not raise.

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Called from the executor thread during connect(); _connect() registers the socket.
        return

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread():
            self._unwatch()
        # From the executor thread this is reconnect() closing a socket _connect() already
        # unregistered before handing the client over.

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread() and self._fd is not None and not self._writing:
            self._running_loop().add_writer(self._fd, self._on_writable)
            self._writing = True

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread() and self._fd is not None and self._writing:
            self._running_loop().remove_writer(self._fd)
            self._writing = False

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
            self._committed.clear()
        self._link_up = True
        self._link.set()
        self._metrics.mqtt_connected.set(1)
        self._log.info(
            "connected to %s as %r (%s session)",
            self._endpoint,
            self._config.client_id,
            "resumed" if flags.session_present else "new",
        )
        # Subscribe before announcing ourselves: the broker handles packets in order, so
        # whoever sees "online" knows the subscriptions are in place.
        self._unsubscribe_stale()
        self._ready_mid = self._subscribe(self._filters)
        if self._ready_mid is None:
            self._ready = True
        if self._config.status_topic:
            with contextlib.suppress(MqttError):
                self._send_now(self._config.status_topic, b"online", qos=1, retain=True)
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
        self._metrics.mqtt_connected.set(0)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        filters = self._sub_requests.pop(mid, ())
        for topic, reason in zip(filters, reasons, strict=False):
            if reason.is_failure:
                self._log.error("subscription to %r refused by the broker: %s", topic, reason)
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
        self._metrics.mqtt_messages.inc()
        if self._intake_stopped:
            return  # left unacknowledged: the broker redelivers it to our next connection
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._log.warning("skipping a message whose topic is not UTF-8")
            self._skip(message, "bad_topic")
            return
        if message.retain:
            self._log.debug("skipping retained message on %s", topic)
            self._skip(message, "")
            return
        if topic in (self._config.status_topic, self._config.outcome_topic):
            self._skip(message, "")
            return
        matched = self._matched.get(topic)
        if matched is None:
            if len(self._matched) >= _MATCH_MEMO:
                self._matched.clear()
            matched = self._matched[topic] = any(
                paho.topic_matches_sub(f, topic) for f in self._filters
            )
        if not matched:
            # Left over in a resumed session from filters we no longer have.
            self._skip(message, "")
            return
        if len(message.payload) > self._config.max_payload:
            # Acknowledged, so the broker never sends it again; never decoded nor stored.
            self._skip(message, "too_large")
            shown = topic[:_TOPIC_LOG_CHARS]
            if self._too_large_log.allow(shown):
                self._log.warning(
                    "dropping messages on %s over mqtt.max_payload (%d bytes, limit %d);"
                    " next note about this topic in %.0f s at the earliest",
                    shown + ("..." if len(topic) > _TOPIC_LOG_CHARS else ""),
                    len(message.payload),
                    self._config.max_payload,
                    _TOO_LARGE_LOG_INTERVAL,
                )
            return
        if message.qos == 0 and self._queue.qsize() >= self._config.receive_maximum:
            # QoS 0 has no flow control; past the limit we drop rather than queue without end.
            self._skip(message, "overflow")
            return
        event = Event(
            source="mqtt",
            topic=topic,
            payload=bytes(message.payload),
            headers=_headers(message) if self._v5 else {},
            received_at=self._clock(),
        )
        self._queue.put_nowait(
            _Inbound(event, message.mid, message.qos, self._generation, self._epoch)
        )

    def _skip(self, message: paho.MQTTMessage, reason: str) -> None:
        if reason:
            self._metrics.events_rejected.labels("mqtt", reason).inc()
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    # -- subscriptions and publishes ------------------------------------------------------------

    def _subscription(self, topic_filter: str) -> str:
        group = self._config.share_group
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    def _subscribe(self, filters: Sequence[str]) -> int | None:
        if not filters:
            return None
        topics: list[tuple[str, Any]]
        if self._v5:
            options = SubscribeOptions(
                qos=self._qos, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND
            )
            topics = [(self._subscription(f), options) for f in filters]
        else:
            topics = [(self._subscription(f), self._qos) for f in filters]
        rc, mid = self._client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            self._log.error("cannot subscribe to %s: %s", list(filters), paho.error_string(rc))
            return None
        self._sub_requests[mid] = tuple(filters)
        return mid

    def _unsubscribe_stale(self) -> None:
        if not self._stale_filters:
            return
        stale = sorted(self._stale_filters)
        self._stale_filters.clear()
        rc, _ = self._client.unsubscribe([self._subscription(f) for f in stale])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._log.error("cannot unsubscribe from %s: %s", stale, paho.error_string(rc))

    async def _send(self, topic: str, payload: bytes | str, *, qos: int, retain: bool) -> None:
        await self._send_now(topic, payload, qos=qos, retain=retain)

    def _send_now(
        self, topic: str, payload: bytes | str, *, qos: int, retain: bool
    ) -> asyncio.Future[None]:
        """Hand a publish to paho (connected, on the loop thread); the future ends with its ack."""
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:  # bad topic, QoS or size
            raise MqttError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not (
            qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN  # kept and resent by paho
        ):
            raise MqttError(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        future: asyncio.Future[None] = self._running_loop().create_future()
        self._publishes[info.mid] = future
        return future

    def _outcome_done(self, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._log.warning("outcome not published: %s", exc)

    @staticmethod
    async def _first(*waits: Awaitable[object]) -> None:
        tasks = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()

    # -- intake ---------------------------------------------------------------------------------

    async def _consume(self) -> None:
        while True:
            item = await self._queue.get()
            if not self._intake_stopped:
                await self._take(item)

    async def _take(self, item: _Inbound) -> None:
        event = item.event
        key = (item.epoch, event.topic, event.payload)
        if item.qos > 0 and self._committed.get(item.mid) == key:
            # The redelivery of one we committed but could not ack: ack it, don't take it twice.
            del self._committed[item.mid]
            self._log.debug("redelivered message on %s was already taken", event.topic)
            self._ack(item)
            return
        attempt = 0
        while not self._intake_stopped:
            self._idle.clear()
            try:
                await self._accept(event)
            except SpoolError as exc:
                reason = "spool_full" if isinstance(exc, SpoolFull) else "spool_error"
                self._metrics.events_rejected.labels("mqtt", reason).inc()
                delay = reconnect_delay(attempt, *self._retry, self._random)
                attempt += 1
                self._log.warning(
                    "cannot take message on %s (%s); left unacknowledged, retry in %.2f s",
                    event.topic,
                    exc,
                    delay,
                )
            except Exception:  # noqa: BLE001 - logged with its traceback just below
                # Not a spool problem: retrying would block every later message behind this
                # one for good. Drop it loudly.
                self._log.exception("dropping message on %s: intake failed", event.topic)
                self._metrics.events_rejected.labels("mqtt", "error").inc()
                self._ack(item)
                return
            else:
                self._ack(item)
                return
            finally:
                # Also on cancellation: stop_intake() must not wait for an accept that is gone.
                self._idle.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._intake_stop.wait(), delay)

    def _ack(self, item: _Inbound) -> None:
        if item.qos == 0:
            return
        if item.generation == self._generation and self._link_up:
            self._client.ack(item.mid, item.qos)
        else:
            self._committed[item.mid] = (item.epoch, item.event.topic, item.event.payload)


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
    source = MqttSource(one_off, filters=(), accept=_refuse, metrics=Metrics())
    failure: MqttError | None = None
    # Raised outside the task group, which would otherwise wrap it in an ExceptionGroup.
    async with source, asyncio.TaskGroup() as tasks:
        runner = tasks.create_task(source.run(), name="mqtt-once")
        try:
            async with asyncio.timeout(_ONCE_TIMEOUT):
                await source.publish(topic, payload, qos=qos, retain=retain)
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


async def _refuse(event: Event) -> None:
    # publish_once subscribes to nothing, so no event can arrive.
    raise SpoolError("this MQTT connection takes no events")
