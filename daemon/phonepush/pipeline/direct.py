"""Pages no rule caused: someone names phones or groups and says what to show.

The console's "send a test page" form is one. Such a page goes the way every event goes (the
pipeline's stages, one commit, the dispatcher's lanes, the metrics), so what an operator sees
in the console and in ``phonepush status`` is what a real page would have done: a silence or
quiet hours hold it too, with the reason recorded, which is what a test should show.

:func:`direct_match` builds the one-off rule and its rendered :class:`~phonepush.rules.book.Match`;
:meth:`phonepush.pipeline.intake.Intake.page` commits it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from phonepush.errors import ConfigError, WireError
from phonepush.events import Event, Source
from phonepush.rules.book import CompiledRule, Match
from phonepush.wire.cisco import TextPage
from phonepush.wire.uri import ExecuteItem, validate_uri

__all__ = ["DirectPage", "direct_match"]


@dataclass(frozen=True, slots=True)
class DirectPage:
    """What to page and where, as a person asked for it."""

    #: The event's source (``console``): how ``status`` and the metrics tell it from rules.
    origin: Source
    #: The name its deliveries carry where a rule's name would be (``test-page``).
    rule: str
    #: Phone names, group names or ``all``.
    to: tuple[str, ...]
    title: str
    text: str
    #: CGI Execute URIs pushed after the page, e.g. ``Play:Chime.raw``.
    execute: tuple[str, ...] = ()
    priority: int = 1
    ttl: float = 60.0

    def event(self) -> Event:
        """The event the spool keeps for it: the request itself, as JSON."""
        body = {
            "to": list(self.to),
            "title": self.title,
            "text": self.text,
            "execute": list(self.execute),
        }
        return Event(self.origin, ",".join(self.to), json.dumps(body).encode())


def direct_match(page: DirectPage, expand: Callable[[Iterable[str]], tuple[str, ...]]) -> Match:
    """The rule ``page`` stands for, already rendered.

    Raises :class:`ConfigError` naming an unknown phone or group, an empty ``to`` or a URI no
    phone would execute: this is a person's input, checked before anything is written.
    """
    if not page.to:
        raise ConfigError("to: name at least one phone or group")
    try:
        phones = expand(page.to)
    except KeyError as exc:
        raise ConfigError(f"to: no phone or group named {exc.args[0]!r}") from None
    items: list[ExecuteItem] = []
    for i, uri in enumerate(page.execute):
        try:
            items.append(ExecuteItem(validate_uri(uri.strip()), page.priority))
        except WireError as exc:
            raise ConfigError(f"execute[{i}]: {exc}") from None
    text_page = TextPage(title=page.title, text=page.text) if page.title or page.text else None
    if text_page is None and not items:
        raise ConfigError("text: nothing to page (give a title, a text or an execute item)")
    rule = CompiledRule(
        name=page.rule,
        source=page.origin,
        pattern=page.rule,
        phones=phones,
        priority=page.priority,
        ttl=page.ttl,
        cooldown=None,
        static_execute=tuple(items),
        static_page=text_page,
    )
    return Match(rule=rule, execute=tuple(items), page=text_page)
