"""The typed read API over the order read models: ``order_views`` in PostgreSQL, ``order_cache`` in Redis.

Listings page by keyset, never by offset: a page costs the same however deep it is, and rows added
meanwhile neither repeat nor vanish between pages. A cursor is opaque to callers: urlsafe base64 of
JSON holding the sort it belongs to and the last row's sort key and id.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, cast
from uuid import UUID

import redis
from sqlalchemy import ColumnElement, Engine, RowMapping, Select, select, tuple_

from domain.order import OrderStatus
from projections.generations import REDIS_ALIASES
from projections.orders.models import BestSeller, DailySales, OrderLineView, OrderSummary, Page, ProductStock
from projections.orders.order_cache import BEST_SELLERS, ORDER_STATUS, OrderCache, stock_key
from projections.orders.order_views import OrderViews
from projections.orders.tables import daily_product_sales, order_summaries

MAX_LIMIT = 500

OrderSort = Literal["placed_at", "total"]
# A sorted set range read with scores.
Scored = list[tuple[bytes | str, float]]


class OrderQueries:
    """Orders and daily sales from the ``order_views`` tables in ``schema``.

    ``schema`` defaults to ``order_views``, the alias whose views follow the active generation, so
    a blue/green rebuild switches these queries over atomically. Each query is served by an index
    of :mod:`projections.orders.tables`: by customer, by status, by placement or by total for
    orders; by day, or by product then day, for sales.
    """

    def __init__(self, engine: Engine, schema: str = OrderViews.name) -> None:
        # The tables are defined without a schema; this maps them into the read model's.
        self._engine = engine.execution_options(schema_translate_map={None: schema})

    def get_order(self, order_id: UUID) -> OrderSummary | None:
        """The order's summary, or None if the read model has not seen it (yet)."""
        query = select(order_summaries).where(order_summaries.c.order_id == order_id)
        with self._engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _summary(row) if row is not None else None

    def list_orders(
        self,
        *,
        status: OrderStatus | None = None,
        customer_id: UUID | None = None,
        placed_from: datetime | None = None,
        placed_to: datetime | None = None,
        sort: OrderSort = "placed_at",
        descending: bool = False,
        limit: int = 50,
        after: str | None = None,
    ) -> Page[OrderSummary]:
        """Orders matching every filter given, sorted by ``sort`` then order id, one page at a time.

        ``placed_from`` is inclusive and ``placed_to`` exclusive; both must be timezone-aware.
        ``after`` is a previous page's ``next_cursor`` for the same sort and direction.
        """
        _check_limit(limit)
        if sort not in ("placed_at", "total"):
            raise ValueError(f"sort must be 'placed_at' or 'total', got {sort!r}")
        table = order_summaries.c
        conditions: list[ColumnElement[bool]] = []
        if status is not None:
            conditions.append(table.status == OrderStatus(status).value)
        if customer_id is not None:
            conditions.append(table.customer_id == customer_id)
        if placed_from is not None:
            conditions.append(table.placed_at >= _aware(placed_from, "placed_from"))
        if placed_to is not None:
            conditions.append(table.placed_at < _aware(placed_to, "placed_to"))
        order = f"-{sort}" if descending else sort
        key_column = table.placed_at if sort == "placed_at" else table.total
        query = select(order_summaries).where(*conditions)
        parse = datetime.fromisoformat if sort == "placed_at" else _decimal
        key = (key_column, table.order_id)
        rows = _page(self._engine, query, key, parse, order, descending, limit, after)
        items = tuple(_summary(row) for row in rows[:limit])
        next_cursor = None
        if len(rows) > limit:
            last = items[-1]
            next_cursor = _cursor(order, last.placed_at if sort == "placed_at" else last.total, last.order_id)
        return Page[OrderSummary](items=items, next_cursor=next_cursor)

    def customer_orders(
        self, customer_id: UUID, limit: int = 50, after: str | None = None
    ) -> Page[OrderSummary]:
        """A customer's orders, newest first."""
        return self.list_orders(
            customer_id=customer_id, sort="placed_at", descending=True, limit=limit, after=after
        )

    def daily_sales(
        self,
        *,
        product_id: UUID | None = None,
        day_from: date | None = None,
        day_to: date | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page[DailySales]:
        """Sales per product and UTC day, by day then product id; ``day_from`` and ``day_to`` inclusive.

        Days on which every paid order of the product was cancelled later are left out.
        """
        _check_limit(limit)
        table = daily_product_sales.c
        conditions: list[ColumnElement[bool]] = [table.orders != 0]
        if product_id is not None:
            conditions.append(table.product_id == product_id)
        if day_from is not None:
            conditions.append(table.day >= day_from)
        if day_to is not None:
            conditions.append(table.day <= day_to)
        query = select(daily_product_sales).where(*conditions)
        key = (table.day, table.product_id)
        rows = _page(self._engine, query, key, date.fromisoformat, "day", False, limit, after)
        items = tuple(DailySales.model_validate(dict(row)) for row in rows[:limit])
        next_cursor = _cursor("day", items[-1].day, items[-1].product_id) if len(rows) > limit else None
        return Page[DailySales](items=items, next_cursor=next_cursor)


class OrderCacheQueries:
    """Stock levels, order statuses and best sellers from the ``order_cache`` keys under ``prefix``.

    Without a ``prefix`` the queries follow the active generation: its prefix is read from the alias
    hash ``dl:read_models`` and kept for ``ALIAS_TTL`` seconds, so a blue/green switch reaches them
    within a second (until the first generation exists, the first one's prefix is used).
    """

    ALIAS_TTL = 1.0

    def __init__(
        self, client: redis.Redis, prefix: str | None = None, projection: str = OrderCache.name
    ) -> None:
        self._client = client
        self._fixed = prefix
        self._projection = projection
        self._alias: tuple[float, str] | None = None

    @property
    def prefix(self) -> str:
        """The key prefix the next query reads under."""
        if self._fixed is not None:
            return self._fixed
        now = time.monotonic()
        if self._alias is None or now - self._alias[0] > self.ALIAS_TTL:
            found = self._client.hget(REDIS_ALIASES, self._projection)
            prefix = (
                _text(found) if found is not None else f"dl:{{{self._projection}_v{OrderCache.version}}}:"
            )
            self._alias = (now, prefix)
        return self._alias[1]

    def stock(self, product_id: UUID) -> ProductStock | None:
        """The product's price and stock, or None if the cache has not seen it (yet)."""
        fields = {
            _text(k): _text(v) for k, v in self._client.hgetall(self._key(stock_key(product_id))).items()
        }
        if not fields:
            return None
        return ProductStock.model_validate({"product_id": product_id, **fields})

    def order_status(self, order_id: UUID) -> OrderStatus | None:
        """The order's status, or None if the cache has not seen it (yet)."""
        value = self._client.hget(self._key(ORDER_STATUS), str(order_id))
        return OrderStatus(_text(value)) if value is not None else None

    def best_sellers(self, limit: int = 10) -> list[BestSeller]:
        """The ``limit`` products with the most units held by orders, highest first, ties by product id.

        Products whose reservations were all released are left out.
        """
        _check_limit(limit)
        key = self._key(BEST_SELLERS)
        # Redis orders equal scores by member descending when reversed: fetch the whole tie at the
        # cut-off score too, then order by (score desc, id asc) here. The two reads are not atomic;
        # a score moving in between only makes the answer a mix of two moments a few ms apart.
        top = cast(
            Scored, self._client.zrevrangebyscore(key, "+inf", "(0", start=0, num=limit, withscores=True)
        )
        scores = {_text(member): int(score) for member, score in top}
        if len(top) == limit:
            cutoff = top[-1][1]
            ties = cast(Scored, self._client.zrangebyscore(key, cutoff, cutoff, withscores=True))
            scores.update((_text(member), int(score)) for member, score in ties)
        ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:limit]
        return [BestSeller(product_id=UUID(member), units=units) for member, units in ranked]

    def _key(self, relative: str) -> str:
        return f"{self.prefix}{relative}"


