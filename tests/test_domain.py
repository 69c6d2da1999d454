"""The orders domain through its command handlers: invariants, validation, results, retries.

Runs on eventsourcing's in-memory store. Every test takes its application from the ``orders_app``
fixture, so parametrizing that one fixture runs them all against another store too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError
from pydantic import ValidationError

from domain import (
    AggregateNotFound,
    CancelOrder,
    CommandHandlers,
    CommandResult,
    Customer,
    DomainError,
    DuplicateOrderLine,
    EmptyOrder,
    InsufficientStock,
    InvalidPrice,
    InvalidQuantity,
    Order,
    OrderAlreadyCancelled,
    OrderAlreadyPaid,
    OrderAlreadyShipped,
    OrderLine,
    OrderLineNotFound,
    OrderNotPaid,
    OrdersApplication,
    OrderStatus,
    PaymentMismatch,
    PlaceOrder,
    Product,
    ReservationExceeded,
    StreamWrite,
)
from eventstore.errors import ConcurrencyError


@pytest.fixture(params=["memory", "postgres"])
def orders_app(request: pytest.FixtureRequest) -> Iterator[OrdersApplication]:
    """The domain on eventsourcing's in-memory store and on the datalayer PostgreSQL store."""
    if request.param == "memory":
        env = {"PERSISTENCE_MODULE": "eventsourcing.popo"}
    else:
        env = request.getfixturevalue("es_env")
    app = OrdersApplication(env=env)
    yield app
    app.close()


@pytest.fixture
def handlers(orders_app: OrdersApplication) -> CommandHandlers:
    return CommandHandlers(orders_app)


def new_customer(h: CommandHandlers) -> UUID:
    return h.register_customer({"name": "Ada", "email": "ada@example.com", "address": "1 Loom St"}).stream_id


def new_product(h: CommandHandlers, *, price: str = "2.50", stock: int = 10) -> UUID:
    product_id = h.create_product(
        {"sku": f"SKU-{uuid4().hex[:8]}", "name": "Widget", "price": price}
    ).stream_id
    if stock:
        h.receive_stock({"product_id": product_id, "quantity": stock})
    return product_id


def new_order(h: CommandHandlers, customer_id: UUID, *lines: tuple[UUID, int]) -> UUID:
    command = {"customer_id": customer_id, "lines": [{"product_id": p, "quantity": q} for p, q in lines]}
    return h.place_order(command).stream_id


def assert_rejected(
    app: OrdersApplication, error: type[Exception], action: Callable[[], Any], *stream_ids: UUID
) -> Any:
    """``action`` raises ``error`` and appends nothing: no new event anywhere, no stream moved."""
    position = app.recorder.max_notification_id()
    versions = {i: app.repository.get(i).version for i in stream_ids}
    with pytest.raises(error) as caught:
        action()
    assert app.recorder.max_notification_id() == position
    assert {i: app.repository.get(i).version for i in stream_ids} == versions
    return caught.value


# The happy path and what handlers return.


def test_register_stock_place_pay_ship(orders_app: OrdersApplication, handlers: CommandHandlers) -> None:
    customer_id = new_customer(handlers)
    widget = new_product(handlers, price="2.50", stock=10)
    gadget = new_product(handlers, price="10.00", stock=3)

    placed = handlers.place_order(
        PlaceOrder.model_validate(
            {
                "customer_id": customer_id,
                "lines": [{"product_id": widget, "quantity": 4}, {"product_id": gadget, "quantity": 1}],
            }
        )
    )
    paid = handlers.pay_order({"order_id": placed.stream_id, "amount": "20.00"})
    shipped = handlers.ship_order({"order_id": placed.stream_id})

    order = orders_app.get_order(placed.stream_id)
    assert order.status is OrderStatus.SHIPPED
    assert order.customer_id == customer_id
    assert order.lines == (OrderLine(widget, 4, Decimal("2.50")), OrderLine(gadget, 1, Decimal("10.00")))
    assert order.total == order.paid_amount == Decimal("20.00")
    assert (placed.version, paid.version, shipped.version) == (1, 2, 3)
    assert shipped.position == orders_app.recorder.max_notification_id()

    w = orders_app.get_product(widget)
    assert (w.received, w.reserved, w.available, w.reserved_for(order.id)) == (10, 4, 6, 4)
    g = orders_app.get_product(gadget)
    assert (g.received, g.reserved, g.available) == (3, 1, 2)
    customer = orders_app.get_customer(customer_id)
    assert (customer.name, customer.email, customer.address) == ("Ada", "ada@example.com", "1 Loom St")


