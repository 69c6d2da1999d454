"""PostgresTarget's deferred commits on the real PostgreSQL: the end of a batch's transaction sent
without waiting, confirmed later, and exact whatever happens in between (errors, a cut connection,
the consumer killed with -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    MetaData,
    Numeric,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    event,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError

from consumers.runtime import ConsumerConfig, ProjectionConsumer, _Batch
from projections.events import ProjectedEvent
from projections.projection import handles
from projections.runner import DeadLetter, SourceItem
from projections.target import BatchConflict
from projections.targets import PostgresTarget, SqlProjection, SqlWrites
from tests.helpers import unique_name, wait_until
from tests.test_postgres_target import (
    DAY,
    Orders,
    StubDecoder,
    apply,
    daily,
    daily_totals,
    make_event,
    new_stream,
    order_rows,
    placed,
)

ROOT = Path(__file__).resolve().parents[1]


def batch_of(streams: list[str]) -> list[SourceItem]:
    """Each stream placed (10.00, counted on DAY) and paid: two events per stream."""
    return [placed(s) for s in streams] + [make_event(s, 2, "Paid") for s in streams]


@pytest.fixture(params=[1, None], ids=["copy", "arrays"])
def target(engine: Engine, request: pytest.FixtureRequest) -> Iterator[PostgresTarget]:
    # Every group of rows goes by COPY (its merge is among the statements a deferred commit sends),
    # or none does (its rows go as array parameters in the pipeline with the commit).
    t = PostgresTarget(
        engine, Orders(decoder=StubDecoder()), schema=unique_name("pgd"), staging_min_rows=request.param
    )
    t.setup()
    yield t
    t.defer_commits(False)
    t.drop()


def assert_applied_once(engine: Engine, target: PostgresTarget, streams: list[str], position: str) -> None:
    rows = order_rows(engine, target)
    assert {s: (r["status"], r["version"]) for s, r in rows.items()} == dict.fromkeys(streams, ("paid", 2))
    assert daily_totals(engine, target) == {DAY: (len(streams), Decimal("10.00") * len(streams))}
    assert {s: target.applied_version(s) for s in streams} == dict.fromkeys(streams, 2)
    assert target.checkpoints() == {"log": position}


def assert_nothing_applied(engine: Engine, target: PostgresTarget, streams: list[str]) -> None:
    assert order_rows(engine, target) == {}
    assert daily_totals(engine, target) == {}
    assert [target.applied_version(s) for s in streams] == [None] * len(streams)
    assert target.checkpoints() == {}


@contextmanager
def merges_held(engine: Engine, target: PostgresTarget) -> Iterator[Connection]:
    """A transaction holding a lock that stops any write to the target's ``daily`` table until the
    block ends: a deferred commit then stays in flight, its merges sent and waiting in the server."""
    with engine.connect() as conn:
        conn.execute(text(f'LOCK TABLE "{target.schema}".daily IN SHARE MODE'))
        yield conn
        conn.rollback()


def backend_waiting_on_daily(engine: Engine) -> int | None:
    """The pid of a backend waiting for a lock to write into a ``daily`` table, if any."""
    with engine.connect() as conn:
        pid: int | None = conn.execute(
            text(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%INSERT INTO %daily%' AND pid <> pg_backend_pid()"
            )
        ).scalar()
        return pid


def backend_gone(engine: Engine, pid: int) -> bool:
    with engine.connect() as conn:
        found = conn.execute(text("SELECT 1 FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid})
        return found.scalar() is None


def test_a_deferred_commit_applies_once_confirmed_and_one_waits_at_a_time(
    engine: Engine, target: PostgresTarget
) -> None:
    streams = [new_stream() for _ in range(3)]
    checked_out = engine.pool.checkedout()  # type: ignore[attr-defined]
    target.defer_commits(True)
    outcome = apply(target, batch_of(streams), "2")
    assert (outcome.applied, outcome.duplicates) == (6, 0)
    assert engine.pool.checkedout() == checked_out + 1  # type: ignore[attr-defined]  # held until confirmed
    with pytest.raises(RuntimeError, match="awaits"):
        apply(target, [placed(new_stream())], "3")
    with pytest.raises(RuntimeError, match="awaits"):
        target.defer_commits(False)
    target.confirm_commit()
    target.confirm_commit()  # nothing awaits: a no-op
    assert engine.pool.checkedout() == checked_out  # type: ignore[attr-defined]
    assert_applied_once(engine, target, streams, "2")

    again = apply(target, batch_of(streams), "3")  # redelivered, deferred again
    target.confirm_commit()
    assert (again.applied, again.duplicates) == (0, 6)
    assert_applied_once(engine, target, streams, "3")


def test_a_deferred_statement_that_fails_raises_when_confirmed_and_leaves_nothing(
    engine: Engine, target: PostgresTarget
) -> None:
    stream = new_stream()
    target.defer_commits(True)
    # The error comes back while the rest is being sent or when the commit is confirmed.
    with pytest.raises(IntegrityError, match="orders"):
        with target.batch() as batch:
            assert batch.applied_versions([stream]) == {}
            batch.writes.upsert(daily, {"day": DAY, "revenue": Decimal(1)})  # NOT NULL "orders" left out
            batch.commit({stream: 1}, {"log": "1"})
        target.confirm_commit()
    target.confirm_commit()  # nothing awaits either way
    assert_nothing_applied(engine, target, [stream])

    # The target, and the connection the failed commit gave back, work on.
    streams = [new_stream() for _ in range(6)]
    for part in (streams[:3], streams[3:]):
        apply(target, batch_of(part), "2")
        target.confirm_commit()
    assert_applied_once(engine, target, streams, "2")


def test_a_deferred_batch_that_lost_the_race_conflicts_and_writes_nothing(
    engine: Engine, target: PostgresTarget
) -> None:
    streams = [new_stream() for _ in range(4)]
    apply(target, [make_event(s, 1, "Counted") for s in streams], "1")
    other = PostgresTarget(engine, target.projection, schema=target.schema)  # a second process
    target.defer_commits(True)
    # The versions go with the deferred statements: the conflict shows while they are sent or when
    # the commit is confirmed.
    with pytest.raises(BatchConflict):
        with target.batch() as batch:
            assert batch.applied_versions(streams) == dict.fromkeys(streams, 1)
            batch.writes.increment(daily, {"day": DAY}, {"orders": 1, "revenue": Decimal(1)})
            apply(other, [make_event(s, 2, "Counted") for s in streams], "b")
            batch.commit(dict.fromkeys(streams, 2), {"log": "a"})
        target.confirm_commit()
    target.confirm_commit()  # nothing awaits either way
    assert daily_totals(engine, target) == {DAY: (8, Decimal(8))}
    assert {target.applied_version(s) for s in streams} == {2}
    assert target.checkpoints() == {"log": "b"}

    # Retried through the runner, the same events are recognised as applied.
    again = apply(target, [make_event(s, 2, "Counted") for s in streams], "a")
    target.confirm_commit()
    assert (again.applied, again.duplicates) == (0, 4)


def test_a_deferred_batch_whose_new_streams_another_process_applied_conflicts(
    engine: Engine, target: PostgresTarget
) -> None:
    streams = [new_stream() for _ in range(3)]
    other = PostgresTarget(engine, target.projection, schema=target.schema)  # a second process
    target.defer_commits(True)
    with pytest.raises(BatchConflict):
        with target.batch() as batch:
            assert batch.applied_versions(streams) == {}
            batch.writes.increment(daily, {"day": DAY}, {"orders": 1, "revenue": Decimal(1)})
            apply(other, [make_event(s, 1, "Counted") for s in streams], "b")
            batch.commit(dict.fromkeys(streams, 1), {"log": "a"})
        target.confirm_commit()
    target.confirm_commit()
    assert daily_totals(engine, target) == {DAY: (3, Decimal(3))}
    assert target.checkpoints() == {"log": "b"}


def test_the_consumer_applies_again_a_batch_whose_connection_was_cut_mid_commit(
    engine: Engine, target: PostgresTarget
) -> None:
    streams = [new_stream() for _ in range(3)]
    items = batch_of(streams)
    consumer = ProjectionConsumer(target.projection, target, {}, ConsumerConfig(initial_backoff=0.01))
    dead: list[DeadLetter] = []
    stop = threading.Event()
    target.defer_commits(True)
    with merges_held(engine, target):
        outcome = consumer._apply(items, {"log": "2"}, dead.extend, stop)  # type: ignore[arg-type]
        assert outcome.applied == 6
        pid = wait_until(lambda: backend_waiting_on_daily(engine), what="the deferred merge to wait")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    wait_until(lambda: backend_gone(engine, pid), what="the cut backend to go")
    assert_nothing_applied(engine, target, streams)  # cut before its COMMIT ran

    consumer._unconfirmed = _Batch(items, {"log": "2"}, {}, outcome, 0.0)
    consumer._confirm(dead.extend, stop)  # type: ignore[arg-type]  # fails, so applies it again
    assert consumer._unconfirmed is None
    assert (consumer.stats.applied, consumer.stats.duplicates, dead) == (6, 0, [])
    assert_applied_once(engine, target, streams, "2")


def test_a_consumer_killed_mid_commit_leaves_the_batch_applied_once_after_a_restart(
    engine: Engine, target: PostgresTarget
) -> None:
    streams = [new_stream() for _ in range(3)]
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.deferred_commit_process",
            target.schema,
            str(target.staging_min_rows).lower(),
            *streams,
        ],
        cwd=ROOT,
        env=dict(os.environ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with merges_held(engine, target):
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "sent"
            pid = wait_until(lambda: backend_waiting_on_daily(engine), what="the deferred merge to wait")
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=30) == -signal.SIGKILL
        # The lock released, the server runs what it received, COMMIT included, or gives it up:
        # either way all of the batch or none of it, its checkpoint with it.
        wait_until(lambda: backend_gone(engine, pid), what="the killed consumer's backend to go")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    if target.checkpoints():
        assert_applied_once(engine, target, streams, "2")
    else:
        assert_nothing_applied(engine, target, streams)

    # Restarted, the consumer gets the batch again (from the checkpoint, or redelivered).
    target.defer_commits(True)
    apply(target, batch_of(streams), "2")
    target.confirm_commit()
    assert_applied_once(engine, target, streams, "2")


class Reversed(TypeDecorator[str]):
    """Text stored reversed: a column type with bind and result processors of its own."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else value[::-1]

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else value[::-1]


