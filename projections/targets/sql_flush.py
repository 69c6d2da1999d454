"""A batch's coalesced writes flushed to PostgreSQL: deletes, then one upsert per column signature.

Rows of one table and column set go as one statement: by ``COPY`` into a staging table and one
``INSERT ... SELECT`` when the group is big (see ``sql_staging``), else as one array parameter per
column (``unnest``). Rows are sorted by key, so concurrent batches lock them in the same order.
"""

from __future__ import annotations

from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ARRAY,
    JSON,
    Boolean,
    Connection,
    Date,
    DateTime,
    Enum,
    Executable,
    Float,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    String,
    Time,
    TypeDecorator,
    Uuid,
    any_,
    bindparam,
    delete,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from projections.targets.pg_deferred import PipelinedStatement, Statement, render, run_now
from projections.targets.sql_arrays import BinaryArray
from projections.targets.sql_staging import StagedUpsert, StagingTables, staged_columns
from projections.targets.sql_writes import Change, Key, SqlWrites, TableSpec, as_uuid, uuid_key

if TYPE_CHECKING:
    from projections.targets.postgres import PostgresTarget

__all__ = ["STAGING_MIN_ROWS", "db_key", "flush_writes"]

# Column types whose values travel safely as one array parameter per column (unnest); others, such
# as arrays (unnest would flatten them) or enums (their type name is schema-bound), use executemany.
_ARRAY_SAFE = (
    String,
    Integer,
    Numeric,
    Float,
    Boolean,
    Date,
    DateTime,
    Time,
    Interval,
    Uuid,
    JSON,
    LargeBinary,
)
_ARRAY_UNSAFE = (ARRAY, Enum, TypeDecorator)

# The fewest rows of one table and column set that a flush sends by COPY (see sql_staging): below,
# the round trip COPY adds costs more than the ~5 µs of client CPU per row it saves.
STAGING_MIN_ROWS = 64


Signature = tuple[frozenset[str], frozenset[str], frozenset[str]]


_NO_COLUMNS: frozenset[str] = frozenset()


def flush_writes(
    target: PostgresTarget,
    conn: Connection,
    staging: StagingTables | None,
    writes: SqlWrites,
    deferred: list[Statement] | None = None,
) -> None:
    """Deletes, then one insert-or-update per column signature, for each table in dependency order.

    With ``deferred`` (a list), the upserts (as array parameters, or merges from staging tables)
    are added to it rather than run, for the caller to send in a pipeline; the statements that
    cannot go that way run at once, after any deferred before them, so that the order is kept.
    """
    for spec, changes in writes.pending():
        deleted = [key for key, change in changes.items() if change.deleted]
        if deleted:
            _sort(spec, deleted, pairs=False)
            stmt = target._statement(("delete", spec), partial(_delete_statement, spec))
            parts = [db_key(spec, key) for key in deleted]
            keys = [part[0] for part in parts] if spec.pk0 is not None else parts
            _run(conn, deferred, stmt, {"keys": keys})
        groups: dict[Signature, list[tuple[Key, Change]]] = {}
        odd: list[tuple[Key, Change]] = []
        for key, change in changes.items():
            if not change.exists:
                continue
            values = change.values
            adds = change.adds
            # An increment default later incremented inserts default + amount but adds only the
            # amount: `excluded.col` cannot express that, so such rows get a statement each.
            if adds and any(values[column] != amount for column, amount in adds.items()):
                odd.append((key, change))
                continue
            # The shared frozensets of rows written whole (see SqlWrites._replace) are used as they are.
            sets = change.sets
            signature = (
                spec.columns if len(values) == spec.width else frozenset(values),
                sets if sets.__class__ is frozenset else frozenset(sets),
                frozenset(adds) if adds else _NO_COLUMNS,
            )
            group = groups.get(signature)
            if group is None:
                groups[signature] = [(key, change)]
            else:
                group.append((key, change))
        # Plain upserts before increments; rows in key order so that concurrent batches lock alike.
        for signature in sorted(groups, key=lambda s: bool(s[2])):
            rows = groups[signature]
            _sort(spec, rows, pairs=True)
            _upsert_group(target, conn, staging, spec, signature, rows, deferred)
        for key, change in odd:
            _run(conn, deferred, _single_upsert(spec, key, change))


def _run(conn: Connection, deferred: list[Statement] | None, stmt: Any, params: Any = None) -> None:
    """Execute ``stmt`` now, after the deferred statements before it."""
    if deferred:
        run_now(conn, deferred)
    conn.execute(stmt, params)


def _sort(spec: TableSpec, items: list[Any], pairs: bool) -> None:
    """Sort keys, or (key, change) pairs, so that concurrent batches lock rows in the same order.

    UUID columns' keys are canonical texts (``uuid_key``), which sort as the UUIDs do.
    """
    with suppress(TypeError):  # keys of mixed types: any order is correct, only less deadlock-proof
        items.sort(key=_pair_key) if pairs else items.sort()


def _pair_key(pair: tuple[Key, Change]) -> Key:
    return pair[0]


def _delete_statement(spec: TableSpec) -> Executable:
    table = spec.table
    if spec.pk0 is not None:
        column = table.c[spec.pk0]
        return delete(table).where(column == any_(bindparam("keys", type_=BinaryArray(column.type))))
    columns = [table.c[name] for name in spec.pk]
    return delete(table).where(tuple_(*columns).in_(bindparam("keys", expanding=True)))


