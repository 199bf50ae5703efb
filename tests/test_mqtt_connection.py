"""The MQTT connection on its own, against a real mosquitto: messages, manual acks, redelivery."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from _mqtt_fixtures import Broker, TcpProxy
from phonepush.config import MqttConfig
from phonepush.sources.mqtt.connection import Message, MqttConnection

MakeProxy = Callable[[int], Awaitable[TcpProxy]]


def _config(url: str) -> MqttConfig:
    return MqttConfig(
        url=url, client_id="phonepush-conn-test", reconnect_min=0.05, reconnect_max=0.2
    )


async def _until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


@contextlib.asynccontextmanager
async def _running(connection: MqttConnection) -> AsyncIterator[MqttConnection]:
    async with connection:
        task = asyncio.create_task(connection.run())
        try:
            await _until(lambda: connection.connected, "connected")
            yield connection
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _next(connection: MqttConnection) -> Message:
    return await asyncio.wait_for(anext(connection.messages), 5)


async def _publish(broker: Broker, topic: str, payload: bytes, **kwargs: Any) -> None:
    await asyncio.to_thread(broker.publish, topic, payload, **kwargs)


async def test_unacked_message_comes_back_to_the_next_connection_and_an_acked_one_does_not(
    mosquitto: Broker,
) -> None:
    config = _config(mosquitto.url)
    first = MqttConnection(config)
    first.subscribe(["conn/#"])
    async with _running(first):
        await _publish(mosquitto, "conn/door", b"ring")
        message = await _next(first)
        assert (message.topic, message.payload, message.qos) == ("conn/door", b"ring", 1)
    second = MqttConnection(config)
    second.subscribe(["conn/#"])
    async with _running(second):
        again = await _next(second)
        assert (again.topic, again.payload) == ("conn/door", b"ring")
        assert second.ack(again)
        # Through the broker and back: the PUBACK went out before this was sent.
        await second.publish("conn/barrier", b"")
        barrier = await _next(second)
        assert barrier.topic == "conn/barrier"
        assert second.ack(barrier)
    third = MqttConnection(config)
    third.subscribe(["conn/#"])
    async with _running(third):
        await _publish(mosquitto, "conn/marker", b"marker")
        assert (await _next(third)).payload == b"marker"


async def test_ack_on_a_lost_connection_is_refused_and_the_redelivery_can_be_acked(
    mosquitto: Broker, tcp_proxy: MakeProxy
) -> None:
    proxy = await tcp_proxy(mosquitto.port)
    links: list[bool] = []
    connection = MqttConnection(_config(proxy.url), on_link=links.append)
    connection.subscribe(["conn/#"])
    async with _running(connection):
        await _publish(mosquitto, "conn/door", b"ring")
        message = await _next(connection)
        proxy.sever()
        await _until(lambda: links.count(True) == 2 and connection.connected, "reconnected")
        redelivered = await _next(connection)
        assert (redelivered.topic, redelivered.payload) == ("conn/door", b"ring")
        assert redelivered.session == message.session
        assert not connection.ack(message)
        assert connection.ack(redelivered)
    # Up, lost, up again; closing reports it down (once more when the DISCONNECT completes).
    assert links[:3] == [True, False, True]
    assert set(links[3:]) == {False}


async def test_screened_out_messages_never_reach_the_iterator(mosquitto: Broker) -> None:
    screened: list[str] = []
    connection: MqttConnection

    def screen(message: Message) -> bool:
        screened.append(message.topic)
        if message.topic.endswith("/noise"):
            connection.ack(message)
            return False
        return True

    connection = MqttConnection(_config(mosquitto.url), screen=screen)
    connection.subscribe(["conn/#"])
    async with _running(connection):
        await _publish(mosquitto, "conn/noise", b"x")
        await _publish(mosquitto, "conn/door", b"ring")
        assert (await _next(connection)).topic == "conn/door"
        assert len(connection.messages) == 0
    assert screened == ["conn/noise", "conn/door"]
