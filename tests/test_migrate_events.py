"""migrate-events: the log copied through a transform into a new store, verified, resumable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from psycopg import sql

from datalayer.clients import postgres_connection
from datalayer.settings import Settings
from eventstore import EventStore, NewEvent, RecordedEvent
from eventstore.migrate_events import (
    PROGRESS_TABLE,
    MigrationTargetError,
    NewStreamEvent,
    TransformError,
    migrate_events,
)
from tests.helpers import planner_row_estimate, read_all_settled, unique_name

BIN = Path(sys.executable).with_name("datalayer")
ROOT = Path(__file__).resolve().parents[1]

# -- transforms (module-level, so that the console script can load them as tests.test_migrate_events:NAME)


def rename(event: RecordedEvent) -> Iterable[NewStreamEvent]:
    """The orders module moved to domain.sales, and a raw event type gets its class topic."""
    event_type = event.event_type.replace("domain.orders:", "domain.sales:", 1)
    if event_type == "CustomerRegistered":
        event_type = "domain.customer:Customer.Registered"
    return [NewStreamEvent.from_recorded(event, event_type=event_type)]


def drop_views_and_cards(event: RecordedEvent) -> Iterable[NewStreamEvent]:
    """Drop the noise events, and the card number from every payment."""
    if event.event_type == "domain.orders:Order.Viewed":
        return []
    if event.event_type == "domain.orders:Order.Paid":
        data = orjson.loads(event.payload)
        del data["card"]
        return [NewStreamEvent.from_recorded(event, payload=orjson.dumps(data))]
    return [NewStreamEvent.from_recorded(event)]


def lines_stream(order_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(order_id, "lines")


def split_lines(event: RecordedEvent) -> Iterator[NewStreamEvent]:
    """Order lines move to a stream of their own per order: Placed yields the order and one event per line."""
    if event.event_type == "domain.orders:Order.Placed":
        data = orjson.loads(event.payload)
        lines = data.pop("lines")
        yield NewStreamEvent.from_recorded(event, payload=orjson.dumps(data))
        for line in lines:
            yield NewStreamEvent(
                lines_stream(event.stream_id), "OrderLines", "OrderLines.Added", orjson.dumps(line)
            )
    elif event.event_type == "domain.orders:Order.LineAdded":
        yield NewStreamEvent.from_recorded(
            event,
            stream_id=lines_stream(event.stream_id),
            stream_type="OrderLines",
            event_type="OrderLines.Added",
        )
    else:
        yield NewStreamEvent.from_recorded(event)


def strict(event: RecordedEvent) -> Iterable[NewStreamEvent]:
    """Refuses bad data while MIGRATION_TEST_STRICT is set (as a transform does until it is fixed)."""
    if os.environ.get("MIGRATION_TEST_STRICT") and b"poison" in event.payload:
        raise ValueError(f"bad data in {event.event_id}")
    return rename(event)


class FailAfter:
    """``rename``, until ``n`` events in: then the process 'dies'."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = 0

    def __call__(self, event: RecordedEvent) -> Iterable[NewStreamEvent]:
        self.seen += 1
        if self.seen > self.n:
            raise RuntimeError("connection to the migration host lost")
        return rename(event)


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def new_store(settings: Settings) -> Iterator[Callable[[], EventStore]]:
    """Stores in fresh, not yet created schemas (migrate-events creates them), dropped afterwards."""
    made: list[EventStore] = []

    def make() -> EventStore:
        es = EventStore.connect(
            settings.psycopg_url(),
            schema=unique_name("mig"),
            max_size=4,
            connect_kwargs=settings.postgres_connect_kwargs(),
        )
        made.append(es)
        return es

    yield make
    with postgres_connection(settings, autocommit=True) as conn:
        for es in made:
            es.close()
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(es.schema)))


POISONED_ORDER = uuid.UUID("ffffffff-ffff-4fff-bfff-ffffffffffff")


