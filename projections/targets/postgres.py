"""PostgreSQL as a projection target: the read model's tables in a schema of their own.

Each projection version lives in its own schema (``order_views_v1``), with its stream versions and
source checkpoints beside its tables, so a rebuild into a new schema carries its own bookkeeping.
A batch is one transaction: the stream versions are read, the handlers' coalesced writes are
flushed as one multi-row statement per table and column set with the new versions and checkpoints,
then everything commits. With deferred commits (see :meth:`PostgresTarget.defer_commits`) the end
of that transaction is sent without waiting for it, and confirmed before the next batch.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, ClassVar
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Executable,
    MetaData,
    Table,
    Text,
    Uuid,
    and_,
    any_,
    bindparam,
    case,
    cast,
    func,
    literal,
    null,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import CreateIndex, CreateSchema, CreateTable, DropSchema

from projections.commit_signal import CommitSignal
from projections.generations import deferred_indexes, is_building
from projections.privileges import grant_projection_schema
from projections.projection import Projection
from projections.target import BatchConflict, TargetBatch
from projections.targets.pg_commit_signal import commit_signal, notify_statement
from projections.targets.pg_deferred import PipelinedStatement, SentPipeline, Statement, fetch_pipelined
from projections.targets.sql_arrays import BinaryArray, unnest_param, uuid_texts_param
from projections.targets.sql_flush import STAGING_MIN_ROWS, db_key, flush_writes
from projections.targets.sql_staging import StagingTables
from projections.targets.sql_writes import Key, Row, SqlWrites, TableSpec, uuid_key

__all__ = ["PostgresTarget", "SqlProjection", "SqlWrites"]

_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_]{1,63}")

# serialization_failure, deadlock_detected: another process got there first.
_RETRYABLE = frozenset({"40001", "40P01"})
# unique_violation, not_null_violation: in the stream versions table, the sign of a lost race (see
# _update_versions).
_LOST_RACE = frozenset({"23505", "23502"})


class SqlProjection(Projection[SqlWrites]):
    """Base class of projections into PostgreSQL.

    ``metadata`` holds the read model's tables, defined without a schema (the target places them in
    the projection's). ``prefetch`` names tables keyed by the stream id alone: a batch loads their
    rows for all its streams in one query, so ``writes.get()`` on them costs no round trip.
    """

    metadata: ClassVar[MetaData]
    prefetch: ClassVar[tuple[str, ...]] = ()


_BOOKKEEPING = MetaData()
_versions = Table(
    "projection_stream_versions",
    _BOOKKEEPING,
    Column("stream_id", Uuid, primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), server_default=func.now()),
)
_checkpoints = Table(
    "projection_checkpoints",
    _BOOKKEEPING,
    Column("source", Text, primary_key=True),
    Column("position", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), server_default=func.now()),
)

# The ids come back as text, canonical as stream ids are: no UUID object built, nor str() of one.
_select_versions = select(cast(_versions.c.stream_id, Text), _versions.c.version).where(
    _versions.c.stream_id == any_(uuid_texts_param("ids"))
)
_select_version = select(_versions.c.version).where(_versions.c.stream_id == bindparam("id", type_=Uuid))


# Versions are checked optimistically, not locked when read: a row lock at read time would give the
# batch a transaction id for all of its handler work, and any open transaction id holds back the
# event store's commit-ordered readers (the relay) in the same cluster. New streams are plainly
# inserted, so a concurrent insert of the same stream is a unique violation, never an overwrite;
# a known stream that no longer stands at the version read (another process moved it meanwhile: the
# update waits on that process's row lock first, then sees its committed version) is set to NULL,
# which the NOT NULL column refuses. Both abort the transaction with an error, so that the check
# holds without anyone reading the statement's result: a deferred commit sends it with the rest.
_insert_versions = pg_insert(_versions).from_select(
    ["stream_id", "version"],
    select(func.unnest(uuid_texts_param("new_ids")), unnest_param("new_versions", BigInteger)),
)
_changes = select(
    func.unnest(uuid_texts_param("ids")).label("stream_id"),
    unnest_param("read_versions", BigInteger).label("read_version"),
    unnest_param("versions", BigInteger).label("version"),
).subquery("changes")
_update_versions = (
    update(_versions)
    .where(_versions.c.stream_id == _changes.c.stream_id)
    .values(
        version=case((_versions.c.version == _changes.c.read_version, _changes.c.version), else_=null()),
        updated_at=func.now(),
    )
    .returning(_versions.c.stream_id)
)
_upsert_checkpoints = (
    pg_insert(_checkpoints)
    .from_select(
        ["source", "position"], select(unnest_param("sources", Text), unnest_param("positions", Text))
    )
    .on_conflict_do_update(
        index_elements=[_checkpoints.c.source],
        set_={"position": pg_insert(_checkpoints).excluded.position, "updated_at": func.now()},
    )
)
# Why one statement: the stream versions (updated and new) and the checkpoints are written by
# data-modifying CTEs of a single statement, one round trip instead of up to three. At a steady
# few hundred events/s a batch holds a handful of events and costs ~8 round trips, ~1 ms each, so
# this is latency as much as throughput. Empty arrays make a part a no-op; the rows written by the
# parts are disjoint, and a unique violation can only come from the new streams' plain INSERT.
_updated_versions = _update_versions.cte("updated_versions")
_write_bookkeeping = (
    select(func.count())
    .select_from(_updated_versions)
    .add_cte(_insert_versions.cte("new_versions"), _upsert_checkpoints.cte("checkpoints"))
)
_select_checkpoints = select(_checkpoints.c.source, _checkpoints.c.position)


def check_schema_name(schema: str) -> str:
    """``schema`` if it is a usable PostgreSQL schema name, else a ValueError saying why."""
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"schema name {schema!r}: use 1-63 ASCII letters, digits and underscores")
    if schema.lower().startswith("pg_"):
        raise ValueError(f"schema name {schema!r}: the pg_ prefix is reserved by PostgreSQL")
    return schema


class PostgresTarget:
    """The :class:`~projections.target.ProjectionTarget` of a :class:`SqlProjection`, in one schema.

    ``schema`` defaults to the projection's qualified name (``order_views_v1``).
    """

    def __init__(
        self,
        engine: Engine,
        projection: SqlProjection,
        schema: str | None = None,
        *,
        staging_min_rows: int | None = STAGING_MIN_ROWS,
    ) -> None:
        metadata = getattr(type(projection), "metadata", None)
        if not isinstance(metadata, MetaData):
            raise TypeError(f"projection {type(projection).__name__} must set metadata to a MetaData")
        self.engine = engine
        self.projection = projection
        self.schema = check_schema_name(schema if schema is not None else projection.qualified_name)
        self._translate = {"schema_translate_map": {None: self.schema}}
        self._specs: dict[Table, TableSpec] = {}
        for index, table in enumerate(metadata.sorted_tables):
            if table.schema is not None:
                raise ValueError(f"table {table.name!r} must not set a schema: the target chooses it")
            if table.name in _BOOKKEEPING.tables:
                raise ValueError(f"table name {table.name!r} is reserved for the target's bookkeeping")
            self._specs[table] = TableSpec(table, index)
        self._prefetch = [self._prefetch_spec(name, metadata) for name in type(projection).prefetch]
        self._statements: dict[Any, Any] = {}
        # Groups of at least this many flushed rows go through COPY and a staging table (see
        # sql_staging), which needs the TEMPORARY privilege on the database (PUBLIC has it unless
        # revoked); None: array parameters only.
        self.staging_min_rows = staging_min_rows
        # Deferred commits (see defer_commits): whether they are on, and the one not yet confirmed.
        self._defer = False
        self._sent: _SentCommit | None = None

    def _prefetch_spec(self, name: str, metadata: MetaData) -> TableSpec:
        table = metadata.tables.get(name)
        if table is None:
            raise ValueError(f"prefetch table {name!r} is not in the projection's metadata")
        spec = self._specs[table]
        if spec.pk0 is None:
            raise ValueError(f"prefetch table {name!r} must have a one-column primary key (the stream id)")
        return spec

    def setup(self) -> None:
        """Create the schema, the read model's tables and the bookkeeping tables; safe to race."""
        with self.engine.begin() as conn:
            # Two processes creating the same schema at once would collide in the catalogs.
            lock_key = func.hashtextextended(literal(f"datalayer.projection_schema:{self.schema}"), 0)
            conn.execute(select(func.pg_advisory_xact_lock(lock_key)))
            # Only when missing: CREATE SCHEMA IF NOT EXISTS still needs CREATE on the database,
            # which a consumer running as the projection's writer role does not have.
            if conn.execute(select(func.to_regnamespace(literal(f'"{self.schema}"')))).scalar() is None:
                conn.execute(CreateSchema(self.schema, if_not_exists=True))
            # A generation being built gets its non-unique indexes when it is activated, before
            # any reader sees it (see projections.generations.deferred_indexes).
            building = is_building(conn, self.schema)
            conn.execution_options(**self._translate)
            metadata = self.projection.metadata
            if building:
                deferred = set(deferred_indexes(metadata))
                for table in metadata.sorted_tables:
                    conn.execute(CreateTable(table, if_not_exists=True))
                    for index in table.indexes - deferred:
                        conn.execute(CreateIndex(index, if_not_exists=True))
            else:
                metadata.create_all(conn, checkfirst=True)
            _BOOKKEEPING.create_all(conn, checkfirst=True)
            grant_projection_schema(conn, self.projection.name, self.schema)

    def drop(self) -> None:
        """Drop the schema with everything in it."""
        with self.engine.begin() as conn:
            conn.execute(DropSchema(self.schema, cascade=True, if_exists=True))

    @contextmanager
    def batch(self) -> Iterator[TargetBatch[SqlWrites]]:
        """One transaction; it commits only through the batch's ``commit``.

        A deferred commit keeps the connection out of the pool until :meth:`confirm_commit`.
        """
        if self._sent is not None:
            raise RuntimeError("a commit awaits confirm_commit()")
        conn = self.engine.connect()
        batch: _PostgresBatch | None = None
        try:
            conn.execution_options(**self._translate)
            conn.begin()
            batch = _PostgresBatch(self, conn)
            yield batch
        finally:
            if batch is not None and batch.sent is not None:
                self._sent = batch.sent  # the transaction's end is on its way: confirm_commit() reads it
            else:
                try:
                    if conn.in_transaction():
                        conn.rollback()
                finally:
                    conn.close()

    def defer_commits(self, enabled: bool = True) -> None:
        """With ``enabled``, a batch's commit sends the end of its transaction and returns without
        waiting for PostgreSQL; :meth:`confirm_commit` then reads the outcome. Without, commits wait
        (the default).

        Why: the consumer runtime polls Kafka for the next batch while PostgreSQL writes this one's
        stream versions, merges its rows and flushes its commit. Only the wait moves: the
        transaction and what it writes are the same, a lost race on the versions aborts it (raised
        by ``commit`` or by :meth:`confirm_commit`, whichever reads the error), and the runtime
        confirms a batch before it applies the next one, so every batch reads what the previous
        one's commit left.
        """
        if not enabled and self._sent is not None:
            raise RuntimeError("a commit awaits confirm_commit()")
        self._defer = enabled

    def confirm_commit(self) -> None:
        """Wait for the commit sent last, if it awaits confirmation, and raise what a waiting commit
        would have raised: :class:`BatchConflict`, the statement's error, or the connection's (when
        the commit may or may not have happened: applying the batch again is safe, the versions
        skip what it did)."""
        sent = self._sent
        if sent is None:
            return
        self._sent = None
        sent.finish()

    def checkpoints(self) -> dict[str, str]:
        """Every stored checkpoint: source -> position."""
        with self.engine.connect() as conn:
            conn.execution_options(**self._translate)
            return {source: position for source, position in conn.execute(_select_checkpoints)}

    def applied_version(self, stream_id: str) -> int | None:
        """The last applied version of ``stream_id`` (a UUID string), or None."""
        with self.engine.connect() as conn:
            conn.execution_options(**self._translate)
            version: int | None = conn.execute(_select_version, {"id": UUID(stream_id)}).scalar()
            return version

    def commit_signal(self) -> CommitSignal:
        """Woken by every batch committed into this schema, by any process (see ``commit_signal``)."""
        return commit_signal(self.engine, self.schema)

    def forget_applied_versions(self) -> None:
        """Nothing remembered: every batch reads its streams' versions."""

    def close(self) -> None:
        """Nothing to release: the engine belongs to the caller."""

    def _statement(self, key: Any, build: Any) -> Any:
        """A statement built once per target: ``build()`` on first use of ``key``."""
        found = self._statements.get(key)
        if found is None:
            found = self._statements[key] = build()
        return found


