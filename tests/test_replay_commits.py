"""How a replay runs its batches: commits that do not wait for the WAL flush, and the garbage
collector paused between them.

Why it matters: ``synchronous_commit = off`` is safe for a replay only (its checkpoint is in the
same transaction and it resumes from it, see ``projections.replay``); a live consumer's commits, or
any other thread's on the same engine, must keep waiting for durability. And with the collector
paused, cyclic garbage must still be collected, so a replay's memory stays bounded.
"""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import redis
from sqlalchemy import Connection, Engine, event, select

from datalayer.settings import Settings
from domain import Order
from eventstore import EventStore
from projections.events import ProjectedEvent
from projections.orders import OrderViews
from projections.projection import handles
from projections.replay import ReplayStats, replay
from projections.targets import PostgresTarget
from projections.targets.sql_writes import SqlWrites
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


# eventsourcing creates the event classes at runtime, where mypy cannot see them.
_Order: Any = Order


class _Cyclic:
    """An object in a reference cycle with itself: only the cycle collector frees it."""

    def __init__(self) -> None:
        self.me = self
        self.ballast = [[n] for n in range(100)]  # tracked containers, so that the count grows


class LitteringViews(OrderViews):
    """Order views whose Placed handler leaves a reference cycle behind, weakly remembered."""

    litter: ClassVar[list[weakref.ref[_Cyclic]]] = []

    @handles(_Order.Placed)
    def placed(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        self.litter.append(weakref.ref(_Cyclic()))
        super().placed(event, writes)


def test_the_collector_is_paused_during_a_replay_and_cycles_are_still_collected(
    pl: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer, products = pl.seed_catalog(2)
    pl.order_flow(customer, products, 30)
    views = PostgresTarget(pl.engine, LitteringViews(), schema=unique_name("rv"))
    pl._replays.append(views)
    views.setup()
    # Low enough that a few events' litter passes it, as a real projection's would in a few batches.
    monkeypatch.setattr(sys.modules["projections.replay"], "_YOUNG_LIMIT", 1_000)
    LitteringViews.litter.clear()
    enabled: list[bool] = []
    alive: list[int] = []

    def on_batch(stats: ReplayStats) -> None:
        enabled.append(gc.isenabled())
        alive.append(sum(ref() is not None for ref in LitteringViews.litter))

    assert gc.isenabled()
    stats = replay(views.projection, views, pl.store, batch_size=10, on_batch=on_batch)
    assert stats.events_read > 60 and len(LitteringViews.litter) == 30
    assert not any(enabled)  # paused while the batches ran
    assert gc.isenabled()  # and running again after
    # Collected between batches: never more litter alive than a batch or two makes.
    assert max(alive) <= 20 and alive[-1] < len(LitteringViews.litter)
