"""Replay as data migration: copy the event log into a new store through a transform.

History is append-only, so the log is changed by copying it: every source event, in commit order,
goes through ``transform(event)``, which returns the events to write instead (none, one or more:
rename a type, drop a field, split a stream, fix bad data). Each target stream is numbered again,
contiguously in source commit order. The source is only read, and nothing is cut over: pointing
services at the new store is a separate, explicit step.

A small table in the target, ``event_migration_progress``, records the source position reached and
the counts, in the same transaction as each batch's events, so an interrupted run resumes exactly
where it stopped (and a later run copies what the source gained in the meantime).
"""

from __future__ import annotations

import importlib
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from eventstore.errors import EventStoreError
from eventstore.keys import dump_data_keys, load_data_keys
from eventstore.migrations import current_version
from eventstore.portable import BATCH_SIZE, Progress
from eventstore.records import LOG_START, NO_METADATA, EventMetadata, LogPosition, NewEvent, RecordedEvent
from eventstore.store import EventStore, ImportRow

PROGRESS_TABLE = "event_migration_progress"


@dataclass(frozen=True)
class NewStreamEvent:
    """An event a transform writes to the new store: which stream, what type, what it says.

    There is no version: the migration numbers each target stream itself. ``event_id`` None derives
    the id from the source event (its own id for the first event it yields, a stable UUIDv5 for the
    others), so a re-run writes the same ids. ``recorded_at`` None keeps the source event's time.
    """

    stream_id: UUID
    stream_type: str
    event_type: str
    payload: bytes
    schema_version: int = 1
    metadata: EventMetadata = NO_METADATA
    event_id: UUID | None = None
    recorded_at: datetime | None = None

    @classmethod
    def from_recorded(cls, event: RecordedEvent, **changes: Any) -> NewStreamEvent:
        """The source event as it is (same stream, type, payload, metadata, id and time), with ``changes``."""
        fields: dict[str, Any] = {
            "stream_id": event.stream_id,
            "stream_type": event.stream_type,
            "event_type": event.event_type,
            "payload": event.payload,
            "schema_version": event.schema_version,
            "metadata": event.metadata,
        }
        fields.update(changes)  # an unknown name fails here, as a misspelt keyword argument does
        return cls(**fields)


Transform = Callable[[RecordedEvent], Iterable[NewStreamEvent]]


def copy_unchanged(event: RecordedEvent) -> Iterable[NewStreamEvent]:
    """The transform that keeps every event as it is (a plain copy into another schema or database)."""
    return (NewStreamEvent.from_recorded(event),)


class MigrationTargetError(EventStoreError):
    """The target cannot take this migration: it is the source, or holds other events or another migration."""


class TransformError(EventStoreError):
    """The transform raised or returned something other than :class:`NewStreamEvent` objects."""


@dataclass(frozen=True)
class MigrationReport:
    """What a migration read and wrote, and what a count of both stores afterwards found.

    ``read``, ``written``, ``dropped`` (source events that yielded nothing) and ``added`` (events
    beyond the first that one source event yielded) add up over every run into this target.
    """

    source_schema: str
    target_schema: str
    transform: str
    resumed_from: LogPosition | None
    last_position: LogPosition
    read: int
    written: int
    dropped: int
    added: int
    source_events: int
    target_events: int
    streams: int
    broken_streams: tuple[UUID, ...]
    run_events: int
    seconds: float

    @property
    def ok(self) -> bool:
        """True when the counts agree and every target stream is contiguous."""
        return (
            self.source_events == self.read
            and self.target_events == self.written == self.read - self.dropped + self.added
            and not self.broken_streams
        )

    def lines(self) -> list[str]:
        """The report as printed by ``datalayer migrate-events``."""
        rate = self.run_events / self.seconds if self.seconds > 0 else 0.0
        resumed = f", resumed after {self.resumed_from}" if self.resumed_from is not None else ""
        broken = ", ".join(map(str, self.broken_streams))
        return [
            f"migrated schema {self.source_schema} -> {self.target_schema} "
            f"(transform {self.transform}{resumed})",
            f"  read     {self.read} source events up to {self.last_position}; "
            f"the source holds {self.source_events} up to there",
            f"  written  {self.written} = {self.read} read - {self.dropped} dropped + {self.added} added; "
            f"the target holds {self.target_events}",
            f"  streams  {self.streams} in the target, "
            + (f"NOT contiguous: {broken}" if broken else "each contiguous from its first version"),
            f"  this run {self.run_events} events in {self.seconds:.1f} s ({rate:,.0f} events/s)",
            "verified: counts agree, streams contiguous" if self.ok else "VERIFICATION FAILED",
        ]


