"""A whole pipeline for one test: store schema, relay, topic prefix, read-model schema and key prefix.

Everything is named uniquely, so tests run in any order and alongside each other; ``close()``
stops what it started and drops what it created.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import redis
import sqlalchemy.exc
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from sqlalchemy import Engine, MetaData, select

from consumers.runtime import ConsumerConfig, ProjectionConsumer
from datalayer.settings import Settings
from domain import CommandHandlers, OrdersApplication
from eventstore import EventStore
from eventstore.records import LOG_START
from eventstore.relay import Relay, RelayConfig
from projections.orders import OrderCache, OrderViews
from projections.projection import Projection
from projections.replay import replay
from projections.targets import PostgresTarget, RedisTarget
from tests.helpers import polled_records, unique_name, wait_until

ROOT = Path(__file__).resolve().parents[1]


class Pipeline:
    """Write side, relay and read side of the orders domain, isolated by unique names."""

    def __init__(self, settings: Settings, store: EventStore, engine: Engine, client: redis.Redis) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.redis = client
        self.name = unique_name("pl")
        self.topic_prefix = f"{self.name}.events."
        self.dlq_prefix = f"{self.name}.dlq."
        self.app = OrdersApplication(env=settings.eventsourcing_env(store.schema))
        self.commands = CommandHandlers(self.app)
        self.views_schema = f"{self.name}_views"
        self.cache_prefix = f"dl:{{{self.name}_cache}}:"
        self.views = PostgresTarget(engine, OrderViews(), schema=self.views_schema)
        self.cache = RedisTarget(client, OrderCache(), prefix=self.cache_prefix)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self._replays: list[PostgresTarget | RedisTarget] = []
        self.relay: Relay | None = None

    # -- running parts -----------------------------------------------------------------------

    def consumer_config(self, **overrides: Any) -> ConsumerConfig:
        fields: dict[str, Any] = {
            "topic_prefix": self.topic_prefix,
            "dead_letter_prefix": self.dlq_prefix,
            "partitions": 6,
            "max_batch": 200,
        }
        fields.update(overrides)
        return ConsumerConfig(**fields)

    def start_relay(self) -> Relay:
        config = RelayConfig(
            name=self.name, topic_prefix=self.topic_prefix, batch_size=500, poll_interval=0.1
        )
        self.relay = Relay(self.store, self.settings.kafka_config(), config)
        self._thread(self.relay.run)
        wait_until(self.relay.is_active.is_set, what="the relay to become active")
        return self.relay

    def group_id(self, which: str) -> str:
        """The consumer group of this pipeline's ``views`` or ``cache`` (or another projection)."""
        return f"{self.name}.{which}"

    def start_consumer(self, target: PostgresTarget | RedisTarget, **config: Any) -> ProjectionConsumer:
        """A consumer in a thread of this process (stopped by :meth:`close`)."""
        config.setdefault("group_id", self.group_id(target.projection.name))
        consumer = ProjectionConsumer(
            target.projection, target, self.settings.kafka_config(), self.consumer_config(**config)
        )
        self._thread(consumer.run)
        wait_until(consumer.running.is_set, what="the consumer to start")
        return consumer

    def spawn_consumer(self, which: str) -> subprocess.Popen[bytes]:
        """A consumer in a process of its own (``views`` or ``cache``), to kill -9 or to rebalance."""
        args = [sys.executable, "-m", "tests.consumer_process", which, self.name, self.views_schema]
        args.append(self.cache_prefix)
        proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ), stderr=subprocess.PIPE)
        self._processes.append(proc)
        return proc

    def _thread(self, run: Any) -> None:
        thread = threading.Thread(target=run, args=(self._stop,), daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- checking ----------------------------------------------------------------------------

    def wait_caught_up(self, target: PostgresTarget | RedisTarget, timeout: float = 60.0) -> None:
        """Until the target has applied every stream it consumes at the store's current version."""
        wanted = self.stream_versions(target.projection)

        def caught_up() -> bool:
            try:
                return all((target.applied_version(s) or 0) >= v for s, v in wanted.items())
            except sqlalchemy.exc.OperationalError:
                return False  # a pooled connection cut by a server restart; the next try reconnects

        wait_until(caught_up, timeout=timeout, what=f"{target.projection.name} to catch up")

    def stream_versions(self, projection: Projection[Any]) -> dict[str, int]:
        versions: dict[str, int] = {}
        position = LOG_START
        while True:
            events = self.store.read_all(after=position, limit=10_000)
            if not events:
                return versions
            for e in events:
                if e.stream_type in projection.stream_types:
                    versions[str(e.stream_id)] = e.stream_version
            position = events[-1].log_position

    def fresh_replay(self, target: PostgresTarget | RedisTarget) -> PostgresTarget | RedisTarget:
        """The same projection replayed from the store into a new schema or prefix of its own."""
        fresh: PostgresTarget | RedisTarget
        name = unique_name("fresh")
        if isinstance(target, PostgresTarget):
            fresh = PostgresTarget(self.engine, type(target.projection)(), schema=name)
        else:
            fresh = RedisTarget(self.redis, type(target.projection)(), prefix=f"dl:{{{name}}}:")
        self._replays.append(fresh)
        fresh.setup()
        replay(fresh.projection, fresh, self.store)
        return fresh

    def read_model(self, target: PostgresTarget | RedisTarget) -> dict[str, Any]:
        """Everything the read model holds, bookkeeping aside, in a comparable form."""
        if isinstance(target, PostgresTarget):
            return pg_contents(self.engine, target)
        return redis_contents(self.redis, target.prefix)

    # -- writing -----------------------------------------------------------------------------

    def seed_catalog(self, products: int = 4, stock: int = 1_000_000) -> tuple[UUID, list[UUID]]:
        customer = self.commands.register_customer(
            {"name": "Ada", "email": "ada@example.com", "address": "1 Loop Rd"}
        ).stream_id
        ids = []
        for i in range(products):
            pid = self.commands.create_product(
                {"sku": f"SKU-{i}", "name": f"Product {i}", "price": Decimal("2.50") + i}
            ).stream_id
            self.commands.receive_stock({"product_id": pid, "quantity": stock})
            ids.append(pid)
        return customer, ids

    def order_flow(self, customer: UUID, products: list[UUID], n: int) -> None:
        """Place, pay, ship or cancel ``n`` orders over the products: every event type of an order."""
        for i in range(n):
            lines = [
                {"product_id": products[(i + k) % len(products)], "quantity": 1 + (i + k) % 3} for k in (0, 1)
            ]
            placed = self.commands.place_order({"customer_id": customer, "lines": lines})
            order = placed.stream_id
            if i % 5 == 4:
                self.commands.cancel_order({"order_id": order, "reason": "changed mind"})
                continue
            total = self.app.get_order(order).total
            self.commands.pay_order({"order_id": order, "amount": total})
            if i % 3 == 0:
                self.commands.ship_order({"order_id": order})

    def keep_writing(self, customer: UUID, products: list[UUID]) -> threading.Event:
        """Order flows in a background thread until the returned event is set (or the pipeline closes)."""
        done = threading.Event()

        def write() -> None:
            while not (done.is_set() or self._stop.is_set()):
                self.order_flow(customer, products, 5)
            self.writes_stopped.set()

        self.writes_stopped = threading.Event()
        threading.Thread(target=write, daemon=True).start()
        return done

    def close(self) -> None:
        self._stop.set()
        for proc in self._processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        for thread in self._threads:
            thread.join(timeout=30)
        for target in [self.views, self.cache, *self._replays]:
            target.drop()
        admin = KafkaAdminClient(**self.settings.kafka_config())
        try:
            mine = [t for t in admin.list_topics() if t.startswith(self.name)]
            if mine:
                admin.delete_topics(mine)
        finally:
            admin.close()


@contextmanager
def pipeline(
    settings: Settings, store: EventStore, engine: Engine, client: redis.Redis
) -> Iterator[Pipeline]:
    p = Pipeline(settings, store, engine, client)
    try:
        yield p
    finally:
        p.close()


def pg_contents(engine: Engine, target: PostgresTarget) -> dict[str, Any]:
    """Every row of the projection's tables, ordered by primary key."""
    metadata: MetaData = target.projection.metadata
    contents: dict[str, Any] = {}
    with engine.connect().execution_options(schema_translate_map={None: target.schema}) as conn:
        for table in metadata.sorted_tables:
            rows = conn.execute(select(table).order_by(*table.primary_key.columns)).mappings().all()
            contents[table.name] = [dict(r) for r in rows]
    return contents


def redis_contents(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under ``prefix`` but the bookkeeping ones, by relative name, with its value."""
    contents: dict[str, Any] = {}
    for key in client.scan_iter(match=f"{_escape(prefix)}*", count=1000):
        name = key.decode()[len(prefix) :]
        if name.startswith("meta:"):
            continue
        kind = client.type(key).decode()
        if kind == "hash":
            contents[name] = client.hgetall(key)
        elif kind == "zset":
            contents[name] = client.zrange(key, 0, -1, withscores=True)
        else:
            contents[name] = client.get(key)
    return contents


def _escape(prefix: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in prefix)


def dead_letters(pl: Pipeline, projection: str, count: int) -> list[Any]:
    """The first ``count`` records of the projection's dead-letter topic."""
    consumer = KafkaConsumer(enable_auto_commit=False, **pl.settings.kafka_config())
    try:
        tp = TopicPartition(f"{pl.dlq_prefix}{projection}", 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        return polled_records(consumer, count, f"{count} dead letters")
    finally:
        consumer.close()
