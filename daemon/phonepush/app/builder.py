"""One place that turns a configuration into a rule book and the stages an event goes through.

The daemon builds with it at start-up and on every reload, ``phonepush fire --dry-run`` builds
with it to show what the daemon would do. Everything that can fail (a template, an audio file,
a quiet-hours range) is compiled first; only then are the long-lived services told about the
new configuration, so a reload that fails changes nothing.

It lives in ``app`` rather than ``pipeline`` because it names every feature: the features
import :mod:`phonepush.pipeline.plan`, so a builder inside ``pipeline`` would make the two
packages import each other.

Stages, in order (a service left out of :class:`Services`, or a feature no rule uses, leaves its
stage out):

* planning: cooldowns and dedupe (:mod:`phonepush.pipeline.cooldown`), alert tokens
  (:class:`phonepush.alerting.acks.AlertPlanning`);
* staging: audio rows (:class:`phonepush.audio.announce.Announcer`), group windows
  (:class:`phonepush.grouping.grouper.Grouper`), silences and quiet hours
  (:class:`phonepush.silence.silences.Screening`), resolves and alert rows
  (:class:`phonepush.alerting.acks.Alerting`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from phonepush.alerting.acks import Alerting, AlertPlanning, new_token
from phonepush.audio.announce import Announcer, AudioAction, compile_actions
from phonepush.config import Config
from phonepush.errors import ConfigError
from phonepush.grouping.grouper import Grouper
from phonepush.metrics import Metrics
from phonepush.pipeline.cooldown import Cooldowns
from phonepush.pipeline.plan import Pipeline, Stage
from phonepush.rules.book import RuleBook
from phonepush.silence.silences import Quieting, Screening, Silences
from phonepush.store.interface import Store
from phonepush.store.spool import Delivery

__all__ = ["Built", "Services", "build"]


def _nothing(*args: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Services:
    """The long-lived parts the stages hand work to; None leaves that feature's stage out."""

    spool: Store
    metrics: Metrics
    #: The dispatcher's ``submit`` and ``cancel``.
    submit: Callable[[Sequence[Delivery]], None]
    cancel: Callable[[Iterable[int]], None] = _nothing
    #: Tells the repeat scheduler a new alert exists.
    wake_repeats: Callable[[], None] = _nothing
    clock: Callable[[], float] = time.time
    grouper: Grouper | None = None
    announcer: Announcer | None = None
    #: Runtime silences (the grouper's when not given); with them, silences and quiet hours
    #: screen every event.
    silences: Silences | None = None
    #: Makes ack and action tokens (``fire --dry-run`` passes a placeholder: it stores none).
    tokens: Callable[[], str] = new_token


@dataclass(frozen=True, slots=True)
class Built:
    """What one configuration became: the pipeline the intake runs, and what it was built from."""

    config: Config
    pipeline: Pipeline
    #: Rules' audio pages, files loaded (empty without an announcer).
    audio: dict[str, AudioAction]
    #: Silences and quiet hours (None without silences).
    quieting: Quieting | None


def build(config: Config, services: Services, *, base_dir: Path | None = None) -> Built:
    """Compile ``config`` into a :class:`Built` and point the services at it.

    Raises :class:`ConfigError` (naming the key) with no service changed. ``base_dir`` is where
    relative audio files are found (the config file's directory).
    """
    book = RuleBook.compile(config)
    announcer, grouper = services.announcer, services.grouper
    # Audio files are loaded now, so a missing one stops start-up (or a reload) naming its rule.
    audio = compile_actions(config, base_dir=base_dir, book=book) if announcer else {}
    quieting: Quieting | None = None
    silences = services.silences or (grouper.silences if grouper is not None else None)
    if silences is not None:
        try:
            quieting = Quieting.from_config(config, silences)
        except ValueError as exc:  # checked when the configuration was loaded; here for reloads
            raise ConfigError(str(exc)) from exc
    public_url = config.server.public_url.rstrip("/")
    # A feature no rule uses gets no stage: an event only passes through what its rules need.
    alerts = any(rule.alert is not None for rule in book.rules)
    planning: list[Stage] = []
    if any(rule.cooldown is not None or rule.dedupe is not None for rule in book.rules):
        planning.append(Cooldowns(services.spool.events.in_cooldown))
    if alerts:
        planning.append(AlertPlanning(services.tokens))
    staging: list[Stage] = []
    if announcer is not None and any(rule.audio for rule in book.rules):
        staging.append(announcer)
    if grouper is not None and any(rule.group_window is not None for rule in book.rules):
        staging.append(grouper)
    if quieting is not None:
        staging.append(Screening(quieting, metrics=services.metrics, clock=services.clock))
    if alerts:
        staging.append(
            Alerting(
                services.spool,
                book,
                public_url=public_url,
                metrics=services.metrics,
                submit=services.submit,
                cancel=services.cancel,
                wake=services.wake_repeats,
                clock=services.clock,
            )
        )
    pipeline = Pipeline(
        book=book,
        planning=tuple(planning),
        staging=tuple(staging),
        pages_url=public_url + "/pages/",
        keep_headers=frozenset(config.webhook.keep_headers),
        expand=config.expand,
    )
    # Nothing below can fail: the services take the new configuration together.
    if announcer is not None:
        announcer.update(config, audio)
    if grouper is not None and quieting is not None:
        # Group flushes apply the same silences and quiet hours, per phone and event.
        grouper.quieting = quieting
        grouper.pages_url = public_url + "/pages/"
    return Built(config, pipeline, audio, quieting)
