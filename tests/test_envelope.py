"""The Kafka envelope: what the relay encodes parses as the documented model, payload bytes intact."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from eventstore import EventMetadata, RecordedEvent
from eventstore.relay import EventEnvelope, encode_envelope, envelope_json_schema

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "event-envelope.schema.json"


def recorded(payload: bytes, metadata: EventMetadata | None = None) -> RecordedEvent:
    return RecordedEvent(
        position=42,
        transaction_id=9001,
        stream_id=uuid.uuid4(),
        stream_type="Order",
        stream_version=3,
        event_id=uuid.uuid4(),
        event_type="domain.order:Order.Paid",
        schema_version=2,
        payload=payload,
        metadata=metadata or EventMetadata(),
        recorded_at=datetime(2026, 11, 25, 12, 0, 1, 250000, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("payload", "encoding"),
    [
        (b'{"amount": "12.50", "lines": [1, 2]}', "json"),
        (b"[1,2,3]", "json"),
        (os.urandom(64), "base64"),  # ciphertext: carried as the stored bytes, still encrypted
        (b'{"truncated": ', "base64"),  # not valid JSON: never embedded
        (b'"a bare string"', "base64"),
    ],
)
def test_encoded_envelope_parses_and_keeps_the_payload(payload: bytes, encoding: str) -> None:
    event = recorded(payload, EventMetadata(correlation_id="c-7", actor="alice", extra={"ip": "10.0.0.1"}))
    envelope = EventEnvelope.model_validate_json(encode_envelope(event))
    assert envelope.payload_encoding == encoding
    if encoding == "base64":
        assert envelope.payload_bytes() == payload
    else:
        assert envelope.payload == json.loads(payload)
    assert (envelope.event_id, envelope.stream_id, envelope.stream_version) == (
        event.event_id,
        event.stream_id,
        3,
    )
    assert (envelope.position, envelope.transaction_id, envelope.schema_version) == (42, 9001, 2)
    assert envelope.recorded_at == event.recorded_at
    assert envelope.metadata == {"correlation_id": "c-7", "actor": "alice", "ip": "10.0.0.1"}


def test_published_schema_matches_the_model() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == envelope_json_schema(), (
        "docs/event-envelope.schema.json is stale: regenerate it from EventEnvelope"
    )


def test_envelope_rejects_unknown_fields() -> None:
    body = json.loads(encode_envelope(recorded(b"{}")))
    body["surprise"] = 1
    with pytest.raises(ValueError, match="surprise"):
        EventEnvelope.model_validate(body)
