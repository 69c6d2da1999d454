"""The event store on real PostgreSQL: concurrency, idempotence, append-only history, migrations."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from datalayer.clients import postgres_connection
from datalayer.settings import Settings
from eventstore import (
    ConcurrencyError,
    EventMetadata,
    EventStore,
    LogFollower,
    MigrationError,
    NewEvent,
    StreamAppend,
)
from eventstore.migrations import available_migrations, current_version, migrate
from eventstore.records import LogPosition, RecordedEvent
from tests.helpers import read_all_settled, unique_name, wait_until


def new_events(n: int, kind: str = "Happened") -> list[NewEvent]:
    return [NewEvent(uuid.uuid4(), kind, f'{{"n": {i}}}'.encode()) for i in range(n)]


def test_racing_writers_exactly_one_wins(store: EventStore) -> None:
    stream = uuid.uuid4()
    store.append(stream, "Account", new_events(1), 0)
    barrier = threading.Barrier(2)
    outcomes: list[object] = []

    def write() -> None:
        barrier.wait()
        try:
            outcomes.append(store.append(stream, "Account", new_events(2), 1))
        except ConcurrencyError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in outcomes if isinstance(o, ConcurrencyError)]
    assert len(errors) == 1 and len(outcomes) == 2
    assert errors[0].stream_id == stream
    assert (errors[0].expected_version, errors[0].actual_version) == (1, 3)
    assert str(stream) in str(errors[0]) and "version 1" in str(errors[0]) and "version 3" in str(errors[0])
    assert [e.stream_version for e in store.read_stream(stream)] == [1, 2, 3]


def test_expected_version_ahead_of_stream_is_a_conflict(store: EventStore) -> None:
    stream = uuid.uuid4()
    store.append(stream, "Account", new_events(2), 0)
    with pytest.raises(ConcurrencyError) as info:
        store.append(stream, "Account", new_events(1), 5)
    assert (info.value.expected_version, info.value.actual_version) == (5, 2)
    assert store.stream_version(stream) == 2


def test_multi_stream_append_is_atomic(store: EventStore) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    store.append(b, "Product", new_events(1), 0)
    with pytest.raises(ConcurrencyError) as info:
        store.append_streams(
            [
                StreamAppend(a, "Order", 0, tuple(new_events(2))),
                StreamAppend(b, "Product", 0, tuple(new_events(1))),  # b is at 1, not 0
            ]
        )
    assert info.value.stream_id == b
    assert store.read_stream(a) == []  # nothing of the failed transaction was written
    results = store.append_streams(
        [
            StreamAppend(a, "Order", 0, tuple(new_events(2))),
            StreamAppend(b, "Product", 1, tuple(new_events(1))),
        ]
    )
    assert [(r.stream_id, r.version, len(r.positions)) for r in results] == [(a, 2, 2), (b, 2, 1)]
    assert results[0].positions[0] < results[0].positions[1] < results[1].positions[0]


def test_read_all_of_some_stream_types_keeps_their_commit_order(store: EventStore) -> None:
    order, product, customer = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for _ in range(3):
        for stream_id, stream_type in ((order, "Order"), (product, "Product"), (customer, "Customer")):
            store.append(stream_id, stream_type, new_events(2), store.stream_version(stream_id))
    everything = read_all_settled(store, 18)
    wanted = [e for e in everything if e.stream_type in ("Order", "Customer")]
    assert len(wanted) == 12 and len(everything) == 18
    assert store.read_all(limit=100, stream_types=["Order", "Customer"]) == wanted
    assert store.read_all(limit=100, stream_types=["Product"]) == [
        e for e in everything if e.stream_type == "Product"
    ]
    # Resuming after a position skips the other types' events in between, and nothing else.
    first = store.read_all(limit=5, stream_types=["Order", "Customer"])
    rest = store.read_all(after=first[-1].log_position, limit=100, stream_types=["Order", "Customer"])
    assert first + rest == wanted
    assert store.read_all(limit=100, stream_types=["Nothing"]) == []


def test_resubmitting_the_same_events_is_a_no_op(store: EventStore) -> None:
    stream = uuid.uuid4()
    events = new_events(3)
    first = store.append(stream, "Cart", events, 0)
    again = store.append(stream, "Cart", events, 0)
    assert len(first.positions) == 3 and again.positions == ()
    assert again.version == 3
    assert len(store.read_stream(stream)) == 3
    assert len(read_all_settled(store, 3)) == 3


def test_metadata_and_schema_version_are_stored(store: EventStore) -> None:
    stream = uuid.uuid4()
    meta = EventMetadata(
        correlation_id="c-1", causation_id="cmd-9", actor="alice", tenant="acme", extra={"ip": "x"}
    )
    store.append(
        stream, "Cart", [NewEvent(uuid.uuid4(), "ItemAdded", b"{}", schema_version=3, metadata=meta)], 0
    )
    (event,) = store.read_stream(stream)
    assert event.metadata == meta
    assert (event.stream_type, event.event_type, event.schema_version) == ("Cart", "ItemAdded", 3)


def test_read_stream_ranges_and_time_travel(store: EventStore) -> None:
    stream = uuid.uuid4()
    store.append(stream, "Counter", new_events(3), 0)
    wait_until(lambda: time.sleep(0.01) is None, timeout=1)  # let now() move on between transactions
    middle = store.read_stream(stream)[-1].recorded_at
    store.append(stream, "Counter", new_events(4), 3)
    assert [e.stream_version for e in store.read_stream(stream, 2, 5)] == [2, 3, 4, 5]
    assert [e.stream_version for e in store.read_stream(stream, desc=True, limit=2)] == [7, 6]
    assert store.version_at(stream, middle) == 3
    assert store.version_at(stream, middle.replace(year=2000)) == 0


def test_history_is_append_only_in_the_database(store: EventStore, settings: Settings) -> None:
    store.append(uuid.uuid4(), "Thing", new_events(2), 0)
    table = sql.Identifier(store.schema, "events")
    with postgres_connection(settings, autocommit=True) as conn:
        for statement in (
            sql.SQL("UPDATE {} SET event_type = 'Forged'").format(table),
            sql.SQL("DELETE FROM {}").format(table),
            sql.SQL("TRUNCATE {}").format(table),
        ):
            with pytest.raises(psycopg.DatabaseError, match="append-only") as info:
                conn.execute(statement)
            assert info.value.sqlstate == "DL002"
    assert len(read_all_settled(store, 2)) == 2


def test_migrations_from_empty_then_rerun_then_refuse_edits(settings: Settings) -> None:
    schema = unique_name("mig")
    with postgres_connection(settings, autocommit=True) as conn:
        try:
            assert current_version(conn, schema) == 0
            newest = [m.version for m in available_migrations()]
            assert [m.version for m in migrate(conn, schema)] == newest
            assert migrate(conn, schema) == []
            assert current_version(conn, schema) == newest[-1]
            conn.execute(
                sql.SQL("UPDATE {} SET checksum = 'edited' WHERE version = 1").format(
                    sql.Identifier(schema, "schema_migrations")
                )
            )
            with pytest.raises(MigrationError, match="never be edited"):
                migrate(conn, schema)
        finally:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_concurrent_migrators_apply_once(settings: Settings) -> None:
    schema = unique_name("mig")
    applied: list[int] = []

    def run() -> None:
        with postgres_connection(settings, autocommit=True) as conn:
            applied.extend(m.version for m in migrate(conn, schema))

    try:
        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert applied == [m.version for m in available_migrations()]  # each once, by one migrator
    finally:
        with postgres_connection(settings, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_batch_import_and_its_guard(store: EventStore) -> None:
    streams = [uuid.uuid4() for _ in range(50)]
    rows = [(s, "Imported", v, e) for s in streams for v, e in enumerate(new_events(20), start=1)]
    assert store.import_events(rows) == 1000
    assert store.stream_version(streams[7]) == 20
    gap = [(uuid.uuid4(), "Imported", v, e) for v, e in zip((1, 3), new_events(2), strict=True)]
    with pytest.raises(psycopg.DatabaseError, match="no version 2"):
        store.import_events(gap)
    assert len(read_all_settled(store, 1000)) == 1000  # the failed import left nothing
    tagged = NewEvent(uuid.uuid4(), "Imported", b"{}", metadata=EventMetadata(actor="importer"))
    store.import_events([(uuid.uuid4(), "Imported", 1, tagged)])
    with store.pool.connection() as conn:
        row = conn.execute(
            sql.SQL("SELECT jsonb_typeof(metadata), metadata->>'actor' FROM {} WHERE event_id = %s").format(
                sql.Identifier(store.schema, "events")
            ),
            (tagged.event_id,),
        ).fetchone()
    assert row == ("object", "importer")  # a JSON object, queryable, not a JSON string


def test_horizon_names_the_transaction_holding_readers_back(store: EventStore, settings: Settings) -> None:
    early = uuid.uuid4()
    with postgres_connection(settings, autocommit=True) as holder, holder.transaction():
        store.append_in(holder, [StreamAppend(early, "Slow", 0, tuple(new_events(1)))])  # not committed
        holder_pid = holder.info.backend_pid
        late = store.append(uuid.uuid4(), "Fast", new_events(1), 0)
        assert store.read_all() == []  # the committed event waits behind the open transaction
        horizon = wait_until(lambda: (h := store.horizon()).blocking_pid == holder_pid and h, what="stall")
        assert horizon.stalled and horizon.held_back_events == 1
        assert horizon.blocking_seconds >= 0
    seen = read_all_settled(store, 2)
    assert {e.position for e in seen} == {late.positions[0], *[e.position for e in store.read_stream(early)]}
    assert not store.horizon().stalled


def test_follower_is_woken_by_notify_not_the_poll(store: EventStore) -> None:
    follower = LogFollower(store, poll_interval=60.0)
    stop = threading.Event()
    received: list[Any] = []

    def follow() -> None:
        for batch in follower.batches(stop):
            received.extend(batch)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    wait_until(lambda: follower.listening, what="the follower to listen")
    started = time.monotonic()
    store.append(uuid.uuid4(), "Ping", new_events(3), 0)
    wait_until(lambda: len(received) == 3, timeout=10, what="the follower to receive")
    assert time.monotonic() - started < 10  # far below the 60 s poll: the notification woke it
    stop.set()
    store.append(uuid.uuid4(), "Ping", new_events(1), 0)  # wakes it to see the stop
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_follower_looks_again_for_announced_events_the_horizon_held_back(
    store: EventStore, settings: Settings
) -> None:
    """An event whose notification came while an older transaction held the read horizon is read
    soon after that transaction ends, though it ends without writing an event (so without a
    notification of its own) and the poll is a minute away."""
    reads = [0]

    def read(after: LogPosition, limit: int) -> list[RecordedEvent]:
        reads[0] += 1
        return store.read_all(after=after, limit=limit)

    follower = LogFollower(store, poll_interval=60.0, read=read, position_of=lambda e: e.log_position)
    stop = threading.Event()
    received: list[Any] = []
    thread = threading.Thread(
        target=lambda: [received.extend(b) for b in follower.batches(stop)], daemon=True
    )
    thread.start()
    wait_until(lambda: follower.listening and reads[0] == 1, what="the follower to listen")
    with postgres_connection(settings, autocommit=True) as holder:
        with holder.transaction():
            holder.execute("SELECT pg_current_xact_id()")  # holds an id, writes no event
            late = store.append(uuid.uuid4(), "Late", new_events(1), 0)  # committed and notified
            assert store.horizon().held_back_events == 1
            wait_until(lambda: reads[0] >= 2, what="the follower to read after the notification")
            assert received == []
        started = time.monotonic()  # the holder ended: no event, no notification
        wait_until(lambda: len(received) == 1, timeout=20, what="the follower to look again")
    assert time.monotonic() - started < 20  # far below the 60 s poll
    assert received[0].position == late.positions[0]
    stop.set()
    store.append(uuid.uuid4(), "Ping", new_events(1), 0)  # wakes it to see the stop
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_stream_cannot_continue_in_an_older_transaction(store: EventStore, settings: Settings) -> None:
    """The guard that keeps log order equal to version order: an older transaction may not follow."""
    shared = uuid.uuid4()
    with postgres_connection(settings, autocommit=True) as older, older.transaction():
        store.append_in(older, [StreamAppend(uuid.uuid4(), "Other", 0, tuple(new_events(1)))])  # takes an id
        store.append(shared, "Shared", new_events(1), 0)  # a younger transaction writes version 1
        with pytest.raises(ConcurrencyError) as info:
            store.append_in(older, [StreamAppend(shared, "Shared", 1, tuple(new_events(1)))])
        assert info.value.stream_id == shared
    assert [e.stream_version for e in store.read_stream(shared)] == [1]


def test_follower_without_a_notification_still_sees_events_by_polling(
    store: EventStore, settings: Settings
) -> None:
    follower = LogFollower(store, poll_interval=0.2)
    stop = threading.Event()
    received: list[Any] = []
    thread = threading.Thread(
        target=lambda: [received.extend(b) for b in follower.batches(stop)], daemon=True
    )
    thread.start()
    wait_until(lambda: follower.listening, what="the follower to listen")
    with postgres_connection(settings, autocommit=True) as conn, conn.transaction():
        store.append_in(conn, [StreamAppend(uuid.uuid4(), "Quiet", 0, tuple(new_events(2)))])  # no NOTIFY
    wait_until(lambda: len(received) == 2, timeout=10, what="the poll to pick the events up")
    stop.set()
    thread.join(timeout=10)
