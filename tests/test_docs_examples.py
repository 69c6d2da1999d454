"""The documentation's code examples run as written against the real servers."""

from __future__ import annotations

import re
import sys
import types
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

from sqlalchemy import Engine, select

from domain import CommandHandlers, OrdersApplication
from eventstore import EventStore
from projections.replay import replay
from projections.targets import PostgresTarget
from tests.helpers import unique_name

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(document: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / document).read_text(), flags=re.DOTALL)


def test_the_read_side_guides_projection_runs_as_written(
    engine: Engine, store: EventStore, es_env: dict[str, str]
) -> None:
    namespace: dict[str, Any] = {}
    exec(python_blocks("read-side.md")[0], namespace)
    target = PostgresTarget(engine, namespace["OrderLineCounts"](), schema=unique_name("doc"))
    target.setup()
    try:
        handlers = CommandHandlers(OrdersApplication(env=es_env))
        customer = handlers.register_customer({"name": "A", "email": "a@example.com", "address": "x"})
        products = [
            handlers.create_product({"sku": f"S{i}", "name": "n", "price": "1"}).stream_id for i in range(3)
        ]
        for pid in products:
            handlers.receive_stock({"product_id": pid, "quantity": 10})
        order = handlers.place_order(
            {"customer_id": customer.stream_id, "lines": [{"product_id": products[0], "quantity": 1}]}
        )
        for pid in products[1:]:
            handlers.add_order_line({"order_id": order.stream_id, "product_id": pid, "quantity": 1})
        replay(target.projection, target, store)
        table = namespace["order_lines"]
        with engine.connect().execution_options(schema_translate_map={None: target.schema}) as conn:
            rows = conn.execute(select(table.c.order_id, table.c.lines)).all()
        assert [(r.order_id, r.lines) for r in rows] == [(order.stream_id, 3)]
    finally:
        target.drop()


def test_the_tutorials_aggregate_projection_and_query_run_as_written(
    engine: Engine, store: EventStore, es_env: dict[str, str]
) -> None:
    # The tutorial's blocks are one module, reviews.py: run them as a module, so that eventsourcing
    # can resolve the event classes' topics when it reads them back.
    module = types.ModuleType(unique_name("docs_tutorial_reviews"))
    sys.modules[module.__name__] = module
    schema = unique_name("doc")
    try:
        for block in python_blocks("tutorial.md"):
            exec(block, module.__dict__)
        ns: Any = module
        app = ns.ReviewsApplication(env=es_env)
        good, poor = uuid4(), uuid4()
        app.write_review(good, 5, "great")
        app.write_review(good, 4, "good")
        withdrawn = app.write_review(good, 1, "wrong product")
        app.write_review(poor, 2, "meh")
        app.withdraw_review(withdrawn)
        app.withdraw_review(withdrawn)  # a second withdrawal records nothing
        try:
            ns.Review.write(good, 6, "too many")
            raise AssertionError("six stars were accepted")
        except ValueError as exc:
            assert "stars must be 1 to 5, got 6" in str(exc)

        target = PostgresTarget(engine, ns.ProductRatings(), schema=schema)
        target.setup()
        stats = replay(target.projection, target, store)
        assert stats.applied == 5
        assert ns.best_rated(engine, schema=schema) == [
            (good, Decimal("4.50"), 2),
            (poor, Decimal("2.00"), 1),
        ]
    finally:
        sys.modules.pop(module.__name__, None)
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
