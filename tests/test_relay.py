"""The relay on real PostgreSQL and Kafka: nothing lost, per-stream order kept, through crashes."""

from __future__ import annotations

import base64
import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from datalayer.settings import Settings
from eventstore import ConcurrencyError, EventMetadata, EventStore, NewEvent
from eventstore.records import LOG_START, LogPosition
from eventstore.relay import EventEnvelope, Relay, RelayConfig, load_checkpoint
from eventstore.relay.reading import RelayReader, log_position
from eventstore.relay.relay import _SentBatch
from eventstore.relay.topics import create_missing_topics
from tests import stack_control
from tests.helpers import unique_name, wait_until

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("datalayer")


@dataclass(frozen=True)
class Published:
    topic: str
    partition: int
    offset: int
    envelope: EventEnvelope


@pytest.fixture
def prefix(kafka_config: dict[str, Any]) -> Iterator[str]:
    """A topic prefix of this test's own; its topics are deleted afterwards."""
    name = unique_name("relaytest") + "."
    yield name
    admin = KafkaAdminClient(**kafka_config)
    try:
        mine = [t for t in admin.list_topics() if t.startswith(name)]
        if mine:
            admin.delete_topics(mine)
    finally:
        admin.close()


def read_back(kafka_config: dict[str, Any], prefix: str) -> list[Published]:
    """Every record of the prefix's topics, from the start to the current end of each partition."""
    consumer = KafkaConsumer(enable_auto_commit=False, **kafka_config)
    try:
        topics = [t for t in consumer.topics() if t.startswith(prefix)]
        partitions = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(partitions)
        records: list[Published] = []

        def done() -> bool:
            for tp, batch in consumer.poll(timeout_ms=500).items():
                records.extend(
                    Published(tp.topic, tp.partition, r.offset, EventEnvelope.model_validate_json(r.value))
                    for r in batch
                )
            return all(consumer.position(tp) >= ends[tp] for tp in partitions)

        wait_until(done, timeout=60, what="reading the topics back")
        return records
    finally:
        consumer.close()


