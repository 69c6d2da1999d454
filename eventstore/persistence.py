"""``eventsourcing`` persistence on the datalayer event store.

Select it in an application's environment::

    OrdersApplication(env={"PERSISTENCE_MODULE": "eventstore.persistence",
                           "DATALAYER_DATABASE_URL": "postgresql://...",
                           "DATALAYER_EVENTSTORE_SCHEMA": "datalayer"})

``Aggregate``, ``@event``, ``Application.save/get``, snapshots, upcasting, the cipher and
compression then work unchanged, on a store whose writers never lock the table. Notification ids
are the store's global positions: unique and increasing in insert order, but not in commit order
and with gaps. The library's notification log and subscriptions assume commit order, so
:meth:`DatalayerApplicationRecorder.subscribe` refuses; follow the log with
:meth:`eventstore.store.EventStore.read_all` instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any
from uuid import UUID

from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    InfrastructureFactory,
    IntegrityError,
    Mapper,
    Notification,
    ProcessRecorder,
    StoredEvent,
    Subscription,
    TrackingRecorder,
    Transcoder,
)
from eventsourcing.utils import Environment, EnvType, resolve_topic
from psycopg import sql

from eventstore.keys import DataKeys, MasterKeys
from eventstore.personal import personal_data_mapper
from eventstore.records import NO_METADATA, EventMetadata, NewEvent, StreamAppend
from eventstore.store import EventStore, libpq_tls_kwargs

# A frozen (immutable) default: every context starts with no metadata.
_metadata: ContextVar[EventMetadata] = ContextVar("datalayer_event_metadata", default=NO_METADATA)


@contextmanager
def event_metadata(**fields: Any) -> Iterator[EventMetadata]:
    """Record correlation id, causation id, actor and tenant with every event saved inside the block."""
    known = {k: fields.pop(k) for k in ("correlation_id", "causation_id", "actor", "tenant") if k in fields}
    token = _metadata.set(EventMetadata(**known, extra=fields))
    try:
        yield _metadata.get()
    finally:
        _metadata.reset(token)


@lru_cache(maxsize=4096)
def _stream_type(topic: str) -> str:
    """The aggregate class an event class topic belongs to: ``pkg.mod:Order.Placed`` -> ``Order``."""
    qualname = topic.partition(":")[2] or topic
    return qualname.rpartition(".")[0] or qualname


def _schema_version(topic: str) -> int:
    """The event class's ``class_version`` now (eventsourcing caches the topic's resolution)."""
    try:
        return int(getattr(resolve_topic(topic), "class_version", 1))
    except Exception:  # an unresolvable topic is still stored; reading it is the reader's problem
        return 1


class _StreamSelect:
    """``select_events`` of eventsourcing's recorders over one table (events or snapshots)."""

    def __init__(self, store: EventStore, table: str, type_column: str) -> None:
        self.store = store
        template = sql.SQL(
            "SELECT stream_version, {type}, payload FROM {table} WHERE stream_id = %s"
            " AND stream_version > %s AND stream_version <= %s ORDER BY stream_version {order} LIMIT %s"
        )
        self._queries = {
            desc: template.format(
                type=sql.Identifier(type_column),
                table=sql.Identifier(store.schema, table),
                order=sql.SQL("DESC" if desc else "ASC"),
            ).as_bytes()
            for desc in (False, True)
        }

    def __call__(
        self, originator_id: UUID | str, gt: int | None, lte: int | None, desc: bool, limit: int | None
    ) -> list[StoredEvent]:
        params = (_uuid(originator_id), -1 if gt is None else gt, 2**62 if lte is None else lte, limit)
        with self.store.pool.connection() as conn:
            rows = conn.execute(self._queries[desc], params).fetchall()
        return [StoredEvent(originator_id, int(v), t, bytes(p)) for v, t, p in rows]


class _ReadsStreams:
    """eventsourcing's ``select_events``, shared by the events and the snapshots recorder."""

    _select: _StreamSelect

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        return self._select(originator_id, gt, lte, desc, limit)


