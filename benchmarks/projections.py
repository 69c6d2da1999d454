"""Projection throughput and latency, against a bare kafka-python consumer in the same run.

The orders domain's own traffic -- customers, products and orders placed, lines added and removed,
paid, shipped and cancelled, with the stock each reserves and releases -- is generated through
:class:`domain.CommandHandlers`, imported into a fresh store schema and published by the real
:class:`eventstore.relay.Relay` under a fresh topic prefix: ``--events`` (default 200,000) events
on the consumed topics (``Order`` and ``Product``).

(a) **PostgreSQL**: ``order_views`` (:class:`OrderViews` into :class:`PostgresTarget`) applying the
    ``Order`` topic, in a consumer process of its own, from the first record until the target's
    checkpoints cover the topics' end offsets (events/s);
(b) **Redis**: ``order_cache`` (:class:`OrderCache` into :class:`RedisTarget`) applying the ``Order``
    and ``Product`` topics, likewise (events/s);
(c) **bare consumer** (the ceiling): kafka-python's ``KafkaConsumer`` with the projection consumer's
    own settings (:meth:`ConsumerConfig.kafka_consumer_settings`), doing only ``orjson.loads`` of
    each record, over the same topics as (a) and as (b): (a) is compared with the first, (b) with
    the second, and ``bare_consumer_per_s`` is the second (all the consumed records);
(c') **bare consumer, lean unpacking**: the same, its records unpacked by
    :mod:`consumers.record_unpacking` as the projection consumers' are (``lean_unpacking``, on by
    default): the like-for-like ceiling. The issue's ratios stay against kafka-python's own
    unpacking, (c); ``pg_ratio_lean`` and ``redis_ratio_lean`` are against (c'), so a reader sees
    how much of each ratio is the projection's own cost and how much the cheaper unpacking;
(d) **latency**: with the relay and both consumers running in processes of their own (as in
    production, read models caught up on the whole history), a writer process issues commands
    paced to ``--latency-rate`` events/s (default 500); for a sample of the order commands it
    notes when the command handler (``save()``) returned, and this process polls the read models
    every millisecond until they show the change: the order's row in ``order_summaries`` at the
    command's order version (PostgreSQL), its ``order_status`` at its status or later (Redis).
    p50 and p99 of each; the figures in the JSON are the worse of the two read models. Two writer
    runs, one after the other, observe in two ways (``--observers``): *batched*, one query per poll
    for all pending samples (``= ANY`` of an array in PostgreSQL, one HMGET in Redis): the headline
    figures; and *per-sample*, the query API once per pending sample per poll
    (``OrderQueries.get_order``, ``OrderCacheQueries.order_status``), as this benchmark measured
    until session 4, whose figures are printed beside them (``latency_per_sample_observer``); a
    third run, *signalled*, asks as the batched one does but when a batch commits into the read
    model rather than every millisecond (the commit signal ``wait_until_applied`` wakes on,
    ``latency_signalled_observer``). Why:
    polling shares a 2-core machine with the relay, both consumers, the writer and the servers, so
    the less it costs the less it slows the pipeline it measures; the CPU this process used during
    each run is printed (``latency_observer_cores``; measured 0.19 batched against 0.24 per sample,
    plus the servers' share of the queries). The latency itself is defined as before: from
    ``save()`` returning to a query seeing the change. The consumers let Kafka hold a fetch up to
    ``ConsumerConfig.fetch_wait_ms`` (``--fetch-wait-ms``; 0 answers at once), and the cores the
    relay and each consumer used during the run are in ``latency_process_cores``: at a steady low
    rate their cost per wake-up, not per event, decides how busy the machine is.

Each throughput measurement runs in a fresh process, one at a time, from the beginning of the
topics with a fresh consumer group and a fresh target (schema or key prefix); rounds rotate the
order of (a), (b) and (c) so that a noisy 2-core machine affects them alike, and figures are medians.
The ratios are the medians' ratios. The latency run comes last: its consumers first catch up on
the whole history (fresh targets, as a new deployment would), the read models are vacuumed, the
writer runs ``--warmup-seconds`` (10) unobserved, then the observed runs start: the first seconds
under load are not the steady rate the latency is defined at (until session 11 there was no warm-up,
and the first observed run's p99 came out about twice the later runs'). Everything created is
dropped at the end. The last line is one JSON object with the
figures; ``kafka_crc32c`` in it says whether kafka-python checked record CRCs with the ``crc32c``
package or in pure Python, which moves the ceiling (and so the ratios) several-fold.
"""

# This file is named like the ``projections`` package it measures: its directory, first on the path
# when it runs as a script, is taken off before anything imports ``projections``.

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse
import contextlib
import cProfile
import gc
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
import psycopg
import redis
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from psycopg import sql
from sqlalchemy import ARRAY, Engine, Uuid, any_, bindparam, func, select

from consumers import record_unpacking
from consumers.runtime import ConsumerConfig, ProjectionConsumer
from datalayer.clients import postgres_engine, redis_client
from datalayer.settings import Settings, load_settings
from domain import CommandHandlers, OrdersApplication, OrderStatus
from eventstore import EventStore
from eventstore.keys import MASTER_KEY_ENV, new_master_key
from eventstore.persistence import DatalayerApplicationRecorder
from eventstore.records import NewEvent
from eventstore.relay.relay import Relay, RelayConfig
from eventstore.relay.topics import topic_for
from projections.commit_signal import CommitSignal
from projections.orders import OrderCache, OrderCacheQueries, OrderQueries, OrderViews
from projections.orders.tables import order_summaries
from projections.runner import BatchOutcome
from projections.targets import PostgresTarget, RedisTarget

# Customers' personal fields are sealed under a master key (docs/security.md): a throwaway one here.
if not (os.environ.get(MASTER_KEY_ENV) or os.environ.get(f"{MASTER_KEY_ENV}_FILE")):
    os.environ[MASTER_KEY_ENV] = new_master_key()

EVENTS = 200_000
ROUNDS = 3
PARTITIONS = 6
CUSTOMERS = 500
PRODUCTS = 1_000
IN_FLIGHT = 200  # orders open at once: their events interleave in the log as real traffic's do
LATENCY_RATE = 500  # events/s
LATENCY_SECONDS = 30.0
# The writer's unobserved run before the observed ones: the first seconds under load (the servers
# settling after the history's catch-up and its VACUUM, caches and plans filling) are not the steady
# 500 events/s the latency is defined at. Measured: the first observed run's p99 was 2x the others'.
WARMUP_SECONDS = 10.0
SAMPLE_EVERY = 8  # of the order commands; about 25 samples/s per read model at 500 events/s
POLL_S = 0.001  # how often an observed query is repeated until it shows the change
TARGET_PG_RATIO = 0.5
TARGET_REDIS_RATIO = 0.7
TARGET_P99_MS = 100.0
ORDER, PRODUCT = "Order", "Product"
# Later statuses imply earlier ones: an order seen shipped has certainly been seen paid.
STATUS_RANK = {OrderStatus.PLACED: 0, OrderStatus.PAID: 1, OrderStatus.SHIPPED: 2, OrderStatus.CANCELLED: 2}


