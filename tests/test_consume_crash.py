"""Consumers broken on purpose: kill -9 mid-stream, several processes rebalancing, servers restarting.

Whatever happens, the read models must end equal to a fresh replay of the store: nothing lost,
nothing applied twice.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest
import redis
import sqlalchemy as sa
from kafka import KafkaAdminClient
from sqlalchemy import Engine

from datalayer.clients import postgres_engine
from datalayer.settings import Settings
from eventstore import EventStore
from projections.orders import OrderViews
from projections.targets import PostgresTarget
from tests import stack_control
from tests.helpers import wait_until
from tests.pipeline import Pipeline, pipeline

pytestmark = pytest.mark.slow


@pytest.fixture
def pl(settings: Settings, store: EventStore, engine: Engine, redis_conn: redis.Redis) -> Iterator[Pipeline]:
    with pipeline(settings, store, engine, redis_conn) as p:
        yield p


def write_in_background(pl: Pipeline, orders: int) -> threading.Thread:
    customer, products = pl.seed_catalog(4)
    writer = threading.Thread(target=pl.order_flow, args=(customer, products, orders), daemon=True)
    writer.start()
    return writer


def applied_streams(pl: Pipeline, target: object) -> int:
    """How many streams the target has applied anything of (its versions' size)."""
    if target is pl.views:
        with pl.engine.connect() as conn:
            table = sa.table("projection_stream_versions", schema=pl.views_schema)
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
    return int(pl.redis.hlen(f"{pl.cache_prefix}meta:versions"))


def assert_equal_to_fresh_replay(pl: Pipeline) -> None:
    pl.wait_caught_up(pl.views, timeout=120)
    pl.wait_caught_up(pl.cache, timeout=120)
    assert pl.read_model(pl.views) == pl.read_model(pl.fresh_replay(pl.views))
    assert pl.read_model(pl.cache) == pl.read_model(pl.fresh_replay(pl.cache))


def test_kill_9_consumers_mid_stream_then_restart_equals_a_fresh_replay(pl: Pipeline) -> None:
    pl.start_relay()
    pl.views.setup()
    writer = write_in_background(pl, 250)
    views, cache = pl.spawn_consumer("views"), pl.spawn_consumer("cache")
    # Kill while events are flowing: both have applied some, and more keep arriving.
    wait_until(lambda: applied_streams(pl, pl.views) >= 20, timeout=120, what="views to apply some")
    wait_until(lambda: applied_streams(pl, pl.cache) >= 20, timeout=120, what="cache to apply some")
    views.send_signal(signal.SIGKILL)
    cache.send_signal(signal.SIGKILL)
    assert views.wait(timeout=30) == -signal.SIGKILL and cache.wait(timeout=30) == -signal.SIGKILL
    assert writer.is_alive(), "the writer finished before the kill: nothing was mid-stream"
    pl.spawn_consumer("views")
    pl.spawn_consumer("cache")
    writer.join(timeout=300)
    assert_equal_to_fresh_replay(pl)


def group_members(pl: Pipeline, group: str) -> int:
    admin = KafkaAdminClient(**pl.settings.kafka_config())
    try:
        description = admin.describe_groups([group])[group]
        return len(description["members"])
    finally:
        admin.close()


def test_two_processes_share_partitions_and_rebalances_lose_and_double_nothing(pl: Pipeline) -> None:
    pl.start_relay()
    pl.views.setup()
    writer = write_in_background(pl, 300)
    first = [pl.spawn_consumer("views"), pl.spawn_consumer("cache")]
    wait_until(lambda: applied_streams(pl, pl.views) >= 10, timeout=120, what="views to apply some")
    # A second process of each projection joins: the group rebalances while events flow.
    second = [pl.spawn_consumer("views"), pl.spawn_consumer("cache")]
    for group in (pl.group_id("views"), pl.group_id("cache")):
        wait_until(lambda g=group: group_members(pl, g) == 2, timeout=120, what=f"two members in {group}")
    progress = applied_streams(pl, pl.views)
    wait_until(lambda: applied_streams(pl, pl.views) > progress + 10, timeout=120, what="more progress")
    # The first ones leave (SIGTERM): the second ones take all partitions over, still mid-stream.
    for proc in first:
        proc.send_signal(signal.SIGTERM)
    for proc in first:
        assert proc.wait(timeout=60) == 0
    assert writer.is_alive(), "the writer finished before the rebalance: nothing was in flight"
    writer.join(timeout=300)
    assert_equal_to_fresh_replay(pl)
    assert all(proc.poll() is None for proc in second)


@pytest.mark.skipif(not stack_control.managed(), reason="needs the local stack to restart PostgreSQL")
def test_postgres_restart_under_a_consumer_is_retried(pl: Pipeline) -> None:
    pl.start_relay()
    # The consumer's own engine, as in a consumer process: the test's reads must not be the ones
    # that discover the cut connections.
    engine = postgres_engine(pl.settings)
    own = PostgresTarget(engine, OrderViews(), schema=pl.views_schema)
    views = pl.start_consumer(own, initial_backoff=0.2)
    customer, products = pl.seed_catalog(2)
    pl.order_flow(customer, products, 10)
    pl.wait_caught_up(pl.views)
    stack_control.restart_postgres()
    pl.store.pool.check()  # the test's own reads go through the store's pool: drop its cut connections

    # The writers' pools hold cut connections too: retry each command until PostgreSQL answers.
    def place() -> bool:
        try:
            pl.order_flow(customer, products, 1)
        except Exception:
            return False
        return True

    for _ in range(5):
        wait_until(place, timeout=60, what="PostgreSQL to take commands again")
    pl.wait_caught_up(pl.views, timeout=120)
    assert views.stats.retries >= 1
    assert pl.read_model(pl.views) == pl.read_model(pl.fresh_replay(pl.views))
    assert views.running.is_set()
    engine.dispose()
