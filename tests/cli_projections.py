"""Projections renamed from the environment, so CLI tests run ``datalayer`` on isolated read models."""

from __future__ import annotations

import os

from projections.customers import CustomerCache, CustomerDirectory
from projections.orders import OrderCache, OrderViews


class IsolatedViews(OrderViews):
    name = os.environ.get("TEST_PROJECTION_NAME", "test_order_views")


class IsolatedCache(OrderCache):
    name = os.environ.get("TEST_PROJECTION_NAME", "test_order_cache")


class IsolatedDirectory(CustomerDirectory):
    name = os.environ.get("TEST_PROJECTION_NAME", "test_customer_directory")


class IsolatedCustomerCache(CustomerCache):
    name = os.environ.get("TEST_PROJECTION_NAME", "test_customer_cache")