# -- the workload ------------------------------------------------------------------------------------


@dataclass
class OpenOrder:
    order_id: UUID
    lines: dict[UUID, tuple[int, Decimal]]  # product -> quantity, unit price
    paid: bool = False

    @property
    def total(self) -> Decimal:
        return sum((quantity * price for quantity, price in self.lines.values()), Decimal(0))


@dataclass(frozen=True)
class Step:
    """One command: the events it saved, and what the read models will show once they applied it."""

    events: int
    order_id: UUID | None = None
    version: int = 0  # the order stream's version after it (order_views shows it)
    status: OrderStatus | None = None  # the order's status after it, if it set one (order_cache shows it)


class Workload:
    """The orders domain's traffic, through the real command handlers.

    ``IN_FLIGHT`` orders are open at a time; each step advances a random one (add or remove a line,
    pay, ship, cancel) or places a new one, and now and then stock arrives or a price changes. Half
    the lines are for the 50 best-selling products, the rest for any. Prices are tracked here, so
    paying needs no extra load.
    """

    def __init__(
        self,
        commands: CommandHandlers,
        rng: random.Random,
        customers: list[UUID],
        prices: dict[UUID, Decimal],
    ) -> None:
        self.commands = commands
        self.rng = rng
        self.customers = customers
        self.prices = prices
        self.products = list(prices)
        self.open: list[OpenOrder] = []

    @classmethod
    def seeded(cls, commands: CommandHandlers, rng: random.Random) -> Workload:
        customers = [
            commands.register_customer(
                {"name": f"Customer {i}", "email": f"c{i}@example.com", "address": f"{i} Bench Rd"}
            ).stream_id
            for i in range(CUSTOMERS)
        ]
        prices: dict[UUID, Decimal] = {}
        for i in range(PRODUCTS):
            price = Decimal(rng.randint(100, 20_000)) / 100
            pid = commands.create_product({"sku": f"SKU-{i:05d}", "name": f"Product {i}", "price": price})
            commands.receive_stock({"product_id": pid.stream_id, "quantity": 1_000_000})
            prices[pid.stream_id] = price
        return cls(commands, rng, customers, prices)

    def step(self) -> Step:
        rng = self.rng
        roll = rng.random()
        if roll < 0.01:
            self.commands.receive_stock({"product_id": rng.choice(self.products), "quantity": 500})
            return Step(1)
        if roll < 0.015:
            product = rng.choice(self.products)
            price = max(
                Decimal("1.00"), self.prices[product] + rng.choice((Decimal("-0.01"), Decimal("0.01")))
            )
            self.commands.change_product_price({"product_id": product, "price": price})
            self.prices[product] = price
            return Step(1)
        if len(self.open) < IN_FLIGHT:
            return self._place()
        index = rng.randrange(len(self.open))
        order = self.open[index]
        choice = rng.random()
        if order.paid:
            if choice < 0.8:
                result = self.commands.ship_order({"order_id": order.order_id})
                del self.open[index]
                return Step(1, order.order_id, result.version, OrderStatus.SHIPPED)
            if choice < 0.9:
                return self._cancel(index)
            del self.open[index]  # stays paid, never shipped
            return self.step()
        if choice < 0.12 and len(order.lines) < 4:
            product = self._product()
            if product not in order.lines:
                quantity = rng.randint(1, 3)
                result = self.commands.add_order_line(
                    {"order_id": order.order_id, "product_id": product, "quantity": quantity}
                )
                order.lines[product] = (quantity, self.prices[product])
                return Step(2, order.order_id, result.version, None)
        if choice < 0.17 and len(order.lines) > 1:
            product = rng.choice(list(order.lines))
            result = self.commands.remove_order_line({"order_id": order.order_id, "product_id": product})
            del order.lines[product]
            return Step(2, order.order_id, result.version, None)
        if choice < 0.32:
            return self._cancel(index)
        result = self.commands.pay_order({"order_id": order.order_id, "amount": order.total})
        order.paid = True
        return Step(1, order.order_id, result.version, OrderStatus.PAID)

    def _product(self) -> UUID:
        if self.rng.random() < 0.5:
            return self.products[self.rng.randrange(50)]
        return self.rng.choice(self.products)

    def _place(self) -> Step:
        rng = self.rng
        count = rng.choice((1, 2, 2, 3))
        chosen: dict[UUID, int] = {}
        while len(chosen) < count:
            chosen.setdefault(self._product(), rng.randint(1, 3))
        result = self.commands.place_order(
            {
                "customer_id": rng.choice(self.customers),
                "lines": [{"product_id": p, "quantity": q} for p, q in chosen.items()],
            }
        )
        order = OpenOrder(result.stream_id, {p: (q, self.prices[p]) for p, q in chosen.items()})
        self.open.append(order)
        return Step(1 + count, order.order_id, result.version, OrderStatus.PLACED)

    def _cancel(self, index: int) -> Step:
        order = self.open.pop(index)
        result = self.commands.cancel_order({"order_id": order.order_id, "reason": "changed mind"})
        return Step(1 + len(order.lines), order.order_id, result.version, OrderStatus.CANCELLED)


# -- filling the store and Kafka -----------------------------------------------------------------------


@dataclass
class Fill:
    """What the run wrote: the store's events by topic and type, and the catalog for the latency writer."""

    counts: Counter[str]
    types: Counter[str]
    orders: int
    customers: list[UUID]
    prices: dict[UUID, Decimal]
    end_offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> end offset


