"""A group consumer finishes a rebalance that outlives its poll() (consumers.group_join).

kafka-python 3.0.12 alone fails the first test every time: after the topic appears, the client
rejoins the group, reads none of the rejoin's result, and holds no partition from then on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from consumers.group_join import fix_group_join
from tests.helpers import unique_name, wait_until

RECORDS = 30


def group_consumer(kafka_config: dict[str, Any]) -> KafkaConsumer:
    group = unique_name("test.join")
    return KafkaConsumer(
        group_id=group, enable_auto_commit=False, auto_offset_reset="earliest", **kafka_config
    )


@pytest.fixture
def admin(kafka_config: dict[str, Any]) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(**kafka_config)
    yield client
    client.close()


def test_a_topic_that_appears_is_consumed_by_a_client_polling_without_a_timeout(
    kafka_config: dict[str, Any], admin: KafkaAdminClient
) -> None:
    first, later = unique_name("test.join.first"), unique_name("test.join.later")
    admin.create_topics([NewTopic(first, num_partitions=3, replication_factor=1)])
    consumer = group_consumer(kafka_config)
    producer = KafkaProducer(**kafka_config)
    try:
        assert fix_group_join(consumer)
        consumer.subscribe([first, later])
        wait_until(
            lambda: consumer.poll(timeout_ms=100) is not None and consumer.assignment(), what="an assignment"
        )

        # The new topic makes the client rejoin; polls with no timeout never wait for that join.
        admin.create_topics([NewTopic(later, num_partitions=3, replication_factor=1)])
        for i in range(RECORDS):
            producer.send(later, key=str(i).encode(), value=b"x")
        producer.flush()
        received: list[int] = []

        def all_received() -> bool:
            polled = consumer.poll(timeout_ms=0)
            received.extend(len(records) for tp, records in polled.items() if tp.topic == later)
            return sum(received) >= RECORDS

        wait_until(all_received, timeout=30, interval=0.001, what=f"{RECORDS} records of {later}")
        assert sum(received) == RECORDS
        assert {tp.topic for tp in consumer.assignment()} == {first, later}
    finally:
        consumer.close(autocommit=False)
        producer.close()
        admin.delete_topics([first, later])


def test_a_fixed_client_joins_and_settles(kafka_config: dict[str, Any], admin: KafkaAdminClient) -> None:
    topic = unique_name("test.join.plain")
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    consumer = group_consumer(kafka_config)
    try:
        assert fix_group_join(consumer)
        wait_until(lambda: consumer.partitions_for_topic(topic), what=f"partition metadata of {topic}")
        consumer.subscribe([topic])
        wait_until(lambda: consumer.poll(timeout_ms=0) is not None and len(consumer.assignment()) == 2)
        assert not consumer._coordinator.need_rejoin()  # joined: nothing left in flight
    finally:
        consumer.close(autocommit=False)
        admin.delete_topics([topic])
