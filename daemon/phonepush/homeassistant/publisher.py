"""Keeps Home Assistant's view current: the retained discovery configs and connectivity states
on the broker, ack events as they happen.

The publisher remembers what the broker holds from it (topic -> payload) and, on each wake-up
(start, reload, a phone's health changing), publishes only what differs from the wanted set and
clears (empty retained payload) what is no longer wanted: an unchanged reload publishes nothing,
a removed phone's entities disappear. Home Assistant's birth message (``online`` on
``<discovery_prefix>/status``, sent when it starts) makes it publish every config again, as
Home Assistant documents for integrations that announce themselves; so does a new broker
session (a broker restarted without persistence has lost the retained messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from phonepush.config import Config
from phonepush.errors import MqttError
from phonepush.homeassistant.discovery import (
    PhoneState,
    ack_event,
    ack_topic,
    configs,
    connectivity,
    connectivity_topic,
)

if TYPE_CHECKING:
    from phonepush.sources.mqtt import MqttSource

__all__ = ["HomeAssistant"]

log = logging.getLogger("phonepush.homeassistant")

#: How long an ack event may wait for the broker before it is dropped (it is news, not state).
_EVENT_TIMEOUT: Final = 5.0
#: What the broker holds on a topic whose publication failed: equal to nothing we want.
_UNKNOWN: Final = b"\x00unknown"


class HomeAssistant:
    """Home Assistant's discovery and states; :meth:`run` is its task in the daemon.

    ``mqtt`` is the daemon's MQTT source (its connection, whose will marks every entity
    unavailable); ``phone_state`` is health's lookup by phone name.
    """

    def __init__(
        self,
        config: Config,
        mqtt: MqttSource,
        *,
        phone_state: Callable[[str], PhoneState | None],
        retry: float = 5.0,
    ) -> None:
        self._config = config
        self._mqtt = mqtt
        self._phone_state = phone_state
        self._retry = retry
        #: Retained topic under our node -> the payload the broker holds: what we published, or
        #: what it told us it holds from an earlier run.
        self._published: dict[str, bytes] = {}
        self._wake = asyncio.Event()
        self._wake.set()
        self._everything = False
        self._watching: dict[str, Callable[[str, bytes], None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch()

    @property
    def published(self) -> Mapping[str, bytes]:
        """What the broker holds from us (retained), by topic."""
        return self._published

    def update(self, config: Config) -> None:
        """A reloaded configuration: publish what changed, clear what went."""
        self._config = config
        self._watch()
        self._wake.set()

    def phone_changed(self, state: PhoneState) -> None:
        """Health's ``on_change``: a phone's reachability, model or firmware changed."""
        if self._config.homeassistant.enabled:
            self._wake.set()

    def acknowledged(self, ack: Mapping[str, object]) -> None:
        """The ack service's ``on_ack``: fire the rule's event entity."""
        ha = self._config.homeassistant
        if not ha.enabled:
            return
        topic = ack_topic(ha, str(ack.get("rule", "")))
        task = asyncio.get_running_loop().create_task(self._event(topic, ack_event(dict(ack))))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def new_session(self) -> None:
        """The MQTT source's ``on_new_session``: a broker that kept no session of ours most
        likely lost our retained messages too."""
        if self._published:
            log.info("Home Assistant: new broker session, publishing discovery again")
            self._everything = True
            self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                everything, self._everything = self._everything, False
                if not await self._sync(everything):
                    # The broker refused or went away: the next attempt compares again.
                    self._everything = self._everything or everything
                    await asyncio.sleep(self._retry)
                    self._wake.set()
        finally:
            for task in list(self._tasks):
                task.cancel()

    def wanted(self) -> dict[str, bytes]:
        """Every retained topic and payload the current configuration and health call for."""
        config = self._config
        out = configs(config, self._phone_state)
        if out:
            for phone in config.phones:
                state = self._phone_state(phone.name)
                if state is not None and state.reachable is not None:
                    topic = connectivity_topic(config.homeassistant, phone.name)
                    out[topic] = connectivity(state.reachable)
        return out

    # --- internals --------------------------------------------------------------------------------

    def _undecided(self) -> set[str]:
        config = self._config
        if not config.homeassistant.enabled:
            return set()
        out: set[str] = set()
        for phone in config.phones:
            state = self._phone_state(phone.name)
            if state is None or state.reachable is None:
                out.add(connectivity_topic(config.homeassistant, phone.name))
        return out

    def _watch(self) -> None:
        ha = self._config.homeassistant
        wanted: dict[str, Callable[[str, bytes], None]] = {}
        if ha.enabled:
            wanted[f"{ha.discovery_prefix}/status"] = self._ha_status
            # What the broker holds under our node, from this run or an earlier one (a phone
            # removed while the daemon was stopped): the next sync clears what is not wanted.
            wanted[f"{ha.discovery_prefix}/+/{ha.node_id}/+/config"] = self._held
            wanted[connectivity_topic(ha, "+")] = self._held
        for topic_filter in [f for f in self._watching if f not in wanted]:
            self._mqtt.unwatch(topic_filter)
        for topic_filter, on_message in wanted.items():
            if topic_filter not in self._watching:
                self._mqtt.watch(topic_filter, on_message)
        self._watching = wanted

    def _ha_status(self, topic: str, payload: bytes) -> None:
        if payload.strip() == b"online":
            log.info("Home Assistant is online (%s): publishing discovery again", topic)
            self._everything = True
            self._wake.set()

    def _held(self, topic: str, payload: bytes) -> None:
        if self._published.get(topic, b"") == payload:
            return  # what we published, coming back
        # The broker holds something else (an earlier run's config, or one we changed since):
        # take it as held, and let the next sync publish or clear what differs.
        if payload:
            self._published[topic] = payload
        else:
            self._published.pop(topic, None)
        self._wake.set()

    async def _sync(self, everything: bool) -> bool:
        wanted = self.wanted()
        changes = [(t, p) for t, p in wanted.items() if everything or self._published.get(t) != p]
        # A configured phone health has not yet seen keeps the state the broker holds (from
        # before a restart) until a probe or push says otherwise.
        undecided = self._undecided()
        gone = [t for t in self._published if t not in wanted and t not in undecided]
        if not changes and not gone:
            return True
        done = await asyncio.gather(
            *(self._put(t, p) for t, p in changes), *(self._put(t, b"") for t in gone)
        )
        log.info(
            "Home Assistant: %d published, %d cleared%s",
            len(changes),
            len(gone),
            "" if all(done) else f"; {done.count(False)} failed, retrying",
        )
        return all(done)

    async def _put(self, topic: str, payload: bytes) -> bool:
        # Recorded before it goes out, so that its echo (we watch our own topics) is known.
        if payload:
            self._published[topic] = payload
        else:
            self._published.pop(topic, None)
        try:
            await self._mqtt.publish(topic, payload, qos=1, retain=True)
        except MqttError as exc:
            log.warning("Home Assistant: cannot publish to %s: %s", topic, exc)
            # Unknown now: held as something nothing equals, so the retry publishes or clears.
            self._published[topic] = _UNKNOWN
            return False
        return True

    async def _event(self, topic: str, payload: bytes) -> None:
        # Not retained: Home Assistant ignores a replayed event, and an old ack is no news.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EVENT_TIMEOUT):
                try:
                    await self._mqtt.publish(topic, payload, qos=1, retain=False)
                except MqttError as exc:
                    log.warning("Home Assistant: ack event not published to %s: %s", topic, exc)