tagged_metadata = MetaData()
tagged = Table(
    "tagged",
    tagged_metadata,
    Column("id", Uuid, primary_key=True),
    Column("tag", Reversed),
    Column("amount", Numeric(12, 2)),
    Column("copied", Text),
    Column("version", BigInteger),
)


class Tagged(SqlProjection):
    """Each stream's first event sets its tag; the next one copies the tag it reads back."""

    name = "test_tagged"
    stream_types = ("Order",)
    metadata = tagged_metadata
    prefetch = ("tagged",)

    @handles("Tagged")
    def tag(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        data = event.data
        values = {"tag": data["tag"], "amount": Decimal(data["amount"]), "version": event.stream_version}
        writes.upsert(tagged, {"id": event.stream_id, **values})

    @handles("Copied")
    def copy(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        row = writes.get(tagged, {"id": event.stream_id})
        assert row is not None
        copied = f"{row['tag']} {row['amount']}"
        writes.upsert(tagged, {**row, "copied": copied, "version": event.stream_version})


def test_prefetched_rows_read_in_a_pipeline_come_back_through_their_column_types(engine: Engine) -> None:
    target = PostgresTarget(engine, Tagged(decoder=StubDecoder()), schema=unique_name("pgp"))
    target.setup()
    try:
        stream = new_stream()
        apply(target, [make_event(stream, 1, "Tagged", {"tag": "abc", "amount": "1.50"})], "1")
        with engine.connect() as conn:
            stored = conn.execute(text(f'SELECT tag::text FROM "{target.schema}".tagged')).scalar()
        assert stored == "cba"  # the bind processor ran on the way in
        # The next batch reads the row back (the prefetch, in the pipeline with the versions).
        target.defer_commits(True)
        apply(target, [make_event(stream, 2, "Copied")], "2")
        target.confirm_commit()
        with engine.connect() as conn:
            conn.execution_options(schema_translate_map={None: target.schema})
            row = conn.execute(select(tagged)).one()
        assert (row.tag, row.amount, row.copied, row.version) == ("abc", Decimal("1.50"), "abc 1.50", 2)
    finally:
        target.defer_commits(False)
        target.drop()


def test_a_small_deferred_batch_sends_every_statement_in_two_pipelines(engine: Engine) -> None:
    """Its reads in one round trip, then its rows (array parameters) with the versions and the
    COMMIT: nothing executed one statement at a time, each waiting for its own round trip."""
    target = PostgresTarget(engine, Orders(decoder=StubDecoder()), schema=unique_name("pgs"))
    target.setup()
    executed: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        executed.append(statement)

    try:
        streams = [new_stream() for _ in range(3)]
        target.defer_commits(True)
        event.listen(engine, "before_cursor_execute", count)
        try:
            outcome = apply(target, batch_of(streams), "2")
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert (outcome.applied, executed) == (6, [])
        target.confirm_commit()
        assert_applied_once(engine, target, streams, "2")
    finally:
        target.defer_commits(False)
        target.drop()