class _PostgresBatch:
    """One open batch on one connection, in a transaction the target's context manager ends."""

    def __init__(self, target: PostgresTarget, conn: Connection) -> None:
        self._target = target
        self._conn = conn
        # The loader must not hold the batch: batch -> writes -> loader -> batch would be a cycle,
        # and every batch's pending rows would wait for the garbage collector to be freed.
        self._writes = SqlWrites(target._specs, partial(_load_row, target, conn))
        self._read: dict[str, int] = {}  # the versions applied_versions() saw
        self.sent: _SentCommit | None = None  # the deferred end of the transaction, once sent

    @property
    def writes(self) -> SqlWrites:
        return self._writes

    def applied_versions(self, stream_ids: Collection[str], fresh: Collection[str] = ()) -> dict[str, int]:
        """The versions of the streams read, with their prefetched rows; ``fresh`` streams (first
        seen at their initial version) are taken as never applied, and their rows as absent.

        Why: in a replay, two in three of a batch's streams start in it (new orders), and reading
        them found nothing, at ~4% of a single-process replay's rate. A fresh stream goes into the
        versions table with a plain INSERT, which fails on one applied after all (a unique
        violation: BatchConflict); the batch applied again reads it.
        """
        target = self._target
        if fresh:
            skipped = set(fresh)
            for spec in target._prefetch:
                keys = [uuid_key(sid) if spec.normalizers[0] is not None else str(sid) for sid in skipped]
                self._writes.preload(spec.table, dict.fromkeys(keys))
            stream_ids = [sid for sid in stream_ids if sid not in skipped]
            if not stream_ids:
                return {}
        texts = [uuid_key(sid) for sid in stream_ids]  # how SqlWrites keys UUID columns
        target, conn = self._target, self._conn
        prefetches = [self._prefetch_read(spec, texts) for spec in target._prefetch]
        versions = target._statement(
            ("pipelined", _select_versions), lambda: PipelinedStatement(conn, _select_versions, target.schema)
        )
        # The versions and the prefetched rows in one round trip.
        reads = [
            (versions, {"ids": texts}),
            *((statement, {"ids": keys}) for statement, keys in prefetches),
        ]
        try:
            results = fetch_pipelined(conn, reads)
        except DBAPIError as exc:
            if _retryable(exc):
                raise BatchConflict(f"concurrent batch: {exc.orig}") from exc
            raise
        applied: dict[str, int] = {sid: version for sid, version in results[0]}
        self._read.update(applied)
        for spec, (_, keys), rows in zip(target._prefetch, prefetches, results[1:], strict=True):
            self._preload(spec, keys, rows)
        return applied

    def start_event(self) -> None:
        self._writes.start_event()

    def keep_event(self) -> None:
        self._writes.keep_event()

    def drop_event(self) -> None:
        self._writes.drop_event()

    def commit(self, versions: Mapping[str, int], checkpoints: Mapping[str, str]) -> None:
        conn = self._conn
        target = self._target
        # With deferred commits: the statements left to send with the COMMIT, none of them waited for.
        deferred: list[Statement] | None = [] if target._defer else None
        try:
            if deferred is None:
                # Versions first: a batch that lost the race fails before flushing anything.
                self._write_versions(versions, checkpoints)
            staging = StagingTables(conn) if target.staging_min_rows is not None else None
            flush_writes(target, conn, staging, self._writes, deferred)
            if deferred is not None:
                # The versions first here too: a lost race aborts the transaction before the merges run.
                params = self._bookkeeping(versions, checkpoints)
                statements: list[Statement] = []
                if params is not None:
                    bookkeeping = target._statement(
                        ("pipelined", _write_bookkeeping),
                        lambda: PipelinedStatement(conn, _write_bookkeeping, target.schema),
                    )
                    statements.append(bookkeeping.bind(params))
                statements += deferred
                statements.append(notify_statement(target.schema))
                statements.append(("COMMIT", None))
                self.sent = _SentCommit(conn, SentPipeline(conn, statements), staging)
                return
            conn.exec_driver_sql(*notify_statement(target.schema))
            conn.commit()
            if staging is not None:
                staging.committed()
        except BatchConflict:
            conn.rollback()
            raise
        except DBAPIError as exc:
            conn.rollback()
            if _conflict(exc):
                raise BatchConflict(f"concurrent batch: {exc.orig}") from exc
            raise

    def _write_versions(self, versions: Mapping[str, int], checkpoints: Mapping[str, str]) -> None:
        """The new stream versions and the checkpoints, in one statement (see ``_write_bookkeeping``)."""
        params = self._bookkeeping(versions, checkpoints)
        if params is None:
            return
        updated = self._conn.execute(_write_bookkeeping, params).scalar_one()
        # A known stream another process moved raised already; a row gone would show here.
        if updated != len(params["ids"]):
            raise BatchConflict("another process applied some of this batch's streams first")

    def _bookkeeping(
        self, versions: Mapping[str, int], checkpoints: Mapping[str, str]
    ) -> dict[str, list[Any]] | None:
        """The parameters of ``_write_bookkeeping``, None if there is nothing to write."""
        if not versions and not checkpoints:
            return None
        read = self._read
        # Canonical UUID strings sort like the UUIDs, and much faster; one order everywhere keeps
        # two processes updating the same rows from deadlocking.
        ordered = sorted(versions.items())
        new = [(sid, v) for sid, v in ordered if sid not in read]
        known = [(sid, v) for sid, v in ordered if sid in read]
        return {
            **_columns(known, "ids", "versions"),
            "read_versions": [read[sid] for sid, _ in ordered if sid in read],
            **_columns(new, "new_ids", "new_versions"),
            "sources": list(checkpoints),
            "positions": list(checkpoints.values()),
        }

    def _prefetch_read(self, spec: TableSpec, texts: Sequence[str]) -> tuple[PipelinedStatement, list[str]]:
        """How to read the rows of ``spec`` keyed by these streams (their canonical texts, which
        are also the keys the rows are known by): the statement and its ids parameter."""
        table = spec.table
        target, conn = self._target, self._conn

        def build() -> PipelinedStatement:
            key = table.c[spec.pk[0]]
            ids = (
                uuid_texts_param("ids")
                if spec.normalizers[0] is not None
                else bindparam("ids", type_=BinaryArray(key.type))
            )
            return PipelinedStatement(conn, select(table).where(key == any_(ids)), target.schema)

        return target._statement(("prefetch", spec), build), list(texts)

    def _preload(self, spec: TableSpec, keys: list[Key], rows: list[tuple[Any, ...]]) -> None:
        """Hand the rows read for ``keys`` to the batch's writes; the keys without a row as None."""
        normalize = spec.normalizers[0]
        found: dict[Key, Row | None] = dict.fromkeys(keys)
        names = spec.column_names
        pk0 = spec.pk[0]
        for values in rows:
            row = dict(zip(names, values, strict=True))
            key = row[pk0]
            found[key if normalize is None else normalize(key)] = row
        self._writes.preload(spec.table, found)


