"""Phone health: which configured phones are there, what they are, and since when.

Each phone is probed once per ``[health] interval`` through its lane (so never while a push to
it is on the wire, and over the lanes' bounded connections): ``GET /DeviceInformationX`` gives
its model, firmware, MAC and host name; a phone whose web pages say nothing still counts as
there when it answered, and one whose answer was no readable HTTP is settled by a TCP connect
(:meth:`phonepush.phone.lanes.PhoneLanes.probe`). A push is the freshest check there is: a phone
pushed to within the interval is not probed, and every push's reachability and result are
recorded here (:meth:`Health.reached`, :meth:`Health.outcome`).

Probes are spread evenly over the interval, each phone at its own offset, and at most
:data:`MAX_PROBING` run at once: thousands of phones never make a burst. The first round is
spread over a shorter ramp (:data:`START_GAP` per phone, never longer than the interval) so
every phone's ``phonepush_phone_up`` exists soon after start without a storm.

On PostgreSQL the probes run on the cluster's leader only, and each instance sees its own pushes:
what others need to know is handed to :attr:`Health.on_share` (written to the shared table by
:mod:`phonepush.health.shared`), and what they learned comes back through :meth:`Health.merge`,
which exports it and tells :attr:`Health.on_change` as a change seen here would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from phonepush.config import Config
from phonepush.errors import PhoneError
from phonepush.metrics import Metrics
from phonepush.phone.lanes import PhoneLanes
from phonepush.store.health import PhoneRecord
from phonepush.wire.cisco import DeviceInfo

__all__ = ["MAX_PROBING", "START_GAP", "Health", "PhoneHealth"]

log = logging.getLogger("phonepush.health")

#: Probes in flight at most. A phone that drops connects holds one for its whole ``timeout``
#: (10 s by default), and a round waits for a free one: with 64, a hundred such phones in a row
#: held the first round of 2,200 phones up by 20 s (bench/health_probes.py). At 50 probes a
#: second, 256 covers five seconds' worth of dead phones in a row; each holds one descriptor,
#: within the lanes' connection bound.
MAX_PROBING: Final = 256
#: Seconds between phones in the first round after start (50 probes a second).
START_GAP: Final = 0.02


@dataclass(slots=True)
class PhoneHealth:
    """What is known of one phone. ``reachable`` is None until a probe or push said."""

    name: str
    host: str
    groups: tuple[str, ...]
    reachable: bool | None = None
    since: float | None = None  # when ``reachable`` took its current value
    checked_at: float | None = None  # last probe or push
    error: str = ""
    info: DeviceInfo | None = None
    last_push: tuple[str, float] | None = None  # (result, at)
    info_labels: tuple[str, str] | None = None  # phonepush_phone_info's (model, firmware)
    info_at: float | None = None  # when ``info`` was read

    def as_dict(self, pending: int) -> dict[str, Any]:
        info = self.info
        return {
            "name": self.name,
            "host": self.host,
            "groups": list(self.groups),
            "reachable": self.reachable,
            "since": self.since,
            "model": info.model if info is not None else "",
            "firmware": info.firmware if info is not None else "",
            "mac": info.mac if info is not None else "",
            "last_push": (
                None
                if self.last_push is None
                else {"result": self.last_push[0], "at": self.last_push[1]}
            ),
            "pending": pending,
            "error": self.error,
        }


class Health:
    """The phones' health; :meth:`run` is the probe loop (a task of the daemon's TaskGroup)."""

    def __init__(
        self,
        config: Config,
        lanes: PhoneLanes,
        *,
        metrics: Metrics,
        pending: Callable[[str], int] = lambda _phone: 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lanes = lanes
        self._metrics = metrics
        self._pending = pending
        self._clock = clock
        self._phones: dict[str, PhoneHealth] = {}
        self._interval = 0.0
        self._changed = asyncio.Event()
        self._probing = asyncio.Semaphore(MAX_PROBING)
        self._tasks: set[asyncio.Task[None]] = set()
        #: Told when a phone's reachability, model or firmware changes (Home Assistant's
        #: connectivity sensors and device details); set by the app.
        self.on_change: Callable[[PhoneHealth], None] | None = None
        #: Told when what other instances need to know of a phone changed: a probe's result, a
        #: push that changed its reachability or error, its device information, its last push
        #: (on PostgreSQL, written to the shared table); set by the app. Never for a merge.
        self.on_share: Callable[[PhoneHealth], None] | None = None
        self.update(config)

    @property
    def interval(self) -> float:
        return self._interval

    def update(self, config: Config) -> None:
        """Apply a (re)loaded configuration: phones added, removed or changed, the interval."""
        now: dict[str, PhoneHealth] = {}
        for phone in config.phones:
            known = self._phones.get(phone.name)
            if known is not None and known.host == phone.host:
                known.groups = tuple(phone.groups)
                now[phone.name] = known
            else:
                if known is not None:
                    self._forget(known)
                now[phone.name] = PhoneHealth(phone.name, phone.host, tuple(phone.groups))
        for name, gone in self._phones.items():
            if name not in now:
                self._forget(gone)
        self._phones = now
        self._interval = config.health.interval
        self._changed.set()

    def phones(self) -> list[dict[str, Any]]:
        """``GET /api/phones``: every configured phone, in configuration order."""
        return [p.as_dict(self._pending(p.name)) for p in self._phones.values()]

    def get(self, name: str) -> PhoneHealth | None:
        return self._phones.get(name)

    # --- what pushes tell -------------------------------------------------------------------------

    def reached(self, phone: str, reachable: bool, error: str) -> None:
        """A push's request to ``phone`` ended (the dispatcher's ``on_reach``)."""
        state = self._phones.get(phone)
        if state is not None:
            # The dispatcher has set phonepush_phone_up itself (with its cached child: this
            # runs for every push).
            self._set(state, reachable, error, export_up=False)

    def outcome(self, phone: str, result: str, at: float) -> None:
        """A delivery to ``phone`` finished with ``result``."""
        state = self._phones.get(phone)
        if state is not None:
            state.last_push = (result, at)
            self._share(state)

    def merge(self, records: Iterable[PhoneRecord]) -> None:
        """What other instances know of the phones (the shared table on PostgreSQL): per phone
        and part, the newer wins (the later check, the later device information, the later
        push); what changes is exported and told to :attr:`on_change` as a change seen here.
        Nothing merged is shared again."""
        for record in records:
            state = self._phones.get(record.phone)
            if state is None or state.host != record.host:
                continue  # not a phone here, or at another address (a reload under way)
            changed = self._merge_check(state, record)
            if record.info_at is not None and (
                state.info_at is None or record.info_at > state.info_at
            ):
                info = DeviceInfo(record.model, record.firmware, record.mac, record.host_name)
                state.info, state.info_at = info, record.info_at
                if state.info_labels != (info.model, info.firmware):
                    self._export_info(state, (info.model, info.firmware))
                    changed = True
            if record.push_at is not None and (
                state.last_push is None or record.push_at > state.last_push[1]
            ):
                state.last_push = (record.push_result, record.push_at)
            if changed:
                self._changed_phone(state)

    def _merge_check(self, state: PhoneHealth, record: PhoneRecord) -> bool:
        """Take ``record``'s reachability if it was checked later; whether it flipped."""
        reachable = record.reachable
        if (
            reachable is None
            or record.checked_at is None
            or (state.checked_at is not None and record.checked_at <= state.checked_at)
        ):
            return False
        flipped = state.reachable is not reachable
        if flipped:
            # The instance that saw it logged it; here it is news of another's.
            log.debug(
                "phone %s %s (checked by another instance)",
                state.name,
                "reachable" if reachable else "unreachable",
            )
            state.reachable = reachable
            state.since = record.since
        elif record.since is not None and state.since is not None:
            state.since = min(state.since, record.since)
        state.checked_at = record.checked_at
        state.error = record.error
        self._metrics.phone_up.labels(state.name).set(1 if reachable else 0)
        if state.info_labels is None:
            self._export_info(state, ("", ""))
        return flipped

    # --- probing ----------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        first = True
        try:
            while True:
                self._changed.clear()
                names = list(self._phones)
                interval = self._interval
                if not names or interval <= 0:
                    await self._changed.wait()
                    continue
                span = min(interval, len(names) * START_GAP) if first else interval
                first = False
                gap = span / len(names)
                started = loop.time()
                for index, name in enumerate(names):
                    # Each phone at its own offset from the round's start, not a sleep after the
                    # last one: a busy loop (a fan-out while the round runs) would otherwise add
                    # its delays up over thousands of phones and stretch the round.
                    await asyncio.sleep(max(0.0, started + index * gap - loop.time()))
                    if self._changed.is_set():
                        break  # reloaded: start a round over the new list
                    state = self._phones.get(name)
                    if state is not None and not self._fresh(state, interval):
                        await self._probing.acquire()
                        task = asyncio.create_task(self._probe(state), name=f"probe:{name}")
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                # After the start's short ramp, the next round begins one interval after it did.
                rest = interval - (loop.time() - started)
                if rest > 0 and not self._changed.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(rest):
                            await self._changed.wait()
        finally:
            for task in list(self._tasks):
                task.cancel()

    async def probe_all(self) -> None:
        """Probe every phone now, at most :data:`MAX_PROBING` at once (tests, ``check``)."""
        async with asyncio.TaskGroup() as tg:
            for state in list(self._phones.values()):
                await self._probing.acquire()
                tg.create_task(self._probe(state))

    def _fresh(self, state: PhoneHealth, interval: float) -> bool:
        # Checked (probe or push) within most of an interval: a push stands for this round's
        # probe. The margin keeps a probe that ended just after its slot from skipping a round.
        return state.checked_at is not None and self._clock() - state.checked_at < interval * 0.9

    async def _probe(self, state: PhoneHealth) -> None:
        try:
            try:
                info = await self._lanes.probe(state.name)
            except PhoneError as exc:
                if self._phones.get(state.name) is state:
                    self._set(state, False, str(exc))
                    self._share(state)
                return
            if self._phones.get(state.name) is not state:
                return  # removed or changed by a reload meanwhile
            self._set(state, True, "")
            if info is not None:
                self._set_info(state, info)
            self._share(state)
        finally:
            self._probing.release()

    def _set(
        self, state: PhoneHealth, reachable: bool, error: str, *, export_up: bool = True
    ) -> None:
        now = self._clock()
        if state.error != error or state.reachable is not reachable:
            self._share(state)
        if state.reachable is not reachable:
            if state.reachable is not None or not reachable:
                level = logging.INFO if reachable else logging.WARNING
                log.log(
                    level,
                    "phone %s %s%s",
                    state.name,
                    "reachable" if reachable else "unreachable",
                    f": {error}" if error else "",
                )
            state.reachable = reachable
            state.since = now
            self._changed_phone(state)
        state.checked_at = now
        state.error = error
        if export_up:
            self._metrics.phone_up.labels(state.name).set(1 if reachable else 0)
        if state.info_labels is None:
            self._export_info(state, ("", ""))

    def _set_info(self, state: PhoneHealth, info: DeviceInfo) -> None:
        state.info, state.info_at = info, self._clock()
        if state.info_labels != (info.model, info.firmware):
            self._export_info(state, (info.model, info.firmware))
            self._changed_phone(state)

    def _share(self, state: PhoneHealth) -> None:
        if self.on_share is not None:
            self.on_share(state)

    def _changed_phone(self, state: PhoneHealth) -> None:
        if self.on_change is not None:
            self.on_change(state)

    def _export_info(self, state: PhoneHealth, labels: tuple[str, str]) -> None:
        self._drop_info(state)
        state.info_labels = labels
        self._metrics.phone_info.labels(state.name, *labels).set(1)

    def _drop_info(self, state: PhoneHealth) -> None:
        if state.info_labels is not None:
            with contextlib.suppress(KeyError):
                self._metrics.phone_info.remove(state.name, *state.info_labels)
            state.info_labels = None

    def _forget(self, state: PhoneHealth) -> None:
        # phonepush_phone_up stays: the dispatcher keeps its child for the phone, which a
        # remove() would detach for good should the phone come back.
        self._drop_info(state)
