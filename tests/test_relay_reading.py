"""The relay's own read of the log builds the same records as encoding each stored event in Python."""

from __future__ import annotations

import os
import uuid

from eventstore import LOG_START, EventMetadata, EventStore, NewEvent, StreamAppend
from eventstore.relay import EventEnvelope
from eventstore.relay.reading import (
    EVENT_TYPE,
    POSITION,
    STREAM_TYPE,
    RecordHeaders,
    RelayReader,
    log_position,
)
from eventstore.relay.relay import kafka_record, relay_record

PAYLOADS = [
    b'{"amount": "12.50", "lines": [1, 2]}',
    b'[1, 2, {"nested": "\\"quoted\\" \\u00e9t\\u00e9 \xc3\xa9"}]',
    b"{}",
    os.urandom(64),  # ciphertext-like: base64
    b"{" + os.urandom(40),  # starts like JSON, is not: base64
    b'"a bare string"',  # a JSON scalar: base64
    b"",
]


def test_relay_rows_encode_like_recorded_events(store: EventStore) -> None:
    metadata = EventMetadata(
        correlation_id="c-7", actor='al"ice \\ \u00e9', tenant="t\n1", extra={"ip": "10.0.0.1", "n": 3}
    )
    appends = [
        StreamAppend(
            uuid.uuid4(),
            'Order "v2"',
            0,
            tuple(
                NewEvent(uuid.uuid4(), f"shop.orders:Order.Changed{i}\u00e9", payload, 1 + i % 3, metadata)
                for i, payload in enumerate(PAYLOADS)
            ),
        ),
        StreamAppend(uuid.uuid4(), "Invoice", 0, (NewEvent(uuid.uuid4(), "Issued", b'{"n": 1}'),)),
    ]
    store.append_streams(appends)

    events = store.read_all(LOG_START, 100)
    rows = RelayReader(store).read(LOG_START, 100)
    assert len(rows) == len(events) == len(PAYLOADS) + 1

    headers = RecordHeaders()
    for row, event in zip(rows, events, strict=True):
        assert log_position(row) == event.log_position
        assert (row[STREAM_TYPE], row[EVENT_TYPE]) == (event.stream_type, event.event_type)
        key, value, expected_headers = kafka_record(event)
        row_key, row_value, row_headers = relay_record(row, headers)
        assert row_key == key
        assert row_headers == expected_headers
        from_row = EventEnvelope.model_validate_json(row_value)
        assert from_row == EventEnvelope.model_validate_json(value)
        assert from_row.payload_encoding == (
            "json" if event.payload[:1] in (b"{", b"[") and event.payload != PAYLOADS[4] else "base64"
        )
        if from_row.payload_encoding == "base64":
            assert from_row.payload_bytes() == event.payload
        else:
            assert row_value.endswith(b',"payload":' + event.payload + b"}")  # embedded as stored


def test_relay_rows_respect_the_read_horizon(store: EventStore) -> None:
    """A transaction still open holds back what committed after it began, as for read_all."""
    store.append(uuid.uuid4(), "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}")], 0)
    reader = RelayReader(store)
    with store.pool.connection() as blocker, blocker.transaction():
        blocker.execute("SELECT pg_current_xact_id()")  # an open transaction with an id
        store.append(uuid.uuid4(), "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}")], 0)
        held = reader.read(LOG_START, 100)
        assert [log_position(r) for r in held] == [e.log_position for e in store.read_all(LOG_START, 100)]
        assert len(held) == 1
    assert len(reader.read(LOG_START, 100)) == 2
    after_first = reader.read(log_position(held[0]), 100)
    assert [r[POSITION] for r in after_first] == [e.position for e in store.read_all(log_position(held[0]))]


def test_relay_read_follows_the_log_index_without_sorting(store: EventStore) -> None:
    """Reading from any position walks the (transaction id, position) index: no sort of the rest."""
    store.import_events(
        (uuid.uuid4(), "Order", 1, NewEvent(uuid.uuid4(), "Placed", b"{}")) for _ in range(2000)
    )
    middle = store.read_all(LOG_START, 1000)[-1].log_position
    with store.pool.connection() as conn:
        conn.execute(f"ANALYZE {store.schema}.events")
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                b"EXPLAIN " + RelayReader(store).query, (str(middle.transaction_id), middle.position, 500)
            )
        )
    assert "events_log_order_idx" in plan
    assert "Sort" not in plan, plan
