"""Export and import: the event log through a portable file and back into an empty store, byte for byte."""

from __future__ import annotations

import base64
import gzip
import os
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from psycopg import sql

from datalayer.clients import postgres_connection
from datalayer.settings import Settings
from domain import CommandHandlers, OrdersApplication
from eventstore import EventMetadata, EventStore, NewEvent, RecordedEvent
from eventstore.portable import (
    PortableFileError,
    StoreNotEmptyError,
    export_log,
    import_log,
    open_export,
    open_import,
)
from tests.helpers import planner_row_estimate, read_all_settled, unique_name

BIN = Path(sys.executable).with_name("datalayer")


def seed(store: EventStore, streams: int = 40) -> int:
    """Events of every shape an export must carry unchanged; returns how many were written."""
    long_ago = datetime(2019, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
    payloads = [
        b'{"total":"9.50","lines":[{"sku":"A1","qty":2}]}',  # canonical JSON: embedded as JSON
        b'{"total": "9.50"}',  # JSON, but not byte-for-byte what a re-encoding gives: base64
        b'{"name":"Zo\xc3\xab \xe2\x82\xac","n":1.5e300}',
        os.urandom(48),  # ciphertext-like
        b"\x1f\x8b\x08\x00compressed",
        b"",
        b"[1,2,3]",
    ]
    metadata = [
        EventMetadata(),
        EventMetadata(correlation_id="c-1", causation_id="e-0", actor="alice", tenant="t1"),
        EventMetadata(actor="b\u00f6b", extra={"ip": "10.0.0.1", "tags": ["x", "y"], "n": 3}),
    ]
    rows: list[Any] = []
    for s in range(streams):
        stream_id = uuid.uuid4()
        first = 0 if s % 10 == 0 else 1  # some aggregates number from 0
        for i in range(8):
            event = NewEvent(
                uuid.uuid4(),
                f"domain.orders:Order.Event{i}",
                payloads[(s + i) % len(payloads)],
                schema_version=1 + i % 3,
                metadata=metadata[(s * i) % len(metadata)],
            )
            row = (stream_id, "Order" if s % 2 else "Customer", first + i, event)
            rows.append((*row, long_ago + timedelta(seconds=s, microseconds=i)) if s % 3 == 0 else row)
    store.import_events(rows[: len(rows) // 2])
    store.import_events(rows[len(rows) // 2 :])  # two transactions: the log interleaves them by commit
    return len(rows)


def stored_fields(e: RecordedEvent) -> tuple[Any, ...]:
    """Every field of an event except where it sits in the log (the importing store's own)."""
    return (
        e.event_id,
        e.stream_id,
        e.stream_type,
        e.stream_version,
        e.event_type,
        e.schema_version,
        e.payload,
        e.metadata,
        e.recorded_at,
    )


def assert_same_log(source: EventStore, target: EventStore, count: int) -> None:
    before = read_all_settled(source, count, limit=count + 1)
    after = read_all_settled(target, count, limit=count + 1)
    assert len(before) == len(after) == count
    assert [stored_fields(e) for e in after] == [stored_fields(e) for e in before]  # same order too
    positions = [e.position for e in after]
    assert positions == sorted(positions)


def count_rows(store: EventStore) -> int:
    with store.pool.connection() as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(store.schema, "events")))
        return int(row.fetchone()[0])  # type: ignore[index]


@pytest.mark.parametrize("name", ["log.jsonl", "log.jsonl.gz"])
def test_export_then_import_gives_byte_identical_events(
    store: EventStore, empty_store: EventStore, tmp_path: Path, name: str
) -> None:
    count = seed(store)
    read_all_settled(store, count, limit=count + 1)
    path = str(tmp_path / name)
    with open_export(path) as out:
        exported = export_log(store, out, batch_size=64)  # several batches
    assert exported.events == count and not os.path.exists(f"{path}.partial")
    raw = Path(path).read_bytes()
    assert raw.startswith(b"\x1f\x8b") == name.endswith(".gz")
    lines = (gzip.decompress(raw) if name.endswith(".gz") else raw).splitlines()
    header, events, trailer = orjson.loads(lines[0]), lines[1:-1], orjson.loads(lines[-1])
    assert header["format"] == "datalayer.events" and header["source_schema"] == store.schema
    assert trailer == {
        "trailer": "datalayer.events",
        "events": count,
        "data_keys": 0,
        "sha256": exported.sha256,
    }
    assert any(b'"payload":{' in line for line in events)  # canonical JSON payloads are readable
    assert any(b'"payload_base64":' in line for line in events)

    with open_import(path) as source:
        imported = import_log(empty_store, source, batch_size=100)
    assert (imported.events, imported.sha256) == (count, exported.sha256)
    assert imported.last_position == exported.last_position
    assert_same_log(store, empty_store, count)
    # Analyzed once imported: a rebuild's reads of it plan by real statistics from the start.
    assert planner_row_estimate(empty_store) == count


def test_encrypted_payloads_round_trip_and_still_decrypt(
    settings: Settings, store: EventStore, empty_store: EventStore, es_env: dict[str, str], tmp_path: Path
) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    cipher = {"CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher", "CIPHER_KEY": key}
    handlers = CommandHandlers(OrdersApplication(env={**es_env, **cipher}))
    customer = handlers.register_customer({"name": "Ann", "email": "ann@example.com", "address": "Elm St 1"})
    handlers.change_customer_address({"customer_id": customer.stream_id, "address": "Oak Rd 2"})
    events = read_all_settled(store, 2)
    # Ciphertext: none of the plaintext shows. (Not "does not start with {": a ciphertext begins
    # with a random nonce, whose first byte is "{" once in 256.)
    assert not any(text in e.payload for e in events for text in (b"Ann", b"Elm St", b"Oak Rd", b"email"))

    path = str(tmp_path / "secret.jsonl.gz")
    with open_export(path) as out:
        export_log(store, out)
    assert b"Oak Rd" not in gzip.decompress(Path(path).read_bytes())
    with open_import(path) as source:
        import_log(empty_store, source)
    assert_same_log(store, empty_store, 2)
    restored = OrdersApplication(env={**settings.eventsourcing_env(empty_store.schema), **cipher})
    assert restored.get_customer(customer.stream_id).address == "Oak Rd 2"


def test_import_refuses_a_store_that_holds_events(
    store: EventStore, empty_store: EventStore, tmp_path: Path
) -> None:
    seed(store, streams=2)
    empty_store.append(uuid.uuid4(), "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}")], 0)
    path = str(tmp_path / "log.jsonl")
    with open_export(path) as out:
        export_log(store, out)
    with (
        pytest.raises(StoreNotEmptyError, match=f"schema {empty_store.schema} already holds 1 events"),
        open_import(path) as source,
    ):
        import_log(empty_store, source)
    assert count_rows(empty_store) == 1


def _cut_trailer(data: bytes) -> bytes:
    return data[: data.rstrip(b"\n").rfind(b"\n") + 1]


def _cut_mid_line(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_a_payload_byte(data: bytes) -> bytes:
    at = data.index(b'"payload_base64":"') + 20
    return data[:at] + (b"A" if data[at : at + 1] != b"A" else b"B") + data[at + 1 :]


def _drop_the_last_event(data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    return b"".join(lines[:-2] + lines[-1:])  # no stream gap: only the trailer can tell


def _gzip_cut(data: bytes) -> bytes:
    packed = gzip.compress(data)
    return packed[: len(packed) - 40]


def _not_an_export(data: bytes) -> bytes:
    return b'{"some": "json"}\n' + data


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_cut_trailer, "without its trailer: it is truncated"),
        (_cut_mid_line, "is not JSON: the file is truncated or damaged|without its trailer"),
        (_flip_a_payload_byte, "do not match the trailer's SHA-256"),
        (_drop_the_last_event, "the trailer counts"),
        (_gzip_cut, "compressed data truncated or damaged"),
        (_not_an_export, "not a datalayer.events export"),
    ],
)
def test_a_truncated_or_damaged_file_imports_nothing(
    store: EventStore,
    empty_store: EventStore,
    tmp_path: Path,
    damage: Callable[[bytes], bytes],
    message: str,
) -> None:
    count = seed(store, streams=30)
    read_all_settled(store, count, limit=count + 1)
    good = tmp_path / "good.jsonl"
    with open_export(str(good)) as out:
        export_log(store, out)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(PortableFileError, match=message) as failure, open_import(str(bad)) as source:
        import_log(empty_store, source, batch_size=50)  # batches were written before the end was read
    assert "nothing was imported" in str(failure.value) or "not a datalayer" in str(failure.value)
    assert count_rows(empty_store) == 0
    with open_import(str(good)) as source:  # and the store is as usable as before
        assert import_log(empty_store, source).events == count


