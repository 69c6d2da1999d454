"""The PostgreSQL event store: append with optimistic concurrency, read streams and the log.

Writers never take a table lock. Each row records the id of the transaction that wrote it, and
:meth:`EventStore.read_all` returns only rows of transactions below the oldest one still running,
ordered by (transaction id, position): every such transaction has finished, so no event can later
appear behind a reader's position. A database trigger keeps each stream's versions contiguous and
in transaction order, so that order is also per-stream version order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from eventstore.errors import ConcurrencyError, EventStoreError, MigrationError
from eventstore.horizon import Horizon, read_horizon
from eventstore.migrations import Migration, available_migrations, current_version, migrate
from eventstore.prepared import EventParams, PreparedAppends, stream_params, uuid_bytes
from eventstore.privileges import warn_if_superuser
from eventstore.records import (
    LOG_START,
    NO_METADATA,
    AppendResult,
    EventMetadata,
    LogPosition,
    NewEvent,
    RecordedEvent,
    StreamAppend,
)
from eventstore.wakeup import ReaderWakeup

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")

# Same event id already stored: a resubmission, skipped. A taken (stream, version) still fails.
_ON_CONFLICT = sql.SQL("ON CONFLICT (event_id) DO NOTHING RETURNING position, event_id")
# Up to this many rows an append is a multi-row VALUES (cheaper to bind than arrays), beyond it unnest.
_VALUES_MAX_ROWS = 64

# A row to import: stream id, stream type, version, the event and optionally its recorded_at.
ImportRow = tuple[UUID, str, int, NewEvent] | tuple[UUID, str, int, NewEvent, datetime]

_IMPORT_TYPES = ["uuid", "text", "int8", "uuid", "text", "int4", "bytea", "jsonb", "timestamptz"]

# The never-skip read of the log (see read_all), shared by every reader of it: events after a log
# position (transaction id text, position) and below the read horizon, in commit order, up to a limit.
LOG_AFTER = (
    "(transaction_id, position) > (%s::text::xid8, %s)"
    " AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())"
)
LOG_ORDER = " ORDER BY transaction_id, position LIMIT %s"

# The cast column gets its own name: as "transaction_id" it would be what ORDER BY transaction_id
# sorts by, an expression no index has, and every read of the log would sort the rest of the table.
_COLUMNS = (
    "position, transaction_id::text::int8 AS transaction_id_int, stream_id, stream_type, stream_version, "
    "event_id, event_type, schema_version, payload, metadata::text, recorded_at"
)


def validate_schema_name(schema: str) -> str:
    """The schema name if it is one the store accepts; ``ValueError`` naming the rule otherwise."""
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"schema name {schema!r} must be lower-case letters, digits and _ (max 48)")
    return schema


def libpq_tls_kwargs(
    sslmode: str | None, ca_file: str | None, cert_file: str | None, key_file: str | None
) -> dict[str, str]:
    """libpq's TLS connection parameters from their settings, leaving unset ones to libpq."""
    pairs = (("sslmode", sslmode), ("sslrootcert", ca_file), ("sslcert", cert_file), ("sslkey", key_file))
    return {key: str(value) for key, value in pairs if value}