def generate(events: int, seed: int) -> tuple[list[tuple[UUID, str, int, NewEvent]], Workload, int]:
    """``events`` Order and Product events (plus the customers'), as ``save()`` would store them."""
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.popo",
        # In memory, with every aggregate cached: generating is not what is measured.
        "AGGREGATE_CACHE_MAXSIZE": "1000000",
        "AGGREGATE_CACHE_FASTFORWARD": "n",
        "SNAPSHOTTING_INTERVAL": "0",
    }
    app = OrdersApplication(env=env)
    workload = Workload.seeded(CommandHandlers(app), random.Random(seed))
    done = 2 * PRODUCTS
    orders = 0
    while done < events:
        step = workload.step()
        done += step.events
        if step.status is OrderStatus.PLACED:
            orders += 1
    rows: list[tuple[UUID, str, int, NewEvent]] = []
    start = 1
    while batch := app.recorder.select_notifications(start, 10_000):
        for n in batch:
            # The very mapping the store's eventsourcing recorder applies in save(): stream type,
            # event type (the topic), schema version and metadata as the application would store them.
            (append,) = DatalayerApplicationRecorder._appends([n])
            rows.append((append.stream_id, append.stream_type, append.expected_version + 1, append.events[0]))
        start = batch[-1].id + 1
    app.close()
    return rows, workload, orders


def publish(store: EventStore, settings: Settings, prefix: str, total: int) -> float:
    """Have the relay publish everything in the store; events/s (for information only)."""
    done = threading.Event()
    published = [0]

    def count(batch: Any) -> None:
        published[0] += len(batch)
        if published[0] >= total:
            done.set()

    relay = Relay(
        store,
        settings.kafka_config(),
        RelayConfig(name="bench", topic_prefix=prefix, partitions=PARTITIONS),
        on_published=count,
    )
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,))
    started = time.perf_counter()
    thread.start()
    try:
        if not done.wait(timeout=900):
            raise RuntimeError(f"the relay published {published[0]} of {total} in 900 s")
    finally:
        stop.set()
        thread.join()
    return total / (time.perf_counter() - started)


def end_offsets(settings: Settings, topics: list[str]) -> dict[str, int]:
    consumer = KafkaConsumer(**settings.kafka_config())
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t))]
        ends = consumer.end_offsets(partitions)
    finally:
        consumer.close()
    return {f"{tp.topic}:{tp.partition}": int(offset) for tp, offset in ends.items()}


# -- the throughput workers (each in a process of its own) ---------------------------------------------


