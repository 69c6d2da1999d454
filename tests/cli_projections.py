"""Projections renamed from the environment, so CLI tests run ``datalayer`` on isolated read models."""

from __future__ import annotations

import os

from projections.orders import OrderCache, OrderViews


class IsolatedViews(OrderViews):
    name = os.environ.get("TEST_PROJECTION_NAME", "test_order_views")


class IsolatedCache(OrderCache):
    name = os.environ.get("TEST_PROJECTION_NAME", "test_order_cache")
