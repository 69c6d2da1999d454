"""The orders read models: ``order_views`` (PostgreSQL), ``order_cache`` (Redis) and their typed queries."""

from projections.orders.models import BestSeller, DailySales, OrderLineView, OrderSummary, Page, ProductStock
from projections.orders.order_cache import OrderCache
from projections.orders.order_views import OrderViews
from projections.orders.queries import OrderCacheQueries, OrderQueries

__all__ = [
    "BestSeller",
    "DailySales",
    "OrderCache",
    "OrderCacheQueries",
    "OrderLineView",
    "OrderQueries",
    "OrderSummary",
    "OrderViews",
    "Page",
    "ProductStock",
]
