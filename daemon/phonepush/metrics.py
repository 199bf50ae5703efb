"""Prometheus metrics. One :class:`Metrics` per daemon, on a registry passed in (tests pass
their own), so nothing lives in prometheus-client's global registry.

Beside the ``phonepush_*`` metrics the registry carries the standard ``process_*`` ones
(prometheus-client's ProcessCollector): ``process_open_fds`` against ``process_max_fds`` is how an
operator sees a fan-out or a crowd of HTTP clients nearing the open-files limit."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from phonepush.store.records import FINAL_STATES, DeliveryState

__all__ = ["DELIVERY_RESULTS", "Ended", "Metrics", "StoredState"]

#: The ``result`` label values of ``phonepush_deliveries_total``: the final delivery states.
DELIVERY_RESULTS: Final = tuple(s.value for s in DeliveryState if s in FINAL_STATES)


class StoredState(Protocol):
    """What the stored-state gauges read of the store, at scrape time.

    Both are synchronous on purpose: prometheus_client calls ``collect`` synchronously from
    ``generate_latest`` (inside the /metrics handler, but with no way to await), so they read
    what the store keeps in memory (the pending count) or the size of its files, never the
    database's async methods."""

    def pending_count(self) -> int: ...
    def disk_bytes(self) -> int: ...


class Ended(Protocol):
    """A stored delivery as :meth:`Metrics.ended` counts it (a ``Delivery`` or ``NewDelivery``)."""

    @property
    def phone(self) -> str: ...
    @property
    def state(self) -> str: ...


class _StoreCollector(Collector):
    """``phonepush_spool_pending`` and ``phonepush_spool_bytes``, read from the store when
    scraped: nothing that writes to the store has to remember to set them. 0 until a store is
    watched (before the spool opens)."""

    def __init__(self) -> None:
        self.store: StoredState | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families(0, 0)

    def collect(self) -> Iterable[Metric]:
        store = self.store
        if store is None:
            return self._families(0, 0)
        return self._families(store.pending_count(), store.disk_bytes())

    @staticmethod
    def _families(pending: int, size: int) -> list[Metric]:
        return [
            GaugeMetricFamily(
                "phonepush_spool_pending", "Deliveries waiting in the spool.", value=pending
            ),
            GaugeMetricFamily(
                "phonepush_spool_bytes",
                "Bytes the spool's files (database, write-ahead log, shared memory) take on disk, "
                "read at scrape time.",
                value=size,
            ),
        ]


