"""One instance's part in a cluster of daemons sharing a PostgreSQL store.

On PostgreSQL the cluster is always on (one instance is a cluster of one); on SQLite there is no
:class:`Cluster` at all and the daemon hands work straight to its dispatcher.

Membership and leases
    Each instance has an id (``host-pid-4 hex``) and a row in ``cluster_instances`` whose
    ``expires_at`` it pushes to *database now + lease* every third of the lease. An owner is live
    while that time is ahead of the database's clock; every comparison uses that one clock.

Self-fencing
    The instance notes (monotonic clock) when it *sent* each heartbeat that succeeded: the
    database computed the expiry after that, so the lease surely holds until *sent + lease*. A
    push starts only while more than the phone's request timeout is left of it (capped at half
    the lease, or with the default lease of 10 s and phone timeout of 10 s no push would ever
    start: a push that outlives the cap is cut by the fence below, which is what bounds it then).
    When the lease is about to run out without a renewal (a tenth of it before), the instance
    fences itself: every phone worker is stopped (its deliveries stay pending in the store), it
    forgets what it owned and claims nothing until a heartbeat succeeds again; that heartbeat
    first drops the claims it still had in the database (it no longer acts on them, and a
    renewed lease would otherwise make them live again with nobody pushing). The others take
    its claims only once its ``expires_at`` has passed, so two instances never push to one phone
    at once, unless a push outlives the lease (a request cut when the lease ran out may already
    be on the phone) or the process is frozen for longer than the lease.

Phones
    A phone's deliveries are pushed only by the holder of its ``phone`` claim.
    :meth:`Cluster.submit` replaces the dispatcher's ``submit`` wherever committed work is handed
    over: phones held here go straight to the dispatcher; the others are claimed in one
    statement (held already, unclaimed, or the owner not live) and their pending deliveries
    loaded and submitted; a phone a live instance holds is that instance's to push: it finds the
    new work when its worker for the phone goes idle. Then, after the finished deliveries are
    written, it releases the claim only if the phone has nothing pending, in one transaction that
    locks the claim row before it looks (see :mod:`phonepush.store.cluster` for why no delivery
    can fall between); if something is pending it keeps the phone and submits what it finds.
    The dispatcher ignores a delivery it already has, so loading more than needed is harmless.
    The phone is dropped from what is held here *before* the release runs: a submit meanwhile
    goes through the claim statement, which the database orders against the release.

Adoption
    Every third of the lease, and soon after a ``work`` notification, the instance takes over
    (a) phones whose owner is not live (``FOR UPDATE SKIP LOCKED``: survivors scanning at once
    split them without waiting for each other) and (b) phones with pending pushes and no claim
    (an instance died between its commit and its claim); at each heartbeat's scan it also
    reads (c) the phones it owns with pending pushes, and those it does not act on (a claim or
    scan whose answer was lost) go through a release, which loads their work. It loads the
    pending deliveries of (a) and (b), oldest first, with ``sent``/``attempts``/``error`` as
    stored (a delivery resumes after its last confirmed request). Audio-page rows of a phone
    taken from an instance that is not live go through the announcer's ``abandon`` (a live audio
    page is never replayed); at start-up an instance alone in the cluster finishes every pending
    audio row as a single daemon does.

Timers
    The leader (the ``timer`` claim ``leader``, taken and renewed with the heartbeat under the
    same owner-not-live rule) alone runs repeats, group flushes, housekeeping and health probes:
    :meth:`Cluster.lead` runs a task's loop while this instance leads and cancels it when the
    leadership is lost or fenced. Schedules claim their firings in the store and run everywhere.

Notifications (channel ``phonepush``, one connection of its own, reconnected with backoff)
    ``work`` after commits that add pending deliveries, alerts or group windows and when an
    instance leaves: an adoption scan (at most one per 50 ms) and a wake-up of the leader's
    repeater and grouper. ``cancel:<ids>`` from whoever cancels deliveries: every instance drops
    them from its queues. ``silences`` after a silence is added or expired: every instance reloads
    its silences (also every lease, in case a notification was missed). ``full:1``/``full:0``
    after the leader's size check: every instance refuses events, or takes them again, on its
    word (only the leader measures the shared store).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from phonepush.cluster.interface import ClusterStore, Lanes
from phonepush.cluster.loops import Coalesced, Leadership, Tasks
from phonepush.errors import SpoolError
from phonepush.store.records import Delivery, DeliveryKind

__all__ = ["Cluster", "instance_id"]

log = logging.getLogger("phonepush.cluster")

#: Notifications received within this long of each other lead to one adoption scan.
_SCAN_COALESCE: Final = 0.05
#: Phones whose workers go idle within this long of each other are released in one transaction.
_RELEASE_COALESCE: Final = 0.02
#: ``cancel:`` payloads stay under PostgreSQL's 8000-byte limit on a notification.
_CANCEL_CHUNK: Final = 7000


def instance_id() -> str:
    """``host-pid-xxxx``: readable in logs, unique even when a pid is reused."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def _nothing() -> None:
    return None


def _ignore(full: bool) -> None:
    return None


def _never(phone: str) -> bool:
    return False


async def _keep(deliveries: list[Delivery]) -> list[Delivery]:
    return deliveries


class Cluster:
    """This instance's membership, claims, leadership and notifications; ``await run()`` as a
    task after :meth:`start`, :meth:`leave` after the dispatcher has drained.

    ``lanes`` is the dispatcher; ``push_timeout`` says a phone's request timeout. What the
    daemon builds later is set as attributes: ``wake`` (the leader's repeater and grouper),
    ``reload_silences`` and ``abandon`` (the announcer's, for audio-page rows), ``keeps`` (the
    audio pages' :class:`~phonepush.cluster.floor.Floor`).
    """

    def __init__(
        self,
        store: ClusterStore,
        lanes: Lanes,
        *,
        lease: float,
        registry: CollectorRegistry,
        push_timeout: Callable[[str], float] = lambda phone: 10.0,
        instance: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.id = instance if instance is not None else instance_id()
        self._host = socket.gethostname()
        self._store = store
        self._lanes = lanes
        self.lease = lease
        self.push_timeout = push_timeout
        self._clock = clock
        self.wake: Callable[[], None] = _nothing
        self.reload_silences: Callable[[], Awaitable[None]] | None = None
        #: Told what the leader's size check says (``full:1``/``full:0``): only the leader
        #: measures the shared store against ``max_size``.
        self.on_full: Callable[[bool], None] = _ignore
        self.abandon: Callable[[list[Delivery]], Awaitable[list[Delivery]]] = _keep
        #: Whether a phone stays held although its worker went idle (an audio page is playing
        #: on it: :class:`phonepush.cluster.floor.Floor`, which releases it after the page).
        self.keeps: Callable[[str], bool] = _never
        #: Phones whose claim this instance holds and acts on.
        self._held: set[str] = set()
        #: Phones perhaps this instance's in the database without being acted on here (a
        #: release failed, a phone taken had nothing new to push, a claim answered after a
        #: fence): released again at the next heartbeat, which loads their work if any.
        self._unreleased: set[str] = set()
        #: Phones being released -> whether work for them came meanwhile (claimed again once
        #: the release is done: taken while it runs, the phone would be held here in memory but
        #: released in the database, and another instance could claim it too).
        self._releasing: dict[str, bool] = {}
        #: Phones gone idle, not yet in a release transaction.
        self._to_release: set[str] = set()
        #: Until when (monotonic) the lease surely holds; None before the first heartbeat.
        self._valid_until: float | None = None
        self._fenced = False
        #: Set by each heartbeat: the next scan also compares the phones this instance owns
        #: with pending work in the database with those it acts on.
        self._audit = False
        #: Bumped at each fence: work started before it must not act after it.
        self._epoch = 0
        self._renewed = asyncio.Event()
        self._leaving = False
        self._tasks = Tasks()
        self._leadership = Leadership(self._led)
        self._scans = Coalesced(self._adopt, self._tasks, "cluster:scan", _SCAN_COALESCE)
        self._releases = Coalesced(self._release, self._tasks, "cluster:release", _RELEASE_COALESCE)
        self._work = Coalesced(
            functools.partial(self._notify, "work"), self._tasks, "cluster:notify"
        )
        self._interval = lease / 3
        self._loops: list[asyncio.Task[None]] = []
        self._beats = 0
        self._failing = False
        self.instances = Gauge(
            "phonepush_cluster_instances",
            "Live instances in the cluster at this instance's last heartbeat.",
            registry=registry,
        )
        self.leader_gauge = Gauge(
            "phonepush_cluster_leader",
            "1 while this instance leads the cluster's timers (repeats, group flushes,"
            " housekeeping, health probes).",
            registry=registry,
        )
        self.phones = Gauge(
            "phonepush_cluster_phones",
            "Phones whose lane this instance holds.",
            registry=registry,
        )
        self.phones.set_function(lambda: len(self._held))
        self.adopted = Counter(
            "phonepush_cluster_adopted",
            "Phones taken over from an instance whose lease had run out.",
            registry=registry,
        )

    # --- state ----------------------------------------------------------------------------------

    @property
    def leader(self) -> bool:
        return self._leadership.leading

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def remaining(self) -> float:
        """Seconds the lease surely holds (0 when fenced or not yet joined)."""
        if self._valid_until is None or self._fenced:
            return 0.0
        return max(0.0, self._valid_until - self._clock())

    def _live(self) -> bool:
        return not self._fenced and not self._leaving and self.remaining() > 0

    # --- the daemon's side ----------------------------------------------------------------------

    async def start(self) -> None:
        """Join (first heartbeat), then adopt what is pending and unowned; at start-up an
        instance alone in the cluster also finishes the pending audio-page rows."""
        alone = await self._beat()
        if alone:
            try:
                audio = await self._store.pending_audio()
                if audio:
                    await self.abandon(audio)
            except SpoolError as exc:
                log.warning("cluster: audio pages left pending not read: %s", exc)
        await self._adopt(starting=True)

    async def run(self) -> None:
        """Heartbeats, the fence, notifications and the periodic adoption scan, until
        cancelled."""
        async with asyncio.TaskGroup() as tg:
            self._loops = [
                tg.create_task(self._heartbeats(), name="cluster:heartbeat"),
                tg.create_task(self._watch(), name="cluster:fence"),
                tg.create_task(
                    self._store.listen(self._notified, self._connected), name="cluster:listen"
                ),
            ]

    def submit(self, deliveries: Sequence[Delivery]) -> None:
        """Hand committed pending deliveries over: pushed here if this instance holds (or can
        claim) their phones, else left to the phone's owner."""
        if not deliveries:
            return
        mine: list[Delivery] = []
        others: set[str] = set()
        for delivery in deliveries:
            if delivery.phone in self._held:
                mine.append(delivery)
            elif delivery.phone in self._releasing:
                self._releasing[delivery.phone] = True
            else:
                others.add(delivery.phone)
        if mine:
            self._lanes.submit(mine)
        if others:
            if self._live():
                self._tasks.spawn(self.claim(sorted(others)), "cluster:claim")
            # Phones another instance may hold (it finds the work when its worker goes idle)
            # or none can claim now: the others look at once.
            self.notify_work()

    def cancel(self, delivery_ids: Iterable[int]) -> None:
        """Cancel deliveries here and on every other instance."""
        ids = list(delivery_ids)
        if not ids:
            return
        self._lanes.cancel(ids)
        for chunk in _chunks(ids):
            self._tasks.spawn(self._notify(f"cancel:{chunk}"), "cluster:notify")

    def notify_work(self) -> None:
        """Tell every instance there is new work (coalesced: one notification in flight, one
        more after it if asked meanwhile)."""
        self._work.poke()

    def announce(self, payload: str) -> None:
        """Tell every instance (this one too): ``silences`` after a silence changed, ``full:1``
        or ``full:0`` after the leader's size check."""
        self._tasks.spawn(self._notify(payload), "cluster:notify")

    def gate(self, phone: str) -> Awaitable[None] | None:
        """For the dispatcher, before each request: None when enough of the lease is left for
        a push to ``phone`` to end inside it, else an awaitable that returns once it is."""
        need = min(self.push_timeout(phone), self.lease / 2)
        if self.remaining() > need:
            return None
        return self._until_lease(need)

    def idle(self, phone: str) -> None:
        """For the dispatcher: its worker for ``phone`` ran out of work."""
        if phone not in self._held or self._leaving or self.keeps(phone):
            return
        # Dropped before the release runs: a submit for the phone meanwhile claims it through
        # the database, which orders that claim against the release.
        self._held.discard(phone)
        self._releasing[phone] = False
        # Released together with the phones that go idle with it (a fan-out's phones finish
        # together): one transaction instead of one each.
        self._to_release.add(phone)
        self._releases.poke()

    async def lead(self, runner: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Run ``runner()`` while this instance leads, cancel it when it stops leading; for
        ever (a task of the daemon's)."""
        await self._leadership.lead(runner, name)

    async def leave(self) -> None:
        """Graceful stop, after the dispatcher drained: drop this instance's claims and row so
        the others adopt its phones at once (they hear ``work``)."""
        self._leaving = True
        # The heartbeat first: one more would register this instance again after it left.
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._scans.close()
        self._releases.close()
        self._work.close()
        await self._tasks.cancel()
        self._leadership.set(False)
        self._held.clear()
        try:
            await self._store.leave(self.id)
        except SpoolError as exc:
            log.warning(
                "cluster: leaving failed (the others take over in %.0f s): %s", self.lease, exc
            )

    # --- heartbeats and the fence ---------------------------------------------------------------

    async def _beat(self) -> bool:
        """One heartbeat; True when this instance is the only live one."""
        sent = self._clock()
        rejoin = self._fenced
        try:
            # A renewal that took longer than the lease would be worth nothing (the lease
            # counts from when it was sent); a shorter bound would never let one through
            # while the pool reconnects after an outage.
            async with asyncio.timeout(self.lease):
                live, leader = await self._store.heartbeat(
                    self.id, self._host, self.lease, rejoin=rejoin
                )
        except (SpoolError, TimeoutError) as exc:
            if not self._failing:
                log.warning("cluster: heartbeat failed: %s", str(exc) or "timed out")
            self._failing = True
            return False
        if self._failing:
            log.info("cluster: heartbeat renewed")
        self._failing = False
        if self._fenced and not rejoin:
            # Sent before the fence and answered after it: the claims it kept alive are no
            # longer acted on here; the next heartbeat drops them and rejoins.
            return False
        self._valid_until = sent + self.lease
        if rejoin:
            self._fenced = False
            log.info("cluster: heartbeat renewed; instance %s takes work again", self.id)
        self._renewed.set()
        self._renewed = asyncio.Event()
        self.instances.set(live)
        self._leadership.set(leader == self.id)
        return live <= 1

    async def _heartbeats(self) -> None:
        while True:
            started = self._clock()
            await self._beat()
            self._beats += 1
            if self._live():
                self._audit = True
                self._scans.poke()
                self._retry_releases()
                if self._beats % 3 == 0:
                    # Not awaited here: a reload stuck on a connection lost mid-statement
                    # would stop the heartbeats, and the instance would fence itself and not
                    # rejoin while it hung.
                    self._tasks.spawn(self._reload_silences(), "cluster:silences")
                pause = self._interval - (self._clock() - started)
            else:
                # Not renewed: try again soon, the lease is running out.
                pause = min(1.0, self._interval / 2)
            await asyncio.sleep(max(0.0, pause))

    async def _watch(self) -> None:
        """Fence when the lease is about to run out without a renewal."""
        while True:
            renewed = self._renewed
            if self._valid_until is None or self._fenced:
                await renewed.wait()
                continue
            left = self._valid_until - self.lease / 10 - self._clock()
            if left <= 0:
                await self._fence()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await renewed.wait()

    async def _fence(self) -> None:
        self._fenced = True
        self._epoch += 1
        held = len(self._held)
        self._held.clear()
        self._unreleased.clear()
        # Phones waiting for a release that will not run now: no longer being released, or a
        # submit after the rejoin would wait for it for ever and their work would stay pending.
        # (A release in flight clears its own phones when it ends, whatever its outcome.)
        for phone in self._to_release:
            self._releasing.pop(phone, None)
        self._to_release.clear()
        self._leadership.set(False)
        log.warning(
            "cluster: lease of instance %s not renewed in time; stopped pushing (%d phone(s)"
            " dropped, their deliveries stay pending) until the database answers",
            self.id,
            held,
        )
        await self._lanes.forget()

    async def _until_lease(self, need: float) -> None:
        while self.remaining() <= need:
            await self._renewed.wait()

    def _led(self, leading: bool) -> None:
        self.leader_gauge.set(1 if leading else 0)
        if leading:
            log.info("cluster: instance %s leads the timers now", self.id)
        else:
            log.info("cluster: instance %s no longer leads the timers", self.id)

    # --- claims ---------------------------------------------------------------------------------

    async def claim(self, phones: list[str]) -> None:
        """Claim ``phones`` where they are free, held here, or their holder is not live, and
        push their pending deliveries; a phone another live instance holds stays its own."""
        epoch = self._epoch
        try:
            claimed = await self._store.claim(self.id, phones)
        except SpoolError as exc:
            # Pending in the store: the next adoption scan finds it if the claim did not
            # commit. If it did and only its answer was lost, the phones are this live
            # instance's, which no scan takes: the next heartbeat's release settles them.
            log.warning("cluster: claiming %d phone(s) failed: %s", len(phones), exc)
            self._unreleased.update(phones)
            return
        await self._took(claimed, epoch)

    async def _adopt(self, *, starting: bool = False) -> None:
        if not self._live():
            return
        epoch = self._epoch
        audit, self._audit = self._audit, False
        try:
            # Bounded: a scan stuck on a connection lost mid-statement would hold every later
            # scan back (they are coalesced behind it).
            async with asyncio.timeout(self.lease):
                taken = await self._store.adopt(self.id)
                owned = await self._store.owned(self.id) if audit else []
        except (SpoolError, TimeoutError) as exc:
            log.warning("cluster: adoption scan failed: %s", str(exc) or "timed out")
            return
        if taken and starting:
            log.info("cluster: resuming the pending deliveries of %d phone(s)", len(taken))
        await self._took(taken, epoch)
        if epoch != self._epoch:
            return
        # Phones this live instance owns in the database without acting on them (a scan
        # whose answer was lost, or cut by its timeout after its first statement committed):
        # no other instance takes them, so their work would stay pending for ever. The next
        # heartbeat's release settles them (the claim row locked, unlike this read).
        self._unreleased.update(set(owned) - self._held - self._releasing.keys())

    async def _took(self, claimed: list[tuple[str, str]], epoch: int) -> None:
        """Phones now held here: load and submit their pending deliveries."""
        if not claimed:
            return
        if epoch != self._epoch:
            # Claimed before a fence, answered after it: not acted on. But the statement may
            # have reached the database after the rejoin dropped this instance's claims (held
            # up while the pool reconnected): the phones are then this live instance's there,
            # which no scan anywhere takes, and their work would stay pending for ever. The
            # next heartbeat releases them or loads their work ("lost" if the rejoin came
            # last).
            self._unreleased.update(phone for phone, _ in claimed)
            return
        orphaned: dict[str, list[str]] = {}
        for phone, previous in claimed:
            if previous and previous != self.id:
                orphaned.setdefault(previous, []).append(phone)
        for previous, names in sorted(orphaned.items()):
            self.adopted.inc(len(names))
            log.info(
                "cluster: adopted %d phone(s) from instance %s, whose lease ran out: %s",
                len(names),
                previous,
                ", ".join(sorted(names)),
            )
        phones = {phone for phone, _ in claimed}
        # A phone whose release is under way is claimed again once it is done (see submit).
        for phone in phones & self._releasing.keys():
            self._releasing[phone] = True
        phones -= self._releasing.keys()
        if not phones:
            return
        self._held.update(phones)
        self._unreleased -= phones
        dead = {p for names in orphaned.values() for p in names}
        try:
            # Bounded as a scan's and a release's own statements are: run inside them, a read
            # stuck on a connection lost mid-statement would hold every later one back.
            async with asyncio.timeout(self.lease):
                pending = await self._store.pending_of(phones, audio_of=dead)
            if dead and any(d.kind is DeliveryKind.AUDIO for d in pending):
                pending = await self.abandon(pending)
        except (SpoolError, TimeoutError) as exc:
            log.warning(
                "cluster: reading the pending deliveries of phones taken: %s",
                str(exc) or "timed out",
            )
            # Held but not loaded: release them, so a scan (here or elsewhere) takes them again.
            self._unreleased |= phones
            return
        if epoch != self._epoch:
            self._unreleased |= phones  # as above: perhaps claimed after the rejoin
            return
        self._lanes.submit(pending)
        for phone in phones:
            if not self._lanes.busy(phone) and not self.keeps(phone):
                # Nothing to push (done or acknowledged meanwhile, or all of it the
                # dispatcher's already, finished but not yet written; a page's claim that came
                # back after the page gave up): no worker will go idle for the phone, and held
                # for ever it would keep the others' work for it pending for ever. Released (or
                # its work loaded) at the next heartbeat, unless a page keeps it.
                self._unreleased.add(phone)

    async def _release(self) -> None:
        phones, self._to_release = sorted(self._to_release), set()
        if not phones:
            return
        if not self._live():
            # Fenced (or leaving): nothing is held; a rejoin drops the claims in the database.
            for phone in phones:
                self._releasing.pop(phone, None)
            return
        epoch = self._epoch
        try:
            # Bounded as a scan is: releases run one after another, so one stuck on a
            # connection lost mid-statement would hold every later one back, and the phones
            # waiting for them would keep their new work pending for ever. (A flush cut short
            # keeps what it was writing, and writes it again.)
            async with asyncio.timeout(self.lease):
                await self._lanes.flush()
                results = await self._store.release(self.id, phones)
        except (SpoolError, TimeoutError) as exc:
            log.warning(
                "cluster: releasing %d phone(s) failed: %s", len(phones), str(exc) or "timed out"
            )
            for phone in phones:
                self._releasing.pop(phone, None)
            if epoch == self._epoch:
                # Still ours in the database: the retry keeps those that got work meanwhile.
                self._unreleased.update(phones)
            return
        kept: list[str] = []
        again: list[str] = []
        for phone in phones:
            came = self._releasing.pop(phone, False)
            if results.get(phone) == "kept":
                kept.append(phone)
            elif came:
                again.append(phone)
        if epoch != self._epoch:
            return
        if again:
            self._tasks.spawn(self.claim(again), "cluster:claim")
        if not kept:
            return
        # Pending work came in for phones held here (committed by another instance, or
        # finished here but not yet written): keep them and push what is there (_took looks
        # again at the next heartbeat if none of it is new to the dispatcher).
        await self._took([(phone, "") for phone in kept], epoch)

    def _retry_releases(self) -> None:
        for phone in sorted(self._unreleased):
            # A release of the phone under way settles it; idle() now would also wipe what it
            # noted (work came meanwhile). Tried at the next heartbeat.
            if self._lanes.busy(phone) or phone in self._releasing:
                continue
            self._unreleased.discard(phone)
            self._held.add(phone)
            self.idle(phone)

    # --- notifications --------------------------------------------------------------------------

    def _notified(self, payload: str) -> None:
        if payload == "work":
            self.wake()
            self._scans.poke()
        elif payload.startswith("cancel:"):
            ids: list[int] = []
            for part in payload[7:].split(","):
                with contextlib.suppress(ValueError):
                    ids.append(int(part))
            # Every id, also those not here: one this instance is loading (it took the phone
            # as the ack committed) is skipped when it arrives. The dispatcher bounds how many
            # of those it keeps.
            self._lanes.cancel(ids)
        elif payload in ("full:1", "full:0"):
            self.on_full(payload == "full:1")
        elif payload == "silences":
            self._tasks.spawn(self._reload_silences(), "cluster:silences")

    def _connected(self) -> None:
        """(Re)connected to the channel: what was sent meanwhile was missed; look again."""
        self._scans.poke()
        self.wake()
        self._tasks.spawn(self._reload_silences(), "cluster:silences")

    async def _notify(self, payload: str) -> None:
        try:
            await self._store.notify(payload)
        except SpoolError as exc:
            # The others find the work at their next scan (every third of the lease).
            log.warning("cluster: notification %s not sent: %s", payload[:16], exc)

    async def _reload_silences(self) -> None:
        if self.reload_silences is None:
            return
        try:
            await self.reload_silences()
        except SpoolError as exc:
            log.warning("cluster: reloading the silences failed: %s", exc)


def _chunks(ids: list[int]) -> Iterable[str]:
    """Comma-separated ids in payloads under :data:`_CANCEL_CHUNK` bytes."""
    part: list[str] = []
    size = 0
    for delivery_id in ids:
        text = str(delivery_id)
        if part and size + len(text) + 1 > _CANCEL_CHUNK:
            yield ",".join(part)
            part, size = [], 0
        part.append(text)
        size += len(text) + 1
    if part:
        yield ",".join(part)
