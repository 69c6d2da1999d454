"""Read-model generations: which built copy of a projection readers and consumers use.

Every projection's read model exists as one or more *generations*: ``order_views_v1`` (the first
one of version 1), ``order_views_v2_r1`` (a rebuild). Exactly one is ``active``: queries read it
through a stable alias (PostgreSQL views in the schema named after the projection; a Redis hash
``dl:read_models`` mapping the projection to its key prefix), and live consumers write to it.
A rebuild creates a ``building`` generation, fills it, then activates it atomically; the old one
is ``retired`` until dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import redis
from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.schema import CreateIndex, CreateSchema

from projections.privileges import grant_projection_schema
from projections.projection import Projection

BUILDING, ACTIVE, RETIRED = "building", "active", "retired"
REGISTRY_SCHEMA = "datalayer_read_models"
REDIS_ALIASES = "dl:read_models"

_GENERATION = re.compile(r"^(?P<name>.+)_v(?P<version>\d+)(?:_r(?P<rebuild>\d+))?$")


@dataclass(frozen=True, slots=True)
class Generation:
    """One built (or being built) copy of a projection's read model."""

    projection: str
    name: str
    version: int
    status: str
    created_at: datetime
    activated_at: datetime | None = None


def next_generation_name(projection: Projection[Any], existing: list[Generation]) -> str:
    """``<name>_v<version>`` for the first generation of a version, then ``..._r1``, ``..._r2``."""
    base = projection.qualified_name
    taken = {g.name for g in existing}
    if base not in taken:
        return base
    rebuilds = [
        int(m["rebuild"] or 0)
        for g in existing
        if (m := _GENERATION.match(g.name))
        and m["name"] == projection.name
        and int(m["version"]) == projection.version
    ]
    return f"{base}_r{max(rebuilds, default=0) + 1}"


class GenerationRegistry(Protocol):
    """Where a target type records its generations and switches readers between them."""

    def generations(self, projection: str) -> list[Generation]:
        """Every generation of ``projection``, oldest first."""
        ...

    def active(self, projection: str) -> Generation | None:
        """The generation readers and live consumers use, or None before the first one."""
        ...

    def create(self, projection: Projection[Any], *, first: bool = False) -> Generation | None:
        """Register a new ``building`` generation; with ``first``, only if the projection has none yet."""
        ...

    def activate(self, projection: Projection[Any], generation: str) -> None:
        """Make ``generation`` the active one and retire the previous one, atomically for readers."""
        ...

    def forget(self, projection: str, generation: str) -> None:
        """Remove a generation that is not active from the registry (its data is dropped apart)."""
        ...