def seed(store: EventStore, orders: int = 60) -> dict[str, int]:
    """Orders (placed with lines, lines added, viewed, paid) and customers; returns counts by kind."""
    counts: Counter[str] = Counter()
    rows: list[Any] = []
    for n in range(orders):
        # The poisoned order's id sorts last among its version: its bad event then never falls in
        # the first batch of a migration, which the tests' resumes rely on.
        order = POISONED_ORDER if n == 20 else uuid.uuid4()
        first = 0 if n % 15 == 0 else 1  # an aggregate numbered from 0 stays so
        events = [
            (
                "domain.orders:Order.Placed",
                {"customer": f"c{n}", "lines": [{"sku": f"S{i}", "qty": i + 1} for i in range(n % 3 + 1)]},
            ),
            *[("domain.orders:Order.LineAdded", {"sku": f"X{i}", "qty": 1}) for i in range(n % 2)],
            *[("domain.orders:Order.Viewed", {"by": "support"}) for _ in range(n % 4)],
            ("domain.orders:Order.Paid", {"amount": "9.50", "card": "4111111111111111"}),
        ]
        counts["lines"] += n % 3 + 1
        for version, (event_type, payload) in enumerate(events, start=first):
            if n == 20 and event_type.endswith("Placed"):
                payload["note"] = "poison"  # the bad data a transform trips over
            body = orjson.dumps(payload)
            rows.append((order, "Order", version, NewEvent(uuid.uuid4(), event_type, body)))
            counts[event_type.rpartition(".")[2]] += 1
        customer = uuid.uuid4()
        rows.append(
            (customer, "Customer", 1, NewEvent(uuid.uuid4(), "CustomerRegistered", b"\x00\xffcipher"))
        )
        counts["CustomerRegistered"] += 1
    # Interleave the streams in the log, in several transactions.
    rows.sort(key=lambda r: (r[2], r[0]))
    for start in range(0, len(rows), 97):
        store.import_events(rows[start : start + 97])
    counts["total"] = len(rows)
    read_all_settled(store, len(rows), limit=len(rows) + 1)
    return dict(counts)


def full_log(store: EventStore) -> list[RecordedEvent]:
    return store.read_all(limit=1_000_000)


def assert_contiguous(store: EventStore, events: list[RecordedEvent]) -> dict[uuid.UUID, list[RecordedEvent]]:
    by_stream: dict[uuid.UUID, list[RecordedEvent]] = {}
    for e in events:
        by_stream.setdefault(e.stream_id, []).append(e)
    for stream_id, stream in by_stream.items():
        versions = [e.stream_version for e in stream]
        assert versions == list(range(versions[0], versions[0] + len(versions))), stream_id
        assert versions[0] in (0, 1)
        assert [e.event_id for e in store.read_stream(stream_id, from_version=0)] == [
            e.event_id for e in stream
        ]
    return by_stream


# -- the library -----------------------------------------------------------------------------------


def test_renaming_keeps_everything_but_the_type_and_leaves_the_source_untouched(
    store: EventStore, new_store: Callable[[], EventStore]
) -> None:
    counts = seed(store)
    before = full_log(store)
    target = new_store()
    report = migrate_events(store, target, rename, transform_name="rename", batch_size=100)
    assert report.ok, report.lines()
    total = counts["total"]
    assert (report.read, report.written, report.dropped, report.added) == (total, total, 0, 0)
    assert (report.source_events, report.target_events) == (total, total)
    assert report.last_position == before[-1].log_position
    assert full_log(store) == before  # every field, positions included

    after = read_all_settled(target, total, limit=total + 1)
    assert [
        (e.event_id, e.stream_id, e.stream_version, e.payload, e.metadata, e.recorded_at) for e in after
    ] == [(e.event_id, e.stream_id, e.stream_version, e.payload, e.metadata, e.recorded_at) for e in before]
    types = Counter(e.event_type for e in after)
    assert types["domain.sales:Order.Placed"] == counts["Placed"]
    assert types["domain.customer:Customer.Registered"] == counts["CustomerRegistered"]
    assert not any(t.startswith("domain.orders:") or t == "CustomerRegistered" for t in types)
    assert_contiguous(target, after)
    assert report.lines()[-1] == "verified: counts agree, streams contiguous"
    assert planner_row_estimate(target) == total  # analyzed: a rebuild on it plans by real statistics


def test_dropping_renumbers_each_stream_contiguously(
    store: EventStore, new_store: Callable[[], EventStore]
) -> None:
    counts = seed(store)
    before = full_log(store)
    target = new_store()
    report = migrate_events(store, target, drop_views_and_cards, transform_name="drop", batch_size=128)
    assert report.ok, report.lines()
    written = counts["total"] - counts["Viewed"]
    assert (report.read, report.dropped, report.added, report.written) == (
        counts["total"],
        counts["Viewed"],
        0,
        written,
    )
    after = read_all_settled(target, written, limit=written + 1)
    assert len(after) == written == report.target_events
    streams = assert_contiguous(target, after)
    for e in after:
        assert e.event_type != "domain.orders:Order.Viewed"
        if e.event_type == "domain.orders:Order.Paid":
            assert orjson.loads(e.payload) == {"amount": "9.50"}
            # the last event of its order, now right after the events that were kept
            assert e.stream_version == streams[e.stream_id][-1].stream_version
    assert full_log(store) == before


