"""What mosquitto does with a shared-subscription member's messages when that member goes away.

Pins the broker behaviour that docs/reliability.md ("Shared subscriptions: what a broker does
with a dead member's messages") describes, measured on the real mosquitto of the other MQTT tests:
two MQTT v5 clients in one ``$share/g/...`` group at QoS 1, like two phonepush instances with
``[mqtt] share_group``. One member (the "victim") never acknowledges and allows only a few
messages in flight (Receive Maximum), so when it goes it holds messages both in flight
(sent, unacknowledged) and queued in its session.

What mosquitto 2.0 does (src/subs.c, ``subs__shared_process``: a plain round robin over every
member whose session exists, connected or not):

- a member killed (socket closed without DISCONNECT) or stopped with a plain DISCONNECT keeps
  its in-flight and queued messages in its session, and keeps being given every other new one;
  the survivor gets none of them; they arrive when a client with the same client id comes back
  (in-flight ones marked DUP);
- once that session ends (its Session Expiry Interval passed, or a DISCONNECT that sets it to
  0), its messages are dropped, not handed to the survivor, who from then on gets everything.
"""

from __future__ import annotations

import queue
import re
import time
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from _mqtt_fixtures import Broker

pytestmark = pytest.mark.slow

TOPIC = "alerts/shared"
SHARED = f"$share/g/{TOPIC}"
TIMEOUT = 10.0


