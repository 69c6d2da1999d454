"""Rows of a flush sent by binary ``COPY`` into a temporary staging table, for one ``INSERT ... SELECT``.

Why: a flushed group of rows used to travel as one array parameter per column (``unnest``), and
psycopg builds a binary array element by element in Python, its JSON with the standard ``json``
module: ~7.5 µs of client CPU per 13-column order summary. A binary ``COPY`` row is dumped by
psycopg's C code in ~2 µs, and the server's work is about the same (it writes the staging rows to
a temporary table, without WAL, and reads them back).

Only columns of plain types qualify (``StagedColumn.of``), and only batches whose values are of the
Python types the binary dumpers take (:meth:`StagedColumn.accepts`): anything else keeps the array
path, so a handler's value is never refused here that was accepted before. UUID columns are staged
as text (the writes' keys are UUID texts already, see ``uuid_key``) and JSON as text from orjson
(the standard ``json`` when orjson refuses a value); the ``INSERT`` casts them back.

A staging table belongs to the session (``ON COMMIT DELETE ROWS``: it is empty outside a batch),
one per table and column signature, named after both; a batch creates it if its connection has not
yet committed a batch that did (:class:`StagingTables`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
from psycopg import sql as psql
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Date,
    DateTime,
    Enum,
    Float,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    cast,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.schema import CreateTable

from projections.targets.sql_writes import TableSpec

_ANY: frozenset[type] = frozenset()  # JSON: every value is serialized


class StagedColumn:
    """How one column's values travel through the staging table."""

    __slots__ = ("convert", "name", "pg_type", "staged_type", "types")

    def __init__(
        self,
        name: str,
        pg_type: str,
        staged_type: Any,
        types: frozenset[type],
        convert: Callable[[list[Any]], list[Any]] | None = None,
    ) -> None:
        self.name = name
        self.pg_type = pg_type  # the COPY's binary type, a name psycopg knows
        self.staged_type = staged_type  # the staging column's SQLAlchemy type
        self.types = types  # the Python classes the binary dumper takes (None is always NULL)
        self.convert = convert

    @classmethod
    def of(cls, column: Column[Any]) -> StagedColumn | None:
        """How ``column`` is staged, or None if its type is not one the COPY path handles."""
        kind = column.type
        name = column.name
        if isinstance(kind, TypeDecorator | Enum):
            return None
        if isinstance(kind, Uuid):
            return cls(name, "text", Text(), frozenset({str, UUID}), _uuid_texts)
        if isinstance(kind, JSON):
            none_as_null = bool(getattr(kind, "none_as_null", False))
            return cls(name, "text", Text(), _ANY, _json_texts_null if none_as_null else _json_texts)
        if isinstance(kind, Boolean):
            return cls(name, "bool", kind, frozenset({bool}))
        if isinstance(kind, BigInteger):
            return cls(name, "int8", kind, frozenset({int}))
        if isinstance(kind, SmallInteger):
            return cls(name, "int2", kind, frozenset({int}))
        if isinstance(kind, Integer):
            return cls(name, "int4", kind, frozenset({int}))
        if isinstance(kind, Float):
            return cls(name, "float8", Float(), frozenset({float, int}))
        if isinstance(kind, Numeric):
            return cls(name, "numeric", Numeric(), frozenset({Decimal, int}))
        if isinstance(kind, DateTime):
            # The binary dumper of timestamptz needs aware datetimes, and timestamp naive ones.
            aware = bool(kind.timezone)
            check = _all_aware if aware else _all_naive
            return cls(name, "timestamptz" if aware else "timestamp", kind, frozenset({datetime}), check)
        if isinstance(kind, Date):
            return cls(name, "date", kind, frozenset({date}))
        if isinstance(kind, String):
            return cls(name, "text", Text(), frozenset({str}))
        return None

    def accepts(self, values: list[Any]) -> bool:
        """Whether every value is of a class the binary dumper takes (or None)."""
        if not self.types:
            return True
        classes = {value.__class__ for value in values}
        classes.discard(type(None))
        return classes <= self.types


class _NotStageable(Exception):
    """A value the staging path cannot send as its column's type: the group takes the array path."""


def _uuid_texts(values: list[Any]) -> list[Any]:
    return [value if value is None or value.__class__ is str else str(value) for value in values]


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # what orjson does not serialize (Decimal, big integers, non-str keys)
        return json.dumps(value)


