"""Actions: softkeys on a page that do something (open the door, call a number).

A rule's ``actions`` are rendered with the event at intake (:mod:`phonepush.rules.book`) and
stored with each phone's alert page (:class:`~phonepush.store.records.NewAction`, table
``alert_actions``): one unguessable token per phone and action, expiring ``action_ttl`` after the
event. When the phone fetches its page (``/pages/<page id>/<token>``) the softkeys are added:
Ack when the rule acks, the actions in order, Close last (:func:`page_softkeys`). A ``dial``
action's softkey is ``Dial:NUMBER`` (the phone dials itself); the others request
``{public_url}/act/<token>``, which :class:`ActionService` answers:

* unknown token: a "Not found" page; past ``action_ttl``: an "Expired" page;
* a one-time action used already: "already done", nothing sent;
* ``confirm = true`` and not confirmed yet: a "LABEL?" page with Yes (``?confirm=1``) and No;
* else the MQTT message is published on the daemon's own connection, or the webhook called
  (httpx, bounded by a timeout), and the phone shows ``LABEL: done`` or the error in one line.
  A failure is shown and counted, never retried: the person may press again.

Every press is recorded on the event (``action_presses``, the status API's ``actions``), counted
in ``phonepush_actions_total{rule,action,result}`` and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from phonepush.errors import MqttError
from phonepush.metrics import Metrics
from phonepush.redact import url_for_log
from phonepush.store.interface import Store
from phonepush.store.records import ActionPress, ActionRecord
from phonepush.wire import cisco
from phonepush.wire.cisco import SoftKey, TextPage

if TYPE_CHECKING:
    import httpx

    from phonepush.sources.mqtt import MqttSource

__all__ = ["ActionAnswer", "ActionService", "act_url", "page_softkeys", "softkey_url"]

log = logging.getLogger("phonepush.actions")

_EXIT: Final = "SoftKey:Exit"
_CLOSE: Final = "Close"
#: The longest error text a result page shows (one line on a 7841's screen is about 40).
_ERROR_CHARS: Final = 120


def act_url(public_url: str, token: str) -> str:
    """The URL an action softkey requests."""
    return f"{public_url.rstrip('/')}/act/{token}"


def softkey_url(public_url: str, action: ActionRecord) -> str:
    """What the action's softkey requests: ``Dial:NUMBER`` for a dial action, else its URL."""
    spec = json.loads(action.spec)
    if "dial" in spec:
        return f"Dial:{spec['dial']}"
    return act_url(public_url, action.token)


def page_softkeys(
    public_url: str, actions: Sequence[ActionRecord], *, ack: str | None
) -> tuple[SoftKey, ...]:
    """A per-phone page's softkeys: Ack (when ``ack`` is its URL), the actions, Close."""
    keys: list[SoftKey] = []
    if ack is not None:
        keys.append(SoftKey("Ack", ack, 1))
    for action in actions:
        keys.append(SoftKey(action.label, softkey_url(public_url, action), len(keys) + 1))
    keys.append(SoftKey(_CLOSE, _EXIT, len(keys) + 1))
    return tuple(keys)


@dataclass(frozen=True, slots=True)
class ActionAnswer:
    """What the phone is answered: an HTTP status and a CiscoIPPhoneText."""

    status: int
    xml: str