def test_splitting_moves_lines_to_streams_of_their_own(
    store: EventStore, new_store: Callable[[], EventStore]
) -> None:
    counts = seed(store)
    target = new_store()
    report = migrate_events(store, target, split_lines, transform_name="split", batch_size=100)
    assert report.ok, report.lines()
    assert report.dropped == 0 and report.added == counts["lines"]
    assert report.written == counts["total"] + counts["lines"]
    after = read_all_settled(target, report.written, limit=report.written + 1)
    streams = assert_contiguous(target, after)
    line_streams = {sid: s for sid, s in streams.items() if s[0].stream_type == "OrderLines"}
    assert len(line_streams) == sum(1 for s in streams.values() if s[0].stream_type == "Order")
    assert sum(map(len, line_streams.values())) == counts["lines"] + counts["LineAdded"]
    for stream in line_streams.values():
        assert stream[0].stream_version == 1 and {e.event_type for e in stream} == {"OrderLines.Added"}
    for stream in streams.values():
        if stream[0].stream_type == "Order":
            assert "lines" not in orjson.loads(stream[0].payload)
            assert all(e.event_type != "domain.orders:Order.LineAdded" for e in stream)
    ids = [e.event_id for e in after]
    assert len(set(ids)) == len(ids)


def test_resume_after_an_interruption_continues_without_duplicates(
    store: EventStore, new_store: Callable[[], EventStore]
) -> None:
    counts = seed(store)
    target, reference = new_store(), new_store()
    with pytest.raises(TransformError, match="connection to the migration host lost") as failure:
        migrate_events(store, target, FailAfter(250), transform_name="rename", batch_size=100)
    assert "the target holds the output of the first 200 source events" in str(failure.value)
    assert len(read_all_settled(target, 200, limit=1000)) == 200  # two batches committed, the third not

    with pytest.raises(MigrationTargetError, match="pass --resume to continue it"):
        migrate_events(store, target, rename, transform_name="rename")
    with pytest.raises(MigrationTargetError, match=r"with transform rename, not of \w+ with drop"):
        migrate_events(store, target, drop_views_and_cards, transform_name="drop", resume=True)

    report = migrate_events(store, target, rename, transform_name="rename", resume=True, batch_size=100)
    assert report.ok, report.lines()
    assert report.resumed_from is not None and report.run_events == counts["total"] - 200
    assert report.read == report.written == report.target_events == counts["total"]

    clean = migrate_events(store, reference, rename, transform_name="rename")
    assert clean.ok

    def content(s: EventStore) -> list[tuple[Any, ...]]:
        return [
            (e.event_id, e.stream_id, e.stream_version, e.event_type, e.payload, e.recorded_at)
            for e in read_all_settled(s, counts["total"], limit=counts["total"] + 1)
        ]

    assert content(target) == content(reference)


def test_a_resume_later_copies_what_the_source_gained(
    store: EventStore, new_store: Callable[[], EventStore]
) -> None:
    counts = seed(store, orders=10)
    target = new_store()
    assert migrate_events(store, target, split_lines, transform_name="split").ok
    order = next(e for e in full_log(store) if e.event_type == "domain.orders:Order.Placed")
    version = store.stream_version(order.stream_id)
    store.append(
        order.stream_id,
        "Order",
        [NewEvent(uuid.uuid4(), "domain.orders:Order.LineAdded", b'{"sku":"late","qty":1}')],
        version,
    )
    read_all_settled(store, counts["total"] + 1, limit=1000)
    report = migrate_events(store, target, split_lines, transform_name="split", resume=True)
    assert report.ok and report.run_events == 1 and report.read == counts["total"] + 1
    lines = target.read_stream(lines_stream(order.stream_id))
    assert orjson.loads(lines[-1].payload) == {"sku": "late", "qty": 1}
    assert [e.stream_version for e in lines] == list(range(1, len(lines) + 1))