def test_result_names_stream_version_and_highest_position(
    orders_app: OrdersApplication, handlers: CommandHandlers
) -> None:
    customer_id = new_customer(handlers)
    product_id = new_product(handlers, stock=5)
    before = orders_app.recorder.max_notification_id()
    assert before is not None

    result = handlers.place_order(
        {"customer_id": customer_id, "lines": [{"product_id": product_id, "quantity": 2}]}
    )

    assert isinstance(result, CommandResult)
    assert result.version == 1
    assert isinstance(orders_app.repository.get(result.stream_id), Order)
    # One append of two events (Placed, StockReserved); the position is the later of them.
    assert result.position == orders_app.recorder.max_notification_id() == before + 2
    assert orders_app.get_product(product_id).version == 3
    # Every stream written, at its new version: what read-your-writes waits for.
    assert result.written == (
        StreamWrite("Order", result.stream_id, 1),
        StreamWrite("Product", product_id, 3),
    )


def test_a_command_that_changes_nothing_has_no_position(
    orders_app: OrdersApplication, handlers: CommandHandlers
) -> None:
    product_id = new_product(handlers, price="2.50", stock=0)
    position = orders_app.recorder.max_notification_id()

    result = handlers.change_product_price({"product_id": product_id, "price": "2.5"})

    assert result == CommandResult(stream_id=product_id, version=1, position=None)
    assert orders_app.recorder.max_notification_id() == position


def test_handle_dispatches_command_models(orders_app: OrdersApplication, handlers: CommandHandlers) -> None:
    customer_id = new_customer(handlers)
    product_id = new_product(handlers)
    order_id = new_order(handlers, customer_id, (product_id, 2))

    result = handlers.handle(CancelOrder(order_id=order_id, reason="changed my mind"))

    assert result.stream_id == order_id
    assert orders_app.get_order(order_id).status is OrderStatus.CANCELLED


def test_change_address_and_price(orders_app: OrdersApplication, handlers: CommandHandlers) -> None:
    customer_id = new_customer(handlers)
    product_id = new_product(handlers, price="2.50")
    order_id = new_order(handlers, customer_id, (product_id, 1))

    handlers.change_customer_address({"customer_id": customer_id, "address": "2 Engine Rd"})
    handlers.change_product_price({"product_id": product_id, "price": "3"})

    assert orders_app.get_customer(customer_id).address == "2 Engine Rd"
    assert orders_app.get_product(product_id).price == Decimal("3.00")
    # The order keeps the price it was placed at.
    assert orders_app.get_order(order_id).total == Decimal("2.50")


def test_add_and_remove_lines_reserve_and_release(
    orders_app: OrdersApplication, handlers: CommandHandlers
) -> None:
    customer_id = new_customer(handlers)
    widget = new_product(handlers, price="2.50", stock=10)
    gadget = new_product(handlers, price="4.00", stock=10)
    order_id = new_order(handlers, customer_id, (widget, 1))

    handlers.add_order_line({"order_id": order_id, "product_id": gadget, "quantity": 3})
    assert orders_app.get_product(gadget).reserved_for(order_id) == 3
    assert orders_app.get_order(order_id).total == Decimal("14.50")

    handlers.remove_order_line({"order_id": order_id, "product_id": widget})
    assert orders_app.get_product(widget).reserved == 0
    assert orders_app.get_order(order_id).lines == (OrderLine(gadget, 3, Decimal("4.00")),)


def test_cancelling_releases_every_reservation(
    orders_app: OrdersApplication, handlers: CommandHandlers
) -> None:
    customer_id = new_customer(handlers)
    widget = new_product(handlers, stock=10)
    gadget = new_product(handlers, stock=4)
    order_id = new_order(handlers, customer_id, (widget, 6), (gadget, 4))
    other_id = new_order(handlers, customer_id, (widget, 1))
    handlers.pay_order({"order_id": order_id, "amount": "25.00"})

    result = handlers.cancel_order({"order_id": order_id, "reason": "out of budget"})

    order = orders_app.get_order(order_id)
    assert (order.status, order.cancellation_reason) == (OrderStatus.CANCELLED, "out of budget")
    assert result.version == order.version == 3
    w, g = orders_app.get_product(widget), orders_app.get_product(gadget)
    assert (w.available, w.reserved_for(order_id), w.reserved_for(other_id)) == (9, 0, 1)
    assert (g.available, g.reserved) == (4, 0)


