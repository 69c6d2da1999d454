"""Events as projections see them, from either source: a Kafka record (live) or the store (replay).

Both sources produce :class:`ProjectedEvent`; the payload is decoded only when a handler asks for
it, so events a projection does not handle cost one dict lookup.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.utils import resolve_topic

from eventstore.records import RecordedEvent


class MalformedEvent(Exception):
    """A record that cannot be read as an event: it is dead-lettered, never applied.

    ``reason`` is one of ``not_json``, ``bad_envelope``, ``unknown_event_type``,
    ``unknown_schema_version`` or ``bad_payload``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True, eq=False)
class ProjectedEvent:
    """One stored event, where it sits in its stream and in the log, and its decoded payload.

    ``stream_id`` is the canonical UUID string (``str(uuid)``): read models key on it as text or
    as a UUID column, and it is what the stream-version checkpoints store.
    """

    stream_id: str
    stream_type: str
    stream_version: int
    event_id: str
    event_type: str
    schema_version: int
    position: int
    transaction_id: int
    recorded_at: datetime
    metadata: dict[str, Any]
    payload_encoding: str
    raw_payload: Any
    _decode: Callable[[ProjectedEvent], Any] | None = field(default=None, repr=False)
    _data: Any = field(default=None, repr=False)

    @property
    def data(self) -> Any:
        """The decoded payload (for eventsourcing events, the domain event object); decoded once."""
        if self._data is None:
            if self._decode is None:
                raise MalformedEvent("bad_payload", f"no decoder for {self.event_type}")
            self._data = self._decode(self)
        return self._data

    def payload_bytes(self) -> bytes:
        """The payload exactly as stored (JSON re-encoded compactly when carried as JSON)."""
        if self.payload_encoding == "bytes":
            return bytes(self.raw_payload)
        if self.payload_encoding == "base64":
            return base64.b64decode(self.raw_payload)
        return orjson.dumps(self.raw_payload)


_ENVELOPE_FIELDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("event_id", str),
    ("event_type", str),
    ("schema_version", int),
    ("stream_id", str),
    ("stream_type", str),
    ("stream_version", int),
    ("position", int),
    ("transaction_id", int),
    ("recorded_at", str),
    ("metadata", dict),
    ("payload_encoding", str),
)


def event_from_envelope(value: bytes | None) -> ProjectedEvent:
    """Parse a relay envelope (the Kafka record value); raises :class:`MalformedEvent` naming the fault.

    This is the consumer's hot path, so fields are checked by hand rather than through the pydantic
    model; the checks match ``eventstore.relay.EventEnvelope``.
    """
    if value is None:
        raise MalformedEvent("not_json", "the record has no value")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent("not_json", str(exc)) from None
    if not isinstance(doc, dict):
        raise MalformedEvent("bad_envelope", f"expected a JSON object, got {type(doc).__name__}")
    for name, kind in _ENVELOPE_FIELDS:
        got = doc.get(name)
        if not isinstance(got, kind) or isinstance(got, bool):
            raise MalformedEvent("bad_envelope", f"field {name!r} missing or not {_kind_name(kind)}")
    encoding = doc["payload_encoding"]
    if encoding not in ("json", "base64") or "payload" not in doc:
        raise MalformedEvent("bad_envelope", f"payload_encoding {encoding!r} or payload missing")
    try:
        stream_id = str(UUID(doc["stream_id"]))
        recorded_at = datetime.fromisoformat(doc["recorded_at"])
    except ValueError as exc:
        raise MalformedEvent("bad_envelope", str(exc)) from None
    return ProjectedEvent(
        stream_id=stream_id,
        stream_type=doc["stream_type"],
        stream_version=doc["stream_version"],
        event_id=doc["event_id"],
        event_type=doc["event_type"],
        schema_version=doc["schema_version"],
        position=doc["position"],
        transaction_id=doc["transaction_id"],
        recorded_at=recorded_at,
        metadata=doc["metadata"],
        payload_encoding=encoding,
        raw_payload=doc["payload"],
    )


def event_from_record(event: RecordedEvent) -> ProjectedEvent:
    """The same event read straight from the store (replay): no envelope round trip."""
    return ProjectedEvent(
        stream_id=str(event.stream_id),
        stream_type=event.stream_type,
        stream_version=event.stream_version,
        event_id=str(event.event_id),
        event_type=event.event_type,
        schema_version=event.schema_version,
        position=event.position,
        transaction_id=event.transaction_id,
        recorded_at=event.recorded_at,
        metadata=event.metadata.to_dict(),
        payload_encoding="bytes",
        raw_payload=event.payload,
    )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


class EventDecoder:
    """Checks an event's type and schema version, and decodes its payload.

    This one reads ``eventsourcing`` events through the application's :class:`Mapper`, so the cipher,
    the compressor and the upcasters of the write side apply unchanged: a handler receives the
    domain event object at its current class version.
    """

    def __init__(self, mapper: Mapper[UUID]) -> None:
        self.mapper = mapper
        self._known: dict[str, int] = {}

    def check(self, event: ProjectedEvent) -> None:
        """Raise :class:`MalformedEvent` if the type is unknown here or the schema is newer than ours."""
        current = self._known.get(event.event_type)
        if current is None:
            try:
                cls = resolve_topic(event.event_type)
            except Exception as exc:  # TopicError, ImportError, AttributeError, ValueError...
                raise MalformedEvent("unknown_event_type", f"{event.event_type!r}: {exc}") from None
            current = int(getattr(cls, "class_version", 1))
            self._known[event.event_type] = current
        if event.schema_version > current:
            raise MalformedEvent(
                "unknown_schema_version",
                f"{event.event_type} schema version {event.schema_version}, this code knows up to {current}",
            )

    def bind(self, event: ProjectedEvent) -> None:
        """Attach this decoder to ``event`` (its payload is decoded on first use of ``event.data``)."""
        event._decode = self._decode

    def _decode(self, event: ProjectedEvent) -> DomainEventProtocol[UUID]:
        try:
            stored = StoredEvent(
                originator_id=UUID(event.stream_id),
                originator_version=event.stream_version,
                topic=event.event_type,
                state=event.payload_bytes(),
            )
            return self.mapper.to_domain_event(stored)
        except Exception as exc:
            raise MalformedEvent("bad_payload", f"{event.event_type}: {type(exc).__name__}: {exc}") from exc


def event_decoder(application_name: str = "", env: dict[str, str] | None = None) -> EventDecoder:
    """A decoder configured like the writing application: its cipher and compressor settings.

    ``application_name`` lets prefixed settings (``ORDERS_CIPHER_KEY``) apply as they do on the write
    side; the decoder itself never touches a database.
    """
    from eventsourcing.application import Application

    reader_type = type("Reader", (Application,), {"name": application_name or "Reader"})
    overrides = dict(env or {})
    overrides["PERSISTENCE_MODULE"] = "eventsourcing.popo"
    return EventDecoder(reader_type(env=overrides).mapper)