@dataclass(frozen=True)
class _State:
    position: LogPosition
    read: int = 0
    written: int = 0
    dropped: int = 0
    added: int = 0


def migrate_events(
    source: EventStore,
    target: EventStore,
    transform: Transform = copy_unchanged,
    *,
    transform_name: str = "copy_unchanged",
    resume: bool = False,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> MigrationReport:
    """Copy ``source``'s log as it stands now through ``transform`` into ``target``, then verify.

    The target schema is created if need be and must hold no events, unless ``resume`` continues a
    migration from the same source with the same ``transform_name``. ``progress`` gets the number of
    source events this run has read.
    """
    started = time.monotonic()
    with source.pool.connection() as conn:
        if current_version(conn, source.schema) == 0:
            raise EventStoreError(f"schema {source.schema} holds no event store")
    if source.schema == target.schema and _server(source) == _server(target):
        raise MigrationTargetError(f"the target is the source (schema {source.schema}): choose a new schema")
    target.migrate()
    state = _start(source, target, transform_name, resume)
    resumed_from = state.position if resume and state.read else None
    horizon = source.horizon().transaction_id  # copy the log as readable now; a resume takes the rest
    run_events = 0
    while True:
        batch = source.read_all(after=state.position, limit=batch_size)
        kept = [e for e in batch if e.transaction_id < horizon]
        if not kept:
            break
        state = _write_batch(target, kept, _transformed(kept, transform, transform_name, state), state)
        run_events += len(kept)
        if progress is not None:
            progress(run_events)
        if len(kept) < batch_size:
            break
    # The data keys the copied events were sealed with (and the tombstones): personal fields open
    # in the target as in the source, and forgotten subjects stay forgotten.
    with source.pool.connection() as conn:
        keys = dump_data_keys(conn, source.schema)
    with target.pool.connection() as conn, conn.transaction():
        load_data_keys(conn, target.schema, keys)
    target.analyze()  # a rebuild on the new store usually follows: its reads plan by these statistics
    return _verify(source, target, transform_name, state, resumed_from, run_events, started)


def load_transform(spec: str) -> Transform:
    """The function named ``package.module:function``; ``ValueError`` naming what is wrong otherwise."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"transform {spec!r} must be given as package.module:function")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load transform {spec!r}: {exc}") from None
    if not callable(found):
        raise ValueError(f"transform {spec!r} is not a function")
    transform: Transform = found
    return transform


def _server(store: EventStore) -> tuple[Any, ...]:
    """What tells two connections' databases apart: name, server address and port, server start."""
    with store.pool.connection() as conn:
        row = conn.execute(
            "SELECT current_database(), inet_server_addr()::text, inet_server_port(),"
            " pg_postmaster_start_time()"
        ).fetchone()
    return tuple(row or ())


def _start(source: EventStore, target: EventStore, transform_name: str, resume: bool) -> _State:
    table = sql.Identifier(target.schema, PROGRESS_TABLE)
    with target.pool.connection() as conn, conn.transaction():
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),"
                " source_schema text NOT NULL, transform text NOT NULL,"
                " transaction_id bigint NOT NULL, position bigint NOT NULL,"
                " events_read bigint NOT NULL, events_written bigint NOT NULL,"
                " events_dropped bigint NOT NULL, events_added bigint NOT NULL,"
                " started_at timestamptz NOT NULL DEFAULT now(),"
                " updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(table)
        )
        row = conn.execute(
            sql.SQL(
                "SELECT source_schema, transform, transaction_id, position, events_read, events_written,"
                " events_dropped, events_added FROM {} FOR UPDATE"
            ).format(table)
        ).fetchone()
        if row is None:
            held = conn.execute(
                sql.SQL("SELECT count(*) FROM (SELECT FROM {} LIMIT 1000) AS held").format(
                    sql.Identifier(target.schema, "events")
                )
            ).fetchone()
            if held is not None and held[0]:
                raise MigrationTargetError(
                    f"target schema {target.schema} already holds {held[0]}{'+' if held[0] == 1000 else ''} "
                    "events not written by migrate-events: choose a new schema"
                )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (source_schema, transform, transaction_id, position, events_read,"
                    " events_written, events_dropped, events_added) VALUES (%s, %s, 0, 0, 0, 0, 0, 0)"
                ).format(table),
                (source.schema, transform_name),
            )
            return _State(LOG_START)
        state = _State(LogPosition(int(row[2]), int(row[3])), *(int(n) for n in row[4:8]))
        if not resume:
            raise MigrationTargetError(
                f"target schema {target.schema} already holds a migration of schema {row[0]} "
                f"({state.read} events read, up to {state.position}): pass --resume to continue it, "
                "or choose a new schema"
            )
        if (row[0], row[1]) != (source.schema, transform_name):
            raise MigrationTargetError(
                f"target schema {target.schema} holds a migration of schema {row[0]} with transform "
                f"{row[1]}, not of {source.schema} with {transform_name}: it cannot be resumed this way"
            )
        return state