def test_aggregates_as_of_a_version(orders_app: OrdersApplication, handlers: CommandHandlers) -> None:
    customer_id = new_customer(handlers)
    product_id = new_product(handlers)
    order_id = new_order(handlers, customer_id, (product_id, 2))
    handlers.pay_order({"order_id": order_id, "amount": "5.00"})
    handlers.ship_order({"order_id": order_id})

    assert orders_app.get_order(order_id, version=1).status is OrderStatus.PLACED
    assert orders_app.get_order(order_id, version=2).status is OrderStatus.PAID
    assert orders_app.get_order(order_id).status is OrderStatus.SHIPPED
    assert orders_app.get_product(product_id, version=2).reserved == 0


def test_snapshots_reconstruct_the_same_product(
    orders_app: OrdersApplication, handlers: CommandHandlers
) -> None:
    product_id = new_product(handlers, stock=0)
    interval = OrdersApplication.DEFAULT_SNAPSHOTTING_INTERVAL
    for _ in range(interval):  # Created plus this many StockReceived: one snapshot, at the interval.
        handlers.receive_stock({"product_id": product_id, "quantity": 1})

    assert orders_app.snapshots is not None
    assert [s.originator_version for s in orders_app.snapshots.get(product_id)] == [interval]
    replayed = functools.reduce(lambda agg, e: e.mutate(agg), orders_app.events.get(product_id), None)
    assert orders_app.get_product(product_id) == replayed
    assert orders_app.get_product(product_id).received == interval


def test_snapshotting_interval_is_configurable() -> None:
    app = OrdersApplication(
        env={"PERSISTENCE_MODULE": "eventsourcing.popo", "ORDERS_SNAPSHOTTING_INTERVAL": "7"}
    )
    off = OrdersApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo", "SNAPSHOTTING_INTERVAL": "0"})
    assert app.snapshotting_intervals == {Order: 7, Product: 7}
    assert off.snapshotting_intervals == {}
    assert OrdersApplication.snapshotting_intervals == {Order: 50, Product: 50}
    with pytest.raises(ValueError, match="SNAPSHOTTING_INTERVAL"):
        OrdersApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo", "SNAPSHOTTING_INTERVAL": "-1"})


