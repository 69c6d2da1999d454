"""What is running and how far behind it is: the event store, the relay and every projection.

:func:`gather_status` reads it all without writing anything: the store's head and read horizon
(PostgreSQL), the relay's checkpoint and lag, and for each generation of each projection its
checkpoints against the Kafka end offsets, the age of its oldest unapplied event, its consumer
group and the projection's dead-letter count. ``datalayer status``, ``datalayer health``, the
metrics endpoint and the demo all read it from here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from psycopg import sql

from consumers.dead_letters import dead_letter_topic
from consumers.live import group_for
from consumers.topic_ids import current_topic_ids, recreated_topics
from datalayer.clients import postgres_connection
from datalayer.settings import Settings
from eventstore.relay.checkpoint import read_lag
from eventstore.relay.topics import topic_for
from projections.generations import REGISTRY_SCHEMA, Generation, PostgresGenerations
from projections.projection import Projection

# Short client timeouts: a status that hangs on a dead server is no status. kafka-python's
# defaults wait up to 30 s per request.
KAFKA_TIMEOUTS: dict[str, Any] = {
    "request_timeout_ms": 5000,
    "bootstrap_timeout_ms": 3000,
}
PG_CONNECT_TIMEOUT = 5


@dataclass(frozen=True)
class StoreStatus:
    """The event store: its newest event, how many there are, and the read horizon."""

    schema: str
    events: int
    #: False when ``events`` is PostgreSQL's estimate: a long log is not counted on every read.
    events_exact: bool
    head_position: int | None
    last_recorded_at: datetime | None
    horizon_stalled: bool
    held_back_events: int
    #: Events with transaction ids this cluster has not reached (a pg_dump from another cluster).
    unreachable_events: int
    blocking_pid: int | None
    blocking_seconds: float
    blocking_query: str | None


@dataclass(frozen=True)
class RelayStatus:
    """The relay's checkpoint, its lag in events and seconds, and which backend holds its lock."""

    name: str
    checkpoint: str
    lag_events: int
    lag_seconds: float
    published: int
    active_pid: int | None


@dataclass(frozen=True)
class PartitionLag:
    """One source partition of a generation: the next offset to apply, the end, and the difference."""

    source: str
    applied: int | None
    end: int
    lag: int


@dataclass
class GenerationStatus:
    """One generation of a projection's read model: its state, checkpoints, lag and consumer group."""

    name: str
    version: int
    status: str
    partitions: list[PartitionLag] = field(default_factory=list)
    lag_events: int | None = None
    lag_seconds: float | None = None
    log_checkpoint: str | None = None
    group: str = ""
    group_state: str | None = None
    group_members: int | None = None
    group_assigned: int | None = None  # partitions the members hold; fewer than the topics' is a problem
    group_lag: int | None = None
    error: str | None = None
    # Topics created again since this read model stored its offsets (their id differs from the one
    # stored with the offsets): its consumer reads them from the beginning at its next assignment.
    recreated: list[str] = field(default_factory=list)

    @property
    def past_end(self) -> list[PartitionLag]:
        """Partitions whose stored offset lies past their end: the topic was deleted and created
        again (or truncated) since this read model consumed it, so its offsets name other records.
        Its consumer reads such a partition from its beginning once it runs (the stream versions
        skip what was applied): the topic's id stored with the offsets tells it (see ``recreated``)."""
        return [p for p in self.partitions if p.applied is not None and p.applied > p.end]


@dataclass
class ProjectionStatus:
    """A projection: which code version this process has, its dead letters and its generations."""

    name: str
    version: int
    target: str
    dead_letters: int | None = None
    generations: list[GenerationStatus] = field(default_factory=list)
    error: str | None = None

    @property
    def active(self) -> GenerationStatus | None:
        return next((g for g in self.generations if g.status == "active"), None)

    @property
    def rebuilding(self) -> list[str]:
        return [g.name for g in self.generations if g.status == "building"]


