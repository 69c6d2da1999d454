"""A statement prepared once per connection and run with one libpq call: the append's hot path.

psycopg's cursor machinery (query conversion, the adapters, a generator-driven wait that releases
the GIL several times per query) cost an append about as much client CPU as the rest of a save. With
16 writer threads in one process that CPU, and the GIL hand-overs it causes, bound the append
throughput, not the database. :class:`PreparedStatement` keeps the statement and the database work
the same and calls ``PQprepare`` once per connection, then ``PQexecPrepared`` per execution: the
caller encodes the parameters itself (types fixed by the statement), the GIL is released once for
the whole round trip, and the results come back in binary.

Only for autocommit connections the caller holds exclusively (a pool's); other uses go through
psycopg as usual.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any
from uuid import UUID
from weakref import WeakKeyDictionary

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq, sql

from eventstore.records import StreamAppend

# Type oids of the parameters the append statements bind.
UUID_OID = 2950
TEXT_OID = 25
INT4_OID = 23
INT8_OID = 20
BYTEA_OID = 17
JSONB_OID = 3802

BINARY = int(pq.Format.BINARY)
TEXT = int(pq.Format.TEXT)

_OK = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)
# invalid_sql_statement_name: the server no longer has it (e.g. after DISCARD ALL).
_UNKNOWN_STATEMENT = "26000"


class PreparedStatement:
    """One SQL statement with ``$n`` parameters of fixed types, prepared per connection on first use.

    ``param_types`` are type oids; ``param_formats`` say which parameters the caller passes in
    binary (uuid as its 16 bytes, bytea as is) and which as text. Results are always binary. The
    ``name`` must stand for this one text on every connection it is used on (two statements of one
    name on a connection would run each other's text): put what varies the text into it.
    """

    def __init__(
        self, name: str, text: bytes, param_types: Sequence[int], param_formats: Sequence[int]
    ) -> None:
        if len(param_types) != len(param_formats):
            raise ValueError(f"{name}: {len(param_types)} parameter types, {len(param_formats)} formats")
        self.name = name.encode()
        self.text = text
        self.param_types = list(param_types)
        self.param_formats = list(param_formats)
        # Connections it is prepared on (True) or unsuitable for (False); a closed and collected
        # connection drops out by itself.
        self._prepared_on: WeakKeyDictionary[psycopg.Connection[Any], bool] = WeakKeyDictionary()
        self._lock = threading.Lock()

    def execute(self, conn: psycopg.Connection[Any], params: Sequence[bytes]) -> pq.abc.PGresult | None:
        """Run the statement on ``conn``, an idle autocommit connection held by the caller alone.

        Raises psycopg's error for a failure. None: ``conn`` does not suit (its client encoding is
        not UTF-8, which the text parameters are in); run the statement through psycopg instead.
        """
        with conn.lock:
            usable = self._prepared_on.get(conn)
            if usable is None:
                usable = self._prepare(conn)
            if not usable:
                return None
            result = conn.pgconn.exec_prepared(self.name, params, self.param_formats, BINARY)
            if result.status in _OK:
                return result
            error = _error(conn, result)
            if error.sqlstate != _UNKNOWN_STATEMENT:
                raise error
            # Deallocated behind our back (DISCARD ALL): prepare it again, once.
            self._prepare(conn)
            result = conn.pgconn.exec_prepared(self.name, params, self.param_formats, BINARY)
            if result.status in _OK:
                return result
            raise _error(conn, result)

    def _prepare(self, conn: psycopg.Connection[Any]) -> bool:
        usable = conn.info.encoding == "utf-8"
        if usable:
            result = conn.pgconn.prepare(self.name, self.text, self.param_types)
            if result.status != pq.ExecStatus.COMMAND_OK:
                error = _error(conn, result)
                # duplicate_prepared_statement: there already (the name fixes the text, see __init__).
                if error.sqlstate != "42P05":
                    raise error
        with self._lock:
            self._prepared_on[conn] = usable
        return usable


def _error(conn: psycopg.Connection[Any], result: pq.abc.PGresult) -> psycopg.Error:
    """The exception psycopg raises for ``result``; a lost connection is an ``OperationalError``."""
    if conn.pgconn.status == pq.ConnStatus.BAD and not result.error_field(pq.DiagnosticField.SQLSTATE):
        return psycopg.OperationalError(result.get_error_message("utf-8") or "the connection was lost")
    return pg_errors.error_from_result(result, encoding="utf-8")


class PreparedAppends:
    """The append INSERT of :class:`~eventstore.store.EventStore` for 1 to ``max_rows`` rows, prepared.

    ``insert_columns`` and ``on_conflict`` are the store's; the text differs from the psycopg one
    only in its ``$n`` parameters, whose types are declared when it is prepared.
    """

    _TYPES = (UUID_OID, TEXT_OID, INT8_OID, UUID_OID, TEXT_OID, INT4_OID, BYTEA_OID, JSONB_OID)
    _FORMATS = (BINARY, TEXT, TEXT, BINARY, TEXT, TEXT, BINARY, TEXT)

    def __init__(
        self, schema: str, insert_columns: sql.Composable, on_conflict: sql.Composable, max_rows: int
    ) -> None:
        self.schema = schema
        self.max_rows = max_rows
        self._insert_columns = insert_columns
        self._on_conflict = on_conflict
        self._by_rows: dict[int, PreparedStatement] = {}

    def applies(self, conn: psycopg.Connection[Any], rows: int) -> bool:
        """Whether ``rows`` rows may go this way on ``conn``: few enough, and no caller's transaction."""
        return 0 < rows <= self.max_rows and conn.autocommit

    def positions(
        self, conn: psycopg.Connection[Any], appends: Sequence[StreamAppend], rows: int
    ) -> dict[bytes, int] | None:
        """Insert the ``rows`` events of ``appends``; the position of each inserted event by its id's bytes.

        None when this path does not apply (too many rows, or ``conn`` does not suit): nothing was
        written then. Errors are psycopg's, as from ``conn.execute``.
        """
        if not self.applies(conn, rows):
            return None
        params: list[bytes] = []
        for append in appends:
            params += stream_params(
                append.stream_id,
                append.stream_type,
                append.expected_version,
                [
                    (uuid_bytes(e.event_id), e.event_type, e.schema_version, e.payload, e.metadata.to_json())
                    for e in append.events
                ],
            )
        return self.insert(conn, params)

    def insert(self, conn: psycopg.Connection[Any], params: Sequence[bytes]) -> dict[bytes, int] | None:
        """Run the INSERT of :func:`stream_params` rows (:meth:`applies` checked by the caller).

        The position of each inserted event by its id's bytes; None when ``conn`` does not suit:
        nothing was written then. Errors are psycopg's, as from ``conn.execute``.
        """
        result = self._statement(len(params) // len(self._TYPES)).execute(conn, params)
        if result is None:
            return None
        # Binary results: int8 big-endian, uuid its 16 bytes.
        get = result.get_value
        return {
            get(i, 1): int.from_bytes(get(i, 0), "big", signed=True)  # type: ignore[arg-type,misc]
            for i in range(result.ntuples)
        }

    def _statement(self, rows: int) -> PreparedStatement:
        statement = self._by_rows.get(rows)
        if statement is None:
            width = len(self._TYPES)
            values = sql.SQL(", ").join(
                sql.SQL("({})").format(
                    sql.SQL(", ").join(sql.SQL(f"${row * width + column + 1}") for column in range(width))
                )
                for row in range(rows)
            )
            text = sql.SQL("{} VALUES {} {}").format(self._insert_columns, values, self._on_conflict)
            statement = PreparedStatement(
                # The schema is in the name: stores of two schemas may share a pool's connections.
                # At most 13 + 48 characters, within PostgreSQL's 63 for a statement name.
                f"dl_append_{rows}_{self.schema}",
                text.as_bytes(),
                self._TYPES * rows,
                self._FORMATS * rows,
            )
            self._by_rows[rows] = statement
        return statement


# One event as the append statement binds it: its id's 16 bytes, type, schema version, payload and
# metadata JSON. Callers that have no NewEvent (eventsourcing's recorder) build these directly.
EventParams = tuple[bytes, str, int, bytes, str]


def stream_params(
    stream_id: UUID, stream_type: str, expected_version: int, events: Sequence[EventParams]
) -> list[bytes]:
    """The parameters of one stream's rows in the append statement, numbered after ``expected_version``."""
    stream = uuid_bytes(stream_id)
    type_ = stream_type.encode()
    params: list[bytes] = []
    version = expected_version
    for event_id, event_type, schema_version, payload, metadata in events:
        version += 1
        params += (
            stream,
            type_,
            b"%d" % version,
            event_id,
            event_type.encode(),
            b"%d" % schema_version,
            bytes(payload),
            metadata.encode(),
        )
    return params


def uuid_bytes(value: UUID | str) -> bytes:
    """The 16 bytes of a UUID given as such or as its text."""
    return value.bytes if isinstance(value, UUID) else UUID(str(value)).bytes