def assert_complete_and_ordered(store: EventStore, records: list[Published]) -> int:
    """Every stored event is in Kafka, each stream in one partition in version order; returns duplicates."""
    stored = store.read_all(limit=1_000_000)
    by_id = {e.event_id: e for e in stored}
    assert {r.envelope.event_id for r in records} == set(by_id), "Kafka and the store hold different events"
    streams: dict[uuid.UUID, list[Published]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        streams[r.envelope.stream_id].append(r)
    for stream_id, published in streams.items():
        assert len({(r.topic, r.partition) for r in published}) == 1, f"stream {stream_id} spans partitions"
        # Redelivery after a crash repeats a run of events; what matters is that no event comes
        # before its predecessor was delivered at least once.
        delivered: set[int] = set()
        for r in published:
            version = r.envelope.stream_version
            assert version == 1 or version - 1 in delivered, (
                f"stream {stream_id}: v{version} before v{version - 1}"
            )
            delivered.add(version)
    for r in records:
        event = by_id[r.envelope.event_id]
        assert r.topic.endswith("." + event.stream_type)
        assert r.envelope.payload_bytes() == event.payload or r.envelope.payload_encoding == "json"
        assert (r.envelope.stream_version, r.envelope.position) == (event.stream_version, event.position)
    return len(records) - len(by_id)


@contextmanager
def relay_thread(store: EventStore, settings: Settings, prefix: str, **config: Any) -> Iterator[Relay]:
    relay = Relay(store, settings.kafka_config(), RelayConfig(topic_prefix=prefix, partitions=3, **config))
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the relay did not stop"


def caught_up(relay: Relay, total: int) -> bool:
    lag = relay.lag()
    return lag.events == 0 and lag.published >= total


def write_concurrently(
    store: EventStore, streams: list[tuple[uuid.UUID, str]], writers: int, appends: int
) -> int:
    written = [0]
    lock = threading.Lock()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(appends):
            stream_id, stream_type = rng.choice(streams)
            events = [
                NewEvent(
                    uuid.uuid4(),
                    f"{stream_type}Changed",
                    b'{"n": %d}' % rng.randint(0, 9),
                    metadata=EventMetadata(actor=f"writer-{seed}"),
                )
                for _ in range(rng.randint(1, 3))
            ]
            while True:
                try:
                    store.append(stream_id, stream_type, events, store.stream_version(stream_id))
                    break
                except ConcurrencyError:
                    continue
                except psycopg.OperationalError:
                    # The server went away (a restart): the append may or may not have committed.
                    # Resubmitting the same event ids is safe either way: stored ones are skipped.
                    threading.Event().wait(0.2)
            with lock:
                written[0] += len(events)

    def guarded(seed: int) -> None:
        try:
            writer(seed)
        except BaseException as exc:  # surfaced in the test's thread below
            failures.append(exc)

    failures: list[BaseException] = []
    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return written[0]


def test_concurrent_writers_reach_kafka_complete_and_in_order(
    store: EventStore, settings: Settings, prefix: str
) -> None:
    streams = [(uuid.uuid4(), kind) for kind in ("Order", "Product", "Customer") for _ in range(10)]
    with relay_thread(store, settings, prefix) as relay:
        total = write_concurrently(store, streams, writers=6, appends=60)
        wait_until(lambda: caught_up(relay, total), timeout=60, what="the relay to publish everything")
    records = read_back(settings.kafka_config(), prefix)
    assert {r.topic for r in records} == {prefix + k for k in ("Order", "Product", "Customer")}
    assert assert_complete_and_ordered(store, records) == 0
    assert all(r.envelope.metadata["actor"].startswith("writer-") for r in records)


def test_a_new_stream_type_gets_its_topic(store: EventStore, settings: Settings, prefix: str) -> None:
    with relay_thread(store, settings, prefix) as relay:
        store.append(uuid.uuid4(), "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}")], 0)
        wait_until(lambda: caught_up(relay, 1), what="the first event")
        store.append(uuid.uuid4(), "Invoice", [NewEvent(uuid.uuid4(), "Issued", b"\x00binary")], 0)
        wait_until(lambda: caught_up(relay, 2), what="the event of a new type")
    consumer = KafkaConsumer(**settings.kafka_config())
    try:
        assert consumer.partitions_for_topic(prefix + "Invoice") == {0, 1, 2}  # as configured
    finally:
        consumer.close()
    (invoice,) = [r for r in read_back(settings.kafka_config(), prefix) if r.topic == prefix + "Invoice"]
    assert invoice.envelope.payload_encoding == "base64"
    assert invoice.envelope.payload_bytes() == b"\x00binary"


