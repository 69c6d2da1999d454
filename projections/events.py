"""Events as projections see them, from either source: a Kafka record (live) or the store (replay).

Both sources produce :class:`ProjectedEvent`; the payload is decoded only when a handler asks for
it, so events a projection does not handle cost one dict lookup.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import JSONTranscoder, Mapper, StoredEvent, Transcoder
from eventsourcing.utils import resolve_topic

from eventstore.personal import PersonalFields, personal_fields_from_env, personal_marker
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


# A stream id already in the canonical form ``str(UUID(...))`` gives: lower-case 8-4-4-4-12 hex.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


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
    if type(doc) is not dict:
        raise MalformedEvent("bad_envelope", f"expected a JSON object, got {type(doc).__name__}")
    get: Callable[[str], Any] = doc.get
    event_id = get("event_id")
    event_type = get("event_type")
    schema_version = get("schema_version")
    stream_id = get("stream_id")
    stream_type = get("stream_type")
    stream_version = get("stream_version")
    position = get("position")
    transaction_id = get("transaction_id")
    recorded_at = get("recorded_at")
    metadata = get("metadata")
    encoding = get("payload_encoding")
    # Why exact type tests: orjson only ever returns the builtin types themselves (a JSON true is a
    # bool, never an int), so `type(x) is int` is the same check as the loop's isinstance-and-not-
    # bool, at a fraction of its cost. Only a bad envelope pays for the loop, which names the field.
    if not (
        type(event_id) is str
        and type(event_type) is str
        and type(schema_version) is int
        and type(stream_id) is str
        and type(stream_type) is str
        and type(stream_version) is int
        and type(position) is int
        and type(transaction_id) is int
        and type(recorded_at) is str
        and type(metadata) is dict
        and type(encoding) is str
    ):
        _check_fields(doc)
    if encoding not in ("json", "base64") or "payload" not in doc:
        raise MalformedEvent("bad_envelope", f"payload_encoding {encoding!r} or payload missing")
    try:
        # Why the pattern first: the relay writes canonical ids, which str(UUID(id)) would return
        # unchanged, and parsing one costs several times the match.
        if _CANONICAL_UUID.fullmatch(stream_id) is None:
            stream_id = str(UUID(stream_id))
        recorded = datetime.fromisoformat(recorded_at)
    except ValueError as exc:
        raise MalformedEvent("bad_envelope", str(exc)) from None
    # Positional: the dataclass's field order (stream_id, stream_type, stream_version, event_id,
    # event_type, schema_version, position, transaction_id, recorded_at, metadata, encoding, payload).
    return ProjectedEvent(
        stream_id,
        stream_type,
        stream_version,
        event_id,
        event_type,
        schema_version,
        position,
        transaction_id,
        recorded,
        metadata,
        encoding,
        doc["payload"],
    )


def _check_fields(doc: dict[str, Any]) -> None:
    """Raise :class:`MalformedEvent` for the first envelope field that is missing or of a wrong type."""
    for name, kind in _ENVELOPE_FIELDS:
        got = doc.get(name)
        if not isinstance(got, kind) or isinstance(got, bool):
            raise MalformedEvent("bad_envelope", f"field {name!r} missing or not {_kind_name(kind)}")


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

    def __init__(self, mapper: Mapper[UUID], personal: PersonalFields | None = None) -> None:
        self.mapper = mapper
        self._known: dict[str, int] = {}
        self._bound = self._decode  # one bound method for every event, not one per bind()
        # Crypto-shredding: personal fields are opened after whichever decoding path ran (see
        # _decode_personal), so no fast path can hand a handler a sealed or erased field's data.
        self.personal = personal
        self._without_personal: set[str] = set()
        if personal is not None:
            self._bound = self._decode_personal
        # Why a fast path: a JSON payload reaches the consumer already parsed (with the envelope),
        # and the plain mapper would dump it and parse it again with the stdlib's json. When nothing
        # can differ -- the library's own Mapper and JSONTranscoder, no cipher, no compressor -- the
        # parsed payload is revived with the transcoder's own object hook, exactly as json.loads
        # would call it, and handed to an identical Mapper whose transcoder passes it through, so
        # upcasting and event construction stay the library's. Saves ~1.5 us of ~6 per event.
        transcoder = mapper.transcoder
        plain = (
            type(mapper) is Mapper
            and type(transcoder) is JSONTranscoder
            and mapper.cipher is None
            and mapper.compressor is None
        )
        self._hook: Callable[[dict[str, Any]], Any] | None = transcoder._decode_obj if plain else None  # type: ignore[attr-defined]
        self._revived: Mapper[UUID] = Mapper(_Revived())

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
        event._decode = self._bound

    def _decode(self, event: ProjectedEvent) -> DomainEventProtocol[UUID]:
        hook = self._hook
        if hook is not None and event.payload_encoding == "json" and type(event.raw_payload) is dict:
            try:
                state = _revive(event.raw_payload, hook)
                revived = StoredEvent(
                    _stream_uuid(event.stream_id), event.stream_version, event.event_type, state
                )
                return self._revived.to_domain_event(revived)
            except Exception:  # the general path below raises the canonical error
                pass
        try:
            stored = StoredEvent(
                originator_id=_stream_uuid(event.stream_id),
                originator_version=event.stream_version,
                topic=event.event_type,
                state=event.payload_bytes(),
            )
            return self.mapper.to_domain_event(stored)
        except Exception as exc:
            raise MalformedEvent("bad_payload", f"{event.event_type}: {type(exc).__name__}: {exc}") from exc

    def _decode_personal(self, event: ProjectedEvent) -> DomainEventProtocol[UUID]:
        """:meth:`_decode`, then the personal fields opened (or redacted, once their subject is forgotten)."""
        decoded = self._decode(event)
        if event.event_type in self._without_personal:  # most events: one set lookup
            return decoded
        if personal_marker(type(decoded)) is None:
            self._without_personal.add(event.event_type)
            return decoded
        assert self.personal is not None
        return self.personal.reveal(decoded)


class _Revived(Transcoder):
    """The transcoder of :attr:`EventDecoder._revived`: the state it is handed is already decoded."""

    def encode(self, obj: Any) -> bytes:
        raise NotImplementedError("decoding only")

    def decode(self, data: Any) -> Any:
        return data


def _revive(document: dict[str, Any], hook: Callable[[dict[str, Any]], Any]) -> Any:
    """``json.loads(dumps(document), object_hook=hook)`` without the round trip: new containers,
    each object passed to ``hook`` after its members, in document order, as the json module does."""
    fresh: dict[str, Any] = {}
    for key, value in document.items():
        kind = type(value)
        if kind is dict:
            value = _revive(value, hook)
        elif kind is list:
            value = _revive_list(value, hook)
        fresh[key] = value
    return hook(fresh)


def _revive_list(items: list[Any], hook: Callable[[dict[str, Any]], Any]) -> list[Any]:
    return [
        _revive(v, hook) if type(v) is dict else _revive_list(v, hook) if type(v) is list else v
        for v in items
    ]


_STREAM_UUIDS: dict[str, UUID] = {}
_STREAM_UUID_CACHE_LIMIT = 100_000


def _stream_uuid(stream_id: str) -> UUID:
    """``UUID(stream_id)``, remembered: a stream's events arrive together, and parsing costs ~1 us each."""
    found = _STREAM_UUIDS.get(stream_id)
    if found is None:
        if len(_STREAM_UUIDS) >= _STREAM_UUID_CACHE_LIMIT:
            _STREAM_UUIDS.clear()
        found = _STREAM_UUIDS[stream_id] = UUID(stream_id)
    return found


def event_decoder(application_name: str = "", env: dict[str, str] | None = None) -> EventDecoder:
    """A decoder configured like the writing application: its cipher and compressor settings.

    ``application_name`` lets prefixed settings (``ORDERS_CIPHER_KEY``) apply as they do on the write
    side. Personal fields open with the data keys of the store that ``DATALAYER_DATABASE_URL`` and
    ``DATALAYER_EVENTSTORE_SCHEMA`` name, under ``DATALAYER_MASTER_KEY``: the decoder connects to it
    only when it meets such a field.
    """
    from eventsourcing.application import Application

    reader_type = type("Reader", (Application,), {"name": application_name or "Reader"})
    overrides = dict(env or {})
    overrides["PERSISTENCE_MODULE"] = "eventsourcing.popo"
    mapper = reader_type(env=overrides).mapper
    return EventDecoder(mapper, personal_fields_from_env(mapper.transcoder, {**os.environ, **(env or {})}))
