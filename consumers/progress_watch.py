"""Notices a consumer that holds partitions with records waiting and fetches none of them.

The assignment watch covers a client left holding nothing. This covers the other way a Kafka
client can stall for good: partitions still assigned, records there to read, and every poll empty
(a rebalance that never finished leaving them marked as revoked, as the join race in
``consumers.group_join`` did, or any like fault still unknown). The runtime asks it on every empty
poll and replaces the client when it says so; a new client resumes from the target's checkpoints,
so nothing is lost or applied twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kafka import KafkaConsumer

log = logging.getLogger("datalayer.consumer")


class ProgressWatch:
    """Says when a consumer's polls came back empty for ``limit_s`` while its partitions hold records.

    Only empty polls are watched: a consumer applying batches is making progress, however far
    behind it is. The partitions' end offsets are read at most once per ``limit_s``, and only while
    the polls are empty.
    """

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = limit_s
        self.clock = clock
        self._idle_since: float | None = None
        self._checked_at = float("-inf")

    def reset(self) -> None:
        """A poll brought records, or the client is new: start over."""
        self._idle_since = None
        self._checked_at = float("-inf")

    def stalled(self, consumer: KafkaConsumer) -> bool:
        """Whether every poll for ``limit_s`` was empty although an assigned partition has records
        past the consumer's position."""
        now = self.clock()
        if self._idle_since is None:
            self._idle_since = now
        if now - self._idle_since < self.limit_s or now - self._checked_at < self.limit_s:
            return False
        self._checked_at = now
        assigned = list(consumer.assignment())
        if not assigned:
            return False  # the assignment watch's case
        try:
            ends = consumer.end_offsets(assigned)
            positions = {tp: consumer.position(tp, timeout_ms=1000) for tp in assigned}
        except Exception as exc:  # the broker is away: the poll loop's own errors will say so
            log.debug("consumer progress: cannot read offsets: %s", exc)
            return False
        behind = {
            tp: ends[tp] - at for tp, at in positions.items() if at is not None and ends.get(tp, 0) > at
        }
        if not behind:
            return False
        log.warning(
            "consumer: no records for %.0f s although %d record(s) wait in %s: rejoining with a new client",
            now - self._idle_since,
            sum(behind.values()),
            ", ".join(f"{tp.topic}:{tp.partition}" for tp in sorted(behind)),
        )
        return True
