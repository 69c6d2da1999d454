"""The relay's own partition choice is kafka-python's default partitioner's, key for key."""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.partitioner.default import murmur2 as kafka_murmur2

from datalayer.settings import Settings
from eventstore import NewEvent
from eventstore.relay.partitioning import KeyHashes, murmur2
from eventstore.store import EventStore
from tests.helpers import wait_until
from tests.test_relay import caught_up, prefix, read_back, relay_thread

__all__ = ["prefix"]  # the fixture, used by name below


@given(st.binary(max_size=200))
def test_murmur2_is_kafkas(data: bytes) -> None:
    assert murmur2(data) & 0x7FFFFFFF == kafka_murmur2(data) & 0x7FFFFFFF
    assert 0 <= murmur2(data) <= 0xFFFFFFFF


def test_key_hashes_remember_within_their_limit_and_stay_right() -> None:
    hashes = KeyHashes(limit=10)
    keys = [str(uuid.uuid4()).encode() for _ in range(35)]
    for _ in range(2):
        for key in keys:
            assert hashes(key) == kafka_murmur2(key) & 0x7FFFFFFF
            assert hashes.known(key) == hashes(key)
    assert len(hashes._hashes) <= 10


def test_relayed_records_sit_where_the_default_partitioner_puts_their_keys(
    store: EventStore, settings: Settings, prefix: str, kafka_config: dict[str, Any]
) -> None:
    streams = [uuid.uuid4() for _ in range(60)]
    for stream_id in streams:
        store.append(stream_id, "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}")], 0)
    with relay_thread(store, settings, prefix) as relay:  # 3 partitions per topic
        wait_until(lambda: caught_up(relay, len(streams)), timeout=60, what="the relay to publish")
    relayed = {r.envelope.stream_id: r.partition for r in read_back(kafka_config, prefix)}
    assert set(relayed) == set(streams)
    assert len(set(relayed.values())) == 3, "60 keys should reach all three partitions"

    # A plain producer, its default partitioner choosing, on a topic of the same partition count.
    reference = prefix + "reference"
    admin = KafkaAdminClient(**kafka_config)
    producer = KafkaProducer(**kafka_config)
    try:
        admin.create_topics([NewTopic(reference, num_partitions=3, replication_factor=1)])
        futures = {s: producer.send(reference, key=str(s).encode(), value=b"x") for s in streams}
        chosen = {s: f.get(timeout=30).partition for s, f in futures.items()}
    finally:
        producer.close()
        admin.close()
    assert relayed == chosen
    assert all((murmur2(str(s).encode()) & 0x7FFFFFFF) % 3 == chosen[s] for s in streams)
