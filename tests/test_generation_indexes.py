"""A generation being built gets its non-unique indexes at activation, before any reader sees it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Engine, text

from projections.generations import PostgresGenerations, deferred_indexes
from projections.orders import OrderQueries, OrderViews
from projections.orders.tables import metadata, order_summaries
from projections.targets import PostgresTarget
from tests.helpers import unique_name

ALL_INDEXES = {
    "order_summaries_pkey",
    "order_summaries_customer_idx",
    "order_summaries_status_idx",
    "order_summaries_placed_idx",
    "order_summaries_total_idx",
    "daily_product_sales_pkey",
    "daily_product_sales_product_idx",
    "projection_stream_versions_pkey",
    "projection_checkpoints_pkey",
}
UNIQUE_ONLY = {name for name in ALL_INDEXES if name.endswith("_pkey")}


def indexes(engine: Engine, schema: str) -> set[str]:
    with engine.connect() as conn:
        found = conn.execute(
            text("SELECT indexname FROM pg_indexes WHERE schemaname = :s"), {"s": schema}
        ).scalars()
        return set(found)


@pytest.fixture
def projection(engine: Engine) -> Iterator[OrderViews]:
    name = unique_name("ovidx")
    found: OrderViews = type("OrderViews", (OrderViews,), {"name": name})()
    yield found
    registry = PostgresGenerations(engine)
    for generation in registry.generations(name):
        PostgresTarget(engine, found, schema=generation.name).drop()
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM datalayer_read_models.generations WHERE projection = :p"), {"p": name})
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def write_summary(target: PostgresTarget, order_id: str, customer_id: uuid.UUID) -> None:
    now = datetime.now(UTC)
    with target.batch() as batch:
        batch.applied_versions([order_id])
        batch.writes.upsert(
            order_summaries,
            {
                "order_id": order_id,
                "customer_id": customer_id,
                "status": "placed",
                "line_count": 0,
                "units": 0,
                "total": Decimal("0.00"),
                "paid_amount": None,
                "paid_at": None,
                "cancellation_reason": None,
                "lines": {},
                "placed_at": now,
                "updated_at": now,
                "version": 1,
            },
        )
        batch.commit({order_id: 1}, {})


def test_the_deferred_indexes_are_the_non_unique_ones() -> None:
    assert {str(index.name) for index in deferred_indexes(metadata)} == {
        name for name in ALL_INDEXES - UNIQUE_ONLY if not name.startswith("projection_")
    }


def test_a_building_generation_gets_its_indexes_when_activated(
    engine: Engine, projection: OrderViews
) -> None:
    registry = PostgresGenerations(engine)
    first = registry.create(projection)
    assert first is not None
    target = PostgresTarget(engine, projection, schema=first.name)
    target.setup()
    target.setup()  # idempotent, and a resumed build still defers them
    assert indexes(engine, first.name) == UNIQUE_ONLY

    order_id, customer_id = str(uuid.uuid4()), uuid.uuid4()
    write_summary(target, order_id, customer_id)
    registry.activate(projection, first.name)
    assert indexes(engine, first.name) == ALL_INDEXES
    history = OrderQueries(engine, schema=projection.name).customer_orders(customer_id)
    assert [str(order.order_id) for order in history.items] == [order_id]

    target.setup()  # a consumer's setup of the active generation changes nothing
    assert indexes(engine, first.name) == ALL_INDEXES


def test_a_target_outside_the_registry_gets_every_index(engine: Engine) -> None:
    target = PostgresTarget(engine, OrderViews(), schema=unique_name("ovidx_plain"))
    target.setup()
    try:
        assert indexes(engine, target.schema) == ALL_INDEXES
    finally:
        target.drop()
