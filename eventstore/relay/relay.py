"""The relay: the store's commit-ordered log, published to Kafka, at least once, without a dual write.

One relay per store and name is active (a PostgreSQL advisory lock); others wait as hot standbys.
The active one follows the log from its checkpoint, publishes each batch (topic per stream type,
key = stream id), waits until Kafka acknowledged all of it, and only then moves the checkpoint.
Any failure (Kafka or PostgreSQL away, leadership lost) restarts it from the checkpoint: events
may be published twice, never skipped.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from kafka import KafkaAdminClient, KafkaProducer
from kafka.errors import KafkaError

from eventstore.follow import LogFollower
from eventstore.records import LogPosition, RecordedEvent
from eventstore.relay.checkpoint import RelayLag, load_checkpoint, read_lag, save_checkpoint
from eventstore.relay.envelope import encode_envelope
from eventstore.relay.partitioning import KeyHashes
from eventstore.relay.reading import (
    KEY,
    STREAM_TYPE,
    RecordHeaders,
    RelayReader,
    RelayRow,
    envelope,
    log_position,
)
from eventstore.relay.topics import create_missing_topics, topic_for
from eventstore.store import EventStore

log = logging.getLogger("datalayer.relay")

# acks=all with idempotence: no loss and no reordering across the producer's own retries. Large
# batches and a short linger for throughput; sends are retried for up to a minute before the
# relay gives up on a batch and restarts from its checkpoint.
PRODUCER_SETTINGS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 5,
    "batch_size": 512 * 1024,
    "max_request_size": 8 * 1024 * 1024,
    "delivery_timeout_ms": 60_000,
    "max_block_ms": 30_000,
    # Nothing reads kafka-python's own metrics (datalayer.metrics counts per batch): not recorded.
    "metrics_enabled": False,
}


def kafka_record(event: RecordedEvent) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """The record's key (the stream id), value (the envelope) and headers for one event.

    The relay itself builds the same from a :class:`RelayRow` (see :func:`relay_record`).
    """
    headers = [
        ("event_type", event.event_type.encode()),
        ("schema_version", b"%d" % event.schema_version),
        ("position", b"%d" % event.position),
        ("log_position", b"%d/%d" % (event.transaction_id, event.position)),
    ]
    return str(event.stream_id).encode(), encode_envelope(event), headers


def relay_record(row: RelayRow, headers: RecordHeaders) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """What the relay sends for ``row``: key, envelope and headers, as :func:`kafka_record` would."""
    return row[KEY], envelope(row), headers(row)


@dataclass(frozen=True)
class RelayConfig:
    """How the relay names and creates topics, and how it batches."""

    name: str = "default"
    topic_prefix: str = "datalayer.events."
    partitions: int = 6
    replication_factor: int = 1
    batch_size: int = 5000
    poll_interval: float = 0.5
    standby_interval: float = 1.0
    lease_check_interval: float = 1.0
    max_backoff: float = 10.0
    max_batches_in_flight: int = 4
    # Seconds between checkpoint saves; a stopping relay saves at once, an idle one at its next check
    # of the log once the interval is over (within poll_interval). Why not after every batch: a
    # caught-up relay sends a handful of events per batch, and a save per batch cost it a round trip
    # to PostgreSQL before the next batch and about a third of its CPU (its p50 latency from save()
    # to Kafka went from 13 to 3 ms). A relay killed between saves publishes those events again on
    # restart: at least once, as always.
    checkpoint_interval: float = 0.1

    def topic_for(self, stream_type: str) -> str:
        """``prefix + stream type``, with characters Kafka does not allow replaced by ``_``."""
        return topic_for(self.topic_prefix, stream_type)


class LeadershipLost(Exception):
    """The advisory lock's session is gone: another relay may be active now."""


