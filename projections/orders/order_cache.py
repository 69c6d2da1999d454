"""``order_cache``: stock levels, order statuses and a best-seller leaderboard in Redis.

Keys, relative to the target's prefix:

- ``stock:<product_id>``: hash of ``sku``, ``name``, ``price``, ``received``, ``reserved``, ``available``;
- ``order_status``: hash of order id -> status;
- ``best_sellers``: sorted set of product id, scored by the units orders hold (reserved, not released).
"""

from __future__ import annotations

from typing import Any

from domain.order import Order, OrderStatus
from domain.product import Product
from projections.events import ProjectedEvent
from projections.projection import handles
from projections.targets.redis import RedisProjection, RedisWrites

# eventsourcing creates the event classes (Order.Placed...) at runtime, where mypy cannot see them.
_Order: Any = Order
_Product: Any = Product

STOCK = "stock:"
ORDER_STATUS = "order_status"
BEST_SELLERS = "best_sellers"


def stock_key(product_id: object) -> str:
    """The relative key of a product's stock hash."""
    return f"{STOCK}{product_id}"


class OrderCache(RedisProjection):
    """Hot lookups for the storefront: a product's stock, an order's status, the best sellers.

    Counters move by increments only (``HINCRBY``, ``ZINCRBY``), so they stay right whatever order
    the batches of different products commit in. Shipping keeps a product's units reserved (see
    :class:`domain.product.Product`), so shipped orders still count as sold.
    """

    name = "order_cache"
    version = 1
    stream_types = ("Order", "Product")
    application_name = "Orders"
    # Stock and statuses are per stream; counters and scores change by increments only.
    parallel_replay = True

    @handles(_Product.Created)
    def product_created(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        data = event.data
        writes.hset(
            stock_key(event.stream_id),
            {
                "sku": data.sku,
                "name": data.name,
                "price": str(data.price),
                "received": 0,
                "reserved": 0,
                "available": 0,
            },
        )

    @handles(_Product.PriceChanged)
    def price_changed(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        writes.hset(stock_key(event.stream_id), {"price": str(event.data.price)})

    @handles(_Product.StockReceived)
    def stock_received(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        quantity = int(event.data.quantity)
        key = stock_key(event.stream_id)
        writes.hincrby(key, "received", quantity)
        writes.hincrby(key, "available", quantity)

    @handles(_Product.StockReserved)
    def stock_reserved(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        self._reserve(event, writes, int(event.data.quantity))

    @handles(_Product.StockReleased)
    def stock_released(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        self._reserve(event, writes, -int(event.data.quantity))

    @handles(_Order.Placed)
    def order_placed(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        self._status(event, writes, OrderStatus.PLACED)

    # Lines change the order but not its status; setting it again keeps every Order event's rule simple.
    @handles(_Order.LineAdded, _Order.LineRemoved)
    def order_lines_changed(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        self._status(event, writes, OrderStatus.PLACED)

    @handles(_Order.Paid)
    def order_paid(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        self._status(event, writes, OrderStatus.PAID)

    @handles(_Order.Shipped)
    def order_shipped(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        self._status(event, writes, OrderStatus.SHIPPED)

    @handles(_Order.Cancelled)
    def order_cancelled(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        self._status(event, writes, OrderStatus.CANCELLED)

    def _reserve(self, event: ProjectedEvent, writes: RedisWrites, quantity: int) -> None:
        """Move ``quantity`` units (negative to release) from available to reserved, and score them."""
        key = stock_key(event.stream_id)
        writes.hincrby(key, "reserved", quantity)
        writes.hincrby(key, "available", -quantity)
        writes.zincrby(BEST_SELLERS, event.stream_id, quantity)

    def _status(self, event: ProjectedEvent, writes: RedisWrites, status: OrderStatus) -> None:
        writes.hset(ORDER_STATUS, {event.stream_id: _STATUS_TEXT[status]})


# Each status's text, looked up once: an enum's ``.value`` is a descriptor call on every event.
_STATUS_TEXT: dict[OrderStatus, str] = {status: status.value for status in OrderStatus}
