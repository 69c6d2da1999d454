"""Commands: what a caller asks the domain to do, checked for well-formed input before any aggregate loads.

Each command is a frozen pydantic model that forbids unknown fields, so a bad request fails with a
``pydantic.ValidationError`` listing every bad field, and nothing is appended. Whether the command is
*allowed* (enough stock, order not shipped, ...) is the aggregates' business, not the commands'.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any
from uuid import UUID

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

# A deliberately loose shape check (something@domain.tld, no spaces): deliverability is proven by sending
# mail, not by a regex, and this avoids the email-validator dependency.
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s.]+$"

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Email = Annotated[str, StringConstraints(strip_whitespace=True, max_length=254, pattern=EMAIL_PATTERN)]
# strict: pydantic would otherwise accept True as 1 and "3" as 3.
Quantity = Annotated[int, Field(gt=0, strict=True)]


def _reject_float(value: Any) -> Any:
    # A float has already lost the exact cents (0.1 + 0.2 != 0.3); money must arrive as str, int or Decimal.
    if isinstance(value, float):
        raise ValueError("money must be given as a string, integer or Decimal, not a float")
    return value


def _to_cents(value: Decimal) -> Decimal:
    # One canonical form ("10.50", never "10.5" or "1.05E+1") so equal amounts are stored alike.
    return value.quantize(Decimal("0.01"))


Money = Annotated[
    Decimal,
    BeforeValidator(_reject_float),
    Field(gt=0, max_digits=12, decimal_places=2, allow_inf_nan=False),
    AfterValidator(_to_cents),
]


class Command(BaseModel):
    """Base of all commands: immutable, and unknown fields are an error rather than silently dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class RegisterCustomer(Command):
    """Register a new customer."""

    name: Text
    email: Email
    address: Text


class ChangeCustomerAddress(Command):
    """Move a customer to a new address."""

    customer_id: UUID
    address: Text


class EraseCustomer(Command):
    """Record that a customer's personal data was erased; ``reason`` and ``actor`` must hold none of it."""

    customer_id: UUID
    reason: Text
    actor: Text


class CreateProduct(Command):
    """Create a product, with no stock yet."""

    sku: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    name: Text
    price: Money


class ChangeProductPrice(Command):
    """Set a product's price for orders placed from now on."""

    product_id: UUID
    price: Money


class ReceiveStock(Command):
    """Add units to a product's stock."""

    product_id: UUID
    quantity: Quantity


class OrderLineRequest(Command):
    """One line of an order being placed: the price is the product's, not the caller's, to decide."""

    product_id: UUID
    quantity: Quantity


def _unique_products(lines: list[OrderLineRequest]) -> list[OrderLineRequest]:
    seen: set[UUID] = set()
    for line in lines:
        if line.product_id in seen:
            raise ValueError(f"product {line.product_id} appears in more than one line")
        seen.add(line.product_id)
    return lines


class PlaceOrder(Command):
    """Place an order for a customer, reserving stock for every line."""

    customer_id: UUID
    lines: Annotated[list[OrderLineRequest], Field(min_length=1), AfterValidator(_unique_products)]


class AddOrderLine(Command):
    """Add a line for another product to an unpaid order, reserving its stock."""

    order_id: UUID
    product_id: UUID
    quantity: Quantity


class RemoveOrderLine(Command):
    """Remove a line from an unpaid order, releasing its stock."""

    order_id: UUID
    product_id: UUID


class PayOrder(Command):
    """Pay an order; the amount must equal its total."""

    order_id: UUID
    amount: Money


class ShipOrder(Command):
    """Ship a paid order."""

    order_id: UUID


class CancelOrder(Command):
    """Cancel an order that has not shipped, releasing its stock."""

    order_id: UUID
    reason: Text
