"""Blue/green rebuilds, generations and verify on real servers, with writers and consumers running."""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
from sqlalchemy import Engine, delete, text, update

from consumers.live import LiveConsumer, group_for
from consumers.parallel_replay import WorkerFailed
from consumers.rebuild import Rebuild, RebuildOptions, RebuildProgress
from datalayer.settings import Settings
from domain import Order
from eventstore import EventStore
from projections.events import ProjectedEvent
from projections.generations import ACTIVE, BUILDING, REDIS_ALIASES, PostgresGenerations, RedisGenerations
from projections.log_reader import partition_bounds
from projections.orders import OrderCache, OrderCacheQueries, OrderQueries, OrderViews
from projections.orders.tables import order_summaries
from projections.projection import Projection, handles
from projections.target import ProjectionTarget
from projections.targets import PostgresTarget, RedisTarget, SqlWrites
from projections.verify import verify
from tests.helpers import unique_name, wait_until
from tests.pipeline import Pipeline, dead_letters, pipeline


@dataclass
class ReadModels:
    """One projection, renamed uniquely for this test, with its registry and targets."""

    projection: Projection[Any]
    registry: PostgresGenerations | RedisGenerations
    engine: Engine
    client: redis.Redis

    def target(self, generation: str) -> ProjectionTarget[Any]:
        if isinstance(self.registry, PostgresGenerations):
            return PostgresTarget(self.engine, self.projection, schema=generation)  # type: ignore[arg-type]
        return RedisTarget(self.client, self.projection, prefix=RedisGenerations.prefix(generation))  # type: ignore[arg-type]

    def drop(self, generation: str) -> None:
        self.target(generation).drop()  # type: ignore[attr-defined]

    def active_target(self) -> ProjectionTarget[Any]:
        active = self.registry.active(self.projection.name)
        assert active is not None
        return self.target(active.name)

    def cleanup(self) -> None:
        name = self.projection.name
        for generation in self.registry.generations(name):
            self.drop(generation.name)
        if isinstance(self.registry, PostgresGenerations):
            with self.engine.begin() as conn:
                conn.execute(
                    text("DELETE FROM datalayer_read_models.generations WHERE projection = :p"), {"p": name}
                )
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        else:
            self.client.delete(f"dl:generations:{name}")
            self.client.hdel(REDIS_ALIASES, name)


def renamed(base: type[Projection[Any]], name: str) -> Projection[Any]:
    return type(base.__name__, (base,), {"name": name})()


@pytest.fixture
def pl(settings: Settings, store: EventStore, engine: Engine, redis_conn: redis.Redis) -> Iterator[Pipeline]:
    with pipeline(settings, store, engine, redis_conn) as p:
        yield p


@pytest.fixture(params=["postgres", "redis"])
def models(request: pytest.FixtureRequest, engine: Engine, redis_conn: redis.Redis) -> Iterator[ReadModels]:
    if request.param == "postgres":
        found = ReadModels(
            renamed(OrderViews, unique_name("ov")), PostgresGenerations(engine), engine, redis_conn
        )
    else:
        found = ReadModels(
            renamed(OrderCache, unique_name("oc")), RedisGenerations(redis_conn), engine, redis_conn
        )
    yield found
    found.cleanup()


def rebuild(pl: Pipeline, models: ReadModels, **options: Any) -> Rebuild:
    return Rebuild(
        models.projection,
        models.registry,
        models.target,
        models.drop,
        pl.store,
        pl.settings.kafka_config(),
        pl.consumer_config(),
        RebuildOptions(**{"batch_size": 100, "handover_timeout": 60, **options}),
    )


def start_live_consumer(pl: Pipeline, models: ReadModels) -> LiveConsumer:
    live = LiveConsumer(
        models.projection,
        models.registry,
        models.target,
        pl.settings.kafka_config(),
        pl.consumer_config(),
        check_interval=0.2,
    )
    pl._thread(live.run)
    return live


