"""Events as projections see them, from either source: a Kafka record (live) or the store (replay).

Both sources produce :class:`ProjectedEvent`; the payload is decoded only when a handler asks for
it, so events a projection does not handle cost one dict lookup.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    Mapper,
    StoredEvent,
    Transcoder,
    Transcoding,
    UUIDAsHex,
    find_id_convertor,
    pass_through_convertor,
)
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
# Stream ids known to be in that form (matched, or made by str(UUID(...))); bounded like the caches below.
_CANONICAL_IDS: set[str] = set()
_CANONICAL_IDS_LIMIT = 16_384


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
        # And a set of ids already seen canonical first: a stream's events recur, and the lookup
        # costs a fifth of the match.
        if stream_id not in _CANONICAL_IDS:
            if _CANONICAL_UUID.fullmatch(stream_id) is None:
                stream_id = str(UUID(stream_id))
            if len(_CANONICAL_IDS) >= _CANONICAL_IDS_LIMIT:
                _CANONICAL_IDS.clear()
            _CANONICAL_IDS.add(stream_id)
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
    # Positional, in the dataclass's field order (see event_from_envelope).
    return ProjectedEvent(
        _stream_text(event.stream_id),
        event.stream_type,
        event.stream_version,
        str(event.event_id),
        event.event_type,
        event.schema_version,
        event.position,
        event.transaction_id,
        event.recorded_at,
        event.metadata.to_dict(),
        "bytes",
        event.payload,
    )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


class EventDecoder:
    """Checks an event's type and schema version, and decodes its payload into the domain event.

    Results are always what the application's :class:`Mapper` gives, so the cipher, the compressor
    and the upcasters of the write side apply unchanged: a handler receives the domain event object
    at its current class version. :meth:`_decode` is the one place that decides how: directly, or
    through the mapper.
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
        transcoder = mapper.transcoder
        # Whether payloads may be decoded without the mapper: only when it can do nothing more than
        # parse JSON and apply its transcodings -- the library's own Mapper and JSONTranscoder, no
        # cipher, no compressor. Anything else (a cipher, a compressor, a custom mapper or
        # transcoder) sends every payload through the mapper. Personal fields are opened after
        # either path, by _decode_personal.
        direct = (
            type(mapper) is Mapper
            and type(transcoder) is JSONTranscoder
            and mapper.cipher is None
            and mapper.compressor is None
        )
        self._revivers = _revivers(transcoder.names) if direct else None  # type: ignore[attr-defined]
        # The library's own event construction and upcasting, for states already parsed and revived.
        self._revived: Mapper[UUID] = Mapper(_Revived())
        self._classes: dict[str, tuple[type, int, Callable[[Any], Any]]] = {}

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

    def prepare(self, event: ProjectedEvent) -> None:
        """:meth:`check`, :meth:`bind` and ``event.data`` in one call: what the runner does for every
        event it hands to a handler, so a bad payload is named as such before the handler runs.

        Why one method: three calls and a property per event cost the consumer ~0.2 us. A subclass
        that overrides :meth:`check` or :meth:`bind` gets the three calls instead (see the runner).
        """
        event_type = event.event_type
        current = self._known.get(event_type)
        if current is None or event.schema_version > current:
            self.check(event)  # learns the type, or raises what check raises
        decode = self._bound
        event._decode = decode
        if event._data is None:
            # Types known to carry no personal field skip _decode_personal's own call.
            if event_type in self._without_personal:
                event._data = self._decode(event)
            else:
                event._data = decode(event)

    def _decode(self, event: ProjectedEvent) -> DomainEventProtocol[UUID]:
        """The payload as the domain event: the one decode entry point, fast path or mapper.

        Direct (when ``_revivers`` is set, see ``__init__``): parse the JSON with orjson (a
        payload from Kafka arrives parsed already, with its envelope), revive the transcoded values
        exactly as the transcoder's object hook would, and build the event object as the mapper
        does. Why: the mapper parses with the stdlib's json and a Python hook per object, and this is
        cheaper for the same result. A stored payload with a float (orjson reads an integer beyond
        64 bits as one), or any payload that fails here, goes through the mapper after all, which
        also names the fault; an event that needs upcasting is upcast by the library's mapper.
        """
        revivers = self._revivers
        if revivers is not None:
            try:
                encoding = event.payload_encoding
                raw = event.raw_payload
                if encoding == "bytes":
                    document = orjson.loads(raw)
                    if type(document) is dict:
                        return self._from_state(event, _revive_owned(document, revivers))
                elif encoding == "json" and type(raw) is dict:
                    # Parsed with its envelope, where orjson decided any floats already.
                    return self._from_state(event, _revive(raw, revivers))
                # base64 (not JSON) or not an object: the mapper decides what it is.
            except Exception:  # the mapper below decodes it exactly, or raises the canonical error
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

    def _from_state(self, event: ProjectedEvent, state: dict[str, Any]) -> DomainEventProtocol[UUID]:
        """What ``Mapper.to_domain_event`` builds from a decoded ``state`` (upcasting through it)."""
        topic = event.event_type
        found = self._classes.get(topic)
        if found is None:
            cls = resolve_topic(topic)
            convert = find_id_convertor(cls, UUID)
            found = self._classes[topic] = (cls, int(getattr(cls, "class_version", 1)), convert)
        cls, class_version, convert = found
        originator_id = _stream_uuid(event.stream_id)
        if state.get("class_version", 1) < class_version:
            # The state goes in decoded: the _Revived transcoder passes it through.
            stored = StoredEvent(originator_id, event.stream_version, topic, state)  # type: ignore[arg-type]
            return self._revived.to_domain_event(stored)
        state.pop("class_version", None)
        # Why the test: UUID ids (every aggregate of ours) pass through unchanged, and the call costs more.
        state["originator_id"] = (
            originator_id if convert is pass_through_convertor else convert(originator_id)
        )
        state["originator_version"] = event.stream_version
        domain_event: DomainEventProtocol[UUID] = object.__new__(cls)
        object.__setattr__(domain_event, "__dict__", state)
        return domain_event