class RelayProcess:
    """``datalayer relay`` in a process of its own, its log collected as it runs."""

    def __init__(self, store: EventStore, prefix: str) -> None:
        env = dict(
            os.environ,
            DATALAYER_EVENTSTORE_SCHEMA=store.schema,
            DATALAYER_TOPIC_PREFIX=prefix,
            DATALAYER_TOPIC_PARTITIONS="3",
        )
        self.proc = subprocess.Popen(
            [str(BIN), "relay", "--batch-size", "500"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def active(self) -> bool:
        return any("relay default: active" in line for line in self.log)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def import_streams(store: EventStore, streams: int, per_stream: int) -> int:
    rows = [
        (sid, "Order", v, NewEvent(uuid.uuid4(), "Changed", b'{"v": %d}' % v))
        for sid in (uuid.uuid4() for _ in range(streams))
        for v in range(1, per_stream + 1)
    ]
    return store.import_events(rows)


def checkpointed(store: EventStore) -> int:
    """Events the default relay has checkpointed as acknowledged by Kafka."""
    with store.pool.connection() as conn:
        return load_checkpoint(conn, store.schema, "default").published


def test_relay_killed_mid_stream_resumes_without_loss(
    store: EventStore, settings: Settings, prefix: str
) -> None:
    total = import_streams(store, streams=600, per_stream=50)
    first = RelayProcess(store, prefix)
    try:
        wait_until(lambda: checkpointed(store) > 0, timeout=60, what="the relay to be mid-stream")
        first.kill()
    finally:
        first.proc.kill()
    published_before = checkpointed(store)
    assert published_before < total, "the relay finished before it could be killed mid-stream"
    second = RelayProcess(store, prefix)
    try:
        lag_zero = Relay(store, settings.kafka_config(), RelayConfig(topic_prefix=prefix))
        wait_until(lambda: caught_up(lag_zero, total - published_before), timeout=120, what="the restart")
        assert second.stop() == 0
    finally:
        second.proc.kill()
    duplicates = assert_complete_and_ordered(store, read_back(settings.kafka_config(), prefix))
    print(f"kill -9 mid-stream: {total} events, {duplicates} published twice")


def test_standby_takes_over_when_the_active_relay_dies(
    store: EventStore, settings: Settings, prefix: str
) -> None:
    relays = [RelayProcess(store, prefix), RelayProcess(store, prefix)]
    try:
        wait_until(lambda: sum(r.active for r in relays) == 1, timeout=60, what="one active relay")
        store.append(uuid.uuid4(), "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}")], 0)
        probe = Relay(store, settings.kafka_config(), RelayConfig(topic_prefix=prefix))
        wait_until(lambda: caught_up(probe, 1), timeout=60, what="the active relay to publish")
        (active,) = [r for r in relays if r.active]
        (standby,) = [r for r in relays if not r.active]
        # Under load the second process may still be starting while the first one publishes.
        wait_until(lambda: any("standing by" in line for line in standby.log), timeout=60, what="a standby")
        active.kill()
        store.append(uuid.uuid4(), "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}")], 0)
        wait_until(lambda: standby.active, timeout=15, what="the standby to take over")
        wait_until(lambda: caught_up(probe, 2), timeout=30, what="the standby to publish")
        assert standby.stop() == 0
    finally:
        for r in relays:
            r.proc.kill()
    assert assert_complete_and_ordered(store, read_back(settings.kafka_config(), prefix)) == 0


def test_a_relay_saves_its_checkpoint_once_per_interval_and_at_once_when_told(
    store: EventStore, settings: Settings, prefix: str
) -> None:
    """Acknowledged batches wait for ``checkpoint_interval`` to be saved, unless the relay is going
    idle or stopping (``save_now``); a save covers every batch acknowledged since the last one."""
    for _ in range(3):
        store.append(uuid.uuid4(), "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}")], 0)
    rows = RelayReader(store).read(LOG_START, 10)
    assert len(rows) == 3
    admin = KafkaAdminClient(**settings.kafka_config())
    try:
        create_missing_topics(admin, [f"{prefix}checkpoints"], 1, 1)
    finally:
        admin.close()
    producer = KafkaProducer(**settings.kafka_config())
    try:
        futures = [producer.send(f"{prefix}checkpoints", b"{}") for _ in rows]
        producer.flush()
    finally:
        producer.close()
    relay = Relay(store, settings.kafka_config(), RelayConfig(topic_prefix=prefix, checkpoint_interval=3600))

    def settle(index: int, save_now: bool = False) -> None:
        sent = _SentBatch(rows[index : index + 1], futures[index : index + 1])
        relay._settle(deque([sent]), wait=True, everything=True, save_now=save_now)

    def saved() -> tuple[LogPosition, int]:
        with store.pool.connection() as conn:
            checkpoint = load_checkpoint(conn, store.schema, "default")
        return checkpoint.position, checkpoint.published

    settle(0)  # the first one is saved at once
    assert saved() == (log_position(rows[0]), 1)
    settle(1)  # within the interval: acknowledged, not saved yet
    assert saved() == (log_position(rows[0]), 1)
    settle(2, save_now=True)
    assert saved() == (log_position(rows[2]), 3)


