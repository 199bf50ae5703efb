"""The MQTT source against a real mosquitto: events, manual acks, sessions, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from _mqtt_fixtures import Broker, StartMosquitto, TcpProxy
from phonepush.config import MqttConfig
from phonepush.errors import SpoolError, SpoolFull
from phonepush.events import Event
from phonepush.metrics import Metrics
from phonepush.sources.mqtt import MqttSource, publish_once, reconnect_delay

MakeProxy = Callable[[int], Awaitable[TcpProxy]]


def _config(url: str, **overrides: Any) -> MqttConfig:
    values: dict[str, Any] = {
        "url": url,
        "client_id": "phonepush-test",
        "reconnect_min": 0.05,
        "reconnect_max": 0.2,
    }
    values.update(overrides)
    return MqttConfig(**values)


class Inbox:
    """An ``accept`` that takes everything, in order, and lets a test await each event."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    async def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._queue.put_nowait(event)

    async def next(self, timeout: float = 5.0) -> Event:
        return await asyncio.wait_for(self._queue.get(), timeout)


async def _until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


def _source(
    config: MqttConfig,
    accept: Callable[[Event], Awaitable[object]],
    filters: list[str] | None = None,
    **kwargs: Any,
) -> MqttSource:
    kwargs.setdefault("metrics", Metrics())
    kwargs.setdefault("retry_min", 0.01)
    kwargs.setdefault("retry_max", 0.05)
    return MqttSource(config, filters=filters or ["test/#"], accept=accept, **kwargs)


@contextlib.asynccontextmanager
async def _running(source: MqttSource, *, connected: bool = True) -> AsyncIterator[MqttSource]:
    async with source:
        task = asyncio.create_task(source.run())
        try:
            if connected:
                await _until(lambda: source.connected or task.done(), "source connected")
                if task.done():
                    task.result()
            yield source
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _publish(broker: Broker, topic: str, payload: bytes | str, **kwargs: Any) -> None:
    await asyncio.to_thread(broker.publish, topic, payload, **kwargs)


def _rejected(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "phonepush_events_rejected_total", {"source": "mqtt", "reason": reason}
    )
    return value or 0.0


async def test_messages_on_matching_filters_become_events(mosquitto: Broker) -> None:
    inbox = Inbox()
    source = _source(
        _config(mosquitto.url),
        inbox,
        filters=["zigbee2mqtt/+/action", "frigate/#"],
        clock=lambda: 1234.5,
    )
    async with _running(source):
        await _publish(mosquitto, "zigbee2mqtt/doorbell/action", b"single")
        await _publish(mosquitto, "unrelated/topic", b"nope")
        await _publish(mosquitto, "frigate/events", b'{"type": "new"}')
        first, second = await inbox.next(), await inbox.next()
    assert (first.source, first.topic, first.payload) == (
        "mqtt",
        "zigbee2mqtt/doorbell/action",
        b"single",
    )
    assert (second.topic, second.payload) == ("frigate/events", b'{"type": "new"}')
    assert first.received_at == 1234.5
    assert first.id != second.id
    assert [e.topic for e in inbox.events] == ["zigbee2mqtt/doorbell/action", "frigate/events"]


async def test_mqtt5_user_properties_become_lower_case_headers(mosquitto: Broker) -> None:
    inbox = Inbox()
    async with _running(_source(_config(mosquitto.url), inbox)):
        await _publish(
            mosquitto, "test/hdr", b"x", user_properties=[("X-Source", "camera"), ("Zone", "1")]
        )
        event = await inbox.next()
    assert dict(event.headers) == {"x-source": "camera", "zone": "1"}


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_retained_message_from_before_subscribing_does_not_ring(
    mosquitto: Broker, protocol: str
) -> None:
    await _publish(mosquitto, "test/doorbell", b"yesterday", retain=True)
    inbox = Inbox()
    async with _running(_source(_config(mosquitto.url, protocol=protocol), inbox)):
        await _publish(mosquitto, "test/doorbell", b"now")
        event = await inbox.next()
    assert event.payload == b"now"
    assert [e.payload for e in inbox.events] == [b"now"]


