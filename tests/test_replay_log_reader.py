"""The replay's read of the log: the same events as ``read_all``, and partitions that split it exactly."""

from __future__ import annotations

import uuid

import orjson
import pytest

from eventstore import EventStore, NewEvent
from eventstore.records import LOG_START, NO_METADATA, EventMetadata, LogPosition
from projections.events import ProjectedEvent, event_from_record
from projections.log_reader import LogReader, partition_bounds, recorded_event
from projections.replay import is_log_checkpoint, partition_checkpoint


def _fill(store: EventStore, streams: int, events: int) -> None:
    ids = [uuid.uuid4() for _ in range(streams)]
    meta = EventMetadata(correlation_id="c-1", actor="tester", extra={"k": "v"})
    for version in range(1, events + 1):
        for n, sid in enumerate(ids):
            payload = orjson.dumps({"n": n, "v": version})
            event = NewEvent(
                uuid.uuid4(), "tests:Thing.Happened", payload, metadata=meta if n % 3 else NO_METADATA
            )
            store.append(sid, "Thing" if n % 4 else "Other", [event], expected_version=version - 1)


def _read_through(reader: LogReader, limit: int) -> list[ProjectedEvent]:
    got: list[ProjectedEvent] = []
    after = LOG_START
    while batch := reader.read(after, limit):
        got += batch
        after = LogPosition(batch[-1].transaction_id, batch[-1].position)
    return got


def test_the_log_reader_reads_what_read_all_gives(store: EventStore) -> None:
    _fill(store, 12, 3)
    expected = [event_from_record(e) for e in store.read_all(limit=1000, stream_types=["Thing"])]
    got = _read_through(LogReader(store, ["Thing"]), 7)
    fields = ProjectedEvent.__dataclass_fields__
    assert [[getattr(e, f) for f in fields] for e in got] == [
        [getattr(e, f) for f in fields] for e in expected
    ]
    # A dead letter carries the store's record, rebuilt exactly.
    records = store.read_all(limit=1000, stream_types=["Thing"])
    assert [recorded_event(e) for e in got] == records


@pytest.mark.parametrize("count", [2, 3])
def test_partitions_split_the_log_exactly_and_keep_commit_order(store: EventStore, count: int) -> None:
    _fill(store, 30, 2)
    whole = [
        (e.transaction_id, e.position) for e in _read_through(LogReader(store, ["Thing", "Other"]), 1000)
    ]
    parts = [_read_through(LogReader(store, ["Thing", "Other"], (i, count)), 5) for i in range(count)]
    seen = []
    for index, part in enumerate(parts):
        low, high = partition_bounds(index, count)
        assert all(low <= uuid.UUID(e.stream_id) <= high for e in part)
        positions = [(e.transaction_id, e.position) for e in part]
        assert positions == sorted(positions)  # commit order within the partition
        seen += positions
    assert sorted(seen) == whole  # every event once, in exactly one partition
    # The ranges tile the whole UUID space.
    bounds = [partition_bounds(i, count) for i in range(count)]
    assert bounds[0][0].int == 0 and bounds[-1][1].int == 2**128 - 1
    assert all(bounds[i][1].int + 1 == bounds[i + 1][0].int for i in range(count - 1))


def test_partition_arguments_are_checked(store: EventStore) -> None:
    with pytest.raises(ValueError, match="partition"):
        LogReader(store, ["Thing"], (2, 2))
    with pytest.raises(ValueError, match="partition"):
        LogReader(store, ["Thing"], (0, 0))


def test_partition_checkpoints_are_told_from_kafka_ones() -> None:
    assert partition_checkpoint(1, 2) == "log:1/2"
    assert is_log_checkpoint("log") and is_log_checkpoint("log:0/2")
    # A Kafka checkpoint is topic:partition, even for a topic named "log".
    assert not is_log_checkpoint("log:3") and not is_log_checkpoint("datalayer.events.Order:1")