class Relay:
    """Publishes every event of ``store`` to Kafka; :meth:`run` until ``stop`` is set."""

    def __init__(
        self,
        store: EventStore,
        kafka_config: dict[str, Any],
        config: RelayConfig | None = None,
        on_published: Callable[[Sequence[RelayRow]], None] | None = None,
    ) -> None:
        self.store = store
        self.kafka_config = kafka_config
        self.config = config or RelayConfig()
        self.on_published = on_published
        self.is_active = threading.Event()
        self._known_topics: set[str] = set()
        self._topics: dict[str, str] = {}  # stream type -> topic name, computed once
        self._headers = RecordHeaders()
        self._key_hashes = KeyHashes()
        self._lock_key = f"datalayer.relay.{store.schema}.{self.config.name}"
        # Where the batches Kafka acknowledged since the last save end, how many events they hold,
        # and when the checkpoint was last saved.
        self._unsaved: LogPosition | None = None
        self._unsaved_events = 0
        self._saved_at = -math.inf

    def run(self, stop: threading.Event) -> None:
        """Wait for leadership, publish, and recover from failures, until ``stop`` is set.

        Failures of the servers are retried with backoff; a schema that is not migrated, or a
        configuration Kafka refuses, is raised: waiting would not mend it.
        """
        self.store.require_schema()
        backoff = 0.5
        while not stop.is_set():
            try:
                with self._leadership(stop) as lease:
                    if lease is None:
                        return
                    self.is_active.set()
                    self._warn_of_unreachable_events()
                    self._publish(stop, lease)
                    return
            except (
                KafkaError,
                psycopg.OperationalError,
                psycopg.InterfaceError,
                LeadershipLost,
                OSError,
            ) as exc:
                log.warning(
                    "relay %s: %s: %s; restarting from the checkpoint in %.1f s",
                    self.config.name,
                    type(exc).__name__,
                    exc,
                    backoff,
                )
            finally:
                self.is_active.clear()
            stop.wait(backoff)
            backoff = min(backoff * 2, self.config.max_backoff)

    def _warn_of_unreachable_events(self) -> None:
        # Otherwise the relay would wait without a word for events no reader can see yet.
        unreachable = self.store.horizon().unreachable_events
        if unreachable:
            log.error(
                "relay %s: %d events carry transaction ids this cluster has not reached (a pg_dump "
                "restored from another cluster?); no reader sees them until it does: restore from a "
                "`datalayer export` instead (docs/backup-and-migration.md)",
                self.config.name,
                unreachable,
            )

    def lag(self) -> RelayLag:
        with self.store.pool.connection() as conn:
            return read_lag(conn, self.store.schema, self.config.name)

    # -- leadership ---------------------------------------------------------------------------

    @contextmanager
    def _leadership(self, stop: threading.Event) -> Iterator[_Lease | None]:
        conn = self.store.dedicated_connection()
        try:
            announced = False
            while not stop.is_set():
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (self._lock_key,)
                ).fetchone()
                if row is not None and row[0]:
                    log.info("relay %s: active", self.config.name)
                    yield _Lease(conn, self.config.lease_check_interval)
                    return
                if not announced:
                    log.info("relay %s: standing by (another relay is active)", self.config.name)
                    announced = True
                stop.wait(self.config.standby_interval)
            yield None
        finally:
            conn.close()  # ends the session, which releases the lock

    # -- publishing ---------------------------------------------------------------------------

    def _publish(self, stop: threading.Event, lease: _Lease) -> None:
        with self.store.pool.connection() as conn:
            checkpoint = load_checkpoint(conn, self.store.schema, self.config.name)
        follower = LogFollower(
            self.store,
            checkpoint.position,
            batch_size=self.config.batch_size,
            poll_interval=self.config.poll_interval,
            report_idle=True,
            read=RelayReader(self.store).read,
            position_of=log_position,
        )
        producer = KafkaProducer(**PRODUCER_SETTINGS, **self.kafka_config)
        admin = KafkaAdminClient(**self.kafka_config)
        in_flight: deque[_SentBatch] = deque()
        self._unsaved, self._unsaved_events, self._saved_at = None, 0, -math.inf
        try:
            for batch in follower.prefetched(stop):
                lease.verify()
                if batch:
                    stream_types = {row[STREAM_TYPE] for row in batch}
                    self._ensure_topics(admin, stream_types)
                    in_flight.append(_SentBatch(batch, self._send_all(producer, batch, stream_types)))
                if len(batch) < self.config.batch_size:
                    # Caught up: have everything acknowledged now, for latency. With a backlog,
                    # keep sending while earlier batches are being acknowledged, for throughput.
                    producer.flush()
                    # Empty batches too (the follower going idle, or a read the horizon held back)
                    # come here: a checkpoint left unsaved is saved once its interval is over.
                    self._settle(in_flight, wait=True, everything=True)
                else:
                    self._settle(in_flight, wait=len(in_flight) > self.config.max_batches_in_flight)
            producer.flush()
            self._settle(in_flight, wait=True, everything=True, save_now=True)
        finally:
            producer.close(timeout=10)
            admin.close()

    def _send_all(
        self, producer: KafkaProducer, batch: Sequence[RelayRow], stream_types: set[str]
    ) -> list[Any]:
        # The hot loop: one producer.send per event and as little else as possible. Every stream
        # type of the batch has its topic by now (_ensure_topics). The partition is the default
        # partitioner's, computed here for a fraction of its cost (see partitioning.py); the
        # topic's partitions are read from the producer's metadata once per batch.
        routes: dict[str, tuple[str, list[int]]] = {}
        for stream_type in stream_types:
            topic = self._topics[stream_type]
            routes[stream_type] = (topic, sorted(producer.partitions_for(topic)))
        send, headers = producer.send, self._headers
        known, key_hash = self._key_hashes.known, self._key_hashes
        futures: list[Any] = []
        append = futures.append
        for row in batch:
            topic, partitions = routes[row[STREAM_TYPE]]
            key = row[KEY]
            # A remembered hash of 0 reads as missing and is computed again: the same value.
            hashed = known(key) or key_hash(key)
            append(
                send(
                    topic,
                    key=key,
                    value=envelope(row),
                    headers=headers(row),
                    partition=partitions[hashed % len(partitions)],
                )
            )
        return futures

    def _topic(self, stream_type: str) -> str:
        topic = self._topics.get(stream_type)
        if topic is None:
            topic = self._topics[stream_type] = self.config.topic_for(stream_type)
        return topic

    def _settle(
        self, in_flight: deque[_SentBatch], *, wait: bool, everything: bool = False, save_now: bool = False
    ) -> None:
        """Checkpoint after the oldest batches Kafka has fully acknowledged; raise if a send failed.

        With ``wait`` it blocks until at least the oldest batch is acknowledged (all, ``everything``).
        The checkpoint is saved once ``checkpoint_interval`` has passed since the last save, or at
        once with ``save_now``.
        """
        taken = 0
        while in_flight and (in_flight[0].acknowledged() or (wait and (everything or not taken))):
            in_flight[0].wait()
            sent = in_flight.popleft()
            taken += 1
            self._unsaved = log_position(sent.events[-1])
            self._unsaved_events += len(sent.events)
            if self.on_published is not None:
                self.on_published(sent.events)
        position = self._unsaved
        if position is None:
            return
        now = time.monotonic()
        if not save_now and now - self._saved_at < self.config.checkpoint_interval:
            return
        published, self._unsaved, self._unsaved_events, self._saved_at = self._unsaved_events, None, 0, now
        with self.store.pool.connection() as conn:
            save_checkpoint(conn, self.store.schema, self.config.name, position, published)

    def _ensure_topics(self, admin: KafkaAdminClient, stream_types: set[str]) -> None:
        wanted = {self._topic(t) for t in stream_types} - self._known_topics
        if not wanted:
            return
        created = create_missing_topics(admin, wanted, self.config.partitions, self.config.replication_factor)
        if created:
            log.info("relay %s: created topics %s", self.config.name, ", ".join(sorted(created)))
        self._known_topics |= wanted


class _SentBatch:
    """A batch handed to the producer, and the futures that tell when Kafka acknowledged it."""

    def __init__(self, events: Sequence[RelayRow], futures: list[Any]) -> None:
        self.events = events
        self.futures = futures
        self._checked = 0

    def acknowledged(self) -> bool:
        while self._checked < len(self.futures) and self.futures[self._checked].is_done:
            self._checked += 1
        return self._checked == len(self.futures)

    def wait(self) -> None:
        for future in self.futures[self._checked :]:
            future.get()  # raises the send's error, which restarts the relay from its checkpoint
        for future in self.futures:
            if future.failed():
                raise future.exception
        self._checked = len(self.futures)


class _Lease:
    """The advisory lock's session, checked now and then so a lost lock stops publishing."""

    def __init__(self, conn: psycopg.Connection[Any], interval: float) -> None:
        self._conn = conn
        self._interval = interval
        self._checked = time.monotonic()

    def verify(self) -> None:
        if time.monotonic() - self._checked < self._interval:
            return
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise LeadershipLost(f"the advisory lock's session ended ({exc})") from exc
        self._checked = time.monotonic()