async def test_mqtt_3_1_1_client_receives_events(mosquitto: Broker) -> None:
    inbox = Inbox()
    async with _running(_source(_config(mosquitto.url, protocol="3.1.1"), inbox)):
        await _publish(mosquitto, "test/a", b"one")
        await _publish(mosquitto, "test/b", b"two")
        events = [await inbox.next(), await inbox.next()]
    assert [(e.topic, e.payload, dict(e.headers)) for e in events] == [
        ("test/a", b"one", {}),
        ("test/b", b"two", {}),
    ]


async def test_refused_message_is_retried_in_order_then_acked(mosquitto: Broker) -> None:
    attempts: list[Event] = []
    inbox = Inbox()

    async def full_for_a_while(event: Event) -> None:
        attempts.append(event)
        if len(attempts) <= 3:
            raise SpoolFull("spool over its limit")
        await inbox(event)

    metrics = Metrics()
    config = _config(mosquitto.url)
    async with _running(_source(config, full_for_a_while, metrics=metrics)):
        await _publish(mosquitto, "test/1", b"first")
        await _publish(mosquitto, "test/2", b"second")
        events = [await inbox.next(), await inbox.next()]
    assert [e.payload for e in events] == [b"first", b"second"]
    # The same event was offered again, not a copy with a new id.
    assert {e.id for e in attempts[:4]} == {events[0].id}
    assert _rejected(metrics, "spool_full") == 3

    # Acked once taken: the persistent session redelivers nothing to the same client id.
    later = Inbox()
    async with _running(_source(config, later)):
        await _publish(mosquitto, "test/marker", b"marker")
        assert (await later.next()).payload == b"marker"
    assert [e.payload for e in later.events] == [b"marker"]


async def test_spool_error_is_counted_by_reason(mosquitto: Broker) -> None:
    inbox = Inbox()
    failed = False

    async def failing_once(event: Event) -> None:
        nonlocal failed
        if not failed:
            failed = True
            raise SpoolError("disk I/O error")
        await inbox(event)

    metrics = Metrics()
    async with _running(_source(_config(mosquitto.url), failing_once, metrics=metrics)):
        await _publish(mosquitto, "test/x", b"x")
        assert (await inbox.next()).payload == b"x"
    assert _rejected(metrics, "spool_error") == 1


async def test_message_not_yet_committed_is_redelivered_to_next_source(
    mosquitto: Broker,
) -> None:
    offered = asyncio.Event()

    async def never_commits(event: Event) -> None:
        offered.set()
        await asyncio.Event().wait()

    config = _config(mosquitto.url)
    async with _running(_source(config, never_commits)):
        await _publish(mosquitto, "test/door", b"ring")
        await asyncio.wait_for(offered.wait(), 5)
    # The source is gone with the message unacked; a new one with our client id gets it.
    inbox = Inbox()
    async with _running(_source(config, inbox)):
        event = await inbox.next()
    assert (event.topic, event.payload) == ("test/door", b"ring")


async def test_stop_intake_leaves_new_messages_for_the_next_start(mosquitto: Broker) -> None:
    config = _config(mosquitto.url)
    first = Inbox()
    async with _running(_source(config, first)) as source:
        await _publish(mosquitto, "test/before", b"1")
        assert (await first.next()).payload == b"1"
        await source.stop_intake()
        await _publish(mosquitto, "test/after", b"2")
        # The broker has sent it to us by now (it acked the publisher); we must not take it.
        await source.publish("test-sync/barrier", b"")
    second = Inbox()
    async with _running(_source(config, second)):
        assert (await second.next()).payload == b"2"
    assert [e.payload for e in first.events] == [b"1"]


def _connects(caplog: pytest.LogCaptureFixture) -> int:
    return sum(r.getMessage().startswith("connected to") for r in caplog.records)