def test_old_events_are_upcast_on_read(
    orders_app: OrdersApplication, handlers: CommandHandlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    product_id = new_product(handlers, price="2.50", stock=0)
    handlers.change_product_price({"product_id": product_id, "price": "3.00"})

    # As a later release would declare: PriceChanged v2 prices include a 1.00 handling fee.
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["price"] += Decimal("1.00")

    monkeypatch.setattr(Product.PriceChanged, "class_version", 2, raising=False)
    monkeypatch.setattr(Product.PriceChanged, "upcast_v1_v2", staticmethod(upcast_v1_v2), raising=False)

    assert orders_app.get_product(product_id).price == Decimal("4.00")


# Invariants: each violation raises its own error and appends nothing.


@pytest.fixture
def placed(handlers: CommandHandlers) -> tuple[UUID, UUID, UUID]:
    """(order, widget, gadget): an unpaid order of 2 widgets at 2.50; the gadget is not on it."""
    customer_id = new_customer(handlers)
    widget = new_product(handlers, price="2.50", stock=5)
    gadget = new_product(handlers, price="4.00", stock=5)
    return new_order(handlers, customer_id, (widget, 2)), widget, gadget


def test_cannot_reserve_more_than_available(orders_app: OrdersApplication, handlers: CommandHandlers) -> None:
    customer_id = new_customer(handlers)
    plenty = new_product(handlers, stock=10)
    scarce = new_product(handlers, stock=2)
    new_order(handlers, customer_id, (scarce, 1))

    error = assert_rejected(
        orders_app,
        InsufficientStock,
        lambda: new_order(handlers, customer_id, (plenty, 3), (scarce, 2)),
        plenty,
        scarce,
    )
    # The reservation on the first product, made before the second failed, was not saved either.
    assert orders_app.get_product(plenty).reserved == 0
    assert (error.aggregate_id, error.requested, error.available) == (scarce, 2, 1)
    assert f"product {scarce} has 1 unit(s) available, cannot reserve 2" in str(error)


def test_adding_a_line_beyond_stock_is_rejected(
    orders_app: OrdersApplication, handlers: CommandHandlers, placed: tuple[UUID, UUID, UUID]
) -> None:
    order_id, _, gadget = placed
    command = {"order_id": order_id, "product_id": gadget, "quantity": 6}
    assert_rejected(orders_app, InsufficientStock, lambda: handlers.add_order_line(command), order_id, gadget)


def test_cannot_ship_unpaid(
    orders_app: OrdersApplication, handlers: CommandHandlers, placed: tuple[UUID, UUID, UUID]
) -> None:
    order_id = placed[0]
    error = assert_rejected(
        orders_app, OrderNotPaid, lambda: handlers.ship_order({"order_id": order_id}), order_id
    )
    assert str(order_id) in str(error)


@pytest.mark.parametrize(
    ("amount", "total"), [("4.99", "5.00"), ("5.01", "5.00"), ("0.01", "5.00")], ids=["short", "over", "cent"]
)
def test_payment_must_equal_total(
    orders_app: OrdersApplication,
    handlers: CommandHandlers,
    placed: tuple[UUID, UUID, UUID],
    amount: str,
    total: str,
) -> None:
    order_id = placed[0]
    error = assert_rejected(
        orders_app,
        PaymentMismatch,
        lambda: handlers.pay_order({"order_id": order_id, "amount": amount}),
        order_id,
    )
    assert (error.amount, error.total) == (Decimal(amount), Decimal(total))
    assert f"order {order_id} totals {total}, a payment of {amount} does not match" in str(error)


def test_no_changes_after_shipping(
    orders_app: OrdersApplication, handlers: CommandHandlers, placed: tuple[UUID, UUID, UUID]
) -> None:
    order_id, widget, gadget = placed
    handlers.pay_order({"order_id": order_id, "amount": "5.00"})
    handlers.ship_order({"order_id": order_id})

    attempts: dict[str, Callable[[], Any]] = {
        "add a line": lambda: handlers.add_order_line(
            {"order_id": order_id, "product_id": gadget, "quantity": 1}
        ),
        "remove a line": lambda: handlers.remove_order_line({"order_id": order_id, "product_id": widget}),
        "pay": lambda: handlers.pay_order({"order_id": order_id, "amount": "5.00"}),
        "ship": lambda: handlers.ship_order({"order_id": order_id}),
        "cancel": lambda: handlers.cancel_order({"order_id": order_id, "reason": "too late"}),
    }
    for action, attempt in attempts.items():
        error = assert_rejected(orders_app, OrderAlreadyShipped, attempt, order_id, widget, gadget)
        assert error.action == action
        assert str(error) == f"order {order_id} has been shipped, cannot {action}"
    assert orders_app.get_product(widget).reserved_for(order_id) == 2


def test_no_changes_after_cancelling(
    orders_app: OrdersApplication, handlers: CommandHandlers, placed: tuple[UUID, UUID, UUID]
) -> None:
    order_id, widget, gadget = placed
    handlers.cancel_order({"order_id": order_id, "reason": "duplicate"})

    attempts: dict[str, Callable[[], Any]] = {
        "pay": lambda: handlers.pay_order({"order_id": order_id, "amount": "5.00"}),
        "ship": lambda: handlers.ship_order({"order_id": order_id}),
        "cancel": lambda: handlers.cancel_order({"order_id": order_id, "reason": "again"}),
        "add a line": lambda: handlers.add_order_line(
            {"order_id": order_id, "product_id": gadget, "quantity": 1}
        ),
        "remove a line": lambda: handlers.remove_order_line({"order_id": order_id, "product_id": widget}),
    }
    for action, attempt in attempts.items():
        error = assert_rejected(orders_app, OrderAlreadyCancelled, attempt, order_id, widget, gadget)
        assert error.action == action


def test_a_paid_order_cannot_be_paid_again_or_changed(
    orders_app: OrdersApplication, handlers: CommandHandlers, placed: tuple[UUID, UUID, UUID]
) -> None:
    order_id, widget, gadget = placed
    handlers.pay_order({"order_id": order_id, "amount": "5.00"})

    for attempt in (
        lambda: handlers.pay_order({"order_id": order_id, "amount": "5.00"}),
        lambda: handlers.add_order_line({"order_id": order_id, "product_id": gadget, "quantity": 1}),
        lambda: handlers.remove_order_line({"order_id": order_id, "product_id": widget}),
    ):
        assert_rejected(orders_app, OrderAlreadyPaid, attempt, order_id, widget, gadget)


def test_a_paid_then_cancelled_order_cannot_ship(
    orders_app: OrdersApplication, handlers: CommandHandlers, placed: tuple[UUID, UUID, UUID]
) -> None:
    order_id = placed[0]
    handlers.pay_order({"order_id": order_id, "amount": "5.00"})
    handlers.cancel_order({"order_id": order_id, "reason": "fraud"})
    assert_rejected(
        orders_app, OrderAlreadyCancelled, lambda: handlers.ship_order({"order_id": order_id}), order_id
    )


def test_line_rules(
    orders_app: OrdersApplication, handlers: CommandHandlers, placed: tuple[UUID, UUID, UUID]
) -> None:
    order_id, widget, gadget = placed

    missing = assert_rejected(
        orders_app,
        OrderLineNotFound,
        lambda: handlers.remove_order_line({"order_id": order_id, "product_id": gadget}),
        order_id,
        gadget,
    )
    assert str(missing) == f"order {order_id} has no line for product {gadget}"
    last = assert_rejected(
        orders_app,
        EmptyOrder,
        lambda: handlers.remove_order_line({"order_id": order_id, "product_id": widget}),
        order_id,
        widget,
    )
    assert str(last) == f"order {order_id} must have at least one line"
    assert_rejected(
        orders_app,
        DuplicateOrderLine,
        lambda: handlers.add_order_line({"order_id": order_id, "product_id": widget, "quantity": 1}),
        order_id,
        widget,
    )


def test_unknown_or_mistyped_ids_are_not_found(
    orders_app: OrdersApplication, handlers: CommandHandlers, placed: tuple[UUID, UUID, UUID]
) -> None:
    order_id, widget, _ = placed
    unknown = uuid4()
    error = assert_rejected(orders_app, AggregateNotFound, lambda: handlers.ship_order({"order_id": unknown}))
    assert str(error) == f"order {unknown} does not exist"
    # A product's id is not an order's.
    assert_rejected(orders_app, AggregateNotFound, lambda: handlers.ship_order({"order_id": widget}), widget)
    assert_rejected(orders_app, AggregateNotFound, lambda: new_order(handlers, unknown, (widget, 1)), widget)
    assert_rejected(
        orders_app,
        AggregateNotFound,
        lambda: handlers.add_order_line({"order_id": order_id, "product_id": unknown, "quantity": 1}),
        order_id,
    )


def test_aggregates_check_their_invariants_without_handlers() -> None:
    product = Product.create("SKU-1", "Widget", Decimal("2.50"))
    product.receive_stock(3)
    pending = len(product.pending_events)

    with pytest.raises(InvalidPrice, match="price for new product must be positive, got 0"):
        Product.create("SKU-2", "Freebie", Decimal("0"))
    with pytest.raises(InvalidPrice):
        product.change_price(Decimal("NaN"))
    with pytest.raises(InvalidQuantity, match=f"quantity for product {product.id} must be positive, got 0"):
        product.receive_stock(0)
    with pytest.raises(InsufficientStock):
        product.reserve(uuid4(), 4)
    with pytest.raises(ReservationExceeded):
        product.release(uuid4(), 1)
    assert len(product.pending_events) == pending

    customer_id = uuid4()
    with pytest.raises(EmptyOrder, match="new order must have at least one line"):
        Order.place(customer_id, [])
    with pytest.raises(DuplicateOrderLine):
        Order.place(customer_id, [OrderLine(product.id, 1, Decimal(1)), OrderLine(product.id, 2, Decimal(1))])
    with pytest.raises(InvalidQuantity):
        Order.place(customer_id, [OrderLine(product.id, 0, Decimal(1))])
    with pytest.raises(InvalidPrice):
        Order.place(customer_id, [OrderLine(product.id, 1, Decimal("-1"))])


def test_domain_errors_are_value_errors() -> None:
    for error in (
        InsufficientStock(uuid4(), 2, 1),
        OrderNotPaid(uuid4()),
        AggregateNotFound(uuid4(), "order"),
    ):
        assert isinstance(error, DomainError)
        assert isinstance(error, ValueError)


# Invalid commands: pydantic names every bad field, and nothing is appended.

ORDER_ID = uuid4()
PRODUCT_ID = uuid4()


@pytest.mark.parametrize(
    ("handler", "payload", "bad_fields"),
    [
        ("register_customer", {"name": " ", "email": "not-an-email", "address": "x"}, {"name", "email"}),
        ("register_customer", {"name": "A", "email": "a@b.co", "address": "x", "vip": True}, {"vip"}),
        ("register_customer", {"email": "a @b.co", "address": ""}, {"name", "email", "address"}),
        ("change_customer_address", {"customer_id": "42", "address": ""}, {"customer_id", "address"}),
        ("create_product", {"sku": "", "name": "W", "price": "1.005"}, {"sku", "price"}),
        ("create_product", {"sku": "S", "name": "W", "price": 2.5}, {"price"}),
        ("create_product", {"sku": "S", "name": "W", "price": "-1"}, {"price"}),
        ("change_product_price", {"product_id": PRODUCT_ID, "price": "0"}, {"price"}),
        ("change_product_price", {"product_id": PRODUCT_ID, "price": "Infinity"}, {"price"}),
        ("receive_stock", {"product_id": PRODUCT_ID, "quantity": 0}, {"quantity"}),
        ("receive_stock", {"product_id": PRODUCT_ID, "quantity": True}, {"quantity"}),
        ("receive_stock", {"product_id": PRODUCT_ID, "quantity": 1.5}, {"quantity"}),
        ("place_order", {"customer_id": uuid4(), "lines": []}, {"lines"}),
        (
            "place_order",
            {"customer_id": uuid4(), "lines": [{"product_id": PRODUCT_ID, "quantity": -1}]},
            {"lines"},
        ),
        (
            "place_order",
            {"customer_id": uuid4(), "lines": [{"product_id": PRODUCT_ID, "quantity": 1}] * 2},
            {"lines"},
        ),
        ("add_order_line", {"order_id": ORDER_ID, "product_id": PRODUCT_ID, "quantity": -2}, {"quantity"}),
        ("remove_order_line", {"order_id": ORDER_ID}, {"product_id"}),
        ("pay_order", {"order_id": ORDER_ID, "amount": "lots"}, {"amount"}),
        ("ship_order", {}, {"order_id"}),
        ("cancel_order", {"order_id": ORDER_ID, "reason": "   "}, {"reason"}),
    ],
)
def test_invalid_commands_name_the_bad_fields_and_append_nothing(
    orders_app: OrdersApplication,
    handlers: CommandHandlers,
    handler: str,
    payload: dict[str, Any],
    bad_fields: set[str],
) -> None:
    new_product(handlers)
    error = assert_rejected(orders_app, ValidationError, lambda: getattr(handlers, handler)(payload))
    assert {e["loc"][0] for e in error.errors()} == bad_fields


def test_commands_are_immutable_and_normalised() -> None:
    command = PlaceOrder.model_validate(
        {"customer_id": str(ORDER_ID), "lines": [{"product_id": PRODUCT_ID, "quantity": 1}]}
    )
    assert command.customer_id == ORDER_ID
    with pytest.raises(ValidationError):
        command.customer_id = uuid4()  # type: ignore[misc]


def test_handlers_reject_the_wrong_command_type(handlers: CommandHandlers) -> None:
    with pytest.raises(TypeError, match="expected ShipOrder"):
        handlers.ship_order(CancelOrder(order_id=ORDER_ID, reason="x"))  # type: ignore[arg-type]


# Optimistic concurrency: a conflicting save reruns the whole load-decide-save.


class ConcurrentWriter:
    """Wraps ``app.save`` so that another writer appends to ``stream_id`` just before it, ``times`` times."""

    def __init__(self, app: OrdersApplication, stream_id: UUID, times: int) -> None:
        self.app, self.stream_id, self.times = app, stream_id, times
        self.calls = 0
        self._save = app.save

    def __call__(self, *aggregates: Aggregate) -> Any:
        self.calls += 1
        if self.calls <= self.times:
            rival = self.app.get_product(self.stream_id)
            rival.receive_stock(100)
            self._save(rival)
        return self._save(*aggregates)


def test_a_conflict_is_retried_on_fresh_state(
    orders_app: OrdersApplication, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    handlers = CommandHandlers(orders_app, backoff=0.01, sleep=sleeps.append)
    product_id = new_product(handlers, stock=1)
    writer = ConcurrentWriter(orders_app, product_id, times=1)
    monkeypatch.setattr(orders_app, "save", writer)

    result = handlers.receive_stock({"product_id": product_id, "quantity": 5})

    assert writer.calls == 2
    assert orders_app.get_product(product_id).received == 1 + 100 + 5
    assert result.version == 4
    assert len(sleeps) == 1
    assert 0.005 <= sleeps[0] <= 0.015


def test_conflicts_are_retried_a_bounded_number_of_times(
    orders_app: OrdersApplication, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    handlers = CommandHandlers(orders_app, max_attempts=3, backoff=0.01, sleep=sleeps.append)
    product_id = new_product(handlers, stock=1)
    writer = ConcurrentWriter(orders_app, product_id, times=10)
    monkeypatch.setattr(orders_app, "save", writer)

    with pytest.raises(IntegrityError):
        handlers.receive_stock({"product_id": product_id, "quantity": 5})

    assert writer.calls == 3
    # Only the rival's appends landed.
    assert orders_app.get_product(product_id).received == 1 + 3 * 100
    # Exponential backoff with jitter of +/-50%.
    assert len(sleeps) == 2
    assert 0.005 <= sleeps[0] <= 0.015
    assert 0.01 <= sleeps[1] <= 0.03


def test_the_event_stores_concurrency_error_is_retried(
    orders_app: OrdersApplication, monkeypatch: pytest.MonkeyPatch
) -> None:
    handlers = CommandHandlers(orders_app, sleep=lambda _: None)
    product_id = new_product(handlers, stock=1)
    save = orders_app.save
    calls: list[int] = []

    def conflict_once(*aggregates: Aggregate) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise ConcurrencyError(product_id, expected_version=2, actual_version=3)
        return save(*aggregates)

    monkeypatch.setattr(orders_app, "save", conflict_once)
    handlers.receive_stock({"product_id": product_id, "quantity": 5})
    assert len(calls) == 2
    assert orders_app.get_product(product_id).received == 6


def test_a_snapshot_taken_elsewhere_does_not_fail_a_saved_command(
    orders_app: OrdersApplication, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were the snapshot's IntegrityError to escape save(), the handler would retry a command whose
    # events were already appended, and receive the stock twice.
    handlers = CommandHandlers(orders_app, sleep=lambda _: None)
    product_id = new_product(handlers, stock=0)
    interval = OrdersApplication.DEFAULT_SNAPSHOTTING_INTERVAL
    for _ in range(interval - 2):
        handlers.receive_stock({"product_id": product_id, "quantity": 1})
    assert orders_app.snapshots is not None
    snapshots, put = orders_app.snapshots, orders_app.events.put

    def put_then_another_process_snapshots(events: Any, **kwargs: Any) -> Any:
        recordings = put(events, **kwargs)
        snapshots.put([Product.Snapshot.take(orders_app.get_product(product_id))])
        return recordings

    monkeypatch.setattr(orders_app.events, "put", put_then_another_process_snapshots)
    result = handlers.receive_stock({"product_id": product_id, "quantity": 1})

    assert result.version == interval
    assert orders_app.get_product(product_id).received == interval - 1
    assert [s.originator_version for s in snapshots.get(product_id)] == [interval]


def test_domain_errors_are_not_retried(orders_app: OrdersApplication) -> None:
    sleeps: list[float] = []
    handlers = CommandHandlers(orders_app, sleep=sleeps.append)
    customer_id = new_customer(handlers)
    product_id = new_product(handlers, stock=1)
    with pytest.raises(InsufficientStock):
        new_order(handlers, customer_id, (product_id, 2))
    assert sleeps == []


def test_customer_aggregate_records_only_real_moves() -> None:
    customer = Customer.register("Ada", "ada@example.com", "1 Loom St")
    customer.change_address("1 Loom St")
    assert customer.version == 1
    customer.change_address("2 Engine Rd")
    assert (customer.version, customer.address) == (2, "2 Engine Rd")