def test_sigterm_flushes_checkpoints_and_exits_zero(
    store: EventStore, settings: Settings, prefix: str
) -> None:
    total = import_streams(store, streams=100, per_stream=20)
    relay = RelayProcess(store, prefix)
    try:
        wait_until(lambda: checkpointed(store) > 0, timeout=60, what="publishing to start")
        assert relay.stop() == 0
    finally:
        relay.proc.kill()
    published = checkpointed(store)
    records = read_back(settings.kafka_config(), prefix)
    # Everything sent before the exit was acknowledged and checkpointed: no record beyond it.
    assert len(records) == published <= total


@pytest.mark.skipif(not stack_control.managed(), reason="needs the local stack that make up runs")
def test_broker_crash_while_publishing_loses_nothing(
    store: EventStore, settings: Settings, prefix: str
) -> None:
    streams = [(uuid.uuid4(), "Order") for _ in range(20)]
    try:
        with relay_thread(store, settings, prefix) as relay:
            first = write_concurrently(store, streams, writers=2, appends=100)
            wait_until(lambda: caught_up(relay, first), timeout=60, what="the first half")
            stack_control.kill_kafka()
            second = write_concurrently(store, streams, writers=2, appends=100)  # while the broker is down
            stack_control.start_stack()
            wait_until(
                lambda: caught_up(relay, first + second), timeout=120, what="publishing after the crash"
            )
    finally:
        stack_control.start_stack()
    duplicates = assert_complete_and_ordered(store, read_back(settings.kafka_config(), prefix))
    print(f"broker crash: {first + second} events, {duplicates} published twice")


@pytest.mark.skipif(not stack_control.managed(), reason="needs the local stack that make up runs")
def test_postgres_restart_while_publishing_loses_nothing(
    store: EventStore, settings: Settings, prefix: str
) -> None:
    streams = [(uuid.uuid4(), "Order") for _ in range(20)]
    with relay_thread(store, settings, prefix) as relay:
        first = write_concurrently(store, streams, writers=2, appends=50)
        wait_until(lambda: caught_up(relay, first), timeout=60, what="the first half")
        stack_control.restart_postgres()
        second = write_concurrently(store, streams, writers=2, appends=50)
        wait_until(
            lambda: _caught_up_after_restart(relay, first + second), timeout=60, what="the relay to reconnect"
        )
    duplicates = assert_complete_and_ordered(store, read_back(settings.kafka_config(), prefix))
    print(f"PostgreSQL restart: {first + second} events, {duplicates} published twice")


def _caught_up_after_restart(relay: Relay, total: int) -> bool:
    try:
        return caught_up(relay, total)
    except psycopg.OperationalError:
        return False


def test_encrypted_payloads_stay_encrypted_in_kafka(
    store: EventStore, settings: Settings, es_env: dict[str, str], prefix: str
) -> None:
    from tests.test_eventstore_features import Clinic, Patient

    key = base64.b64encode(os.urandom(32)).decode()
    app = Clinic(env={**es_env, "CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher", "CIPHER_KEY": key})
    patient = Patient("Ada Lovelace", "Ward 7")
    app.save(patient)
    app.close()
    with relay_thread(store, settings, prefix) as relay:
        wait_until(lambda: caught_up(relay, 1), what="the encrypted event")
    (record,) = read_back(settings.kafka_config(), prefix)
    assert record.envelope.payload_encoding == "base64"
    assert b"Ada Lovelace" not in record.envelope.payload_bytes()
    assert record.envelope.payload_bytes() == store.read_stream(patient.id)[0].payload
    assert record.topic == prefix + "Patient"
