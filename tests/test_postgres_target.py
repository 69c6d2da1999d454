"""PostgresTarget and SqlWrites on the real PostgreSQL, driven through the runner's apply_batch."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Date,
    Engine,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    Uuid,
    delete,
    event,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError, ProgrammingError

from projections.events import ProjectedEvent
from projections.projection import handles
from projections.runner import BatchOutcome, DeadLetter, SourceItem, apply_batch
from projections.target import BatchConflict, TargetBatch, TargetReadFailed
from projections.targets import PostgresTarget, SqlProjection, SqlWrites
from projections.targets.postgres import _PostgresBatch
from tests.helpers import unique_name

metadata = MetaData()
orders = Table(
    "orders",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("status", Text),
    Column("total", Numeric(12, 2)),
    Column("lines", JSONB),
    Column("version", BigInteger),
)
daily = Table(
    "daily",
    metadata,
    Column("day", Date, primary_key=True),
    Column("orders", BigInteger, nullable=False),
    Column("revenue", Numeric(14, 2), nullable=False),
)
notes = Table("notes", metadata, Column("id", Text, primary_key=True), Column("note", Text))

DAY = date(2024, 5, 1)
POISON_DAY = date(2024, 5, 2)


class StubDecoder:
    """Accepts every event; its payload is the raw JSON."""

    def check(self, event: ProjectedEvent) -> None:
        pass

    def bind(self, event: ProjectedEvent) -> None:
        event._decode = lambda e: e.raw_payload


class Orders(SqlProjection):
    name = "test_orders"
    stream_types = ("Order",)
    metadata = metadata
    prefetch = ("orders",)

    @handles("Placed")
    def placed(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        total = Decimal(event.data["total"])
        writes.upsert(
            orders,
            {
                "id": event.stream_id,
                "status": "placed",
                "total": total,
                "lines": event.data.get("lines", {}),
                "version": event.stream_version,
            },
        )
        writes.increment(daily, {"day": DAY}, {"orders": 1, "revenue": total})

    @handles("Paid")
    def paid(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        row = writes.get(orders, {"id": event.stream_id})
        if row is None:
            raise LookupError(f"no order {event.stream_id}")
        writes.upsert(orders, {**row, "status": "paid", "version": event.stream_version})

    @handles("Counted")
    def counted(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        writes.upsert(orders, {"id": event.stream_id, "status": "counted", "version": event.stream_version})
        writes.increment(daily, {"day": DAY}, {"orders": 1, "revenue": Decimal(1)})

    @handles("Noted")
    def noted(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        # notes is not prefetched: get() reads the row from PostgreSQL.
        row = writes.get(notes, {"id": event.stream_id}) or {"id": event.stream_id, "note": ""}
        writes.upsert(notes, {**row, "note": f"{row['note']}+{event.stream_version}"})

    @handles("Poison")
    def poison(self, event: ProjectedEvent, writes: SqlWrites) -> None:
        # Touches a pending row, an existing aggregate and a new one before failing.
        writes.upsert(orders, {"id": event.stream_id, "status": "poisoned"})
        writes.increment(daily, {"day": DAY}, {"orders": 100, "revenue": Decimal(100)})
        writes.increment(daily, {"day": POISON_DAY}, {"orders": 1, "revenue": Decimal(1)})
        raise RuntimeError("boom")


def make_event(
    stream_id: str, version: int, event_type: str, payload: dict[str, Any] | None = None
) -> SourceItem:
    event = ProjectedEvent(
        stream_id=stream_id,
        stream_type="Order",
        stream_version=version,
        event_id=str(uuid.uuid4()),
        event_type=event_type,
        schema_version=1,
        position=version,
        transaction_id=1,
        recorded_at=datetime.now(UTC),
        metadata={},
        payload_encoding="json",
        raw_payload=payload or {},
    )
    return SourceItem(event=event, original=f"{stream_id}/{version}")


def placed(stream_id: str, total: str = "10.00") -> SourceItem:
    return make_event(stream_id, 1, "Placed", {"total": total, "lines": {"p1": {"quantity": 2}}})


def new_stream() -> str:
    return str(uuid.uuid4())


class Sink:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    def __call__(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)


def apply(
    target: Any, items: Sequence[SourceItem], position: str = "1", sink: Sink | None = None
) -> BatchOutcome:
    projection = target.projection
    return apply_batch(projection, target, items, {"log": position}, sink if sink is not None else Sink())


def daily_totals(engine: Engine, target: PostgresTarget) -> dict[date, tuple[int, Decimal]]:
    with connect(engine, target) as conn:
        return {day: (count, revenue) for day, count, revenue in conn.execute(select(daily))}


def order_rows(engine: Engine, target: PostgresTarget) -> dict[str, dict[str, Any]]:
    with connect(engine, target) as conn:
        return {str(row.id): dict(row._mapping) for row in conn.execute(select(orders))}


@contextmanager
def connect(engine: Engine, target: PostgresTarget) -> Iterator[Connection]:
    with engine.connect() as conn:
        conn.execution_options(schema_translate_map={None: target.schema})
        yield conn


@pytest.fixture
def target(engine: Engine) -> Iterator[PostgresTarget]:
    t = PostgresTarget(engine, Orders(decoder=StubDecoder()), schema=unique_name("pgt"))
    t.setup()
    yield t
    t.drop()


def test_schema_defaults_to_qualified_name_and_is_validated(engine: Engine) -> None:
    projection = Orders(decoder=StubDecoder())
    assert PostgresTarget(engine, projection).schema == "test_orders_v1"
    for bad in ("bad-name", "x" * 64, "", "pg_things", 'a"b'):
        with pytest.raises(ValueError, match="schema name"):
            PostgresTarget(engine, projection, schema=bad)


def test_setup_is_idempotent_and_safe_to_race(engine: Engine) -> None:
    projection = Orders(decoder=StubDecoder())
    targets = [PostgresTarget(engine, projection, schema=unique_name("pgt_race")) for _ in range(3)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def set_up(t: PostgresTarget) -> None:
        try:
            barrier.wait(timeout=30)
            t.setup()
        except BaseException as exc:
            errors.append(exc)

    try:
        for t in targets:
            threads = [threading.Thread(target=set_up, args=(t,)) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            t.setup()  # and again, idempotently
        assert errors == []
        assert targets[0].checkpoints() == {}
    finally:
        for t in targets:
            t.drop()


def test_batch_applies_writes_versions_and_checkpoints(engine: Engine, target: PostgresTarget) -> None:
    a, b = new_stream(), new_stream()
    sink = Sink()
    outcome = apply(target, [placed(a, "10.00"), placed(b, "2.50"), make_event(a, 2, "Paid")], "42", sink)

    assert (outcome.applied, outcome.duplicates, sink.letters) == (3, 0, [])
    rows = order_rows(engine, target)
    assert rows[a]["status"] == "paid" and rows[a]["version"] == 2 and rows[a]["total"] == Decimal("10.00")
    assert rows[a]["lines"] == {"p1": {"quantity": 2}}
    assert rows[b]["status"] == "placed"
    assert daily_totals(engine, target) == {DAY: (2, Decimal("12.50"))}
    assert target.applied_version(a) == 2
    assert target.applied_version(b) == 1
    assert target.applied_version(new_stream()) is None
    assert target.checkpoints() == {"log": "42"}


def test_redelivered_batch_is_skipped(engine: Engine, target: PostgresTarget) -> None:
    a, b = new_stream(), new_stream()
    items = [placed(a), placed(b), make_event(a, 2, "Counted")]
    apply(target, items, "1")
    before = (order_rows(engine, target), daily_totals(engine, target))

    again = apply(target, items, "2")

    assert (again.applied, again.duplicates) == (0, 3)
    assert (order_rows(engine, target), daily_totals(engine, target)) == before
    assert daily_totals(engine, target)[DAY][0] == 3
    assert target.checkpoints() == {"log": "2"}


def test_version_gap_is_dead_lettered_and_not_applied(engine: Engine, target: PostgresTarget) -> None:
    a = new_stream()
    sink = Sink()
    outcome = apply(target, [placed(a), make_event(a, 3, "Counted")], sink=sink)

    assert outcome.applied == 1
    assert [(letter.reason, letter.original) for letter in sink.letters] == [("version_gap", f"{a}/3")]
    assert target.applied_version(a) == 1
    assert order_rows(engine, target)[a]["status"] == "placed"
    assert daily_totals(engine, target) == {DAY: (1, Decimal("10.00"))}


def test_poison_handler_is_dead_lettered_with_its_writes_discarded(
    engine: Engine, target: PostgresTarget
) -> None:
    a, b = new_stream(), new_stream()
    sink = Sink()
    items = [placed(a, "10.00"), make_event(a, 2, "Poison"), make_event(a, 3, "Paid"), placed(b, "1.00")]
    outcome = apply(target, items, sink=sink)

    assert outcome.applied == 4
    assert [(letter.reason, letter.original) for letter in sink.letters] == [("poison", f"{a}/2")]
    assert "boom" in sink.letters[0].error
    rows = order_rows(engine, target)
    assert rows[a]["status"] == "paid" and rows[a]["version"] == 3
    assert rows[b]["status"] == "placed"
    # Neither the +100 on the existing aggregate nor the new POISON_DAY row survived.
    assert daily_totals(engine, target) == {DAY: (2, Decimal("11.00"))}
    assert target.applied_version(a) == 3


def test_events_are_kept_apart_only_in_a_batch_whose_handler_raised(
    engine: Engine, target: PostgresTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Remembering each event's changes costs every event, for handlers that almost never fail: a
    batch is applied without it first, and again, isolated, only if a handler raised."""
    starts: list[str] = []
    original = _PostgresBatch.start_event

    def start_event(self: _PostgresBatch) -> None:
        starts.append("start")
        original(self)

    monkeypatch.setattr(_PostgresBatch, "start_event", start_event)
    a, b = new_stream(), new_stream()

    apply(target, [placed(a), make_event(a, 2, "Paid")])
    assert starts == []

    sink = Sink()
    outcome = apply(target, [placed(b), make_event(b, 2, "Poison"), make_event(b, 3, "Paid")], "2", sink)
    assert len(starts) == 3  # the second attempt only, one per handled event
    assert outcome.applied == 3 and [letter.reason for letter in sink.letters] == ["poison"]
    assert order_rows(engine, target)[b]["status"] == "paid"
    assert target.checkpoints() == {"log": "2"}


