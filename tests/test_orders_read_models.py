"""The orders read models against the real domain: events from the store, applied as a consumer would.

Every test drives ``OrdersApplication`` through its command handlers into a store schema of its own,
feeds the stored events through ``apply_batch`` in batches, and checks the read models against the
aggregates themselves.
"""

from __future__ import annotations

import base64
import json
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
import redis
from sqlalchemy import Engine, event, select, text

from domain.handlers import CommandHandlers, OrdersApplication
from domain.order import OrderStatus
from eventstore import EventStore, RecordedEvent
from projections.events import event_from_record
from projections.orders import (
    BestSeller,
    OrderCache,
    OrderCacheQueries,
    OrderQueries,
    OrderSummary,
    OrderViews,
    ProductStock,
)
from projections.orders.tables import metadata
from projections.projection import Projection
from projections.runner import BatchOutcome, DeadLetter, SourceItem, apply_batch
from projections.target import ProjectionTarget
from projections.targets.postgres import PostgresTarget
from projections.targets.redis import RedisTarget
from tests.helpers import read_all_settled, unique_name

BATCH = 40


@dataclass
class World:
    """What the scenario made: the ids of everything, for comparing read models with the aggregates."""

    app: OrdersApplication
    customers: list[UUID]
    products: list[UUID]
    orders: list[UUID]

    def event_count(self) -> int:
        # An aggregate's version is the number of its events.
        return (
            sum(self.app.get_customer(c).version for c in self.customers)
            + sum(self.app.get_product(p).version for p in self.products)
            + sum(self.app.get_order(o).version for o in self.orders)
        )


@pytest.fixture
def app(es_env: dict[str, str]) -> Iterator[OrdersApplication]:
    application = OrdersApplication(env=es_env)
    yield application
    application.close()


@pytest.fixture
def views(engine: Engine) -> Iterator[tuple[OrderViews, PostgresTarget]]:
    projection = OrderViews()
    target = PostgresTarget(engine, projection, schema=unique_name("ov"))
    target.setup()
    try:
        yield projection, target
    finally:
        target.drop()
        target.close()


@pytest.fixture
def cache(redis_conn: redis.Redis) -> Iterator[tuple[OrderCache, RedisTarget, str]]:
    projection = OrderCache()
    prefix = f"dl:{{{unique_name('oc')}}}:"
    target = RedisTarget(redis_conn, projection, prefix=prefix)
    target.setup()
    try:
        yield projection, target, prefix
    finally:
        target.drop()
        target.close()
        leftovers = list(redis_conn.scan_iter(prefix + "*"))
        if leftovers:
            redis_conn.delete(*leftovers)


def build_world(app: OrdersApplication, orders: int = 36, seed: int = 20240611) -> World:
    """Customers, products and orders in every state: edited, paid, shipped, cancelled before and after
    payment; two products tied at the top of the best sellers and one whose stock all came back."""
    h = CommandHandlers(app)
    rng = random.Random(seed)
    customers = [
        h.register_customer({"name": f"C{i}", "email": f"c{i}@example.com", "address": f"{i} Road"}).stream_id
        for i in range(3)
    ]
    prices = ["2.50", "10.00", "7.25", "2.50", "4.00"]
    products = [
        h.create_product({"sku": f"SKU-{i}", "name": f"Product {i}", "price": price}).stream_id
        for i, price in enumerate(prices)
    ]
    for product in products:
        h.receive_stock({"product_id": product, "quantity": 400})
    order_ids: list[UUID] = []
    for i in range(orders):
        if i == orders // 2:
            # Orders placed from here on carry the new price; earlier ones keep theirs.
            h.change_product_price({"product_id": products[0], "price": "3.00"})
            h.receive_stock({"product_id": products[1], "quantity": 25})
        chosen = rng.sample(products, rng.randint(1, 3))
        order_id = h.place_order(
            {
                "customer_id": rng.choice(customers),
                "lines": [{"product_id": p, "quantity": rng.randint(1, 3)} for p in chosen],
            }
        ).stream_id
        order_ids.append(order_id)
        if rng.random() < 0.3:
            missing = [p for p in products if p not in chosen]
            if missing:
                h.add_order_line({"order_id": order_id, "product_id": missing[0], "quantity": 2})
                chosen.append(missing[0])
        if rng.random() < 0.3 and len(chosen) > 1:
            h.remove_order_line({"order_id": order_id, "product_id": chosen[0]})
        fate = rng.choice(["placed", "paid", "shipped", "cancel_paid", "cancel_placed"])
        if fate != "placed" and fate != "cancel_placed":
            h.pay_order({"order_id": order_id, "amount": app.get_order(order_id).total})
        if fate == "shipped":
            h.ship_order({"order_id": order_id})
        if fate.startswith("cancel"):
            h.cancel_order({"order_id": order_id, "reason": f"reason {i}"})

    # Two products reserved far beyond the others, equally: a tie at the top of the leaderboard.
    tied = [h.create_product({"sku": f"TIE-{i}", "name": "Tie", "price": "1.00"}).stream_id for i in range(2)]
    for product in tied:
        h.receive_stock({"product_id": product, "quantity": 1000})
        order_ids.append(
            h.place_order(
                {"customer_id": customers[0], "lines": [{"product_id": product, "quantity": 900}]}
            ).stream_id
        )
    # A product whose only order was cancelled: every unit came back, so it is no best seller.
    returned = h.create_product({"sku": "BACK", "name": "Returned", "price": "9.99"}).stream_id
    h.receive_stock({"product_id": returned, "quantity": 5})
    order_id = h.place_order(
        {"customer_id": customers[1], "lines": [{"product_id": returned, "quantity": 5}]}
    ).stream_id
    h.pay_order({"order_id": order_id, "amount": Decimal("49.95")})
    h.cancel_order({"order_id": order_id, "reason": "changed mind"})
    order_ids.append(order_id)
    return World(app, customers, [*products, *tied, returned], order_ids)