class _TimedConsumer(ProjectionConsumer):
    """The real consumer, timed from its first batch to the batch whose checkpoints reach the end."""

    def __init__(self, *args: Any, ends: Mapping[str, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ends = {source: end for source, end in ends.items() if end > 0}
        self.reached: dict[str, int] = {}
        self.records = 0
        self.first: float | None = None
        self.last: float | None = None
        self.cpu = 0.0  # process CPU seconds from the first batch to the last
        self.stop = threading.Event()  # run()'s, once the first batch is applied

    def _apply(self, items: Any, checkpoints: dict[str, str], sink: Any, stop: Any) -> BatchOutcome:
        if self.first is None:
            self.first = time.perf_counter()
            self.cpu = -time.process_time()
        self.stop = stop
        return super()._apply(items, checkpoints, sink, stop)

    def _committed(self, batch: Any) -> None:
        # Called once the target confirmed the batch's commit (with deferred commits, after the
        # next poll): these checkpoints are stored in the target with the batch.
        super()._committed(batch)
        self.records += len(batch.items)
        for source, position in batch.checkpoints.items():
            if source in self.ends:  # the partitions' offsets, not the topics' ids beside them
                self.reached[source] = int(position)
        if self.last is None and all(self.reached.get(s, 0) >= end for s, end in self.ends.items()):
            self.last = time.perf_counter()
            self.cpu += time.process_time()
            self.stop.set()


def consumer_config(spec: Mapping[str, Any], group_id: str) -> ConsumerConfig:
    fields: dict[str, Any] = {
        "topic_prefix": spec["topic_prefix"],
        "dead_letter_prefix": spec["dlq_prefix"],
        "partitions": PARTITIONS,
        "group_id": group_id,
    }
    if spec.get("max_batch"):
        fields["max_batch"] = spec["max_batch"]
    if spec.get("fetch_wait_ms") is not None:
        fields["fetch_wait_ms"] = spec["fetch_wait_ms"]
    return ConsumerConfig(**fields)


def make_target(settings: Settings, kind: str, name: str) -> tuple[PostgresTarget | RedisTarget, Any]:
    """A target of ``order_views`` (``pg``: schema ``name``) or ``order_cache`` (``redis``: prefix)."""
    if kind == "pg":
        engine = postgres_engine(settings, pool_size=2)
        return PostgresTarget(engine, OrderViews(), schema=name), engine
    client = redis_client(settings)
    return RedisTarget(client, OrderCache(), prefix=f"dl:{{{name}}}:"), client


def worker_target(spec: dict[str, Any]) -> dict[str, Any]:
    settings = load_settings()
    target, _ = make_target(settings, spec["kind"], spec["name"])
    consumer = _TimedConsumer(
        target.projection,
        target,
        settings.kafka_config(),
        consumer_config(spec, spec["group_id"]),
        ends=spec["ends"],
    )
    stop = threading.Event()
    with profiled(spec):
        consumer.run(stop)
    if consumer.first is None or consumer.last is None:
        raise RuntimeError("the consumer stopped before reaching the end offsets")
    stored = target.checkpoints()
    short = {s: e for s, e in consumer.ends.items() if int(stored.get(s, 0)) < e}
    if short:
        raise RuntimeError(f"the target's checkpoints fall short of the end offsets: {short}")
    stats = consumer.stats
    return {
        "records": consumer.records,
        "seconds": consumer.last - consumer.first,
        "cpu_seconds": consumer.cpu,
        "applied": stats.applied,
        "duplicates": stats.duplicates,
        "dead_letters": stats.dead_letters,
        "batches": stats.batches,
    }


def worker_bare(spec: dict[str, Any]) -> dict[str, Any]:
    settings = load_settings()
    config = consumer_config(spec, spec["group_id"])
    consumer = KafkaConsumer(
        **settings.kafka_config(), group_id=spec["group_id"], **config.kafka_consumer_settings()
    )
    if spec.get("lean") and not record_unpacking.install(consumer):
        raise RuntimeError("this kafka-python does not take datalayer's record unpacking")
    ends = {source: end for source, end in spec["ends"].items() if end > 0}
    topics = sorted({source.rpartition(":")[0] for source in spec["ends"]})
    reached: dict[str, int] = {}
    records = 0
    first: float | None = None
    cpu = 0.0
    loads = orjson.loads
    with profiled(spec):
        consumer.subscribe(topics)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=config.poll_timeout_ms)
            if not polled:
                continue
            if first is None:
                first = time.perf_counter()
                cpu = -time.process_time()
            for tp, batch in polled.items():
                for record in batch:
                    loads(record.value)
                records += len(batch)
                reached[f"{tp.topic}:{tp.partition}"] = batch[-1].offset + 1
            if all(reached.get(source, 0) >= end for source, end in ends.items()):
                break
        last = time.perf_counter()
        cpu += time.process_time()
    consumer.close(autocommit=False)
    if first is None or not all(reached.get(source, 0) >= end for source, end in ends.items()):
        raise RuntimeError("the bare consumer did not reach the end offsets in 600 s")
    return {"records": records, "seconds": last - first, "cpu_seconds": cpu}


@contextlib.contextmanager
def profiled(spec: Mapping[str, Any]) -> Iterator[None]:
    """cProfile around the measured part when ``--profile DIR`` was given (it slows everything down)."""
    path = spec.get("profile")
    if not path:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(path)


# -- the latency workers ----------------------------------------------------------------------------


def worker_relay(spec: dict[str, Any]) -> None:
    """The relay, as a service runs it: its own process, default settings, until SIGTERM."""
    settings = load_settings()
    store = EventStore.connect(
        settings.psycopg_url(),
        schema=spec["schema"],
        max_size=4,
        connect_kwargs=settings.postgres_connect_kwargs(),
    )
    relay = Relay(
        store,
        settings.kafka_config(),
        RelayConfig(name="bench", topic_prefix=spec["topic_prefix"], partitions=PARTITIONS),
    )
    run_until_terminated(relay.run)
    store.close()


def worker_follow(spec: dict[str, Any]) -> None:
    """A projection consumer, as a service runs it: its own process, default settings, until SIGTERM."""
    settings = load_settings()
    target, _ = make_target(settings, spec["kind"], spec["name"])
    consumer = ProjectionConsumer(
        target.projection, target, settings.kafka_config(), consumer_config(spec, spec["group_id"])
    )
    run_until_terminated(consumer.run)


def run_until_terminated(run: Callable[[threading.Event], None]) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run(stop)


def worker_writer(spec: dict[str, Any]) -> None:
    """Commands paced to ``rate`` events/s for ``seconds``; prints ``order version status time`` per sample.

    The time is taken as the command handler returns, i.e. right after ``save()`` committed.
    """
    settings = load_settings()
    env = {
        **settings.eventsourcing_env(spec["schema"]),
        # A service's cache of its aggregates: the imported history has no snapshots, and loading a
        # product's few hundred events for every command would pace the writer, not the pipeline.
        # This writer is the only one, so cached aggregates are current without fast-forwarding.
        "AGGREGATE_CACHE_MAXSIZE": "100000",
        "AGGREGATE_CACHE_FASTFORWARD": "n",
    }
    app = OrdersApplication(env=env)
    # Loaded into the cache before the clock starts; the prices are the store's, whatever ran before.
    prices = {product.id: product.price for product in map(app.get_product, map(UUID, spec["products"]))}
    workload = Workload(
        CommandHandlers(app), random.Random(spec["seed"]), [UUID(c) for c in spec["customers"]], prices
    )
    rate, seconds = float(spec["rate"]), float(spec["seconds"])
    out = sys.stdout
    pause = threading.Event()
    commands = events = order_commands = 0
    started = time.perf_counter()
    deadline = started
    end = started + seconds
    while deadline < end:
        ahead = deadline - time.perf_counter()
        if ahead > 0:
            pause.wait(ahead)  # pacing the workload, not waiting for a result
        step = workload.step()
        saved_at = time.time()
        commands += 1
        events += step.events
        deadline += step.events / rate
        if step.order_id is not None:
            order_commands += 1
            if order_commands % SAMPLE_EVERY == 0:
                status = step.status.value if step.status is not None else "-"
                out.write(f"{step.order_id} {step.version} {status} {saved_at!r}\n")
                out.flush()
    elapsed = time.perf_counter() - started
    out.write(f"done {commands} {events} {elapsed!r}\n")
    out.flush()
    app.close()


# -- observing the read models ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    order_id: UUID
    version: int
    status: OrderStatus | None
    saved_at: float


class Observer(threading.Thread):
    """Repeats its query for every pending sample each millisecond; notes when each shows the change.

    One query per pending sample per poll (the measurement of earlier sessions), each on the machine
    that also runs the relay, both consumers, the writer and the servers. :class:`BatchedObserver`
    asks the same question of all pending samples in one query per poll.
    """

    def __init__(self, name: str, shows: Callable[[Sample], bool]) -> None:
        super().__init__(name=name, daemon=True)
        self.shows = shows
        self.inbox: queue.Queue[Sample | None] = queue.Queue()
        self.latencies: list[float] = []
        self.missed = 0

    def run(self) -> None:
        pending: list[Sample] = []
        closing = False
        while not (closing and not pending):
            if not pending and not closing:
                item = self.inbox.get()
                if item is None:
                    closing = True
                else:
                    pending.append(item)
            while True:
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                else:
                    pending.append(item)
            pending = self.poll(pending)
            if pending:
                self.pause()

    def pause(self) -> None:
        time.sleep(POLL_S)

    def poll(self, pending: list[Sample]) -> list[Sample]:
        """Query each pending sample; note the ones that show; return the others."""
        still: list[Sample] = []
        for sample in pending:
            if self.shows(sample):
                self.latencies.append(max(0.0, time.time() - sample.saved_at) * 1000)
            elif time.time() - sample.saved_at > 30:
                self.missed += 1
            else:
                still.append(sample)
        return still


class BatchedObserver(Observer):
    """:class:`Observer` with one query per poll for all pending samples (``shown`` gives the ones
    that show). The latency is the same: from ``save()`` returning to a query seeing the change,
    taken as that query returns, polled every ``POLL_S``."""

    def __init__(self, name: str, shown: Callable[[list[Sample]], list[bool]]) -> None:
        super().__init__(name, lambda sample: shown([sample])[0])
        self.shown = shown

    def poll(self, pending: list[Sample]) -> list[Sample]:
        if not pending:
            return pending
        answers = self.shown(pending)
        now = time.time()
        still: list[Sample] = []
        for sample, shows in zip(pending, answers, strict=True):
            if shows:
                self.latencies.append(max(0.0, now - sample.saved_at) * 1000)
            elif now - sample.saved_at > 30:
                self.missed += 1
            else:
                still.append(sample)
        return still


class SignalledObserver(BatchedObserver):
    """:class:`BatchedObserver` that asks again when a batch commits into its read model (the commit
    signal read-your-writes waits use, ``projections.commit_signal``) instead of every ``POLL_S``:
    what ``wait_until_applied`` does, observed for every sample; a query at least every 0.25 s."""

    def __init__(self, name: str, shown: Callable[[list[Sample]], list[bool]], signal: CommitSignal) -> None:
        super().__init__(name, shown)
        self.signal = signal
        self.seen = signal.count()

    def poll(self, pending: list[Sample]) -> list[Sample]:
        self.seen = self.signal.count()  # before the query: a commit after it ends the pause at once
        return super().poll(pending)

    def pause(self) -> None:
        self.signal.wait(self.seen, 0.25)


@dataclass
class LatencyRun:
    """One writer run's latencies (ms) per read model, with one way of observing them."""

    observer: str  # "batched", "per-sample" or "signalled"
    pg_ms: list[float]
    redis_ms: list[float]
    achieved: dict[str, Any]


def latency(
    settings: Settings,
    engine: Engine,
    client: redis.Redis,
    names: Names,
    fill: Fill,
    rate: float,
    seconds: float,
    observers: list[str],
    fetch_wait_ms: int | None = None,
    warmup_seconds: float = 0.0,
) -> list[LatencyRun]:
    """PostgreSQL and Redis latencies (ms) of the sampled commands, and what the writer achieved,
    once per way of observing in ``observers``: one writer run after the other, same workload seed,
    with the relay and the consumers running throughout."""
    views = PostgresTarget(engine, OrderViews(), schema=names.latency_views)
    cache = RedisTarget(client, OrderCache(), prefix=f"dl:{{{names.latency_cache}}}:")
    base = {
        "topic_prefix": names.topic_prefix,
        "dlq_prefix": names.dlq_prefix,
        "fetch_wait_ms": fetch_wait_ms,
    }
    processes: list[subprocess.Popen[str]] = []
    stack = contextlib.ExitStack()
    try:
        processes.append(spawn("relay", {"schema": names.store, **base}))
        processes.append(
            spawn(
                "follow", {**base, "kind": "pg", "name": names.latency_views, "group_id": names.group("lv")}
            )
        )
        processes.append(
            spawn(
                "follow",
                {**base, "kind": "redis", "name": names.latency_cache, "group_id": names.group("lc")},
            )
        )
        started = time.monotonic()
        for target in (views, cache):
            caught_up(target, fill.end_offsets, processes)
        print(f"  read models caught up on the history in {time.monotonic() - started:.0f} s", flush=True)
        settle(engine, names, vacuum=(names.store, names.latency_views))
        queries = OrderQueries(engine, schema=names.latency_views)
        statuses = OrderCacheQueries(client, prefix=cache.prefix)
        # One statement whatever the number of ids (= ANY of an array), compiled once.
        versions_of = select(order_summaries.c.order_id, order_summaries.c.version).where(
            order_summaries.c.order_id == any_(bindparam("ids", type_=ARRAY(Uuid)))
        )
        status_key = cache.key("order_status")
        # The batched PostgreSQL observer's own connection, kept for the whole run.
        observing = stack.enter_context(engine.connect())
        observing.execution_options(schema_translate_map={None: names.latency_views})

        def pg_shows(sample: Sample) -> bool:
            summary = queries.get_order(sample.order_id)
            return summary is not None and summary.version >= sample.version

        def redis_shows(sample: Sample) -> bool:
            assert sample.status is not None
            status = statuses.order_status(sample.order_id)
            return status is not None and STATUS_RANK[status] >= STATUS_RANK[sample.status]

        def pg_shown(samples: list[Sample]) -> list[bool]:
            rows = observing.execute(versions_of, {"ids": list({s.order_id for s in samples})})
            versions = {order_id: version for order_id, version in rows}
            observing.rollback()  # nothing held open between polls
            return [versions.get(s.order_id, 0) >= s.version for s in samples]

        def redis_shown(samples: list[Sample]) -> list[bool]:
            values: list[Any] = client.hmget(status_key, [str(s.order_id) for s in samples])
            return [
                value is not None and STATUS_RANK[OrderStatus(value.decode())] >= STATUS_RANK[sample.status]  # type: ignore[index]
                for sample, value in zip(samples, values, strict=True)
            ]

        watched = {"relay": processes[0], "pg_consumer": processes[1], "redis_consumer": processes[2]}
        if warmup_seconds > 0:
            observe(names, fill, rate, warmup_seconds, {}, watched)
            print(f"  warmed up: the writer ran {warmup_seconds:g} s unobserved", flush=True)
        runs: list[LatencyRun] = []
        for way in observers:
            if way == "batched":
                pair: dict[str, Observer] = {
                    "pg": BatchedObserver("pg", pg_shown),
                    "redis": BatchedObserver("redis", redis_shown),
                }
            elif way == "signalled":
                signals = (views.commit_signal(), cache.commit_signal())
                for one in signals:
                    listening_by = time.monotonic() + 30
                    while not one.listening and time.monotonic() < listening_by:
                        one.wait(one.count(), 0.1)  # a listener's connection wakes its signals
                pair = {
                    "pg": SignalledObserver("pg", pg_shown, signals[0]),
                    "redis": SignalledObserver("redis", redis_shown, signals[1]),
                }
            else:
                pair = {"pg": Observer("pg", pg_shows), "redis": Observer("redis", redis_shows)}
            achieved = observe(names, fill, rate, seconds, pair, watched)
            runs.append(LatencyRun(way, pair["pg"].latencies, pair["redis"].latencies, achieved))
        return runs
    finally:
        stack.close()
        for process in processes:
            stop_process(process)
        views.drop()
        cache.drop()


def observe(
    names: Names,
    fill: Fill,
    rate: float,
    seconds: float,
    observers: dict[str, Observer],
    watched: Mapping[str, subprocess.Popen[str]],
) -> dict[str, Any]:
    """One writer run, its samples handed to ``observers`` (``pg``, ``redis``); what the writer
    achieved, and the cores the ``watched`` processes (relay, consumers) used meanwhile."""
    for observer in observers.values():
        observer.start()
    spec = {
        "schema": names.store,
        "rate": rate,
        "seconds": seconds,
        "seed": 7,
        "customers": [str(c) for c in fill.customers],
        "products": [str(p) for p in fill.prices],
    }
    writer = spawn("writer", spec, stdout=True)
    assert writer.stdout is not None
    achieved: dict[str, Any] = {}
    # CPU of this process while the writer runs (the observers, mostly): what measuring costs the
    # machine, beside the servers' share of the queries.
    cpu = time.process_time()
    # Theirs too: at a steady low rate each process's cost per wake-up, not per event, dominates,
    # and the machine's spare CPU is what keeps the latency's tail short.
    started = {name: process_cpu_s(process.pid) for name, process in watched.items()}
    for line in writer.stdout:
        parts = line.split()
        if parts[0] == "done":
            achieved = {"commands": int(parts[1]), "events": int(parts[2]), "seconds": float(parts[3])}
            achieved["observer_cores"] = (time.process_time() - cpu) / achieved["seconds"]
            achieved["process_cores"] = {
                name: round((process_cpu_s(process.pid) - started[name]) / achieved["seconds"], 2)
                for name, process in watched.items()
            }
            continue
        status = None if parts[2] == "-" else OrderStatus(parts[2])
        if not observers:
            continue  # a warm-up: nobody observes
        sample = Sample(UUID(parts[0]), int(parts[1]), status, float(parts[3]))
        observers["pg"].inbox.put(sample)
        if status is not None:
            observers["redis"].inbox.put(sample)
    if writer.wait(timeout=120) != 0:
        raise RuntimeError(f"the writer failed: {writer.stderr.read() if writer.stderr else ''}")
    for observer in observers.values():
        observer.inbox.put(None)
    for observer in observers.values():
        observer.join(timeout=60)
        if observer.missed:
            raise RuntimeError(f"{observer.missed} samples never showed in the {observer.name} read model")
    return achieved


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) process ``pid`` has used so far, from ``/proc``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def caught_up(target: PostgresTarget | RedisTarget, ends: Mapping[str, int], processes: list[Any]) -> None:
    topics = {topic_for("", t) for t in target.projection.stream_types}
    wanted = {s: e for s, e in ends.items() if e > 0 and s.rpartition(":")[0].rpartition(".")[2] in topics}
    give_up = time.monotonic() + 900
    while time.monotonic() < give_up:
        with contextlib.suppress(Exception):  # the schema may not exist until the consumer set it up
            stored = target.checkpoints()
            if all(int(stored.get(s, 0)) >= e for s, e in wanted.items()):
                return
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"a latency process exited: {process.stderr.read() if process.stderr else ''}"
                )
        time.sleep(0.5)
    raise RuntimeError(f"{target.projection.name} did not catch up in 900 s")