class EventStore:
    """Events of many streams in one PostgreSQL schema, appended and read without a global lock."""

    def __init__(self, pool: ConnectionPool[psycopg.Connection[TupleRow]], schema: str = "datalayer") -> None:
        self.pool = pool
        self.schema = validate_schema_name(schema)
        self.channel = f"{schema}_events"
        s = sql.Identifier(schema)
        self._insert_columns = sql.SQL(
            "INSERT INTO {}.events (stream_id, stream_type, stream_version, event_id, event_type,"
            " schema_version, payload, metadata)"
        ).format(s)
        # Statements are rendered to bytes once: composing them again on every execute costs the
        # append path tens of microseconds of client CPU, which is what bounds concurrent writers.
        self._insert_by_rows: dict[int, bytes] = {}
        self._insert_unnest = (
            sql.SQL(
                "{} SELECT * FROM unnest(%s::uuid[], %s::text[], %s::int8[], %s::uuid[], %s::text[],"
                " %s::int4[], %s::bytea[], %s::text[]::jsonb[]) {}"
            )
            .format(self._insert_columns, _ON_CONFLICT)
            .as_bytes()
        )
        # The same INSERT, prepared per connection and run with one libpq call: the autocommit path.
        self._prepared_appends = PreparedAppends(schema, self._insert_columns, _ON_CONFLICT, _VALUES_MAX_ROWS)
        self._wakeup = ReaderWakeup(self.dedicated_connection, self.channel)
        self._versions = (
            sql.SQL(
                "SELECT stream_id, max(stream_version) FROM {}.events"
                " WHERE stream_id = ANY(%s) GROUP BY stream_id"
            )
            .format(s)
            .as_bytes()
        )
        self._read_all = (
            sql.SQL("SELECT " + _COLUMNS + " FROM {}.events WHERE " + LOG_AFTER + LOG_ORDER)
            .format(s)
            .as_bytes()
        )
        # The same, for some stream types only: a reader of a few types need not fetch the others.
        self._read_all_of_types = (
            sql.SQL(
                "SELECT "
                + _COLUMNS
                + " FROM {}.events WHERE "
                + LOG_AFTER
                + " AND stream_type = ANY(%s)"
                + LOG_ORDER
            )
            .format(s)
            .as_bytes()
        )

    @classmethod
    def connect(
        cls,
        conninfo: str,
        schema: str = "datalayer",
        *,
        min_size: int = 1,
        max_size: int = 16,
        connect_kwargs: Mapping[str, Any] | None = None,
    ) -> EventStore:
        """A store with its own connection pool (autocommit connections; transactions are explicit).

        ``connect_kwargs`` are libpq parameters beyond ``conninfo``, e.g. :func:`libpq_tls_kwargs`.
        """
        pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            open=True,
            kwargs={**(connect_kwargs or {}), "autocommit": True},
            configure=_check_connection,
            name=f"eventstore-{schema}",
        )
        return cls(pool, schema)

    def dedicated_connection(self) -> psycopg.Connection[TupleRow]:
        """A new autocommit connection outside the pool, for long-lived uses such as LISTEN."""
        given = self.pool.kwargs
        kwargs = dict(given() if callable(given) else given or {})
        return psycopg.connect(str(self.pool.conninfo), **{**kwargs, "autocommit": True})

    def close(self) -> None:
        self._wakeup.close()
        self.pool.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def migrate(self) -> list[Migration]:
        """Create or upgrade this store's schema; returns the migrations applied now."""
        with self.pool.connection() as conn:
            return migrate(conn, self.schema)

    def require_schema(self) -> None:
        """Raise :class:`MigrationError` unless this store's schema is at the version this code needs."""
        with self.pool.connection() as conn:
            have = current_version(conn, self.schema)
        need = available_migrations()[-1].version
        if have != need:
            raise MigrationError(
                f"schema {self.schema} is at version {have}, this code needs {need}: "
                "run 'datalayer db migrate'"
            )

    # -- appending --------------------------------------------------------------------------------

    def append(
        self, stream_id: UUID, stream_type: str, events: Sequence[NewEvent], expected_version: int
    ) -> AppendResult:
        """Append to one stream expected at ``expected_version`` (0 for a new stream).

        A new stream is numbered from 1; ``expected_version=-1`` starts one at 0 instead, for
        aggregates whose first version is 0.

        Raises :class:`ConcurrencyError` and writes nothing when the stream is at another version.
        Events whose ids are already stored are skipped, so a retried append is not a duplicate.
        """
        return self.append_streams([StreamAppend(stream_id, stream_type, expected_version, tuple(events))])[0]

    def append_streams(self, appends: Sequence[StreamAppend]) -> list[AppendResult]:
        """Append to several streams in one transaction: all of it is written, or none of it.

        Rows are inserted in the order given, which is their order in the log. Writers that share
        streams should give them in one order (say, by id): opposite orders can deadlock in
        PostgreSQL, which fails one of them with ``psycopg.errors.DeadlockDetected``.
        """
        conn = self.pool.getconn()
        try:
            if conn.autocommit:
                # One INSERT statement, a transaction on its own. Without the pool's context
                # manager: its commit-on-exit has nothing to commit here and costs every append.
                results = self._write(conn, appends, savepoint=False)
            else:
                with conn:
                    results = self._write(conn, appends, savepoint=True)
        finally:
            self.pool.putconn(conn)
        self._wakeup.announce(max((r.positions[-1] for r in results if r.positions), default=0))
        return results

    def append_in(self, conn: psycopg.Connection[Any], appends: Sequence[StreamAppend]) -> list[AppendResult]:
        """Append inside the caller's open transaction on ``conn``.

        A conflict rolls back only this append (a savepoint), so the caller may go on. Followers
        learn of these events at their next poll, or sooner when this store appends again.
        """
        return self._write(conn, appends, savepoint=True)

    def append_stream_params(
        self, stream_id: UUID, stream_type: str, expected_version: int, events: Sequence[EventParams]
    ) -> list[int] | None:
        """:meth:`append` of events given as the statement binds them: the one-stream hot path.

        For callers that would build :class:`NewEvent` objects only to have them taken apart again
        (eventsourcing's recorder). Same checks, errors and idempotence as :meth:`append`; returns
        the positions of the events written, in order (a resubmitted event has none). None when
        the prepared statement does not apply (too many events, a pool connection that is not
        autocommit or not UTF-8): nothing was written then, so append the events with
        :meth:`append_streams`.
        """
        _check_expected_version(stream_id, expected_version)
        if not events:
            return []
        conn = self.pool.getconn()
        try:
            if not self._prepared_appends.applies(conn, len(events)):
                return None
            params = stream_params(stream_id, stream_type, expected_version, events)
            try:
                position_of = self._prepared_appends.insert(conn, params)
            except psycopg.DatabaseError as exc:
                if not _is_version_conflict(exc):
                    raise
                raise self._conflict(conn, [(stream_id, expected_version)]) from exc
        finally:
            self.pool.putconn(conn)
        if position_of is None:
            return None
        positions = list(_positions(position_of, [e[0] for e in events]))
        self._wakeup.announce(positions[-1] if positions else 0)  # ascending
        return positions

    def _write(
        self, conn: psycopg.Connection[Any], appends: Sequence[StreamAppend], *, savepoint: bool
    ) -> list[AppendResult]:
        count = 0
        for append in appends:
            _check_expected_version(append.stream_id, append.expected_version)
            count += len(append.events)
        if not count:
            return [AppendResult(a.stream_id, a.expected_version, ()) for a in appends]
        try:
            position_of = None if savepoint else self._prepared_appends.positions(conn, appends, count)
            if position_of is None:
                position_of = self._insert_via_cursor(conn, appends, savepoint=savepoint)
        except psycopg.DatabaseError as exc:
            if not _is_version_conflict(exc):
                raise
            raise self._conflict(conn, [(a.stream_id, a.expected_version) for a in appends]) from exc
        return [
            AppendResult(
                a.stream_id,
                a.expected_version + len(a.events),
                _positions(position_of, [uuid_bytes(e.event_id) for e in a.events]),
            )
            for a in appends
        ]

    def _insert_via_cursor(
        self, conn: psycopg.Connection[Any], appends: Sequence[StreamAppend], *, savepoint: bool
    ) -> dict[bytes, int]:
        """The INSERT through psycopg: inside a caller's transaction, or for more than a few rows."""
        rows = [
            (
                append.stream_id,
                append.stream_type,
                append.expected_version + offset,
                event.event_id,
                event.event_type,
                event.schema_version,
                event.payload,
                event.metadata.to_json(),
            )
            for append in appends
            for offset, event in enumerate(append.events, start=1)
        ]
        statement, params = self._insert_statement(rows)
        if savepoint:
            with conn.transaction():
                returned = conn.execute(statement, params).fetchall()
        else:
            returned = conn.execute(statement, params).fetchall()
        return {row[1].bytes: int(row[0]) for row in returned}

    def _insert_statement(self, rows: list[tuple[Any, ...]]) -> tuple[bytes, Sequence[Any]]:
        if len(rows) > _VALUES_MAX_ROWS:
            return self._insert_unnest, [list(column) for column in zip(*rows, strict=True)]
        statement = self._insert_by_rows.get(len(rows))
        if statement is None:
            row = sql.SQL("(%s, %s, %s, %s, %s, %s, %s, %s::jsonb)")
            statement = (
                sql.SQL("{} VALUES {} {}")
                .format(self._insert_columns, sql.SQL(", ").join([row] * len(rows)), _ON_CONFLICT)
                .as_bytes()
            )
            self._insert_by_rows[len(rows)] = statement
        return statement, [value for row in rows for value in row]

    def _conflict(
        self, conn: psycopg.Connection[Any], expected: Sequence[tuple[UUID, int]]
    ) -> ConcurrencyError:
        """The error for a failed append: the first of its (stream, expected version) now elsewhere."""
        actual = self._current_versions(conn, [stream_id for stream_id, _ in expected])
        for stream_id, expected_version in expected:
            have = actual.get(stream_id)
            if not (have == expected_version or (have is None and expected_version <= 0)):
                return ConcurrencyError(stream_id, expected_version, have or 0)
        stream_id, expected_version = expected[0]
        return ConcurrencyError(stream_id, expected_version, actual.get(stream_id) or 0)

    def _current_versions(self, conn: psycopg.Connection[Any], stream_ids: list[UUID]) -> dict[UUID, int]:
        rows = conn.execute(self._versions, (stream_ids,)).fetchall()
        return {row[0]: int(row[1]) for row in rows}

    def import_events(self, events: Iterable[ImportRow]) -> int:
        """The bulk path for imports and loads: COPY rows (stream id, type, version, event) in one go.

        Streams must be contiguous, as for :meth:`append`; there is no expected-version check beyond
        that (the database rejects a gap or a duplicate and the whole import is rolled back). A row
        may end with its ``recorded_at`` (a restore keeps the original time); without it the row is
        recorded at the transaction's start, as an append is.
        """
        with self.pool.connection() as conn, conn.transaction():
            count = self.import_in(conn, events)
        self._wakeup.announce()
        return count

    def import_in(self, conn: psycopg.Connection[Any], events: Iterable[ImportRow]) -> int:
        """:meth:`import_events` as one COPY inside the caller's open transaction on ``conn``.

        Followers learn of these events at their next poll, or sooner when this store appends again.
        """
        copy = sql.SQL(
            "COPY {}.events (stream_id, stream_type, stream_version, event_id, event_type,"
            " schema_version, payload, metadata, recorded_at) FROM STDIN (FORMAT BINARY)"
        ).format(sql.Identifier(self.schema))
        # What the column's default would give rows without a time of their own.
        now = conn.execute("SELECT now()").fetchone()
        assert now is not None
        count = 0
        with conn.cursor() as cur, cur.copy(copy) as writer:
            writer.set_types(_IMPORT_TYPES)
            for row in events:
                e = row[3]
                writer.write_row(
                    (
                        row[0],
                        row[1],
                        row[2],
                        e.event_id,
                        e.event_type,
                        e.schema_version,
                        e.payload,
                        e.metadata.to_dict(),  # the jsonb dumper encodes it; a str would be a JSON string
                        row[4] if len(row) == 5 else now[0],
                    )
                )
                count += 1
        return count

    # -- reading ----------------------------------------------------------------------------------

    def read_stream(
        self,
        stream_id: UUID,
        from_version: int = 1,
        to_version: int | None = None,
        *,
        desc: bool = False,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        """A stream's events from ``from_version`` to ``to_version`` (inclusive), in version order."""
        query = sql.SQL(
            "SELECT " + _COLUMNS + " FROM {}.events WHERE stream_id = %s AND stream_version >= %s"
            " AND stream_version <= %s ORDER BY stream_version {} LIMIT %s"
        ).format(sql.Identifier(self.schema), sql.SQL("DESC" if desc else "ASC"))
        upper = to_version if to_version is not None else 2**62
        with self.pool.connection() as conn:
            rows = conn.execute(query, (stream_id, from_version, upper, limit)).fetchall()
        return [_recorded(row) for row in rows]

    def stream_version(self, stream_id: UUID) -> int:
        """The stream's current version, 0 when it has no events."""
        with self.pool.connection() as conn:
            return self._current_versions(conn, [stream_id]).get(stream_id, 0)

    def version_at(self, stream_id: UUID, moment: datetime) -> int:
        """The stream's version as of ``moment`` (by commit-transaction start time), 0 before it began."""
        query = sql.SQL(
            "SELECT coalesce(max(stream_version), 0) FROM {}.events"
            " WHERE stream_id = %s AND recorded_at <= %s"
        ).format(sql.Identifier(self.schema))
        with self.pool.connection() as conn:
            row = conn.execute(query, (stream_id, moment)).fetchone()
        return int(row[0]) if row else 0

    def read_all(
        self,
        after: LogPosition = LOG_START,
        limit: int = 1000,
        stream_types: Sequence[str] | None = None,
    ) -> list[RecordedEvent]:
        """Up to ``limit`` events after ``after`` in commit order, never skipping a late commit.

        Resume by passing the last event's :attr:`RecordedEvent.log_position`. A transaction still
        open holds back events written after it began; :meth:`horizon` measures that stall.
        ``stream_types`` keeps only events of those stream types (the server filters them).
        """
        xid = str(after.transaction_id)
        with self.pool.connection() as conn:
            if stream_types is None:
                rows = conn.execute(self._read_all, (xid, after.position, limit)).fetchall()
            else:
                params = (xid, after.position, list(stream_types), limit)
                rows = conn.execute(self._read_all_of_types, params).fetchall()
        return [_recorded(row) for row in rows]

    def horizon(self) -> Horizon:
        """Where readers stop now, and which transaction (if any) holds them back and for how long."""
        with self.pool.connection() as conn:
            return read_horizon(conn, self.schema)

    def analyze(self) -> None:
        """Refresh PostgreSQL's statistics of the events table: after a bulk load (an import, a
        migrated log), before anything reads it in bulk.

        Why: without statistics the planner takes the filtered reads of the log (a rebuild's, by
        stream type and partition) for a few rows, and answers each batch by collecting every row
        after it and sorting them. A rebuild right after importing 1,000,000 events read its
        partition 3.6x slower that way, until autovacuum's own analyze came round. Needs the table's
        owner (PostgreSQL only warns otherwise, and autovacuum still catches up).
        """
        with self.pool.connection() as conn:
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(self.schema, "events")))

    def max_position(self) -> int:
        """The highest global position written so far (0 when empty), committed or held back."""
        query = sql.SQL("SELECT coalesce(max(position), 0) FROM {}.events").format(
            sql.Identifier(self.schema)
        )
        with self.pool.connection() as conn:
            row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0


