"""Errors raised when a command would break a domain invariant.

Each error names the aggregate and the offending values, and keeps them as attributes so that callers can
react without parsing the message. Raising one means no event was triggered: the aggregate is unchanged.
"""

from __future__ import annotations

from decimal import Decimal
from uuid import UUID


class DomainError(ValueError):
    """A command was rejected because it would break an invariant of the aggregate ``aggregate_id``.

    A ``ValueError`` because the command's values, not the system, are at fault. ``aggregate_id`` is None
    when the aggregate being created was rejected before it had an id.
    """

    def __init__(self, aggregate_id: UUID | None, message: str) -> None:
        self.aggregate_id = aggregate_id
        super().__init__(message)


def _named(kind: str, aggregate_id: UUID | None) -> str:
    return f"{kind} {aggregate_id}" if aggregate_id is not None else f"new {kind}"


class AggregateNotFound(DomainError):
    """No aggregate of the expected type exists with this id."""

    def __init__(self, aggregate_id: UUID, kind: str) -> None:
        self.kind = kind
        super().__init__(aggregate_id, f"{kind} {aggregate_id} does not exist")


class CustomerErased(DomainError):
    """The customer was forgotten (their personal data erased): nothing more can be recorded about them."""

    def __init__(self, customer_id: UUID, action: str) -> None:
        self.action = action
        super().__init__(customer_id, f"cannot {action} customer {customer_id}: their data was erased")


class InvalidQuantity(DomainError):
    """A quantity was zero or negative; every quantity the domain records is a positive count."""

    def __init__(self, kind: str, aggregate_id: UUID | None, quantity: int) -> None:
        self.quantity = quantity
        subject = _named(kind, aggregate_id)
        super().__init__(aggregate_id, f"quantity for {subject} must be positive, got {quantity}")


class InvalidPrice(DomainError):
    """A price was zero or negative."""

    def __init__(self, kind: str, aggregate_id: UUID | None, price: Decimal) -> None:
        self.price = price
        subject = _named(kind, aggregate_id)
        super().__init__(aggregate_id, f"price for {subject} must be positive, got {price}")


class InsufficientStock(DomainError):
    """A reservation asked for more units than the product has available."""

    def __init__(self, product_id: UUID, requested: int, available: int) -> None:
        self.requested = requested
        self.available = available
        super().__init__(
            product_id,
            f"product {product_id} has {available} unit(s) available, cannot reserve {requested}",
        )


class ReservationExceeded(DomainError):
    """A release asked to give back more units than the order holds on the product."""

    def __init__(self, product_id: UUID, order_id: UUID, requested: int, reserved: int) -> None:
        self.order_id = order_id
        self.requested = requested
        self.reserved = reserved
        super().__init__(
            product_id,
            f"order {order_id} holds {reserved} unit(s) of product {product_id}, cannot release {requested}",
        )


class EmptyOrder(DomainError):
    """An order would be left without lines; an order always has at least one."""

    def __init__(self, order_id: UUID | None) -> None:
        super().__init__(order_id, f"{_named('order', order_id)} must have at least one line")


class DuplicateOrderLine(DomainError):
    """An order already has a line for this product; change it by removing and re-adding."""

    def __init__(self, order_id: UUID | None, product_id: UUID) -> None:
        self.product_id = product_id
        super().__init__(order_id, f"{_named('order', order_id)} already has a line for product {product_id}")


class OrderLineNotFound(DomainError):
    """An order has no line for this product."""

    def __init__(self, order_id: UUID, product_id: UUID) -> None:
        self.product_id = product_id
        super().__init__(order_id, f"order {order_id} has no line for product {product_id}")


class OrderAlreadyShipped(DomainError):
    """A shipped order is final: it cannot be changed, paid or cancelled."""

    def __init__(self, order_id: UUID, action: str) -> None:
        self.action = action
        super().__init__(order_id, f"order {order_id} has been shipped, cannot {action}")


class OrderAlreadyCancelled(DomainError):
    """A cancelled order is final: it cannot be changed, paid, shipped or cancelled again."""

    def __init__(self, order_id: UUID, action: str) -> None:
        self.action = action
        super().__init__(order_id, f"order {order_id} has been cancelled, cannot {action}")


class OrderAlreadyPaid(DomainError):
    """A paid order cannot be paid again, nor have its lines changed (the payment would no longer match)."""

    def __init__(self, order_id: UUID, action: str) -> None:
        self.action = action
        super().__init__(order_id, f"order {order_id} has been paid, cannot {action}")


class OrderNotPaid(DomainError):
    """An order must be paid before it is shipped."""

    def __init__(self, order_id: UUID) -> None:
        super().__init__(order_id, f"order {order_id} has not been paid, cannot ship")


class PaymentMismatch(DomainError):
    """A payment must equal the order total exactly: no partial payments, no overpayments."""

    def __init__(self, order_id: UUID, amount: Decimal, total: Decimal) -> None:
        self.amount = amount
        self.total = total
        super().__init__(order_id, f"order {order_id} totals {total}, a payment of {amount} does not match")