class _Revived(Transcoder):
    """The transcoder of :attr:`EventDecoder._revived`: the state it is handed is already decoded."""

    def encode(self, obj: Any) -> bytes:
        raise NotImplementedError("decoding only")

    def decode(self, data: Any) -> Any:
        return data


class _Inexact(Exception):
    """A float in a payload parsed by orjson: possibly an integer beyond 64 bits, which it rounds."""


Reviver = Callable[[Any], Any]


def _revivers(transcodings: Mapping[str, Transcoding]) -> dict[str, Reviver]:
    """Each transcoding's ``decode`` by name; UUIDs remembered, as ids recur and parsing costs ~1 us.

    The library's own timestamp and decimal transcodings are replaced by what their ``decode`` calls
    (``datetime.fromisoformat``, ``Decimal``): the same result and the same errors for what a
    payload can hold, without a Python call around them for every timestamp.
    """
    revivers: dict[str, Reviver] = {}
    for name, transcoding in transcodings.items():
        kind = type(transcoding)
        if kind is UUIDAsHex:
            revivers[name] = _remembered_uuid
        elif kind is DatetimeAsISO:
            revivers[name] = datetime.fromisoformat
        elif kind is DecimalAsStr:
            revivers[name] = Decimal
        else:
            revivers[name] = transcoding.decode
    return revivers


_UUIDS: dict[str, UUID] = {}
_UUID_CACHE_LIMIT = 16_384  # bounded like the stream id caches below, for the same reasons


def _remembered_uuid(data: str) -> UUID:
    """``UUIDAsHex.decode(data)``: equal UUIDs, immutable, so one object may serve every event."""
    found = _UUIDS.get(data)
    if found is None:
        if type(data) is not str:
            raise TypeError(f"a uuid_hex value must be a string, got {type(data).__name__}")
        if len(_UUIDS) >= _UUID_CACHE_LIMIT:
            _UUIDS.clear()
        found = _UUIDS[data] = UUID(data)
    return found