class DatalayerApplicationRecorder(_ReadsStreams, ApplicationRecorder):
    """Stores an application's events in the event store's ``events`` table."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self._schema = sql.Identifier(store.schema)
        self._select = _StreamSelect(store, "events", "event_type")

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        positions = self._insert_one_stream(stored_events)
        if positions is not None:
            return positions
        appends = self._appends(stored_events)
        results = self.store.append_streams(appends)
        if len(results) == 1 and len(results[0].positions) == len(stored_events):
            # One stream (the usual save): its events came in version order, so their positions do.
            return list(results[0].positions)
        position_by_key = {
            (r.stream_id, r.version - len(r.positions) + i + 1): p
            for r in results
            for i, p in enumerate(r.positions)
        }
        return [position_by_key[(_uuid(e.originator_id), e.originator_version)] for e in stored_events]

    def _insert_one_stream(self, stored_events: Sequence[StoredEvent]) -> list[int] | None:
        """The usual save, one aggregate's consecutive events, straight into the store's statement.

        Skips the :class:`StreamAppend` and :class:`NewEvent` objects the general path builds only
        for the store to take apart again (about a tenth of a save's client CPU). None when the
        save is not that (several streams, versions not consecutive, nothing) or the store's
        prepared statement does not apply: nothing was written, the general path decides.
        """
        if not stored_events:
            return None
        first = stored_events[0]
        originator_id = first.originator_id
        version = first.originator_version
        for event in stored_events:
            if event.originator_id != originator_id or event.originator_version != version:
                return None
            version += 1
        metadata = _metadata.get().to_json()
        events = [
            (uuid.uuid4().bytes, e.topic, _schema_version(e.topic), e.state, metadata) for e in stored_events
        ]
        return self.store.append_stream_params(
            _uuid(originator_id), _stream_type(first.topic), first.originator_version - 1, events
        )

    @staticmethod
    def _appends(stored_events: Sequence[StoredEvent]) -> list[StreamAppend]:
        metadata = _metadata.get()
        by_stream: dict[UUID, list[StoredEvent]] = {}
        for event in stored_events:
            by_stream.setdefault(_uuid(event.originator_id), []).append(event)
        appends = []
        for stream_id, events in by_stream.items():
            first = events[0].originator_version
            if [e.originator_version for e in events] != list(range(first, first + len(events))):
                # Versions are the aggregate's claim about history: a repeat or a gap in one batch is
                # two decisions taken on one state (or a lost one), never something to renumber.
                raise IntegrityError(
                    f"stream {stream_id}: versions {[e.originator_version for e in events]} in one save "
                    "are not consecutive; nothing was appended"
                )
            stream_type = _stream_type(events[0].topic)
            appends.append(
                StreamAppend(
                    stream_id=stream_id,
                    stream_type=stream_type,
                    expected_version=first - 1,
                    events=tuple(
                        NewEvent(
                            event_id=uuid.uuid4(),
                            event_type=e.topic,
                            payload=e.state,
                            schema_version=_schema_version(e.topic),
                            metadata=metadata,
                        )
                        for e in events
                    ),
                )
            )
        return appends

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        low = start if start is not None else 0
        query = sql.SQL(
            "SELECT position, stream_id, stream_version, event_type, payload FROM {}.events"
            " WHERE position {} %s AND position <= %s"
            " AND (cardinality(%s::text[]) = 0 OR event_type = ANY(%s))"
            " ORDER BY position LIMIT %s"
        ).format(self._schema, sql.SQL(">=" if inclusive_of_start else ">"))
        with self.store.pool.connection() as conn:
            rows = conn.execute(
                query, (low, stop if stop is not None else 2**62, list(topics), list(topics), limit)
            ).fetchall()
        return [
            Notification(
                id=int(r[0]), originator_id=r[1], originator_version=int(r[2]), topic=r[3], state=bytes(r[4])
            )
            for r in rows
        ]

    def max_notification_id(self) -> int | None:
        return self.store.max_position() or None

    def subscribe(
        self, gt: int | None = None, topics: Sequence[str] = ()
    ) -> Subscription[ApplicationRecorder]:
        raise NotImplementedError(
            "notification ids of the datalayer store are not in commit order; follow the log with "
            "EventStore.read_all(after=LogPosition) instead of eventsourcing subscriptions"
        )


class DatalayerSnapshotRecorder(_ReadsStreams, AggregateRecorder):
    """Stores snapshots in the event store's ``snapshots`` table (one row per stream and version)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        s = sql.Identifier(store.schema)
        self._insert = sql.SQL(
            "INSERT INTO {}.snapshots (stream_id, stream_version, snapshot_type, payload)"
            " SELECT * FROM unnest(%s::uuid[], %s::int8[], %s::text[], %s::bytea[])"
            " ON CONFLICT (stream_id, stream_version) DO NOTHING"
        ).format(s)
        self._select = _StreamSelect(store, "snapshots", "snapshot_type")

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        # A snapshot taken twice at one version is the same state: the second is a no-op.
        if stored_events:
            columns = (
                [_uuid(e.originator_id) for e in stored_events],
                [e.originator_version for e in stored_events],
                [e.topic for e in stored_events],
                [e.state for e in stored_events],
            )
            with self.store.pool.connection() as conn, conn.transaction():
                conn.execute(self._insert, columns)
        return None


class Factory(InfrastructureFactory[TrackingRecorder]):
    """Builds the datalayer recorders from ``DATALAYER_*`` keys of the application's environment.

    Keys: ``DATALAYER_DATABASE_URL``, ``DATALAYER_DATABASE_SSLMODE`` and ``_TLS_CA_FILE``,
    ``_TLS_CERT_FILE``, ``_TLS_KEY_FILE``; ``DATALAYER_EVENTSTORE_SCHEMA`` (default ``datalayer``);
    ``DATALAYER_POOL_SIZE`` (default 16); ``CREATE_TABLE`` (default yes: migrate at start).
    """

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        url = self.env.get(
            "DATALAYER_DATABASE_URL", "postgresql://datalayer:datalayer@127.0.0.1:5432/datalayer"
        )
        tls = libpq_tls_kwargs(
            self.env.get("DATALAYER_DATABASE_SSLMODE"),
            self.env.get("DATALAYER_DATABASE_TLS_CA_FILE"),
            self.env.get("DATALAYER_DATABASE_TLS_CERT_FILE"),
            self.env.get("DATALAYER_DATABASE_TLS_KEY_FILE"),
        )
        self.store = EventStore.connect(
            url.replace("postgresql+psycopg://", "postgresql://", 1),
            schema=self.env.get("DATALAYER_EVENTSTORE_SCHEMA", "datalayer"),
            max_size=int(self.env.get("DATALAYER_POOL_SIZE", "16")),
            connect_kwargs=tls,
        )
        if self.env.get("CREATE_TABLE", "yes").lower() in ("y", "yes", "t", "true", "on", "1"):
            self.store.migrate()

    def mapper(
        self, transcoder: Transcoder | None = None, mapper_class: type[Mapper[Any]] | None = None
    ) -> Mapper[Any]:
        """The library's mapper, sealing the personal fields of events under per-subject data keys.

        The master key comes from ``DATALAYER_MASTER_KEY`` (or ``_FILE``); without it, events without
        personal data are stored as usual and those with it fail, naming the variable. A custom
        ``MAPPER_TOPIC`` class is used as given.
        """
        base = super().mapper(transcoder, mapper_class)
        if type(base) is not Mapper:
            return base
        return personal_data_mapper(base, DataKeys(self.store, MasterKeys.from_env(self.env)))

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        if purpose == "snapshots":
            return DatalayerSnapshotRecorder(self.store)
        return DatalayerApplicationRecorder(self.store)

    def application_recorder(self) -> ApplicationRecorder:
        return DatalayerApplicationRecorder(self.store)

    def tracking_recorder(
        self, tracking_recorder_class: type[TrackingRecorder] | None = None
    ) -> TrackingRecorder:
        raise NotImplementedError("datalayer projections keep their own checkpoints; see projections/")

    def process_recorder(self) -> ProcessRecorder:
        raise NotImplementedError(
            "eventsourcing process applications are not supported by the datalayer store"
        )

    def close(self) -> None:
        self.store.close()
        super().close()


def _uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))