@pytest.mark.parametrize("workers", [1, 2])
def test_rebuild_under_load_hands_over_and_equals_a_fresh_replay(
    pl: Pipeline, models: ReadModels, workers: int
) -> None:
    pl.start_relay()
    customer, products = pl.seed_catalog(3)
    pl.order_flow(customer, products, 20)
    live = start_live_consumer(pl, models)
    first = wait_until(lambda: models.registry.active(models.projection.name), what="the first generation")
    assert first.name == models.projection.qualified_name
    writing = pl.keep_writing(customer, products)
    wait_until(lambda: live.current is not None and live.current.stats.applied > 50, what="live progress")

    report = rebuild(pl, models, workers=workers).run(threading.Event())

    assert report.generation == f"{first.name}_r1"
    assert report.activated and report.handed_over
    assert report.replayed.applied > 0 and report.caught_up_events > 0
    wait_until(lambda: live.generation is not None and live.generation.name == report.generation, what="move")
    statuses = {g.name: g.status for g in models.registry.generations(models.projection.name)}
    assert statuses == {first.name: "retired", report.generation: ACTIVE}
    # Writers kept going through the whole rebuild and after the switch.
    moved_at = live.current.stats.applied if live.current else 0
    wait_until(lambda: live.current is not None and live.current.stats.applied > moved_at + 20, what="more")
    writing.set()
    wait_until(pl.writes_stopped.is_set, what="the writer to stop")
    new = models.active_target()
    pl.wait_caught_up(new)  # type: ignore[arg-type]
    fresh = pl.fresh_replay(new)  # type: ignore[arg-type]
    assert pl.read_model(new) == pl.read_model(fresh)  # type: ignore[arg-type]
    # Readers follow the alias to the new generation.
    if isinstance(models.registry, PostgresGenerations):
        via_alias = OrderQueries(pl.engine, schema=models.projection.name).list_orders(limit=500).items
        direct = OrderQueries(pl.engine, schema=report.generation).list_orders(limit=500).items
        # More than the 20 seeded orders: the writer's orders are there too (how many depends on load).
        assert via_alias == direct and len(direct) > 20
    else:
        queries = OrderCacheQueries(pl.redis, projection=models.projection.name)
        assert queries.prefix == RedisGenerations.prefix(report.generation)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_interrupted_rebuild_resumes(
    pl: Pipeline, engine: Engine, redis_conn: redis.Redis, workers: int
) -> None:
    models = ReadModels(
        renamed(OrderViews, unique_name("ov")), PostgresGenerations(engine), engine, redis_conn
    )
    try:
        pl.start_relay()
        customer, products = pl.seed_catalog(2)
        pl.order_flow(customer, products, 60)
        stop = threading.Event()
        seen: list[RebuildProgress] = []

        def interrupt(progress: RebuildProgress) -> None:
            seen.append(progress)
            if progress.phase == "replay" and progress.events_read >= 50:
                stop.set()

        first = Rebuild(
            models.projection, models.registry, models.target, models.drop, pl.store,
            pl.settings.kafka_config(), pl.consumer_config(), RebuildOptions(batch_size=25, workers=workers),
            on_progress=interrupt,
        )  # fmt: skip
        interrupted = first.run(stop)
        assert not interrupted.activated
        (building,) = models.registry.generations(models.projection.name)
        assert building.status == BUILDING and building.name == interrupted.generation
        assert 50 <= seen[-1].events_read < seen[-1].total

        if workers > 1:
            # Each partition stopped at a checkpoint of its own.
            stored = models.target(building.name).checkpoints()
            assert {f"log:{i}/{workers}" for i in range(workers)} <= stored.keys()
        resumed = rebuild(pl, models, handover_timeout=0.5, workers=workers).run(threading.Event())
        assert resumed.generation == interrupted.generation and resumed.activated
        # It went on from its checkpoint instead of starting over.
        assert resumed.replayed.applied + resumed.replayed.duplicates < seen[-1].total
        target = models.active_target()
        assert pl.read_model(target) == pl.read_model(pl.fresh_replay(target))  # type: ignore[arg-type]
    finally:
        models.cleanup()


