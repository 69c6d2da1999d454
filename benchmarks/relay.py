"""Relay throughput and latency, against the raw kafka-python producer in the same run.

(a) **relay**: 200,000 events already in the store, published by :class:`eventstore.relay.Relay`
    until Kafka acknowledged all of them and the checkpoint says so (events/s);
(b) **raw producer** (the ceiling): the same 200,000 envelopes (byte for byte what the relay
    sends: key, value and headers), built beforehand and held in memory, sent by one kafka-python
    producer with the relay's settings, until flushed (events/s); kafka-python is client-bound, so
    this is what one Python process can push at all;
(c) **latency**: from ``Application.save()`` returning (in a writer process of its own) to the relay
    having the event acknowledged by Kafka, at a steady 1,000 events/s for 10 s: p50 and p99. It is
    measured first, on the store with its 200,000 events of history and the relay caught up; the
    bulk rounds come after it, so that their aftermath is not measured as steady-state latency.
    The writer's first second is a warm-up, relayed but not in the figures: its first event is of a
    new stream type, and the relay creates that topic and waits for the new partitions' leaders
    (150-200 ms, once per stream type), which is not steady state. Its worst latency is printed.

(b') **raw producer, partitions given** (like for like, for information): (b) again, but with each
    record's partition computed before the clock (the default partitioner's choice, from
    kafka-python's own murmur2) and passed to ``send``. The relay passes the partition too (the
    same choice, computed cheaper than kafka-python's per-record partitioner does it), so (b) is no
    longer a ceiling for it; (b') is: it shows what the relay's own work still costs.

Rounds of (a), (b) and (b') alternate so that a noisy 2-core machine affects all alike; figures are
medians. The last line is one JSON object with the figures: ``ratio`` is a / b, as the target is
defined; ``ratio_given_partitions`` is a / b'.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.partitioner.default import murmur2
from psycopg import sql

from datalayer.settings import Settings, load_settings
from eventstore import LOG_START, EventStore, NewEvent
from eventstore.relay.reading import POSITION, RecordHeaders, RelayReader, RelayRow, log_position
from eventstore.relay.relay import PRODUCER_SETTINGS, Relay, RelayConfig, relay_record

EVENTS = 200_000
STREAMS = 20_000
ROUNDS = 3
PARTITIONS = 6
LATENCY_RATE = 1000  # events/s
LATENCY_SECONDS = 10.0
LATENCY_WARMUP_SECONDS = 1.0
TARGET_RATIO = 0.8
TARGET_P99_MS = 50.0


class Account(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner


class Accounts(Application[uuid.UUID]):
    pass


def fill_store(store: EventStore) -> None:
    per_stream = EVENTS // STREAMS
    rows = [
        (
            sid,
            "Order",
            v,
            NewEvent(
                uuid.uuid4(),
                "OrderLineAdded",
                json.dumps(
                    {
                        "sku": f"SKU-{v:05d}",
                        "quantity": v,
                        "price": "12.50",
                        "note": "benchmark payload of about a hundred bytes",
                    }
                ).encode(),
            ),
        )
        for sid in (uuid.uuid4() for _ in range(STREAMS))
        for v in range(1, per_stream + 1)
    ]
    store.import_events(rows)


def raw_records(store: EventStore) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """Key, envelope and headers of the pre-written events, byte for byte what the relay sends.

    They are the first ``EVENTS`` of the log (one import); the latency run's events follow them.
    """
    reader, headers = RelayReader(store), RecordHeaders()
    records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
    position = LOG_START
    while len(records) < EVENTS and (batch := reader.read(position, min(10_000, EVENTS - len(records)))):
        records.extend(relay_record(row, headers) for row in batch)
        position = log_position(batch[-1])
    assert len(records) == EVENTS
    return records


def relay_round(store: EventStore, settings: Settings, prefix: str, name: str) -> float:
    done = threading.Event()
    published = [0]

    def count(batch: Sequence[RelayRow]) -> None:
        published[0] += len(batch)
        if published[0] >= EVENTS:
            done.set()

    relay = Relay(
        store,
        settings.kafka_config(),
        RelayConfig(name=name, topic_prefix=prefix, partitions=PARTITIONS),
        on_published=count,
    )
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,))
    started = time.perf_counter()
    thread.start()
    if not done.wait(timeout=600):
        raise RuntimeError(f"the relay published {published[0]} of {EVENTS} in 600 s")
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join()
    return EVENTS / elapsed


def raw_round(
    settings: Settings,
    topic: str,
    values: list[tuple[bytes, bytes, list[tuple[str, bytes]]]],
    partitions: list[int] | None = None,
) -> float:
    """(b), or with ``partitions`` (each record's, in order) (b')."""
    producer = KafkaProducer(**PRODUCER_SETTINGS, **settings.kafka_config())
    producer.partitions_for(topic)  # metadata fetched before the clock starts, as the relay's is
    started = time.perf_counter()
    if partitions is None:
        for key, value, headers in values:
            producer.send(topic, key=key, value=value, headers=headers)
    else:
        for (key, value, headers), partition in zip(values, partitions, strict=True):
            producer.send(topic, key=key, value=value, headers=headers, partition=partition)
    producer.flush()
    elapsed = time.perf_counter() - started
    producer.close()
    return EVENTS / elapsed


def default_partitions(values: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> list[int]:
    """Each record's partition as kafka-python's default partitioner picks it (topics of PARTITIONS)."""
    return [(murmur2(key) & 0x7FFFFFFF) % PARTITIONS for key, _, _ in values]


def paced_writer(schema: str) -> None:
    """The latency workload, run in a process of its own: save at a steady rate, print when each returned.

    A separate process, as a service would be: in the relay's process it would compete with the
    relay for the interpreter lock and measure that instead.
    """
    settings = load_settings()
    app = Accounts(env={**settings.eventsourcing_env(schema), "CREATE_TABLE": "no"})
    interval = 1.0 / LATENCY_RATE
    deadline = time.perf_counter()
    timed_from = deadline + LATENCY_WARMUP_SECONDS
    end = timed_from + LATENCY_SECONDS
    pause = threading.Event()
    while deadline < end:
        ahead = deadline - time.perf_counter()
        if ahead > 0:
            pause.wait(ahead)  # pacing the workload, not waiting for a result
        recordings = app.save(Account("x"))
        print(recordings[-1].notification.id, time.time(), int(deadline >= timed_from), flush=False)
        deadline += interval
    app.close()
    sys.stdout.flush()


def latency(store: EventStore, settings: Settings, prefix: str) -> tuple[list[float], list[float]]:
    """Milliseconds from save() returning (in the writer process) to the relay's acknowledgement.

    Returns the timed events' latencies, then the warm-up's.
    """
    acknowledged_at: dict[int, float] = {}

    def acknowledged(batch: Sequence[RelayRow]) -> None:
        now = time.time()
        for row in batch:
            acknowledged_at[row[POSITION]] = now

    relay = Relay(
        store,
        settings.kafka_config(),
        RelayConfig(name="latency", topic_prefix=prefix, partitions=PARTITIONS),
        on_published=acknowledged,
    )
    # Start after what is already there: only the paced events are timed.
    with store.pool.connection() as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (relay_name, transaction_id, position) SELECT 'latency', transaction_id,"
                " position FROM {} ORDER BY transaction_id DESC, position DESC LIMIT 1"
            ).format(
                sql.Identifier(store.schema, "relay_checkpoints"), sql.Identifier(store.schema, "events")
            )
        )
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,))
    thread.start()
    try:
        writer = subprocess.run(
            [sys.executable, __file__, "--paced-writer", store.schema],
            capture_output=True,
            text=True,
            check=True,
            timeout=LATENCY_WARMUP_SECONDS + LATENCY_SECONDS + 120,
        )
        lines = [line.split() for line in writer.stdout.splitlines()]
        saved_at = {int(p): float(t) for p, t, _ in lines}
        timed = {int(p) for p, _, is_timed in lines if is_timed == "1"}
        give_up = time.monotonic() + 30
        while not saved_at.keys() <= acknowledged_at.keys() and time.monotonic() < give_up:
            stop.wait(0.05)  # bounded: the relay acknowledges the last events or the run fails below
    finally:
        stop.set()
        thread.join()
    missing = saved_at.keys() - acknowledged_at.keys()
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(saved_at)} paced events were not acknowledged")
    # The relay may have Kafka's acknowledgement before save() has returned: that is 0 ms.
    latencies = {p: max(0.0, acknowledged_at[p] - t) * 1000 for p, t in saved_at.items()}
    return [ms for p, ms in latencies.items() if p in timed], [
        ms for p, ms in latencies.items() if p not in timed
    ]


def settle(store: EventStore) -> None:
    """Let the server finish the upkeep the bulk rounds caused before measuring a steady rate.

    Statistics are brought up to date now, and autovacuum is given up to a minute to finish: the
    latency figure is for a steady 1,000 events/s, not for the aftermath of 600,000 bulk writes.
    """
    with store.pool.connection() as conn:
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(store.schema, "events")))
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
            ).fetchone()
            if row is None or row[0] == 0:
                break
            threading.Event().wait(0.5)  # bounded by give_up


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    settings = load_settings()
    schema = f"bench_relay_{uuid.uuid4().hex[:8]}"
    run_id = uuid.uuid4().hex[:8]
    store = EventStore.connect(
        settings.psycopg_url(), schema=schema, max_size=8, connect_kwargs=settings.postgres_connect_kwargs()
    )
    prefixes: list[str] = []
    try:
        store.migrate()
        fill_store(store)
        # Latency first: a store with 200,000 events of history, the relay caught up, and a steady
        # 1,000 events/s. After the throughput rounds the broker and the server are still digesting
        # 600,000 bulk records, and the tail would measure that instead (p99 around 100 ms).
        settle(store)
        latency_prefix = f"bench.{run_id}.latency."
        prefixes.append(latency_prefix)
        latencies, warmup = latency(store, settings, latency_prefix)
        print(
            f"latency warm-up ({len(warmup)} events, a new topic): worst {max(warmup):.1f} ms; "
            f"timed ({len(latencies)} events): worst {max(latencies):.1f} ms"
        )
        values = raw_records(store)
        partitions = default_partitions(values)
        # The 200,000 prepared envelopes (and partitions) live for the whole run: keep them out of the garbage
        # collector's way, or its full passes over them would be charged to whatever runs then.
        gc.collect()
        gc.freeze()
        print(
            f"{EVENTS:,} events in the store ({STREAMS:,} streams), envelopes of "
            f"{statistics.median(len(v[1]) for v in values):.0f} bytes (median); {ROUNDS} rounds each"
        )
        relay_rates: list[float] = []
        raw_rates: list[float] = []
        given_rates: list[float] = []
        admin = KafkaAdminClient(**settings.kafka_config())
        for round_no in range(1, ROUNDS + 1):
            prefix = f"bench.{run_id}.r{round_no}."
            prefixes.append(prefix)
            relay_rates.append(relay_round(store, settings, prefix, name=f"bench{round_no}"))
            print(f"  round {round_no}: relay        {relay_rates[-1]:>9,.0f} events/s")
            raw_topic = prefix + "raw"
            admin.create_topics([NewTopic(raw_topic, num_partitions=PARTITIONS, replication_factor=1)])
            raw_rates.append(raw_round(settings, raw_topic, values))
            print(f"  round {round_no}: raw producer {raw_rates[-1]:>9,.0f} events/s")
            given_topic = prefix + "raw_given"
            admin.create_topics([NewTopic(given_topic, num_partitions=PARTITIONS, replication_factor=1)])
            given_rates.append(raw_round(settings, given_topic, values, partitions))
            print(f"  round {round_no}: raw, given   {given_rates[-1]:>9,.0f} events/s (partitions given)")
        admin.close()
    finally:
        store.close()
        cleanup(settings, schema, prefixes)

    relay_rate, raw_rate = statistics.median(relay_rates), statistics.median(raw_rates)
    given_rate = statistics.median(given_rates)
    figures: dict[str, Any] = {
        "relay_events_per_s": round(relay_rate, 1),
        "raw_producer_per_s": round(raw_rate, 1),
        "ratio": round(relay_rate / raw_rate, 3),
        "latency_p50_ms": round(percentile(latencies, 0.50), 2),
        "latency_p99_ms": round(percentile(latencies, 0.99), 2),
        "raw_given_partitions_per_s": round(given_rate, 1),
        "ratio_given_partitions": round(relay_rate / given_rate, 3),
    }
    print()
    print(f"{'measurement':<44}value")
    print("-" * 60)
    print(f"{'(a) relay, store -> Kafka acknowledged':<44}{relay_rate:>10,.0f} events/s")
    print(f"{'(b) raw kafka-python producer, from memory':<44}{raw_rate:>10,.0f} events/s")
    print(f"{'    a / b':<44}{figures['ratio']:>10.3f}")
    given_label, given_ratio_label = "(b') raw producer, partitions given", "    a / b' (for information)"
    print(f"{given_label:<44}{given_rate:>10,.0f} events/s")
    print(f"{given_ratio_label:<44}{figures['ratio_given_partitions']:>10.3f}")
    print(f"{'(c) latency save() -> acknowledged, p50':<44}{figures['latency_p50_ms']:>10.2f} ms")
    print(
        f"{'    p99 (at 1,000 events/s, ' + str(len(latencies)) + ' events)':<44}"
        f"{figures['latency_p99_ms']:>10.2f} ms"
    )
    print()
    print(f"target ratio >= {TARGET_RATIO}: {'met' if figures['ratio'] >= TARGET_RATIO else 'NOT met'}")
    print(
        f"target p99 <= {TARGET_P99_MS:.0f} ms: "
        f"{'met' if figures['latency_p99_ms'] <= TARGET_P99_MS else 'NOT met'}"
    )
    print(json.dumps(figures))


def cleanup(settings: Settings, schema: str, prefixes: list[str]) -> None:
    with psycopg.connect(
        settings.psycopg_url(), autocommit=True, **settings.postgres_connect_kwargs()
    ) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    admin = KafkaAdminClient(**settings.kafka_config())
    try:
        mine = [t for t in admin.list_topics() if any(t.startswith(p) for p in prefixes)]
        if mine:
            admin.delete_topics(mine)
    finally:
        admin.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--paced-writer"]:
        paced_writer(sys.argv[2])
    else:
        main()