class ActionService:
    """Answers action softkeys; an async context manager (it owns the webhook client).

    ``mqtt`` is the daemon's MQTT source (None: no broker, MQTT actions fail on the phone).
    """

    def __init__(
        self,
        spool: Store,
        *,
        metrics: Metrics,
        public_url: str,
        mqtt: MqttSource | None = None,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._metrics = metrics
        self.public_url = public_url.rstrip("/")
        self._mqtt = mqtt
        self._timeout = timeout
        self._transport = transport
        self._clock = clock
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def press(
        self, token: str, *, confirmed: bool, headers: Mapping[str, str], address: str
    ) -> ActionAnswer:
        """What pressing the softkey of ``token`` does, and the page the phone is answered."""
        action = await self._spool.alerts.action(token)
        if action is None or "dial" in json.loads(action.spec):
            return ActionAnswer(404, _page("Not found", "This action is not known (any more)."))
        model = headers.get("x-ciscoipphonemodelname", "")
        by = " ".join(part for part in (model[:64], address) if part)
        at = self._clock()
        label = action.label
        if at >= action.expires_at:
            await self._record(action, at, "expired", by)
            # 200, not 404: a phone shows the page it is answered only on success.
            return ActionAnswer(200, _page("Expired", f"{label}: this action has expired."))
        done = action.used_at is not None and not action.repeatable
        if action.confirm and not confirmed and not done:
            return ActionAnswer(200, self._question(action))
        if not await self._spool.alerts.claim_action(token, at):
            await self._record(action, at, "already_done", by)
            return ActionAnswer(200, _page(label, f"{label}: already done."))
        error = await self._run(action)
        if error:
            # Shown, counted and logged; the person may press again, nothing retries alone.
            if not action.repeatable:
                await self._spool.alerts.release_action(token)
            await self._record(action, at, "failed", by, error)
            return ActionAnswer(200, _page(label, f"{label} failed: {error}"))
        await self._record(action, at, "ok", by)
        return ActionAnswer(200, _page(label, f"{label}: done"))

    def _question(self, action: ActionRecord) -> str:
        yes = f"{act_url(self.public_url, action.token)}?confirm=1"
        return cisco.text_xml(
            TextPage(
                title=action.label,
                text=f"{action.label}?",
                softkeys=(SoftKey("Yes", yes, 1), SoftKey("No", _EXIT, 2)),
            )
        )

    async def _record(
        self, action: ActionRecord, at: float, result: str, by: str, error: str = ""
    ) -> None:
        self._metrics.actions.labels(action.rule, action.label, result).inc()
        await self._spool.alerts.add_press(
            ActionPress(
                action.event_id, action.rule, action.phone, action.label, at, result, by, error
            )
        )
        log.info(
            "event %s rule %s action %r on %s (%s): %s%s",
            action.event_id,
            action.rule,
            action.label,
            action.phone,
            by or "unknown device",
            result,
            f": {error}" if error else "",
        )

    async def _run(self, action: ActionRecord) -> str:
        """Do what the action does; "" when it worked, else the error in one line."""
        spec: dict[str, Any] = json.loads(action.spec)
        if "mqtt" in spec:
            return await self._publish(spec["mqtt"])
        return await self._call(spec["webhook"])

    async def _publish(self, mqtt: Mapping[str, Any]) -> str:
        if self._mqtt is None:
            return "no MQTT broker configured"
        try:
            async with asyncio.timeout(self._timeout):
                await self._mqtt.publish(
                    str(mqtt["topic"]),
                    str(mqtt["payload"]),
                    qos=int(mqtt["qos"]),
                    retain=bool(mqtt["retain"]),
                )
        except TimeoutError:
            return "the MQTT broker did not answer in time"
        except MqttError as exc:
            return _line(str(exc)) or "MQTT publish failed"
        return ""

    async def _call(self, hook: Mapping[str, Any]) -> str:
        # Imported on the first webhook action: httpx is heavy and most daemons need none.
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport, timeout=self._timeout, follow_redirects=False
            )
        url = str(hook["url"])
        body = str(hook["body"])
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._client.request(
                    str(hook["method"]),
                    url,
                    content=body.encode("utf-8") if body else None,
                    headers=dict(hook["headers"]),
                )
        except TimeoutError:
            return "the webhook did not answer in time"
        except httpx.HTTPError as exc:
            log.warning("action webhook %s failed: %s", url_for_log(url), url_for_log(str(exc)))
            return _line(url_for_log(str(exc))) or type(exc).__name__
        if answer.status_code >= 300:
            return f"HTTP {answer.status_code}"
        return ""


def _line(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:_ERROR_CHARS]


def _page(title: str, text: str) -> str:
    return cisco.text_xml(TextPage(title=title, text=text, softkeys=(SoftKey(_CLOSE, _EXIT, 1),)))