def _check_connection(conn: psycopg.Connection[TupleRow]) -> None:
    warn_if_superuser(conn)


def _check_expected_version(stream_id: UUID, expected_version: int) -> None:
    if expected_version < -1:
        raise ValueError(f"expected version of stream {stream_id} must be >= -1")


def _positions(position_of: Mapping[bytes, int], event_ids: Sequence[bytes]) -> tuple[int, ...]:
    """The positions of the events inserted, in order; an event already stored (skipped) has none.

    Keyed by the event ids' bytes: the prepared path reads them without making UUIDs.
    """
    get = position_of.get
    return tuple(p for p in (get(event_id) for event_id in event_ids) if p is not None)


def _is_version_conflict(exc: psycopg.DatabaseError) -> bool:
    """A version already taken, a version that does not follow its stream, or out-of-order writers."""
    if isinstance(exc, pg_errors.UniqueViolation):
        return exc.diag.constraint_name == "events_stream_version_key"
    return exc.sqlstate in ("DL001", "40001")


def _recorded(row: Sequence[Any]) -> RecordedEvent:
    # Most events carry no metadata: skip the JSON parse for them (it is a third of a log read).
    text: str = row[9]
    metadata = NO_METADATA if text == "{}" else EventMetadata.from_dict(orjson.loads(text))
    return RecordedEvent(
        position=int(row[0]),
        transaction_id=int(row[1]),
        stream_id=row[2],
        stream_type=row[3],
        stream_version=int(row[4]),
        event_id=row[5],
        event_type=row[6],
        schema_version=int(row[7]),
        payload=bytes(row[8]),
        metadata=metadata,
        recorded_at=row[10],
    )


__all__ = ["EventStore", "EventStoreError", "ImportRow", "libpq_tls_kwargs", "validate_schema_name"]
