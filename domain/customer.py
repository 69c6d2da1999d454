"""The customer aggregate: who places orders and where they are shipped."""

from __future__ import annotations

from typing import Self

from eventsourcing.domain import Aggregate, event


class Customer(Aggregate):
    """A registered customer.

    Input format (a non-empty name, a plausible email) is checked by the commands; the aggregate only
    records facts, so that replaying old events never fails on rules that were tightened later.
    """

    @classmethod
    def register(cls, name: str, email: str, address: str) -> Self:
        """Register a new customer (event ``Registered``)."""
        return cls(name=name, email=email, address=address)

    # The Registered event's apply: it runs on registration and again on every replay.
    @event("Registered")
    def __init__(self, name: str, email: str, address: str) -> None:
        self.name = name
        self.email = email
        self.address = address

    def change_address(self, address: str) -> None:
        """Move the customer to ``address`` (event ``AddressChanged``); the same address records nothing."""
        if address != self.address:
            self._address_changed(address=address)

    @event("AddressChanged")
    def _address_changed(self, address: str) -> None:
        self.address = address
