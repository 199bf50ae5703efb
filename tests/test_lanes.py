"""PhoneLanes: one push at a time per phone, and no more connections open than the bound, against
small real HTTP servers that count what they see."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from phonepush.app.limits import default_max_connections
from phonepush.errors import PhoneError
from phonepush.phone.client import PhoneTarget
from phonepush.phone.lanes import PhoneLanes
from phonepush.wire.cisco import ResponseItem, response_xml
from phonepush.wire.uri import ExecuteItem

ANSWER = response_xml([ResponseItem("Key:Headset", "Success", 0)]).encode()
ITEMS = [ExecuteItem("Key:Headset")]


class Phones:
    """``count`` keep-alive HTTP servers that answer every request after ``delay`` seconds and
    count open connections (over all of them) and requests in progress (per phone)."""

    def __init__(self, count: int, delay: float = 0.01) -> None:
        self.count = count
        self.delay = delay
        self.open = 0
        self.most_open = 0
        self.busy = [0] * count
        self.most_busy = [0] * count
        self.served = [0] * count
        self.servers: list[asyncio.Server] = []

    def targets(self) -> dict[str, PhoneTarget]:
        return {
            f"p{i}": PhoneTarget(f"p{i}", "127.0.0.1", server.sockets[0].getsockname()[1])
            for i, server in enumerate(self.servers)
        }

    async def _serve(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                self.busy[index] += 1
                self.most_busy[index] = max(self.most_busy[index], self.busy[index])
                await asyncio.sleep(self.delay)
                self.busy[index] -= 1
                self.served[index] += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(ANSWER), ANSWER)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def __aenter__(self) -> Phones:
        for i in range(self.count):
            self.servers.append(
                await asyncio.start_server(
                    lambda r, w, i=i: self._serve(i, r, w),  # type: ignore[misc]
                    "127.0.0.1",
                    0,
                )
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self.servers:
            server.close()


@pytest.fixture
async def phones() -> AsyncIterator[Phones]:
    async with Phones(20) as fleet:
        yield fleet


async def test_a_fan_out_to_more_phones_than_connections_completes(phones: Phones) -> None:
    async with PhoneLanes(phones.targets(), max_connections=4) as lanes:
        for _ in range(2):
            answers = await asyncio.gather(*(lanes.execute(f"p{i}", ITEMS) for i in range(20)))
            assert all(items == [ResponseItem("Key:Headset", "Success", 0)] for items in answers)
        await asyncio.sleep(0.05)  # closes reach the servers
        assert phones.most_open <= 4
        assert lanes.connections <= 4
    assert phones.served == [2] * 20


async def test_idle_connections_are_kept_below_the_bound(phones: Phones) -> None:
    async with PhoneLanes(phones.targets(), max_connections=50) as lanes:
        for _ in range(3):
            await asyncio.gather(*(lanes.execute(f"p{i}", ITEMS) for i in range(20)))
        # Keep-alive: one connection per phone for all three rounds.
        assert phones.most_open == 20


async def test_pushes_to_one_phone_go_one_at_a_time(phones: Phones) -> None:
    async with PhoneLanes(phones.targets()) as lanes:
        await asyncio.gather(*(lanes.execute("p3", ITEMS) for _ in range(8)))
    assert phones.served[3] == 8
    assert phones.most_busy[3] == 1


async def test_a_cancelled_push_frees_its_phone_and_its_connection(phones: Phones) -> None:
    phones.delay = 0.5
    async with PhoneLanes(phones.targets(), max_connections=1) as lanes:
        task = asyncio.create_task(lanes.execute("p0", ITEMS))
        await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert lanes.written("p0") is False  # not this task's push
        phones.delay = 0.01
        assert await lanes.execute("p1", ITEMS) == [ResponseItem("Key:Headset", "Success", 0)]


async def test_an_unknown_phone_is_refused(phones: Phones) -> None:
    async with PhoneLanes(phones.targets()) as lanes:
        with pytest.raises(PhoneError, match="not in the configuration"):
            await lanes.execute("nowhere", ITEMS)
        lanes.update({})
        with pytest.raises(PhoneError, match="not in the configuration"):
            await lanes.execute("p0", ITEMS)


def test_the_default_bound_is_half_the_open_files_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert default_max_connections() == max(64, soft // 2)