# -- processes -------------------------------------------------------------------------------------


def spawn(kind: str, spec: dict[str, Any], *, stdout: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)],
        stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_process(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one throughput worker to completion; its result (the last line it prints)."""
    done = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- names, settling, cleaning up ---------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    run: str

    @property
    def store(self) -> str:
        return f"bench_proj_{self.run}"

    @property
    def topic_prefix(self) -> str:
        return f"bench.{self.run}.events."

    @property
    def dlq_prefix(self) -> str:
        return f"bench.{self.run}.dlq."

    @property
    def latency_views(self) -> str:
        return f"bench_proj_{self.run}_lv"

    @property
    def latency_cache(self) -> str:
        return f"bench_proj_{self.run}_lc"

    def group(self, what: str) -> str:
        return f"bench.{self.run}.{what}"

    def target(self, kind: str, round_no: int) -> str:
        return f"bench_proj_{self.run}_{kind}{round_no}"


def settle(engine: Engine, names: Names, vacuum: tuple[str, ...] = ()) -> None:
    """Let PostgreSQL finish the upkeep earlier writes caused (statistics, autovacuum) before measuring.

    ``vacuum`` names schemas whose tables are vacuumed now (before the latency run: the read models
    just caught up on the whole history), rather than by an autovacuum worker in the middle of it.
    """
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for schema in vacuum:
            tables = conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = %(s)s", {"s": schema}
            ).scalars()
            for table in list(tables):
                conn.exec_driver_sql(f'VACUUM (ANALYZE) "{schema}"."{table}"')
        conn.exec_driver_sql(f'ANALYZE "{names.store}".events')
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up:
            busy = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
            ).scalar()
            if not busy:
                break
            time.sleep(0.5)
    gc.collect()


def cleanup(settings: Settings, client: redis.Redis, names: Names, groups: list[str]) -> None:
    with psycopg.connect(
        settings.psycopg_url(), autocommit=True, **settings.postgres_connect_kwargs()
    ) as conn:
        schemas = [
            row[0]
            for row in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (f"bench_proj_{names.run}%",)
            )
        ]
        for schema in schemas:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    for key in client.scan_iter(match=f"dl:{{bench_proj_{names.run}*", count=1000):
        client.unlink(key)
    admin = KafkaAdminClient(**settings.kafka_config())
    try:
        mine = [t for t in admin.list_topics() if t.startswith(f"bench.{names.run}.")]
        if mine:
            admin.delete_topics(mine)
        with contextlib.suppress(KafkaError):  # best effort: a group still closing is left behind
            existing = {g["group_id"] for g in admin.list_groups()}
            if gone := [g for g in groups if g in existing]:
                admin.delete_groups(gone)
    finally:
        admin.close()


def kafka_crc32c() -> str:
    """Which CRC-32C kafka-python checks fetched record batches with: ``c`` (the crc32c package) or
    ``python``. It decides the ceiling: the pure-Python one costs several times all the rest of a
    bare consumer's work, so the same consumers show far higher ratios against it."""
    from kafka.record import util

    return "c" if getattr(util, "crc32c_c", None) is not None else "python"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- main ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings()
    names = Names(uuid.uuid4().hex[:8])
    engine = postgres_engine(settings, pool_size=4)
    client = redis_client(settings)
    store = EventStore.connect(
        settings.psycopg_url(),
        schema=names.store,
        max_size=4,
        connect_kwargs=settings.postgres_connect_kwargs(),
    )
    groups: list[str] = []
    try:
        store.migrate()
        started = time.perf_counter()
        rows, workload, orders = generate(args.events, seed=1)
        fill = Fill(
            counts=Counter(row[1] for row in rows),
            types=Counter(row[3].event_type.rpartition(".")[2] for row in rows if row[1] != "Customer"),
            orders=orders,
            customers=workload.customers,
            prices=workload.prices,
        )
        for chunk in range(0, len(rows), 20_000):
            store.import_events(rows[chunk : chunk + 20_000])
        total = len(rows)
        del rows
        print(
            f"{fill.counts[ORDER] + fill.counts[PRODUCT]:,} events on the consumed topics "
            f"({fill.counts[ORDER]:,} Order, {fill.counts[PRODUCT]:,} Product; {fill.orders:,} orders, "
            f"{PRODUCTS:,} products) plus {fill.counts['Customer']:,} Customer events; generated and "
            f"imported in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        print("  " + ", ".join(f"{name} {count:,}" for name, count in fill.types.most_common()), flush=True)
        relay_rate = publish(store, settings, names.topic_prefix, total)
        order_topic = topic_for(names.topic_prefix, ORDER)
        product_topic = topic_for(names.topic_prefix, PRODUCT)
        fill.end_offsets = end_offsets(settings, [order_topic, product_topic])
        on_order = {s: e for s, e in fill.end_offsets.items() if s.startswith(order_topic + ":")}
        if sum(fill.end_offsets.values()) != fill.counts[ORDER] + fill.counts[PRODUCT]:
            raise RuntimeError(
                f"Kafka holds {sum(fill.end_offsets.values())} records, expected more or fewer"
            )
        print(
            f"published by the relay at {relay_rate:,.0f} events/s; {args.rounds} rounds each; "
            f"kafka-python checks CRC-32C in {'C' if kafka_crc32c() == 'c' else 'pure Python'}",
            flush=True,
        )

        base = {
            "topic_prefix": names.topic_prefix,
            "dlq_prefix": names.dlq_prefix,
            "max_batch": args.max_batch,
            "fetch_wait_ms": args.fetch_wait_ms,
        }
        rates: dict[str, list[float]] = {
            "pg": [],
            "redis": [],
            "bare_order": [],
            "bare": [],
            "bare_lean_order": [],
            "bare_lean": [],
        }
        labels = {
            "pg": "PostgreSQL (Order)",
            "redis": "Redis (Order+Product)",
            "bare_order": "bare (Order)",
            "bare": "bare (Order+Product)",
            "bare_lean_order": "bare lean (Order)",
            "bare_lean": "bare lean (Order+Product)",
        }
        # Process CPU per record of each worker, from its first batch to its last: what a loaded
        # machine disturbs least (informative; the targets are the rates' ratios).
        cpu_us: dict[str, list[float]] = {kind: [] for kind in rates}
        order = list(rates)
        for round_no in range(1, args.rounds + 1):
            for kind in order[round_no - 1 :] + order[: round_no - 1]:
                group = names.group(f"{kind}{round_no}")
                groups.append(group)
                spec: dict[str, Any] = {**base, "group_id": group}
                if args.profile:
                    spec["profile"] = str(Path(args.profile) / f"{kind}-r{round_no}.prof")
                settle(engine, names)
                if kind.startswith("bare"):
                    spec["ends"] = on_order if kind.endswith("_order") else fill.end_offsets
                    spec["lean"] = kind.startswith("bare_lean")
                    result = measure("bare", spec)
                else:
                    spec.update(kind=kind, name=names.target(kind, round_no))
                    spec["ends"] = on_order if kind == "pg" else fill.end_offsets
                    result = measure("target", spec)
                    check_round(engine, client, kind, spec["name"], fill, result)
                rate = result["records"] / result["seconds"]
                rates[kind].append(rate)
                cpu_us[kind].append(result["cpu_seconds"] / result["records"] * 1e6)
                print(
                    f"  round {round_no}: {labels[kind]:<22} {rate:>9,.0f} events/s "
                    f"({result['records']:,} in {result['seconds']:.2f} s; "
                    f"{cpu_us[kind][-1]:.1f} µs of process CPU each)",
                    flush=True,
                )
        medians = {kind: statistics.median(values) for kind, values in rates.items()}

        print(f"latency: {args.latency_rate:g} events/s for {args.latency_seconds:g} s", flush=True)
        groups += [names.group("lv"), names.group("lc")]
        runs = latency(
            settings,
            engine,
            client,
            names,
            fill,
            args.latency_rate,
            args.latency_seconds,
            args.observers,
            args.fetch_wait_ms,
            args.warmup_seconds,
        )
    finally:
        store.close()
        cleanup(settings, client, names, groups)
        engine.dispose()

    def p(values: list[float], q: float) -> float:
        return round(percentile(values, q), 2)

    def figures_of(one: LatencyRun) -> dict[str, Any]:
        return {
            "latency_p50_ms": max(p(one.pg_ms, 0.5), p(one.redis_ms, 0.5)),
            "latency_p99_ms": max(p(one.pg_ms, 0.99), p(one.redis_ms, 0.99)),
            "latency_pg_ms": {"p50": p(one.pg_ms, 0.5), "p99": p(one.pg_ms, 0.99), "samples": len(one.pg_ms)},
            "latency_redis_ms": {
                "p50": p(one.redis_ms, 0.5),
                "p99": p(one.redis_ms, 0.99),
                "samples": len(one.redis_ms),
            },
            "latency_events_per_s": round(one.achieved["events"] / one.achieved["seconds"], 1),
            "latency_observer_cores": round(one.achieved["observer_cores"], 2),
            "latency_process_cores": one.achieved["process_cores"],
        }

    # The headline latency is the batched observer's when it ran (see Observer), the other one's
    # figures beside it under its name.
    headline = next((one for one in runs if one.observer == "batched"), runs[0])
    main = figures_of(headline)
    figures: dict[str, Any] = {
        "pg_events_per_s": round(medians["pg"], 1),
        "redis_events_per_s": round(medians["redis"], 1),
        "bare_consumer_per_s": round(medians["bare"], 1),
        "pg_ratio": round(medians["pg"] / medians["bare_order"], 3),
        "redis_ratio": round(medians["redis"] / medians["bare"], 3),
        "latency_p50_ms": main["latency_p50_ms"],
        "latency_p99_ms": main["latency_p99_ms"],
        "latency_basis": "worse of the PostgreSQL and Redis read models",
        "latency_observer": headline.observer,
        "bare_order_topic_per_s": round(medians["bare_order"], 1),
        "bare_lean_per_s": round(medians["bare_lean"], 1),
        "bare_lean_order_topic_per_s": round(medians["bare_lean_order"], 1),
        "pg_ratio_lean": round(medians["pg"] / medians["bare_lean_order"], 3),
        "redis_ratio_lean": round(medians["redis"] / medians["bare_lean"], 3),
        "latency_pg_ms": main["latency_pg_ms"],
        "latency_redis_ms": main["latency_redis_ms"],
        "latency_events_per_s": main["latency_events_per_s"],
        "latency_observer_cores": main["latency_observer_cores"],
        "latency_process_cores": main["latency_process_cores"],
        "fetch_wait_ms": ConsumerConfig().fetch_wait_ms if args.fetch_wait_ms is None else args.fetch_wait_ms,
        "latency_warmup_s": args.warmup_seconds,
        "kafka_crc32c": kafka_crc32c(),
        "cpu_us_per_record": {kind: round(statistics.median(values), 2) for kind, values in cpu_us.items()},
    }
    for one in runs:
        if one is not headline:
            figures[f"latency_{one.observer.replace('-', '_')}_observer"] = figures_of(one)
    report(figures, args)
    return figures


def check_round(
    engine: Engine, client: redis.Redis, kind: str, name: str, fill: Fill, result: Mapping[str, Any]
) -> None:
    """The read model holds every order, nothing was dead-lettered; then it is dropped."""
    if result["dead_letters"] or result["duplicates"]:
        raise RuntimeError(
            f"{kind}: {result['dead_letters']} dead letters, {result['duplicates']} duplicates"
        )
    if kind == "pg":
        target = PostgresTarget(engine, OrderViews(), schema=name)
        with engine.connect().execution_options(schema_translate_map={None: name}) as conn:
            seen = conn.execute(select(func.count()).select_from(order_summaries)).scalar()
    else:
        target = RedisTarget(client, OrderCache(), prefix=f"dl:{{{name}}}:")
        seen = client.hlen(target.key("order_status"))
    target.drop()
    if seen != fill.orders:
        raise RuntimeError(f"{kind}: the read model holds {seen} orders, expected {fill.orders}")


def report(figures: dict[str, Any], args: argparse.Namespace) -> None:
    rows = [
        ("(a) PostgreSQL order_views, Order topic", f"{figures['pg_events_per_s']:,.0f} events/s"),
        ("(b) Redis order_cache, Order+Product", f"{figures['redis_events_per_s']:,.0f} events/s"),
        ("(c) bare consumer, Order topic", f"{figures['bare_order_topic_per_s']:,.0f} records/s"),
        ("(c) bare consumer, Order+Product", f"{figures['bare_consumer_per_s']:,.0f} records/s"),
        ("    a / c (Order)", f"{figures['pg_ratio']:.3f}"),
        ("    b / c (Order+Product)", f"{figures['redis_ratio']:.3f}"),
        (
            "(c') bare consumer, lean unpacking, Order",
            f"{figures['bare_lean_order_topic_per_s']:,.0f} records/s",
        ),
        ("(c') bare, lean unpacking, Order+Product", f"{figures['bare_lean_per_s']:,.0f} records/s"),
        (
            "    a / c' (Order); b / c' (Order+Product)",
            f"{figures['pg_ratio_lean']:.3f}; {figures['redis_ratio_lean']:.3f}",
        ),
        (
            "(d) latency save() -> PostgreSQL query, p50/p99",
            f"{figures['latency_pg_ms']['p50']:.1f} / {figures['latency_pg_ms']['p99']:.1f} ms",
        ),
        (
            "(d) latency save() -> Redis query, p50/p99",
            f"{figures['latency_redis_ms']['p50']:.1f} / {figures['latency_redis_ms']['p99']:.1f} ms",
        ),
        (
            f"    at {figures['latency_events_per_s']:,.0f} events/s, samples",
            f"{figures['latency_pg_ms']['samples']} + {figures['latency_redis_ms']['samples']}",
        ),
        (
            "    observed; observing process cores",
            f"{figures['latency_observer']}; {figures['latency_observer_cores']:.2f}",
        ),
        (
            "    cores of the relay / PostgreSQL / Redis consumer",
            " / ".join(
                f"{figures['latency_process_cores'][name]:.2f}"
                for name in ("relay", "pg_consumer", "redis_consumer")
            ),
        ),
    ]
    for key, other in figures.items():
        if key.startswith("latency_") and key.endswith("_observer") and isinstance(other, dict):
            way = key.removeprefix("latency_").removesuffix("_observer").replace("_", "-")
            rows.append(
                (
                    f"(d) the same observed {way}: PostgreSQL / Redis p99",
                    f"{other['latency_pg_ms']['p99']:.1f} / {other['latency_redis_ms']['p99']:.1f} ms",
                )
            )
            rows.append(
                (
                    f"    {way}: at events/s, observing process cores",
                    f"{other['latency_events_per_s']:,.0f}, {other['latency_observer_cores']:.2f}",
                )
            )
    width = max(len(label) for label, _ in rows)
    print()
    print(f"{'measurement (median of ' + str(args.rounds) + ' rounds)':<{width}}  value")
    print("-" * (width + 24))
    for label, value in rows:
        print(f"{label:<{width}}  {value:>20}")
    print()
    for label, met in (
        (f"PostgreSQL / bare >= {TARGET_PG_RATIO}", figures["pg_ratio"] >= TARGET_PG_RATIO),
        (f"Redis / bare >= {TARGET_REDIS_RATIO}", figures["redis_ratio"] >= TARGET_REDIS_RATIO),
        (f"p99 <= {TARGET_P99_MS:.0f} ms (worse read model)", figures["latency_p99_ms"] <= TARGET_P99_MS),
    ):
        print(f"target {label}: {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=EVENTS, help="events on the consumed topics")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--latency-rate", type=float, default=LATENCY_RATE, help="events/s")
    parser.add_argument("--latency-seconds", type=float, default=LATENCY_SECONDS)
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=WARMUP_SECONDS,
        help="the writer's unobserved run before the observed ones (0: none, as until session 11)",
    )
    parser.add_argument(
        "--max-batch", type=int, default=None, help="ConsumerConfig.max_batch (default: its own)"
    )
    parser.add_argument(
        "--fetch-wait-ms",
        type=int,
        default=None,
        help="ConsumerConfig.fetch_wait_ms of every consumer, the latency run's too (default: its own)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 20,000 events, 1 round, 10 s latency"
    )
    parser.add_argument("--profile", metavar="DIR", help="cProfile each throughput worker into DIR")
    parser.add_argument(
        "--observers",
        type=lambda text: [way.strip() for way in text.split(",") if way.strip()],
        default=["batched", "per-sample", "signalled"],
        help="latency runs, one after the other, by how the read models are polled: batched (one "
        "query per poll for all pending samples; the headline figures), per-sample (one query per "
        "sample per poll, as before) and signalled (batched, asking again when a batch commits, as "
        "read-your-writes waits do); default: batched,per-sample,signalled",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.observers or set(args.observers) - {"batched", "per-sample", "signalled"}:
        parser.error("--observers: a comma-separated list of batched, per-sample and signalled")
    if args.worker:
        spec = json.loads(args.spec)
        if args.worker == "target":
            print(json.dumps(worker_target(spec)))
        elif args.worker == "bare":
            print(json.dumps(worker_bare(spec)))
        elif args.worker == "relay":
            worker_relay(spec)
        elif args.worker == "follow":
            worker_follow(spec)
        elif args.worker == "writer":
            worker_writer(spec)
        return
    if args.quick:  # smaller defaults; sizes given explicitly still win
        args.events = 20_000 if args.events == EVENTS else args.events
        args.rounds = 1 if args.rounds == ROUNDS else args.rounds
        args.latency_seconds = 10.0 if args.latency_seconds == LATENCY_SECONDS else args.latency_seconds
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    figures = run(args)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
