"""The main job end to end, for a person to watch: what ``datalayer demo`` (``make demo``) runs.

It migrates the store, starts the relay and a live consumer per projection (threads of this
process, with a Prometheus endpoint), writes a workload through the command handlers, waits for
the read models, checks them against the write side, rebuilds ``order_views`` blue/green,
verifies both read models against a fresh replay, prints ``status`` and stops what it started.
Every check that fails raises :class:`DemoFailed` naming what did not match.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from consumers.rebuild import Rebuild, RebuildOptions
from datalayer.demo_namespace import namespaced, remove_namespace
from datalayer.demo_pipeline import DemoPipeline
from datalayer.demo_workload import DemoFailed, Workload, summary
from datalayer.metrics import PipelineMetrics
from datalayer.read_model_commands import ProgressBar
from datalayer.settings import Settings
from datalayer.status import StatusReport, gather_status
from datalayer.status_commands import print_status
from datalayer.wiring import ReadModelStore, consumer_config, read_model_store
from domain import OrdersApplication
from domain.handlers import StreamWrite
from eventstore import EventStore
from projections.freshness import wait_until_applied
from projections.orders import OrderCache, OrderCacheQueries, OrderQueries, OrderViews
from projections.projection import Projection
from projections.verify import verify

__all__ = ["DemoFailed", "DemoOptions", "remove_namespace", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    """How big the workload is, and where the demo runs (see ``datalayer demo --help``)."""

    orders: int = 300
    writers: int = 4
    namespace: str | None = None
    keep: bool = False
    timeout: float = 120.0


def _print(line: str) -> None:
    print(line, flush=True)  # flushed: the rebuild's progress bar on stderr interleaves in order


def run_demo(settings: Settings, options: DemoOptions, say: Callable[[str], None] = _print) -> None:
    """Run the demo and report through ``say``; raises :class:`DemoFailed` on the first mismatch."""
    from datalayer.health import check_health

    started = time.monotonic()
    # Each server answers, or the demo stops now with the one that does not (not after timeouts).
    for check in check_health(settings, [], "servers"):
        if not check.ok:
            raise DemoFailed(f"{check.name} at {check.detail}")
    ns = options.namespace
    views: Projection[Any]
    cache: Projection[Any]
    if ns is not None:
        settings, views, cache = namespaced(settings, ns)
    else:
        views, cache = OrderViews(), OrderCache()
    run = _DemoRun(settings, options, views, cache, say)
    try:
        run.execute()
    finally:
        # Stopping and cleaning up run even after a failure; their own errors do not hide it.
        failing = sys.exc_info()[1] is not None
        try:
            run.stop()
            if ns is not None and not options.keep:
                remove_namespace(settings, ns)
                say(f"removed everything named after {ns}")
        except Exception as exc:
            if not failing:
                raise
            say(f"(cleaning up after the failure also failed: {type(exc).__name__}: {exc})")
    say(f"demo: ok in {time.monotonic() - started:.1f} s")


class _DemoRun:
    def __init__(
        self,
        settings: Settings,
        options: DemoOptions,
        views: Projection[Any],
        cache: Projection[Any],
        say: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.options = options
        self.views, self.cache = views, cache
        self.projections = [views, cache]
        self.say = say
        self.run_id = uuid.uuid4().hex[:6]
        # Beside the relay (its follower, checkpoints) the demo reads, rebuilds and verifies from it.
        self.store = EventStore.connect(
            settings.psycopg_url(),
            schema=settings.eventstore_schema,
            max_size=8,
            connect_kwargs=settings.postgres_connect_kwargs(),
        )
        self.models: dict[str, ReadModelStore] = {
            p.name: read_model_store(p, settings) for p in self.projections
        }
        self.metrics = PipelineMetrics()
        self.pipeline = DemoPipeline(
            settings,
            self.projections,
            self.models,
            self.store,
            self.metrics,
            say,
            options.timeout,
            lambda projection: self._rebuild(projection, handover_timeout=0.0),
        )

    # -- the steps ----------------------------------------------------------------------------

    def execute(self) -> None:
        s = self.settings
        # The pipeline's own INFO logs would drown the report; warnings still show.
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
        self.say(
            f"datalayer demo: the main job on PostgreSQL, Kafka ({s.kafka_bootstrap}) and Redis, "
            f"{self.options.orders} orders"
        )
        self.store.migrate()
        before = self._event_count()
        port = self.pipeline.start()
        self.say(
            f"  store schema {s.eventstore_schema} ({before:,} events before), topics {s.topic_prefix}*, "
            f"read models {self.views.name} (PostgreSQL) and {self.cache.name} (Redis)"
        )
        self.say(
            f"  started the relay and {len(self.pipeline.consumers)} consumers; metrics on http://127.0.0.1:{port}/metrics"
        )

        self.say("1. workload through the command handlers")
        workload = Workload(OrdersApplication(env=s.eventsourcing_env()), self.run_id)
        writing = time.monotonic()
        customers = max(3, self.options.orders // 20)
        workload.catalog(customers, 8, stock=max(1000, self.options.orders * 3))
        self.say(f"  catalog: {customers} customers, 8 products with stock")
        workload.refuse_invalid_commands(lambda line: self.say(f"  {line}"))
        workload.orders(self.options.orders, self.options.writers)
        expected = workload.expected
        seconds = time.monotonic() - writing
        appended = self._event_count() - before
        self.say(
            f"  {self.options.orders} orders by {self.options.writers} concurrent writers: "
            f"{summary(expected)}; {expected.conflicts} conflicting appends retried"
        )
        self.say(
            f"  {appended:,} events appended in {seconds:.1f} s "
            f"({appended / max(seconds, 1e-9):,.0f} events/s, each command a load, a decision and one append)"
        )
        self.pipeline.check_alive()

        self.say("2. the read models")
        waited = self._wait_applied(expected.versions)
        self.say(f"  caught up {waited:.2f} s after the last command")
        self._check_read_models(workload)
        self.pipeline.check_alive()

        self.say(f"3. blue/green rebuild of {self.views.name} (progress on stderr)")
        self._rebuild(self.views)
        order, placed = workload.one_more_order()
        waited = self._wait_applied({(w.stream_type, w.stream_id): w.version for w in placed.written})
        shown = OrderQueries(self._engine(self.views), schema=self.views.name).get_order(order)
        if shown is None or self._cache_queries().order_status(order) is None:
            raise DemoFailed(f"order {order}, placed after the switch, is missing from a read model")
        self.say(f"  an order placed after the switch is in both read models {waited:.2f} s later")

        self.say("4. verify: each live read model against a fresh replay of the store")
        for projection in self.projections:
            self._verify(projection)

        self.say("5. status")
        report = self._settled_status()
        print_status(report, _SayStream(self.say))
        self._check_metrics(port, appended)
        self.pipeline.check_alive()

    # -- waiting and checking -------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the pipeline and release the clients."""
        try:
            self.pipeline.stop()
        finally:
            self.store.close()
            for models in self.models.values():
                models.close()

    def _wait(self, what: str, condition: Callable[[], bool]) -> float:
        return self.pipeline.wait(what, condition)

    def _wait_applied(self, versions: dict[tuple[str, Any], int]) -> float:
        started = time.monotonic()
        writes = [StreamWrite(t, sid, v) for (t, sid), v in versions.items()]
        for projection in self.projections:
            active = self.models[projection.name].registry.active(projection.name)
            if active is None:
                raise DemoFailed(f"{projection.name} has no active generation")
            target = self.models[projection.name].make_target(active.name)
            remaining = self.options.timeout - (time.monotonic() - started)
            try:
                wait_until_applied(projection, target, writes, timeout=max(remaining, 0.1))
            except TimeoutError as exc:
                self.pipeline.check_alive()
                print_status(self._status(), sys.stderr, partitions=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)  # where each thread is
                raise DemoFailed(f"{projection.name} did not catch up: {exc}") from None
        return time.monotonic() - started

    def _engine(self, projection: Projection[Any]) -> Any:
        return self.models[projection.name].registry.engine  # type: ignore[attr-defined]

    def _cache_queries(self) -> OrderCacheQueries:
        return OrderCacheQueries(self.models[self.cache.name].registry.client, projection=self.cache.name)  # type: ignore[attr-defined]

    def _check_read_models(self, workload: Workload) -> None:
        expected = workload.expected
        orders = OrderQueries(self._engine(self.views), schema=self.views.name)
        wrong = []
        for order_id, (status, total) in expected.orders.items():
            row = orders.get_order(order_id)
            if row is None or row.status != status or row.total != total:
                wrong.append(
                    f"{order_id}: read {row.status if row else None}/{row.total if row else None}, "
                    f"wrote {status}/{total}"
                )
        if wrong:
            raise DemoFailed(f"{len(wrong)} orders differ in {self.views.name}, e.g. {wrong[0]}")
        self.say(
            f"  PostgreSQL {self.views.name}: {len(expected.orders)} of {len(expected.orders)} orders match "
            "the write side (status and total)"
        )
        customer = expected.customers[0]
        history = orders.customer_orders(customer, limit=500)
        mine = [o for o, _ in expected.orders.items() if o in {h.order_id for h in history.items}]
        latest = max(history.items, key=lambda o: o.placed_at)
        self.say(
            f"    customer {customer}: {len(mine)} orders; the latest: {latest.units} units, "
            f"{latest.total}, {latest.status}"
        )
        cache = self._cache_queries()
        statuses = [o for o, (status, _) in expected.orders.items() if cache.order_status(o) != status]
        stock = workload.stock()
        stock_wrong = [
            p for p, units in stock.items() if (s := cache.stock(p)) is None or s.available != units
        ]
        if statuses or stock_wrong:
            raise DemoFailed(
                f"{self.cache.name} differs: {len(statuses)} order statuses, {len(stock_wrong)} stock levels"
            )
        self.say(
            f"  Redis {self.cache.name}: {len(expected.orders)} order statuses and {len(stock)} stock levels "
            "match the write side"
        )
        best = [b for b in cache.best_sellers(limit=50) if b.product_id in expected.products][:3]
        self.say(
            "    best sellers: "
            + ", ".join(f"{expected.products[b.product_id]} {b.units} units" for b in best)
        )

    def _rebuild(self, projection: Projection[Any], handover_timeout: float = 30.0) -> None:
        models = self.models[projection.name]
        rebuild = Rebuild(
            projection,
            models.registry,
            models.make_target,
            models.drop_target,
            self.store,
            self.settings.kafka_config(),
            consumer_config(self.settings),
            RebuildOptions(handover_timeout=handover_timeout, drop_old=True),
            on_progress=ProgressBar(sys.stderr).show,
        )
        report = rebuild.run(self.pipeline.stop_event)
        if not report.activated:
            raise DemoFailed(f"the rebuild of {projection.name} did not finish")
        if handover_timeout and not report.handed_over:
            raise DemoFailed(
                f"no live consumer took over {report.generation} within {handover_timeout:.0f} s"
            )
        self.say(
            f"  generation {report.generation} is active: {report.replayed.applied:,} events replayed, "
            f"{report.caught_up_events:,} caught up from Kafka in {report.seconds:.1f} s"
            + ("; the live consumer moved over" if report.handed_over else "")
            + (f"; dropped {', '.join(report.dropped)}" if report.dropped else "")
        )

    def _verify(self, projection: Projection[Any]) -> None:
        models = self.models[projection.name]
        active = models.registry.active(projection.name)
        if active is None:
            raise DemoFailed(f"{projection.name} has no active generation to verify")
        shadow_name = f"{projection.name[:40]}_verify_{uuid.uuid4().hex[:8]}"
        shadow = models.make_target(shadow_name)
        try:
            report = verify(
                projection,
                models.make_target(active.name),
                shadow,
                self.store,
                settle_timeout=self.options.timeout,
            )
        finally:
            models.drop_target(shadow_name)
        if not report.ok:
            counts = report.counts()
            first = report.differences[0]
            raise DemoFailed(
                f"{active.name} differs from a fresh replay: {counts['missing']} missing, {counts['extra']} "
                f"extra, {counts['different']} different, e.g. {first.kind} {first.where} {first.key}"
            )
        self.say(f"  {active.name}: {report.compared:,} rows/keys equal a fresh replay of the store")

    def _status(self) -> StatusReport:
        s = self.settings
        prefixes = {"topic_prefix": s.topic_prefix, "dead_letter_prefix": s.dead_letter_topic_prefix}
        return gather_status(s, self.projections, **prefixes)

    def _settled_status(self) -> StatusReport:
        found: list[StatusReport] = []

        def settled() -> bool:
            report = self._status()
            found[:] = [report]
            if report.errors or report.relay is None:
                return False
            actives = [p.active for p in report.projections]
            # Settled: nothing left to apply, and the groups done rebalancing (all partitions held).
            return report.relay.lag_events == 0 and all(
                a is not None
                and a.lag_events == 0
                and (a.group_assigned is None or a.group_assigned >= len(a.partitions))
                for a in actives
            )

        try:
            self._wait("the relay and consumers to report no lag, every partition held", settled)
        except DemoFailed:
            if found:
                print_status(found[0], _SayStream(self.say))
            raise
        report = found[0]
        letters = {p.name: p.dead_letters for p in report.projections if p.dead_letters}
        if letters:
            raise DemoFailed(f"dead letters: {letters}")
        return report

    def _check_metrics(self, port: int, appended: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

        def value(name: str, **labels: str) -> float:
            return samples.get((name, tuple(sorted(labels.items()))), 0.0)

        published = value("datalayer_relay_events_published_total", relay="default")
        applied = {
            p.name: value("datalayer_consumer_events_applied_total", projection=p.name)
            for p in self.projections
        }
        batches = sum(value("datalayer_consumer_batches_total", projection=p.name) for p in self.projections)
        self.say(
            f"  metrics: the relay published {published:,.0f} events; the consumers applied "
            + ", ".join(f"{n:,.0f} ({name})" for name, n in applied.items())
            + f" in {batches:,.0f} batches"
        )
        # Another relay or consumer process may share the work outside a namespace: check ours did some.
        if self.pipeline.relay_was_active and published < (appended if self.options.namespace else 1):
            raise DemoFailed(
                f"the relay's metrics show {published:.0f} events published, {appended} appended"
            )
        if self.options.namespace and min(applied.values()) < 1:
            raise DemoFailed(f"the consumers' metrics show nothing applied: {applied}")

    # -- cleaning up ----------------------------------------------------------------------------

    def _event_count(self) -> int:
        with self.store.pool.connection() as conn:
            row = conn.execute(f'SELECT count(*) FROM "{self.store.schema}".events').fetchone()
        return int(row[0]) if row else 0


class _SayStream:
    """A text stream that hands each line to ``say``: print_status writes into the demo's report."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self.say(f"  {line}" if line else "")
        return len(text)

    def flush(self) -> None:
        pass
