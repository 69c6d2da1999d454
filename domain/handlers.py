"""The orders application and its command handlers: validate, load, decide, save, retry on conflicts."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar
from uuid import UUID

from eventsourcing.application import (
    AggregateNotFoundError,
    Application,
    ProjectorFunction,
    project_aggregate,
)
from eventsourcing.domain import Aggregate, MutableOrImmutableAggregate
from eventsourcing.persistence import IntegrityError
from eventsourcing.utils import EnvType

from domain.commands import (
    AddOrderLine,
    CancelOrder,
    ChangeCustomerAddress,
    ChangeProductPrice,
    Command,
    CreateProduct,
    EraseCustomer,
    PayOrder,
    PlaceOrder,
    ReceiveStock,
    RegisterCustomer,
    RemoveOrderLine,
    ShipOrder,
)
from domain.customer import Customer
from domain.errors import AggregateNotFound
from domain.order import Order, OrderLine
from domain.product import Product

A = TypeVar("A", bound=Aggregate)
C = TypeVar("C", bound=Command)


class OrdersApplication(Application[UUID]):
    """Stores customers, products and orders; persistence is chosen by the environment, as for any
    ``eventsourcing`` application (``PERSISTENCE_MODULE``, default in-memory).

    Orders and products are snapshotted every ``DEFAULT_SNAPSHOTTING_INTERVAL`` events, so loading a
    long-lived product does not replay its whole history. Set ``SNAPSHOTTING_INTERVAL`` (or
    ``ORDERS_SNAPSHOTTING_INTERVAL``) in the environment to change that; ``0`` stops taking snapshots.
    """

    name = "Orders"
    DEFAULT_SNAPSHOTTING_INTERVAL = 50
    SNAPSHOTTING_INTERVAL = "SNAPSHOTTING_INTERVAL"
    # Non-empty at class level so that the base class creates the snapshot store.
    snapshotting_intervals: ClassVar[dict[type[MutableOrImmutableAggregate[Any]], int]] = {
        Order: DEFAULT_SNAPSHOTTING_INTERVAL,
        Product: DEFAULT_SNAPSHOTTING_INTERVAL,
    }

    def __init__(self, env: EnvType | None = None) -> None:
        super().__init__(env)
        configured = self.env.get(self.SNAPSHOTTING_INTERVAL)
        if configured is not None:
            interval = int(configured)
            if interval < 0:
                raise ValueError(f"{self.SNAPSHOTTING_INTERVAL} must be 0 or more, got {interval}")
            intervals = {Order: interval, Product: interval} if interval else {}
            # An instance attribute shadowing the class default: the base class reads it through self,
            # and assigning through vars() keeps one app's setting from leaking into every other one.
            vars(self)["snapshotting_intervals"] = intervals

    def take_snapshot(
        self,
        aggregate_id: UUID,
        version: int | None = None,
        projector_func: ProjectorFunction[Any, Any] = project_aggregate,
    ) -> None:
        """Snapshot the aggregate; a snapshot already taken at that version (by another process) is kept.

        ``save()`` takes snapshots after the events are appended, so an ``IntegrityError`` from here
        would make a saved command look like a conflict, and the handlers would retry, applying it twice.
        """
        # Snapshots are keyed by (id, version) and a version's state is fixed, so the two are equal.
        with contextlib.suppress(IntegrityError):
            super().take_snapshot(aggregate_id, version, projector_func)

    def get_customer(self, customer_id: UUID, version: int | None = None) -> Customer:
        """The customer as of ``version`` (default: the latest); raises ``AggregateNotFound``."""
        return self._get(Customer, customer_id, version)

    def get_product(self, product_id: UUID, version: int | None = None) -> Product:
        """The product as of ``version`` (default: the latest); raises ``AggregateNotFound``."""
        return self._get(Product, product_id, version)

    def get_order(self, order_id: UUID, version: int | None = None) -> Order:
        """The order as of ``version`` (default: the latest); raises ``AggregateNotFound``."""
        return self._get(Order, order_id, version)

    def _get(self, kind: type[A], aggregate_id: UUID, version: int | None) -> A:
        try:
            aggregate: Aggregate = self.repository.get(aggregate_id, version=version)
        except AggregateNotFoundError:
            raise AggregateNotFound(aggregate_id, kind.__name__.lower()) from None
        # An id of another aggregate type is as unknown to the caller as a missing one.
        if not isinstance(aggregate, kind):
            raise AggregateNotFound(aggregate_id, kind.__name__.lower())
        return aggregate


@dataclass(frozen=True, slots=True)
class StreamWrite:
    """One stream a command appended to, and the version it reached: what read-your-writes waits for."""

    stream_type: str
    stream_id: UUID
    version: int


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a handled command did to its main stream.

    ``position`` is the highest notification id (global position) among the events saved, None when
    the command changed nothing. Positions are unique but not in commit order, so read-your-writes
    waits for streams at versions instead: ``written`` lists every stream the command appended to
    (an order and the products it reserved), each at its new version.
    """

    stream_id: UUID
    version: int
    position: int | None
    written: tuple[StreamWrite, ...] = ()


