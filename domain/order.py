"""The order aggregate: lines at the price they were placed at, then payment, shipping or cancellation.

Evolving an event, here or in the other aggregates: declare its class explicitly
(``class Paid(Aggregate.Event)`` with ``class_version = 2`` and a static ``upcast_v1_v2(state)``) and pass the
class to ``@event`` instead of the name; stored v1 events are then upcast on read. Stored topics are
``module:Class.Event``, so moving an aggregate to another module needs ``eventsourcing.utils.register_topic``
for its old topics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Self, TypedDict
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import (
    DuplicateOrderLine,
    EmptyOrder,
    InvalidPrice,
    InvalidQuantity,
    OrderAlreadyCancelled,
    OrderAlreadyPaid,
    OrderAlreadyShipped,
    OrderLineNotFound,
    OrderNotPaid,
    PaymentMismatch,
)


class OrderStatus(StrEnum):
    """Where an order is in its life: placed, then paid, then shipped; cancelled from placed or paid."""

    PLACED = "placed"
    PAID = "paid"
    SHIPPED = "shipped"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class OrderLine:
    """So many units of a product at a unit price fixed when the line was added."""

    product_id: UUID
    quantity: int
    unit_price: Decimal

    @property
    def subtotal(self) -> Decimal:
        """``quantity`` times ``unit_price``."""
        return self.quantity * self.unit_price


class OrderLineData(TypedDict):
    """An order line as events carry it: plain JSON-friendly data, so upcasters can rewrite it freely."""

    product_id: UUID
    quantity: int
    unit_price: Decimal


class Order(Aggregate):
    """A customer's order: at least one line, one per product.

    Lines can change only while the order is neither paid nor finished; it is paid with exactly its
    total; only a paid order ships; a shipped or cancelled order is final.
    """

    @classmethod
    def place(cls, customer_id: UUID, lines: Sequence[OrderLine]) -> Self:
        """Place an order (event ``Placed``) with at least one line, one per product."""
        if not lines:
            raise EmptyOrder(None)
        seen: set[UUID] = set()
        for line in lines:
            _check_line(None, line.quantity, line.unit_price)
            if line.product_id in seen:
                raise DuplicateOrderLine(None, line.product_id)
            seen.add(line.product_id)
        return cls(customer_id=customer_id, lines=[_as_data(line) for line in lines])

    # The Placed event's apply: it runs on placement and again on every replay, so it checks nothing.
    @event("Placed")
    def __init__(self, customer_id: UUID, lines: list[OrderLineData]) -> None:
        self.customer_id = customer_id
        # Copies: the event is frozen but its list and dicts are not, and must not change with the order.
        # Keyed by str(product id) because snapshots store this dict as JSON, whose keys are strings.
        self._lines: dict[str, OrderLineData] = {str(line["product_id"]): line.copy() for line in lines}
        self._status = OrderStatus.PLACED.value
        self.paid_amount: Decimal | None = None
        self.cancellation_reason: str | None = None

    @property
    def status(self) -> OrderStatus:
        """The order's current status."""
        # Stored as a plain str: a snapshot's JSON round trip would turn an enum member into one anyway.
        return OrderStatus(self._status)

    @property
    def lines(self) -> tuple[OrderLine, ...]:
        """The order's lines, in the order they were added."""
        return tuple(OrderLine(**line) for line in self._lines.values())

    def line_for(self, product_id: UUID) -> OrderLine | None:
        """The line for ``product_id``, or None if the order has none."""
        line = self._lines.get(str(product_id))
        return OrderLine(**line) if line is not None else None

    @property
    def total(self) -> Decimal:
        """What the order costs: the sum of its lines' subtotals."""
        return sum((line.subtotal for line in self.lines), Decimal(0))

    def add_line(self, product_id: UUID, quantity: int, unit_price: Decimal) -> None:
        """Add a line for a product the order does not have yet (event ``LineAdded``)."""
        self._check_editable("add a line")
        _check_line(self.id, quantity, unit_price)
        if str(product_id) in self._lines:
            raise DuplicateOrderLine(self.id, product_id)
        self._line_added(product_id=product_id, quantity=quantity, unit_price=unit_price)

    @event("LineAdded")
    def _line_added(self, product_id: UUID, quantity: int, unit_price: Decimal) -> None:
        line = OrderLineData(product_id=product_id, quantity=quantity, unit_price=unit_price)
        self._lines[str(product_id)] = line

    def remove_line(self, product_id: UUID) -> OrderLine:
        """Remove the line for ``product_id`` (event ``LineRemoved``) and return it; never the last line."""
        self._check_editable("remove a line")
        line = self.line_for(product_id)
        if line is None:
            raise OrderLineNotFound(self.id, product_id)
        if len(self._lines) == 1:
            raise EmptyOrder(self.id)
        self._line_removed(product_id=product_id)
        return line

    @event("LineRemoved")
    def _line_removed(self, product_id: UUID) -> None:
        del self._lines[str(product_id)]

    def pay(self, amount: Decimal) -> None:
        """Pay the order (event ``Paid``); ``amount`` must equal the total."""
        self._check_not_final("pay")
        if self.paid_amount is not None:
            raise OrderAlreadyPaid(self.id, "pay")
        if amount != self.total:
            raise PaymentMismatch(self.id, amount=amount, total=self.total)
        self._paid(amount=amount)

    @event("Paid")
    def _paid(self, amount: Decimal) -> None:
        self.paid_amount = amount
        self._status = OrderStatus.PAID.value

    def ship(self) -> None:
        """Ship the paid order (event ``Shipped``); it is final afterwards."""
        self._check_not_final("ship")
        if self.paid_amount is None:
            raise OrderNotPaid(self.id)
        self._shipped()

    @event("Shipped")
    def _shipped(self) -> None:
        self._status = OrderStatus.SHIPPED.value

    def cancel(self, reason: str) -> None:
        """Cancel the order (event ``Cancelled``), paid or not, as long as it has not shipped.

        Refunding a paid order is a matter for payments, outside this domain.
        """
        self._check_not_final("cancel")
        self._cancelled(reason=reason)

    @event("Cancelled")
    def _cancelled(self, reason: str) -> None:
        self.cancellation_reason = reason
        self._status = OrderStatus.CANCELLED.value

    def _check_not_final(self, action: str) -> None:
        if self._status == OrderStatus.SHIPPED:
            raise OrderAlreadyShipped(self.id, action)
        if self._status == OrderStatus.CANCELLED:
            raise OrderAlreadyCancelled(self.id, action)

    def _check_editable(self, action: str) -> None:
        self._check_not_final(action)
        # Changing the lines of a paid order would leave the payment short of, or beyond, the total.
        if self.paid_amount is not None:
            raise OrderAlreadyPaid(self.id, action)


def _check_line(order_id: UUID | None, quantity: int, unit_price: Decimal) -> None:
    if quantity <= 0:
        raise InvalidQuantity("order", order_id, quantity)
    if not (unit_price.is_finite() and unit_price > 0):
        raise InvalidPrice("order", order_id, unit_price)


def _as_data(line: OrderLine) -> OrderLineData:
    return OrderLineData(product_id=line.product_id, quantity=line.quantity, unit_price=line.unit_price)
