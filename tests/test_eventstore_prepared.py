"""The append's prepared-statement path (eventstore.prepared) on real PostgreSQL.

Appends on the store's own autocommit connections run a statement prepared per connection through
one libpq call, with parameters encoded by the store. These tests pin what that path must keep:
every column as given, the statement found again after the server forgot it, psycopg's errors, and
the psycopg path for connections it does not suit.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from datalayer.clients import postgres_connection
from datalayer.settings import Settings
from eventstore import ConcurrencyError, EventMetadata, EventStore, NewEvent, StreamAppend
from tests.helpers import read_all_settled


@contextmanager
def one_connection_store(settings: Settings, schema: str, **connect_kwargs: Any) -> Iterator[EventStore]:
    """A second store on ``schema`` with a pool of exactly one connection, so tests know which one."""
    kwargs = {**settings.postgres_connect_kwargs(), **connect_kwargs}
    es = EventStore.connect(
        settings.psycopg_url(), schema=schema, min_size=1, max_size=1, connect_kwargs=kwargs
    )
    try:
        yield es
    finally:
        es.close()


def prepared_names(es: EventStore) -> set[str]:
    with es.pool.connection() as conn:
        return {row[0] for row in conn.execute("SELECT name FROM pg_prepared_statements").fetchall()}


def test_every_column_round_trips_through_the_prepared_append(store: EventStore) -> None:
    order, product = uuid.uuid4(), uuid.uuid4()
    meta = EventMetadata(
        correlation_id="c-ü", actor="zoë", tenant="acme", extra={"n": 1, "nested": {"a": [1]}}
    )
    payload = b"\x00\x01\xff binary, not text \x00"
    order_events = (
        NewEvent(uuid.uuid4(), "Bestellung.Aufgegeben", payload, schema_version=7, metadata=meta),
        NewEvent(uuid.uuid4(), "Bestellung.Geändert", b'{"x": "\xe2\x82\xac"}'),
    )
    results = store.append_streams(
        [
            StreamAppend(order, "Bestellung/Ü", -1, order_events),  # -1: a stream numbered from 0
            StreamAppend(product, "Product", 0, (NewEvent(uuid.uuid4(), "Created", b"{}"),)),
        ]
    )
    assert [(r.stream_id, r.version, len(r.positions)) for r in results] == [(order, 1, 2), (product, 1, 1)]

    stored = store.read_stream(order, from_version=0)
    assert [e.stream_version for e in stored] == [0, 1]
    assert [(e.stream_type, e.event_type, e.event_id) for e in stored] == [
        ("Bestellung/Ü", "Bestellung.Aufgegeben", order_events[0].event_id),
        ("Bestellung/Ü", "Bestellung.Geändert", order_events[1].event_id),
    ]
    assert [e.payload for e in stored] == [payload, order_events[1].payload]
    assert [e.schema_version for e in stored] == [7, 1]
    assert stored[0].metadata == meta and stored[1].metadata == EventMetadata()
    # The positions returned are the ones the log has for these events.
    log = {e.event_id: e.position for e in read_all_settled(store, 3)}
    assert results[0].positions == tuple(log[e.event_id] for e in order_events)


def test_the_append_is_prepared_once_per_connection_and_found_again_after_deallocate(
    store: EventStore, settings: Settings
) -> None:
    with one_connection_store(settings, store.schema) as es:
        stream = uuid.uuid4()
        es.append(stream, "Counter", [NewEvent(uuid.uuid4(), "Ticked", b"{}")], 0)
        assert f"dl_append_1_{store.schema}" in prepared_names(es)

        with es.pool.connection() as conn:
            conn.execute("DEALLOCATE ALL")  # what a pooler's reset or a DISCARD ALL does
        assert prepared_names(es) == set()
        es.append(stream, "Counter", [NewEvent(uuid.uuid4(), "Ticked", b"{}")], 1)
        assert f"dl_append_1_{store.schema}" in prepared_names(es)
        assert [e.stream_version for e in es.read_stream(stream)] == [1, 2]


def test_conflicts_and_resubmissions_on_the_prepared_path(store: EventStore, settings: Settings) -> None:
    with one_connection_store(settings, store.schema) as es:
        stream = uuid.uuid4()
        events = [NewEvent(uuid.uuid4(), "Ticked", b"{}") for _ in range(2)]
        es.append(stream, "Counter", events, 0)
        assert es.append(stream, "Counter", events, 0).positions == ()  # same ids: a no-op
        with pytest.raises(ConcurrencyError) as info:
            es.append(stream, "Counter", [NewEvent(uuid.uuid4(), "Ticked", b"{}")], 1)
        assert (info.value.expected_version, info.value.actual_version) == (1, 2)
        assert f"dl_append_2_{store.schema}" in prepared_names(es)
        assert len(es.read_stream(stream)) == 2


def test_a_connection_lost_mid_append_is_psycopgs_operational_error(
    store: EventStore, settings: Settings
) -> None:
    with one_connection_store(settings, store.schema) as es:
        stream = uuid.uuid4()
        es.append(stream, "Counter", [NewEvent(uuid.uuid4(), "Ticked", b"{}")], 0)
        with es.pool.connection() as conn:
            backend = conn.info.backend_pid
        with postgres_connection(settings, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        with pytest.raises(psycopg.OperationalError):
            es.append(stream, "Counter", [NewEvent(uuid.uuid4(), "Ticked", b"{}")], 1)
        # The pool replaced the broken connection; the append goes through on the new one.
        es.append(stream, "Counter", [NewEvent(uuid.uuid4(), "Ticked", b"{}")], 1)
        assert [e.stream_version for e in es.read_stream(stream)] == [1, 2]


def test_a_connection_not_in_utf8_appends_through_psycopg(store: EventStore, settings: Settings) -> None:
    with one_connection_store(settings, store.schema, client_encoding="LATIN1") as es:
        stream = uuid.uuid4()
        es.append(stream, "Zähler", [NewEvent(uuid.uuid4(), "Geändert", b"{}")], 0)
        assert prepared_names(es) == set()  # psycopg's own statement is not prepared on first use
    (event,) = store.read_stream(stream)
    assert (event.stream_type, event.event_type) == ("Zähler", "Geändert")


def test_append_stream_params_keeps_the_append_guarantees(store: EventStore, settings: Settings) -> None:
    """The recorder's one-stream path: same positions, conflict error and idempotence as append()."""
    stream = uuid.uuid4()
    events = [(uuid.uuid4().bytes, "Ticked", 3, b'{"n": 1}', '{"actor": "zoë"}') for _ in range(2)]
    positions = store.append_stream_params(stream, "Counter", 0, events)
    stored = store.read_stream(stream)
    assert positions == [e.position for e in stored]
    assert [(e.stream_version, e.event_id.bytes, e.schema_version) for e in stored] == [
        (1, events[0][0], 3),
        (2, events[1][0], 3),
    ]
    assert stored[0].metadata == EventMetadata(actor="zoë")
    assert store.append_stream_params(stream, "Counter", 0, events) == []  # same ids: a no-op
    with pytest.raises(ConcurrencyError) as info:
        store.append_stream_params(stream, "Counter", 1, [(uuid.uuid4().bytes, "Ticked", 1, b"{}", "{}")])
    assert (info.value.stream_id, info.value.expected_version, info.value.actual_version) == (stream, 1, 2)
    with pytest.raises(ValueError):
        store.append_stream_params(stream, "Counter", -2, events)
    # Where the prepared statement does not apply, nothing is written and the caller is told so.
    many = [(uuid.uuid4().bytes, "Ticked", 1, b"{}", "{}") for _ in range(65)]
    assert store.append_stream_params(uuid.uuid4(), "Counter", 0, many) is None
    with one_connection_store(settings, store.schema, client_encoding="LATIN1") as es:
        other = uuid.uuid4()
        assert es.append_stream_params(other, "Counter", 0, events[:1]) is None
        assert es.read_stream(other) == []