async def test_commit_during_reconnect_is_not_taken_twice(
    mosquitto: Broker, tcp_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="phonepush.mqtt")
    proxy = await tcp_proxy(mosquitto.port)
    release = asyncio.Event()
    offered: list[Event] = []
    inbox = Inbox()

    async def slow(event: Event) -> None:
        offered.append(event)
        if event.payload == b"ring":
            await release.wait()
        await inbox(event)

    source = _source(_config(proxy.url), slow)
    async with _running(source):
        await _publish(mosquitto, "test/door", b"ring")
        await _until(lambda: len(offered) == 1, "message offered to intake")
        proxy.sever()  # the connection dies while intake commits
        await _until(lambda: _connects(caplog) == 2 and source.connected, "reconnected")
        release.set()
        assert (await inbox.next()).payload == b"ring"
        await _publish(mosquitto, "test/marker", b"marker")
        assert (await inbox.next()).payload == b"marker"
    # The broker redelivered "ring" on the resumed session; it was acked, not taken again.
    assert [e.payload for e in inbox.events] == [b"ring", b"marker"]


async def test_reconnects_and_resubscribes_after_broker_restart(mosquitto: Broker) -> None:
    inbox = Inbox()
    metrics = Metrics()
    source = _source(_config(mosquitto.url), inbox, metrics=metrics)
    async with _running(source):
        await _publish(mosquitto, "test/a", b"before")
        assert (await inbox.next()).payload == b"before"
        assert metrics.registry.get_sample_value("phonepush_mqtt_connected") == 1
        mosquitto.stop()  # no persistence: the broker forgets our session and subscriptions
        await _until(lambda: not source.connected, "disconnect noticed")
        assert metrics.registry.get_sample_value("phonepush_mqtt_connected") == 0
        mosquitto.start()
        await _until(lambda: source.connected, "reconnected")
        await _publish(mosquitto, "test/a", b"after")
        assert (await inbox.next()).payload == b"after"
        assert metrics.registry.get_sample_value("phonepush_mqtt_connected") == 1


async def test_persistent_session_survives_a_broker_restart(
    start_mosquitto: StartMosquitto,
) -> None:
    broker = start_mosquitto(persistence=True)
    config = _config(broker.url)
    async with _running(_source(config, Inbox())):
        pass
    # Offline: the broker queues for our session, and keeps the queue across its restart.
    await _publish(broker, "test/queued", b"while away")
    broker.restart()
    inbox = Inbox()
    async with _running(_source(config, inbox)):
        assert (await inbox.next()).payload == b"while away"


async def test_share_group_gives_each_message_to_one_source(mosquitto: Broker) -> None:
    one, two = Inbox(), Inbox()
    config_one = _config(mosquitto.url, client_id="pp-1", share_group="phonepush")
    config_two = _config(mosquitto.url, client_id="pp-2", share_group="phonepush")
    async with _running(_source(config_one, one)), _running(_source(config_two, two)):
        for n in range(20):
            await _publish(mosquitto, f"test/{n}", str(n))
        await _until(lambda: len(one.events) + len(two.events) >= 20, "all 20 delivered")
        # A duplicate would arrive right behind; a publish round-trip lets it show.
        await _publish(mosquitto, "unrelated", b"")
    received = [e.payload for e in one.events + two.events]
    assert sorted(received, key=int) == [str(n).encode() for n in range(20)]
    assert one.events and two.events


async def test_status_topic_online_then_offline_on_clean_shutdown(mosquitto: Broker) -> None:
    config = _config(mosquitto.url, status_topic="phonepush/test/status")
    async with _running(_source(config, Inbox())):
        with mosquitto.watch("phonepush/test/status") as watcher:
            status = await watcher.next()
            assert (status.payload, status.retain) == (b"online", True)
    with mosquitto.watch("phonepush/test/status") as watcher:
        status = await watcher.next()
        assert (status.payload, status.retain) == (b"offline", True)


async def test_last_will_says_offline_when_the_connection_dies(
    mosquitto: Broker, tcp_proxy: MakeProxy
) -> None:
    proxy = await tcp_proxy(mosquitto.port)
    config = _config(proxy.url, status_topic="phonepush/test/status")
    with mosquitto.watch("phonepush/test/status") as watcher:
        source = _source(config, Inbox())
        async with _running(source):
            assert (await watcher.next()).payload == b"online"
            proxy.sever()
            assert (await watcher.next()).payload == b"offline"
            assert (await watcher.next()).payload == b"online"  # back after reconnecting


