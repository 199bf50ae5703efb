"""The daemon's lifespan: open resources in order, supervise the tasks, reload, shut down.

Start-up: spool → dispatcher (pending deliveries resume; on PostgreSQL the cluster joins and
adopts what no live instance holds, see :mod:`phonepush.cluster`) → intake → MQTT source → HTTP
server; ready once the server listens and MQTT (when configured) is subscribed. A broker still
down after ``mqtt_ready_wait`` does not hold up the webhook side (systemd hears READY=1 then),
but "phonepush ready" is logged only once MQTT is connected too, when ``/readyz`` says so as well.

Shutdown (SIGTERM/SIGINT, or :meth:`Daemon.stop`): stop taking input (MQTT stops acking new
messages, which stay queued in the persistent session for the next start; the
webhook answers 503), let requests already on the wire finish under ``drain_timeout``, cancel
the rest (still pending in the spool for the next start), leave the cluster (the other
instances adopt its phones at once), close. SIGHUP reloads the config atomically: a bad file
keeps the old config and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from prometheus_client import CollectorRegistry

from phonepush.alerting.acks import AckService, ack_prefix
from phonepush.alerting.actions import ActionService
from phonepush.alerting.repeats import Repeater
from phonepush.app.builder import Built, Services, build
from phonepush.app.limits import default_max_connections
from phonepush.app.systemd import Notifier, state_directories
from phonepush.audio.announce import Announcer
from phonepush.cluster import Cluster, Floor
from phonepush.config import Config, SpoolConfig, format_duration, load_config
from phonepush.console import Screens
from phonepush.dispatch.dispatcher import Dispatcher, Outcome
from phonepush.errors import ConfigError, PhonepushError, SpoolError
from phonepush.grouping.grouper import Grouper
from phonepush.health.monitor import Health
from phonepush.health.shared import SharedHealth
from phonepush.homeassistant.publisher import HomeAssistant
from phonepush.http.authenticate import Authenticator
from phonepush.http.server import ServerState, create_app, uvicorn_config
from phonepush.logs import counted
from phonepush.metrics import Metrics
from phonepush.phone.client import PhoneClient, PhoneTarget
from phonepush.phone.lanes import PhoneLanes
from phonepush.pipeline.intake import Intake
from phonepush.redact import url_for_log
from phonepush.silence.silences import Silences
from phonepush.sources.schedule import Clock, Scheduler
from phonepush.store.housekeeping import Housekeeper
from phonepush.store.interface import Store
from phonepush.store.records import Delivery
from phonepush.store.spool import Spool

if TYPE_CHECKING:
    from phonepush.sources.mqtt import MqttSource

__all__ = ["Daemon", "Running"]

log = logging.getLogger("phonepush.daemon")

#: How long start-up waits for the broker before declaring itself ready anyway (``/readyz``
#: still says MQTT is down): a broker outage must not keep the webhook side from serving.
_MQTT_READY_WAIT = 10.0


def open_store(spool: SpoolConfig) -> AbstractAsyncContextManager[Store]:
    """The store ``[spool]`` names: PostgreSQL with ``url``, else the SQLite file at ``path``.

    psycopg is imported only here and only for ``url``, so a daemon on SQLite runs without it.
    """
    if not spool.url:
        return Spool(
            spool.path,
            max_pending=spool.max_pending,
            synchronous=spool.synchronous,
            max_size=spool.max_size,
            follow_symlinks=spool.follow_symlinks,
            trusted_links=state_directories(),
        )
    try:
        from phonepush.store.postgres import PostgresStore
    except ImportError as exc:
        raise ConfigError(
            f"spool.url: PostgreSQL needs psycopg ({exc.name} is not installed):"
            " pip install 'phonepush[postgres]'"
        ) from None
    return PostgresStore(
        spool.url,
        password=None if spool.password is None else spool.password.get_secret_value(),
        pool_size=spool.pool_size,
        max_pending=spool.max_pending,
        max_size=spool.max_size,
    )


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns signals and shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(slots=True)
class Running:
    """The live parts of a started daemon, for tests and in-process users (``demo``)."""

    config: Config
    spool: Store
    dispatcher: Dispatcher
    intake: Intake
    metrics: Metrics
    mqtt: MqttSource | None
    port: int
    announcer: Announcer | None = None
    housekeeper: Housekeeper | None = None
    #: This instance's part in the cluster (PostgreSQL only; None on SQLite).
    cluster: Cluster | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Daemon:
    """One daemon run. ``await run()`` until :meth:`stop` (or a signal when ``handle_signals``).

    Doubles come in through the constructor: a metrics ``registry``, a ``client_factory``
    for phone clients and the schedules' ``schedule_clock``; ``screens`` are the phones' screens
    the console shows (``phonepush demo``'s simulated phones).
    """

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        registry: CollectorRegistry | None = None,
        client_factory: Callable[[PhoneTarget], PhoneClient] = PhoneClient,
        notifier: Notifier | None = None,
        handle_signals: bool = False,
        drain_timeout: float = 10.0,
        mqtt_ready_wait: float = _MQTT_READY_WAIT,
        schedule_clock: Clock | None = None,
        screens: Screens | None = None,
    ) -> None:
        self.config = config
        self._config_path = config_path
        self._metrics = Metrics(registry)
        self._client_factory = client_factory
        self._notifier = notifier if notifier is not None else Notifier()
        self._handle_signals = handle_signals
        self._drain_timeout = drain_timeout
        self._mqtt_ready_wait = mqtt_ready_wait
        self._schedule_clock = schedule_clock
        self._screens = screens
        self._scheduler: Scheduler | None = None
        self._health: Health | None = None
        self._shared: SharedHealth | None = None
        self._homeassistant: HomeAssistant | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.ready = asyncio.Event()
        self.running: Running | None = None
        #: What each (re)load's stages hand work to; set once the services are open.
        self._services: Services | None = None
        self._cluster: Cluster | None = None

    @property
    def _base_dir(self) -> Path | None:
        """Where relative audio files are found: next to the config file."""
        return self._config_path.parent if self._config_path is not None else None

    def stop(self) -> None:
        """Begin an orderly shutdown (safe to call from a signal handler)."""
        self._stop.set()

    def reload(self) -> None:
        """Reload the configuration file (SIGHUP)."""
        self._reload.set()

    async def run(self) -> None:
        config = self.config
        metrics = self._metrics
        async with AsyncExitStack() as stack:
            try:
                spool = await stack.enter_async_context(open_store(config.spool))
            except SpoolError as exc:
                # At start-up a spool that cannot open is a deployment problem: one line naming
                # the key, exit 2, as for any other bad setting.
                key = "spool.url" if config.spool.url else "spool.path"
                raise ConfigError(f"{key}: {exc}") from exc
            metrics.watch(spool)
            housekeeper = Housekeeper(
                spool, retention=config.spool.retention, max_size=config.spool.max_size
            )
            mqtt: MqttSource | None = None
            # Every push to a phone goes through its lane, deliveries and audio pages alike;
            # closed last, after the pages' stop pushes.
            lanes = await stack.enter_async_context(
                PhoneLanes(
                    config.phone_targets(),
                    client_factory=self._client_factory,
                    max_connections=config.dispatch.max_connections or default_max_connections(),
                )
            )
            log.info("at most %d phone connections open at once", lanes.max_connections)
            dispatcher = await stack.enter_async_context(
                Dispatcher(
                    spool,
                    lanes,
                    metrics=metrics,
                    concurrency=config.dispatch.concurrency,
                    retry_initial=config.dispatch.retry_initial,
                    retry_max=config.dispatch.retry_max,
                    retry_unconfirmed=_retry_unconfirmed(config),
                    on_outcome=self._publish_outcome,
                )
            )
            health = self._health = Health(
                config, lanes, metrics=metrics, pending=dispatcher.queued
            )
            dispatcher.on_reach = health.reached
            cluster = self._cluster = _cluster(config, spool, dispatcher, metrics)
            shared = self._shared = _shared_health(spool, health, cluster)
            # Where committed work and cancels go: the cluster on PostgreSQL (it pushes what
            # this instance holds and tells the others), the dispatcher itself on SQLite.
            submit: Callable[[Sequence[Delivery]], None] = dispatcher.submit
            cancel: Callable[[Iterable[int]], None] = dispatcher.cancel
            if cluster is not None:
                submit, cancel = cluster.submit, cluster.cancel
            silences = Silences(spool)
            await silences.load()
            grouper = Grouper(
                spool,
                silences,
                public_url=config.server.public_url,
                metrics=metrics,
                submit=submit,
            )
            repeater = Repeater(spool, metrics=metrics, submit=submit)
            wake_repeats: Callable[[], None] = repeater.wake
            if cluster is not None:
                silences.on_change = functools.partial(cluster.announce, "silences")
                # Only the leader measures the shared store: the others refuse events (spool
                # full) on its word.
                housekeeper.on_full = lambda full: cluster.announce(f"full:{int(full)}")

                def store_full(full: bool) -> None:
                    spool.full = full

                cluster.on_full = store_full
                grouper.on_join = cluster.notify_work
                cluster.reload_silences = silences.load

                def wake() -> None:
                    repeater.wake()
                    grouper.wake()

                def wake_and_announce() -> None:
                    repeater.wake()
                    cluster.notify_work()

                cluster.wake = wake
                wake_repeats = wake_and_announce
            announcer = await stack.enter_async_context(
                Announcer(
                    config,
                    spool,
                    metrics=metrics,
                    actions={},
                    lanes=lanes,
                    on_outcome=self._publish_outcome,
                )
            )
            self._services = Services(
                spool,
                metrics,
                submit,
                cancel=cancel,
                wake_repeats=wake_repeats,
                grouper=grouper,
                announcer=announcer,
            )
            built = build(config, self._services, base_dir=self._base_dir)
            rules = built.pipeline.book
            intake = Intake(built.pipeline, spool, metrics=metrics, submit=submit)
            if config.mqtt is not None:
                # paho is imported only by daemons that use MQTT.
                from phonepush.sources.mqtt import MqttSource

                mqtt = await stack.enter_async_context(
                    MqttSource(
                        config.mqtt, filters=rules.mqtt_filters, accept=intake, metrics=metrics
                    )
                )
            self._mqtt = mqtt
            if mqtt is not None:
                # Always there with a broker, so a reload can turn it on.
                ha = self._homeassistant = HomeAssistant(config, mqtt, phone_state=health.get)
                health.on_change = ha.phone_changed
                mqtt.on_new_session = ha.new_session
            # Always there, so a reload can add the first schedule.
            scheduler = self._scheduler = await stack.enter_async_context(
                Scheduler(
                    config.schedules,
                    store=spool,
                    accept=intake,
                    clock=self._schedule_clock,
                    metrics=metrics,
                )
            )
            metrics.mqtt_configured.set(1 if mqtt is not None else 0)
            acks = await stack.enter_async_context(
                AckService(
                    spool,
                    metrics=metrics,
                    public_url=config.server.public_url,
                    cancel=cancel,
                    mqtt=mqtt,
                    topic_prefix=ack_prefix(config.mqtt) if config.mqtt is not None else "",
                    webhook=config.ack.webhook,
                    webhook_timeout=config.ack.webhook_timeout,
                )
            )
            if self._homeassistant is not None:
                acks.on_ack = self._homeassistant.acknowledged
            actions = await stack.enter_async_context(
                ActionService(
                    spool, metrics=metrics, public_url=config.server.public_url, mqtt=mqtt
                )
            )
            state = ServerState(
                intake,
                spool,
                metrics,
                token=_secret(config.webhook.token),
                hmac_secret=_secret(config.webhook.hmac_secret),
                max_body=config.server.max_body,
            )
            if mqtt is not None:
                state.readiness["mqtt"] = lambda: "" if mqtt.connected else "not connected"
            state.silences = silences
            state.health = health
            state.acks = acks
            state.actions = actions
            state.authenticator = Authenticator.from_config(config, metrics=metrics)
            state.screens = self._screens
            sock = _bind(config.server.listen)
            stack.callback(sock.close)
            server = _Server(uvicorn_config(create_app(state), config.server))
            port = sock.getsockname()[1]
            self.running = Running(
                config,
                spool,
                dispatcher,
                intake,
                metrics,
                mqtt,
                port,
                announcer,
                housekeeper,
                cluster,
            )
            if cluster is None:
                # A live audio page is never replayed: its rows left pending are finished here.
                resumed = await announcer.abandon(await spool.deliveries.pending())
                dispatcher.submit(resumed)
                if resumed:
                    log.info("resuming %d pending deliveries from the spool", len(resumed))
            else:
                # Only what this instance adopts (never another live instance's rows).
                cluster.abandon = announcer.abandon
                if shared is not None:
                    await shared.load()
                # An audio page pushes to a phone only while this instance holds its claim.
                floor = Floor(cluster, busy=dispatcher.busy)
                cluster.keeps = floor.keeps
                announcer.floor = floor
                await cluster.start()

            def timer(runner: Callable[[], Coroutine[Any, Any, None]], name: str) -> Any:
                # On PostgreSQL the timers run on the cluster's leader only.
                return runner() if cluster is None else cluster.lead(runner, name)

            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(server.serve(sockets=[sock]), name="http")]
                if mqtt is not None:
                    tasks.append(tg.create_task(mqtt.run(), name="mqtt"))
                if cluster is not None:
                    tasks.append(tg.create_task(cluster.run(), name="cluster"))
                tasks.append(
                    tg.create_task(timer(housekeeper.run, "housekeeping"), name="housekeeping")
                )
                tasks.append(tg.create_task(timer(grouper.run, "grouping"), name="grouping"))
                tasks.append(tg.create_task(timer(repeater.run, "repeats"), name="repeats"))
                tasks.append(tg.create_task(scheduler.run(), name="schedules"))
                tasks.append(tg.create_task(timer(health.run, "health"), name="health"))
                if shared is not None:
                    tasks.append(tg.create_task(shared.run(), name="health:shared"))
                if self._homeassistant is not None:
                    tasks.append(tg.create_task(self._homeassistant.run(), name="homeassistant"))
                if self._notifier.watchdog_interval:
                    tasks.append(tg.create_task(self._notifier.watchdog_loop(), name="watchdog"))
                with self._signals():
                    await self._until_ready(server, mqtt)
                    serving = (
                        f"listening on {config.server.listen}, "
                        f"{counted(len(config.phones), 'phone')}, "
                        f"{counted(len(config.rules), 'rule')}{_mqtt_part(config)}"
                    )
                    status = "listening"
                    if mqtt is None or mqtt.connected:
                        log.info("phonepush ready: %s", serving)
                    else:
                        # Webhooks are served, and systemd hears READY=1 as before (a broker
                        # outage must not hold up the units after ours); "ready" is said only
                        # when /readyz agrees.
                        log.warning(
                            "phonepush not ready: %s not connected after %s"
                            " (/readyz answers 503); still trying",
                            serving,
                            format_duration(self._mqtt_ready_wait),
                        )
                        status = "listening; MQTT not connected yet"
                        tasks.append(
                            tg.create_task(self._ready_later(mqtt, serving), name="readiness")
                        )
                    # What start-up made lives as long as the process (modules, config,
                    # routes): kept out of the collector's full passes, which would otherwise
                    # walk it again and again while a fan-out allocates (its garbage goes first).
                    gc.collect()
                    gc.freeze()
                    self.ready.set()
                    self._notifier.ready(status)
                    await self._serve_until_stopped(state)
                log.info("stopping: intake closed, draining deliveries")
                self._notifier.stopping()
                if mqtt is not None:
                    await mqtt.stop_intake()
                state.accepting = False
                cut = await dispatcher.drain(self._drain_timeout)
                if shared is not None:
                    # The last outcomes and reachability learned, for the instances that stay.
                    await shared.flush()
                if cluster is not None:
                    # Pages cut first: their stops go out while their phones are still held.
                    await announcer.close()
                    await cluster.leave()
                server.should_exit = True
                for task in tasks[1:]:
                    task.cancel()
            log.info(
                "stopped; %s left pending in the spool%s",
                counted(spool.pending_count(), "delivery", "deliveries"),
                f" ({cut} cut short)" if cut else "",
            )

    async def _until_ready(self, server: _Server, mqtt: MqttSource | None) -> None:
        # uvicorn and paho offer flags, not events, for "listening" and "connected".
        while not server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        deadline = time.monotonic() + self._mqtt_ready_wait
        while mqtt is not None and not mqtt.connected and time.monotonic() < deadline:
            if self._stop.is_set():
                return
            await asyncio.sleep(0.01)

    async def _ready_later(self, mqtt: MqttSource, serving: str) -> None:
        """Say "ready" once the broker connection (subscriptions acknowledged) comes up after
        start-up gave up waiting for it."""
        while not mqtt.connected:  # noqa: ASYNC110 (paho gives a flag, not an event)
            await asyncio.sleep(0.05)
        log.info("phonepush ready: %s, connected", serving)
        self._notifier.status("listening; MQTT connected")

    async def _serve_until_stopped(self, state: ServerState) -> None:
        while not self._stop.is_set():
            stop = asyncio.ensure_future(self._stop.wait())
            reload = asyncio.ensure_future(self._reload.wait())
            try:
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                reload.cancel()
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                await self._apply_reload(state)

    async def _apply_reload(self, state: ServerState) -> None:
        running = self.running
        assert running is not None
        self._notifier.reloading()
        try:
            if self._config_path is None or self._services is None:
                raise ConfigError("no configuration file to reload")
            config = load_config(self._config_path)
            # The new rule book and stages; the services see the new configuration only once
            # all of it compiled.
            built = build(config, self._services, base_dir=self._base_dir)
        except PhonepushError as exc:
            self._metrics.config_reloads.labels("error").inc()
            log.error("reload failed, keeping the running configuration:\n%s", exc)
            self._notifier.ready("reload failed; running the previous configuration")
            return
        for key in (
            "server.listen",
            "server.max_connections",
            "server.header_timeout",
            "server.keepalive_timeout",
            "server.trusted_proxies",
            "spool.path",
            "spool.url",
            "spool.pool_size",
            "cluster.lease",
            "mqtt",
            "dispatch.max_connections",
        ):
            if _dig(config, key) != _dig(running.config, key):
                log.warning("reload: %s changed; it takes effect after a restart", key)
        self._install(built, state)
        self._metrics.config_reloads.labels("ok").inc()
        log.info(
            "reloaded: %s, %s",
            counted(len(config.phones), "phone"),
            counted(len(config.rules), "rule"),
        )
        self._notifier.ready("reloaded")

    def _install(self, built: Built, state: ServerState) -> None:
        """Swap in a reloaded configuration: the intake's pipeline (rule book and stages) in one
        reference, then the settings long-lived objects hold for themselves."""
        running = self.running
        assert running is not None
        config = built.config
        running.intake.pipeline = built.pipeline
        running.config = self.config = config
        if running.housekeeper is not None:
            running.housekeeper.retention = config.spool.retention
            running.housekeeper.max_size = running.spool.max_size = config.spool.max_size
        running.dispatcher.update_phones(config.phone_targets())
        if running.cluster is not None:
            running.cluster.push_timeout = _push_timeouts(config)
        if self._health is not None:
            self._health.update(config)
        if self._shared is not None:
            self._shared.reread()
        running.dispatcher.retry_unconfirmed = _retry_unconfirmed(config)
        if running.mqtt is not None:
            running.mqtt.update_filters(built.pipeline.book.mqtt_filters)
        if self._scheduler is not None:
            self._scheduler.update(config.schedules)
        if self._homeassistant is not None:
            self._homeassistant.update(config)
        if state.acks is not None:
            state.acks.webhook = config.ack.webhook
        state.token = _secret(config.webhook.token)
        state.hmac_secret = _secret(config.webhook.hmac_secret)
        state.max_body = config.server.max_body
        state.authenticator = Authenticator.from_config(config, metrics=self._metrics)

    async def _publish_outcome(self, outcome: Outcome) -> None:
        if self._health is not None:
            self._health.outcome(outcome.phone, outcome.result, time.time())
        if self._mqtt is not None:
            await self._mqtt.publish_outcome(outcome.as_dict())

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if not self._handle_signals:
            yield
            return
        loop = asyncio.get_running_loop()
        handled = {signal.SIGTERM: self.stop, signal.SIGINT: self.stop, signal.SIGHUP: self.reload}
        for sig, handler in handled.items():
            loop.add_signal_handler(sig, handler)
        try:
            yield
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)


def _cluster(
    config: Config, spool: Store, dispatcher: Dispatcher, metrics: Metrics
) -> Cluster | None:
    """The cluster on PostgreSQL (always on: one instance is a cluster of one); None on SQLite.

    The dispatcher and the cluster do not know each other: the dispatcher's idle hook and
    push gate are the cluster's methods, the cluster drives the dispatcher as its ``Lanes``.
    """
    if not config.spool.url:
        return None
    from phonepush.store.cluster import PostgresCluster
    from phonepush.store.postgres import PostgresStore

    assert isinstance(spool, PostgresStore)
    cluster = Cluster(
        PostgresCluster(spool),
        dispatcher,
        lease=config.cluster.lease,
        registry=metrics.registry,
    )
    cluster.push_timeout = _push_timeouts(config)
    dispatcher.on_idle = cluster.idle
    dispatcher.gate = cluster.gate
    return cluster


def _shared_health(spool: Store, health: Health, cluster: Cluster | None) -> SharedHealth | None:
    """On PostgreSQL, the phones' health shared with the other instances: the leader alone
    probes, each instance sees only its own pushes. None on SQLite."""
    if cluster is None:
        return None
    from phonepush.store.health import PostgresHealth
    from phonepush.store.postgres import PostgresStore

    assert isinstance(spool, PostgresStore)
    shared = SharedHealth(PostgresHealth(spool), health, leading=lambda: cluster.leader)
    health.on_share = shared.changed
    return shared


def _push_timeouts(config: Config) -> Callable[[str], float]:
    """Each phone's request timeout, for the cluster's push gate."""
    timeouts = {name: target.timeout for name, target in config.phone_targets().items()}
    return lambda phone: timeouts.get(phone, 10.0)


def _mqtt_part(config: Config) -> str:
    return f", MQTT {url_for_log(config.mqtt.url)}" if config.mqtt is not None else ""


def _retry_unconfirmed(config: Config) -> frozenset[str]:
    return frozenset(rule.name for rule in config.rules if rule.retry_unconfirmed)


def _secret(value: object) -> str | None:
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    text = getter() if callable(getter) else str(value)
    return text or None


def _dig(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part, None)
    return value


def _bind(listen: str) -> socket.socket:
    """Bind the HTTP socket ourselves: a busy port fails start-up with a clear message, and
    tests can listen on port 0 and learn the port."""
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port_text)))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"server.listen: cannot listen on {listen}: {exc.strerror}") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock
