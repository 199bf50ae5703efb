"""What the cluster needs from the store and from the dispatcher, declared here, by the consumer.

The store side is implemented by :class:`phonepush.store.cluster.PostgresCluster`; the dispatcher
side by :class:`phonepush.dispatch.dispatcher.Dispatcher`, which satisfies :class:`Lanes` without
knowing this package (and this package never imports the dispatcher): the daemon hands one to the
other.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

from phonepush.store.records import Delivery

__all__ = ["ClusterStore", "Lanes"]


class ClusterStore(Protocol):
    """Membership, claims and notifications in the shared database (times by its clock)."""

    async def heartbeat(
        self, instance: str, host: str, lease: float, *, rejoin: bool
    ) -> tuple[int, str]: ...

    async def claim(self, instance: str, phones: Sequence[str]) -> list[tuple[str, str]]: ...

    async def adopt(self, instance: str) -> list[tuple[str, str]]: ...

    async def owned(self, instance: str) -> list[str]:
        """The phones ``instance`` has claimed that have pending pushes."""
        ...

    async def release(self, instance: str, phones: Sequence[str]) -> dict[str, str]:
        """phone -> ``released``, ``kept`` (it has pending work) or ``lost`` (not ours)."""
        ...

    async def pending_of(
        self, phones: Collection[str], *, audio_of: Collection[str] = ()
    ) -> list[Delivery]: ...

    async def pending_audio(self) -> list[Delivery]: ...

    async def leave(self, instance: str) -> None: ...

    async def notify(self, payload: str) -> None: ...

    async def listen(
        self, on_payload: Callable[[str], None], on_connect: Callable[[], None]
    ) -> None: ...


class Lanes(Protocol):
    """The dispatcher as the cluster drives it."""

    def submit(self, deliveries: Iterable[Delivery]) -> None: ...

    def cancel(self, delivery_ids: Iterable[int]) -> None: ...

    def busy(self, phone: str) -> bool:
        """Whether a worker for ``phone`` is running."""
        ...

    async def flush(self) -> None:
        """Write the finished deliveries now."""
        ...

    async def forget(self) -> None:
        """Stop every phone's worker and drop the queues (the deliveries stay pending)."""
        ...