@dataclass
class StatusReport:
    """Everything :func:`gather_status` found; a part that could not be read carries its error."""

    store: StoreStatus | None = None
    relay: RelayStatus | None = None
    projections: list[ProjectionStatus] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    took_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601, seconds rounded to milliseconds."""
        data = asdict(self)
        for projection, status in zip(data["projections"], self.projections, strict=True):
            projection["active"] = status.active.name if status.active else None
            projection["rebuilding"] = status.rebuilding
            for generation, known in zip(projection["generations"], status.generations, strict=True):
                generation["past_end"] = [p.source for p in known.past_end]
        jsonable: dict[str, Any] = _jsonable(data)
        return jsonable


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float):
        return round(value, 3)
    return value


def gather_status(
    settings: Settings,
    projections: Sequence[Projection[Any]],
    relay_name: str = "default",
    *,
    topic_prefix: str | None = None,
    dead_letter_prefix: str | None = None,
) -> StatusReport:
    """Read the state of the store, the relay and ``projections``; never writes, never raises.

    A server that cannot be reached leaves its part empty and names the error in ``errors``.
    """
    started = time.monotonic()
    report = StatusReport()
    try:
        with postgres_connection(settings, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT) as conn:
            report.store, report.relay = _store_and_relay(conn, settings.eventstore_schema, relay_name)
    except Exception as exc:
        report.errors["postgresql"] = one_line(exc)
    if projections:
        try:
            with _KafkaView(settings) as kafka:
                for projection in projections:
                    report.projections.append(
                        _projection_status(
                            projection,
                            settings,
                            kafka,
                            topic_prefix if topic_prefix is not None else settings.topic_prefix,
                            dead_letter_prefix
                            if dead_letter_prefix is not None
                            else settings.dead_letter_topic_prefix,
                        )
                    )
        except Exception as exc:
            report.errors["kafka"] = one_line(exc)
    report.took_seconds = time.monotonic() - started
    return report


def one_line(exc: BaseException) -> str:
    """An error as one line: the driver's own error rather than a wrapper's."""
    cause = getattr(exc, "orig", None) or exc
    text = " ".join(part.strip() for part in str(cause).splitlines() if part.strip())
    name = type(cause).__name__
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


# -- PostgreSQL: the store and the relay ------------------------------------------------------


def _store_and_relay(
    conn: psycopg.Connection[Any], schema: str, relay_name: str
) -> tuple[StoreStatus, RelayStatus]:
    found = conn.execute("SELECT to_regclass(%s)", (f'"{schema}".events',)).fetchone()
    if found is None or found[0] is None:
        raise LookupError(f"schema {schema} has no event store (run: datalayer db migrate)")
    table = sql.Identifier(schema, "events")
    # The head through the primary key's index: one row, however long the log.
    head = conn.execute(
        sql.SQL("SELECT position, recorded_at FROM {} ORDER BY position DESC LIMIT 1").format(table)
    ).fetchone()
    events, exact = _event_count(conn, schema, table)
    lag = read_lag(conn, schema, relay_name)
    horizon = lag.horizon
    store = StoreStatus(
        schema=schema,
        events=events,
        events_exact=exact,
        head_position=head[0] if head else None,
        last_recorded_at=head[1] if head else None,
        horizon_stalled=horizon.stalled,
        held_back_events=horizon.held_back_events,
        unreachable_events=horizon.unreachable_events,
        blocking_pid=horizon.blocking_pid,
        blocking_seconds=horizon.blocking_seconds,
        blocking_query=horizon.blocking_query,
    )
    relay = RelayStatus(
        name=relay_name,
        checkpoint=str(lag.checkpoint),
        lag_events=lag.events,
        lag_seconds=lag.seconds,
        published=lag.published,
        active_pid=relay_lock_holder(conn, schema, relay_name),
    )
    return store, relay


def unreachable_message(events: int) -> str:
    """What an event log restored from another cluster's ``pg_dump`` means, and what to do."""
    return (
        f"UNREACHABLE: {events:,} events carry transaction ids this cluster has not reached (a pg_dump "
        "restored from another cluster?): no reader sees them; restore from a `datalayer export` "
        "instead (docs/backup-and-migration.md)"
    )