# The main aggregate (whose id and version the result reports) and every aggregate to save.
_Decision = tuple[Aggregate, Sequence[Aggregate]]


class CommandHandlers:
    """One handler per command, each taking the command model or a plain dict to validate into it.

    A handler validates its command first (``pydantic.ValidationError``, nothing loaded or saved), then
    loads the aggregates, lets them decide (a ``DomainError`` rejects the command, nothing saved) and
    saves all their new events in one atomic append. If another writer appended to one of those streams
    in between, the append fails with ``IntegrityError`` and the whole load-decide-save runs again on
    fresh state, up to ``max_attempts`` times, with a small jittered exponential backoff between.

    Retrying on ``eventsourcing.persistence.IntegrityError`` rather than only on
    ``eventstore.errors.ConcurrencyError`` (its subclass) is deliberate: the in-memory and stock
    ``eventsourcing`` stores raise the base class for the same conflict.
    """

    def __init__(
        self,
        app: OrdersApplication,
        *,
        max_attempts: int = 5,
        backoff: float = 0.002,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.app = app
        self.max_attempts = max_attempts
        self.backoff = backoff
        self._sleep = sleep
        self._handlers: dict[type[Command], Callable[[Any], CommandResult]] = {
            RegisterCustomer: self.register_customer,
            ChangeCustomerAddress: self.change_customer_address,
            EraseCustomer: self.erase_customer,
            CreateProduct: self.create_product,
            ChangeProductPrice: self.change_product_price,
            ReceiveStock: self.receive_stock,
            PlaceOrder: self.place_order,
            AddOrderLine: self.add_order_line,
            RemoveOrderLine: self.remove_order_line,
            PayOrder: self.pay_order,
            ShipOrder: self.ship_order,
            CancelOrder: self.cancel_order,
        }

    def handle(self, command: Command) -> CommandResult:
        """Dispatch a command model to its handler."""
        try:
            handler = self._handlers[type(command)]
        except KeyError:
            raise TypeError(f"no handler for {type(command).__name__}") from None
        return handler(command)

    def register_customer(self, command: RegisterCustomer | Mapping[str, Any]) -> CommandResult:
        cmd = _parse(RegisterCustomer, command)

        def decide() -> _Decision:
            customer = Customer.register(cmd.name, cmd.email, cmd.address)
            return customer, [customer]

        return self._run(decide)

    def change_customer_address(self, command: ChangeCustomerAddress | Mapping[str, Any]) -> CommandResult:
        cmd = _parse(ChangeCustomerAddress, command)

        def decide() -> _Decision:
            customer = self.app.get_customer(cmd.customer_id)
            customer.change_address(cmd.address)
            return customer, [customer]

        return self._run(decide)

    def erase_customer(self, command: EraseCustomer | Mapping[str, Any]) -> CommandResult:
        """Record the erasure; destroying the customer's data key is the caller's part (``forget``)."""
        cmd = _parse(EraseCustomer, command)

        def decide() -> _Decision:
            customer = self.app.get_customer(cmd.customer_id)
            customer.erase(cmd.reason, cmd.actor)
            return customer, [customer]

        return self._run(decide)

    def create_product(self, command: CreateProduct | Mapping[str, Any]) -> CommandResult:
        cmd = _parse(CreateProduct, command)

        def decide() -> _Decision:
            product = Product.create(cmd.sku, cmd.name, cmd.price)
            return product, [product]

        return self._run(decide)

    def change_product_price(self, command: ChangeProductPrice | Mapping[str, Any]) -> CommandResult:
        cmd = _parse(ChangeProductPrice, command)

        def decide() -> _Decision:
            product = self.app.get_product(cmd.product_id)
            product.change_price(cmd.price)
            return product, [product]

        return self._run(decide)

    def receive_stock(self, command: ReceiveStock | Mapping[str, Any]) -> CommandResult:
        cmd = _parse(ReceiveStock, command)

        def decide() -> _Decision:
            product = self.app.get_product(cmd.product_id)
            product.receive_stock(cmd.quantity)
            return product, [product]

        return self._run(decide)

    def place_order(self, command: PlaceOrder | Mapping[str, Any]) -> CommandResult:
        """Place the order at the products' current prices and reserve its stock, in one append."""
        cmd = _parse(PlaceOrder, command)

        def decide() -> _Decision:
            self.app.get_customer(cmd.customer_id)
            products = [self.app.get_product(line.product_id) for line in cmd.lines]
            quantities = [line.quantity for line in cmd.lines]
            order = Order.place(
                cmd.customer_id,
                [OrderLine(p.id, q, p.price) for p, q in zip(products, quantities, strict=True)],
            )
            for product, quantity in zip(products, quantities, strict=True):
                product.reserve(order.id, quantity)
            return order, [order, *products]

        return self._run(decide)

    def add_order_line(self, command: AddOrderLine | Mapping[str, Any]) -> CommandResult:
        """Add a line at the product's current price and reserve its stock, in one append."""
        cmd = _parse(AddOrderLine, command)

        def decide() -> _Decision:
            order = self.app.get_order(cmd.order_id)
            product = self.app.get_product(cmd.product_id)
            order.add_line(product.id, cmd.quantity, product.price)
            product.reserve(order.id, cmd.quantity)
            return order, [order, product]

        return self._run(decide)

    def remove_order_line(self, command: RemoveOrderLine | Mapping[str, Any]) -> CommandResult:
        """Remove a line and release its stock, in one append."""
        cmd = _parse(RemoveOrderLine, command)

        def decide() -> _Decision:
            order = self.app.get_order(cmd.order_id)
            line = order.remove_line(cmd.product_id)
            product = self.app.get_product(line.product_id)
            product.release(order.id, line.quantity)
            return order, [order, product]

        return self._run(decide)

    def pay_order(self, command: PayOrder | Mapping[str, Any]) -> CommandResult:
        cmd = _parse(PayOrder, command)

        def decide() -> _Decision:
            order = self.app.get_order(cmd.order_id)
            order.pay(cmd.amount)
            return order, [order]

        return self._run(decide)

    def ship_order(self, command: ShipOrder | Mapping[str, Any]) -> CommandResult:
        cmd = _parse(ShipOrder, command)

        def decide() -> _Decision:
            order = self.app.get_order(cmd.order_id)
            order.ship()
            return order, [order]

        return self._run(decide)

    def cancel_order(self, command: CancelOrder | Mapping[str, Any]) -> CommandResult:
        """Cancel the order and release the stock of every line, in one append."""
        cmd = _parse(CancelOrder, command)

        def decide() -> _Decision:
            order = self.app.get_order(cmd.order_id)
            order.cancel(cmd.reason)
            products = []
            for line in order.lines:
                product = self.app.get_product(line.product_id)
                product.release(order.id, line.quantity)
                products.append(product)
            return order, [order, *products]

        return self._run(decide)

    def _run(self, decide: Callable[[], _Decision]) -> CommandResult:
        for attempt in range(1, self.max_attempts + 1):
            main, aggregates = decide()
            try:
                recordings = self.app.save(*_lock_order(main, aggregates))
            except IntegrityError:
                if attempt == self.max_attempts:
                    raise
                # Jitter keeps writers that collided from colliding again in lockstep.
                self._sleep(self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
                continue
            position = max((r.notification.id for r in recordings), default=None)
            written = tuple(
                StreamWrite(type(a).__name__, a.id, a.version)
                for a in aggregates
                if any(r.domain_event.originator_id == a.id for r in recordings)
            )
            return CommandResult(main.id, main.version, position, written)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _lock_order(main: Aggregate, aggregates: Sequence[Aggregate]) -> list[Aggregate]:
    """The main aggregate first, the others by id: the order their rows are inserted in.

    Two writers inserting rows of the same streams in opposite orders (an order of apple and pear,
    another of pear and apple) can each hold what the other waits for; PostgreSQL then fails one
    with a deadlock, which is not a conflict the retry covers. Shared streams in one global order
    cannot form that cycle. Main aggregates (orders) are never another command's other aggregates.
    """
    others = sorted((a for a in aggregates if a is not main), key=lambda a: a.id)
    return [main, *others] if any(a is main for a in aggregates) else others


def _parse(model: type[C], command: C | Mapping[str, Any]) -> C:
    if isinstance(command, model):
        return command
    if isinstance(command, Mapping):
        return model.model_validate(dict(command))
    raise TypeError(f"expected {model.__name__} or a mapping, got {type(command).__name__}")
