"""The repeat scheduler: unacknowledged pages pushed again every ``repeat``, escalated after
``escalate.after`` rounds.

The spool holds every alert's policy and when its next round is due (``next_at``), so the
scheduler keeps no state of its own: it asks the spool for the soonest due time, sleeps until
then (or until intake wakes it for a new alert), and pushes the rounds that are due. After a
restart it simply starts over from the spool; a round that fell due while the daemon was down is
pushed once, at start, and the next one ``repeat`` later (no burst of missed rounds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from phonepush.alerting import ledger
from phonepush.errors import SpoolError
from phonepush.metrics import Metrics
from phonepush.store.interface import Store
from phonepush.store.records import Delivery

__all__ = ["Repeater"]

log = logging.getLogger("phonepush.repeats")

#: How long to wait before trying again when the spool failed or had no room for a round.
_RETRY_SECONDS = 5.0


class Repeater:
    """Pushes due repeat rounds. ``await run()`` as a task; :meth:`wake` after a new alert.

    ``submit`` is the dispatcher's; ``clock`` says what time it is (the spool's due times are on
    the same clock). :meth:`tick` does one pass, for tests that drive the clock themselves.
    """

    def __init__(
        self,
        spool: Store,
        *,
        metrics: Metrics,
        submit: Callable[[Sequence[Delivery]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._metrics = metrics
        self._submit = submit
        self._clock = clock
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """A new alert may be due sooner than what the scheduler waits for: look again."""
        self._woken.set()

    async def tick(self, now: float | None = None) -> int:
        """Push every round due at ``now`` (default: the clock); returns how many rounds.

        Raises :class:`~phonepush.errors.SpoolError` if the spool cannot take them (the rounds
        not pushed stay due).
        """
        now = self._clock() if now is None else now
        done = 0
        for alert in await self._spool.alerts.due(now):
            result = await ledger.repeat_round(self._spool, alert.event_id, alert.rule, now)
            if result is None:
                continue
            updated, deliveries = result
            done += 1
            self._metrics.repeats.labels(updated.rule).inc()
            escalating = updated.escalate_after and updated.rounds == updated.escalate_after
            if escalating:
                self._metrics.escalations.labels(updated.rule).inc()
            log.info(
                "event %s rule %s: round %d of %d unacknowledged, pushed again to %d phone(s)%s",
                updated.event_id,
                updated.rule,
                updated.rounds,
                updated.max_repeats,
                len(deliveries),
                ", escalated" if escalating else "",
            )
            if updated.next_at is None:
                log.warning(
                    "event %s rule %s: last repeat pushed, still unacknowledged",
                    updated.event_id,
                    updated.rule,
                )
            if deliveries:
                self._submit(deliveries)
        return done

    async def run(self) -> None:
        """Push rounds as they fall due, until cancelled."""
        while True:
            self._woken.clear()
            try:
                await self.tick()
                due = await self._spool.alerts.next_due()
            except SpoolError as exc:
                log.error("repeats held back: %s; trying again in %.0f s", exc, _RETRY_SECONDS)
                due = self._clock() + _RETRY_SECONDS
            delay = None if due is None else max(0.0, due - self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._woken.wait()