def _page(
    engine: Engine,
    query: Select[Any],
    key: tuple[ColumnElement[Any], ColumnElement[Any]],
    parse: Callable[[str], Any],
    order: str,
    descending: bool,
    limit: int,
    after: str | None,
) -> list[RowMapping]:
    """Up to ``limit + 1`` rows after the cursor in ``key`` order: one more tells whether a page follows."""
    if after is not None:
        value, last_id = _read_cursor(after, order, parse)
        # A row comparison, which PostgreSQL resolves as one seek on an index over (key, id).
        position = tuple_(*key)
        query = query.where(position < (value, last_id) if descending else position > (value, last_id))
    ordering = [column.desc() if descending else column.asc() for column in key]
    with engine.connect() as conn:
        return list(conn.execute(query.order_by(*ordering).limit(limit + 1)).mappings())


def _cursor(order: str, value: datetime | date | Decimal, last_id: UUID) -> str:
    """``order`` names the sort and direction (``total``, ``-placed_at``, ``day``) the cursor belongs to."""
    key = value.isoformat() if isinstance(value, date) else str(value)
    raw = json.dumps({"order": order, "key": key, "id": str(last_id)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _read_cursor(cursor: str, order: str, parse: Callable[[str], Any]) -> tuple[Any, UUID]:
    """The sort key and id in ``cursor``; a ValueError if it is malformed or belongs to another sort."""
    try:
        document = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        cursor_order, text, last_id = document["order"], document["key"], document["id"]
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError, KeyError):
        raise ValueError(f"not a valid cursor: {cursor!r}") from None
    if cursor_order != order:
        raise ValueError(
            f"the cursor belongs to sort {_describe(cursor_order)}, not {_describe(order)}: "
            "start this sort without a cursor"
        )
    try:
        return parse(text), UUID(last_id)
    except (ValueError, TypeError, AttributeError, InvalidOperation):
        raise ValueError(f"not a valid cursor: {cursor!r}") from None


def _describe(order: object) -> str:
    if isinstance(order, str) and order.startswith("-"):
        return f"{order[1:]!r} descending"
    return f"{order!r} ascending"


def _decimal(text: str) -> Decimal:
    value = Decimal(text)
    if not value.is_finite():
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _summary(row: RowMapping) -> OrderSummary:
    lines = tuple(
        OrderLineView(product_id=UUID(product_id), quantity=line["quantity"], unit_price=line["unit_price"])
        for product_id, line in sorted(row["lines"].items())
    )
    return OrderSummary.model_validate({**row, "lines": lines})


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}")


def _aware(moment: datetime, name: str) -> datetime:
    # A naive time would be read in the database session's time zone: silently wrong for most callers.
    if moment.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")
    return moment


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