class Member:
    """One MQTT v5 client of the share group on its own paho thread."""

    def __init__(
        self,
        broker: Broker,
        client_id: str,
        *,
        session_expiry: int = 30,
        receive_maximum: int = 100,
        acks: bool = True,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.session_expiry = session_expiry
        self.receive_maximum = receive_maximum
        self.received: queue.Queue[tuple[str, bool]] = queue.Queue()
        self._replies: queue.Queue[tuple[str, Any]] = queue.Queue()
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        # A member that never acknowledges holds what it was sent in flight, as a busy or
        # hung instance does until it dies.
        client.manual_ack_set(not acks)
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        self.client = client

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.received.put((message.payload.decode(), bool(message.dup)))

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._replies.put(("connack", (flags.session_present, reason)))

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any
    ) -> None:
        self._replies.put(("suback", reasons))

    def _reply(self, kind: str) -> Any:
        try:
            got, value = self._replies.get(timeout=TIMEOUT)
        except queue.Empty:
            pytest.fail(f"{self.client_id}: no {kind} within {TIMEOUT} s")
        assert got == kind, (got, value)
        return value

    def connect(self, *, clean_start: bool) -> bool:
        """Connect and wait for CONNACK; returns whether the broker still had the session."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry
        props.ReceiveMaximum = self.receive_maximum
        self.client.connect(
            self.broker.host, self.broker.port, 60, clean_start=clean_start, properties=props
        )
        self.client.loop_start()
        present, reason = self._reply("connack")
        assert not reason.is_failure, reason
        return bool(present)

    def subscribe(self) -> None:
        self.client.subscribe(SHARED, qos=1)
        reasons = self._reply("suback")
        assert not reasons[0].is_failure, reasons

    def take(self, count: int) -> list[tuple[str, bool]]:
        """The next ``count`` messages as (payload, DUP flag); fails if they do not come."""
        got = []
        for _ in range(count):
            try:
                got.append(self.received.get(timeout=TIMEOUT))
            except queue.Empty:
                pytest.fail(f"{self.client_id}: {len(got)} of {count} messages came: {got}")
        return got

    def take_until_fence(self) -> list[tuple[str, bool]]:
        """Messages up to and including the first fence (see :func:`fence`)."""
        got: list[tuple[str, bool]] = []
        while not got or not got[-1][0].startswith("fence"):
            got += self.take(1)
        return got

    def kill(self) -> None:
        """End the connection as a killed process does: the socket closes, no DISCONNECT."""
        self.client.loop_stop()
        sock = self.client.socket()
        assert sock is not None
        sock.close()

    def stop(self, session_expiry: int | None = None) -> None:
        """A graceful stop: DISCONNECT (normal), optionally changing the session expiry."""
        props = None
        if session_expiry is not None:
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = session_expiry
        self.client.disconnect(properties=props)
        self.client.loop_stop()


def fence(publish: Callable[[str], None], name: str) -> set[str]:
    """Publish two fence messages: with two members in mosquitto's round robin one goes to
    each (both to the survivor once it is alone), so the survivor gets one after everything
    published before; its messages arrive in order, so all it was given has then arrived."""
    fences = {f"fence-{name}-1", f"fence-{name}-2"}
    for payload in sorted(fences):
        publish(payload)
    return fences


def wait_for_log(broker: Broker, pattern: str) -> None:
    """Wait for the broker to log a line (when it has noticed a client going or expiring)."""
    deadline = time.monotonic() + TIMEOUT
    while not re.search(pattern, broker.log_text):
        if time.monotonic() > deadline:
            pytest.fail(f"mosquitto never logged {pattern!r}:\n{broker.log_text[-3000:]}")
        time.sleep(0.02)


def payloads(messages: list[tuple[str, bool]]) -> set[str]:
    return {payload for payload, _ in messages}


def start_group(broker: Broker, *, victim_expiry: int) -> tuple[Member, Member]:
    survivor = Member(broker, "survivor")
    assert not survivor.connect(clean_start=True)
    survivor.subscribe()
    # Three in flight at most: the rest of its share waits queued in its session.
    victim = Member(broker, "victim", session_expiry=victim_expiry, receive_maximum=3, acks=False)
    assert not victim.connect(clean_start=True)
    victim.subscribe()
    return survivor, victim


@pytest.mark.parametrize("stop", ["kill", "disconnect"])
def test_a_gone_member_keeps_its_share_until_it_returns(
    mosquitto: Broker, stop: Literal["kill", "disconnect"]
) -> None:
    def publish(payload: str) -> None:
        mosquitto.publish(TOPIC, payload)

    survivor, victim = start_group(mosquitto, victim_expiry=30)
    before = [str(n) for n in range(12)]
    for payload in before:
        publish(payload)
    taken = survivor.take(6)  # its half
    in_flight = payloads(victim.take(3))  # never acknowledged; its other 3 wait queued

    if stop == "kill":
        victim.kill()
        wait_for_log(
            mosquitto, r"Client victim closed its connection|Socket error on client victim"
        )
    else:
        victim.stop()
        wait_for_log(mosquitto, r"Client victim disconnected")
    after = [str(n) for n in range(12, 20)]
    for payload in after:
        publish(payload)
    fences = fence(publish, "a")
    taken += survivor.take_until_fence()

    survivor_got = payloads(taken)
    victim_share = set(before + after) - survivor_got
    # Nothing the victim had in flight or queued went to the survivor, and the round robin
    # still gave the member that was gone every other new message.
    assert in_flight <= victim_share
    assert len(victim_share) == 10
    assert len(victim_share & set(after)) == len(after) // 2
    assert survivor_got.isdisjoint(victim_share)

    # The same client id comes back to its session: all of it arrives, the in-flight ones
    # sent again as duplicates; nothing was lost and nothing went to both.
    back = Member(mosquitto, "victim", session_expiry=30)
    assert back.connect(clean_start=False), "the session should have been kept"
    victim_fence = fences - survivor_got
    returned = back.take(len(victim_share) + len(victim_fence))
    assert payloads(returned) == victim_share | victim_fence
    assert {payload for payload, dup in returned if dup} == in_flight
    back.stop()
    survivor.stop()


@pytest.mark.parametrize("end", ["expiry", "disconnect_with_expiry_0"])
def test_a_dead_members_share_is_dropped_when_its_session_ends(
    mosquitto: Broker, end: Literal["expiry", "disconnect_with_expiry_0"]
) -> None:
    def publish(payload: str) -> None:
        mosquitto.publish(TOPIC, payload)

    survivor, victim = start_group(mosquitto, victim_expiry=1)
    before = [str(n) for n in range(8)]
    for payload in before:
        publish(payload)
    taken = survivor.take(4)
    in_flight = payloads(victim.take(3))  # and one queued

    if end == "expiry":
        victim.kill()
        wait_for_log(mosquitto, r"Expiring client victim due to timeout")
    else:
        victim.stop(session_expiry=0)
        wait_for_log(mosquitto, r"Client victim disconnected")

    # Alone in the group now, the survivor gets every new message ...
    after = [str(n) for n in range(8, 12)]
    for payload in after:
        publish(payload)
    assert payloads(survivor.take(len(after))) == set(after)
    # ... but none of what the ended session held: it is gone.
    fence(publish, "a")
    taken += survivor.take_until_fence()
    lost = set(before) - payloads(taken)
    assert in_flight <= lost
    assert len(lost) == 4

    back = Member(mosquitto, "victim", session_expiry=30)
    assert not back.connect(clean_start=False), "the session should have ended"
    back.subscribe()
    fences = fence(publish, "b")
    # Its first message is a fence: nothing of the old share was kept for it.
    first = back.take(1)
    assert payloads(first) <= fences, first
    back.stop()
    survivor.stop()
