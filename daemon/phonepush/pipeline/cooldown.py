"""Cooldowns and dedupe: a rule that fired for a key stays quiet for its window.

A planning stage: it consults the spool's cooldowns (and the ones this event starts) and marks
a rule ``suppressed``; the windows it starts are stored with the event. The look here is early
and cheap, and what ``fire --dry-run`` shows; the commit claims the windows again
(:func:`~phonepush.store.commit.commit_event`), so that of two instances sharing a database that
take the same key at once only one rings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from phonepush.pipeline.plan import PlannedRule, Work

__all__ = ["Cooldowns"]


class Cooldowns:
    """``in_cooldown(rule, key, now)`` is the spool's."""

    def __init__(self, in_cooldown: Callable[[str, str, float], Awaitable[bool]]) -> None:
        self._in_cooldown = in_cooldown

    async def stage(self, work: Work) -> None:
        plan = work.plan
        now = work.now
        planned: list[PlannedRule] = []
        pages = plan.pages
        cooldowns: list[tuple[str, str, float]] = []
        for p in plan.rules:
            match = p.match
            if match is None:  # its templates failed: no key, no window
                planned.append(p)
                continue
            rule = match.rule
            # A dedupe key without a cooldown suppresses repeats for the rule's TTL: a repeated
            # event inside the window could not be told apart from the first one on the phone.
            window = rule.cooldown
            if window is None and match.dedupe_key:
                window = rule.ttl
            if window is not None:
                if await self._in_cooldown(rule.name, match.dedupe_key, now) or any(
                    c[0] == rule.name and c[1] == match.dedupe_key for c in cooldowns
                ):
                    pages.pop(p.page_id, None)
                    planned.append(
                        PlannedRule(rule.name, rule.phones, rule.ttl, (), "suppressed", "cooldown")
                    )
                    continue
                cooldowns.append((rule.name, match.dedupe_key, now + window))
            planned.append(p)
        work.plan = dataclasses.replace(
            plan, rules=tuple(planned), cooldowns=plan.cooldowns + tuple(cooldowns)
        )
