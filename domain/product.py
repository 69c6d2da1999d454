"""The product aggregate: a sellable item, its price and its stock, reserved per order."""

from __future__ import annotations

from decimal import Decimal
from typing import Self
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import InsufficientStock, InvalidPrice, InvalidQuantity, ReservationExceeded


class Product(Aggregate):
    """A product with a price and a stock of units, some of them reserved by orders.

    Stock starts at zero. ``received`` only grows; ``reserved`` is the sum of the units each order holds,
    and never exceeds ``received``, so ``available`` is never negative. Shipping does not give units back:
    a shipped order's reservation stays, as the record of the units that left.
    """

    @classmethod
    def create(cls, sku: str, name: str, price: Decimal) -> Self:
        """Create a product with no stock (event ``Created``); the price must be positive."""
        _check_price(None, price)
        return cls(sku=sku, name=name, price=price)

    # The Created event's apply: it runs on creation and again on every replay, so it checks nothing.
    @event("Created")
    def __init__(self, sku: str, name: str, price: Decimal) -> None:
        self.sku = sku
        self.name = name
        self.price = price
        self.received = 0
        # Keyed by str(order id), not UUID: snapshots store this dict as JSON, whose keys are strings.
        self.reservations: dict[str, int] = {}

    @property
    def reserved(self) -> int:
        """Units held by orders."""
        return sum(self.reservations.values())

    @property
    def available(self) -> int:
        """Units that can still be reserved."""
        return self.received - self.reserved

    def reserved_for(self, order_id: UUID) -> int:
        """Units the order ``order_id`` holds on this product (0 if none)."""
        return self.reservations.get(str(order_id), 0)

    def change_price(self, price: Decimal) -> None:
        """Set a new positive price (event ``PriceChanged``); the same price records nothing.

        Orders already placed keep the unit price they were placed at.
        """
        _check_price(self.id, price)
        if price != self.price:
            self._price_changed(price=price)

    @event("PriceChanged")
    def _price_changed(self, price: Decimal) -> None:
        self.price = price

    def receive_stock(self, quantity: int) -> None:
        """Add ``quantity`` units to the stock (event ``StockReceived``)."""
        _check_quantity(self.id, quantity)
        self._stock_received(quantity=quantity)

    @event("StockReceived")
    def _stock_received(self, quantity: int) -> None:
        self.received += quantity

    def reserve(self, order_id: UUID, quantity: int) -> None:
        """Hold ``quantity`` units for the order (event ``StockReserved``); fails if fewer are available."""
        _check_quantity(self.id, quantity)
        if quantity > self.available:
            raise InsufficientStock(self.id, requested=quantity, available=self.available)
        self._stock_reserved(order_id=order_id, quantity=quantity)

    @event("StockReserved")
    def _stock_reserved(self, order_id: UUID, quantity: int) -> None:
        key = str(order_id)
        self.reservations[key] = self.reservations.get(key, 0) + quantity

    def release(self, order_id: UUID, quantity: int) -> None:
        """Give back ``quantity`` of the units the order holds (event ``StockReleased``)."""
        _check_quantity(self.id, quantity)
        held = self.reserved_for(order_id)
        if quantity > held:
            raise ReservationExceeded(self.id, order_id, requested=quantity, reserved=held)
        self._stock_released(order_id=order_id, quantity=quantity)

    @event("StockReleased")
    def _stock_released(self, order_id: UUID, quantity: int) -> None:
        key = str(order_id)
        remaining = self.reservations[key] - quantity
        # Drop emptied entries so the dict lists only orders that still hold stock.
        if remaining:
            self.reservations[key] = remaining
        else:
            del self.reservations[key]


def _check_price(product_id: UUID | None, price: Decimal) -> None:
    # is_finite first: ordering a NaN raises InvalidOperation instead of answering.
    if not (price.is_finite() and price > 0):
        raise InvalidPrice("product", product_id, price)


def _check_quantity(product_id: UUID, quantity: int) -> None:
    if quantity <= 0:
        raise InvalidQuantity("product", product_id, quantity)