def test_a_rebuild_takes_streams_new_to_its_batches_as_fresh(
    pl: Pipeline, engine: Engine, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Kafka ends a rebuild pins before replaying are no sign that Kafka fed the generation:
    its replay still reads no versions of streams that start in a batch, and equals a fresh replay."""
    models = ReadModels(
        renamed(OrderViews, unique_name("ov")), PostgresGenerations(engine), engine, redis_conn
    )
    # The module, not the function that projections exports under the same name.
    replay_module = importlib.import_module("projections.replay")
    flags: list[bool] = []
    original = replay_module.apply_batch

    def spy(*args: Any, fresh_streams: bool = False, **kwargs: Any) -> Any:
        flags.append(fresh_streams)
        return original(*args, fresh_streams=fresh_streams, **kwargs)

    monkeypatch.setattr(replay_module, "apply_batch", spy)
    try:
        pl.start_relay()
        customer, products = pl.seed_catalog(2)
        pl.order_flow(customer, products, 30)
        report = rebuild(pl, models, handover_timeout=0.5, batch_size=20).run(threading.Event())
        assert report.activated
        assert len(flags) > 1 and all(flags)  # nothing could be applied before any of its batches
        target = models.active_target()
        assert pl.read_model(target) == pl.read_model(pl.fresh_replay(target))  # type: ignore[arg-type]
    finally:
        models.cleanup()


def test_a_failed_replay_worker_fails_the_rebuild_and_a_rerun_completes_it(
    pl: Pipeline, engine: Engine, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    models = ReadModels(
        renamed(OrderCache, unique_name("oc")), RedisGenerations(redis_conn), engine, redis_conn
    )
    parent = os.getpid()
    claimed = tmp_path / "first-worker"

    def first_worker_fails(generation: str) -> ProjectionTarget[Any]:
        if os.getpid() != parent:
            try:  # the first worker to get here fails, the other goes on
                os.close(os.open(claimed, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                raise RuntimeError("this worker cannot reach its target")
        return models.target(generation)

    try:
        pl.start_relay()
        customer, products = pl.seed_catalog(2)
        pl.order_flow(customer, products, 40)
        failing = Rebuild(
            models.projection, models.registry, first_worker_fails, models.drop, pl.store,
            pl.settings.kafka_config(), pl.consumer_config(), RebuildOptions(batch_size=20, workers=2),
        )  # fmt: skip
        with pytest.raises(WorkerFailed, match="cannot reach its target"):
            failing.run(threading.Event())
        (building,) = models.registry.generations(models.projection.name)
        assert building.status == BUILDING

        resumed = rebuild(pl, models, handover_timeout=0.5, workers=2).run(threading.Event())
        assert resumed.generation == building.name and resumed.activated
        target = models.active_target()
        assert pl.read_model(target) == pl.read_model(pl.fresh_replay(target))  # type: ignore[arg-type]
    finally:
        models.cleanup()


def test_verify_passes_when_healthy_and_names_corruption(pl: Pipeline, models: ReadModels) -> None:
    pl.start_relay()
    customer, products = pl.seed_catalog(3)
    pl.order_flow(customer, products, 12)
    rebuild(pl, models, handover_timeout=0.5).run(threading.Event())
    live = models.active_target()
    shadow = models.target(unique_name("shadow"))
    try:
        report = verify(models.projection, live, shadow, pl.store)
        assert report.ok and report.compared >= 5  # redis: 3 stock hashes, statuses, leaderboard
    finally:
        shadow.drop()  # type: ignore[attr-defined]

    if isinstance(live, PostgresTarget):
        with pl.engine.begin() as conn:
            conn.execution_options(schema_translate_map={None: live.schema})
            ids = [
                r[0]
                for r in conn.execute(order_summaries.select().with_only_columns(order_summaries.c.order_id))
            ]
            conn.execute(
                update(order_summaries).where(order_summaries.c.order_id == ids[0]).values(units=999)
            )
            conn.execute(delete(order_summaries).where(order_summaries.c.order_id == ids[1]))
        expected = {
            ("different", "order_summaries", str(ids[0])),
            ("missing", "order_summaries", str(ids[1])),
        }
    else:
        assert isinstance(live, RedisTarget)
        pl.redis.hset(live.key(f"stock:{products[0]}"), "available", 12345)
        pl.redis.delete(live.key(f"stock:{products[1]}"))
        expected = {
            ("different", "redis", f"stock:{products[0]}"),
            ("missing", "redis", f"stock:{products[1]}"),
        }
    shadow = models.target(unique_name("shadow"))
    try:
        report = verify(models.projection, live, shadow, pl.store)
    finally:
        shadow.drop()  # type: ignore[attr-defined]
    assert not report.ok
    assert {(d.kind, d.where, d.key) for d in report.differences} == expected


def test_live_consumer_waits_for_a_rebuild_of_its_own_version(
    pl: Pipeline, engine: Engine, redis_conn: redis.Redis
) -> None:
    v1 = renamed(OrderViews, unique_name("ov"))
    models = ReadModels(v1, PostgresGenerations(engine), engine, redis_conn)
    v2 = type("OrderViewsV2", (type(v1),), {"version": 2})()
    models_v2 = ReadModels(v2, models.registry, engine, redis_conn)
    try:
        pl.start_relay()
        customer, products = pl.seed_catalog(2)
        pl.order_flow(customer, products, 10)
        start_live_consumer(pl, models)
        wait_until(lambda: models.registry.active(v1.name), what="v1 to be active")
        waiting = start_live_consumer(pl, models_v2)
        wait_until(lambda: waiting.waiting_for, what="v2 to wait")
        assert "datalayer rebuild" in (waiting.waiting_for or "")
        report = rebuild(pl, models_v2).run(threading.Event())
        assert report.generation == f"{v1.name}_v2" and report.activated and report.handed_over
        assert waiting.generation is not None and waiting.generation.name == report.generation
        assert group_for(report.generation) == f"datalayer.projection.{v1.name}_v2"
    finally:
        models.cleanup()


class _PoisonedViews(OrderViews):
    """Order views whose Paid handler fails for the orders listed in ``poisoned``."""

    poisoned: ClassVar[set[str]] = set()

    @handles(Order.Paid)
    def paid(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        if event.stream_id in self.poisoned:
            raise RuntimeError(f"cannot apply payment of {event.stream_id}")
        super().paid(event, writes)


def test_a_parallel_rebuild_sends_every_partitions_dead_letters_to_the_topic(
    pl: Pipeline, engine: Engine, redis_conn: redis.Redis
) -> None:
    models = ReadModels(
        renamed(_PoisonedViews, unique_name("pv")), PostgresGenerations(engine), engine, redis_conn
    )
    try:
        customer, (product,) = pl.seed_catalog(1)
        # One poisoned order in each of the two partitions: the rebuild's own and its worker's.
        bad: dict[int, str] = {}
        while len(bad) < 2:
            order = pl.commands.place_order(
                {"customer_id": customer, "lines": [{"product_id": product, "quantity": 1}]}
            ).stream_id
            pl.commands.pay_order({"order_id": order, "amount": Decimal("2.50")})
            half = 0 if order <= partition_bounds(0, 2)[1] else 1
            bad.setdefault(half, str(order))
        _PoisonedViews.poisoned.update(bad.values())
        report = rebuild(pl, models, handover_timeout=0.5, workers=2).run(threading.Event())
        assert report.activated and report.replayed.dead_letters == 2
        letters = dead_letters(pl, models.projection.name, 2)
        assert sorted(dict(r.headers)["dlq.stream_id"].decode() for r in letters) == sorted(bad.values())
        assert {dict(r.headers)["dlq.reason"] for r in letters} == {b"poison"}
        assert {dict(r.headers)["dlq.source"] for r in letters} == {b"store"}
    finally:
        _PoisonedViews.poisoned.clear()
        models.cleanup()
