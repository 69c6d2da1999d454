"""The demo's workload: customers, products and orders through the command handlers, and its checks.

Several writer threads place orders on the same few products, so their appends collide and the
handlers retry; a few invalid commands must be refused. What the write side decided is kept as
the expectation the read models are then checked against.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

import pydantic

from domain import CommandHandlers, OrdersApplication
from domain.errors import DomainError
from domain.order import OrderStatus


class DemoFailed(Exception):
    """Something the demo checks did not hold; the message says what."""


@dataclass
class Expected:
    """What the write side decided: each order's status and total, and every stream's version."""

    customers: list[UUID] = field(default_factory=list)
    products: dict[UUID, str] = field(default_factory=dict)  # id -> sku
    orders: dict[UUID, tuple[OrderStatus, Decimal]] = field(default_factory=dict)
    versions: dict[tuple[str, UUID], int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    conflicts: int = 0

    def record(self, result: Any) -> None:
        for write in result.written:
            key = (write.stream_type, write.stream_id)
            self.versions[key] = max(self.versions.get(key, 0), write.version)


class Workload:
    """Writes the demo's data through :class:`CommandHandlers` and remembers what it expects."""

    def __init__(self, app: OrdersApplication, run_id: str) -> None:
        self.app = app
        self.run_id = run_id
        self.expected = Expected()
        self._lock = threading.Lock()

    def _handlers(self) -> CommandHandlers:
        def sleep(seconds: float) -> None:
            with self._lock:
                self.expected.conflicts += 1  # the handlers sleep once before each retry
            time.sleep(seconds)

        return CommandHandlers(self.app, max_attempts=20, sleep=sleep)

    def catalog(self, customers: int, products: int, stock: int) -> None:
        """Register customers and create products with ``stock`` units each."""
        handlers = self._handlers()
        for i in range(customers):
            result = handlers.register_customer(
                {
                    "name": f"Customer {i + 1} ({self.run_id})",
                    "email": f"customer{i + 1}.{self.run_id}@example.com",
                    "address": f"{i + 1} Demo Street",
                }
            )
            self.expected.record(result)
            self.expected.customers.append(result.stream_id)
        for i in range(products):
            sku = f"DEMO-{self.run_id}-{i + 1}"
            price = Decimal("4.50") + Decimal(i) * Decimal("1.25")
            created = handlers.create_product({"sku": sku, "name": f"Demo product {i + 1}", "price": price})
            self.expected.record(created)
            self.expected.record(handlers.receive_stock({"product_id": created.stream_id, "quantity": stock}))
            self.expected.products[created.stream_id] = sku

    def refuse_invalid_commands(self, say: Callable[[str], None]) -> None:
        """Commands the handlers must refuse, each with a clear error and nothing written."""
        handlers = self._handlers()
        customer = self.expected.customers[0]
        product = next(iter(self.expected.products))
        placed = handlers.place_order(
            {"customer_id": customer, "lines": [{"product_id": product, "quantity": 1}]}
        )
        self.expected.record(placed)
        order = placed.stream_id
        self.expected.orders[order] = (OrderStatus.PLACED, self.app.get_order(order).total)
        attempts: list[tuple[str, Callable[[], Any]]] = [
            (
                "an order of 0 units",
                lambda: handlers.place_order(
                    {"customer_id": customer, "lines": [{"product_id": product, "quantity": 0}]}
                ),
            ),
            (
                "more units than in stock",
                lambda: handlers.place_order(
                    {"customer_id": customer, "lines": [{"product_id": product, "quantity": 10**9}]}
                ),
            ),
            (
                "an order for a customer that does not exist",
                lambda: handlers.place_order(
                    {"customer_id": uuid.uuid4(), "lines": [{"product_id": product, "quantity": 1}]}
                ),
            ),
            (
                "a payment that does not match the total",
                lambda: handlers.pay_order({"order_id": order, "amount": "0.01"}),
            ),
            ("shipping an unpaid order", lambda: handlers.ship_order({"order_id": order})),
        ]
        for what, attempt in attempts:
            try:
                attempt()
            except pydantic.ValidationError as exc:
                first = exc.errors()[0]
                reason = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
            except DomainError as exc:
                reason = str(exc)
            else:
                raise DemoFailed(f"the command handlers accepted {what}")
            self.expected.refused.append(what)
            say(f"refused {what}: {reason}")
        if self.app.get_order(order).version != 1:
            raise DemoFailed("a refused command changed the order it was aimed at")

    def orders(self, count: int, writers: int) -> None:
        """``count`` orders by ``writers`` threads on the same products: placed, then paid and shipped,
        or cancelled. Appends that collide are retried by the handlers."""
        products = list(self.expected.products)
        hot = products[:3]  # every order takes one of these: the writers collide on them
        failures: list[BaseException] = []

        def write(worker: int) -> None:
            handlers = self._handlers()
            try:
                for i in range(worker, count, writers):
                    customer = self.expected.customers[i % len(self.expected.customers)]
                    lines = [{"product_id": hot[i % len(hot)], "quantity": 1 + i % 3}]
                    extra = (
                        products[len(hot) + i % max(len(products) - len(hot), 1)]
                        if len(products) > 3
                        else None
                    )
                    if extra is not None and i % 2:
                        lines.append({"product_id": extra, "quantity": 1})
                    placed = handlers.place_order({"customer_id": customer, "lines": lines})
                    self._keep(placed)
                    order = placed.stream_id
                    total = self.app.get_order(order).total
                    status = OrderStatus.PLACED
                    if i % 5 == 4:
                        self._keep(handlers.cancel_order({"order_id": order, "reason": "changed their mind"}))
                        status = OrderStatus.CANCELLED
                    elif i % 7 != 6:
                        self._keep(handlers.pay_order({"order_id": order, "amount": total}))
                        status = OrderStatus.PAID
                        if i % 3 == 0:
                            self._keep(handlers.ship_order({"order_id": order}))
                            status = OrderStatus.SHIPPED
                    with self._lock:
                        self.expected.orders[order] = (status, total)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=write, args=(w,), name=f"demo-writer-{w}") for w in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise DemoFailed(f"a writer failed: {type(failures[0]).__name__}: {failures[0]}")

    def _keep(self, result: Any) -> None:
        with self._lock:
            self.expected.record(result)

    def one_more_order(self) -> tuple[UUID, Any]:
        """A last order, to show the read models still follow after the rebuild switched them."""
        handlers = self._handlers()
        lines = [{"product_id": next(iter(self.expected.products)), "quantity": 1}]
        placed = handlers.place_order({"customer_id": self.expected.customers[0], "lines": lines})
        self.expected.record(placed)
        self.expected.orders[placed.stream_id] = (
            OrderStatus.PLACED,
            self.app.get_order(placed.stream_id).total,
        )
        return placed.stream_id, placed

    def stock(self) -> dict[UUID, int]:
        """Each product's available units on the write side."""
        return {pid: self.app.get_product(pid).available for pid in self.expected.products}


def summary(expected: Expected) -> str:
    """``240 paid (80 shipped), 40 cancelled, 20 placed``."""
    counts = {s: 0 for s in OrderStatus}
    for status, _ in expected.orders.values():
        counts[status] += 1
    paid = counts[OrderStatus.PAID] + counts[OrderStatus.SHIPPED]
    return (
        f"{paid} paid ({counts[OrderStatus.SHIPPED]} shipped), {counts[OrderStatus.CANCELLED]} cancelled, "
        f"{counts[OrderStatus.PLACED]} left placed"
    )
