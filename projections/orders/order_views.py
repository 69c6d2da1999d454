"""``order_views``: order summaries and daily product sales in PostgreSQL, for the order queries."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from domain.order import Order, OrderStatus
from projections.events import ProjectedEvent
from projections.orders import tables
from projections.orders.tables import daily_product_sales, order_summaries
from projections.projection import handles
from projections.targets.postgres import SqlProjection
from projections.targets.sql_writes import SqlWrites

# eventsourcing creates Order.Placed and the other event classes at runtime, where mypy cannot see them.
_Order: Any = Order

# A summary's lines: product id (str) -> {"quantity": int, "unit_price": str}, as stored in JSONB.
Lines = dict[str, dict[str, Any]]


class OrderViews(SqlProjection):
    """One summary row per order, and units, revenue and paid orders per product and day.

    Summaries serve single orders, listings by status, placement period or total, and each customer's
    order history, read from ``order_summaries`` through its ``(customer_id, placed_at, order_id)``
    index. Sales count from payment, on the UTC day the Paid event was recorded; cancelling a paid
    order takes its lines back off that same day.
    """

    name = "order_views"
    version = 1
    stream_types = ("Order",)
    application_name = "Orders"
    metadata = tables.metadata
    # Summaries are per order; daily sales change by increments only: partitions may replay at once.
    parallel_replay = True
    # Every handler reads the order's summary: loading them per batch makes that read free.
    prefetch = ("order_summaries",)

    @handles(_Order.Placed)
    def placed(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        data = event.data
        lines: Lines = {
            _id_text(line["product_id"]): _line(line["quantity"], line["unit_price"]) for line in data.lines
        }
        writes.upsert(
            order_summaries,
            {
                "order_id": event.stream_id,
                "customer_id": data.customer_id,
                "status": OrderStatus.PLACED.value,
                **_totals(lines),
                "paid_amount": None,
                "paid_at": None,
                "cancellation_reason": None,
                "lines": lines,
                "placed_at": event.recorded_at,
                "updated_at": event.recorded_at,
                "version": event.stream_version,
            },
        )

    @handles(_Order.LineAdded)
    def line_added(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        data = event.data
        lines = dict(self._summary(event, writes)["lines"])
        lines[_id_text(data.product_id)] = _line(data.quantity, data.unit_price)
        self._update(event, writes, lines=lines, **_totals(lines))

    @handles(_Order.LineRemoved)
    def line_removed(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        lines = dict(self._summary(event, writes)["lines"])
        lines.pop(_id_text(event.data.product_id), None)
        self._update(event, writes, lines=lines, **_totals(lines))

    @handles(_Order.Paid)
    def paid(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        paid_at = event.recorded_at
        row = self._update(
            event, writes, status=OrderStatus.PAID.value, paid_amount=event.data.amount, paid_at=paid_at
        )
        _count_sales(writes, row["lines"], _utc_day(paid_at), 1)

    @handles(_Order.Shipped)
    def shipped(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        self._update(event, writes, status=OrderStatus.SHIPPED.value)

    @handles(_Order.Cancelled)
    def cancelled(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        row = self._update(
            event, writes, status=OrderStatus.CANCELLED.value, cancellation_reason=event.data.reason
        )
        if row["paid_at"] is not None:
            _count_sales(writes, row["lines"], _utc_day(row["paid_at"]), -1)

    def _summary(self, event: ProjectedEvent, writes: SqlWrites) -> dict[str, Any]:
        # The stream id as it comes: writes key UUID columns by their canonical text, as it is.
        row = writes.get(order_summaries, {"order_id": event.stream_id})
        if row is None:
            # Unreachable when versions are checked (Placed is version 1); raising dead-letters the event.
            raise LookupError(f"order {event.stream_id} has no summary to update")
        return row  # get() hands out a copy already: no second one

    def _update(self, event: ProjectedEvent, writes: SqlWrites, **changes: Any) -> dict[str, Any]:
        """Write the order's whole summary back with ``changes``; returns the new row."""
        row = self._summary(event, writes)
        row.update(changes, updated_at=event.recorded_at, version=event.stream_version)
        writes.upsert(order_summaries, row)
        return row


def _line(quantity: int, unit_price: Decimal) -> dict[str, Any]:
    return {"quantity": quantity, "unit_price": str(unit_price)}


def _totals(lines: Lines) -> dict[str, Any]:
    """line_count, units and total, recomputed from the lines rather than patched, so they never drift."""
    units = 0
    total = Decimal(0)
    for line in lines.values():
        quantity = line["quantity"]
        units += quantity
        total += quantity * _price(line["unit_price"])
    return {"line_count": len(lines), "units": units, "total": total}


# Why these caches: a handful of products and prices recur in every batch, and each line of each
# event turned a product UUID into text (~1.5 µs) or a price text into a Decimal (~0.4 µs), where a
# lookup costs a fraction of that. Both values are immutable, so sharing them is safe; the size is
# bounded as sql_writes bounds its own.
_CACHE_LIMIT = 16_384
# ``str(value)`` of a product id (a UUID, or already its text), remembered.
_id_text: Callable[[Any], str] = lru_cache(maxsize=_CACHE_LIMIT)(str)
# ``Decimal(text)`` of a stored unit price, remembered.
_price: Callable[[str], Decimal] = lru_cache(maxsize=_CACHE_LIMIT)(Decimal)


def _count_sales(writes: SqlWrites, lines: Lines, day: date, sign: int) -> None:
    """Add (sign 1) or take back (sign -1) an order's lines on ``day``.

    Increments only: other processes add other orders to the same rows concurrently.
    """
    for product_id, line in lines.items():
        quantity = int(line["quantity"])
        writes.increment(
            daily_product_sales,
            {"day": day, "product_id": product_id},
            {
                "units": sign * quantity,
                "revenue": sign * quantity * _price(line["unit_price"]),
                "orders": sign,
            },
        )


def _utc_day(moment: datetime) -> date:
    # The store records timestamptz, so moments are aware; a naive one would be UTC already.
    if moment.tzinfo is None:
        return moment.date()
    return moment.astimezone(UTC).date()