def _transformed(
    events: Sequence[RecordedEvent], transform: Transform, name: str, state: _State
) -> list[tuple[RecordedEvent, NewStreamEvent, UUID]]:
    """Each source event's outputs with the event id each gets, in order."""
    outputs = []
    for event in events:
        try:
            produced = list(transform(event))
        except Exception as exc:
            raise TransformError(
                f"transform {name} failed on event {event.event_id} ({event.event_type}, stream "
                f"{event.stream_id} version {event.stream_version}, position {event.log_position}): "
                f"{type(exc).__name__}: {exc}; the target holds the output of the first {state.read} "
                "source events and a resume continues after them"
            ) from exc
        for index, out in enumerate(produced):
            if not isinstance(out, NewStreamEvent):
                raise TransformError(
                    f"transform {name} returned {type(out).__name__} for event {event.event_id}: "
                    "expected NewStreamEvent objects"
                )
            if out.event_id is not None:
                event_id = out.event_id
            else:  # the same ids on every run, so a resumed or repeated migration writes no duplicate
                event_id = event.event_id if index == 0 else uuid.uuid5(event.event_id, str(index))
            outputs.append((event, out, event_id))
    return outputs


def _write_batch(
    target: EventStore,
    events: Sequence[RecordedEvent],
    outputs: list[tuple[RecordedEvent, NewStreamEvent, UUID]],
    state: _State,
) -> _State:
    """Write one batch's outputs and move the progress row past it, in one transaction."""
    yielded: dict[UUID, int] = {}
    for event, _, _ in outputs:
        yielded[event.event_id] = yielded.get(event.event_id, 0) + 1
    new = _State(
        events[-1].log_position,
        state.read + len(events),
        state.written + len(outputs),
        state.dropped + sum(1 for e in events if e.event_id not in yielded),
        state.added + sum(n - 1 for n in yielded.values()),
    )
    table = sql.Identifier(target.schema, PROGRESS_TABLE)
    with target.pool.connection() as conn, conn.transaction():
        row = conn.execute(
            sql.SQL("SELECT transaction_id, position FROM {} FOR UPDATE").format(table)
        ).fetchone()
        if row is None or LogPosition(int(row[0]), int(row[1])) != state.position:
            raise MigrationTargetError(
                f"another migrate-events moved the progress of target schema {target.schema}: "
                "only one may run at a time"
            )
        target.import_in(conn, _numbered(conn, target.schema, outputs))
        conn.execute(
            sql.SQL(
                "UPDATE {} SET transaction_id = %s, position = %s, events_read = %s, events_written = %s,"
                " events_dropped = %s, events_added = %s, updated_at = now()"
            ).format(table),
            (*new.position, new.read, new.written, new.dropped, new.added),
        )
    return new


