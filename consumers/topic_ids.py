"""Which topic a stored Kafka offset belongs to: the topic's id, kept with the offsets.

An offset names a record only within one topic. A topic deleted and created again (a Kafka cluster
replaced or wiped, a topic dropped by hand) has the same name and new records from offset 0; a
consumer seeking to an offset stored for the old topic would skip every record before it in the
new one. Kafka gives each topic a UUID when it is created, so the consumer stores that id with its
offsets, in the same transaction, and on assignment compares it with the topic's id now.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["current_topic_ids", "recreated_topics", "topic_id_checkpoint"]


def topic_id_checkpoint(topic: str) -> str:
    """The checkpoint holding ``topic``'s id: ``topic#id`` (Kafka topic names cannot hold ``#``)."""
    return f"{topic}#id"


def current_topic_ids(consumer: Any, topics: Iterable[str]) -> dict[str, str]:
    """Each of ``topics``' id as the client's metadata has it (canonical UUID text); a topic whose
    id the client does not know (a broker before Kafka 2.8, a kafka-python without topic ids) is
    left out, and its offsets are trusted as before."""
    cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
    topic_id = getattr(cluster, "topic_id", None)
    if topic_id is None:
        return {}
    found: dict[str, str] = {}
    for topic in topics:
        value = topic_id(topic)
        # Kafka's "no id" is the all-zero UUID.
        if value is not None and value.int != 0:
            found[topic] = str(value)
    return found


def recreated_topics(stored: Mapping[str, str], current: Mapping[str, str]) -> set[str]:
    """The topics whose stored id differs from their id now: created again since those offsets."""
    return {
        topic
        for topic, now in current.items()
        if (before := stored.get(topic_id_checkpoint(topic))) is not None and before != now
    }