#: Up to this many events (by PostgreSQL's estimate) status counts them exactly; beyond, a count
#: would scan the whole log on every status read and metrics scrape, so the estimate is reported.
EXACT_COUNT_LIMIT = 1_000_000


def _event_count(conn: psycopg.Connection[Any], schema: str, table: sql.Identifier) -> tuple[int, bool]:
    row = conn.execute(
        "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)", (f'"{schema}".events',)
    ).fetchone()
    estimate = int(row[0]) if row is not None and row[0] is not None else -1
    # -1: never vacuumed or analysed, so PostgreSQL does not know yet; a small log is counted.
    if estimate > EXACT_COUNT_LIMIT:
        return estimate, False
    counted = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
    assert counted is not None
    return int(counted[0]), True


def relay_lock_holder(conn: psycopg.Connection[Any], schema: str, relay_name: str) -> int | None:
    """The backend pid of the active relay's session (it holds the relay's advisory lock), or None."""
    # A bigint advisory lock shows in pg_locks as its high 32 bits (classid) and low 32 (objid).
    row = conn.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted"
        " AND ((classid::int8 << 32) | objid::int8) = hashtextextended(%s, 0) LIMIT 1",
        (f"datalayer.relay.{schema}.{relay_name}",),
    ).fetchone()
    return int(row[0]) if row is not None else None


# -- Kafka and the read models ----------------------------------------------------------------


class _KafkaView:
    """One admin client and one group-less consumer, to read offsets, records and groups."""

    def __init__(self, settings: Settings) -> None:
        config = {**settings.kafka_config(), **KAFKA_TIMEOUTS}
        self.admin = KafkaAdminClient(**config)
        try:
            self.consumer = KafkaConsumer(**config, enable_auto_commit=False, group_id=None)
        except Exception:
            self.admin.close()
            raise
        self.topics: set[str] = set(self.consumer.topics())

    def __enter__(self) -> _KafkaView:
        return self

    def __exit__(self, *_: object) -> None:
        self.consumer.close()
        self.admin.close()

    def topic_ids(self, topics: Iterable[str]) -> dict[str, str]:
        """The topics' ids as Kafka has them now (those it knows)."""
        return current_topic_ids(self.consumer, topics)

    def partitions(self, topics: Sequence[str]) -> list[TopicPartition]:
        found = []
        for topic in topics:
            if topic in self.topics:
                for p in sorted(self.consumer.partitions_for_topic(topic) or ()):
                    found.append(TopicPartition(topic, p))
        return found

    def oldest_unapplied(self, positions: dict[TopicPartition, int], timeout: float = 2.0) -> datetime | None:
        """The earliest ``recorded_at`` among the records at ``positions`` (the next ones to apply)."""
        if not positions:
            return None
        self.consumer.assign(list(positions))
        for tp, offset in positions.items():
            self.consumer.seek(tp, offset)
        oldest: datetime | None = None
        pending = set(positions)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for tp, records in self.consumer.poll(timeout_ms=200).items():
                if tp not in pending or not records:
                    continue
                pending.discard(tp)
                self.consumer.pause(tp)
                recorded = _recorded_at(records[0].value)
                if recorded is not None and (oldest is None or recorded < oldest):
                    oldest = recorded
        self.consumer.assign([])
        return oldest