def _json_texts(values: list[Any]) -> list[Any]:
    # As SQLAlchemy's JSON type binds it: None is JSON null, not SQL NULL.
    return [_json_text(value) for value in values]


def _json_texts_null(values: list[Any]) -> list[Any]:
    return [None if value is None else _json_text(value) for value in values]


def _all_aware(values: list[Any]) -> list[Any]:
    for value in values:
        if value is not None and value.tzinfo is None:
            raise _NotStageable
    return values


def _all_naive(values: list[Any]) -> list[Any]:
    for value in values:
        if value is not None and value.tzinfo is not None:
            raise _NotStageable
    return values


class StagedUpsert:
    """The staging table and the ``INSERT ... SELECT ... ON CONFLICT`` of one table and signature."""

    def __init__(
        self, spec: TableSpec, columns: Sequence[str], staged: Sequence[StagedColumn], key: str
    ) -> None:
        """``key`` names the group (the table and its column signature), ``columns`` its columns."""
        table = spec.table
        # Named after what it holds and how it is merged: the same name is the same table, whichever
        # target uses it, and each group of a batch's flush has a table of its own.
        shape = ",".join(f"{column.name}:{column.pg_type}" for column in staged)
        digest = hashlib.sha1(f"{key}|{shape}".encode()).hexdigest()[:16]
        # pg_temp: a schema of its own, which the target's schema_translate_map leaves alone.
        self.staging = Table(
            f"dl_stage_{table.name[:30]}_{digest}",
            MetaData(schema="pg_temp"),
            *(Column(column.name, column.staged_type) for column in staged),
            prefixes=["TEMPORARY"],
            postgresql_on_commit="DELETE ROWS",
        )
        self.create = CreateTable(self.staging, if_not_exists=True)
        self.staged = tuple(staged)
        self.types = [column.pg_type for column in staged]
        self.copy_sql = psql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            psql.Identifier("pg_temp", self.staging.name), psql.SQL(", ").join(map(psql.Identifier, columns))
        )
        self.source = select(
            *(
                cast(self.staging.c[name], table.c[name].type)
                if isinstance(table.c[name].type, Uuid | JSON)
                else self.staging.c[name]
                for name in columns
            )
        )

    def statement(self, spec: TableSpec, columns: Sequence[str]) -> Any:
        """``INSERT INTO table (columns) SELECT ... FROM staging``; the caller adds ON CONFLICT."""
        return pg_insert(spec.table).from_select(list(columns), self.source)

    def arrays(self, arrays: list[list[Any]]) -> list[list[Any]] | None:
        """The columns' values as the COPY sends them, or None if some value does not qualify."""
        out = []
        for column, values in zip(self.staged, arrays, strict=True):
            if not column.accepts(values):
                return None
            try:
                out.append(values if column.convert is None else column.convert(values))
            except _NotStageable:
                return None
        return out


class StagingTables:
    """Which staging tables a connection's session has, as far as its committed batches know."""

    INFO_KEY = "datalayer.staging_tables"

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._known: set[str] = conn.info.setdefault(self.INFO_KEY, set())
        self._created: list[str] = []

    def ensure(self, upsert: StagedUpsert) -> None:
        """Create the staging table in this transaction unless an earlier committed batch did."""
        name = upsert.staging.name
        if name in self._known or name in self._created:
            return
        self._conn.execute(upsert.create)
        self._created.append(name)

    def committed(self) -> None:
        """The batch committed: the tables it created stay for the session."""
        self._known.update(self._created)
        self._created.clear()

    def copy(self, upsert: StagedUpsert, arrays: list[list[Any]]) -> None:
        """Send the rows (one list per column) into the staging table."""
        self.ensure(upsert)
        driver = self._conn.connection.driver_connection
        assert driver is not None
        with driver.cursor() as cursor, cursor.copy(upsert.copy_sql) as copy:
            copy.set_types(upsert.types)
            write = copy.write_row
            for row in zip(*arrays, strict=True):
                write(row)


def staged_columns(spec: TableSpec, columns: Sequence[str]) -> list[StagedColumn] | None:
    """How each of ``columns`` is staged, or None if one of them cannot be."""
    staged = []
    for name in columns:
        column = StagedColumn.of(spec.table.c[name])
        if column is None:
            return None
        staged.append(column)
    return staged
