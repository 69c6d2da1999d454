"""What the order queries return: frozen pydantic models, safe to cache and to serialize as they are."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Generic, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from domain.order import OrderStatus

T = TypeVar("T")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class OrderLineView(_Frozen):
    """One line of an order: units of a product at the price it was ordered at."""

    product_id: UUID
    quantity: int
    unit_price: Decimal

    @property
    def subtotal(self) -> Decimal:
        """``quantity`` times ``unit_price``."""
        return self.quantity * self.unit_price


class OrderSummary(_Frozen):
    """An order as of its stream ``version``: status, totals, payment, and lines ordered by product id.

    Times are when the store recorded the events: ``placed_at`` the Placed event, ``updated_at`` the
    latest, ``paid_at`` the Paid event (None until paid).
    """

    order_id: UUID
    customer_id: UUID
    status: OrderStatus
    line_count: int
    units: int
    total: Decimal
    paid_amount: Decimal | None
    paid_at: datetime | None
    cancellation_reason: str | None
    lines: tuple[OrderLineView, ...]
    placed_at: datetime
    updated_at: datetime
    version: int


class DailySales(_Frozen):
    """A product's paid sales on one UTC day, net of paid orders cancelled since."""

    day: date
    product_id: UUID
    units: int
    revenue: Decimal
    orders: int


class ProductStock(_Frozen):
    """A product's price and stock: units received, held by orders, and still available."""

    product_id: UUID
    sku: str
    name: str
    price: Decimal
    received: int
    reserved: int
    available: int


class BestSeller(_Frozen):
    """A product and the units orders hold of it (reserved and not released; shipped units count)."""

    product_id: UUID
    units: int


class Page(_Frozen, Generic[T]):
    """One page of results; pass ``next_cursor`` as ``after`` for the next, None when this is the last."""

    items: tuple[T, ...]
    next_cursor: str | None