def feed(
    projection: Projection[Any], target: ProjectionTarget[Any], events: Sequence[RecordedEvent]
) -> BatchOutcome:
    """Apply the events of the projection's stream types in batches, as a replay from the store would."""
    total = BatchOutcome()
    dead: list[DeadLetter] = []
    for start in range(0, len(events), BATCH):
        chunk = events[start : start + BATCH]
        items = [
            SourceItem(event_from_record(e), e) for e in chunk if e.stream_type in projection.stream_types
        ]
        outcome = apply_batch(projection, target, items, {"log": str(chunk[-1].log_position)}, dead.extend)
        total.applied += outcome.applied
        total.duplicates += outcome.duplicates
    assert dead == []
    return total


def settled_events(store: EventStore, world: World) -> list[RecordedEvent]:
    return read_all_settled(store, world.event_count())


def recorded_at(events: Sequence[RecordedEvent], stream_id: UUID, event_name: str) -> datetime:
    """When the store recorded the stream's event of that class (``Order.Paid``...)."""
    (moment,) = [
        e.recorded_at for e in events if e.stream_id == stream_id and e.event_type.endswith(event_name)
    ]
    return moment


def dump_views(engine: Engine, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        conn = conn.execution_options(schema_translate_map={None: schema})
        return {
            table.name: [tuple(row) for row in conn.execute(select(table).order_by(*table.primary_key))]
            for table in metadata.sorted_tables
        }


def dump_cache(client: redis.Redis, prefix: str) -> dict[bytes, Any]:
    dump: dict[bytes, Any] = {}
    for key in sorted(client.scan_iter(prefix + "*")):
        kind = client.type(key)
        if kind == b"hash":
            dump[key] = client.hgetall(key)
        elif kind == b"zset":
            dump[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"string":
            dump[key] = client.get(key)
        else:
            dump[key] = kind
    return dump


def test_order_views_match_the_domain(
    app: OrdersApplication, store: EventStore, engine: Engine, views: tuple[OrderViews, PostgresTarget]
) -> None:
    projection, target = views
    world = build_world(app)
    events = settled_events(store, world)
    feed(projection, target, events)
    queries = OrderQueries(engine, schema=target.schema)

    expected_sales: dict[tuple[date, UUID], list[Any]] = defaultdict(lambda: [0, Decimal(0), 0])
    for order_id in world.orders:
        order = app.get_order(order_id)
        summary = queries.get_order(order_id)
        assert summary is not None
        assert summary.customer_id == order.customer_id
        assert summary.status == order.status
        assert summary.total == order.total
        assert summary.units == sum(line.quantity for line in order.lines)
        assert summary.line_count == len(order.lines)
        assert {(v.product_id, v.quantity, v.unit_price) for v in summary.lines} == {
            (line.product_id, line.quantity, line.unit_price) for line in order.lines
        }
        assert [v.product_id for v in summary.lines] == sorted(v.product_id for v in summary.lines)
        assert summary.paid_amount == order.paid_amount
        assert summary.cancellation_reason == order.cancellation_reason
        assert summary.version == order.version
        assert summary.placed_at == recorded_at(events, order_id, "Order.Placed")
        if order.paid_amount is None:
            assert summary.paid_at is None
        else:
            paid_at = recorded_at(events, order_id, "Order.Paid")
            assert summary.paid_at == paid_at
            if order.status != OrderStatus.CANCELLED:
                for line in order.lines:
                    counted = expected_sales[(paid_at.astimezone(UTC).date(), line.product_id)]
                    counted[0] += line.quantity
                    counted[1] += line.subtotal
                    counted[2] += 1
    assert queries.get_order(world.customers[0]) is None

    sales = []
    page = queries.daily_sales(limit=2)
    sales.extend(page.items)
    while page.next_cursor is not None:
        page = queries.daily_sales(limit=2, after=page.next_cursor)
        sales.extend(page.items)
    assert {(s.day, s.product_id): [s.units, s.revenue, s.orders] for s in sales} == expected_sales
    assert len(sales) == len(expected_sales)
    assert [(s.day, s.product_id) for s in sales] == sorted(expected_sales)
    paid_totals = sum(
        (
            o.total
            for o in map(app.get_order, world.orders)
            if o.status in (OrderStatus.PAID, OrderStatus.SHIPPED)
        ),
        Decimal(0),
    )
    assert sum((s.revenue for s in sales), Decimal(0)) == paid_totals > 0

    # Narrowed by product and by days: the same rows, filtered.
    product = world.products[1]
    by_product = queries.daily_sales(product_id=product, limit=500).items
    assert list(by_product) == [s for s in sales if s.product_id == product]
    today = sales[0].day
    assert queries.daily_sales(day_from=today, day_to=today, limit=500).items == tuple(
        s for s in sales if s.day == today
    )
    assert queries.daily_sales(day_from=today + timedelta(days=1), limit=500).items == ()


def test_order_cache_matches_the_domain(
    app: OrdersApplication,
    store: EventStore,
    redis_conn: redis.Redis,
    cache: tuple[OrderCache, RedisTarget, str],
) -> None:
    projection, target, prefix = cache
    world = build_world(app)
    feed(projection, target, settled_events(store, world))
    queries = OrderCacheQueries(redis_conn, prefix=prefix)

    for product_id in world.products:
        product = app.get_product(product_id)
        assert queries.stock(product_id) == ProductStock(
            product_id=product_id,
            sku=product.sku,
            name=product.name,
            price=product.price,
            received=product.received,
            reserved=product.reserved,
            available=product.available,
        )
    assert queries.stock(world.orders[0]) is None
    for order_id in world.orders:
        assert queries.order_status(order_id) == app.get_order(order_id).status
    assert queries.order_status(world.products[0]) is None

    products = [app.get_product(p) for p in world.products]
    expected = [
        BestSeller(product_id=p.id, units=p.reserved)
        for p in sorted(products, key=lambda p: (-p.reserved, str(p.id)))
        if p.reserved > 0
    ]
    assert len(expected) == len(world.products) - 1  # the returned product is left out
    assert queries.best_sellers(limit=100) == expected
    assert queries.best_sellers() == expected[:10]
    # The top two tie at 900 units: a cut between them keeps the lower product id.
    assert expected[0].units == expected[1].units == 900
    assert queries.best_sellers(limit=1) == expected[:1]
    assert queries.best_sellers(limit=3) == expected[:3]
    for bad in (0, 501):
        with pytest.raises(ValueError, match="limit"):
            queries.best_sellers(limit=bad)


def test_default_cache_prefix_is_the_targets_until_a_generation_is_active(redis_conn: redis.Redis) -> None:
    name = unique_name("cache")
    renamed = type("RenamedCache", (OrderCache,), {"name": name})
    target = RedisTarget(redis_conn, renamed())
    assert OrderCacheQueries(redis_conn, projection=name).prefix == target.key("")


def test_keyset_pagination_returns_every_order_once(
    app: OrdersApplication, store: EventStore, engine: Engine, views: tuple[OrderViews, PostgresTarget]
) -> None:
    projection, target = views
    world = build_world(app)
    feed(projection, target, settled_events(store, world))
    queries = OrderQueries(engine, schema=target.schema)

    def walk(limit: int, **filters: Any) -> list[OrderSummary]:
        page = queries.list_orders(limit=limit, **filters)
        rows = list(page.items)
        while page.next_cursor is not None:
            assert len(page.items) == limit
            page = queries.list_orders(limit=limit, after=page.next_cursor, **filters)
            rows.extend(page.items)
        return rows

    everything = walk(500)
    assert {o.order_id for o in everything} == set(world.orders)
    assert len(everything) == len(world.orders)
    totals = [o.total for o in everything]
    assert len(set(totals)) < len(totals), "the scenario should make total ties, to test the tiebreak"

    for sort in ("placed_at", "total"):
        for descending in (False, True):
            for limit in (1, 7, len(world.orders), 500):
                rows = walk(limit, sort=sort, descending=descending)
                keys = [(getattr(o, sort), o.order_id) for o in rows]
                assert keys == sorted(keys, reverse=descending)
                assert len(rows) == len(world.orders)
                assert {o.order_id for o in rows} == set(world.orders)

    for status in OrderStatus:
        rows = walk(4, status=status, sort="total", descending=True)
        assert sorted(o.order_id for o in rows) == sorted(
            o.order_id for o in everything if o.status == status
        )

    for customer in world.customers:
        newest_first = sorted(
            (o for o in everything if o.customer_id == customer), key=lambda o: (o.placed_at, o.order_id)
        )[::-1]
        assert walk(3, customer_id=customer, descending=True) == newest_first
        pages = [queries.customer_orders(customer, limit=3)]
        while pages[-1].next_cursor is not None:
            pages.append(queries.customer_orders(customer, limit=3, after=pages[-1].next_cursor))
        assert [o for p in pages for o in p.items] == newest_first
        assert pages[-1].next_cursor is None

    by_placement = sorted(everything, key=lambda o: (o.placed_at, o.order_id))
    start, end = by_placement[5].placed_at, by_placement[20].placed_at
    window = walk(4, placed_from=start, placed_to=end)
    assert window == by_placement[5:20]
    with pytest.raises(ValueError, match="timezone-aware"):
        queries.list_orders(placed_from=start.replace(tzinfo=None))


def test_cursors_and_limits_are_validated(
    app: OrdersApplication, store: EventStore, engine: Engine, views: tuple[OrderViews, PostgresTarget]
) -> None:
    projection, target = views
    world = build_world(app, orders=6)
    feed(projection, target, settled_events(store, world))
    queries = OrderQueries(engine, schema=target.schema)

    by_placement = queries.list_orders(limit=2).next_cursor
    by_total = queries.list_orders(sort="total", limit=2).next_cursor
    sales = queries.daily_sales(limit=1).next_cursor
    assert by_placement and by_total and sales
    with pytest.raises(ValueError, match="sort 'placed_at' ascending, not 'total' ascending"):
        queries.list_orders(sort="total", after=by_placement)
    with pytest.raises(ValueError, match="sort 'total' ascending, not 'total' descending"):
        queries.list_orders(sort="total", descending=True, after=by_total)
    with pytest.raises(ValueError, match="sort 'placed_at' ascending, not 'day' ascending"):
        queries.daily_sales(after=by_placement)
    with pytest.raises(ValueError, match="sort 'day' ascending, not 'placed_at' descending"):
        queries.customer_orders(world.customers[0], after=sales)
    some_id = str(world.orders[0])
    garbage = [
        "",
        "not a cursor!",
        encode_cursor({}),
        encode_cursor(None),
        encode_cursor(["total", "1.00", some_id]),
        encode_cursor({"order": "total", "key": "x", "id": some_id}),
        encode_cursor({"order": "total", "key": "NaN", "id": some_id}),
        encode_cursor({"order": "total", "key": 1, "id": 1}),
        encode_cursor({"order": "total", "key": "1.00", "id": "not-a-uuid"}),
        encode_cursor({"order": "total", "key": "1.00"}),
    ]
    for cursor in garbage:
        with pytest.raises(ValueError, match="not a valid cursor"):
            queries.list_orders(sort="total", after=cursor)
    with pytest.raises(ValueError, match="not a valid cursor"):
        queries.daily_sales(after=encode_cursor({"order": "day", "key": "2024-13-01", "id": some_id}))
    # A well-formed cursor made by hand works: it is only a position.
    page = queries.list_orders(
        sort="total", after=encode_cursor({"order": "total", "key": "0", "id": some_id})
    )
    assert len(page.items) == len(world.orders)
    for bad in (0, -1, 501, True):
        with pytest.raises(ValueError, match="limit"):
            queries.list_orders(limit=bad)
        with pytest.raises(ValueError, match="limit"):
            queries.daily_sales(limit=bad)
    assert len(queries.list_orders(limit=500).items) == len(world.orders)
    with pytest.raises(ValueError, match="sort must be"):
        queries.list_orders(sort="units")  # type: ignore[arg-type]


def test_replaying_the_same_events_changes_nothing(
    app: OrdersApplication,
    store: EventStore,
    engine: Engine,
    redis_conn: redis.Redis,
    views: tuple[OrderViews, PostgresTarget],
    cache: tuple[OrderCache, RedisTarget, str],
) -> None:
    view_projection, view_target = views
    cache_projection, cache_target, prefix = cache
    world = build_world(app, orders=12)
    events = settled_events(store, world)
    first_views = feed(view_projection, view_target, events)
    first_cache = feed(cache_projection, cache_target, events)
    assert first_views.applied == sum(e.stream_type == "Order" for e in events)
    assert first_cache.applied == sum(e.stream_type in ("Order", "Product") for e in events)
    views_before = dump_views(engine, view_target.schema)
    cache_before = dump_cache(redis_conn, prefix)
    assert views_before["order_summaries"] and views_before["daily_product_sales"]

    again_views = feed(view_projection, view_target, events)
    again_cache = feed(cache_projection, cache_target, events)
    assert (again_views.applied, again_views.duplicates) == (0, first_views.applied)
    assert (again_cache.applied, again_cache.duplicates) == (0, first_cache.applied)
    assert dump_views(engine, view_target.schema) == views_before
    assert dump_cache(redis_conn, prefix) == cache_before
    assert view_target.checkpoints() == {"log": str(events[-1].log_position)}
    for order_id in world.orders:
        version = app.get_order(order_id).version
        assert view_target.applied_version(str(order_id)) == version
        assert cache_target.applied_version(str(order_id)) == version


@pytest.mark.parametrize(
    ("query", "filters", "index"),
    [
        ("list_orders", {"customer_id": "customer"}, "order_summaries_customer_idx"),
        ("list_orders", {"customer_id": "customer", "descending": True}, "order_summaries_customer_idx"),
        ("customer_orders", {"customer_id": "customer"}, "order_summaries_customer_idx"),
        ("list_orders", {"status": OrderStatus.PLACED}, "order_summaries_status_idx"),
        ("list_orders", {"status": OrderStatus.PLACED, "descending": True}, "order_summaries_status_idx"),
        ("list_orders", {}, "order_summaries_placed_idx"),
        ("list_orders", {"sort": "total", "descending": True}, "order_summaries_total_idx"),
        ("daily_sales", {}, "daily_product_sales_pkey"),
        ("daily_sales", {"product_id": "product"}, "daily_product_sales_product_idx"),
    ],
)
def test_queries_are_served_by_an_index(
    app: OrdersApplication,
    store: EventStore,
    engine: Engine,
    views: tuple[OrderViews, PostgresTarget],
    query: str,
    filters: dict[str, Any],
    index: str,
) -> None:
    projection, target = views
    world = build_world(app, orders=6)
    feed(projection, target, settled_events(store, world))
    queries = OrderQueries(engine, schema=target.schema)
    if filters.get("customer_id") == "customer":
        filters = {**filters, "customer_id": world.customers[0]}
    if filters.get("product_id") == "product":
        filters = {**filters, "product_id": queries.daily_sales(limit=1).items[0].product_id}
    run = getattr(queries, query)

    # Capture the exact statements the query runs (a first page, then a follow-up page with its
    # seek), then EXPLAIN them with sequential scans, bitmap scans and sorts priced out: at a few
    # dozen rows the planner rightly prefers those, so this asks whether an index scan that yields
    # the rows in order exists at all. Without one, the plan would still sort or scan the table.
    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        captured.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        page = run(limit=1, **filters)
        run(limit=1, after=page.next_cursor or _first_page_cursor(query, page), **filters)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert len(captured) == 2
    for statement, parameters in captured:
        with engine.connect() as conn:
            for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
                conn.execute(text(f"SET LOCAL {setting} = off"))
            plan = "\n".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + statement, parameters))
        assert "Seq Scan" not in plan, plan
        assert "Index Scan" in plan and index in plan, plan
        assert "Sort" not in plan, plan  # the index gives the order: no sort of the matching rows


def _first_page_cursor(query: str, page: Any) -> str | None:
    """A cursor at the page's only row: the follow-up page is empty, but its statement still seeks."""
    assert len(page.items) == 1
    if query != "daily_sales":
        return page.next_cursor  # type: ignore[no-any-return]
    row = page.items[0]
    return encode_cursor({"order": "day", "key": row.day.isoformat(), "id": str(row.product_id)})


def encode_cursor(document: Any) -> str:
    """A cursor as the queries make them, from any JSON: to forge valid and invalid ones."""
    return base64.urlsafe_b64encode(json.dumps(document).encode()).decode()
