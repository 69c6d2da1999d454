"""The customer aggregate: who places orders and where they are shipped."""

from __future__ import annotations

from typing import ClassVar, Self

from eventsourcing.domain import Aggregate, event

from domain.errors import CustomerErased
from domain.personal import ERASED, PersonalData


class Customer(Aggregate):
    """A registered customer.

    Input format (a non-empty name, a plausible email) is checked by the commands; the aggregate only
    records facts, so that replaying old events never fails on rules that were tightened later.

    Name, email and address are personal data (``personal_data`` on the events): the event store
    encrypts them with this customer's data key. ``erase`` records that the customer was forgotten
    (the key is destroyed by ``datalayer forget``); from then on they read as ``ERASED``.
    """

    class Registered(Aggregate.Created):
        """The customer registered: the first event of the stream."""

        personal_data: ClassVar[PersonalData] = PersonalData(("name", "email", "address"))
        name: str
        email: str
        address: str

    class AddressChanged(Aggregate.Event):
        """The customer moved."""

        personal_data: ClassVar[PersonalData] = PersonalData(("address",))
        address: str

    class Erased(Aggregate.Event):
        """The customer's personal data was erased: who asked and why, never the data itself."""

        reason: str
        actor: str

    @classmethod
    def register(cls, name: str, email: str, address: str) -> Self:
        """Register a new customer (event ``Registered``)."""
        return cls(name=name, email=email, address=address)

    # The Registered event's apply: it runs on registration and again on every replay.
    @event(Registered)
    def __init__(self, name: str, email: str, address: str) -> None:
        self.name = name
        self.email = email
        self.address = address
        self.erased = False

    def change_address(self, address: str) -> None:
        """Move the customer to ``address`` (event ``AddressChanged``); the same address records nothing."""
        if self.erased:
            raise CustomerErased(self.id, "change the address of")
        if address != self.address:
            self._address_changed(address=address)

    @event(AddressChanged)
    def _address_changed(self, address: str) -> None:
        self.address = address

    def erase(self, reason: str, actor: str) -> None:
        """Record that the customer's personal data was erased (event ``Erased``), once."""
        if self.erased:
            raise CustomerErased(self.id, "erase")
        self._erased(reason=reason, actor=actor)

    @event(Erased)
    def _erased(self, reason: str, actor: str) -> None:
        # The data key is gone already, so the fields read as ERASED anyway; this also covers a
        # process that still held the key in its cache.
        self.name = self.email = self.address = ERASED
        self.erased = True
