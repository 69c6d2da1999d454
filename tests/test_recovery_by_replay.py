"""Backups and event migrations end in a rebuild: the read models must come out as expected.

Export, import into an empty store, rebuild: identical read models. migrate-events with a renaming
function, then a rebuild on the new store: the read model the renamed events describe.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine

from datalayer.settings import Settings
from domain import OrderStatus
from eventstore import EventStore, NewEvent, RecordedEvent
from eventstore.migrate_events import NewStreamEvent, migrate_events
from eventstore.portable import export_log, import_log, open_export, open_import
from projections.orders import OrderCache, OrderQueries, OrderViews
from projections.replay import ReplayDeadLetters, replay
from projections.targets import PostgresTarget, RedisTarget
from tests.helpers import unique_name
from tests.pipeline import Pipeline, pg_contents, pipeline, redis_contents


@pytest.fixture
def pl(settings: Settings, store: EventStore, engine: Engine, redis_conn: redis.Redis) -> Iterator[Pipeline]:
    with pipeline(settings, store, engine, redis_conn) as p:
        yield p


def rebuilt(pl: Pipeline, store: EventStore) -> tuple[PostgresTarget, RedisTarget]:
    """Both orders read models replayed from ``store`` into fresh targets (dropped with the pipeline)."""
    views = PostgresTarget(pl.engine, OrderViews(), schema=unique_name("rv"))
    cache = RedisTarget(pl.redis, OrderCache(), prefix=f"dl:{{{unique_name('rc')}}}:")
    pl._replays += [views, cache]
    for target in (views, cache):
        target.setup()
        replay(target.projection, target, store)
    return views, cache


def test_export_import_then_rebuild_gives_identical_read_models(
    pl: Pipeline, empty_store: EventStore, tmp_path: Path
) -> None:
    customer, products = pl.seed_catalog(3)
    pl.order_flow(customer, products, 25)
    backup = str(tmp_path / "log.jsonl.gz")
    with open_export(backup) as out:
        exported = export_log(pl.store, out)
    with open_import(backup) as lines:
        imported = import_log(empty_store, lines)
    assert imported.events == exported.events > 100

    original_views, original_cache = rebuilt(pl, pl.store)
    restored_views, restored_cache = rebuilt(pl, empty_store)
    assert pg_contents(pl.engine, restored_views) == pg_contents(pl.engine, original_views)
    assert redis_contents(pl.redis, restored_cache.prefix) == redis_contents(pl.redis, original_cache.prefix)
    assert len(pg_contents(pl.engine, restored_views)["order_summaries"]) == 25


LEGACY_SHIPPED = "legacy.orders:OrderShipped"


def rename_legacy(event: RecordedEvent) -> Iterable[NewStreamEvent]:
    """The migration's user function: old writers' shipping events get today's event type."""
    if event.event_type == LEGACY_SHIPPED:
        return (NewStreamEvent.from_recorded(event, event_type="domain.order:Order.Shipped"),)
    return (NewStreamEvent.from_recorded(event),)


def test_migrate_events_renaming_then_a_rebuild_on_the_new_store(
    pl: Pipeline, empty_store: EventStore
) -> None:
    customer, (p0,) = pl.seed_catalog(1)
    placed = pl.commands.place_order({"customer_id": customer, "lines": [{"product_id": p0, "quantity": 1}]})
    pl.commands.pay_order({"order_id": placed.stream_id, "amount": "2.50"})
    # An event an older writer stored under a type this code does not know.
    payload = b'{"timestamp":{"_type_":"datetime_iso","_data_":"2026-11-25T12:00:00+00:00"}}'
    pl.store.append(
        placed.stream_id, "Order", [NewEvent(uuid.uuid4(), LEGACY_SHIPPED, payload)], expected_version=2
    )

    with pytest.raises(ReplayDeadLetters) as caught:
        rebuilt(pl, pl.store)
    assert [d.reason for d in caught.value.letters] == ["unknown_event_type"]
    # The dead letter carries the store's record of the event, exactly as stored.
    assert caught.value.letters[0].original == pl.store.read_stream(placed.stream_id)[-1]

    report = migrate_events(pl.store, empty_store, rename_legacy, transform_name="rename_legacy")
    assert report.ok
    views, _ = rebuilt(pl, empty_store)
    summary = OrderQueries(pl.engine, schema=views.schema).get_order(placed.stream_id)
    assert summary is not None and summary.status == OrderStatus.SHIPPED and summary.version == 3
    # The source is untouched: it still holds the legacy type.
    assert [e.event_type for e in pl.store.read_stream(placed.stream_id)][-1] == LEGACY_SHIPPED
