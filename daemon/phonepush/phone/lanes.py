"""One lane per phone: every push the daemon makes goes through it, one at a time per phone.

A phone serves one push at a time: a second one that arrives while it is busy is answered
CiscoIPPhoneError 6, or (some firmware) waits and runs after the first, either way not what the
sender meant. So the daemon has exactly one :class:`PhoneLanes`, shared by the dispatcher
(deliveries, repeats, resolve notices, events from ``phonepush fire``) and the announcer (audio
starts and stops); nothing else in the daemon opens a phone connection. Each lane owns its
phone's client and a lock.

Open connections are bounded by ``max_connections`` (``dispatch.max_connections``): a push to a
phone without a connection takes a slot, and when none is free the least recently used idle
connection is closed for it (or, if every connection is busy, the push waits for one to end). A
fan-out to more phones than the process has file descriptors completes, reconnecting as it goes;
below the bound, connections stay open for the next push.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

from phonepush.errors import PhoneError, PhoneUnconfirmed
from phonepush.phone.client import PhoneClient, PhoneTarget, connect_probe
from phonepush.wire.cisco import DeviceInfo, ResponseItem, execute_xml
from phonepush.wire.uri import ExecuteItem

__all__ = ["DEFAULT_MAX_CONNECTIONS", "PhoneLanes"]

#: What :func:`phonepush.app.limits.default_max_connections` gives under a service manager's default
#: soft limit of 1,024 open files: half, the rest left to the HTTP server, the spool and MQTT.
DEFAULT_MAX_CONNECTIONS: Final = 512


@dataclass(slots=True, eq=False)
class _Lane:
    name: str
    target: PhoneTarget
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    client: PhoneClient | None = None
    slot: bool = False  # counted against max_connections
    holder: asyncio.Task[object] | None = None  # the task that last held the lock


class PhoneLanes:
    """The daemon's phone connections: ``await lanes.push(phone, xml)``. An async context
    manager; closing it closes every connection.

    ``client_factory`` makes one client per phone on its first push (tests inject transports
    through it).
    """

    def __init__(
        self,
        phones: Mapping[str, PhoneTarget],
        *,
        client_factory: Callable[[PhoneTarget], PhoneClient] = PhoneClient,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._targets = dict(phones)
        self._factory = client_factory
        self._max = max_connections
        self._lanes: dict[str, _Lane] = {}
        # Lanes holding a slot whose connection is idle, least recently used first.
        self._idle: OrderedDict[str, _Lane] = OrderedDict()
        self._held = 0
        self._waiting = 0  # pushes waiting for a slot
        self._freed = asyncio.Condition()
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __contains__(self, phone: object) -> bool:
        return phone in self._targets

    @property
    def max_connections(self) -> int:
        return self._max

    @property
    def connections(self) -> int:
        """Slots taken: connections open or being opened (some may have been closed by their
        phone since)."""
        return self._held

    def target(self, phone: str) -> PhoneTarget | None:
        return self._targets.get(phone)

    def update(self, phones: Mapping[str, PhoneTarget]) -> None:
        """Apply a reloaded phone list. A changed phone gets a new client on its next push,
        made under its lane's lock, so a push in flight finishes on the old one first."""
        self._targets = dict(phones)
        for name, lane in self._lanes.items():
            target = phones.get(name)
            if target is not None:
                lane.target = target

    def written(self, phone: str) -> bool:
        """Whether the calling task's last push to ``phone`` was fully written, so the phone may
        have run it (read after a cancellation; false if it was still waiting for the lane)."""
        lane = self._lanes.get(phone)
        return (
            lane is not None
            and lane.holder is asyncio.current_task()
            and lane.client is not None
            and lane.client.written
        )

    async def execute(self, phone: str, items: Sequence[ExecuteItem]) -> list[ResponseItem]:
        """Send 1-3 items in one CiscoIPPhoneExecute request to ``phone``."""
        return await self.push(phone, execute_xml(items))

    async def push(self, phone: str, xml: str, *, receipts: bool = True) -> list[ResponseItem]:
        """POST one XML object to ``phone`` after any push to it in progress, and return its
        ResponseItems. Raises :class:`~phonepush.errors.PhoneError` (also for a phone that is
        not configured) or :class:`~phonepush.errors.WireError`."""
        lane = self._lane(phone)
        async with lane.lock:
            client = await self._enter(lane)
            try:
                return await client.push(xml, receipts=receipts)
            finally:
                await self._leave(lane, client)

    async def probe(self, phone: str) -> DeviceInfo | None:
        """Ask ``phone`` to describe itself (``GET /DeviceInformationX``) in its lane, so never
        while a push to it is on the wire, over the same bounded connections. ``None``: the
        phone answered without describing itself. When its answer was no readable HTTP, a bare
        TCP connect decides. Raises :class:`~phonepush.errors.PhoneError` when it is out of
        reach."""
        lane = self._lane(phone)
        async with lane.lock:
            client = await self._enter(lane)
            try:
                return await client.describe()
            except PhoneUnconfirmed:
                # Connected and wrote, but got no answer it could read: a web server that is
                # hung or not HTTP. Whether the phone is there is what a fresh connect says.
                await client.disconnect()
                await connect_probe(lane.target)
                return None
            finally:
                await self._leave(lane, client)

    def _lane(self, phone: str) -> _Lane:
        if self._closed:
            raise PhoneError("the daemon is stopping", phone=phone)
        lane = self._lanes.get(phone)
        if lane is None:
            target = self._targets.get(phone)
            if target is None:
                raise PhoneError("phone not in the configuration", phone=phone)
            lane = self._lanes[phone] = _Lane(phone, target)
        return lane

    async def _enter(self, lane: _Lane) -> PhoneClient:
        """Under the lane's lock: its client, connected or not, holding a connection slot."""
        phone = lane.name
        lane.holder = asyncio.current_task()
        if phone not in self._targets:
            raise PhoneError("phone not in the configuration", phone=phone)
        client = lane.client
        if client is None or client.target != lane.target:
            if client is not None:
                await client.aclose()
            # Opened on first use: opening thousands of clients up front would slow start-up.
            client = lane.client = await self._factory(lane.target).__aenter__()
        if lane.slot:
            self._idle.pop(phone, None)  # busy: not a candidate for closing
        else:
            await self._take_slot(lane)
        return client

    async def _leave(self, lane: _Lane, client: PhoneClient) -> None:
        if client.connected and not self._closed:
            self._idle[lane.name] = lane
            if self._waiting:
                # A push waiting for a slot may now close this idle connection.
                async with self._freed:
                    self._freed.notify()
        else:
            await self._release(lane)

    async def _take_slot(self, lane: _Lane) -> None:
        async with self._freed:
            while self._held >= self._max:
                if self._idle:
                    _, victim = self._idle.popitem(last=False)
                    victim.slot = False
                    self._held -= 1
                    if victim.client is not None:
                        await victim.client.disconnect()
                    continue
                self._waiting += 1
                try:
                    await self._freed.wait()
                finally:
                    self._waiting -= 1
            self._held += 1
            lane.slot = True

    async def _release(self, lane: _Lane) -> None:
        if not lane.slot:
            return
        lane.slot = False
        async with self._freed:
            self._held -= 1
            self._freed.notify()

    async def close(self) -> None:
        """Close every connection; pushes after this fail."""
        self._closed = True
        clients = [lane.client for lane in self._lanes.values() if lane.client is not None]
        self._idle.clear()
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
