"""The customer read models, which hold personal data: ``customer_directory`` (PostgreSQL) and
``customer_cache`` (Redis). Both purge a customer's personal data when the customer is erased."""

from projections.customers.read_models import (
    CustomerCache,
    CustomerDirectory,
    customer_key,
    customers,
)

__all__ = ["CustomerCache", "CustomerDirectory", "customer_key", "customers"]
