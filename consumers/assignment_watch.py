"""Notices a consumer left holding no partition by a rebalance that never finished.

kafka-python 3.0.x can revoke every partition of a consumer in a rebalance and never complete the
rejoin (dpkp/kafka-python#3131 reports the same symptom): the client then fetches nothing while the
broker still lists it as a member, so the projection silently stops. We saw it under load. The
runtime asks this watch on every empty poll and replaces the client when it says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer

log = logging.getLogger("datalayer.consumer")


class AssignmentWatch:
    """Says when a consumer held no partition for ``limit_s`` although its group should give it one.

    A member may rightly hold nothing when the group has at least as many members as the topics
    have partitions; only with fewer members is an empty assignment a fault. The group is described
    at most once per ``limit_s``, and only while the assignment is empty.
    """

    def __init__(
        self,
        group: str,
        topics: list[str],
        kafka_config: dict[str, Any],
        limit_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.group = group
        self.topics = topics
        self.kafka_config = kafka_config
        self.limit_s = limit_s
        self.clock = clock
        self._empty_since: float | None = None
        self._checked_at = float("-inf")

    def reset(self) -> None:
        """Start over, e.g. with a new client."""
        self._empty_since = None
        self._checked_at = float("-inf")

    def stuck(self, consumer: KafkaConsumer) -> bool:
        """Whether ``consumer`` has held no partition for ``limit_s`` while its group is short of members."""
        if consumer.assignment():
            self._empty_since = None
            return False
        now = self.clock()
        if self._empty_since is None:
            self._empty_since = now
        if now - self._empty_since < self.limit_s or now - self._checked_at < self.limit_s:
            return False
        self._checked_at = now
        partitions = sum(len(consumer.partitions_for_topic(t) or ()) for t in self.topics)
        members = self.group_members()
        if members is None or members >= partitions:
            return False
        log.warning(
            "consumer group %s: this member has held no partition for %.0f s although the group has "
            "%d member(s) for %d partitions (a rebalance that never finished): rejoining with a new client",
            self.group,
            now - self._empty_since,
            members,
            partitions,
        )
        return True

    def group_members(self) -> int | None:
        """The members the broker lists in the group, or None when it cannot say."""
        try:
            admin = KafkaAdminClient(**self.kafka_config)
        except Exception as exc:  # the broker is away: the poll loop's own errors will say so
            log.debug("consumer group %s: cannot describe it: %s", self.group, exc)
            return None
        try:
            described = admin.describe_groups([self.group]).get(self.group) or {}
        except Exception as exc:
            log.debug("consumer group %s: cannot describe it: %s", self.group, exc)
            return None
        finally:
            admin.close()
        if described.get("error"):
            return 0  # no such group on the broker: nobody is a member, this client included
        return len(described.get("members") or ())
