"""The relay's read of the log: each event with its Kafka key and envelope mostly built by PostgreSQL.

The relay is bound by its one Python process (kafka-python's ``send`` alone is most of it). Reading
full :class:`~eventstore.records.RecordedEvent` objects and encoding their envelopes in Python added
about half as much again. Here PostgreSQL, another process and core, renders the key and every envelope
field as JSON text; the relay only appends the payload, which it embeds as stored when it is a
JSON object or array and as base64 otherwise (see :func:`eventstore.relay.envelope.encode_envelope`,
whose output parses to the same :class:`~eventstore.relay.envelope.EventEnvelope`). The query is
``read_all``'s: the same never-skipping horizon and order.
"""

from __future__ import annotations

import base64
from typing import Any, Final

from psycopg import sql

from eventstore.records import LogPosition
from eventstore.relay.envelope import is_json_container
from eventstore.store import LOG_AFTER, LOG_ORDER, EventStore

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

RelayRow = tuple[int, int, str, str, int, bytes, bytes, bytes, float]
"""One event as the relay reads it: position, transaction id, stream type, event type, schema
version, Kafka key (the stream id as text), the envelope up to the value of ``payload_encoding``,
the payload as stored, and recorded_at in seconds since the epoch (for latency metrics).

A plain tuple, not a named one, on purpose: a tuple of only numbers, strings and bytes is one the
garbage collector stops tracking, while tens of thousands of rows in flight that it did track made
its full collections cost the relay about a tenth of its time.
"""

# Field indexes of a RelayRow (Final, so that type checkers know each field's type).
POSITION: Final = 0
TRANSACTION_ID: Final = 1
STREAM_TYPE: Final = 2
EVENT_TYPE: Final = 3
SCHEMA_VERSION: Final = 4
KEY: Final = 5
ENVELOPE_HEAD: Final = 6
PAYLOAD: Final = 7
RECORDED_AT: Final = 8


def log_position(row: RelayRow) -> LogPosition:
    """The row's place in the commit-ordered log."""
    return LogPosition(row[TRANSACTION_ID], row[POSITION])


def envelope(row: RelayRow) -> bytes:
    """The whole envelope: the JSON payload embedded as stored, anything else as base64."""
    raw = row[PAYLOAD]
    if is_json_container(raw):
        return b"".join((row[ENVELOPE_HEAD], _JSON_TAIL, raw, b"}"))
    return b"".join((row[ENVELOPE_HEAD], _BASE64_TAIL, base64.b64encode(raw), b'"}'))


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
                ", payload, extract(epoch FROM recorded_at)::float8 FROM {}.events WHERE "
                + LOG_AFTER
                + LOG_ORDER
            ).format(sql.Identifier(store.schema))
        ).as_bytes()

    def read(self, after: LogPosition, limit: int) -> list[RelayRow]:
        """Up to ``limit`` events after ``after``, never skipping a late commit (as ``read_all``)."""
        with self.store.pool.connection() as conn, conn.cursor(binary=True) as cur:
            # Binary results: integers and bytes arrive without text parsing.
            cur.execute(self.query, (str(after.transaction_id), after.position, limit))
            rows: list[Any] = cur.fetchall()
        return rows


class RecordHeaders:
    """The Kafka headers of an event: type, schema version, position and log position.

    The type and schema version headers are built once per value and shared.
    """

    def __init__(self) -> None:
        self._types: dict[str, tuple[str, bytes]] = {}
        self._versions: dict[int, tuple[str, bytes]] = {}

    def __call__(self, row: RelayRow) -> Headers:
        event_type = self._types.get(row[EVENT_TYPE])
        if event_type is None:
            event_type = self._types[row[EVENT_TYPE]] = ("event_type", row[EVENT_TYPE].encode())
        version = self._versions.get(row[SCHEMA_VERSION])
        if version is None:
            version = self._versions[row[SCHEMA_VERSION]] = ("schema_version", b"%d" % row[SCHEMA_VERSION])
        position = row[POSITION]
        return [
            event_type,
            version,
            ("position", b"%d" % position),
            ("log_position", b"%d/%d" % (row[TRANSACTION_ID], position)),
        ]