class Metrics:
    """The daemon's metrics. Names and labels are a contract: extend, never rename."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.events = Counter(
            "phonepush_events",
            'Events taken in, by source and matched rule (rule="" when no rule matched: '
            "those are not stored, see phonepush_events_unmatched_total).",
            ["source", "rule"],
            registry=r,
        )
        self.events_unmatched = Counter(
            "phonepush_events_unmatched",
            "Events no rule matched (a when that passed them over, a wildcard topic's other "
            "messages), by source: counted, neither stored in the spool nor logged above debug.",
            ["source"],
            registry=r,
        )
        self.events_rejected = Counter(
            "phonepush_events_rejected",
            "Events refused at intake (spool full or failing, bad input), by source and reason.",
            ["source", "reason"],
            registry=r,
        )
        self.deliveries = Counter(
            "phonepush_deliveries",
            "Finished deliveries (one rule's pushes to one phone), by phone and result: "
            "delivered, unconfirmed (a request the phone got but did not answer; not sent "
            "again), failed, expired, suppressed.",
            ["phone", "result"],
            registry=r,
        )
        # (phone, result) -> its child: a labels() lookup costs more than the increment.
        self._ended: dict[tuple[str, str], Counter] = {}
        self.delivery_duration = Histogram(
            "phonepush_delivery_duration_seconds",
            "Time from the event's arrival to the phone's last answer, for delivered deliveries.",
            ["phone"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.requests = Counter(
            "phonepush_phone_requests",
            "HTTP pushes sent to phones, by phone and outcome (ok, or the error kind).",
            ["phone", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "phonepush_delivery_retries",
            "Retries scheduled after a transient failure.",
            ["phone"],
            registry=r,
        )
        self.template_errors = Counter(
            "phonepush_template_errors",
            "Rule templates or URIs that failed to render or validate.",
            ["rule"],
            registry=r,
        )
        self.phone_up = Gauge(
            "phonepush_phone_up",
            "1 when the phone's last push or health probe ([health] interval) reached it, 0 "
            "when it could not be reached; with probes on, every configured phone has it.",
            ["phone"],
            registry=r,
        )
        self.phone_info = Gauge(
            "phonepush_phone_info",
            "1 for each phone, labelled with the model and firmware its /DeviceInformationX "
            'last gave ("" until it did, or when its web pages say nothing).',
            ["phone", "model", "firmware"],
            registry=r,
        )
        self._stored = _StoreCollector()
        r.register(self._stored)
        self.mqtt_connected = Gauge(
            "phonepush_mqtt_connected", "1 while connected to the MQTT broker.", registry=r
        )
        self.mqtt_messages = Counter(
            "phonepush_mqtt_messages", "MQTT messages received.", registry=r
        )
        self.config_reloads = Counter(
            "phonepush_config_reloads",
            "Configuration reloads by result (ok, error).",
            ["result"],
            registry=r,
        )
        # --- acknowledgements and repeats ---
        self.acks = Counter(
            "phonepush_acks",
            "Pages acknowledged on a phone (first press of Ack per page and phone).",
            ["rule", "phone"],
            registry=r,
        )
        self.repeats = Counter(
            "phonepush_repeats",
            "Rounds of an unacknowledged page pushed again.",
            ["rule"],
            registry=r,
        )
        self.escalations = Counter(
            "phonepush_escalations",
            "Unacknowledged pages escalated to the rule's escalate.to phones.",
            ["rule"],
            registry=r,
        )
        self.resolved = Counter(
            "phonepush_resolved",
            "Earlier pages resolved by a later event (resolve_when).",
            ["rule"],
            registry=r,
        )
        # --- actions (phonepush.alerting.actions) ---
        self.actions = Counter(
            "phonepush_actions",
            "Presses of action softkeys, by rule, action label and result: ok, failed (the "
            "MQTT publish or webhook failed; shown on the phone), already_done (a one-time "
            "action pressed again), expired (past action_ttl).",
            ["rule", "action", "result"],
            registry=r,
        )
        # --- silences and groups ---
        self.silenced = Counter(
            "phonepush_silenced",
            "Events a runtime silence kept from a phone, by rule (once per event and phone).",
            ["rule"],
            registry=r,
        )
        self.grouped_events = Counter(
            "phonepush_grouped_events",
            "Events that joined a group (group_by/group_wait) instead of paging on their own.",
            ["rule"],
            registry=r,
        )
        # --- the phones' authentication URL (phonepush.http.authenticate) ---
        self.authenticate = Counter(
            "phonepush_authenticate",
            "Answers to phones asking /authenticate, by result (authorized, unauthorized, "
            "throttled: refused unexamined after too many failures).",
            ["result"],
            registry=r,
        )
        self.authenticate_failures = Counter(
            "phonepush_authenticate_failures",
            "Wrong credentials checked at /authenticate, by user: a configured user's name "
            '(never locked out: a rising count is someone guessing), or user="" for names '
            "nobody configured.",
            ["user"],
            registry=r,
        )
        self.mqtt_configured = Gauge(
            "phonepush_mqtt_configured",
            "1 when an [mqtt] section is configured: phonepush_mqtt_connected 0 then means the "
            "broker is out of reach, not that MQTT is unused.",
            registry=r,
        )
        # --- audio paging (phonepush.audio.announce) ---
        self.audio_pages = Counter(
            "phonepush_audio_pages",
            "Audio pages (a rule's audio for one event), by rule and result: ok (every phone "
            "listened, heard and was stopped), partial (some did), failed (none did), expired "
            "(TTL passed, or the daemon stopped, before or during the page).",
            ["rule", "result"],
            registry=r,
        )
        self.audio_stream_seconds = Histogram(
            "phonepush_audio_stream_seconds",
            "How long audio pages streamed, by rule.",
            ["rule"],
            registry=r,
            buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300),
        )

    def ended(self, phone: str, state: str) -> None:
        """Count one delivery that reached its final ``state`` in the store: the one place
        ``phonepush_deliveries_total`` is counted. Every path that makes a delivery final (the
        dispatcher, an audio page) or records one final (intake, a group's flush, through
        :meth:`recorded`) reports it here once, so the counts by result add up to the finished
        deliveries in the spool."""
        key = (phone, str(state))
        child = self._ended.get(key)
        if child is None:
            child = self._ended[key] = self.deliveries.labels(*key)
        child.inc()

    def recorded(self, deliveries: Iterable[Ended]) -> None:
        """Count the deliveries a write stored already final (suppressed or failed at intake
        or at a group's flush); pending ones are counted by :meth:`ended` when they finish."""
        for delivery in deliveries:
            if delivery.state in FINAL_STATES:
                self.ended(delivery.phone, delivery.state)

    def watch(self, store: StoredState) -> None:
        """Read the stored-state gauges (``phonepush_spool_*``) from ``store`` from now on."""
        self._stored.store = store