class _SentCommit:
    """A batch whose last statements and COMMIT were sent and not yet confirmed: its connection (out
    of the pool until then), the query sent, and the staging tables the transaction created."""

    __slots__ = ("conn", "query", "staging")

    def __init__(self, conn: Connection, query: SentPipeline, staging: StagingTables | None) -> None:
        self.conn = conn
        self.query = query
        self.staging = staging

    def finish(self) -> None:
        """Read the outcome, end the transaction on this side, and give the connection back."""
        conn = self.conn
        try:
            try:
                self.query.wait()
            except DBAPIError as exc:
                _roll_back(conn)
                if _conflict(exc):
                    raise BatchConflict(f"concurrent batch: {exc.orig}") from exc
                raise
            except BaseException:
                conn.invalidate()  # interrupted while reading: what the connection holds is unknown
                raise
            # PostgreSQL committed already: psycopg finds the session idle and sends nothing.
            conn.commit()
            if self.staging is not None:
                self.staging.committed()
        finally:
            conn.close()


def _roll_back(conn: Connection) -> None:
    """Roll back a failed transaction; a connection that cannot is dropped rather than pooled."""
    try:
        conn.rollback()
    except DBAPIError:
        conn.invalidate()


def _load_row(target: PostgresTarget, conn: Connection, spec: TableSpec, key: Key) -> Row | None:
    """One stored row by primary key, for ``SqlWrites.get`` on a row the batch did not prefetch."""
    table = spec.table

    def build() -> Executable:
        return select(table).where(
            and_(*(table.c[name] == bindparam(f"k{i}") for i, name in enumerate(spec.pk)))
        )

    stmt = target._statement(("load", spec), build)
    parts = db_key(spec, key)
    values = conn.execute(stmt, {f"k{i}": part for i, part in enumerate(parts)}).first()
    return None if values is None else dict(zip(spec.column_names, values, strict=True))


def _retryable(exc: DBAPIError) -> bool:
    """A deadlock or serialization failure: running the whole batch again resolves it."""
    return getattr(exc.orig, "sqlstate", None) in _RETRYABLE


def _conflict(exc: DBAPIError) -> bool:
    """Whether ``exc`` says another process got there first: a deadlock or a serialization failure,
    or a lost race on the stream versions (see ``_update_versions``). Applying the batch again
    resolves it."""
    if _retryable(exc):
        return True
    orig = exc.orig
    if getattr(orig, "sqlstate", None) not in _LOST_RACE:
        return False
    diag = getattr(orig, "diag", None)
    return getattr(diag, "table_name", None) == _versions.name


def _columns(rows: list[tuple[Any, Any]], first: str, second: str) -> dict[str, list[Any]]:
    return {first: [row[0] for row in rows], second: [row[1] for row in rows]}
