"""The Prometheus endpoints of ``datalayer relay`` and ``datalayer consume`` (``--metrics-port``).

Both run as the console script, on isolated names; their endpoints are scraped until the counters
account for every event written, then the gauges must show no lag.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from sqlalchemy import Engine

from datalayer.settings import Settings
from eventstore import EventStore
from tests.helpers import unique_name, wait_until
from tests.isolated_read_models import drop_postgres_read_models
from tests.pipeline import Pipeline, pipeline

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("datalayer")


@pytest.fixture
def pl(settings: Settings, store: EventStore, engine: Engine, redis_conn: redis.Redis) -> Iterator[Pipeline]:
    with pipeline(settings, store, engine, redis_conn) as p:
        yield p


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, by name and labels; empty while it does not answer yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def count(pl: Pipeline, stream_type: str | None = None) -> int:
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(pl.store.schema, "events"))
    if stream_type is not None:
        query = sql.SQL("{} WHERE stream_type = {}").format(query, sql.Literal(stream_type))
    with pl.store.pool.connection() as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def test_relay_and_consumer_serve_the_named_series_and_count_every_event(
    pl: Pipeline, engine: Engine
) -> None:
    name = unique_name("mtv")
    env = dict(
        os.environ,
        DATALAYER_EVENTSTORE_SCHEMA=pl.store.schema,
        DATALAYER_TOPIC_PREFIX=pl.topic_prefix,
        DATALAYER_DEAD_LETTER_TOPIC_PREFIX=pl.dlq_prefix,
        TEST_PROJECTION_NAME=name,
    )
    relay_port, consumer_port = free_port(), free_port()
    commands = [
        [str(BIN), "relay", "--name", pl.name, "--metrics-port", str(relay_port)],
        [str(BIN), "consume", "tests.cli_projections:IsolatedViews", "--metrics-port", str(consumer_port)],
    ]
    processes = [
        subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for c in commands
    ]
    try:
        customer, products = pl.seed_catalog(2)
        pl.order_flow(customer, products, 6)
        events, orders = count(pl), count(pl, "Order")
        relay = ("relay", pl.name)
        projection = ("projection", name)

        def relay_counted() -> bool:
            return scrape(relay_port).get(("datalayer_relay_events_published_total", (relay,))) == events

        def consumer_counted() -> bool:
            found = scrape(consumer_port).get(("datalayer_consumer_events_applied_total", (projection,)))
            return found == orders

        wait_until(relay_counted, timeout=60, what=f"the relay's metrics to count {events} events")
        wait_until(consumer_counted, timeout=60, what=f"the consumer's metrics to count {orders} events")

        # The gauges are read at scrape time, at most every STATUS_TTL seconds: wait for a fresh read.
        wait_until(lambda: scrape(relay_port).get(("datalayer_relay_lag_events", (relay,))) == 0)
        relay_samples = scrape(relay_port)
        assert relay_samples[("datalayer_relay_batches_total", (relay,))] >= 1
        batches = relay_samples[("datalayer_relay_batch_latency_seconds_count", (relay,))]
        assert batches == relay_samples[("datalayer_relay_batches_total", (relay,))]
        assert relay_samples[("datalayer_relay_active", (relay,))] == 1
        assert relay_samples[("datalayer_status_up", (("server", "postgresql"),))] == 1
        assert ("process_cpu_seconds_total", ()) in relay_samples

        generation = (("generation", f"{name}_v1"), projection, ("status", "active"))
        lag = ("datalayer_projection_lag_events", generation)
        wait_until(lambda: scrape(consumer_port).get(lag) == 0, what="the consumer's lag gauge to read 0")
        consumer_samples = scrape(consumer_port)
        assert consumer_samples[("datalayer_consumer_batch_seconds_count", (projection,))] >= 1
        assert consumer_samples[("datalayer_consumer_batches_total", (projection,))] >= 1
        assert consumer_samples.get(("datalayer_consumer_dead_letters_total", (projection,)), 0) == 0
        assert consumer_samples[("datalayer_projection_lag_seconds", generation)] == 0
        assert consumer_samples[("datalayer_projection_dead_letters", (projection,))] == 0

        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            assert process.wait(timeout=60) == 0, process.stderr.read().decode() if process.stderr else ""
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        drop_postgres_read_models(engine, name)