class _UpsertPlan:
    """How a group of rows of one table and column signature is flushed, built once per target."""

    __slots__ = ("as_arrays", "columns", "pipelined", "staged", "staged_sql", "staged_statement", "statement")

    def __init__(self, spec: TableSpec, signature: Signature) -> None:
        table = spec.table
        names = signature[0]
        self.columns = tuple(name for name in spec.column_names if name in names)
        self.as_arrays = all(
            isinstance(table.c[name].type, _ARRAY_SAFE) and not isinstance(table.c[name].type, _ARRAY_UNSAFE)
            for name in self.columns
        )
        if self.as_arrays:
            source = select(
                *(
                    func.unnest(bindparam(f"p{i}", type_=BinaryArray(table.c[name].type)))
                    for i, name in enumerate(self.columns)
                )
            )
            self.statement = _on_conflict(
                spec, signature, pg_insert(table).from_select(list(self.columns), source)
            )
        else:
            self.statement = _on_conflict(spec, signature, pg_insert(table))
        staged = staged_columns(spec, self.columns)
        self.staged = (
            None
            if staged is None
            else StagedUpsert(spec, self.columns, staged, _signature_name(spec, signature))
        )
        self.staged_statement = (
            None
            if self.staged is None
            else _on_conflict(spec, signature, self.staged.statement(spec, self.columns))
        )
        self.staged_sql: str | None = None  # the staged statement as text, rendered on first use
        self.pipelined: PipelinedStatement | None = None  # the array statement, rendered on first use


def _signature_name(spec: TableSpec, signature: Signature) -> str:
    """The table and its column signature as text, the same in every process."""
    return "|".join([spec.table.name, *(",".join(sorted(names)) for names in signature)])


def _upsert_group(
    target: PostgresTarget,
    conn: Connection,
    staging: StagingTables | None,
    spec: TableSpec,
    signature: Signature,
    rows: list[tuple[Key, Change]],
    deferred: list[Statement] | None = None,
) -> None:
    plan: _UpsertPlan = target._statement((spec, signature), partial(_UpsertPlan, spec, signature))
    columns = plan.columns
    pk_index = {name: i for i, name in enumerate(spec.pk)}
    single = spec.pk0 is not None
    arrays: list[list[Any]] = []
    for name in columns:
        i = pk_index.get(name)
        if i is None:
            arrays.append([change.values[name] for _, change in rows])
        else:
            # UUID columns' keys are UUID texts: staged as they are, made UUIDs for the arrays.
            arrays.append([key for key, _ in rows] if single else [key[i] for key, _ in rows])
    # Small groups keep the one-statement array path: COPY costs a round trip more, which a live
    # consumer's small batches at a steady rate would pay in latency for little CPU saved.
    min_rows = target.staging_min_rows
    if staging is not None and plan.staged is not None and min_rows is not None and len(rows) >= min_rows:
        staged = plan.staged.arrays(arrays)
        if staged is not None:
            # The COPY only fills the staging table: the deferred statements before it need not run first.
            staging.copy(plan.staged, staged)
            statement = plan.staged_statement
            assert statement is not None  # set with staged
            if deferred is None:
                conn.execute(statement)
            else:
                if plan.staged_sql is None:
                    plan.staged_sql = render(conn, statement, target.schema)
                deferred.append((plan.staged_sql, None))
            return
    for array, name in zip(arrays, columns, strict=True):
        if isinstance(spec.table.c[name].type, Uuid):
            array[:] = [None if value is None else as_uuid(value) for value in array]
    if plan.as_arrays:
        params = {f"p{i}": array for i, array in enumerate(arrays)}
        if deferred is None:
            conn.execute(plan.statement, params)
        else:
            if plan.pipelined is None:
                plan.pipelined = PipelinedStatement(conn, plan.statement, target.schema)
            deferred.append(plan.pipelined.bind(params))
    else:
        _run(
            conn,
            deferred,
            plan.statement,
            [dict(zip(columns, row, strict=True)) for row in zip(*arrays, strict=True)],
        )


def _on_conflict(spec: TableSpec, signature: Signature, stmt: Any) -> Executable:
    """``stmt`` (an INSERT of the signature's columns) with its ``ON CONFLICT (pk)`` clause."""
    table = spec.table
    names, sets, adds = signature
    columns = [name for name in spec.column_names if name in names]
    update: dict[str, Any] = {
        name: stmt.excluded[name] for name in columns if name in sets and name not in spec.pk_set
    }
    for name in columns:
        if name in adds:
            update[name] = func.coalesce(table.c[name], 0) + stmt.excluded[name]
    pk = [table.c[name] for name in spec.pk]
    if update:
        result: Executable = stmt.on_conflict_do_update(index_elements=pk, set_=update)
        return result
    result = stmt.on_conflict_do_nothing(index_elements=pk)
    return result


def _single_upsert(spec: TableSpec, key: Key, change: Change) -> Executable:
    table = spec.table
    values = dict(change.values)
    values.update(zip(spec.pk, db_key(spec, key), strict=True))
    stmt = pg_insert(table).values(values)
    update: dict[str, Any] = {name: stmt.excluded[name] for name in change.sets if name not in spec.pk_set}
    for name, amount in change.adds.items():
        update[name] = func.coalesce(table.c[name], 0) + literal(amount, table.c[name].type)
    return stmt.on_conflict_do_update(index_elements=[table.c[name] for name in spec.pk], set_=update)


def db_key(spec: TableSpec, key: Key) -> tuple[Any, ...]:
    """The parts of a normalized key as the database takes them: UUID columns' keys back to UUIDs."""
    parts = (key,) if spec.pk0 is not None else key
    return tuple(
        part if normalize is not uuid_key else as_uuid(part)
        for part, normalize in zip(parts, spec.normalizers, strict=True)
    )
