"""Random command sequences against the handlers never break the domain's invariants.

A hypothesis state machine issues commands, valid or not, allowed or not, and after every step checks
stock, payment and reservation invariants across every aggregate it created. A rejected command (a
``DomainError`` or a ``ValidationError``) must leave the store exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any
from uuid import UUID

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pydantic import ValidationError

from domain import CommandHandlers, CommandResult, DomainError, OrdersApplication, OrderStatus

# The fixture itself, so that parametrizing it in test_domain reaches this test too.
from tests.test_domain import orders_app as orders_app

prices = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("99.99"), places=2)
quantities = st.integers(min_value=1, max_value=6)
# sampled_from shrinks towards its first element, so this is True but for one draw in four.
mostly_true = st.sampled_from([True, True, True, False])
# Nudges that make a payment wrong; never zero.
payment_errors = st.sampled_from([Decimal("-0.01"), Decimal("0.01"), Decimal("1.00"), Decimal("-1.00")])


class OrdersMachine(RuleBasedStateMachine):
    customers = Bundle("customers")
    products = Bundle("products")
    orders = Bundle("orders")

    def __init__(self, app: OrdersApplication) -> None:
        super().__init__()
        self.app = app
        self.handlers = CommandHandlers(app, sleep=lambda _: None)
        self.product_ids: list[UUID] = []
        self.order_ids: list[UUID] = []
        self.paid_ids: list[UUID] = []

    def _fingerprint(self) -> tuple[int | None, list[int]]:
        ids = self.product_ids + self.order_ids
        return self.app.recorder.max_notification_id(), [self.app.repository.get(i).version for i in ids]

    def _try(
        self, handler: Callable[[dict[str, Any]], CommandResult], **command: Any
    ) -> CommandResult | None:
        """Run the command; if it is rejected, check it changed nothing and return None."""
        before = self._fingerprint()
        try:
            return handler(command)
        except (DomainError, ValidationError):
            assert self._fingerprint() == before
            return None

    def _new_customer(self) -> UUID:
        return self.handlers.register_customer(
            {"name": "C", "email": "c@example.com", "address": "A"}
        ).stream_id

    def _new_product(self, price: Decimal, stock: int) -> UUID:
        product_id = self.handlers.create_product({"sku": "S", "name": "P", "price": price}).stream_id
        self.product_ids.append(product_id)
        # Usually with stock to start with, or most orders would be rejected for the lack of it.
        if stock:
            self.handlers.receive_stock({"product_id": product_id, "quantity": stock})
        return product_id

    # Every run starts with a customer and a stocked product, so that orders get placed from the first step.
    @initialize(target=customers)
    def first_customer(self) -> UUID:
        return self._new_customer()

    @initialize(target=products, price=prices)
    def first_product(self, price: Decimal) -> UUID:
        return self._new_product(price, stock=10)

    @rule(target=customers)
    def register_customer(self) -> UUID:
        return self._new_customer()

    @rule(target=products, price=prices, stock=st.integers(min_value=0, max_value=12))
    def create_product(self, price: Decimal, stock: int) -> UUID:
        return self._new_product(price, stock)

    # Now and then an invalid quantity or price, which validation must reject before anything is appended.
    @rule(product=products, quantity=st.integers(min_value=1, max_value=8), valid=mostly_true)
    def receive_stock(self, product: UUID, quantity: int, valid: bool) -> None:
        self._try(
            self.handlers.receive_stock, product_id=product, quantity=quantity if valid else 1 - quantity
        )

    @rule(product=products, price=prices, valid=mostly_true)
    def change_price(self, product: UUID, price: Decimal, valid: bool) -> None:
        # Invalid: a third decimal place.
        self._try(
            self.handlers.change_product_price, product_id=product, price=price if valid else f"{price}1"
        )

    @rule(
        target=orders,
        customer=customers,
        lines=st.lists(
            st.tuples(products, quantities), min_size=1, max_size=3, unique_by=lambda line: line[0]
        ),
    )
    def place_order(self, customer: UUID, lines: list[tuple[UUID, int]]) -> Any:
        result = self._try(
            self.handlers.place_order,
            customer_id=customer,
            lines=[{"product_id": p, "quantity": q} for p, q in lines],
        )
        if result is None:
            return multiple()
        self.order_ids.append(result.stream_id)
        return result.stream_id

    @rule(order=orders, product=products, quantity=quantities)
    def add_line(self, order: UUID, product: UUID, quantity: int) -> None:
        self._try(self.handlers.add_order_line, order_id=order, product_id=product, quantity=quantity)

    @rule(order=orders, product=products, data=st.data())
    def remove_line(self, order: UUID, product: UUID, data: st.DataObject) -> None:
        # Mostly a line the order has, sometimes any product (usually not on the order).
        on_order = [line.product_id for line in self.app.get_order(order).lines]
        chosen = data.draw(st.sampled_from([*on_order, product]))
        self._try(self.handlers.remove_order_line, order_id=order, product_id=chosen)

    # Mostly the right amount: orders must get paid often enough for shipping to be exercised.
    @rule(order=orders, exact=mostly_true, error=payment_errors)
    def pay(self, order: UUID, exact: bool, error: Decimal) -> None:
        total = self.app.get_order(order).total
        if self._try(self.handlers.pay_order, order_id=order, amount=total if exact else total + error):
            self.paid_ids.append(order)

    @rule(order=orders)
    def ship(self, order: UUID) -> None:
        self._try(self.handlers.ship_order, order_id=order)

    # An order drawn from the bundle has seldom been paid; this one has (though it may have shipped since).
    @precondition(lambda self: self.paid_ids)
    @rule(data=st.data())
    def ship_a_paid_order(self, data: st.DataObject) -> None:
        order = data.draw(st.sampled_from(self.paid_ids))
        self._try(self.handlers.ship_order, order_id=order)

    @rule(order=orders)
    def cancel(self, order: UUID) -> None:
        self._try(self.handlers.cancel_order, order_id=order, reason="random")

    @invariant()
    def stock_and_orders_agree(self) -> None:
        products = [self.app.get_product(i) for i in self.product_ids]
        orders = [self.app.get_order(i) for i in self.order_ids]
        for product in products:
            assert product.available >= 0
            assert 0 <= product.reserved <= product.received
            assert all(units > 0 for units in product.reservations.values())
        for order in orders:
            assert order.lines
            if order.status in (OrderStatus.PAID, OrderStatus.SHIPPED):
                assert order.paid_amount == order.total
            if order.status is OrderStatus.PLACED:
                assert order.paid_amount is None
        # Every open (not cancelled) order holds exactly its lines' quantities, and nothing else holds stock.
        for product in products:
            for order in orders:
                line = order.line_for(product.id)
                held = 0 if order.status is OrderStatus.CANCELLED or line is None else line.quantity
                assert product.reserved_for(order.id) == held
            held_by_open = sum(
                line.quantity
                for order in orders
                if order.status is not OrderStatus.CANCELLED
                for line in order.lines
                if line.product_id == product.id
            )
            assert product.reserved == held_by_open


def test_random_commands_keep_the_invariants(orders_app: OrdersApplication) -> None:
    run_state_machine_as_test(
        lambda: OrdersMachine(orders_app),
        settings=settings(
            max_examples=50,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
