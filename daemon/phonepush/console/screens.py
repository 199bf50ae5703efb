"""What the console shows of phones' screens, when something can tell it: ``phonepush demo``
fills this with its simulated phones (the console imports nothing of the simulator, and the
simulator nothing of the daemon)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["PhoneScreen", "Screens", "ShownSoftKey"]


@dataclass(frozen=True, slots=True)
class ShownSoftKey:
    """A softkey on a screen; ``position`` is what pressing it names."""

    position: int
    name: str


@dataclass(frozen=True, slots=True)
class PhoneScreen:
    """One phone's screen as the phone shows it."""

    phone: str
    title: str = ""
    prompt: str = ""
    text: str = ""
    softkeys: tuple[ShownSoftKey, ...] = ()


class Screens(Protocol):
    """Phones whose screens can be seen and whose softkeys can be pressed."""

    def screens(self) -> list[PhoneScreen]:
        """Every phone's current screen."""

    async def press(self, phone: str, position: int) -> str:
        """Press the softkey at ``position`` on ``phone``: "" when it was pressed, else what
        went wrong, in words for the operator (no such phone or softkey, its URL failed)."""
