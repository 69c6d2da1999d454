"""The projections' event decoder gives exactly what the application's mapper gives, by any route.

Payloads are decoded directly (orjson, no mapper) when the mapper could do nothing more; these tests
compare every orders-domain event, from the store and from a Kafka envelope, with the mapper's own
result, and check the cases that must go through the mapper: upcasting, a cipher, an integer beyond
64 bits (orjson would read it as a float), a payload the transcoder cannot read.
"""

from __future__ import annotations

import base64
import os
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent

from domain import Order, OrderLine, OrdersApplication, Product
from eventstore import EventMetadata, RecordedEvent
from eventstore.relay import encode_envelope
from projections.events import (
    EventDecoder,
    MalformedEvent,
    ProjectedEvent,
    event_decoder,
    event_from_envelope,
    event_from_record,
)

_Product: Any = Product


def orders_events() -> list[tuple[str, DomainEventProtocol[uuid.UUID]]]:
    """Every orders-domain event type, from real aggregates: ``(stream type, event)``."""
    widget = Product.create(sku="W-1", name="Widget ✓", price=Decimal("2.50"))
    gadget = Product.create(sku="G-1", name="Gadget", price=Decimal("4.00"))
    for product in (widget, gadget):
        product.receive_stock(100)
    widget.change_price(Decimal("2.75"))
    order = Order.place(uuid.uuid4(), [OrderLine(widget.id, 2, widget.price)])
    widget.reserve(order.id, 2)
    order.add_line(gadget.id, 1, gadget.price)
    gadget.reserve(order.id, 1)
    order.remove_line(gadget.id)
    gadget.release(order.id, 1)
    order.pay(order.total)
    order.ship()
    cancelled = Order.place(uuid.uuid4(), [OrderLine(gadget.id, 3, gadget.price)])
    cancelled.cancel("changed mind")
    events: list[tuple[str, DomainEventProtocol[uuid.UUID]]] = []
    for stream_type, aggregate in (
        ("Product", widget),
        ("Product", gadget),
        ("Order", order),
        ("Order", cancelled),
    ):
        events += [(stream_type, e) for e in aggregate.collect_events()]
    return events


def recorded(
    stream_type: str, mapper: Mapper[uuid.UUID], event: DomainEventProtocol[uuid.UUID]
) -> RecordedEvent:
    stored = mapper.to_stored_event(event)
    return recorded_payload(
        stream_type, stored.topic, stored.originator_id, stored.originator_version, stored.state
    )


def recorded_payload(
    stream_type: str, topic: str, stream_id: Any, version: int, payload: bytes, schema_version: int = 1
) -> RecordedEvent:
    return RecordedEvent(
        position=7,
        transaction_id=900,
        stream_id=stream_id,
        stream_type=stream_type,
        stream_version=version,
        event_id=uuid.uuid4(),
        event_type=topic,
        schema_version=schema_version,
        payload=payload,
        metadata=EventMetadata(),
        recorded_at=datetime(2026, 11, 25, 12, 0, tzinfo=UTC),
    )


def decoded(decoder: EventDecoder, event: ProjectedEvent) -> Any:
    decoder.check(event)
    decoder.bind(event)
    return event.data


def both_routes(record: RecordedEvent) -> list[ProjectedEvent]:
    """The event as a replay reads it from the store, and as a consumer reads it from Kafka."""
    return [event_from_record(record), event_from_envelope(encode_envelope(record))]


def same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    assert vars(a) == vars(b)
    assert list(vars(a)) == list(vars(b))  # the same attributes in the same order
    for name, value in vars(a).items():
        assert type(value) is type(vars(b)[name]), name


def test_every_orders_event_decodes_as_the_mapper_decodes_it() -> None:
    mapper = OrdersApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}).mapper
    decoder = event_decoder("Orders")
    seen = set()
    for stream_type, domain_event in orders_events():
        record = recorded(stream_type, mapper, domain_event)
        expected = mapper.to_domain_event(mapper.to_stored_event(domain_event))
        for event in both_routes(record):
            same(decoded(decoder, event), expected)
        seen.add(record.event_type)
    assert len(seen) == 11  # every event type of the two aggregates


