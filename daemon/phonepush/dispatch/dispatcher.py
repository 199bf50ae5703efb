"""The dispatcher: deliveries from the spool to the phones.

One worker task per phone takes that phone's deliveries in order and sends their requests one at a
time through the phone's lane (:mod:`phonepush.phone.lanes`, shared with audio pages). Workers run
concurrently, bounded by a global semaphore, so a dead or slow phone holds up only its own queue.

What happens after a failure depends on what the phone can have done (docs/design.md, "Delivery
guarantees"):

* the request never fully reached the phone (:class:`~phonepush.errors.PhoneNotSent`), or the
  phone answered busy (error 6): retried with full-jitter exponential backoff until the TTL;
* the request was written and no answer we can read came back
  (:class:`~phonepush.errors.PhoneUnconfirmed`): the phone may have run it, so it is not sent
  again; the delivery goes on with its next request and ends ``unconfirmed``. A rule with
  ``retry_unconfirmed = true`` (idempotent content) has it retried like the first case;
* the phone refused (error 1/2/3/4, an item with a non-zero Status): ``failed`` at once;
* any 2xx answer that is not a CiscoIPPhoneError: the request is done.

A delivery resumes after its last done request (``sent`` in the spool) and never sends one again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import Counter, Gauge, Histogram

from phonepush.errors import (
    PhoneError,
    PhoneNotSent,
    PhoneTimeout,
    PhoneUnconfirmed,
    SpoolError,
)
from phonepush.logs import counted
from phonepush.metrics import Metrics
from phonepush.phone.client import PhoneClient, PhoneTarget
from phonepush.phone.lanes import DEFAULT_MAX_CONNECTIONS, PhoneLanes
from phonepush.store.interface import Store
from phonepush.store.records import Delivery, DeliveryState

__all__ = ["Dispatcher", "Outcome"]

log = logging.getLogger("phonepush.dispatch")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one delivery ended: published to MQTT when configured, and logged."""

    event: str
    rule: str
    phone: str
    result: DeliveryState  # delivered | unconfirmed | failed | expired
    attempts: int
    error: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "rule": self.rule,
            "phone": self.phone,
            "result": self.result,
            "attempts": self.attempts,
            "error": self.error,
            "seconds": round(self.seconds, 4),
        }


@dataclass(frozen=True, slots=True)
class _PhoneMetrics:
    up: Gauge
    ok: Counter
    duration: Histogram


#: How the error of a delivery that had a request go unconfirmed begins (kept in the spool, so a
#: resumed delivery still ends ``unconfirmed``).
_UNCONFIRMED: Final = "unconfirmed: "


#: How many finished delivery ids the dispatcher remembers after writing them (~8 MB at most).
_DONE_KEPT: Final = 100_000
#: How many cancels of deliveries not (yet) here it remembers. Such a cancel matters only while
#: the delivery is being loaded (a cluster instance reading a phone's pending work as another
#: one acknowledges it), a moment; bounded, because a cluster tells every instance of every
#: cancel, most of them for deliveries another instance holds.
_EARLY_CANCELS_KEPT: Final = 10_000


class _Draining(Exception):
    """Raised inside a worker between requests once shutdown has begun."""


class _ItemRefused(PhoneError):
    """The phone answered, but refused an item (ResponseItem Status other than 0)."""


