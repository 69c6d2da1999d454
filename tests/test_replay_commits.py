"""How a replay runs its batches: commits that do not wait for the WAL flush, and the garbage
collector paused between them.

Why it matters: ``synchronous_commit = off`` is safe for a replay only (its checkpoint is in the
same transaction and it resumes from it, see ``projections.replay``); a live consumer's commits, or
any other thread's on the same engine, must keep waiting for durability. And with the collector
paused, it must still collect between batches, so that cycles cannot pile up.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import Connection, Engine, event, select

from datalayer.settings import Settings
from eventstore import EventStore
from eventstore.records import LOG_START, LogPosition
from projections.orders import OrderViews
from projections.replay import ReplayStats, _nothing_applied_after, replay
from projections.targets import PostgresTarget
from tests.helpers import unique_name
from tests.pipeline import Pipeline, pg_contents, pipeline


@pytest.fixture
def pl(settings: Settings, store: EventStore, engine: Engine, redis_conn: redis.Redis) -> Iterator[Pipeline]:
    with pipeline(settings, store, engine, redis_conn) as p:
        yield p


def test_only_the_replaying_thread_commits_without_waiting_for_the_flush(pl: Pipeline) -> None:
    customer, products = pl.seed_catalog(2)
    pl.order_flow(customer, products, 12)
    views = PostgresTarget(pl.engine, OrderViews(), schema=unique_name("rv"))
    pl._replays.append(views)
    views.setup()
    # (thread, synchronous_commit) as each transaction on the engine commits.
    seen: list[tuple[str, str]] = []

    def on_commit(conn: Connection) -> None:
        with conn.connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
            cursor.execute("SHOW synchronous_commit")
            row = cursor.fetchone()
        assert row is not None
        seen.append((threading.current_thread().name, row[0]))

    def elsewhere() -> None:
        with pl.engine.begin() as conn:
            conn.execute(select(1))

    def on_batch(stats: ReplayStats) -> None:
        if stats.events_read <= 5:  # after the first batch: another thread's transaction meanwhile
            other = threading.Thread(target=elsewhere, name="other")
            other.start()
            other.join(timeout=30)

    event.listen(pl.engine, "commit", on_commit)
    try:
        stats = replay(views.projection, views, pl.store, batch_size=5, on_batch=on_batch)
        replayed = len(seen)
        elsewhere()  # this thread, after the replay
    finally:
        event.remove(pl.engine, "commit", on_commit)

    me = threading.current_thread().name
    assert stats.events_read > 15
    batches = (stats.events_read + 4) // 5
    assert [value for thread, value in seen[:replayed] if thread == me] == ["off"] * batches
    assert [value for thread, value in seen[:replayed] if thread != me] == ["on"]
    assert seen[replayed:] == [(me, "on")]
    # And the replay applied everything, as ever.
    assert len(pg_contents(pl.engine, views)["order_summaries"]) == 12


def test_the_collector_is_paused_during_a_replay_and_collects_between_batches(
    pl: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer, products = pl.seed_catalog(2)
    pl.order_flow(customer, products, 30)
    views = PostgresTarget(pl.engine, OrderViews(), schema=unique_name("rv"))
    pl._replays.append(views)
    views.setup()
    # Collections by events replayed only, every 20 (through the function's own globals: the module
    # object it was defined in, whatever sys.modules holds).
    monkeypatch.setitem(replay.__globals__, "_YOUNG_LIMIT", 10**9)
    monkeypatch.setitem(replay.__globals__, "_COLLECT_EVERY", 20)
    enabled: list[bool] = []
    collections: list[tuple[int, int]] = []  # (events read when it ran, generation)
    read = [0]

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append((read[0], info["generation"]))

    def on_batch(stats: ReplayStats) -> None:
        enabled.append(gc.isenabled())
        read[0] = stats.events_read

    assert gc.isenabled()
    gc.callbacks.append(on_collection)
    try:
        stats = replay(views.projection, views, pl.store, batch_size=10, on_batch=on_batch)
    finally:
        gc.callbacks.remove(on_collection)
    assert stats.events_read > 60
    assert not any(enabled)  # paused while the batches ran
    assert gc.isenabled()  # and running again after
    # Full collections, each after the batch that brought the count since the last one to 20: after
    # batches 2, 4, 6... (recorded with the events of the batch before, as on_batch runs after it).
    full = [events for events, generation in collections if generation == 2]
    assert full == [n * 20 - 10 for n in range(1, stats.events_read // 20 + 1)]
    assert len(pg_contents(pl.engine, views)["order_summaries"]) == 30


def test_a_replay_takes_new_streams_as_fresh_only_past_every_replays_checkpoint() -> None:
    """Streams starting at their initial version go unread only where nothing can have been applied:
    past every replay checkpoint of the target (a whole-log catch-up behind its partitions' must
    read, or poison events would be dead-lettered twice), and never once a Kafka consumer fed it."""
    assert _nothing_applied_after({}) == LOG_START
    assert _nothing_applied_after({"log": "5/10", "log:0/2": "7/3", "log:1/2": "6/20"}) == LogPosition(7, 3)
    assert _nothing_applied_after({"log": "5/10", "datalayer.events.Order:0": "12"}) is None
    # Where a rebuild pinned its Kafka start before replaying: fresh while no consumer moved it.
    pinned = {"log": "5/10", "datalayer.events.Order:0": "12", "pinned/datalayer.events.Order:0": "12"}
    assert _nothing_applied_after(pinned) == LogPosition(5, 10)
    assert _nothing_applied_after({**pinned, "datalayer.events.Order:0": "13"}) is None
    assert _nothing_applied_after({**pinned, "datalayer.events.Order:1": "0"}) is None
