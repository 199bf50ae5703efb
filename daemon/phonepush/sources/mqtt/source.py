"""The MQTT source: messages from an :class:`~.connection.MqttConnection` become events, QoS 1,
acknowledged only once committed.

A message is acknowledged (PUBACK) only after ``accept(event)`` returned, i.e. after intake
committed the event to the spool. Until then the broker holds it in our persistent session
and redelivers it after a reconnect or a restart, so delivery is at-least-once. The MQTT 5
Receive Maximum bounds how many unacknowledged messages the broker sends us at once: it is
our flow control when the spool pushes back. (MQTT 3.1.1 has no such property; the broker's
own in-flight limit applies, ``max_inflight_messages`` in mosquitto.)

Retained messages are not events: a retained message arriving because we (re)subscribed is a
past state (yesterday's doorbell press), and ringing phones for it would be wrong. MQTT 5
subscriptions ask the broker not to send them at all; any message still flagged retained is
acknowledged and skipped. Messages on our own status and outcome topics are skipped too, so a
``#`` filter cannot feed our outcomes back in as events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random as _random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Final, Self

import paho.mqtt.client as paho

from phonepush.config import MqttConfig
from phonepush.errors import MqttError, SpoolError, SpoolFull
from phonepush.events import Event
from phonepush.logs import LogLimiter
from phonepush.metrics import Metrics
from phonepush.sources.mqtt.connection import Message, MqttConnection, reconnect_delay

__all__ = ["MqttSource"]

# Topics remembered as matching our filters or not; cleared when full or the filters change.
_MATCH_MEMO: Final = 4096
#: An oversized message is logged once per topic in this many seconds ...
_TOO_LARGE_LOG_INTERVAL: Final = 60.0
#: ... with at most this many topics remembered (a flood of distinct topics shares one line) ...
_TOO_LARGE_TOPICS: Final = 1024
#: ... each by at most this many characters of its name (a topic may be 64 KiB long).
_TOPIC_LOG_CHARS: Final = 200


def _headers(message: Message) -> dict[str, str]:
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
        self._filters = _unique(filters)
        # topic_matches_sub builds a matcher per call: with a filter per rule, checking every
        # message against all of them cost more than the rest of intake.
        self._matched: dict[str, bool] = {}
        self._too_large_log = LogLimiter(_TOO_LARGE_LOG_INTERVAL, _TOO_LARGE_TOPICS)
        self._accept = accept
        self._metrics = metrics
        self._random = random
        self._retry = (retry_min, retry_max)
        self._log = logger if logger is not None else logging.getLogger("phonepush.mqtt")
        self._v5 = config.protocol == "5"
        if config.qos > 1:
            # A QoS 2 PUBREC would tell the broker the message is ours before intake has
            # committed it; QoS 1 with manual PUBACK is the guarantee this source gives.
            self._log.warning("mqtt.qos = %d: subscribing with QoS 1", config.qos)
        self._qos = min(config.qos, 1)
        self._connection = MqttConnection(
            config,
            screen=self._screen,
            on_link=self._linked,
            clock=clock,
            random=random,
            logger=self._log,
        )
        self._connection.subscribe(self._filters, self._qos)
        #: Filters whose messages are handed to a callback instead of becoming events.
        self._watched: dict[str, Callable[[str, bytes], None]] = {}
        # Topic -> its watcher or None, as _matched (a match per message would cost).
        self._watcher_of: dict[str, Callable[[str, bytes], None] | None] = {}
        #: Told when a connection starts a new broker session (the broker kept nothing of ours,
        #: likely not our retained messages either: a restart without persistence).
        self.on_new_session: Callable[[], None] | None = None
        self._session_seen: int | None = None  # None: never connected

        # Events committed whose PUBACK could not go out (the connection went first), by packet
        # id: the broker redelivers them on the resumed session and we ack without a second
        # accept. The id stays taken in the session until acked, so it cannot name another one.
        self._committed: dict[int, tuple[int, str, bytes]] = {}
        self._committed_session = 0
        self._intake_stopped = False
        self._intake_stop = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- public ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while connected to the broker with our subscriptions acknowledged."""
        return self._connection.connected

    async def __aenter__(self) -> Self:
        await self._connection.__aenter__()
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
        async with asyncio.TaskGroup() as tasks:
            consumer = tasks.create_task(self._consume(), name="mqtt-consume")
            await self._connection.run()
            consumer.cancel()

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish and wait until the broker took it (PUBACK for QoS 1).

        Waits for the connection when the broker is away (bound it with a timeout); raises
        :class:`~phonepush.errors.MqttError` if the broker refuses it or the source closes.
        """
        await self._connection.publish(topic, payload, qos=qos, retain=retain)

    async def publish_outcome(self, outcome: Mapping[str, object]) -> None:
        """Publish a delivery outcome as JSON to ``outcome_topic`` (QoS 1), if one is set.

        Best effort, never waiting for the broker: outcomes are information, and the dispatcher
        must not stall on them. One produced while the broker is unreachable is dropped.
        """
        topic = self._config.outcome_topic
        if not topic:
            return
        if not self._connection.linked:
            self._log.debug("outcome not published to %s: not connected", topic)
            return
        body = json.dumps(outcome, separators=(",", ":"), default=str)
        try:
            future = self._connection.publish_nowait(topic, body, qos=1, retain=False)
        except MqttError as exc:
            self._log.warning("outcome not published to %s: %s", topic, exc)
            return
        future.add_done_callback(self._outcome_done)

    def update_filters(self, filters: Sequence[str]) -> None:
        """Take a new filter list (config reload): subscribe the new ones, drop the removed."""
        new = _unique(filters)
        added = [f for f in new if f not in self._filters]
        removed = [f for f in self._filters if f not in new and f not in self._watched]
        self._filters = new
        self._matched.clear()
        # Dropped first, as a connect does; offline, the next connect does both.
        self._connection.unsubscribe(removed)
        self._connection.subscribe(added, self._qos)

    def watch(self, topic_filter: str, on_message: Callable[[str, bytes], None]) -> None:
        """Hand each message on ``topic_filter`` to ``on_message(topic, payload)`` on receipt,
        never to the intake: signals and state for this instance (Home Assistant's birth
        message, the retained configs it holds), not events. Retained messages included; never
        shared under ``mqtt.share_group``."""
        self._watched[topic_filter] = on_message
        self._watcher_of.clear()
        self._connection.subscribe([topic_filter], self._qos, own=True)

    def unwatch(self, topic_filter: str) -> None:
        self._watcher_of.clear()
        if self._watched.pop(topic_filter, None) is not None and topic_filter not in self._filters:
            self._connection.unsubscribe([topic_filter])

    async def stop_intake(self) -> None:
        """Shutdown, step 1: take no more messages; finish (and ack) the one being committed.

        Nothing is unsubscribed: the persistent session keeps collecting messages for the next
        start. Messages received but not yet committed stay unacknowledged for redelivery.
        """
        self._stop_intake()
        await self._idle.wait()

    async def aclose(self) -> None:
        """Publish ``offline`` (retained), disconnect cleanly, release the socket."""
        self._stop_intake()
        await self._connection.aclose()

    # -- receiving ------------------------------------------------------------------------------

    def _stop_intake(self) -> None:
        self._intake_stopped = True
        self._intake_stop.set()

    def _linked(self, up: bool) -> None:
        self._metrics.mqtt_connected.set(1 if up else 0)
        if not up:
            return
        session, self._session_seen = self._session_seen, self._connection.session
        # The first connection's session is no news: nothing was published before it.
        if session is not None and session != self._session_seen and self.on_new_session:
            self.on_new_session()

    def _screen(self, message: Message) -> bool:
        """On receipt: whether the message may be an event; the rest are acked or left."""
        self._metrics.mqtt_messages.inc()
        if self._intake_stopped:
            return False  # left unacknowledged: the broker redelivers it to our next connection
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._log.warning("skipping a message whose topic is not UTF-8")
            self._skip(message, "bad_topic")
            return False
        on_message = self._watcher(topic) if self._watched else None
        if on_message is not None:
            self._skip(message, "")
            on_message(topic, bytes(message.payload))
            return False
        if message.retain:
            self._log.debug("skipping retained message on %s", topic)
            self._skip(message, "")
            return False
        if topic in (self._config.status_topic, self._config.outcome_topic):
            self._skip(message, "")
            return False
        if not self._matches(topic):
            # Left over in a resumed session from filters we no longer have.
            self._skip(message, "")
            return False
        if len(message.payload) > self._config.max_payload:
            # Acknowledged, so the broker never sends it again; never decoded nor stored.
            self._skip(message, "too_large")
            self._note_too_large(topic, len(message.payload))
            return False
        if message.qos == 0 and len(self._connection.messages) >= self._config.receive_maximum:
            # QoS 0 has no flow control; past the limit we drop rather than queue without end.
            self._skip(message, "overflow")
            return False
        return True

    def _matches(self, topic: str) -> bool:
        matched = self._matched.get(topic)
        if matched is None:
            if len(self._matched) >= _MATCH_MEMO:
                self._matched.clear()
            matched = self._matched[topic] = any(
                paho.topic_matches_sub(f, topic) for f in self._filters
            )
        return matched

    def _watcher(self, topic: str) -> Callable[[str, bytes], None] | None:
        if topic in self._watcher_of:
            return self._watcher_of[topic]
        if len(self._watcher_of) >= _MATCH_MEMO:
            self._watcher_of.clear()
        found = next(
            (f for t, f in self._watched.items() if paho.topic_matches_sub(t, topic)), None
        )
        self._watcher_of[topic] = found
        return found

    def _note_too_large(self, topic: str, size: int) -> None:
        shown = topic[:_TOPIC_LOG_CHARS]
        if self._too_large_log.allow(shown):
            self._log.warning(
                "dropping messages on %s over mqtt.max_payload (%d bytes, limit %d);"
                " next note about this topic in %.0f s at the earliest",
                shown + ("..." if len(topic) > _TOPIC_LOG_CHARS else ""),
                size,
                self._config.max_payload,
                _TOO_LARGE_LOG_INTERVAL,
            )

    def _skip(self, message: Message, reason: str) -> None:
        if reason:
            self._metrics.events_rejected.labels("mqtt", reason).inc()
        self._connection.ack(message)

    def _outcome_done(self, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._log.warning("outcome not published: %s", exc)

    # -- intake ---------------------------------------------------------------------------------

    async def _consume(self) -> None:
        async for message in self._connection.messages:
            if not self._intake_stopped:
                await self._take(message)

    async def _take(self, message: Message) -> None:
        event = Event(
            source="mqtt",
            topic=message.topic,
            payload=bytes(message.payload),
            headers=_headers(message) if self._v5 else {},
            received_at=message.received_at,
        )
        committed = self._committed_now()
        if message.qos > 0 and committed.get(message.mid) == (
            message.session,
            event.topic,
            event.payload,
        ):
            # The redelivery of one we committed but could not ack: ack it, don't take it twice.
            del committed[message.mid]
            self._log.debug("redelivered message on %s was already taken", event.topic)
            self._ack(message, event)
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
                self._ack(message, event)
                return
            else:
                self._ack(message, event)
                return
            finally:
                # Also on cancellation: stop_intake() must not wait for an accept that is gone.
                self._idle.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._intake_stop.wait(), delay)

    def _ack(self, message: Message, event: Event) -> None:
        if self._connection.ack(message):
            return
        if message.session == self._connection.session:
            self._committed_now()[message.mid] = (message.session, event.topic, event.payload)

    def _committed_now(self) -> dict[int, tuple[int, str, bytes]]:
        """The committed-but-unacked of the current broker session: a new session (the broker
        kept nothing of ours) redelivers none of the earlier ones."""
        session = self._connection.session
        if session != self._committed_session:
            self._committed.clear()
            self._committed_session = session
        return self._committed
