"""Test helpers: waiting on a condition with a deadline instead of sleeping."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from eventstore import EventStore, RecordedEvent

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``condition`` until it returns a truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


def polled_records(consumer: Any, count: int, what: str, timeout: float = 60.0) -> list[Any]:
    """What a kafka-python ``consumer`` (assigned or subscribed) polls, once it has ``count`` records."""
    records: list[Any] = []

    def enough() -> bool:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
        return len(records) >= count

    wait_until(enough, timeout=timeout, what=what)
    return records


def unique_name(prefix: str) -> str:
    """A name no other test (or earlier run) uses: isolates topics, tables and keys."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def planner_row_estimate(store: EventStore) -> int:
    """``pg_class.reltuples`` of the store's events table: -1 until it is first analyzed (or
    vacuumed), then the row count the planner works from."""
    with store.pool.connection() as conn:
        row = conn.execute(
            "SELECT reltuples::int8 FROM pg_class WHERE oid = to_regclass(%s)",
            (f'"{store.schema}".events',),
        ).fetchone()
    assert row is not None
    return int(row[0])


def read_all_settled(store: EventStore, count: int, limit: int = 100_000) -> list[RecordedEvent]:
    """The log once ``count`` events are readable.

    Readers stop at the oldest transaction open anywhere in the database, so right after a commit
    another session's in-flight transaction may hold events back for a moment; wait that out.
    """

    def readable() -> list[RecordedEvent] | None:
        events = store.read_all(limit=limit)
        return events if len(events) >= count else None

    return wait_until(readable, what=f"{count} events to be readable")