def _numbered(
    conn: psycopg.Connection[Any], schema: str, outputs: list[tuple[RecordedEvent, NewStreamEvent, UUID]]
) -> list[ImportRow]:
    """Import rows with each target stream's next versions, following what the target already holds.

    A new target stream starts at 1, or at 0 when its first event comes from version 0 of the same
    stream in the source (aggregates numbered from 0 stay so; streams split off start at 1).
    """
    stream_ids = list({out.stream_id for _, out, _ in outputs})
    query = sql.SQL(
        "SELECT stream_id, max(stream_version) FROM {} WHERE stream_id = ANY(%s) GROUP BY stream_id"
    ).format(sql.Identifier(schema, "events"))
    current: dict[UUID, int] = {r[0]: int(r[1]) for r in conn.execute(query, (stream_ids,)).fetchall()}
    rows: list[ImportRow] = []
    for event, out, event_id in outputs:
        have = current.get(out.stream_id)
        if have is not None:
            version = have + 1
        else:
            version = 0 if (event.stream_id, event.stream_version) == (out.stream_id, 0) else 1
        current[out.stream_id] = version
        new = NewEvent(event_id, out.event_type, out.payload, out.schema_version, out.metadata)
        rows.append((out.stream_id, out.stream_type, version, new, out.recorded_at or event.recorded_at))
    return rows


def _verify(
    source: EventStore,
    target: EventStore,
    transform_name: str,
    state: _State,
    resumed_from: LogPosition | None,
    run_events: int,
    started: float,
) -> MigrationReport:
    """Count both stores afresh: the source up to the position reached, the target stream by stream."""
    with source.pool.connection() as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {} WHERE (transaction_id, position) <= (%s::text::xid8, %s)"
            ).format(sql.Identifier(source.schema, "events")),
            (str(state.position.transaction_id), state.position.position),
        ).fetchone()
    source_events = int(row[0]) if row else 0
    with target.pool.connection() as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), coalesce(sum(n), 0),"
                " (array_agg(stream_id ORDER BY stream_id) FILTER (WHERE last - first + 1 <> n))[1:10]"
                " FROM (SELECT stream_id, count(*) AS n, min(stream_version) AS first,"
                "       max(stream_version) AS last FROM {} GROUP BY stream_id) AS streams"
            ).format(sql.Identifier(target.schema, "events"))
        ).fetchone()
    assert row is not None
    return MigrationReport(
        source_schema=source.schema,
        target_schema=target.schema,
        transform=transform_name,
        resumed_from=resumed_from,
        last_position=state.position,
        read=state.read,
        written=state.written,
        dropped=state.dropped,
        added=state.added,
        source_events=source_events,
        target_events=int(row[1]),
        streams=int(row[0]),
        broken_streams=tuple(row[2] or ()),
        run_events=run_events,
        seconds=time.monotonic() - started,
    )


__all__ = [
    "PROGRESS_TABLE",
    "MigrationReport",
    "MigrationTargetError",
    "NewStreamEvent",
    "Transform",
    "TransformError",
    "copy_unchanged",
    "load_transform",
    "migrate_events",
]
