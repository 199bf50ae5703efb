"""The floor: an audio page pushes to a phone only while its instance holds that phone's claim.

A page's start push, its RTP stream and its stop push are pushed by the instance that took the
event, through its own phone lanes (:mod:`phonepush.audio.announce`), not by the dispatcher. So
that they never reach a phone while another instance pushes a delivery to it ("one push at a
time per phone, whoever sends it"), the announcer first takes the floor of its target phones:

* :meth:`Floor.take` claims them through the cluster (free, held here already, or their holder
  not live), and for a phone another live instance holds, claims again every :data:`_POLL`
  seconds until it is got or the page's wait (``within``, the announcer's choice) ends: that
  instance releases the phone once its worker for it goes idle with nothing pending (a release
  sends no notification, hence the poll). A phone not got in time is refused, with the
  reason, and the page goes on without it. Nothing is claimed while this instance is fenced.
* While a page holds a phone (:meth:`Floor.keeps`), the cluster does not release it when its
  worker goes idle: deliveries committed for it through another instance stay pending (that
  instance cannot claim it); those committed here take turns with the page's pushes in the
  phone's lane, as on a single instance.
* :meth:`Floor.done` after the page (stops pushed): the phone is handed to the cluster's ``idle``
  path, which releases it if nothing is pending, or keeps it and pushes what is.

A start push waits, as a delivery's request does, until enough of the lease is left for it to
end inside it (:meth:`Floor.ready`). A fence drops the claims (the cluster forgets what it held):
:meth:`Floor.holds` then says no, and the page pushes no new start; its stops still go out (they
are guaranteed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, Protocol

__all__ = ["Claims", "Floor"]

log = logging.getLogger("phonepush.cluster")

#: How often a phone another live instance holds is claimed again while a page waits for it.
_POLL: Final = 0.25

HELD_ELSEWHERE: Final = "held by another instance"
FENCED: Final = "this instance's cluster lease is not renewed"


class Claims(Protocol):
    """What the floor needs of :class:`phonepush.cluster.Cluster`."""

    @property
    def held(self) -> frozenset[str]: ...

    def remaining(self) -> float:
        """Seconds the lease surely holds; 0 while fenced."""
        ...

    async def claim(self, phones: list[str]) -> None: ...

    def idle(self, phone: str) -> None: ...

    def gate(self, phone: str) -> Awaitable[None] | None:
        """None when enough of the lease is left for a push to ``phone``, else an awaitable
        that returns once it is."""
        ...


class Floor:
    """Phones held for audio pages; ``busy(phone)`` says whether the dispatcher's worker for a
    phone is running (it calls ``idle`` itself when it stops)."""

    def __init__(
        self,
        claims: Claims,
        *,
        busy: Callable[[str], bool],
        poll: float = _POLL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._claims = claims
        self._busy = busy
        self._poll = poll
        self._clock = clock
        #: Phone -> pages holding it (one at a time in practice: the announcer queues pages).
        self._pages: Counter[str] = Counter()

    def keeps(self, phone: str) -> bool:
        """For the cluster's ``idle``: the phone stays held while a page has it."""
        return phone in self._pages

    def holds(self, phone: str) -> bool:
        """Whether a page may push a start to ``phone`` now: taken, and not lost to a fence."""
        return phone in self._pages and phone in self._claims.held

    async def ready(self, phone: str) -> None:
        """Before a start push: wait, as the dispatcher does before each request, until enough
        of the lease is left for the push to end inside it (then ask :meth:`holds`: a fence
        meanwhile took the claim)."""
        waiting = self._claims.gate(phone)
        if waiting is not None:
            await waiting

    async def take(self, phones: Sequence[str], within: float) -> dict[str, str]:
        """Hold ``phones`` for a page, waiting up to ``within`` seconds for those another
        instance holds; the phones not got -> why. Those got are held until :meth:`done`."""
        wanted = list(dict.fromkeys(phones))
        # Kept before any claim lands: a phone whose worker goes idle meanwhile stays held.
        self._pages.update(wanted)
        started = self._clock()
        try:
            missing = await self._obtain(wanted, started + max(0.0, within))
        except BaseException:
            self.done(wanted)
            raise
        reason = HELD_ELSEWHERE if self._claims.remaining() > 0 else FENCED
        refused = dict.fromkeys(missing, reason)
        self.done(refused)
        waited = self._clock() - started
        if waited >= self._poll:
            # Why a page started late, or without some phones.
            log.info(
                "cluster: audio page waited %.2f s for the claims of %d phone(s)%s",
                waited,
                len(wanted),
                f"; not got ({reason}): {', '.join(missing)}" if missing else "",
            )
        return refused

    def done(self, phones: Iterable[str]) -> None:
        """The page is over on ``phones``: the cluster releases each if nothing is pending."""
        for phone in phones:
            if phone not in self._pages:
                continue
            self._pages[phone] -= 1
            if self._pages[phone] > 0:
                continue
            del self._pages[phone]
            if not self._busy(phone):
                self._claims.idle(phone)

    async def _obtain(self, wanted: list[str], deadline: float) -> list[str]:
        claims = self._claims
        while True:
            if claims.remaining() > 0:
                missing = [phone for phone in wanted if phone not in claims.held]
                if missing:
                    await claims.claim(missing)
            missing = [p for p in wanted if p not in claims.held or claims.remaining() <= 0]
            left = deadline - self._clock()
            if not missing or left <= 0:
                return missing
            await asyncio.sleep(min(self._poll, left))