async def test_outcomes_are_published_as_json(mosquitto: Broker) -> None:
    config = _config(mosquitto.url, outcome_topic="phonepush/test/outcomes")
    outcome = {"event": "0190abc", "rule": "doorbell", "phone": "lobby", "result": "delivered"}
    with mosquitto.watch("phonepush/test/outcomes") as watcher:
        async with _running(_source(config, Inbox(), filters=["#"])) as source:
            await source.publish_outcome(outcome)
            message = await watcher.next()
            # Subscribed to "#", the source must not take its own outcome as an event.
            await source.publish("test/after", b"after")
    assert json.loads(message.payload) == outcome
    assert message.retain is False


async def test_update_filters_subscribes_new_and_drops_removed(mosquitto: Broker) -> None:
    inbox = Inbox()
    async with _running(_source(_config(mosquitto.url), inbox, filters=["old/#"])) as source:
        source.update_filters(["new/#"])
        # Our own QoS 1 round trip: the broker handled the (un)subscribe before acking it.
        await source.publish("sync/barrier", b"")
        await _publish(mosquitto, "old/x", b"old")
        await _publish(mosquitto, "new/x", b"new")
        assert (await inbox.next()).payload == b"new"
    assert [e.payload for e in inbox.events] == [b"new"]


async def test_username_and_password(
    start_mosquitto: StartMosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    broker = start_mosquitto(users={"phonepush": "correct-horse"})
    caplog.set_level(logging.DEBUG, logger="phonepush.mqtt")
    wrong = _source(_config(broker.url, username="phonepush", password="wrong-battery"), Inbox())
    async with _running(wrong, connected=False):
        await _until(lambda: "refused" in caplog.text, "refusal logged")
        assert not wrong.connected
    assert "wrong-battery" not in caplog.text

    inbox = Inbox()
    right = _config(broker.url, username="phonepush", password="correct-horse")
    async with _running(_source(right, inbox)):
        await _publish(broker, "test/auth", b"ok")
        assert (await inbox.next()).payload == b"ok"
    assert "correct-horse" not in caplog.text


async def test_tls_with_a_private_ca(
    start_mosquitto: StartMosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    broker = start_mosquitto(tls=True)
    caplog.set_level(logging.WARNING, logger="phonepush.mqtt")
    untrusting = _source(_config(broker.tls_url), Inbox())  # system CAs: ours is unknown
    async with _running(untrusting, connected=False):
        await _until(lambda: "certificate verify failed" in caplog.text, "TLS refusal logged")
        assert not untrusting.connected

    inbox = Inbox()
    config = _config(broker.tls_url, ca_file=str(broker.certificates["ca"]))
    async with _running(_source(config, inbox)):
        await asyncio.to_thread(_publish_burst, broker, 20)
        await _until(lambda: len(inbox.events) == 20, "all 20 delivered over TLS")
    assert [e.payload for e in inbox.events] == [str(n).encode() for n in range(20)]


def _publish_burst(broker: Broker, count: int) -> None:
    client = broker._client("burst")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(f"test/{n}", str(n), qos=1) for n in range(count)]
        for info in infos:
            info.wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


async def test_publish_once_does_not_disturb_the_daemon_session(mosquitto: Broker) -> None:
    config = _config(mosquitto.url)
    inbox = Inbox()
    async with _running(_source(config, inbox)) as source:
        await publish_once(config, "test/fired", b"fire")
        assert (await inbox.next()).payload == b"fire"
        assert source.connected


def test_reconnect_delay_grows_to_the_cap_with_jitter() -> None:
    highest = [reconnect_delay(n, 1.0, 60.0, lambda: 1.0) for n in range(10)]
    assert highest == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0]
    assert [reconnect_delay(n, 1.0, 60.0, lambda: 0.0) for n in range(3)] == [1.0, 1.0, 1.0]
    assert reconnect_delay(3, 1.0, 60.0, lambda: 0.5) == 4.5
    assert reconnect_delay(10_000, 0.05, 60.0, lambda: 1.0) == 60.0
