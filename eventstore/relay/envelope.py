"""The JSON envelope every event travels in on Kafka; its JSON Schema is docs/event-envelope.schema.json."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import orjson
from pydantic import BaseModel, ConfigDict, Field

from eventstore.records import RecordedEvent


class EventEnvelope(BaseModel):
    """One stored event as published: where it sits in its stream and in the log, and its payload.

    ``payload`` is the stored payload itself when it is JSON (``payload_encoding = "json"``), and
    base64 of the stored bytes otherwise (``"base64"``): an encrypted payload stays encrypted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: UUID
    event_type: str = Field(description="the event's type (for eventsourcing events, its class topic)")
    schema_version: int = Field(ge=1, description="the payload's schema version, for upcasters")
    stream_id: UUID = Field(description="the aggregate's id; also the Kafka record key")
    stream_type: str = Field(description="the aggregate type; also names the topic")
    stream_version: int = Field(ge=0, description="the event's version within its stream")
    position: int = Field(description="global position in the store (unique, insert order)")
    transaction_id: int = Field(
        description="the writing transaction; (transaction_id, position) is log order"
    )
    recorded_at: datetime
    metadata: dict[str, Any] = Field(description="correlation_id, causation_id, actor, tenant and extra keys")
    payload_encoding: Literal["json", "base64"]
    payload: Any = Field(description="a JSON value when payload_encoding is json, else a base64 string")

    def payload_bytes(self) -> bytes:
        """The payload's bytes: exactly as stored for base64, re-encoded JSON otherwise."""
        if self.payload_encoding == "base64":
            return base64.b64decode(self.payload)
        return json.dumps(self.payload, separators=(",", ":")).encode()


def encode_envelope(event: RecordedEvent) -> bytes:
    """The event's envelope as JSON bytes, the Kafka record value; parse it with :class:`EventEnvelope`.

    This is the relay's hot path, so it does not build the model: a JSON payload is checked and
    spliced in as stored, the other fields are dumped by orjson.
    """
    head = {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "schema_version": event.schema_version,
        "stream_id": event.stream_id,
        "stream_type": event.stream_type,
        "stream_version": event.stream_version,
        "position": event.position,
        "transaction_id": event.transaction_id,
        "recorded_at": event.recorded_at,
        "metadata": event.metadata.to_dict(),
    }
    raw = event.payload
    if is_json_container(raw):
        head["payload_encoding"] = "json"
        return _dumps(head)[:-1] + b',"payload":' + raw + b"}"
    head["payload_encoding"] = "base64"
    head["payload"] = base64.b64encode(raw).decode("ascii")
    return _dumps(head)


def is_json_container(raw: bytes) -> bool:
    """True when ``raw`` is a JSON object or array, the payloads an envelope embeds as JSON.

    Anything else (ciphertext, compressed bytes, a bare JSON scalar) goes as base64, so that
    consumers get the stored bytes back exactly.
    """
    if raw[:1] not in (b"{", b"["):
        return False
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


def _dumps(value: dict[str, Any]) -> bytes:
    return orjson.dumps(value, default=str)


def envelope_json_schema() -> dict[str, Any]:
    """The envelope's JSON Schema, as exported to docs/event-envelope.schema.json."""
    schema = EventEnvelope.model_json_schema()
    schema["$id"] = "urn:datalayer:event-envelope:1"
    return schema
