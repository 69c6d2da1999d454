"""Prometheus metrics of the relay and consumer processes: ``--metrics-port`` serves them.

Counters and histograms move once per batch, through the hooks the relay (``on_published``) and
the consumer runtime (``ConsumerConfig.observer``) already call per batch: nothing runs per event.
Lag and dead-letter gauges are read from :func:`datalayer.status.gather_status` when Prometheus
scrapes (again once older than ``STATUS_TTL`` seconds): the figures ``datalayer status`` prints,
costing nothing between scrapes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from consumers.runtime import ProjectionConsumer
from datalayer.settings import Settings
from datalayer.status import StatusReport, gather_status
from eventstore.relay.reading import RECORDED_AT, RelayRow
from projections.projection import Projection
from projections.runner import BatchOutcome

STATUS_TTL = 2.0
# Batches take milliseconds to seconds; the relay's latency (commit to acknowledged) up to minutes
# when it falls behind.
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class PipelineMetrics:
    """The metrics of one process, in a registry of its own; :meth:`serve` exposes them over HTTP."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.relay_events = Counter(
            "datalayer_relay_events_published",
            "Events the relay published and Kafka acknowledged (republished ones again)",
            ["relay"],
            registry=r,
        )
        self.relay_batches = Counter(
            "datalayer_relay_batches", "Batches the relay published and checkpointed", ["relay"], registry=r
        )
        self.relay_latency = Histogram(
            "datalayer_relay_batch_latency_seconds",
            "Per batch: from the commit of its oldest event to Kafka's acknowledgement",
            ["relay"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.applied = Counter(
            "datalayer_consumer_events_applied",
            "Events a projection applied (exactly once each)",
            ["projection"],
            registry=r,
        )
        self.duplicates = Counter(
            "datalayer_consumer_duplicates_skipped",
            "Redelivered events skipped by the stream versions",
            ["projection"],
            registry=r,
        )
        self.dead_letters = Counter(
            "datalayer_consumer_dead_letters",
            "Events sent to the dead-letter topic by this process",
            ["projection"],
            registry=r,
        )
        self.batches = Counter(
            "datalayer_consumer_batches", "Batches applied and committed", ["projection"], registry=r
        )
        self.batch_seconds = Histogram(
            "datalayer_consumer_batch_seconds",
            "Time to apply and commit one batch (retries included)",
            ["projection"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "datalayer_consumer_batch_retries",
            "Batches retried after a transient server error",
            ["projection"],
            registry=r,
        )
        self.errors = Counter(
            "datalayer_errors",
            "Warnings and errors logged: each a failure the process recovered from or stopped on",
            ["component"],
            registry=r,
        )
        self._retries_seen: dict[int, int] = {}

    # -- per-batch hooks ------------------------------------------------------------------------

    def relay_observer(self, relay: str) -> Callable[[Sequence[RelayRow]], None]:
        """The relay's ``on_published`` callback: called once per batch Kafka acknowledged."""
        events = self.relay_events.labels(relay)
        batches = self.relay_batches.labels(relay)
        latency = self.relay_latency.labels(relay)

        def published(batch: Sequence[RelayRow]) -> None:
            if not batch:
                return
            events.inc(len(batch))
            batches.inc()
            oldest = min(batch[0][RECORDED_AT], batch[-1][RECORDED_AT])
            latency.observe(max(time.time() - oldest, 0.0))

        return published

    def consumer_observer(self, consumer: ProjectionConsumer, outcome: BatchOutcome, seconds: float) -> None:
        """``ConsumerConfig.observer``: called once per applied batch."""
        name = consumer.projection.name
        self.applied.labels(name).inc(outcome.applied)
        self.duplicates.labels(name).inc(outcome.duplicates)
        if outcome.dead_letters:
            self.dead_letters.labels(name).inc(len(outcome.dead_letters))
        self.batches.labels(name).inc()
        self.batch_seconds.labels(name).observe(seconds)
        retries = consumer.stats.retries
        seen = self._retries_seen.get(id(consumer), 0)
        if retries > seen:
            self.retries.labels(name).inc(retries - seen)
            self._retries_seen[id(consumer)] = retries

    def count_logged_errors(self, component: str, logger: str) -> None:
        """Count the warnings and errors ``logger`` emits as ``datalayer_errors_total{component}``.

        The relay and the consumers log one warning per failure they recover from (a restart from
        the checkpoint, a retried batch), so this counts them without a hook in their code.
        """
        logging.getLogger(logger).addHandler(_CountingHandler(self.errors.labels(component)))

    # -- gauges read at scrape time -------------------------------------------------------------

    def watch_pipeline(
        self,
        settings: Settings,
        projections: Sequence[Projection[Any]],
        relay_name: str = "default",
        **prefixes: str,
    ) -> None:
        """Export the lag and dead-letter gauges of ``datalayer status`` for these parts."""
        self.registry.register(_StatusCollector(settings, projections, relay_name, prefixes))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` from a daemon thread; returns the port (useful with port 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


class _CountingHandler(logging.Handler):
    def __init__(self, counter: Any) -> None:
        super().__init__(level=logging.WARNING)
        self.counter = counter

    def emit(self, record: logging.LogRecord) -> None:
        self.counter.inc()


class _StatusCollector(Collector):
    """Gauges from :func:`gather_status`, cached for ``STATUS_TTL`` seconds between scrapes."""

    def __init__(
        self,
        settings: Settings,
        projections: Sequence[Projection[Any]],
        relay_name: str,
        prefixes: dict[str, str],
    ) -> None:
        self.settings = settings
        self.projections = list(projections)
        self.relay_name = relay_name
        self.prefixes = prefixes
        self._lock = threading.Lock()
        self._cached: tuple[float, StatusReport] | None = None

    def _report(self) -> StatusReport:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > STATUS_TTL:
                report = gather_status(self.settings, self.projections, self.relay_name, **self.prefixes)
                self._cached = (now, report)
            return self._cached[1]

    def collect(self) -> Iterator[Metric]:
        report = self._report()
        up = GaugeMetricFamily(
            "datalayer_status_up", "1 when the server answered the last status read", labels=["server"]
        )
        up.add_metric(["postgresql"], 0.0 if "postgresql" in report.errors else 1.0)
        if self.projections:
            up.add_metric(["kafka"], 0.0 if "kafka" in report.errors else 1.0)
        yield up
        if report.store is not None and report.relay is not None:
            store, relay = report.store, report.relay
            yield _gauge(
                "datalayer_store_events",
                "Events in the event store (PostgreSQL's estimate above 1,000,000)",
                store.events,
            )
            yield _gauge(
                "datalayer_read_horizon_held_back_events",
                "Committed events readers cannot see yet, behind an open transaction",
                store.held_back_events,
            )
            yield _gauge(
                "datalayer_read_horizon_stall_seconds",
                "How long the transaction holding the read horizon back has been open",
                store.blocking_seconds,
            )
            name = relay.name
            yield _gauge(
                "datalayer_relay_lag_events", "Readable events not yet published", relay.lag_events, name
            )
            yield _gauge(
                "datalayer_relay_lag_seconds",
                "Age of the oldest event not yet published",
                relay.lag_seconds,
                name,
            )
            active = float(relay.active_pid is not None)
            yield _gauge("datalayer_relay_active", "1 when a relay holds its lock", active, name)
        lag = GaugeMetricFamily(
            "datalayer_projection_lag_events",
            "Events in Kafka the generation has not applied yet",
            labels=["projection", "generation", "status"],
        )
        lag_seconds = GaugeMetricFamily(
            "datalayer_projection_lag_seconds",
            "Age (since its commit) of the oldest event the generation has not applied yet",
            labels=["projection", "generation", "status"],
        )
        dead = GaugeMetricFamily(
            "datalayer_projection_dead_letters",
            "Records in the projection's dead-letter topic",
            labels=["projection"],
        )
        for projection in report.projections:
            if projection.dead_letters is not None:
                dead.add_metric([projection.name], projection.dead_letters)
            for g in projection.generations:
                key = [projection.name, g.name, g.status]
                if g.lag_events is not None:
                    lag.add_metric(key, g.lag_events)
                if g.lag_seconds is not None:
                    lag_seconds.add_metric(key, g.lag_seconds)
        yield from (lag, lag_seconds, dead)


def _gauge(name: str, documentation: str, value: float, relay: str | None = None) -> Metric:
    if relay is None:
        return GaugeMetricFamily(name, documentation, value=value)
    family = GaugeMetricFamily(name, documentation, labels=["relay"])
    family.add_metric([relay], value)
    return family
