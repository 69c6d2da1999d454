"""Topic names and creation, shared by the relay (which publishes) and consumers (which subscribe)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

_TOPIC_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def topic_for(prefix: str, stream_type: str) -> str:
    """``prefix + stream type``, with characters Kafka does not allow replaced by ``_``."""
    return (prefix + _TOPIC_CHARS.sub("_", stream_type))[:249]


def create_missing_topics(
    admin: KafkaAdminClient, names: Collection[str], partitions: int, replication_factor: int
) -> set[str]:
    """Create those of ``names`` that do not exist yet; returns the ones this call created.

    Another process creating the same topic meanwhile is not an error: the topic exists either way.
    """
    missing = set(names) - set(admin.list_topics())
    if not missing:
        return set()
    rf = replication_factor
    new = [NewTopic(t, num_partitions=partitions, replication_factor=rf) for t in sorted(missing)]
    with contextlib.suppress(TopicAlreadyExistsError):
        admin.create_topics(new)
    return missing