def test_targets_that_cannot_take_the_migration_are_refused(
    store: EventStore, new_store: Callable[[], EventStore]
) -> None:
    seed(store, orders=3)
    with pytest.raises(MigrationTargetError, match="the target is the source"):
        migrate_events(store, store)
    occupied = new_store()
    occupied.migrate()
    occupied.append(uuid.uuid4(), "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}")], 0)
    for resume in (False, True):
        with pytest.raises(
            MigrationTargetError, match="already holds 1 events not written by migrate-events"
        ):
            migrate_events(store, occupied, resume=resume)
    with occupied.pool.connection() as conn:  # a refusal leaves no trace in the target
        table = f"{occupied.schema}.{PROGRESS_TABLE}"
        assert conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,)

    def wrong(event: RecordedEvent) -> Iterable[NewStreamEvent]:
        return [event]  # type: ignore[list-item]

    with pytest.raises(TransformError, match=r"returned RecordedEvent .*: expected NewStreamEvent"):
        migrate_events(store, new_store(), wrong, transform_name="wrong")


# -- the console script ------------------------------------------------------------------------------


def run(schema: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DATALAYER_EVENTSTORE_SCHEMA": schema, **env}
    return subprocess.run(
        [str(BIN), "migrate-events", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        cwd=ROOT,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_migrates_reports_and_resumes(store: EventStore, new_store: Callable[[], EventStore]) -> None:
    counts = seed(store, orders=30)
    target = new_store()
    transform = "tests.test_migrate_events:strict"

    args = ("--to-schema", target.schema, "--transform", transform, "--batch-size", "10")
    failed = run(store.schema, *args, MIGRATION_TEST_STRICT="1")
    assert failed.returncode == 1
    error = one_line_error(failed)
    assert error.startswith(
        f"datalayer migrate-events: TransformError: transform {transform} failed on event"
    )
    assert "ValueError: bad data in" in error and "a resume continues after them" in error
    assert "the output of the first 0 source" not in error  # batches before the bad one are kept

    refused = run(store.schema, *args)
    assert refused.returncode == 1
    assert "MigrationTargetError" in one_line_error(refused) and "pass --resume" in refused.stderr

    fixed = run(store.schema, *args, "--resume", "--progress")
    assert fixed.returncode == 0, fixed.stderr
    lines = fixed.stdout.splitlines()
    assert lines[0].startswith(f"migrated schema {store.schema} -> {target.schema} (transform {transform}")
    assert "resumed after" in lines[0]
    assert f"written  {counts['total']} = {counts['total']} read - 0 dropped + 0 added" in fixed.stdout
    assert lines[-1] == "verified: counts agree, streams contiguous"
    assert "events/s" in fixed.stderr  # --progress


def test_cli_usage_errors(store: EventStore, new_store: Callable[[], EventStore]) -> None:
    target = new_store()
    missing = run(store.schema, "--to-schema", target.schema, "--transform", "tests.test_migrate_events:nope")
    assert missing.returncode == 2
    assert one_line_error(missing).startswith("datalayer migrate-events: cannot load transform")
    malformed = run(store.schema, "--to-schema", target.schema, "--transform", "no_colon")
    assert malformed.returncode == 2 and "package.module:function" in one_line_error(malformed)
    bad_schema = run(store.schema, "--to-schema", "Bad-Name")
    assert bad_schema.returncode == 2 and "lower-case letters" in bad_schema.stderr
    assert run(store.schema).returncode == 2  # --to-schema is required
    same = run(store.schema, "--to-schema", store.schema)
    assert same.returncode == 1 and "the target is the source" in one_line_error(same)
    plain = run(store.schema, "--to-schema", target.schema)  # no transform: a plain copy
    assert plain.returncode == 0, plain.stderr
    assert "(transform copy_unchanged)" in plain.stdout
    assert "example:" in run(store.schema, "--help").stdout


def test_the_guides_worked_example_runs_as_written(
    store: EventStore, new_store: Callable[[], EventStore]
) -> None:
    document = (ROOT / "docs" / "backup-and-migration.md").read_text()
    namespace: dict[str, Any] = {}
    exec(re.findall(r"```python\n(.*?)```", document, flags=re.DOTALL)[0], namespace)
    counts = seed(store, orders=20)
    target = new_store()
    report = migrate_events(store, target, namespace["transform"], transform_name="guide")
    assert report.ok, report.lines()
    assert report.dropped == counts["Viewed"] and report.added == 0
    after = read_all_settled(target, report.written, limit=report.written + 1)
    assert_contiguous(target, after)
    assert not any(e.event_type.startswith("domain.orders:") for e in after)
    paid = [orjson.loads(e.payload) for e in after if e.event_type == "domain.sales:Order.Paid"]
    assert len(paid) == counts["Paid"] and all("card" not in p for p in paid)
