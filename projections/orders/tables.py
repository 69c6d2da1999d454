"""The tables of the ``order_views`` read model, without a schema: each target maps them into its own.

Every index here serves a query of :class:`projections.orders.queries.OrderQueries`; each ends with
the table's unique key so that keyset pagination can seek to an exact row.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

# One row per order, replaced whole by each of the order's events.
order_summaries = Table(
    "order_summaries",
    metadata,
    Column("order_id", Uuid, primary_key=True),
    Column("customer_id", Uuid, nullable=False),
    Column("status", Text, nullable=False),
    Column("line_count", Integer, nullable=False),
    Column("units", Integer, nullable=False),
    Column("total", Numeric(14, 2), nullable=False),
    Column("paid_amount", Numeric, nullable=True),
    Column("paid_at", DateTime(timezone=True), nullable=True),
    Column("cancellation_reason", Text, nullable=True),
    # product id (str) -> {"quantity": int, "unit_price": str}: a str keeps the price exact in JSON.
    Column("lines", JSONB, nullable=False),
    Column("placed_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # The order stream's version this row reflects: what read-your-writes compares against.
    Column("version", BigInteger, nullable=False),
    # A customer's history, newest first.
    Index("order_summaries_customer_idx", "customer_id", "placed_at", "order_id"),
    # Orders in one status, by placement.
    Index("order_summaries_status_idx", "status", "placed_at", "order_id"),
    # All orders by placement, optionally within a placement period.
    Index("order_summaries_placed_idx", "placed_at", "order_id"),
    # All orders by total.
    Index("order_summaries_total_idx", "total", "order_id"),
)

# Units, revenue and paid orders per product and UTC day of payment; only ever incremented, because
# several consumer processes add to the same rows at once.
daily_product_sales = Table(
    "daily_product_sales",
    metadata,
    Column("day", Date, nullable=False),
    Column("product_id", Uuid, nullable=False),
    Column("units", BigInteger, nullable=False),
    Column("revenue", Numeric(16, 2), nullable=False),
    Column("orders", Integer, nullable=False),
    # Every product on a range of days.
    PrimaryKeyConstraint("day", "product_id", name="daily_product_sales_pkey"),
    # One product over a range of days.
    Index("daily_product_sales_product_idx", "product_id", "day"),
)
