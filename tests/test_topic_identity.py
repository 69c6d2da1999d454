"""A topic deleted and created again: stored offsets name the old topic's records, never the new one's."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from sqlalchemy import Engine

from consumers.runtime import ProjectionConsumer
from consumers.topic_ids import current_topic_ids, recreated_topics, topic_id_checkpoint
from datalayer.settings import Settings
from eventstore import EventStore
from tests.helpers import wait_until
from tests.pipeline import Pipeline, pipeline


@pytest.fixture
def pl(settings: Settings, store: EventStore, engine: Engine, redis_conn: redis.Redis) -> Iterator[Pipeline]:
    with pipeline(settings, store, engine, redis_conn) as p:
        yield p


def test_only_a_stored_id_that_differs_marks_a_topic_created_again() -> None:
    stored = {"t:0": "5", topic_id_checkpoint("t"): "a", topic_id_checkpoint("u"): "b"}
    assert recreated_topics(stored, {"t": "a", "u": "c", "v": "d"}) == {"u"}
    assert recreated_topics({"t:0": "5"}, {"t": "a"}) == set()  # offsets stored before ids were


def test_a_consumer_restarted_on_a_topic_created_again_reads_it_from_its_beginning(pl: Pipeline) -> None:
    """Without the topic's id beside its offsets, the restarted consumer would seek to the old
    topic's offsets in the new one and never apply the records before them."""
    kafka = pl.settings.kafka_config()
    topic = f"{pl.topic_prefix}Order"
    pl.start_relay()
    customer, products = pl.seed_catalog(2)
    pl.order_flow(customer, products, 5)

    group = pl.group_id("views")
    first = ProjectionConsumer(pl.views.projection, pl.views, kafka, pl.consumer_config(group_id=group))
    stop = threading.Event()
    thread = threading.Thread(target=first.run, args=(stop,), daemon=True)
    thread.start()
    wait_until(first.running.is_set, what="the consumer to start")
    pl.wait_caught_up(pl.views)
    probe = KafkaConsumer(**kafka)
    try:
        old_id = current_topic_ids(probe, [topic]).get(topic) if probe.partitions_for_topic(topic) else None
    finally:
        probe.close()
    assert old_id is not None
    stored = pl.views.checkpoints()
    assert stored[topic_id_checkpoint(topic)] == old_id
    stop.set()
    thread.join(timeout=60)
    assert not thread.is_alive()

    admin = KafkaAdminClient(**kafka)
    try:
        admin.delete_topics([topic])

        def created_again() -> bool:
            try:
                admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])
            except TopicAlreadyExistsError:  # still being deleted
                return False
            return True

        wait_until(created_again, what=f"{topic} created again")
    finally:
        admin.close()

    # New orders go to the new topic, until some partition of it holds more records than the
    # offset stored for it: a seek to that offset would skip the ones before.
    offsets = {int(source.rpartition(":")[2]): int(position) for source, position in stored.items()
               if source.startswith(f"{topic}:")}  # fmt: skip
    probe = KafkaConsumer(**kafka)
    try:
        partitions = [TopicPartition(topic, p) for p in range(6)]

        def past_a_stored_offset() -> bool:
            pl.order_flow(customer, products, 20)
            relay = pl.relay
            assert relay is not None
            wait_until(lambda: relay.lag().events == 0, what="the relay to publish")
            ends = probe.end_offsets(partitions)
            return any(ends[tp] > offsets.get(tp.partition, 0) > 0 for tp in partitions)

        wait_until(past_a_stored_offset, timeout=120, what="the new topic to grow past a stored offset")
    finally:
        probe.close()

    pl.start_consumer(pl.views, group_id=group)  # stopped by the pipeline
    pl.wait_caught_up(pl.views)
    assert pl.read_model(pl.views) == pl.read_model(pl.fresh_replay(pl.views))
    new_id = pl.views.checkpoints()[topic_id_checkpoint(topic)]
    assert new_id != old_id