class _Discard:
    """A sink that keeps nothing: what stays in memory is then the export's own doing."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes, /) -> int:
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _export_peak(store: EventStore) -> tuple[int, int]:
    sink = _Discard()
    tracemalloc.start()
    try:
        export_log(store, sink)
        return tracemalloc.get_traced_memory()[1], sink.written
    finally:
        tracemalloc.stop()


def _import_rows(streams: int) -> list[Any]:
    payload = orjson.dumps({"note": "x" * 200, "lines": list(range(20))})
    return [
        (sid, "Order", v, NewEvent(uuid.uuid4(), "domain.orders:Order.Changed", payload))
        for sid in [uuid.uuid4() for _ in range(streams)]
        for v in range(1, 11)
    ]


def test_export_and_import_of_20000_events_run_in_constant_memory(
    store: EventStore, empty_store: EventStore, tmp_path: Path
) -> None:
    store.import_events(_import_rows(1000))
    read_all_settled(store, 10_000, limit=10_001)
    peak_10k, size_10k = _export_peak(store)
    store.import_events(_import_rows(1000))
    read_all_settled(store, 20_000, limit=20_001)
    peak_20k, size_20k = _export_peak(store)
    assert size_20k > 1.9 * size_10k > 5_000_000  # twice the data went through ...
    assert peak_20k < 1.25 * peak_10k  # ... in the same memory: batches, not the whole log
    assert peak_20k < 8_000_000, f"export peak {peak_20k / 1e6:.1f} MB"

    path = str(tmp_path / "big.jsonl.gz")
    with open_export(path) as out:
        export_log(store, out)
    tracemalloc.start()
    try:
        with open_import(path) as source:
            assert import_log(empty_store, source).events == 20_000
        import_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert import_peak < 8_000_000, f"import peak {import_peak / 1e6:.1f} MB"


# -- the console script ------------------------------------------------------------------------------


def run(schema: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, DATALAYER_EVENTSTORE_SCHEMA=schema)
    return subprocess.run([str(BIN), *args], capture_output=True, timeout=120, env=env, input=stdin)


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_export_and_import_round_trip_through_files_and_pipes(
    settings: Settings, store: EventStore, empty_store: EventStore, tmp_path: Path
) -> None:
    count = seed(store, streams=20)
    read_all_settled(store, count, limit=count + 1)
    path = str(tmp_path / "cli.jsonl.gz")
    exported = run(store.schema, "export", path, "--batch-size", "50", "--progress")
    assert exported.returncode == 0, exported.stderr
    assert f"exported {count} events of schema {store.schema}".encode() in exported.stdout
    assert b"events/s" in exported.stderr  # --progress without a terminal: plain lines

    imported = run(empty_store.schema, "import", path)
    assert imported.returncode == 0, imported.stderr
    assert f"imported {count} events into schema {empty_store.schema}".encode() in imported.stdout
    assert imported.stderr == b""  # no progress without a terminal or --progress
    assert_same_log(store, empty_store, count)

    again = run(empty_store.schema, "import", path)
    assert again.returncode == 1
    assert one_line_error(again).startswith(
        f"datalayer import: StoreNotEmptyError: schema {empty_store.schema} already holds {count} events"
    )

    piped = run(store.schema, "export", "-")
    assert piped.returncode == 0 and piped.stdout.startswith(b'{"format":"datalayer.events"')
    fresh = unique_name("restore")
    try:
        from_stdin = run(fresh, "import", "-", stdin=piped.stdout)
        assert from_stdin.returncode == 0, from_stdin.stderr
        assert f"imported {count} events into schema {fresh}".encode() in from_stdin.stdout
    finally:
        with postgres_connection(settings, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(fresh)))


def test_cli_errors_are_one_line_with_the_right_exit_code(
    store: EventStore, empty_store: EventStore, tmp_path: Path
) -> None:
    count = seed(store, streams=10)
    read_all_settled(store, count, limit=count + 1)
    path = tmp_path / "cut.jsonl"
    assert run(store.schema, "export", str(path)).returncode == 0
    path.write_bytes(_cut_trailer(path.read_bytes()))
    truncated = run(empty_store.schema, "import", str(path))
    assert truncated.returncode == 1
    error = one_line_error(truncated)
    assert error.startswith("datalayer import: PortableFileError: the file ends after")
    assert error.endswith(f"nothing was imported into schema {empty_store.schema}")
    assert count_rows(empty_store) == 0

    missing = run(empty_store.schema, "import", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1 and "FileNotFoundError" in one_line_error(missing)
    no_store = run(unique_name("nothing"), "export", str(tmp_path / "x.jsonl"))
    assert no_store.returncode == 1 and "holds no event store" in one_line_error(no_store)
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "x.jsonl.partial").exists()
    bad_batch = run(store.schema, "export", str(tmp_path / "y.jsonl"), "--batch-size", "0")
    assert bad_batch.returncode == 2 and b"is not a whole number >= 1" in bad_batch.stderr
    assert b"example:" in run(store.schema, "export", "--help").stdout
    assert b"example:" in run(store.schema, "import", "--help").stdout


def test_an_export_of_an_empty_store_imports_as_an_empty_store(
    store: EventStore, empty_store: EventStore, tmp_path: Path
) -> None:
    path = str(tmp_path / "empty.jsonl")
    with open_export(path) as out:
        assert export_log(store, out).events == 0
    with open_import(path) as source:
        summary = import_log(empty_store, source)
    assert (summary.events, summary.last_position) == (0, None)
    assert count_rows(empty_store) == 0
