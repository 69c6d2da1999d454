"""Customers as the storefront shows them: name, email and address, in PostgreSQL and in Redis.

These are the read models holding personal data. Their handlers receive it already opened by the
decoder (see :mod:`eventstore.personal`), or as the redaction marker once the customer was
forgotten; on ``Customer.Erased`` they purge what they hold. The erasure is the last event of the
customer's stream, and a stream's events are applied in order (one Kafka partition, or the store's
log in a rebuild), so nothing of the customer's can arrive after it and restore the data.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, MetaData, Table, Text, Uuid

from domain.customer import Customer
from projections.events import ProjectedEvent
from projections.projection import handles
from projections.targets.postgres import SqlProjection
from projections.targets.redis import RedisProjection, RedisWrites
from projections.targets.sql_writes import SqlWrites

# eventsourcing creates the event classes at runtime, where mypy cannot see them.
_Customer: Any = Customer

metadata = MetaData()

# One row per customer; an erased customer keeps the row (the orders still refer to the id), with
# every personal column NULL and erased_at set.
customers = Table(
    "customers",
    metadata,
    Column("customer_id", Uuid, primary_key=True),
    Column("name", Text, nullable=True),
    Column("email", Text, nullable=True),
    Column("address", Text, nullable=True),
    Column("registered_at", DateTime(timezone=True), nullable=False),
    Column("erased_at", DateTime(timezone=True), nullable=True),
    Column("version", BigInteger, nullable=False),
)


class CustomerDirectory(SqlProjection):
    """``customers``: each customer's current name, email and address, purged on erasure."""

    name = "customer_directory"
    version = 1
    stream_types = ("Customer",)
    application_name = "Orders"
    metadata = metadata
    prefetch = ("customers",)

    @handles(_Customer.Registered)
    def registered(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        data = event.data
        writes.upsert(
            customers,
            {
                "customer_id": event.stream_id,
                "name": data.name,
                "email": data.email,
                "address": data.address,
                "registered_at": event.recorded_at,
                "erased_at": None,
                "version": event.stream_version,
            },
        )

    @handles(_Customer.AddressChanged)
    def address_changed(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        self._update(event, writes, address=event.data.address)

    @handles(_Customer.Erased)
    def erased(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        self._update(event, writes, name=None, email=None, address=None, erased_at=event.recorded_at)

    def _update(self, event: ProjectedEvent, writes: SqlWrites, **changes: Any) -> None:
        """Write the customer's whole row back with ``changes`` (an upsert inserts whole rows)."""
        row = writes.get(customers, {"customer_id": event.stream_id})
        if row is None:
            # Unreachable when versions are checked (Registered is version 1); raising dead-letters it.
            raise LookupError(f"customer {event.stream_id} has no row to update")
        row.update(changes, version=event.stream_version)
        writes.upsert(customers, row)


CUSTOMER = "customer:"


def customer_key(customer_id: object) -> str:
    """The relative key of a customer's hash in ``customer_cache``."""
    return f"{CUSTOMER}{customer_id}"


class CustomerCache(RedisProjection):
    """``customer:<id>``: a hash of ``name``, ``email`` and ``address``, deleted on erasure."""

    name = "customer_cache"
    version = 1
    stream_types = ("Customer",)
    application_name = "Orders"

    @handles(_Customer.Registered)
    def registered(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        data = event.data
        writes.hset(
            customer_key(event.stream_id), {"name": data.name, "email": data.email, "address": data.address}
        )

    @handles(_Customer.AddressChanged)
    def address_changed(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        writes.hset(customer_key(event.stream_id), {"address": event.data.address})

    @handles(_Customer.Erased)
    def erased(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        writes.delete(customer_key(event.stream_id))
