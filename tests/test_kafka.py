"""Kafka answers: keyed records keep per-key order, manual commits stick, a group shares partitions."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from tests.helpers import unique_name, wait_until

PARTITIONS = 4


@pytest.fixture
def topic(kafka_config: dict[str, Any]) -> Iterator[str]:
    admin = KafkaAdminClient(**kafka_config)
    name = unique_name("test.kafka")
    admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)])
    wait_until(lambda: name in admin.list_topics(), what=f"topic {name}")
    yield name
    admin.delete_topics([name])
    admin.close()


def consumer(kafka_config: dict[str, Any], topic: str, group: str) -> KafkaConsumer:
    c = KafkaConsumer(group_id=group, enable_auto_commit=False, auto_offset_reset="earliest", **kafka_config)
    # A group joined before the client knows a just-created topic's partitions assigns none of them
    # until the next metadata refresh (minutes): know them first, as the consumer runtime does.
    wait_until(lambda: c.partitions_for_topic(topic), what=f"partition metadata of {topic}")
    c.subscribe([topic])
    return c


def test_admin_created_topic_with_partitions(kafka_config: dict[str, Any], topic: str) -> None:
    c = KafkaConsumer(**kafka_config)
    assert c.partitions_for_topic(topic) == set(range(PARTITIONS))
    c.close()


def test_keyed_order_and_manual_commits(kafka_config: dict[str, Any], topic: str) -> None:
    keys, per_key = [f"stream-{i}" for i in range(12)], 25
    producer = KafkaProducer(acks="all", enable_idempotence=True, linger_ms=5, **kafka_config)
    for seq in range(per_key):
        for key in keys:
            producer.send(topic, key=key.encode(), value=json.dumps({"seq": seq}).encode())
    producer.flush(timeout=30)
    producer.close()

    group = unique_name("group")
    c = consumer(kafka_config, topic, group)
    seen: dict[str, list[int]] = defaultdict(list)
    partitions_of: dict[str, set[int]] = defaultdict(set)

    def consume_all() -> bool:
        for tp, records in c.poll(timeout_ms=500).items():
            for r in records:
                seen[r.key.decode()].append(json.loads(r.value)["seq"])
                partitions_of[r.key.decode()].add(tp.partition)
        return sum(map(len, seen.values())) >= len(keys) * per_key

    wait_until(consume_all, timeout=60, what="all records")
    c.commit()
    assert sorted(seen) == sorted(keys)
    for key in keys:
        assert seen[key] == list(range(per_key)), f"order broken for {key}"
        assert len(partitions_of[key]) == 1, f"{key} spread over partitions"

    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    ends = c.end_offsets(tps)
    assert {tp: c.committed(tp) for tp in tps} == ends
    assert sum(ends.values()) == len(keys) * per_key
    c.close()

    # A new member of the group resumes from the committed offsets: nothing is redelivered.
    again = consumer(kafka_config, topic, group)
    wait_until(lambda: again.poll(timeout_ms=200) == {} and again.assignment(), what="assignment")
    assert {tp: again.position(tp) for tp in tps} == ends
    again.close()


def test_second_consumer_shares_the_partitions(kafka_config: dict[str, Any], topic: str) -> None:
    group = unique_name("group")
    first = consumer(kafka_config, topic, group)
    wait_until(
        lambda: first.poll(timeout_ms=100) is not None and len(first.assignment()) == PARTITIONS,
        what="first consumer owning every partition",
    )
    second = consumer(kafka_config, topic, group)

    def shared() -> bool:
        first.poll(timeout_ms=100)
        second.poll(timeout_ms=100)
        a, b = first.assignment(), second.assignment()
        return bool(a) and bool(b) and not (a & b) and len(a | b) == PARTITIONS

    wait_until(shared, timeout=60, what="the group to split the partitions")
    second.close()
    # When a member leaves, the other takes its partitions back.
    wait_until(
        lambda: first.poll(timeout_ms=100) is not None and len(first.assignment()) == PARTITIONS,
        timeout=60,
        what="the partitions to return to the first consumer",
    )
    first.close()