def test_an_event_needing_an_upcast_is_upcast(monkeypatch: pytest.MonkeyPatch) -> None:
    mapper = OrdersApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}).mapper
    product = Product.create(sku="W-1", name="Widget", price=Decimal("2.50"))
    product.change_price(Decimal("3.00"))
    changed = product.collect_events()[-1]
    record = recorded("Product", mapper, changed)  # stored at class version 1

    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["price"] += Decimal("1.00")

    monkeypatch.setattr(_Product.PriceChanged, "class_version", 2, raising=False)
    monkeypatch.setattr(_Product.PriceChanged, "upcast_v1_v2", staticmethod(upcast_v1_v2), raising=False)
    decoder = event_decoder("Orders")
    for event in both_routes(record):
        data = decoded(decoder, event)
        assert data.price == Decimal("4.00")
        stored = StoredEvent(record.stream_id, record.stream_version, record.event_type, record.payload)
        same(data, mapper.to_domain_event(stored))


def test_encrypted_payloads_decode_through_the_cipher() -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    env = {"PERSISTENCE_MODULE": "eventsourcing.popo", "CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher"}
    mapper = OrdersApplication(env={**env, "CIPHER_KEY": key}).mapper
    decoder = event_decoder("Orders", env={"CIPHER_TOPIC": env["CIPHER_TOPIC"], "CIPHER_KEY": key})
    for stream_type, domain_event in orders_events()[:4]:
        record = recorded(stream_type, mapper, domain_event)
        assert b"Widget" not in record.payload
        for event in both_routes(record):
            same(decoded(decoder, event), mapper.to_domain_event(mapper.to_stored_event(domain_event)))


def test_an_integer_beyond_64_bits_stays_exact() -> None:
    stream_id = uuid.uuid4()
    payload = (
        b'{"timestamp":{"_type_":"datetime_iso","_data_":"2026-11-25T12:00:00+00:00"},"quantity":%d}'
        % (2**70)
    )
    record = recorded_payload("Product", "domain.product:Product.StockReceived", stream_id, 2, payload)
    data = decoded(event_decoder("Orders"), event_from_record(record))
    assert data.quantity == 2**70 and type(data.quantity) is int


@pytest.mark.parametrize(
    "payload",
    [
        b'{"timestamp":{"_type_":"no_such_transcoding","_data_":"x"},"quantity":1}',
        b'{"timestamp": ',
        b"[1, 2]",
    ],
)
def test_an_unreadable_payload_is_a_bad_payload(payload: bytes) -> None:
    record = recorded_payload("Product", "domain.product:Product.StockReceived", uuid.uuid4(), 2, payload)
    with pytest.raises(MalformedEvent) as raised:
        decoded(event_decoder("Orders"), event_from_record(record))
    assert raised.value.reason == "bad_payload"


@pytest.mark.parametrize(
    "document",
    [
        {"at": {"_type_": "datetime_iso", "_data_": "2026-11-25T12:00:00+00:00"}, "n": 1},
        {"ids": [{"_type_": "uuid_hex", "_data_": uuid.UUID(int=5).hex}, [1, {"x": None}]]},
        {"deep": {"_type_": "decimal_str", "_data_": "1.50", "extra": True}},
        {"odd": {"_type_": "decimal_str", "other": "1.50"}},
        {"nested": {"_type_": "decimal_str", "_data_": {"_type_": "decimal_str", "_data_": "2"}}},
        {"listed": {"_type_": "decimal_str", "_data_": ["1"]}},
        {"unknown": {"_type_": "no_such", "_data_": 1}},
        {"_type_": "decimal_str", "_data_": "3.25"},
    ],
)
def test_direct_revival_matches_the_transcoders_object_hook(document: dict[str, Any]) -> None:
    import json

    from projections.events import _revive

    decoder = event_decoder("Orders")
    transcoder: Any = decoder.mapper.transcoder
    assert decoder._revivers is not None
    try:
        expected: Any = json.loads(json.dumps(document), object_hook=transcoder._decode_obj)
    except Exception:
        with pytest.raises(Exception):  # noqa: B017 -- the decoder then asks the mapper, which names it
            _revive(document, decoder._revivers)
        return
    before = json.dumps(document)
    assert _revive(document, decoder._revivers) == expected
    assert json.dumps(document) == before  # the envelope's payload is left as it was


def test_a_stream_id_in_another_form_is_made_canonical_every_time() -> None:
    record = recorded_payload("Order", "domain.order:Order.Shipped", uuid.uuid4(), 3, b"{}")
    envelope = encode_envelope(record).replace(
        str(record.stream_id).encode(), str(record.stream_id).upper().encode()
    )
    assert str(record.stream_id).upper().encode() in envelope
    for _ in range(2):  # the second time, the canonical form is remembered
        assert event_from_envelope(envelope).stream_id == str(record.stream_id)
