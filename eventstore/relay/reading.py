"""The relay's read of the log: each event with its Kafka key and envelope mostly built by PostgreSQL.

The relay is bound by its one Python process (kafka-python's ``send`` alone is most of it). Reading
full :class:`~eventstore.records.RecordedEvent` objects and encoding their envelopes in Python cost
about as much again. Here PostgreSQL, another process and core, renders the key and every envelope
field as JSON text; the relay only appends the payload, which it embeds as stored when it is a
JSON object or array and as base64 otherwise (see :func:`eventstore.relay.envelope.encode_envelope`,
whose output parses to the same :class:`~eventstore.relay.envelope.EventEnvelope`). The query is
``read_all``'s: the same never-skipping horizon and order.
"""

from __future__ import annotations

import base64
from typing import Any, NamedTuple

from psycopg import sql

from eventstore.records import LogPosition
from eventstore.relay.envelope import is_json_container
from eventstore.store import EventStore

# Everything before the payload: the envelope's fields in the documented order, closed by the
# "payload_encoding" key. to_json quotes and escapes text; recorded_at is ISO 8601 with its offset.
_ENVELOPE_HEAD = sql.SQL(
    """convert_to('{"event_id":"' || event_id::text"""
    """ || '","event_type":' || to_json(event_type)::text"""
    """ || ',"schema_version":' || schema_version::text"""
    """ || ',"stream_id":"' || stream_id::text"""
    """ || '","stream_type":' || to_json(stream_type)::text"""
    """ || ',"stream_version":' || stream_version::text"""
    """ || ',"position":' || position::text"""
    """ || ',"transaction_id":' || transaction_id::text"""
    """ || ',"recorded_at":' || to_json(recorded_at)::text"""
    """ || ',"metadata":' || metadata::text"""
    """ || ',"payload_encoding":', 'UTF8')"""
)

_JSON_TAIL = b'"json","payload":'
_BASE64_TAIL = b'"base64","payload":"'

Headers = list[tuple[str, bytes]]


class RelayRow(NamedTuple):
    """One event as the relay reads it: its place in the log, its routing, its envelope's parts."""

    position: int
    transaction_id: int
    stream_type: str
    event_type: str
    schema_version: int
    key: bytes
    """The Kafka key: the stream id as text."""
    envelope_head: bytes
    """The envelope up to the value of ``payload_encoding``."""
    payload: bytes
    """The payload as stored."""

    @property
    def log_position(self) -> LogPosition:
        return LogPosition(self.transaction_id, self.position)

    def envelope(self) -> bytes:
        """The whole envelope: the JSON payload embedded as stored, anything else as base64."""
        raw = self.payload
        if is_json_container(raw):
            return b"".join((self.envelope_head, _JSON_TAIL, raw, b"}"))
        return b"".join((self.envelope_head, _BASE64_TAIL, base64.b64encode(raw), b'"}'))


class RelayReader:
    """Reads :class:`RelayRow` batches from a store's log in commit order (``read_all``'s query)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.query = (
            sql.SQL(
                # The cast needs a name of its own: as "transaction_id" it would be what ORDER BY
                # sorts by, an expression no index has, and every read would sort the rest of the log.
                "SELECT position, transaction_id::text::int8 AS transaction_id_int, stream_type, event_type,"
                " schema_version, convert_to(stream_id::text, 'UTF8'), "
            )
            + _ENVELOPE_HEAD
            + sql.SQL(
                ", payload FROM {}.events"
                " WHERE (transaction_id, position) > (%s::text::xid8, %s)"
                "   AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())"
                " ORDER BY transaction_id, position LIMIT %s"
            ).format(sql.Identifier(store.schema))
        ).as_bytes()

    def read(self, after: LogPosition, limit: int) -> list[RelayRow]:
        """Up to ``limit`` events after ``after``, never skipping a late commit (as ``read_all``)."""
        with self.store.pool.connection() as conn, conn.cursor(binary=True) as cur:
            # Binary results: integers and bytes arrive without text parsing.
            cur.execute(self.query, (str(after.transaction_id), after.position, limit))
            rows: list[tuple[Any, ...]] = cur.fetchall()
        return [RelayRow._make(row) for row in rows]


class RecordHeaders:
    """The Kafka headers of an event (type, schema version, position, log position), type bytes cached."""

    def __init__(self) -> None:
        self._types: dict[str, bytes] = {}

    def __call__(self, row: RelayRow) -> Headers:
        event_type = self._types.get(row.event_type)
        if event_type is None:
            event_type = self._types[row.event_type] = row.event_type.encode()
        return [
            ("event_type", event_type),
            ("schema_version", b"%d" % row.schema_version),
            ("position", b"%d" % row.position),
            ("log_position", b"%d/%d" % (row.transaction_id, row.position)),
        ]
