"""Audio paging from rules: a rule's ``audio = {...}`` action, streamed live to its phones.

A rule with ``audio`` (alone, or with ``execute``/``message``/...) makes each event it matches
play an announcement on the rule's phones: every phone is pushed ``RTPRx:<source>:<port>[:vol]``
(or ``RTPMRx:<group>:<port>[:vol]``), the audio is streamed over RTP, then every phone that
listened is pushed ``RTPRx:Stop`` (:func:`phonepush.audio.paging.page`). A phone that could not be
told to listen is reported (log, ``phonepush_deliveries_total``, its delivery row); the others
still hear the page.

* **Sources.** ``file`` and ``chime`` are WAV or raw µ-law files, relative to the config file's
  directory; they are loaded and converted when the configuration is (start-up, reload), so a
  missing or unreadable file stops the daemon from starting — or a reload from applying — with
  an error naming ``rules[<name>].audio.file``. ``say`` is a template rendered with the event
  (like a message) and spoken by espeak-ng at delivery time (:class:`phonepush.audio.clips.Speech`,
  cached in memory and, with ``[audio] cache_dir``, on disk).
* **Addresses.** The stream comes from ``[audio] address`` (default: the host of
  ``server.public_url``, the address phones already reach the daemon at); phones listen on
  ``[audio] port`` (default 20480); RTP goes to each phone's own address (its ``host``).

Durability and the spool (an audio page is *live*: played late, it is wrong):

* The event is committed as usual, and with it one delivery row per (rule, phone) for the
  audio, holding no requests. Intake hands those rows here, not to the dispatcher; the page's
  outcome finishes them (``delivered``, ``failed`` with the phone's answer, ``expired``), so
  ``/events/<id>``, logs, the outcome topic and ``phonepush_deliveries_total`` show each phone's
  part like any other delivery. Silences apply to them as to any delivery.
* **No replay.** A page the daemon was playing (or had not started) when it stopped is not
  played again on the next start: its rows are finished ``expired`` at start-up
  (:meth:`Announcer.abandon`). On shutdown a page in progress is cut, its phones pushed the stop
  URI, and its rows finished ``expired`` at once.
* **TTL.** Nothing is streamed after the rule's ``ttl``: a page that cannot start before it
  expires, the audio is cut so that the stream ends by it, and a page still running at the TTL
  (phones slow to answer the start push) is cancelled, its phones told to stop.
* **One page at a time.** A phone plays one stream; two pages at once would replace each other
  on shared phones. Pages queue (their TTLs still apply while waiting).
* **Pushes.** Start and stop pushes go through the phones' lanes (:mod:`phonepush.phone.lanes`),
  shared with the dispatcher: a phone gets one push at a time, so a start waits for a delivery in
  flight to that phone (not for its retries, which wait outside the lane). A start the phone
  answers busy (error 6), or that never reached it, is tried once more after 0.25 s; one written
  but not answered is not (the phone may be listening: it is stopped like the others). A stop is
  also tried again when unanswered: it does no harm twice. With several instances on PostgreSQL
  (:attr:`Announcer.floor`, :mod:`phonepush.cluster.floor`), a page first obtains its phones'
  claims, waiting for those another instance holds at most the phones' request ``timeout`` (as
  long as a start can wait for the push in flight on one instance), and never past the latest
  start at which the announcement still ends by the TTL (less a second for the start pushes); a
  phone not obtained by then is reported as one that would not listen ("held by another
  instance"), and the other phones hear the page. The phones are held for the page, so
  deliveries for them committed through another instance wait and are pushed after it, by this
  instance (those committed here take turns with the page's pushes in the lanes, as above). A
  start waits, as a delivery's request does, until enough of the instance's lease is left for
  it, and is not pushed to a phone whose claim was lost meanwhile (the instance fenced itself);
  its stops still are.
* **Stops are guaranteed.** Every phone whose start may have been written is pushed the stop,
  also when the page is cut (TTL, shutdown); the stops run shielded from the cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self
from urllib.parse import urlsplit

from phonepush.audio.clips import SAMPLE_RATE, Speech, announcement, load_file
from phonepush.audio.paging import (
    STOP_URI,
    PageReport,
    PageSettings,
    PageTarget,
    TargetResult,
    page,
)
from phonepush.config import Config, RuleAudioConfig
from phonepush.dispatch.dispatcher import Outcome
from phonepush.errors import (
    AudioError,
    ConfigError,
    PhoneError,
    PhoneNotSent,
    PhoneUnconfirmed,
    TemplateError,
    WireError,
)
from phonepush.events import Event
from phonepush.metrics import Metrics
from phonepush.phone.lanes import PhoneLanes
from phonepush.pipeline.plan import Plan, Work
from phonepush.rules.book import RuleBook, event_context
from phonepush.store.interface import Store
from phonepush.store.records import Delivery, DeliveryKind, DeliveryState, NewDelivery
from phonepush.templates import TextTemplate
from phonepush.wire.uri import ExecuteItem

__all__ = ["Announcer", "AudioAction", "Floor", "compile_actions", "stream_source"]

log = logging.getLogger("phonepush.announce")

#: Pause before the one retry of a start or stop push the phone answered busy or not at all.
_RETRY_DELAY: Final = 0.25
#: How often a stop push is tried (0.25 + 0.5 + 1 + 2 s between tries).
_STOP_TRIES: Final = 5
#: How long shutdown waits for pages being cut to push their stop URIs.
_CLOSE_GRACE: Final = 8.0
#: Left for the start pushes when a page waits for its phones' cluster claims: a page that
#: waited until the very last moment would run into its TTL before its stream ended.
_START_SLACK: Final = 1.0


@dataclass(frozen=True, slots=True)
class AudioAction:
    """A rule's compiled ``audio``: what to play (``body`` loaded, or ``say`` to render), and
    how."""

    rule: str
    say: TextTemplate | None
    body: bytes | None
    chime: bytes | None
    multicast: tuple[str, int] | None
    volume: int | None
    repeat: int
    #: Hops a multicast stream may cross: the rule's ``audio.multicast_ttl``, else ``[audio]``'s.
    multicast_ttl: int = 1


def compile_actions(
    config: Config, *, base_dir: Path | None = None, book: RuleBook | None = None
) -> dict[str, AudioAction]:
    """Every rule's ``audio``, its files loaded (relative ones from ``base_dir``, default the
    working directory) and its ``say`` taken from ``book`` (compiled from ``config`` when not
    given). Raises :class:`ConfigError` listing every problem, one line each, naming
    ``rules[<name>].audio.<key>``."""
    base = base_dir if base_dir is not None else Path.cwd()
    rules = book if book is not None else RuleBook.compile(config)
    actions: dict[str, AudioAction] = {}
    problems: list[str] = []
    loaded: dict[Path, bytes] = {}
    for rule in config.all_rules:
        if rule.audio is None:
            continue
        section = "schedules" if rule.source == "schedule" else "rules"
        where = f"{section}[{rule.name}].audio"
        try:
            actions[rule.name] = _compile(
                rule.name,
                rule.audio,
                where,
                base,
                rules.rule(rule.name).audio_say,
                loaded,
                rule.audio.multicast_ttl or config.audio.multicast_ttl,
            )
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return actions


def _compile(
    name: str,
    audio: RuleAudioConfig,
    where: str,
    base: Path,
    say: TextTemplate | None,
    loaded: dict[Path, bytes],
    multicast_ttl: int = 1,
) -> AudioAction:
    problems: list[str] = []

    def load(key: str, value: str) -> bytes | None:
        if not value:
            return None
        path = base / value
        if path not in loaded:
            try:
                loaded[path] = load_file(path)
            except AudioError as exc:
                problems.append(f"{where}.{key}: {exc}")
                return None
        return loaded[path]

    body, chime = load("file", audio.file), load("chime", audio.chime)
    if problems:
        raise ConfigError("\n".join(problems))
    return AudioAction(
        name, say, body, chime, audio.group, audio.volume, audio.repeat, multicast_ttl
    )


def stream_source(config: Config) -> str:
    """The address pages come from: ``[audio] address``, else the host of the public URL."""
    return config.audio.address or urlsplit(config.server.public_url).hostname or "127.0.0.1"


Publish = Callable[[Outcome], Awaitable[None]]


class Floor(Protocol):
    """The cluster's phone claims as a page needs them (PostgreSQL only;
    :class:`phonepush.cluster.floor.Floor`, wired by the app)."""

    async def take(self, phones: Sequence[str], within: float) -> dict[str, str]:
        """Hold ``phones``, waiting up to ``within`` s for those held elsewhere; those not got
        -> why."""
        ...

    async def ready(self, phone: str) -> None:
        """Return once enough of the cluster lease is left for a push to ``phone``."""
        ...

    def holds(self, phone: str) -> bool:
        """Whether a start may still be pushed to ``phone`` (held, not lost to a fence)."""
        ...

    def done(self, phones: Iterable[str]) -> None:
        """The page is over on ``phones`` (stops pushed)."""
        ...


class Announcer:
    """Plays rules' audio pages; an async context manager (closing cuts pages in progress).

    ``lanes`` carry the start and stop pushes (the daemon's, shared with the dispatcher).
    ``speech`` defaults to espeak-ng with
    ``[audio] voice`` and ``cache_dir``. ``on_outcome`` is told each phone's outcome, like the
    dispatcher's. ``lead_in_s`` passes between the start pushes and the first packet.
    ``floor`` (set by the app on PostgreSQL; None alone) holds the phones' cluster claims for
    each page.
    """

    def __init__(
        self,
        config: Config,
        spool: Store,
        *,
        metrics: Metrics,
        actions: Mapping[str, AudioAction] | None = None,
        base_dir: Path | None = None,
        lanes: PhoneLanes,
        speech: Speech | None = None,
        on_outcome: Publish | None = None,
        clock: Callable[[], float] = time.time,
        lead_in_s: float = 0.2,
    ) -> None:
        self._spool = spool
        self._metrics = metrics
        self._lanes = lanes
        self._on_outcome = on_outcome
        self._clock = clock
        self._lead_in = lead_in_s
        self._speech = speech or Speech(
            voice=config.audio.voice, cache_dir=config.audio.cache_dir or None
        )
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: set[int] = set()  # audio rows taken and not finished yet
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.config = config
        self.floor: Floor | None = None
        self.actions: dict[str, AudioAction] = (
            dict(actions) if actions is not None else compile_actions(config, base_dir=base_dir)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def update(self, config: Config, actions: Mapping[str, AudioAction]) -> None:
        """Apply a reload (``actions`` compiled beforehand, so a bad file keeps the old ones).
        Pages already accepted play with what they were accepted with."""
        self.config = config
        self.actions = dict(actions)

    # --- intake side ------------------------------------------------------------------------

    async def stage(self, work: Work) -> None:
        """The pipeline stage: audio rows for rules that also push; after the commit, the
        event's audio rows start their page instead of going to the dispatcher."""
        event = work.event
        work.deliveries += self.deliveries(event, work.plan)

        async def take(pending: list[Delivery]) -> list[Delivery]:
            return await self.take(event, pending)

        work.committed.append(take)

    def deliveries(self, event: Event, plan: Plan) -> list[NewDelivery]:
        """The audio rows of an event's rules that also push something (a rule with audio only
        already gets request-less rows from intake): one per (rule, phone), no requests."""
        return [
            NewDelivery(
                rule=p.rule,
                phone=phone,
                requests=(),
                expires_at=event.received_at + p.ttl,
            )
            for p in plan.rules
            if p.state == "pending" and p.requests and p.match is not None and p.match.rule.audio
            for phone in p.phones
        ]

    async def take(self, event: Event, pending: Sequence[Delivery]) -> list[Delivery]:
        """Start the pages of committed audio rows (pending rows without requests) and return
        the other rows, for the dispatcher. Must run on the event loop."""
        audio: dict[str, list[Delivery]] = defaultdict(list)
        rest: list[Delivery] = []
        for delivery in pending:
            if delivery.kind is DeliveryKind.AUDIO:
                audio[delivery.rule].append(delivery)
            else:
                rest.append(delivery)
        for rule, rows in audio.items():
            self._open.update(row.id for row in rows)
            action = self.actions.get(rule)
            if action is None or self._closing:
                # Rules swapped by a reload between plan and commit, or shutting down.
                await self._finish_all(
                    rows, DeliveryState.EXPIRED, "not played: the rule's audio is gone"
                )
                continue
            task = asyncio.get_running_loop().create_task(
                self._run(event, action, rows), name=f"audio:{rule}:{event.id}"
            )
            self._tasks.add(task)
            self._idle.clear()
            task.add_done_callback(self._done)
        return rest

    async def abandon(self, pending: Iterable[Delivery]) -> list[Delivery]:
        """At start-up: finish the audio rows a previous run left pending as ``expired`` (a
        live page is never replayed) and return the rest for the dispatcher."""
        rest: list[Delivery] = []
        stale: list[Delivery] = []
        for delivery in pending:
            if delivery.kind is not DeliveryKind.AUDIO:
                rest.append(delivery)
            elif delivery.id not in self._open:
                # (A row still open is a page of this instance's, queued or playing: a phone
                # taken over from a dead instance brings every audio row of that phone.)
                stale.append(delivery)
        if stale:
            self._open.update(row.id for row in stale)
            log.warning(
                "%d audio page deliveries were interrupted by a restart; not replayed", len(stale)
            )
            await self._finish_all(
                stale, DeliveryState.EXPIRED, "interrupted by a restart; audio is not replayed"
            )
        return rest

    async def wait_idle(self) -> None:
        """Return when no page is queued or playing (tests)."""
        await self._idle.wait()

    async def close(self) -> None:
        """Cut pages in progress (their phones are pushed the stop URI) and wait for them."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_GRACE):
                    await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("audio page %s failed", task.get_name(), exc_info=exc)

    # --- a page ---------------------------------------------------------------------------

    async def _run(self, event: Event, action: AudioAction, rows: list[Delivery]) -> None:
        started = self._clock()
        try:
            async with self._lock:
                await self._page(event, action, rows)
        except asyncio.CancelledError:
            await self._finish_all(
                rows, DeliveryState.EXPIRED, "the daemon stopped during the audio page"
            )
            self._metrics.audio_pages.labels(action.rule, "expired").inc()
            raise
        log.debug("audio page of event %s took %.2f s", event.id, self._clock() - started)

    async def _page(self, event: Event, action: AudioAction, rows: list[Delivery]) -> None:
        rule = action.rule
        expires_at = min(row.expires_at for row in rows)
        if self._clock() >= expires_at:
            await self._expired(action, rows, "TTL passed before the audio page could start")
            return
        try:
            audio = await self._audio(action, event)
        except (AudioError, TemplateError) as exc:
            log.warning("event %s rule %s: no audio page: %s", event.id, rule, exc)
            await self._finish_all(rows, DeliveryState.FAILED, f"audio: {exc}", publish=True)
            self._metrics.audio_pages.labels(rule, "failed").inc()
            return
        fitted = await self._fit(event, action, rows, audio, expires_at)
        if fitted is None:
            return
        phones = self.config.phone_targets()
        by_name = {row.phone: row for row in rows}
        missing = [row for row in rows if row.phone not in phones]
        if missing:
            await self._finish_all(
                missing, DeliveryState.FAILED, "phone not in the configuration", publish=True
            )
        targets = [
            PageTarget(row.phone, phones[row.phone].host) for row in rows if row.phone in phones
        ]
        if not targets:
            self._metrics.audio_pages.labels(rule, "failed").inc()
            return
        floor = self.floor
        if floor is None:
            await self._play(event, action, fitted, targets, by_name, expires_at, {})
            return
        names = [target.name for target in targets]
        # Waiting for phones another instance pushes to as long as a start can wait on one
        # instance for the push in flight (the longest request timeout of the page's phones),
        # and never past the latest start at which the whole announcement still ends by the
        # TTL (the start pushes given a second). That instance lets a phone go once its queue
        # for it is empty; one still held after that has a queue, or an unreachable phone's
        # retries, ahead of the page: waiting for them would hold the announcement back on
        # every other phone (an evacuation must not start minutes late for one busy phone).
        start_by = expires_at - _START_SLACK - self._lead_in - len(fitted) / SAMPLE_RATE
        wait = max(phones[name].timeout for name in names)
        refused = await floor.take(names, min(wait, start_by - self._clock()))
        try:
            fitted = await self._fit(event, action, rows, fitted, expires_at)
            if fitted is not None:
                await self._play(event, action, fitted, targets, by_name, expires_at, refused)
        finally:
            floor.done(name for name in names if name not in refused)

    async def _fit(
        self,
        event: Event,
        action: AudioAction,
        rows: list[Delivery],
        audio: bytes,
        expires_at: float,
    ) -> bytes | None:
        """The audio cut so that the stream ends by the TTL (as far as can be known now); None,
        the rows finished ``expired``, when no time is left."""
        room = expires_at - self._clock() - self._lead_in
        if room * SAMPLE_RATE >= len(audio):
            return audio
        if room <= 0:
            await self._expired(action, rows, "TTL passed before the audio page could start")
            return None
        log.warning(
            "event %s rule %s: audio cut from %.1f s to %.1f s to end within the TTL",
            event.id,
            action.rule,
            len(audio) / SAMPLE_RATE,
            room,
        )
        return audio[: int(room * SAMPLE_RATE)]

    async def _play(
        self,
        event: Event,
        action: AudioAction,
        audio: bytes,
        targets: list[PageTarget],
        by_name: Mapping[str, Delivery],
        expires_at: float,
        refused: Mapping[str, str],
    ) -> None:
        rule = action.rule
        settings = PageSettings(
            source=stream_source(self.config),
            port=action.multicast[1] if action.multicast else self.config.audio.port,
            multicast=action.multicast[0] if action.multicast else None,
            volume=action.volume,
            ttl=action.multicast_ttl,
            lead_in_s=self._lead_in,
        )
        lanes = self._lanes
        floor = self.floor
        # Phones a start was pushed to (with a floor): only those are stopped.
        started: set[str] = set()

        async def push(target: PageTarget, uri: str) -> None:
            if floor is not None:
                if uri == STOP_URI:
                    if target.name not in started:
                        # Cut while its start waited for the lease: never sent, and the phone
                        # may be another instance's by now.
                        return
                else:
                    # Not sent, so not stopped: the phone is another instance's to push to.
                    if target.name in refused:
                        raise PhoneNotSent(refused[target.name], phone=target.name)
                    await floor.ready(target.name)
                    if not floor.holds(target.name):
                        raise PhoneNotSent(
                            "not pushed: this instance lost the phone's cluster claim",
                            phone=target.name,
                        )
                    started.add(target.name)
            await _push(lanes, target.name, uri)

        try:
            async with asyncio.timeout(max(0.0, expires_at - self._clock())):
                report = await page(targets, audio, push=push, settings=settings)
        except TimeoutError:
            await self._expired(
                action, [by_name[t.name] for t in targets], "TTL passed during the page"
            )
            return
        except (AudioError, WireError) as exc:
            # The stream's source does not resolve, or a start URI is invalid: nothing sent.
            log.error("event %s rule %s: audio page not sent: %s", event.id, rule, exc)
            await self._finish_all(
                [by_name[t.name] for t in targets],
                DeliveryState.FAILED,
                f"audio: {exc}",
                publish=True,
            )
            self._metrics.audio_pages.labels(rule, "failed").inc()
            return
        await self._report(event, action, report, by_name)

    async def _audio(self, action: AudioAction, event: Event) -> bytes:
        body = action.body
        if body is None:
            assert action.say is not None
            text = action.say(event_context(event))
            body = await self._speech.render(text)
        return announcement(body, chime=action.chime, repeat=action.repeat)

    async def _report(
        self, event: Event, action: AudioAction, report: PageReport, rows: Mapping[str, Delivery]
    ) -> None:
        rule = action.rule
        metrics = self._metrics
        for target_result in report.results:
            state, error = _outcome(target_result, report)
            await self._finish(rows[target_result.target.name], state, error, publish=True)
        stream = report.stream
        if stream is not None:
            metrics.audio_stream_seconds.labels(rule).observe(stream.duration_s)
        heard = len(report.started) if not report.error else 0
        result = "ok" if report.ok else "partial" if heard else "failed"
        metrics.audio_pages.labels(rule, result).inc()
        log.log(
            logging.INFO if report.ok else logging.WARNING,
            "event %s rule %s: audio page %s (%s) to %d of %d phone(s)%s%s",
            event.id,
            rule,
            result,
            report.uri,
            heard,
            len(report.results),
            f", {stream.packets * 0.02:.2f} s streamed" if stream is not None else "",
            f"; stream failed: {report.error}" if report.error else "",
        )

    # --- outcomes -------------------------------------------------------------------------

    async def _expired(self, action: AudioAction, rows: Sequence[Delivery], reason: str) -> None:
        log.warning("rule %s: audio page expired: %s", action.rule, reason)
        await self._finish_all(rows, DeliveryState.EXPIRED, reason, publish=True)
        self._metrics.audio_pages.labels(action.rule, "expired").inc()

    async def _finish_all(
        self,
        rows: Iterable[Delivery],
        state: DeliveryState,
        error: str,
        *,
        publish: bool = False,
    ) -> None:
        for row in rows:
            await self._finish(row, state, error, publish=publish)

    async def _finish(
        self, row: Delivery, state: DeliveryState, error: str, *, publish: bool
    ) -> None:
        if row.id not in self._open:
            return  # finished already (a page cut after some of its phones were done)
        self._open.discard(row.id)
        await self._spool.deliveries.finish(row.id, state, error)
        self._metrics.ended(row.phone, state)
        if state is not DeliveryState.DELIVERED:
            log.warning(
                "delivery %s event %s rule %s phone %s (audio) %s: %s",
                row.id,
                row.event_id,
                row.rule,
                row.phone,
                state,
                error,
            )
        if publish and self._on_outcome is not None:
            outcome = Outcome(
                row.event_id,
                row.rule,
                row.phone,
                state,
                1,
                error,
                self._clock() - row.created_at,
            )
            task = asyncio.get_running_loop().create_task(self._publish(outcome))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    async def _publish(self, outcome: Outcome) -> None:
        if self._on_outcome is None:
            return
        try:
            await self._on_outcome(outcome)
        except Exception:  # an outcome publisher must never stop a page
            log.exception("publishing the outcome of an audio page failed")


def _outcome(result: TargetResult, report: PageReport) -> tuple[DeliveryState, str]:
    if not result.started:
        return DeliveryState.FAILED, f"would not listen: {result.error}"
    if report.error:
        return DeliveryState.FAILED, f"stream failed: {report.error}"
    if not result.stopped:
        stop = f"heard the page, but the stop push failed: {result.stop_error}"
        return DeliveryState.DELIVERED, stop
    return DeliveryState.DELIVERED, ""


async def _push(lanes: PhoneLanes, phone: str, uri: str) -> None:
    """One ExecuteItem through the phone's lane; raise :class:`PhoneError` unless the phone
    accepted it. A start answered busy (error 6, as an error object or an item's Status) or not
    sent is tried once more. A stop is tried up to :data:`_STOP_TRIES` times, also when
    unanswered (it does no harm twice): a phone whose cut start is still running answers busy
    until it is done, and a phone left listening is what an operator notices."""
    stop = uri == STOP_URI
    tries = _STOP_TRIES if stop else 2
    delay = _RETRY_DELAY
    for attempt in range(1, tries + 1):
        try:
            items = await lanes.execute(phone, [ExecuteItem(uri)])
        except PhoneError as exc:
            again = exc.retryable or (stop and isinstance(exc, PhoneUnconfirmed))
            if not again or attempt == tries:
                raise
        else:
            refused = [item for item in items if not item.ok]
            if not refused:
                return
            item = refused[0]
            error = PhoneError(f"{item.url}: {item.data} (Status {item.status})", phone=phone)
            if item.status != 6 or attempt == tries:
                raise error
        await asyncio.sleep(delay)
        delay *= 2