_metadata = MetaData(schema=REGISTRY_SCHEMA)
_generations = Table(
    "generations",
    _metadata,
    Column("generation", Text, primary_key=True),
    Column("projection", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("activated_at", DateTime(timezone=True)),
    # One active generation per projection, enforced by the database.
    Index("generations_one_active", "projection", unique=True, postgresql_where=text("status = 'active'")),
)


class PostgresGenerations:
    """The registry of PostgreSQL read models, with the alias schema of views readers query."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ready = False

    def setup(self) -> None:
        """Create the registry's schema and table; idempotent, safe to race."""
        if self._ready:
            return
        with self.engine.begin() as conn:
            conn.execute(
                select(func.pg_advisory_xact_lock(func.hashtextextended(literal(REGISTRY_SCHEMA), 0)))
            )
            # Only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when
            # the schema exists, and a consumer running as a projection's writer role lacks it.
            if conn.execute(select(func.to_regnamespace(literal(REGISTRY_SCHEMA)))).scalar() is None:
                conn.execute(CreateSchema(REGISTRY_SCHEMA, if_not_exists=True))
            _metadata.create_all(conn, checkfirst=True)
        self._ready = True

    def generations(self, projection: str) -> list[Generation]:
        self.setup()
        query = select(_generations).where(_generations.c.projection == projection)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(_generations.c.created_at)).mappings().all()
        return [_row(row) for row in rows]

    def active(self, projection: str) -> Generation | None:
        return next((g for g in self.generations(projection) if g.status == ACTIVE), None)

    def create(self, projection: Projection[Any], *, first: bool = False) -> Generation | None:
        self.setup()
        with self.engine.begin() as conn:
            _lock(conn, projection.name)
            rows = conn.execute(select(_generations).where(_generations.c.projection == projection.name))
            existing = [_row(r) for r in rows.mappings()]
            if first and existing:
                return None
            name = next_generation_name(projection, existing)
            values = {"generation": name, "projection": projection.name, "version": projection.version}
            conn.execute(insert(_generations).values(**values, status=BUILDING))
        return next(g for g in self.generations(projection.name) if g.name == name)

    def activate(self, projection: Projection[Any], generation: str) -> None:
        """Switch readers to ``generation``, after building the indexes its replay deferred.

        The switch's own transaction creates any index still missing too (a no-op when the step
        before built them all): no reader ever queries a generation without its indexes.
        """
        metadata: MetaData = projection.metadata  # type: ignore[attr-defined]
        tables = [t.name for t in metadata.sorted_tables]
        build_deferred_indexes(self.engine, metadata, generation)
        quote = self.engine.dialect.identifier_preparer.quote
        alias, target = quote(projection.name), quote(generation)
        with self.engine.begin() as conn:
            _lock(conn, projection.name)
            in_generation = {"schema_translate_map": {None: generation}}
            for index in deferred_indexes(metadata):
                conn.execute(CreateIndex(index, if_not_exists=True), execution_options=in_generation)
            where = _generations.c.projection == projection.name
            conn.execute(
                update(_generations).where(where, _generations.c.status == ACTIVE).values(status=RETIRED)
            )
            changed = conn.execute(
                update(_generations)
                .where(where, _generations.c.generation == generation)
                .values(status=ACTIVE, activated_at=func.now())
            ).rowcount
            if changed != 1:
                raise LookupError(f"no generation {generation!r} of projection {projection.name}")
            # Views are swapped in the same transaction: readers see the old or the new, never none.
            conn.execute(CreateSchema(projection.name, if_not_exists=True))
            for table in tables:
                name = quote(table)
                conn.exec_driver_sql(f"DROP VIEW IF EXISTS {alias}.{name}")
                conn.exec_driver_sql(f"CREATE VIEW {alias}.{name} AS SELECT * FROM {target}.{name}")
            # New views carry no grants: give them to the projection's reader role, if it exists.
            grant_projection_schema(conn, projection.name, projection.name, alias=True)

    def forget(self, projection: str, generation: str) -> None:
        with self.engine.begin() as conn:
            _lock(conn, projection)
            deleted = conn.execute(
                _generations.delete().where(
                    _generations.c.projection == projection,
                    _generations.c.generation == generation,
                    _generations.c.status != ACTIVE,
                )
            ).rowcount
        if deleted != 1:
            raise LookupError(f"{generation!r} is not an inactive generation of {projection}")


# --- secondary indexes of a generation being built ---
#
# Why: every row a replay writes updates each of the table's indexes, one entry at a time; the
# order summaries have four secondary indexes, ~2.3 µs of the server's CPU per replayed event. A
# building generation, which no reader sees, gets its tables with their primary keys and unique
# indexes only; `activate` builds the rest (sorted in bulk, much cheaper) before readers switch.


def deferred_indexes(metadata: MetaData) -> list[Index]:
    """The indexes a building generation may lack: the non-unique ones, which no write relies on."""
    return [index for table in metadata.sorted_tables for index in table.indexes if not index.unique]


def is_building(conn: Connection, generation: str) -> bool:
    """Whether ``generation`` is registered as ``building`` (no registry yet: it is not)."""
    if conn.execute(select(func.to_regclass(literal(f"{REGISTRY_SCHEMA}.generations")))).scalar() is None:
        return False
    status = conn.execute(select(_generations.c.status).where(_generations.c.generation == generation))
    return status.scalar() == BUILDING