class Dispatcher:
    """Delivers pending work to phones; an async context manager whose :meth:`run` is a task.

    ``phones`` is the daemon's :class:`PhoneLanes`, or a phone list for a dispatcher with lanes
    of its own (made with ``client_factory`` and ``max_connections``, closed with it).
    ``retry_unconfirmed`` names the rules whose unconfirmed requests are sent again.
    """

    def __init__(
        self,
        spool: Store,
        phones: PhoneLanes | Mapping[str, PhoneTarget],
        *,
        metrics: Metrics,
        concurrency: int = 256,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        retry_unconfirmed: Collection[str] = (),
        client_factory: Callable[[PhoneTarget], PhoneClient] = PhoneClient,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        on_outcome: Callable[[Outcome], Awaitable[None]] | None = None,
        on_reach: Callable[[str, bool, str], None] | None = None,
        on_idle: Callable[[str], None] | None = None,
        gate: Callable[[str], Awaitable[None] | None] | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._spool = spool
        self._own_lanes = not isinstance(phones, PhoneLanes)
        self._lanes = (
            phones
            if isinstance(phones, PhoneLanes)
            else PhoneLanes(phones, client_factory=client_factory, max_connections=max_connections)
        )
        self.retry_unconfirmed = frozenset(retry_unconfirmed)
        self._metrics = metrics
        self._bound = asyncio.Semaphore(concurrency)
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._on_outcome = on_outcome
        #: Told (phone, reachable, error) after each request, as phonepush_phone_up is set: a
        #: push is the freshest health check there is.
        self.on_reach = on_reach
        #: Told the phone's name when its worker ran out of work (not when stopped): the cluster
        #: releases the phone's claim then.
        self.on_idle = on_idle
        #: Asked before each request; an awaitable it returns is awaited first (the cluster holds
        #: pushes while too little of its lease is left).
        self.gate = gate
        self._clock = clock
        self._rng = rng
        # Per phone, while it has work: its queue and its worker (which ends when the queue is
        # empty; an idle worker and queue per phone of a 10,000-phone fan-out cost ~40 MB).
        self._queues: dict[str, collections.deque[Delivery]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._sending: set[str] = set()  # phones with a request on the wire
        self._cut: set[int] = set()  # deliveries cancelled after their request was written
        self._wire_idle = asyncio.Event()  # set while _sending is empty
        self._wire_idle.set()
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._outstanding = 0
        self._cancelled: set[int] = set()  # no longer pending in the spool (acked, resolved)
        # Cancelled before they were submitted here (oldest first, bounded): skipped if they come.
        self._cancelled_early: dict[int, None] = {}
        # Ids queued, in flight, or finished but not yet written: submitted again (a cluster
        # loads a phone's pending work from the store), they are ignored.
        self._known: set[int] = set()
        # Ids lately written finished (oldest first, bounded): a cluster's read of a phone's
        # pending work that began before the write can hand them over again after it.
        self._done: dict[int, None] = {}
        self._writing: set[int] = set()  # finished, being written by a flush
        self._forgetting = False
        # Finished deliveries not yet written: answers that arrive together share one commit.
        self._finished: list[tuple[int, DeliveryState, str, int]] = []
        self._flush: asyncio.Handle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        # Labelled metric children per phone: a labels() lookup costs more than the update.
        self._phone_metrics: dict[str, _PhoneMetrics] = {}

    async def __aenter__(self) -> Dispatcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- intake side ----------------------------------------------------------------------------

    def submit(self, deliveries: Iterable[Delivery]) -> None:
        """Queue pending deliveries (after intake's commit, or on start from the spool)."""
        for delivery in deliveries:
            if delivery.id in self._known or delivery.id in self._done:
                continue
            if self._cancelled_early.pop(delivery.id, 0) is None:
                continue  # acknowledged or resolved while it was being loaded
            self._known.add(delivery.id)
            queue = self._queues.get(delivery.phone)
            if queue is None:
                queue = self._queues[delivery.phone] = collections.deque()
            queue.append(delivery)
            self._outstanding += 1
            self._idle.clear()
            if delivery.phone not in self._workers and not self._closing:
                self._workers[delivery.phone] = asyncio.create_task(
                    self._work(delivery.phone), name=f"phone:{delivery.phone}"
                )

    def cancel(self, delivery_ids: Iterable[int]) -> None:
        """Drop deliveries the spool no longer has pending (acknowledged, resolved): a queued one
        is skipped, one waiting out a retry gives up; a request on the wire still finishes.
        One not here yet is skipped if it is submitted later (a cluster loading it meanwhile)."""
        early = self._cancelled_early
        for delivery_id in delivery_ids:
            if delivery_id in self._known:
                self._cancelled.add(delivery_id)
            elif delivery_id not in self._done:
                early[delivery_id] = None
        for _ in range(len(early) - _EARLY_CANCELS_KEPT):
            del early[next(iter(early))]

    def holds(self, delivery_id: int) -> bool:
        """Whether the delivery is queued, in flight, or finished and not yet written."""
        return delivery_id in self._known

    def busy(self, phone: str) -> bool:
        """Whether ``phone``'s worker is running."""
        return phone in self._workers

    async def flush(self) -> None:
        """Write every delivery finished so far (also those a flush already under way has)."""
        await self._flush_finished()
        await asyncio.gather(*self._flushing, return_exceptions=True)

    async def forget(self) -> None:
        """Stop every phone's worker and drop the queues, without closing: the deliveries stay
        pending in the spool (the cluster's fence: another instance takes them over). A request
        cut on the wire ends ``unconfirmed`` as at shutdown."""
        self._forgetting = True
        try:
            workers = list(self._workers.values())
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            self._workers.clear()
            for queue in self._queues.values():
                self._outstanding -= len(queue)
            self._queues.clear()
            self._known = {f[0] for f in self._finished} | self._writing
            self._cancelled &= self._known
            if self._outstanding <= 0:
                self._outstanding = 0
                self._idle.set()
        finally:
            self._forgetting = False

    @property
    def lanes(self) -> PhoneLanes:
        return self._lanes

    def update_phones(self, phones: Mapping[str, PhoneTarget]) -> None:
        """Apply a reloaded phone list (to the lanes, which may be shared)."""
        self._lanes.update(phones)

    def queued(self, phone: str) -> int:
        """Deliveries waiting for ``phone`` (queued or waiting out a retry)."""
        queue = self._queues.get(phone)
        return len(queue) if queue is not None else 0

    @property
    def outstanding(self) -> int:
        """Deliveries queued or in flight."""
        return self._outstanding

    async def wait_idle(self) -> None:
        """Return when nothing is queued or in flight (tests, ``fire``)."""
        await self._idle.wait()

    # --- workers --------------------------------------------------------------------------------

    async def _work(self, phone: str) -> None:
        queue = self._queues[phone]
        try:
            while queue and not self._closing:
                delivery = queue.popleft()
                try:
                    await self._deliver(delivery)
                except _Draining:
                    return
                finally:
                    self._outstanding -= 1
                    if self._outstanding == 0:
                        await self._flush_finished()
                        self._idle.set()
        finally:
            # No await between the empty queue and this: a later submit makes a new worker.
            if self._workers.get(phone) is asyncio.current_task():
                del self._workers[phone]
            if not queue and self._queues.get(phone) is queue:
                del self._queues[phone]
                if self.on_idle is not None and not self._closing and not self._forgetting:
                    self.on_idle(phone)

    async def _deliver(self, delivery: Delivery) -> None:
        sent, attempts, error = delivery.sent, delivery.attempts, delivery.error
        # A resumed delivery whose stored error says a request went unconfirmed ends that way.
        unconfirmed = error if error.startswith(_UNCONFIRMED) else ""
        backoff = self._retry_initial
        while True:
            if delivery.id in self._cancelled:
                self._cancelled.discard(delivery.id)
                self._known.discard(delivery.id)
                return
            if self._clock() >= delivery.expires_at:
                await self._finish(delivery, DeliveryState.EXPIRED, attempts, error or "TTL passed")
                return
            if delivery.phone not in self._lanes:
                await self._finish(
                    delivery, DeliveryState.FAILED, attempts, "phone not in the configuration"
                )
                return
            try:
                async with self._bound:
                    while sent < len(delivery.requests):
                        if self._closing:
                            raise _Draining
                        if self.gate is not None:
                            waiting = self.gate(delivery.phone)
                            if waiting is not None:
                                await waiting
                        attempts += 1
                        try:
                            await self._send(delivery, sent)
                        except PhoneUnconfirmed as exc:
                            if delivery.rule in self.retry_unconfirmed:
                                raise
                            # The phone may have run it: never again. Go on with the rest.
                            unconfirmed = f"{_UNCONFIRMED}{exc}"
                        sent += 1
                        if sent < len(delivery.requests):
                            await self._progress(delivery, sent, attempts, unconfirmed)
            except PhoneError as exc:
                error = str(exc)
                if not (exc.retryable or isinstance(exc, PhoneUnconfirmed)):
                    await self._finish(delivery, DeliveryState.FAILED, attempts, error)
                    return
                delay = min(self._retry_max, backoff) * self._rng()
                backoff = min(self._retry_max, backoff * 2)
                remaining = delivery.expires_at - self._clock()
                if delay >= remaining:
                    # No attempt can happen inside the TTL: the page is already too late.
                    await asyncio.sleep(max(0.0, remaining))
                    continue
                await self._progress(delivery, sent, attempts, unconfirmed or error)
                self._metrics.retries.labels(delivery.phone).inc()
                log.info(
                    "delivery %s to %s: %s; retrying in %.1f s",
                    delivery.id,
                    delivery.phone,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            except asyncio.CancelledError:
                if delivery.id in self._cut and delivery.rule not in self.retry_unconfirmed:
                    # Cut (shutdown) after the request was written: the phone may have run it,
                    # so it must not be sent again on the next start.
                    await self._finish(
                        delivery,
                        DeliveryState.UNCONFIRMED,
                        attempts,
                        f"{_UNCONFIRMED}the daemon stopped while waiting for the answer",
                    )
                self._cut.discard(delivery.id)
                raise
            if unconfirmed:
                await self._finish(delivery, DeliveryState.UNCONFIRMED, attempts, unconfirmed)
            else:
                await self._finish(delivery, DeliveryState.DELIVERED, attempts, "")
            return

    async def _send(self, delivery: Delivery, index: int) -> None:
        request = delivery.requests[index]
        phone = delivery.phone
        metrics = self._metrics_of(phone)
        self._sending.add(phone)
        self._wire_idle.clear()
        try:
            items = await self._lanes.push(phone, request.xml, receipts=request.kind == "execute")
        except PhoneError as exc:
            reachable = not isinstance(exc, PhoneNotSent | PhoneTimeout)
            metrics.up.set(1 if reachable else 0)
            self._metrics.requests.labels(phone, type(exc).__name__).inc()
            if self.on_reach is not None:
                self.on_reach(phone, reachable, str(exc))
            raise
        except asyncio.CancelledError:
            if self._lanes.written(phone):
                self._cut.add(delivery.id)
            raise
        finally:
            self._sending.discard(phone)
            if not self._sending:
                self._wire_idle.set()
        metrics.up.set(1)
        metrics.ok.inc()
        if self.on_reach is not None:
            self.on_reach(phone, True, "")
        refused = [i for i in items if not i.ok]
        if refused:
            raise _ItemRefused(
                "; ".join(f"{i.url}: {i.data} (status {i.status})" for i in refused), phone=phone
            )

    async def _finish(
        self, delivery: Delivery, result: DeliveryState, attempts: int, error: str
    ) -> None:
        self._cancelled.discard(delivery.id)
        self._finished.append((delivery.id, result, error, attempts))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._start_flush)
        seconds = self._clock() - delivery.created_at
        self._metrics.ended(delivery.phone, result)
        if result is DeliveryState.DELIVERED:
            self._metrics_of(delivery.phone).duration.observe(seconds)
        outcome = Outcome(
            delivery.event_id, delivery.rule, delivery.phone, result, attempts, error, seconds
        )
        level = logging.INFO if result is DeliveryState.DELIVERED else logging.WARNING
        log.log(
            level,
            "delivery %s event %s rule %s phone %s %s after %s in %.3f s%s",
            delivery.id,
            delivery.event_id,
            delivery.rule,
            delivery.phone,
            result,
            counted(attempts, "attempt"),
            seconds,
            f": {error}" if error else "",
        )
        if self._on_outcome is not None:
            try:
                await self._on_outcome(outcome)
            except Exception:  # an outcome publisher must never stop deliveries
                log.exception("publishing the outcome of delivery %s failed", delivery.id)

    def _start_flush(self) -> None:
        """The ``call_soon``/``call_later`` callback of a flush: a loop callback cannot await
        the store, so the flush runs as a task of its own. Deliveries finished before it starts
        are still in ``_finished`` and written with the rest."""
        task = asyncio.get_running_loop().create_task(
            self._flush_finished(), name="dispatcher:flush"
        )
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush_finished(self) -> None:
        """Write the finished deliveries collected since the last flush in one transaction
        (scheduled with ``call_soon`` by the first of them; also run before going idle)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        finished, self._finished = self._finished, []
        if not finished:
            return
        ids = {f[0] for f in finished}
        self._writing |= ids
        try:
            await self._spool.deliveries.finish_many(finished)
            self._known -= ids
            self._cancelled -= ids  # cancels that came after they finished
            done = self._done
            done.update(dict.fromkeys(ids))
            for _ in range(len(done) - _DONE_KEPT):
                del done[next(iter(done))]
        except SpoolError as exc:
            # Kept and written again later (a full disk comes back): dropped, they would stay
            # pending in the spool, counted against max_pending, until a restart sent them again.
            # If the daemon stops first, they are sent again after the restart (at least once).
            log.error("recording %d finished deliveries failed: %s", len(finished), exc)
            self._finished[:0] = finished
            if not self._closing:
                loop = asyncio.get_running_loop()
                self._flush = loop.call_later(self._retry_initial, self._start_flush)
        except asyncio.CancelledError:
            # The worker writing them was stopped (the cluster's fence, a drain): dropped, they
            # would stay pending in the store and be pushed again by whoever loads them next.
            # Written again (finishing twice is harmless), by drain itself when closing.
            self._finished[:0] = finished
            if self._flush is None and not self._closing:
                self._flush = asyncio.get_running_loop().call_soon(self._start_flush)
            raise
        finally:
            self._writing -= ids

    async def _progress(
        self, delivery: Delivery, sent: int, attempts: int, error: str = ""
    ) -> None:
        try:
            await self._spool.deliveries.progress(delivery.id, sent, attempts, error)
        except SpoolError as exc:
            # Only a saving for a resumed delivery (its answered requests are not sent again);
            # raised from here, it would end this phone's worker and strand its queue.
            log.warning("recording progress of delivery %s failed: %s", delivery.id, exc)

    def _metrics_of(self, phone: str) -> _PhoneMetrics:
        metrics = self._phone_metrics.get(phone)
        if metrics is None:
            m = self._metrics
            metrics = self._phone_metrics[phone] = _PhoneMetrics(
                up=m.phone_up.labels(phone),
                ok=m.requests.labels(phone, "ok"),
                duration=m.delivery_duration.labels(phone),
            )
        return metrics

    # --- shutdown -------------------------------------------------------------------------------

    async def drain(self, grace: float) -> int:
        """Stop taking work, let requests on the wire finish for up to ``grace`` seconds, then
        cancel the rest. Unfinished deliveries stay pending in the spool for the next start.
        Returns how many requests were cut short."""
        self._closing = True
        for phone, task in list(self._workers.items()):
            if phone not in self._sending:
                task.cancel()  # waiting out a retry backoff: nothing to finish
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._wire_idle.wait()
        cut = len(self._sending)
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._workers.clear()
        await self._flush_finished()
        await asyncio.gather(*self._flushing, return_exceptions=True)
        return cut

    async def close(self) -> None:
        if self._workers:
            await self.drain(0)
        if self._own_lanes:
            await self._lanes.close()
