"""``datalayer status`` and ``datalayer health`` on a live pipeline with isolated names.

The lag they report is compared with what was written while the consumer was stopped; a stalled
read horizon is made by a transaction left open; an unreachable server by a closed port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import redis
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from psycopg import sql
from sqlalchemy import Engine

from consumers.live import LiveConsumer
from datalayer.clients import postgres_connection
from datalayer.settings import Settings
from datalayer.status import gather_status
from datalayer.wiring import read_model_store
from eventstore import EventStore
from projections.orders import OrderViews
from tests.helpers import unique_name, wait_until
from tests.isolated_read_models import drop_postgres_read_models
from tests.pipeline import Pipeline, pipeline

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("datalayer")
ISOLATED_VIEWS = "tests.cli_projections:IsolatedViews"


@pytest.fixture
def pl(settings: Settings, store: EventStore, engine: Engine, redis_conn: redis.Redis) -> Iterator[Pipeline]:
    with pipeline(settings, store, engine, redis_conn) as p:
        yield p


def cli(pl: Pipeline, name: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = dict(
        os.environ,
        DATALAYER_EVENTSTORE_SCHEMA=pl.store.schema,
        DATALAYER_TOPIC_PREFIX=pl.topic_prefix,
        DATALAYER_DEAD_LETTER_TOPIC_PREFIX=pl.dlq_prefix,
        TEST_PROJECTION_NAME=name,
        **env,
    )
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, timeout=120, env=environment, cwd=ROOT
    )


def status_json(pl: Pipeline, name: str) -> dict[str, Any]:
    result = cli(pl, name, "status", ISOLATED_VIEWS, "--relay", pl.name, "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def order_events(pl: Pipeline) -> int:
    with pl.store.pool.connection() as conn:
        query = sql.SQL("SELECT count(*) FROM {} WHERE stream_type = 'Order'")
        row = conn.execute(query.format(sql.Identifier(pl.store.schema, "events"))).fetchone()
    assert row is not None
    return int(row[0])


class Running:
    """A live consumer of ``projection`` in a thread, stopped by :meth:`stop`."""

    def __init__(self, pl: Pipeline, projection: OrderViews) -> None:
        models = read_model_store(projection, pl.settings)
        self.consumer = LiveConsumer(
            projection, models.registry, models.make_target, pl.settings.kafka_config(), pl.consumer_config()
        )
        self.models = models
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self.consumer.run, args=(self.halt,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(timeout=60)
        self.models.close()


def start_on_five_orders(pl: Pipeline, projection: OrderViews) -> tuple[Running, UUID, list[UUID]]:
    """The relay running, a catalog and five orders written, and a live consumer of ``projection``."""
    pl.start_relay()
    customer, products = pl.seed_catalog(2)
    pl.order_flow(customer, products, 5)
    return Running(pl, projection), customer, products


def test_status_reports_the_true_lag_of_a_stopped_consumer_and_none_once_caught_up(
    pl: Pipeline, engine: Engine
) -> None:
    name = unique_name("stv")
    projection = type("IsolatedViews", (OrderViews,), {"name": name})()
    prefixes = {"topic_prefix": pl.topic_prefix, "dead_letter_prefix": pl.dlq_prefix}

    def active() -> dict[str, Any] | None:
        report = gather_status(pl.settings, [projection], pl.name, **prefixes).as_dict()
        found = report["projections"][0]
        return next((g for g in found["generations"] if g["status"] == "active"), None)

    def published() -> None:
        wait_until(lambda: pl.relay is not None and pl.relay.lag().events == 0, what="the relay to publish")

    def caught_up() -> None:
        published()
        # Every partition known (a just-created topic's may not all be, yet) and nothing left to apply.
        wait_until(
            lambda: (g := active()) is not None and len(g["partitions"]) == 6 and g["lag_events"] == 0,
            what="the consumer",
        )

    def dead_letters() -> int | None:
        return gather_status(pl.settings, [projection], pl.name, **prefixes).projections[0].dead_letters

    running: Running | None = None
    try:
        running, customer, products = start_on_five_orders(pl, projection)
        caught_up()
        running.stop()

        before = order_events(pl)
        pl.order_flow(customer, products, 4)
        written = order_events(pl) - before
        published()

        report = status_json(pl, name)
        (views,) = report["projections"]
        assert views["name"] == name and views["active"] == f"{name}_v1"
        (generation,) = views["generations"]
        assert generation["lag_events"] == written
        assert sum(p["lag"] for p in generation["partitions"]) == written
        assert generation["lag_seconds"] > 0
        assert generation["group_members"] == 0
        assert report["relay"]["lag_events"] == 0 and report["relay"]["active_pid"] is not None
        lagging = cli(
            pl, name, "health", "consumers", "--projection", ISOLATED_VIEWS, "--max-consumer-lag", "0"
        )
        assert lagging.returncode == 1
        assert f"unhealthy: projection {name}: {name}_v1: lag {written} events" in lagging.stdout

        running = Running(pl, projection)
        caught_up()
        producer = KafkaProducer(**pl.settings.kafka_config())
        producer.send(f"{pl.topic_prefix}Order", key=b"x", value=b"not an envelope").get(timeout=30)
        producer.close()
        wait_until(lambda: dead_letters() == 1, what="the dead letter to be counted")
        caught_up()
        report = status_json(pl, name)
        (generation,) = report["projections"][0]["generations"]
        assert generation["lag_events"] == 0 and generation["lag_seconds"] == 0
        assert generation["group_members"] == 1
        assert report["projections"][0]["dead_letters"] == 1

        healthy = cli(pl, name, "health", "--projection", ISOLATED_VIEWS, "--relay", pl.name)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert healthy.stdout.strip().splitlines()[-1] == "healthy: 6 checks passed"
        table = cli(pl, name, "status", ISOLATED_VIEWS, "--relay", pl.name)
        assert table.returncode == 0, table.stderr
        assert f"{name}_v1" in table.stdout and "active" in table.stdout
    finally:
        if running is not None:
            running.stop()
        drop_postgres_read_models(engine, name)


def test_status_and_health_name_offsets_past_the_end_of_a_topic_created_again(
    pl: Pipeline, engine: Engine
) -> None:
    """A topic deleted and created again (a Kafka cluster replaced, say) leaves a read model's stored
    offsets naming records that are not there: flagged, never counted as negative lag."""
    name = unique_name("stp")
    projection = type("IsolatedViews", (OrderViews,), {"name": name})()
    prefixes = {"topic_prefix": pl.topic_prefix, "dead_letter_prefix": pl.dlq_prefix}
    topic = f"{pl.topic_prefix}Order"
    admin = KafkaAdminClient(**pl.settings.kafka_config())

    def active() -> Any:
        report = gather_status(pl.settings, [projection], pl.name, **prefixes)
        return report.projections[0].active

    def created_again() -> bool:
        try:
            admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])
        except TopicAlreadyExistsError:  # still being deleted
            return False
        return True

    running: Running | None = None
    try:
        running, customer, products = start_on_five_orders(pl, projection)
        wait_until(
            lambda: (
                (g := active()) is not None
                and len(g.partitions) == 6
                and g.lag_events == 0
                and sum(p.applied or 0 for p in g.partitions) > 0
            ),
            what="the consumer to catch up",
        )
        running.stop()
        running = None
        assert active().past_end == []

        admin.delete_topics([topic])
        wait_until(created_again, what=f"{topic} created again")
        wait_until(lambda: len(active().partitions) == 6, what=f"the partitions of the new {topic}")

        generation = active()
        assert generation.past_end and all(p.end == 0 for p in generation.past_end)
        assert generation.recreated == [topic]  # the id stored with the offsets is not the new topic's
        assert generation.lag_events == 0  # not the negative sum of the stored offsets
        report = status_json(pl, name)
        (listed,) = report["projections"][0]["generations"]
        assert listed["past_end"] == [p.source for p in generation.past_end]
        table = cli(pl, name, "status", ISOLATED_VIEWS, "--relay", pl.name)
        assert table.returncode == 0, table.stderr
        assert f"warning: {name}_v1 stored offsets past the end of {len(generation.past_end)}" in table.stdout
        health = cli(pl, name, "health", "consumers", "--projection", ISOLATED_VIEWS)
        assert health.returncode == 1
        assert "stored offsets past the end of" in health.stdout
        assert f"datalayer rebuild {name}" in health.stdout

        # Once the new topic has grown past every stored offset, only its id tells it apart.
        def grown_past() -> bool:
            pl.order_flow(customer, products, 20)
            wait_until(lambda: pl.relay is not None and pl.relay.lag().events == 0, what="the relay")
            return not active().past_end

        wait_until(grown_past, timeout=120, what=f"the new {topic} to grow past the stored offsets")
        assert active().recreated == [topic]
        health = cli(pl, name, "health", "consumers", "--projection", ISOLATED_VIEWS)
        assert health.returncode == 1
        assert f"{topic} created again since this read model stored its offsets" in health.stdout
    finally:
        if running is not None:
            running.stop()
        admin.close()
        drop_postgres_read_models(engine, name)


def test_status_and_health_name_the_relay_lag_and_the_backend_stalling_the_horizon(
    settings: Settings, store: EventStore, es_env: dict[str, str]
) -> None:
    from domain import CommandHandlers, OrdersApplication

    env = {"DATALAYER_EVENTSTORE_SCHEMA": store.schema}
    handlers = CommandHandlers(OrdersApplication(env=es_env))
    handlers.register_customer({"name": "A", "email": "a@example.com", "address": "x"})

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN), *args], capture_output=True, text=True, timeout=120, env=dict(os.environ, **env)
        )

    report = json.loads(run("status", "--json").stdout)
    assert report["store"]["events"] == 1
    assert report["relay"]["lag_events"] == 1 and report["relay"]["active_pid"] is None
    behind = run("health", "relay", "--max-relay-lag", "0")
    assert behind.returncode == 1
    assert "FAIL  relay default" in behind.stdout and "no relay holds the lock" in behind.stdout

    with postgres_connection(settings) as blocker:
        blocker.execute("SELECT pg_current_xact_id()")  # a transaction with an id, left open
        handlers.register_customer({"name": "B", "email": "b@example.com", "address": "y"})
        report = json.loads(run("status", "--json").stdout)
        assert report["store"]["horizon_stalled"] is True
        assert report["store"]["held_back_events"] == 1
        assert report["store"]["blocking_pid"] == blocker.info.backend_pid
        stalled = run("health", "relay", "--max-stall", "0")
        assert stalled.returncode == 1
        assert f"by backend {blocker.info.backend_pid}" in stalled.stdout
        assert (
            stalled.stdout.strip().splitlines()[-1].startswith("unhealthy: read horizon: 1 committed events")
        )
        blocker.rollback()
    assert json.loads(run("status", "--json").stdout)["store"]["horizon_stalled"] is False


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_health_passes_on_the_running_servers_and_names_one_that_does_not_answer() -> None:
    ok = subprocess.run([str(BIN), "health", "servers"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [line.split()[:2] for line in ok.stdout.splitlines()[:3]] == [
        ["ok", "postgresql"],
        ["ok", "kafka"],
        ["ok", "redis"],
    ]
    assert ok.stdout.strip().endswith("healthy: 3 checks passed")

    port = closed_port()
    for variable, value, server in (
        ("DATALAYER_DATABASE_URL", f"postgresql://u:p@127.0.0.1:{port}/d", "postgresql"),
        ("DATALAYER_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}", "kafka"),
    ):
        env = dict(os.environ, **{variable: value})
        down = subprocess.run([str(BIN), "health"], capture_output=True, text=True, timeout=60, env=env)
        assert down.returncode == 1, down.stdout
        assert f"FAIL  {server}" in down.stdout
        assert down.stdout.strip().splitlines()[-1].startswith(f"unhealthy: {server}: 127.0.0.1:{port}: ")


def test_status_counts_a_short_log_and_estimates_a_long_one(
    settings: Settings, store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    import datalayer.status as status
    from eventstore import NewEvent

    stream = uuid.uuid4()
    store.append(stream, "Cart", [NewEvent(uuid.uuid4(), "ItemAdded", b"{}") for _ in range(3)], 0)
    settings = settings.model_copy(update={"eventstore_schema": store.schema})

    counted = gather_status(settings, []).store
    assert counted is not None and (counted.events, counted.events_exact) == (3, True)
    assert counted.head_position == store.read_stream(stream)[-1].position

    # Above the limit by PostgreSQL's own estimate, status reads the estimate instead of scanning.
    monkeypatch.setattr(status, "EXACT_COUNT_LIMIT", 2)
    with postgres_connection(settings, autocommit=True) as conn:
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(store.schema, "events")))
    estimated = gather_status(settings, []).store
    assert estimated is not None and estimated.events_exact is False
    assert estimated.events == 3 and estimated.last_recorded_at == counted.last_recorded_at


def test_status_and_health_name_events_restored_from_another_clusters_future(
    settings: Settings, store: EventStore
) -> None:
    import uuid

    from eventstore import NewEvent

    store.append(uuid.uuid4(), "Cart", [NewEvent(uuid.uuid4(), "ItemAdded", b"{}")], 0)
    # What a pg_dump from a cluster further along leaves: a row whose transaction id is ahead.
    with postgres_connection(settings, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (stream_id, stream_type, stream_version, event_id, event_type, payload,"
                " transaction_id) VALUES (%s, 'Cart', 1, %s, 'ItemAdded', '\\x7b7d',"
                " (pg_snapshot_xmax(pg_current_snapshot())::text::bigint + 1000000)::text::xid8)"
            ).format(sql.Identifier(store.schema, "events")),
            (uuid.uuid4(), uuid.uuid4()),
        )
    assert len(store.read_all(limit=10)) == 1  # hidden from every reader: what status must name
    horizon = store.horizon()
    assert (horizon.unreachable_events, horizon.held_back_events) == (1, 0)

    env = dict(os.environ, DATALAYER_EVENTSTORE_SCHEMA=store.schema)
    status = subprocess.run([str(BIN), "status"], capture_output=True, text=True, timeout=120, env=env)
    assert "UNREACHABLE: 1 events carry transaction ids this cluster has not reached" in status.stdout
    health = subprocess.run(
        [str(BIN), "health", "relay"], capture_output=True, text=True, timeout=120, env=env
    )
    assert health.returncode == 1 and "FAIL  read horizon" in health.stdout, health.stdout