def test_failure_during_commit_leaves_neither_writes_nor_checkpoints(
    engine: Engine, target: PostgresTarget
) -> None:
    a = new_stream()
    items = [placed(a), make_event(a, 2, "Paid")]
    projection = target.projection
    with pytest.raises(IntegrityError):
        # The checkpoint is written last, after the writes and versions: NOT NULL fails it.
        apply_batch(projection, target, items, {"log": None}, Sink())

    assert order_rows(engine, target) == {}
    assert daily_totals(engine, target) == {}
    assert target.applied_version(a) is None
    assert target.checkpoints() == {}

    outcome = apply(target, items, "7")
    assert outcome.applied == 2
    assert order_rows(engine, target)[a]["status"] == "paid"
    assert target.checkpoints() == {"log": "7"}


class GatedTarget:
    """Delegates to a PostgresTarget, holding each first commit at a barrier so that both batches are
    computed from the same versions before either commits."""

    def __init__(self, inner: PostgresTarget, barrier: threading.Barrier) -> None:
        self.inner = inner
        self.projection = inner.projection
        self.barrier = barrier
        self.attempts = 0

    @contextmanager
    def batch(self) -> Iterator[Any]:
        self.attempts += 1
        with self.inner.batch() as batch:
            yield GatedBatch(batch, self.barrier if self.attempts == 1 else None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class GatedBatch:
    def __init__(self, inner: TargetBatch[SqlWrites], barrier: threading.Barrier | None) -> None:
        self.inner = inner
        self.barrier = barrier

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def commit(self, versions: Any, checkpoints: Any) -> None:
        if self.barrier is not None:
            self.barrier.wait(timeout=30)
        self.inner.commit(versions, checkpoints)


def run_threads(*jobs: Any) -> list[Any]:
    results: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_concurrent_batches_of_new_streams_apply_each_event_once(
    engine: Engine, target: PostgresTarget
) -> None:
    streams = [new_stream() for _ in range(20)]
    first = [make_event(s, v, "Counted") for v in range(1, 4) for s in streams]
    second = [make_event(s, v, "Counted") for v in range(1, 6) for s in streams]
    barrier = threading.Barrier(2)
    gated = [GatedTarget(target, barrier), GatedTarget(target, barrier)]

    results = run_threads(lambda: apply(gated[0], first, "a"), lambda: apply(gated[1], second, "b"))

    assert not any(isinstance(r, BaseException) for r in results), results
    # Both computed from "no versions", so exactly one of them conflicted and was retried.
    assert sorted(g.attempts for g in gated) == [1, 2]
    assert sum(r.applied for r in results) == 100
    assert daily_totals(engine, target) == {DAY: (100, Decimal(100))}
    assert {target.applied_version(s) for s in streams} == {5}
    assert {row["version"] for row in order_rows(engine, target).values()} == {5}


def test_fresh_streams_are_not_read_and_one_applied_already_is_read_on_the_retry(
    engine: Engine, target: PostgresTarget
) -> None:
    """With ``fresh_streams`` (a replay), a stream whose first event in the batch is version 1 is
    taken as never applied, without a read. One that was applied after all (a replay over a read
    model a consumer fed) fails the versions INSERT, and the batch applied again reads it: nothing
    is applied twice."""
    done, fresh = [new_stream() for _ in range(3)], [new_stream() for _ in range(3)]
    assert apply(target, [placed(s) for s in done]).applied == 3
    reads: list[list[str]] = []

    @contextmanager
    def counting() -> Iterator[Any]:
        with target.batch() as batch:
            read = batch.applied_versions

            def applied_versions(stream_ids: Any, fresh: Any = ()) -> dict[str, int]:
                reads.append(sorted(set(stream_ids) - set(fresh)))
                return read(stream_ids, fresh)

            batch.applied_versions = applied_versions  # type: ignore[method-assign]
            yield batch

    spy = type("Spy", (), {"projection": target.projection, "batch": staticmethod(counting)})()
    items = [placed(s) for s in fresh] + [make_event(s, 2, "Paid") for s in fresh]
    outcome = apply_batch(target.projection, spy, items, {"log": "2"}, Sink(), fresh_streams=True)
    assert (outcome.applied, outcome.duplicates) == (6, 0)
    assert reads == [[]]  # all three fresh: nothing read

    again = [placed(s) for s in done + fresh] + [make_event(s, 3, "Paid") for s in fresh]
    outcome = apply_batch(target.projection, spy, again, {"log": "3"}, Sink(), fresh_streams=True)
    assert (outcome.applied, outcome.duplicates) == (3, 6)
    assert reads[1:] == [[], sorted(done + fresh)]  # taken as fresh, conflicted, read on the retry
    assert daily_totals(engine, target) == {DAY: (6, Decimal("60.00"))}
    assert {target.applied_version(s) for s in done} == {1}
    assert {target.applied_version(s) for s in fresh} == {3}
    assert {row["status"] for row in order_rows(engine, target).values()} == {"placed", "paid"}


def test_a_batch_whose_known_streams_moved_meanwhile_conflicts_and_writes_nothing(
    engine: Engine, target: PostgresTarget
) -> None:
    streams = [new_stream() for _ in range(10)]
    apply(target, [make_event(s, 1, "Counted") for s in streams])
    later = [make_event(s, v, "Counted") for v in (2, 3) for s in streams]
    other = PostgresTarget(engine, target.projection, schema=target.schema)  # a second process

    with target.batch() as batch:
        # Versions are read without a lock: the batch holds no transaction id while handlers run.
        assert batch.applied_versions(streams) == dict.fromkeys(streams, 1)
        for _ in streams:
            batch.writes.increment(daily, {"day": DAY}, {"orders": 1, "revenue": Decimal(1)})
        outcome = apply(other, later, "b")  # another process applies versions 2 and 3 meanwhile
        assert (outcome.applied, outcome.duplicates) == (20, 0)
        with pytest.raises(BatchConflict):
            batch.commit(dict.fromkeys(streams, 2), {"log": "a"})

    # The conflicting batch left nothing: its increments and versions were rolled back.
    assert daily_totals(engine, target) == {DAY: (30, Decimal(30))}
    assert {target.applied_version(s) for s in streams} == {3}
    # Retried through the runner, the same events are recognised as applied.
    again = apply(target, [make_event(s, 2, "Counted") for s in streams], "a")
    assert (again.applied, again.duplicates) == (0, 10)


def test_get_sees_pending_writes_and_prefetched_rows_without_round_trips(
    engine: Engine, target: PostgresTarget
) -> None:
    a, absent = new_stream(), new_stream()
    apply(target, [placed(a, "5.00")])
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with target.batch() as batch:
            batch.applied_versions([a, absent])
            writes = batch.writes
            statements.clear()
            stored = writes.get(orders, {"id": a})
            assert stored is not None and stored["status"] == "placed" and stored["total"] == Decimal("5.00")
            assert writes.get(orders, {"id": uuid.UUID(absent)}) is None
            assert statements == []  # prefetched: no round trip, for a string or a UUID key

            stored["status"] = "mutated"  # get() hands out copies
            assert writes.get(orders, {"id": a})["status"] == "placed"

            batch.start_event()
            writes.upsert(orders, {"id": a, "status": "paid"})
            assert writes.get(orders, {"id": a})["status"] == "paid"
            writes.increment(daily, {"day": DAY}, {"orders": 2, "revenue": Decimal("1.50")})
            assert statements == []  # writes never go to the database before commit
            assert writes.get(daily, {"day": DAY}) == {"day": DAY, "orders": 3, "revenue": Decimal("6.50")}
            assert len(statements) == 1  # daily is not prefetched: loaded once, lazily
            writes.upsert(orders, {"id": absent, "status": "new"})
            assert writes.get(orders, {"id": absent}) == {
                "id": absent,
                "status": "new",
                "total": None,
                "lines": None,
                "version": None,
            }
            batch.drop_event()
            assert writes.get(orders, {"id": a})["status"] == "placed"
            assert writes.get(orders, {"id": absent}) is None
            assert writes.get(daily, {"day": DAY}) == {"day": DAY, "orders": 1, "revenue": Decimal("5.00")}

            writes.delete(orders, {"id": a})
            assert writes.get(orders, {"id": a}) is None
            assert writes.get(notes, {"id": "n1"}) is None
            assert len(statements) == 2
            assert writes.get(notes, {"id": "n1"}) is None
            assert len(statements) == 2  # absence is cached too
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_handlers_read_that_fails_fails_the_batch_and_dead_letters_nothing(
    engine: Engine, target: PostgresTarget
) -> None:
    """A row a handler asks for that PostgreSQL cannot give (here the table is gone; a server
    restarting is the usual cause) is the target's failure, not the event's: the batch raises with
    that error and writes nothing, rather than dead-letter the event as poison and go on."""
    stream = new_stream()
    assert apply(target, [make_event(stream, 1, "Noted")]).applied == 1
    with connect(engine, target) as conn:
        conn.execute(notes.delete())  # the note must be read from the table, not remembered
        conn.exec_driver_sql(f'ALTER TABLE "{target.schema}".notes RENAME TO notes_gone')
        conn.commit()
    sink = Sink()
    with pytest.raises(TargetReadFailed, match="'notes'") as info:
        apply(target, [make_event(stream, 2, "Noted")], "2", sink)
    assert isinstance(info.value.__cause__, ProgrammingError)
    assert sink.letters == []
    assert target.applied_version(stream) == 1
    assert target.checkpoints() == {"log": "1"}


def test_write_validation_names_the_table(target: PostgresTarget) -> None:
    with target.batch() as batch:
        writes = batch.writes
        with pytest.raises(ValueError, match=r"'orders'.*\['id'\]"):
            writes.upsert(orders, {"status": "x"})
        with pytest.raises(ValueError, match=r"'orders' has no column.*'nope'"):
            writes.upsert(orders, {"id": new_stream(), "nope": 1})
        with pytest.raises(TypeError, match="not an int or Decimal"):
            writes.increment(daily, {"day": DAY}, {"orders": 1.5})
        with pytest.raises(ValueError, match="not in this projection"):
            writes.upsert(Table("elsewhere", MetaData(), Column("id", Integer, primary_key=True)), {"id": 1})
        with pytest.raises(ValueError, match="overlap"):
            writes.increment(daily, {"day": DAY}, {"orders": 1}, defaults={"orders": 5})


def test_uuid_keys_coalesce_whether_given_as_strings_or_uuids(engine: Engine, target: PostgresTarget) -> None:
    a = new_stream()
    with target.batch() as batch:
        batch.applied_versions([])
        batch.writes.upsert(orders, {"id": a, "status": "one"})
        batch.writes.upsert(orders, {"id": uuid.UUID(a), "total": Decimal(3)})
        batch.writes.upsert(orders, {"id": a.upper(), "version": 9})
        batch.commit({}, {})
    (row,) = order_rows(engine, target).values()
    assert (row["status"], row["total"], row["version"]) == ("one", Decimal(3), 9)


@pytest.mark.parametrize("staging", [True, False], ids=["staged", "arrays"])
def test_flushed_values_are_stored_alike_by_copy_and_by_arrays(engine: Engine, staging: bool) -> None:
    """Values the binary COPY does not take as they are (a float for a NUMERIC) keep the array path;
    JSON None is JSON null either way, as SQLAlchemy binds it."""
    target = PostgresTarget(
        engine,
        Orders(decoder=StubDecoder()),
        schema=unique_name("pgt"),
        staging_min_rows=1 if staging else None,
    )
    target.setup()
    try:
        a, b, c = new_stream(), new_stream(), new_stream()
        for rows in (
            # A float is no value for COPY's NUMERIC: this batch keeps the array path.
            [{"id": a, "status": "s", "total": 1.5, "lines": None, "version": 1}],
            [
                {"id": uuid.UUID(b), "status": None, "total": Decimal("2.25"), "lines": {"n": [1]}},
                {"id": c.upper(), "status": "t", "total": Decimal(3), "lines": {"k": "v"}, "version": 2},
            ],
        ):
            with target.batch() as batch:
                batch.applied_versions([])
                for values in rows:
                    batch.writes.upsert(orders, values)
                batch.commit({}, {})
        with connect(engine, target) as conn:
            nulls = dict(conn.execute(select(orders.c.id, orders.c.lines.is_(None))).all())
        rows = order_rows(engine, target)
        assert {k: (r["status"], r["total"], r["lines"], r["version"]) for k, r in rows.items()} == {
            a: ("s", Decimal("1.50"), None, 1),
            b: (None, Decimal("2.25"), {"n": [1]}, None),
            c: ("t", Decimal("3.00"), {"k": "v"}, 2),
        }
        assert nulls == {uuid.UUID(a): False, uuid.UUID(b): False, uuid.UUID(c): False}
    finally:
        target.drop()


# --- coalescing equals applying the writes one by one ---

prop_metadata = MetaData()
cells = Table(
    "cells",
    prop_metadata,
    Column("g", Integer, primary_key=True),
    Column("k", Text, primary_key=True),
    Column("a", BigInteger),
    Column("b", Numeric(12, 2)),
    Column("c", Text),
)
VALUE_COLUMNS = ("a", "b", "c")


class Cells(SqlProjection):
    name = "test_cells"
    stream_types = ("Cell",)
    metadata = prop_metadata


# Few keys, so that writes to the same row meet often.
KEYS = [{"g": 1, "k": "x"}, {"g": 1, "k": "y"}, {"g": 2, "k": "x"}]
keys = st.sampled_from(KEYS).map(dict)
column_values = {
    "a": st.none() | st.integers(-9, 9),
    "b": st.none() | st.decimals(-99, 99, places=2),
    "c": st.none() | st.sampled_from(["p", "q"]),
}
amount_values = {"a": st.integers(-9, 9), "b": st.decimals(-99, 99, places=2)}


@st.composite
def operations(draw: st.DrawFn) -> tuple[Any, ...]:
    kind = draw(st.sampled_from(["upsert", "increment", "delete"]))
    key = draw(keys)
    if kind == "delete":
        return ("delete", key)
    if kind == "upsert":
        columns = draw(st.sets(st.sampled_from(VALUE_COLUMNS)))
        return ("upsert", {**key, **{c: draw(column_values[c]) for c in sorted(columns)}})
    amounts = draw(st.sets(st.sampled_from(["a", "b"]), min_size=1))
    free = [c for c in VALUE_COLUMNS if c not in amounts]
    defaults = draw(st.sets(st.sampled_from(free))) if free else set()
    return (
        "increment",
        key,
        {c: draw(amount_values[c]) for c in sorted(amounts)},
        {c: draw(column_values[c]) for c in sorted(defaults)},
    )


events_strategy = st.lists(
    st.tuples(st.booleans(), st.lists(operations(), min_size=1, max_size=5)),  # (kept?, ops)
    min_size=1,
    max_size=6,
)
initial_rows = st.lists(
    st.tuples(keys, st.fixed_dictionaries({c: column_values[c] for c in VALUE_COLUMNS})), max_size=4
)


def reference_apply(conn: Connection, op: tuple[Any, ...]) -> None:
    """One write applied on its own, as plain SQL: what the coalesced flush must be equal to."""
    pk = [cells.c.g, cells.c.k]
    if op[0] == "delete":
        conn.execute(delete(cells).where(cells.c.g == op[1]["g"], cells.c.k == op[1]["k"]))
    elif op[0] == "upsert":
        stmt = pg_insert(cells).values(op[1])
        update = {c: stmt.excluded[c] for c in op[1] if c in VALUE_COLUMNS}
        if update:
            conn.execute(stmt.on_conflict_do_update(index_elements=pk, set_=update))
        else:
            conn.execute(stmt.on_conflict_do_nothing(index_elements=pk))
    else:
        _, key, amounts, defaults = op
        stmt = pg_insert(cells).values({**key, **defaults, **amounts})
        update = {c: func.coalesce(cells.c[c], 0) + stmt.excluded[c] for c in amounts}
        conn.execute(stmt.on_conflict_do_update(index_elements=pk, set_=update))


def read_cell(conn: Connection, key: dict[str, Any]) -> dict[str, Any] | None:
    row = conn.execute(select(cells).where(cells.c.g == key["g"], cells.c.k == key["k"])).first()
    return None if row is None else dict(row._mapping)


def all_cells(conn: Connection) -> list[dict[str, Any]]:
    return [dict(row._mapping) for row in conn.execute(select(cells).order_by(cells.c.g, cells.c.k))]


@pytest.fixture(params=[1, None], ids=["staged", "arrays"])
def cell_targets(
    engine: Engine, request: pytest.FixtureRequest
) -> Iterator[tuple[PostgresTarget, PostgresTarget]]:
    projection = Cells(decoder=StubDecoder())
    pair = (
        PostgresTarget(engine, projection, schema=unique_name("pgt_cells"), staging_min_rows=request.param),
        PostgresTarget(engine, projection, schema=unique_name("pgt_ref")),
    )
    for t in pair:
        t.setup()
    yield pair
    for t in pair:
        t.drop()


X = {"g": 1, "k": "x"}


@hypothesis_settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(initial=initial_rows, events=events_strategy)
# An increment default incremented later, on a stored row: only the amounts may be added to it.
@example(
    initial=[(X, {"a": 1, "b": Decimal(1), "c": None})],
    events=[(True, [("increment", X, {"a": 1}, {"b": Decimal(5)}), ("increment", X, {"b": Decimal(2)}, {})])],
)
# A delete forgets the increments before it, even when the row is written again.
@example(
    initial=[(X, {"a": 1, "b": None, "c": None})],
    events=[(True, [("increment", X, {"a": 4}, {}), ("delete", X), ("upsert", {**X, "a": 7})])],
)
# An upsert of every column replaces the row's change whole; a dropped event puts the old one back,
# and later partial writes merge into the replacement.
@example(
    initial=[(X, {"a": 1, "b": None, "c": "p"})],
    events=[
        (True, [("increment", X, {"a": 2}, {})]),
        (False, [("upsert", {**X, "a": 5, "b": Decimal(1), "c": "q"}), ("upsert", {**X, "c": "p"})]),
        (True, [("upsert", {**X, "a": 3, "b": None, "c": None}), ("increment", X, {"b": Decimal(2)}, {})]),
        (True, [("upsert", {**X, "c": "q"}), ("delete", X), ("upsert", {**X, "a": 1, "b": None, "c": "p"})]),
    ],
)
def test_coalesced_writes_equal_one_by_one_application(
    engine: Engine,
    cell_targets: tuple[PostgresTarget, PostgresTarget],
    initial: list[tuple[dict[str, Any], dict[str, Any]]],
    events: list[tuple[bool, list[tuple[Any, ...]]]],
) -> None:
    target, reference = cell_targets
    with connect(engine, target) as conn, connect(engine, reference) as ref:
        for c in (conn, ref):
            c.execute(delete(cells))
            for key, values in initial:
                c.execute(pg_insert(cells).values({**key, **values}).on_conflict_do_nothing())
            c.commit()

        ref.begin()
        with target.batch() as batch:
            batch.applied_versions([])
            for kept, ops in events:
                batch.start_event()
                savepoint = ref.begin_nested()
                for op in ops:
                    getattr(batch.writes, op[0])(cells, *op[1:])
                    reference_apply(ref, op)
                    key = {"g": op[1]["g"], "k": op[1]["k"]}
                    assert batch.writes.get(cells, key) == read_cell(ref, key), (op, key)
                if kept:
                    batch.keep_event()
                    savepoint.commit()
                else:
                    batch.drop_event()
                    savepoint.rollback()
            for key in KEYS:
                assert batch.writes.get(cells, key) == read_cell(ref, key)
            batch.commit({}, {})
        ref.commit()
        assert all_cells(conn) == all_cells(ref)
