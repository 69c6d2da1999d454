"""The commit-ordered log under stress: concurrent writers, transactions held open, rolled back, killed.

A reader following ``read_all`` must see every committed event exactly once, each stream in version
order, and never an event whose transaction did not commit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from pathlib import Path

from datalayer.clients import postgres_connection
from datalayer.settings import Settings
from eventstore import ConcurrencyError, EventStore, LogFollower, NewEvent, RecordedEvent, StreamAppend
from tests.helpers import read_all_settled, wait_until

STREAMS = 24
WRITERS = 8
HOLDERS = 3  # of the writers: keep their transaction open a while, and sometimes roll it back
OPS_PER_WRITER = 120


def _events(n: int) -> list[NewEvent]:
    return [NewEvent(uuid.uuid4(), "Happened", b"{}") for _ in range(n)]


def test_reader_sees_every_committed_event_once_in_stream_order(
    store: EventStore, settings: Settings
) -> None:
    streams = [uuid.uuid4() for _ in range(STREAMS)]
    committed: set[uuid.UUID] = set()
    rolled_back: set[uuid.UUID] = set()
    lock = threading.Lock()
    conflicts = [0]
    seen: list[RecordedEvent] = []
    stop_reader = threading.Event()

    def writer(index: int) -> None:
        rng = random.Random(index)
        holder = index < HOLDERS
        conn = postgres_connection(settings, autocommit=True) if holder else None
        try:
            for _ in range(OPS_PER_WRITER):
                stream = rng.choice(streams)
                events = _events(rng.randint(1, 3))
                expected = store.stream_version(stream)
                try:
                    if conn is None:
                        store.append(stream, "Stress", events, expected)
                        outcome = True
                    else:
                        with conn.transaction():
                            store.append_in(conn, [StreamAppend(stream, "Stress", expected, tuple(events))])
                            threading.Event().wait(rng.uniform(0, 0.03))  # hold the transaction open
                            outcome = rng.random() > 0.25
                            if not outcome:
                                raise _Rollback  # leaves the transaction rolled back
                except ConcurrencyError:
                    with lock:
                        conflicts[0] += 1
                    continue
                except _Rollback:
                    outcome = False
                with lock:
                    (committed if outcome else rolled_back).update(e.event_id for e in events)
        finally:
            if conn is not None:
                conn.close()

    def reader() -> None:
        follower = LogFollower(store, batch_size=200, poll_interval=0.05)
        for batch in follower.batches(stop_reader):
            seen.extend(batch)

    reader_thread = threading.Thread(target=reader, daemon=True)
    reader_thread.start()
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    wait_until(lambda: len(seen) >= len(committed), timeout=60, what="the reader to catch up")
    stop_reader.set()
    reader_thread.join(timeout=30)

    ids = [e.event_id for e in seen]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    assert set(ids) == committed, "the reader missed a committed event or saw an uncommitted one"
    assert not set(ids) & rolled_back
    assert rolled_back and conflicts[0] > 0, "the workload did not exercise rollbacks and conflicts"
    assert [e.log_position for e in seen] == sorted(e.log_position for e in seen)
    versions: dict[uuid.UUID, list[int]] = defaultdict(list)
    for e in seen:
        versions[e.stream_id].append(e.stream_version)
    for stream, got in versions.items():
        assert got == list(range(1, len(got) + 1)), f"stream {stream} out of order: {got[:20]}"
    assert len(read_all_settled(store, len(committed))) == len(committed)  # and the table holds nothing else


class _Rollback(Exception):
    """Raised inside ``conn.transaction()`` to roll it back on purpose."""


WRITER_SCRIPT = """
import sys, uuid
from eventstore import EventStore, NewEvent, StreamAppend
from datalayer.clients import postgres_connection
from datalayer.settings import load_settings
settings = load_settings()
store = EventStore.connect(settings.psycopg_url(), schema=sys.argv[1])
conn = postgres_connection(settings, autocommit=True)
conn.execute("BEGIN")
store.append_in(conn, [StreamAppend(uuid.UUID(sys.argv[2]), "Doomed", 0,
                                    (NewEvent(uuid.uuid4(), "Written", b"{}"),))])
print(conn.info.backend_pid, flush=True)
sys.stdin.read()  # hold the transaction open until killed
"""


def test_writer_killed_mid_transaction_loses_only_its_own_events(store: EventStore) -> None:
    doomed = uuid.uuid4()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, store.schema, str(doomed)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env=dict(os.environ),
    )
    try:
        assert proc.stdout is not None
        backend = int(proc.stdout.readline())
        survivor = store.append(uuid.uuid4(), "Survivor", _events(2), 0)
        wait_until(lambda: store.horizon().blocking_pid == backend, what="the writer to hold readers back")
        assert store.read_all() == []
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # PostgreSQL aborts the dead client's transaction; readers move on without its event.
        seen = wait_until(lambda: store.read_all(), timeout=60, what="the horizon to move on")
        assert [e.position for e in seen] == list(survivor.positions)
        assert store.read_stream(doomed) == []
        assert not store.horizon().stalled
    finally:
        proc.kill()
        proc.wait(timeout=30)
