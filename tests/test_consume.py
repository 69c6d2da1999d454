"""The consumer runtime end to end on real servers: command -> store -> relay -> Kafka -> read models."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, ClassVar

import orjson
import psycopg
import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from sqlalchemy import Engine

from consumers.runtime import ProjectionConsumer, _transient
from datalayer.settings import Settings
from domain import Order, OrderStatus
from eventstore import EventStore
from projections.events import ProjectedEvent
from projections.freshness import ReadModelTimeout, wait_until_applied
from projections.orders import OrderCacheQueries, OrderQueries, OrderViews
from projections.projection import handles
from projections.target import TargetReadFailed
from projections.targets import PostgresTarget, SqlWrites
from tests.helpers import unique_name, wait_until
from tests.pipeline import Pipeline, dead_letters, pipeline


@pytest.fixture
def pl(settings: Settings, store: EventStore, engine: Engine, redis_conn: redis.Redis) -> Iterator[Pipeline]:
    with pipeline(settings, store, engine, redis_conn) as p:
        yield p


def headers(record: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


def test_command_to_query_end_to_end_with_read_your_writes(pl: Pipeline) -> None:
    pl.start_relay()
    pl.start_consumer(pl.views)
    pl.start_consumer(pl.cache)
    customer, (p0, p1) = pl.seed_catalog(2, stock=100)
    placed = pl.commands.place_order(
        {
            "customer_id": customer,
            "lines": [{"product_id": p0, "quantity": 3}, {"product_id": p1, "quantity": 1}],
        }
    )
    wait_until_applied(pl.views.projection, pl.views, placed.written, timeout=30)
    orders = OrderQueries(pl.engine, schema=pl.views_schema)
    summary = orders.get_order(placed.stream_id)
    assert summary is not None
    assert summary.status == OrderStatus.PLACED
    assert summary.total == Decimal("3") * Decimal("2.50") + Decimal("3.50")
    assert summary.customer_id == customer

    paid = pl.commands.pay_order({"order_id": placed.stream_id, "amount": summary.total})
    wait_until_applied(pl.views.projection, pl.views, paid.written, timeout=30)
    again = orders.get_order(placed.stream_id)
    assert again is not None and again.status == OrderStatus.PAID
    assert [o.order_id for o in orders.customer_orders(customer).items] == [placed.stream_id]
    assert sum(d.units for d in orders.daily_sales().items) == 4

    # The cache consumes products too: waiting on every stream the command wrote covers the stock.
    wait_until_applied(pl.cache.projection, pl.cache, placed.written, timeout=30)
    cache = OrderCacheQueries(pl.redis, prefix=pl.cache_prefix)
    stock = cache.stock(p0)
    assert stock is not None and stock.available == 97 and stock.reserved == 3
    wait_until_applied(pl.cache.projection, pl.cache, paid.written, timeout=30)
    assert cache.order_status(placed.stream_id) == OrderStatus.PAID
    assert [b.product_id for b in cache.best_sellers()] == [p0, p1]


def test_read_your_writes_times_out_clearly_when_no_consumer_runs(pl: Pipeline) -> None:
    pl.start_relay()
    pl.views.setup()
    customer, (p0,) = pl.seed_catalog(1)
    placed = pl.commands.place_order({"customer_id": customer, "lines": [{"product_id": p0, "quantity": 1}]})
    started = time.monotonic()
    with pytest.raises(ReadModelTimeout) as caught:
        wait_until_applied(pl.views.projection, pl.views, placed.written, timeout=0.3)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"stream {placed.stream_id} version 1" in message
    assert "order_views_v1 has not applied" in message and "0.3 s" in message


def test_redelivered_records_change_nothing(pl: Pipeline) -> None:
    pl.start_relay()
    views = pl.start_consumer(pl.views)
    cache = pl.start_consumer(pl.cache)
    customer, products = pl.seed_catalog(3)
    pl.order_flow(customer, products, 15)
    pl.wait_caught_up(pl.views)
    pl.wait_caught_up(pl.cache)
    before = (pl.read_model(pl.views), pl.read_model(pl.cache))

    # Publish every record of the topics a second time, as a relay restarted from an old
    # checkpoint would.
    copies: Counter[str] = Counter()
    reader = KafkaConsumer(enable_auto_commit=False, **pl.settings.kafka_config())
    producer = KafkaProducer(**pl.settings.kafka_config())
    try:
        parts = [
            TopicPartition(t, p)
            for t in reader.topics()
            if t.startswith(pl.topic_prefix)
            for p in reader.partitions_for_topic(t) or ()
        ]
        reader.assign(parts)
        reader.seek_to_beginning()
        ends = reader.end_offsets(parts)
        while any(reader.position(tp) < ends[tp] for tp in parts):
            for tp, batch in reader.poll(timeout_ms=500).items():
                for r in batch:
                    producer.send(
                        tp.topic, key=r.key, value=r.value, headers=r.headers, partition=tp.partition
                    )
                    copies[tp.topic.removeprefix(pl.topic_prefix)] += 1
        producer.flush()
    finally:
        reader.close()
        producer.close()
    assert copies["Order"] > 20 and copies["Product"] > 20
    wait_until(lambda: views.stats.duplicates >= copies["Order"], timeout=60, what="the views to skip copies")
    wanted = copies["Order"] + copies["Product"]
    wait_until(lambda: cache.stats.duplicates >= wanted, timeout=60, what="the cache to skip copies")
    assert views.stats.duplicates == copies["Order"] and cache.stats.duplicates == wanted
    assert (pl.read_model(pl.views), pl.read_model(pl.cache)) == before
    assert pl.read_model(pl.views) == pl.read_model(pl.fresh_replay(pl.views))
    assert pl.read_model(pl.cache) == pl.read_model(pl.fresh_replay(pl.cache))


class PoisonedViews(OrderViews):
    """Order views whose Paid handler fails for the orders listed in ``poisoned``."""

    poisoned: ClassVar[set[str]] = set()

    @handles(Order.Paid)
    def paid(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        if event.stream_id in self.poisoned:
            writes.upsert(
                self.metadata.tables["order_summaries"], {"order_id": event.stream_id, "status": "bad"}
            )
            raise RuntimeError(f"cannot apply payment of {event.stream_id}")
        super().paid(event, writes)


def test_poison_event_is_dead_lettered_and_the_events_after_it_apply(pl: Pipeline, engine: Engine) -> None:
    target = PostgresTarget(engine, PoisonedViews(), schema=unique_name("poisoned"))
    pl._replays.append(target)  # dropped with the pipeline
    pl.start_relay()
    consumer = pl.start_consumer(target)
    customer, (p0,) = pl.seed_catalog(1)
    bad = pl.commands.place_order({"customer_id": customer, "lines": [{"product_id": p0, "quantity": 1}]})
    good = pl.commands.place_order({"customer_id": customer, "lines": [{"product_id": p0, "quantity": 2}]})
    PoisonedViews.poisoned.add(str(bad.stream_id))
    try:
        pl.commands.pay_order({"order_id": bad.stream_id, "amount": Decimal("2.50")})
        pl.commands.pay_order({"order_id": good.stream_id, "amount": Decimal("5.00")})
        shipped = pl.commands.ship_order({"order_id": bad.stream_id})
        wait_until_applied(target.projection, target, shipped.written, timeout=30)
        pl.wait_caught_up(target)
    finally:
        PoisonedViews.poisoned.clear()
    orders = OrderQueries(pl.engine, schema=target.schema)
    bad_view, good_view = orders.get_order(bad.stream_id), orders.get_order(good.stream_id)
    assert good_view is not None and good_view.status == OrderStatus.PAID
    # The payment never took effect (nor the handler's partial write), the shipping after it did.
    assert bad_view is not None and bad_view.status == OrderStatus.SHIPPED and bad_view.paid_amount is None
    (letter,) = dead_letters(pl, "order_views", 1)
    meta = headers(letter)
    assert meta["dlq.reason"] == "poison"
    assert f"cannot apply payment of {bad.stream_id}" in meta["dlq.error"]
    assert meta["dlq.stream_id"] == str(bad.stream_id) and meta["dlq.stream_version"] == "2"
    assert letter.key == str(bad.stream_id).encode()
    assert orjson.loads(letter.value)["event_type"] == "domain.order:Order.Paid"
    assert consumer.stats.dead_letters == 1


def test_malformed_records_are_dead_lettered_and_consumption_goes_on(pl: Pipeline) -> None:
    pl.start_relay()
    consumer = pl.start_consumer(pl.views)
    customer, (p0,) = pl.seed_catalog(1)
    first = pl.commands.place_order({"customer_id": customer, "lines": [{"product_id": p0, "quantity": 1}]})
    wait_until_applied(pl.views.projection, pl.views, first.written, timeout=30)

    def envelope(**changes: Any) -> bytes:
        doc: dict[str, Any] = {
            "event_id": str(uuid.uuid4()),
            "event_type": "domain.order:Order.Shipped",
            "schema_version": 1,
            "stream_id": str(uuid.uuid4()),
            "stream_type": "Order",
            "stream_version": 1,
            "position": 1,
            "transaction_id": 1,
            "recorded_at": "2026-11-25T12:00:00+00:00",
            "metadata": {},
            "payload_encoding": "json",
            "payload": {},
        }
        doc.update(changes)
        return orjson.dumps(doc)

    producer = KafkaProducer(**pl.settings.kafka_config())
    topic = f"{pl.topic_prefix}Order"
    for value in (
        b"\x00\x01 not json",
        b'{"hello": "world"}',
        envelope(event_type="domain.order:Order.Exploded"),
        envelope(schema_version=99),
        envelope(payload="not a JSON object", payload_encoding="base64"),
    ):
        producer.send(topic, key=b"k", value=value).get(timeout=30)
    producer.close()

    later = pl.commands.place_order({"customer_id": customer, "lines": [{"product_id": p0, "quantity": 2}]})
    wait_until_applied(pl.views.projection, pl.views, later.written, timeout=30)
    letters = dead_letters(pl, "order_views", 5)
    reasons = [headers(r)["dlq.reason"] for r in letters]
    assert reasons == [
        "not_json",
        "bad_envelope",
        "unknown_event_type",
        "unknown_schema_version",
        "bad_payload",
    ]
    assert letters[0].value == b"\x00\x01 not json"
    assert consumer.running.is_set()


def test_a_consumer_left_without_partitions_rejoins_and_misses_nothing(pl: Pipeline) -> None:
    # The fault kafka-python 3.0.x sometimes leaves behind after a rebalance -- a member holding no
    # partition in a group that has fewer members than partitions -- made on purpose: after its
    # first batch the consumer's client leaves the group (in its own thread, so the client is safe).
    left: list[int] = []

    def leave_once(consumer: ProjectionConsumer, outcome: Any, seconds: float) -> None:
        if not left and consumer.kafka_consumer is not None:
            consumer.kafka_consumer.unsubscribe()
            left.append(1)

    pl.start_relay()
    # With deferred commits (the default) the first batch may be confirmed inside a rebalance
    # callback: the consumer tells the observer after the poll, where leaving the group is safe.
    consumer = pl.start_consumer(pl.views, observer=leave_once, unassigned_limit_s=1.0)
    customer, (p0,) = pl.seed_catalog(1, stock=100)
    first = pl.commands.place_order({"customer_id": customer, "lines": [{"product_id": p0, "quantity": 1}]})
    wait_until(lambda: bool(left), timeout=60, what="the consumer's first batch")
    later = [
        pl.commands.place_order({"customer_id": customer, "lines": [{"product_id": p0, "quantity": 1}]})
        for _ in range(3)
    ]
    for placed in [first, *later]:
        wait_until_applied(pl.views.projection, pl.views, placed.written, timeout=60)
    assert consumer.stats.rejoins >= 1
    orders = OrderQueries(pl.engine, schema=pl.views_schema)
    assert len(orders.customer_orders(customer).items) == 4
    pl.wait_caught_up(pl.views)
    assert pl.read_model(pl.views) == pl.read_model(pl.fresh_replay(pl.views))


def test_a_consumer_that_fetches_nothing_while_records_wait_rejoins_and_misses_nothing(pl: Pipeline) -> None:
    # A client stuck with its partitions (as kafka-python's join race left it, see group_join), made
    # on purpose: after its first batch the client pauses every partition it holds, so its polls
    # come back empty while records wait. Paused in the consumer's thread, where the client is safe.
    paused: list[int] = []

    def pause_once(consumer: ProjectionConsumer, outcome: Any, seconds: float) -> None:
        client = consumer.kafka_consumer
        if not paused and client is not None and client.assignment():
            client.pause(*client.assignment())
            paused.append(1)

    pl.start_relay()
    consumer = pl.start_consumer(pl.views, observer=pause_once, stalled_limit_s=1.0)
    customer, (p0,) = pl.seed_catalog(1, stock=100)
    first = pl.commands.place_order({"customer_id": customer, "lines": [{"product_id": p0, "quantity": 1}]})
    wait_until(lambda: bool(paused), timeout=60, what="the consumer's first batch")
    later = [
        pl.commands.place_order({"customer_id": customer, "lines": [{"product_id": p0, "quantity": 1}]})
        for _ in range(3)
    ]
    for placed in [first, *later]:
        wait_until_applied(pl.views.projection, pl.views, placed.written, timeout=60)
    assert consumer.stats.rejoins >= 1
    pl.wait_caught_up(pl.views)
    assert pl.read_model(pl.views) == pl.read_model(pl.fresh_replay(pl.views))


def test_a_handlers_failed_read_is_retried_only_when_its_cause_is_transient() -> None:
    """A server restarting under a handler's read is retried as a batch; a read that cannot work
    (a missing table) stops the consumer with its error, as any lasting target error does."""
    restarting, missing = TargetReadFailed("read"), TargetReadFailed("read")
    restarting.__cause__ = psycopg.OperationalError("the server is restarting")
    missing.__cause__ = psycopg.errors.UndefinedTable("no such table")
    assert _transient(restarting) and not _transient(missing)
    assert _transient(psycopg.OperationalError("down")) and not _transient(ValueError("bad"))
