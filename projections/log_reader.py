"""The replay's read of the store: the log in commit order, straight into :class:`ProjectedEvent` objects.

Why not ``EventStore.read_all`` and ``event_from_record``: those build a :class:`RecordedEvent` per
row (UUID objects, an ``EventMetadata``) only for the replay to turn them back into the text a
projection keys on. Here the server renders the ids as text and the columns arrive in the order of
``ProjectedEvent``'s fields, in binary, so a row becomes an event with one constructor call: about
half of the client's cost of a row. The query is ``read_all``'s own never-skip clause
(``LOG_AFTER``, ``LOG_ORDER``), so what is read, and in which order, is the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any
from uuid import UUID

import orjson
from psycopg import capabilities, sql

from eventstore.records import NO_METADATA, EventMetadata, LogPosition, RecordedEvent
from eventstore.store import LOG_AFTER, LOG_ORDER, EventStore
from projections.events import ProjectedEvent

# In ProjectedEvent's field order, up to its metadata; the payload follows (see LogReader.read).
_COLUMNS = (
    "stream_id::text, stream_type, stream_version, event_id::text, event_type, schema_version, position,"
    # The cast gets its own name: as "transaction_id" it would be what ORDER BY sorts by (see store).
    " transaction_id::text::int8 AS transaction_id_int, recorded_at, metadata::text, payload"
)


# Streams are partitioned by ranges of their ids: a UUID4's leading bits are random, so the ranges
# hold as many streams each. Why ranges and not a hash: the planner estimates a range from the
# column's statistics and keeps reading the log's index in order; a hash expression it takes for
# rare, and sorts a sequential scan of the whole table for every batch instead.
MAX_PARTITIONS = 256

# Rows per chunk of a read's result: enough to keep the round trips' per-chunk cost negligible.
_CHUNK_ROWS = 500
_CHUNKED = capabilities.has_stream_chunked()


def partition_bounds(index: int, count: int) -> tuple[UUID, UUID]:
    """The least and the greatest stream id of partition ``index`` of ``count``."""
    if not (1 <= count <= MAX_PARTITIONS and 0 <= index < count):
        raise ValueError(f"partition {index} of {count}: need 0 <= index < count <= {MAX_PARTITIONS}")
    return UUID(int=(index << 128) // count), UUID(int=((index + 1) << 128) // count - 1)


class LogReader:
    """Reads batches of one store's log, of some stream types, as projected events.

    With ``partition=(index, count)`` only the streams of that partition of ``count`` (see
    :func:`partition_bounds`), still in commit order: per-stream order is all a projection needs.
    """

    def __init__(
        self, store: EventStore, stream_types: Sequence[str], partition: tuple[int, int] | None = None
    ) -> None:
        self.store = store
        self.types = sorted(set(stream_types))
        self.names: dict[str, str] = {}
        where: sql.Composable = sql.SQL(LOG_AFTER + " AND stream_type = ANY(%s)")
        if partition is not None:
            # Literals, not parameters: a prepared statement's generic plan would guess the range's
            # share of the log instead of reading it from the statistics.
            low, high = partition_bounds(*partition)
            where += sql.SQL(" AND stream_id BETWEEN {}::uuid AND {}::uuid").format(
                sql.Literal(str(low)), sql.Literal(str(high))
            )
        self.query = (
            sql.SQL("SELECT " + _COLUMNS + " FROM {}.events WHERE {}" + LOG_ORDER)
            .format(sql.Identifier(store.schema), where)
            .as_bytes()
        )

    def read(self, after: LogPosition, limit: int) -> list[ProjectedEvent]:
        """Up to ``limit`` events after ``after`` in commit order, never skipping a late commit."""
        params = (str(after.transaction_id), after.position, self.types, limit)
        event = ProjectedEvent
        # A few stream and event type names, each arriving as a new string per row: the events keep
        # one object per name instead (two strings fewer per event while a batch is held).
        name = self.names.setdefault
        events: list[ProjectedEvent] = []
        add = events.append
        with self.store.pool.connection() as conn, conn.cursor(binary=True) as cur:
            # Rows in chunks (libpq's chunked mode): each chunk's result is freed once its rows are
            # events, instead of the whole batch's result and row tuples living beside its events.
            # A libpq older than 17 has no chunked mode: the whole result at once, as before.
            rows: Iterable[Any]
            if _CHUNKED:
                rows = cur.stream(self.query, params, size=_CHUNK_ROWS)
            else:
                rows = cur.execute(self.query, params).fetchall()
            for sid, stype, version, eid, etype, schema, pos, xid, at, meta, payload in rows:
                add(
                    event(
                        sid, name(stype, stype), version, eid, name(etype, etype), schema, pos, xid,
                        at, _metadata(meta), "bytes", payload,
                    )
                )  # fmt: skip
        return events


def _metadata(text: str) -> dict[str, Any]:
    """The metadata as ``RecordedEvent.metadata.to_dict()`` gives it (most events have none)."""
    if text == "{}":
        return {}
    return EventMetadata.from_dict(orjson.loads(text)).to_dict()


def recorded_event(event: ProjectedEvent) -> RecordedEvent:
    """The store's record of a replayed event, for a dead letter (which carries the original)."""
    metadata = EventMetadata.from_dict(event.metadata) if event.metadata else NO_METADATA
    return RecordedEvent(
        position=event.position,
        transaction_id=event.transaction_id,
        stream_id=UUID(event.stream_id),
        stream_type=event.stream_type,
        stream_version=event.stream_version,
        event_id=UUID(event.event_id),
        event_type=event.event_type,
        schema_version=event.schema_version,
        payload=bytes(event.raw_payload),
        metadata=metadata,
        recorded_at=event.recorded_at,
    )