def _revive(document: dict[str, Any], revivers: dict[str, Reviver]) -> Any:
    """``json.loads(dumps(document), object_hook=JSONTranscoder._decode_obj)`` without the round trip.

    New containers, each object revived after its members, as the json module calls the hook: a
    ``{"_type_": name, "_data_": data}`` object becomes the transcoding's ``decode(data)``. For a
    payload carried parsed in a Kafka envelope, which the decoder must leave as it is.
    """
    fresh: dict[str, Any] = {}
    for key, value in document.items():
        kind = type(value)
        if kind is dict:
            # Most members are transcoded leaves (a timestamp, an id, an amount): revived here
            # without a call of their own, the same result as the general case below.
            if len(value) == 2 and "_type_" in value and "_data_" in value:
                data = value["_data_"]
                if type(data) in _SCALARS:
                    value = revivers[value["_type_"]](data)
                else:
                    value = _revive(value, revivers)
            else:
                value = _revive(value, revivers)
        elif kind is list:
            value = _revive_list(value, revivers)
        fresh[key] = value
    if len(fresh) == 2 and "_type_" in fresh and "_data_" in fresh:
        return revivers[fresh["_type_"]](fresh["_data_"])
    return fresh


# JSON's scalar types as orjson returns them: nothing in them to revive.
_SCALARS: frozenset[type] = frozenset((str, int, float, bool, type(None)))


def _revive_list(items: list[Any], revivers: dict[str, Reviver]) -> list[Any]:
    return [
        _revive(v, revivers) if type(v) is dict else _revive_list(v, revivers) if type(v) is list else v
        for v in items
    ]


def _revive_owned(document: dict[str, Any], revivers: dict[str, Reviver]) -> Any:
    """:func:`_revive` in place, for a document parsed here and used once; raises :class:`_Inexact`
    at any float, so that the stdlib's json reads that payload exactly instead."""
    for key, value in document.items():
        kind = type(value)
        if kind is dict:
            # A transcoded leaf with a text (a timestamp, an id, an amount: most members) is revived
            # here, without a call of its own; what it gives is what the call below would.
            if len(value) == 2 and "_type_" in value and "_data_" in value:
                data = value["_data_"]
                if data.__class__ is str:
                    document[key] = revivers[value["_type_"]](data)
                    continue
            document[key] = _revive_owned(value, revivers)
        elif kind is list:
            _revive_owned_list(value, revivers)
        elif kind is float:
            raise _Inexact(key)
    if len(document) == 2 and "_type_" in document and "_data_" in document:
        return revivers[document["_type_"]](document["_data_"])
    return document


def _revive_owned_list(items: list[Any], revivers: dict[str, Reviver]) -> None:
    for i, value in enumerate(items):
        kind = type(value)
        if kind is dict:
            items[i] = _revive_owned(value, revivers)
        elif kind is list:
            _revive_owned_list(value, revivers)
        elif kind is float:
            raise _Inexact("list item")


_STREAM_UUIDS: dict[str, UUID] = {}
_STREAM_TEXTS: dict[UUID, str] = {}
# Why 16,384 and not more: what these caches save comes from a stream's events arriving close
# together (within a batch or a few) and from a few hot ids; an entry costs ~200 bytes, so 100,000
# of them held ~20 MB per cache for a replay that meets each stream once (~70 MB of a two-process
# rebuild's peak RSS), at no measurable gain in CPU. Cleared when full: cheaper per call than an LRU.
_STREAM_UUID_CACHE_LIMIT = 16_384


def _stream_uuid(stream_id: str) -> UUID:
    """``UUID(stream_id)``, remembered: a stream's events arrive together, and parsing costs ~1 us each."""
    found = _STREAM_UUIDS.get(stream_id)
    if found is None:
        if len(_STREAM_UUIDS) >= _STREAM_UUID_CACHE_LIMIT:
            _STREAM_UUIDS.clear()
        found = _STREAM_UUIDS[stream_id] = UUID(stream_id)
    return found


def _stream_text(stream_id: UUID) -> str:
    """``str(stream_id)``, remembered both ways: a stream's events come together, in replay as well."""
    text = _STREAM_TEXTS.get(stream_id)
    if text is None:
        if len(_STREAM_TEXTS) >= _STREAM_UUID_CACHE_LIMIT:
            _STREAM_TEXTS.clear()
        text = _STREAM_TEXTS[stream_id] = str(stream_id)
        if len(_STREAM_UUIDS) >= _STREAM_UUID_CACHE_LIMIT:
            _STREAM_UUIDS.clear()
        _STREAM_UUIDS[text] = stream_id
    return text


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