def _recorded_at(value: bytes | None) -> datetime | None:
    try:
        text = orjson.loads(value or b"")["recorded_at"]
        moment = datetime.fromisoformat(text)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _projection_status(
    projection: Projection[Any], settings: Settings, kafka: _KafkaView, topic_prefix: str, dlq_prefix: str
) -> ProjectionStatus:
    from datalayer.wiring import read_model_store

    models = read_model_store(projection, settings)
    target_kind = "postgresql" if isinstance(models.registry, PostgresGenerations) else "redis"
    status = ProjectionStatus(projection.name, projection.version, target_kind)
    try:
        dlq = kafka.partitions([dead_letter_topic(dlq_prefix, projection.name)])
        if dlq:
            ends, starts = kafka.consumer.end_offsets(dlq), kafka.consumer.beginning_offsets(dlq)
            status.dead_letters = sum(ends[tp] - starts[tp] for tp in dlq)
        else:
            status.dead_letters = 0
        sources = kafka.partitions(sorted({topic_for(topic_prefix, t) for t in projection.stream_types}))
        ends = kafka.consumer.end_offsets(sources) if sources else {}
        for generation in _generations(models.registry, projection.name):
            status.generations.append(_generation_status(generation, models.make_target, kafka, ends))
    except Exception as exc:
        status.error = one_line(exc)
    finally:
        models.close()
    return status


def _generations(registry: Any, projection: str) -> list[Generation]:
    if isinstance(registry, PostgresGenerations):
        # Read-only: the registry's own generations() would create its table when missing.
        with registry.engine.connect() as conn:
            exists = conn.exec_driver_sql(f"SELECT to_regclass('{REGISTRY_SCHEMA}.generations')").scalar()
        if exists is None:
            return []
    found: list[Generation] = registry.generations(projection)
    return found


def _generation_status(
    generation: Generation, make_target: Any, kafka: _KafkaView, ends: dict[TopicPartition, int]
) -> GenerationStatus:
    status = GenerationStatus(generation.name, generation.version, generation.status)
    status.group = group_for(generation.name)
    try:
        checkpoints = make_target(generation.name).checkpoints()
    except Exception as exc:
        status.error = one_line(exc)
        return status
    status.log_checkpoint = checkpoints.get("log")
    status.recreated = sorted(recreated_topics(checkpoints, kafka.topic_ids({tp.topic for tp in ends})))
    behind: dict[TopicPartition, int] = {}
    for tp in sorted(ends):
        stored = checkpoints.get(f"{tp.topic}:{tp.partition}")
        applied = int(stored) if stored is not None else None
        lag = ends[tp] - (applied or 0)
        status.partitions.append(PartitionLag(f"{tp.topic}:{tp.partition}", applied, ends[tp], lag))
        if lag > 0:
            behind[tp] = applied or 0
    # A partition past its end (see past_end) lags by nothing, rather than hide another's lag.
    status.lag_events = sum(max(p.lag, 0) for p in status.partitions)
    if behind:
        oldest = kafka.oldest_unapplied(behind)
        status.lag_seconds = max((datetime.now(UTC) - oldest).total_seconds(), 0.0) if oldest else None
    else:
        status.lag_seconds = 0.0
    try:
        group = kafka.admin.describe_groups([status.group]).get(status.group) or {}
    except KafkaError as exc:
        # A fresh broker has no group coordinator until its offsets topic exists: not known yet.
        if not exc.retriable:
            raise
        group = None
    if group is None:
        status.group_state = "unknown"
    elif not group.get("error"):
        status.group_state = group.get("group_state") or None
        members = group.get("members") or ()
        status.group_members = len(members)
        status.group_assigned = sum(
            len(topic.get("partitions") or ())
            for member in members
            for topic in (member.get("member_assignment") or {}).get("assigned_partitions") or ()
        )
    else:
        status.group_state, status.group_members = "none", 0
    try:
        committed = kafka.admin.list_group_offsets({status.group: None}).get(status.group) or {}
    except KafkaError as exc:
        if not exc.retriable:
            raise
        committed = {}
    if committed:
        status.group_lag = sum(
            max(end - (committed[tp].offset if tp in committed else 0), 0) for tp, end in ends.items()
        )
    return status