def build_deferred_indexes(engine: Engine, metadata: MetaData, schema: str) -> list[str]:
    """Create the deferred indexes missing in ``schema``, each in a transaction of its own.

    One transaction per index: a transaction holding a transaction id holds back the event store's
    commit-ordered readers for as long as it lasts. Returns the names of the indexes built.
    """
    wanted = deferred_indexes(metadata)
    if not wanted:
        return []
    with engine.connect() as conn:
        present = set(
            conn.execute(
                text("SELECT indexname FROM pg_indexes WHERE schemaname = :schema"), {"schema": schema}
            ).scalars()
        )
    built = []
    for index in wanted:
        if index.name in present:
            continue
        with engine.begin() as conn:
            conn.execute(
                CreateIndex(index, if_not_exists=True),
                execution_options={"schema_translate_map": {None: schema}},
            )
        built.append(str(index.name))
    return built


def _row(row: Any) -> Generation:
    values = dict(row)
    values["name"] = values.pop("generation")
    return Generation(**values)


def _lock(conn: Any, projection: str) -> None:
    key = func.hashtextextended(literal(f"datalayer.generations:{projection}"), 0)
    conn.execute(select(func.pg_advisory_xact_lock(key)))


class RedisGenerations:
    """The registry of Redis read models: ``dl:generations:<projection>`` and the alias hash."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @staticmethod
    def prefix(generation: str) -> str:
        """The key prefix of a generation's read model."""
        return f"dl:{{{generation}}}:"

    def generations(self, projection: str) -> list[Generation]:
        raw = self.client.hgetall(f"dl:generations:{projection}")
        found = [_from_json(projection, k, v) for k, v in raw.items()]
        return sorted(found, key=lambda g: (g.created_at, g.name))

    def active(self, projection: str) -> Generation | None:
        return next((g for g in self.generations(projection) if g.status == ACTIVE), None)

    def create(self, projection: Projection[Any], *, first: bool = False) -> Generation | None:
        key = f"dl:generations:{projection.name}"
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    existing = [_from_json(projection.name, k, v) for k, v in pipe.hgetall(key).items()]
                    if first and existing:
                        return None
                    name = next_generation_name(projection, existing)
                    created = datetime.now(UTC).isoformat()
                    record = {"version": projection.version, "status": BUILDING, "created_at": created}
                    pipe.multi()
                    pipe.hset(key, name, json.dumps(record))
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        return next(g for g in self.generations(projection.name) if g.name == name)

    def activate(self, projection: Projection[Any], generation: str) -> None:
        key = f"dl:generations:{projection.name}"
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    records = {_text(k): json.loads(v) for k, v in pipe.hgetall(key).items()}
                    if generation not in records:
                        raise LookupError(f"no generation {generation!r} of projection {projection.name}")
                    for record in records.values():
                        if record["status"] == ACTIVE:
                            record["status"] = RETIRED
                    records[generation]["status"] = ACTIVE
                    records[generation]["activated_at"] = datetime.now(UTC).isoformat()
                    pipe.multi()
                    pipe.hset(key, mapping={k: json.dumps(v) for k, v in records.items()})
                    # The alias queries follow, in the same MULTI: readers switch atomically.
                    pipe.hset(REDIS_ALIASES, projection.name, self.prefix(generation))
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def forget(self, projection: str, generation: str) -> None:
        current = self.active(projection)
        if current is not None and current.name == generation:
            raise LookupError(f"{generation!r} is the active generation of {projection}")
        if not self.client.hdel(f"dl:generations:{projection}", generation):
            raise LookupError(f"no generation {generation!r} of projection {projection}")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _from_json(projection: str, name: bytes | str, raw: bytes | str) -> Generation:
    record = json.loads(raw)
    activated = record.get("activated_at")
    return Generation(
        projection=projection,
        name=_text(name),
        version=int(record["version"]),
        status=record["status"],
        created_at=datetime.fromisoformat(record["created_at"]),
        activated_at=datetime.fromisoformat(activated) if activated else None,
    )
