"""The cluster's small pieces of task plumbing: background tasks kept and logged, a coalescing
trigger, and the leadership switch the timer loops follow."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

__all__ = ["Coalesced", "Leadership", "Tasks"]

log = logging.getLogger("phonepush.cluster")


class Tasks:
    """Background tasks, referenced until done (the loop keeps only weak references); a task
    that fails is logged, never lost."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cluster: %s failed", task.get_name(), exc_info=task.exception())

    async def cancel(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Coalesced:
    """Runs ``action`` ``delay`` seconds after :meth:`poke`; pokes meanwhile, or while it runs,
    lead to one more run after it, never to several."""

    def __init__(
        self, action: Callable[[], Awaitable[None]], tasks: Tasks, name: str, delay: float = 0.0
    ) -> None:
        self._action = action
        self._tasks = tasks
        self._name = name
        self._delay = delay
        self._timer: asyncio.TimerHandle | None = None
        self._running = False
        self._again = False
        self.closed = False

    def poke(self) -> None:
        if self.closed:
            return
        if self._timer is not None or self._running:
            self._again = True
            return
        self._timer = asyncio.get_running_loop().call_later(self._delay, self._start)

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start(self) -> None:
        self._timer = None
        self._running = True
        self._again = False
        self._tasks.spawn(self._run(), self._name)

    async def _run(self) -> None:
        try:
            await self._action()
        finally:
            self._running = False
            if self._again:
                self._again = False
                self.poke()


class Leadership:
    """Whether this instance leads the timers; :meth:`lead` runs a loop only meanwhile."""

    def __init__(self, on_change: Callable[[bool], None]) -> None:
        self._on_change = on_change
        self.leading = False
        self._leading = asyncio.Event()
        self._following = asyncio.Event()
        self._following.set()

    def set(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        if leading:
            self._following.clear()
            self._leading.set()
        else:
            self._leading.clear()
            self._following.set()
        self._on_change(leading)

    async def lead(self, runner: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Run ``runner()`` while leading, cancel it when no longer; for ever."""
        while True:
            await self._leading.wait()
            task = asyncio.create_task(runner(), name=name)
            following = asyncio.create_task(self._following.wait())
            try:
                await asyncio.wait({task, following}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                following.cancel()
                if not task.done():
                    task.cancel()
                    # Waited for without awaiting it: its CancelledError suppressed here would
                    # also swallow a cancel of this task meanwhile (the daemon stopping), and
                    # this loop would wait for ever for a leadership that never comes.
                    await asyncio.wait({task})
            if task.done() and not task.cancelled():
                task.result()  # a timer loop that ended raised: let the daemon see it
                return
