"""The Kafka consumer runtime: feeds one projection from its topics, exactly once per event.

The offsets that count are the ones the target stores with its writes. On every partition
assignment the consumer seeks to them, so a crash or a rebalance resumes exactly after the last
committed batch; the group's own committed offsets are written too, but only so that standard
tools can show the lag. Records Kafka delivers twice (the relay publishes at least once) are
skipped by the per-stream versions in the target.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

import psycopg
import redis.exceptions
import sqlalchemy.exc
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from consumers import record_unpacking
from consumers.assignment_watch import AssignmentWatch
from consumers.dead_letters import DEAD_LETTER_PRODUCER_SETTINGS, KafkaDeadLetters, dead_letter_topic
from consumers.group_join import fix_group_join
from consumers.progress_watch import ProgressWatch
from consumers.topic_ids import current_topic_ids, recreated_topics, topic_id_checkpoint
from eventstore.relay.topics import create_missing_topics, topic_for
from projections.events import MalformedEvent, event_from_envelope
from projections.projection import Projection
from projections.runner import BatchOutcome, SourceItem, apply_batch
from projections.target import BatchConflict, ProjectionTarget, TargetReadFailed

log = logging.getLogger("datalayer.consumer")

# Errors that a server coming back mends: the batch is retried with backoff.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    KafkaError,
    OSError,
)

# What applying a batch is retried on: the transient errors, and a handler's read of the target
# that failed (retried only when its cause is transient, see _transient).
_RETRIED: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, TargetReadFailed)

# What a held fetch waits for before fetch_wait_ms is up: a full one, not just the next record.
FETCH_MIN_BYTES = 64 * 1024

# What a batch's deferred commit may fail with and still be applied again at once.
_APPLY_AGAIN: tuple[type[BaseException], ...] = (BatchConflict, *TRANSIENT_ERRORS)

# Called once per applied batch (never per event) with the consumer, the batch's outcome and the
# seconds it took to apply: how datalayer.metrics counts without touching the hot path.
BatchObserver = Callable[["ProjectionConsumer", BatchOutcome, float], None]


@runtime_checkable
class DeferredCommits(Protocol):
    """A target whose commit can be sent without waiting for it (``RedisTarget``): see
    :attr:`ConsumerConfig.defer_commits`."""

    def defer_commits(self, enabled: bool = True) -> None: ...

    def confirm_commit(self) -> None: ...


@dataclass(frozen=True)
class ConsumerConfig:
    """How a projection consumer names its group and topics, batches, and retries."""

    topic_prefix: str = "datalayer.events."
    dead_letter_prefix: str = "datalayer.dlq."
    partitions: int = 6
    replication_factor: int = 1
    group_id: str | None = None
    max_batch: int = 2000
    poll_timeout_ms: int = 200
    # How long the broker may hold a fetch while fewer than FETCH_MIN_BYTES wait (kafka-python's
    # fetch_max_wait_ms). Every fetch costs kafka-python about 1 ms of CPU, however few records it
    # brings: answered at once, a consumer spends half a core at 500 records/s; held up to 10 ms,
    # 15%, for at most 10 ms more before a record is applied. A backlog fills fetches at once
    # either way. 0 answers every fetch as soon as a record is there.
    fetch_wait_ms: int = 10
    max_retries: int = 10
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    # Before the first batch, once per process: take the objects alive then out of the garbage
    # collector's passes (see _freeze_startup_objects). False leaves the collector as it is.
    freeze_gc: bool = True
    observer: BatchObserver | None = None
    # Seconds a consumer may hold no partition, in a group with fewer members than partitions,
    # before it rejoins with a new client (see consumers.assignment_watch).
    unassigned_limit_s: float = 30.0
    # Seconds a consumer's polls may all come back empty while an assigned partition has records
    # past its position, before it rejoins with a new client (see consumers.progress_watch).
    stalled_limit_s: float = 30.0
    # With a target that can (DeferredCommits): send a batch's commit and poll Kafka for the next
    # batch while the target runs it, then confirm it before applying the next one. False waits
    # for every commit before polling again.
    defer_commits: bool = True
    # Unpack fetched records with consumers.record_unpacking (equal records, less CPU each). False
    # keeps kafka-python's own unpacking, e.g. to rule it out when chasing a problem.
    lean_unpacking: bool = True

    def group_for(self, projection: Projection[Any]) -> str:
        """One consumer group per projection version: ``datalayer.projection.order_views_v1``."""
        return self.group_id or f"datalayer.projection.{projection.qualified_name}"

    def kafka_consumer_settings(self) -> dict[str, Any]:
        """The ``KafkaConsumer`` settings a projection consumer runs with, beside the connection and group."""
        return {
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": self.max_batch,
            "fetch_max_wait_ms": self.fetch_wait_ms,
            "fetch_min_bytes": FETCH_MIN_BYTES if self.fetch_wait_ms else 1,
            # kafka-python's own metrics (sensors recorded on every fetch and request) are read by
            # nothing here: datalayer.metrics counts per batch. Off, they cost no CPU per fetch.
            "metrics_enabled": False,
        }


@dataclass
class ConsumerStats:
    """Running totals, for logs, tests and the status command."""

    batches: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    retries: int = 0
    rejoins: int = 0
    assigned: set[TopicPartition] = field(default_factory=set)

    def add(self, outcome: BatchOutcome) -> None:
        self.batches += 1
        self.applied += outcome.applied
        self.duplicates += outcome.duplicates
        self.dead_letters += len(outcome.dead_letters)


class ProjectionConsumer:
    """Runs ``projection`` into ``target`` from Kafka until :meth:`run`'s ``stop`` is set.

    Run several processes with the same projection to share its partitions: the group assigns
    each partition to one of them, and a rebalance hands it over at the target's checkpoint.
    """

    def __init__(
        self,
        projection: Projection[Any],
        target: ProjectionTarget[Any],
        kafka_config: dict[str, Any],
        config: ConsumerConfig | None = None,
    ) -> None:
        self.projection = projection
        self.target = target
        self.kafka_config = kafka_config
        self.config = config or ConsumerConfig()
        self.topics = sorted({topic_for(self.config.topic_prefix, t) for t in projection.stream_types})
        self.dead_letter_topic = dead_letter_topic(self.config.dead_letter_prefix, projection.name)
        self.stats = ConsumerStats()
        self.running = threading.Event()
        self.kafka_consumer: KafkaConsumer | None = None
        # The batch whose commit was sent and not yet confirmed (deferred commits only), and an
        # error met while confirming it in a rebalance callback (raised after the poll).
        self._unconfirmed: _Batch | None = None
        self._rebalance_error: BaseException | None = None
        # Batches confirmed inside a rebalance callback, told to the observer after the poll.
        self._unobserved: list[_Batch] = []
        self._in_rebalance = False
        self._sink: KafkaDeadLetters | None = None
        self._stop = threading.Event()
        self._last_offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        # Each assigned topic's id when it was assigned, stored with every batch's offsets.
        self._topic_ids: dict[str, str] = {}

    def run(self, stop: threading.Event) -> None:
        """Consume, apply and checkpoint batches; return after the batch in hand when ``stop`` is set.

        Transient failures (a server restarting) are retried with backoff, ``max_retries`` times in
        a row; after that, or on any other error, it raises with nothing half-applied.
        """
        self.target.setup()
        self._create_topics()
        producer = KafkaProducer(**DEAD_LETTER_PRODUCER_SETTINGS, **self.kafka_config)
        sink = KafkaDeadLetters(producer, self.dead_letter_topic, self.projection.name)
        group = self.config.group_for(self.projection)
        watch = AssignmentWatch(group, self.topics, self.kafka_config, self.config.unassigned_limit_s)
        progress = ProgressWatch(self.config.stalled_limit_s)
        target = self.target
        deferred = self.config.defer_commits and isinstance(target, DeferredCommits)
        self._sink, self._stop = sink, stop
        self._unconfirmed = self._rebalance_error = None
        self._unobserved = []
        self._last_offsets = {}
        consumer: KafkaConsumer | None = None
        try:
            if deferred:
                assert isinstance(target, DeferredCommits)
                target.defer_commits(True)
            consumer = self._join(group, stop)
            if self.config.freeze_gc:
                _freeze_startup_objects()
            self.running.set()
            log.info("consumer %s: consuming %s", self.projection.qualified_name, ", ".join(self.topics))
            while not stop.is_set():
                # While a commit is out, take only what the client holds already: the batch is
                # confirmed right after, not a poll timeout later.
                timeout = 0 if self._unconfirmed is not None else self.config.poll_timeout_ms
                polled = consumer.poll(timeout_ms=timeout)
                # Parsed before the commit out is confirmed: parsing needs no target, and so it
                # runs while PostgreSQL (or Redis) is still busy with that commit.
                read = _read(polled, self._topic_ids) if polled else None
                try:
                    self._raise_rebalance_error()
                    self._confirm(sink, stop)
                except _Stopped:
                    break
                finally:
                    self._observe_unobserved()
                if read is None:
                    if timeout and (watch.stuck(consumer) or progress.stalled(consumer)):
                        consumer.close(autocommit=False)
                        consumer = None
                        self.stats.assigned.clear()
                        self.stats.rejoins += 1
                        consumer = self._join(group, stop)
                        watch.reset()
                        progress.reset()
                    continue
                progress.reset()
                if stop.is_set():
                    break  # the records just polled stay for whoever resumes from the checkpoints
                items, checkpoints, offsets = read
                started = time.perf_counter()
                try:
                    outcome = self._apply(items, checkpoints, sink, stop)
                except _Stopped:
                    break
                batch = _Batch(items, checkpoints, offsets, outcome, time.perf_counter() - started)
                if deferred:
                    self._unconfirmed = batch  # confirmed after the next poll
                else:
                    self._committed(batch)
            with contextlib.suppress(_Stopped):
                self._confirm(sink, stop)
        finally:
            self.running.clear()
            self._unconfirmed = None  # leaving on an error: a batch not confirmed is not counted
            if deferred:
                assert isinstance(target, DeferredCommits)
                with contextlib.suppress(Exception):
                    target.confirm_commit()  # a commit still out: its reply read, its connection back
                target.defer_commits(False)
            if consumer is not None:
                _leave_group(consumer, self._last_offsets)
            producer.close(timeout=10)

    def _confirm(self, sink: KafkaDeadLetters, stop: threading.Event) -> None:
        """Confirm the batch whose commit was sent last, if any; if it did not commit, or may not have,
        apply it again, waiting for its commit this time.

        Applying it again is exact either way: the target's versions skip whatever a commit that
        ran after all applied, and the batch's records are still in hand (the consumer's position
        is already past them). Its dead letters may be sent twice, as on any retried batch.
        """
        batch = self._unconfirmed
        if batch is None:
            return
        self._unconfirmed = None
        # Only run() sets a batch to confirm, after checking the target; isinstance against a
        # runtime-checkable protocol costs tens of microseconds, paid per batch here.
        target = cast(DeferredCommits, self.target)
        started = time.perf_counter()
        try:
            target.confirm_commit()
        except _APPLY_AGAIN as exc:
            log.warning(
                "consumer %s: a batch's commit failed (%s: %s); applying it again",
                self.projection.qualified_name,
                type(exc).__name__,
                str(exc).strip().splitlines()[0] if str(exc).strip() else "",
            )
            target.defer_commits(False)
            try:
                batch.outcome = self._apply(batch.items, batch.checkpoints, sink, stop)
            finally:
                target.defer_commits(True)
        batch.seconds += time.perf_counter() - started
        self._committed(batch)

    def _committed(self, batch: _Batch) -> None:
        """``batch`` is applied and its checkpoints stored in the target: count it, tell the observer."""
        self.stats.add(batch.outcome)
        if self.config.observer is not None:
            if self._in_rebalance:
                # The observer is the user's code: it runs where the client may be used, not
                # inside kafka-python's group join (where even leaving the group breaks the client).
                self._unobserved.append(batch)
            else:
                self.config.observer(self, batch.outcome, batch.seconds)
        # Only for lag tools: the offsets that matter were committed with the batch.
        if self.kafka_consumer is not None:
            self.kafka_consumer.commit_async(offsets=batch.offsets)
            self._last_offsets.update(batch.offsets)

    def _confirm_in_rebalance(self) -> None:
        """Before partitions change hands, the batch in flight is confirmed (or applied again), so the
        next owner's seek finds its checkpoints. An error is kept and raised after the poll:
        kafka-python only logs what a rebalance callback raises."""
        if self._unconfirmed is None or self._sink is None:
            return
        self._in_rebalance = True
        try:
            self._confirm(self._sink, self._stop)
        except BaseException as exc:
            self._rebalance_error = exc
        finally:
            self._in_rebalance = False

    def _observe_unobserved(self) -> None:
        """Tell the observer of the batches confirmed during the last poll's rebalance, if any."""
        observer = self.config.observer
        while self._unobserved and observer is not None:
            batch = self._unobserved.pop(0)
            observer(self, batch.outcome, batch.seconds)

    def _raise_rebalance_error(self) -> None:
        error, self._rebalance_error = self._rebalance_error, None
        if error is not None:
            raise error

    def _join(self, group: str, stop: threading.Event) -> KafkaConsumer:
        """A new client in ``group``, subscribed, seeking to the target's checkpoints on assignment."""
        consumer = KafkaConsumer(**self.kafka_config, group_id=group, **self.config.kafka_consumer_settings())
        fix_group_join(consumer)  # else a rebalance that outlives a poll() can stall it for good
        if self.config.lean_unpacking:
            record_unpacking.install(consumer)
        try:
            self._await_topic_metadata(consumer, stop)
            consumer.subscribe(self.topics, listener=_SeekToTargetCheckpoints(self, consumer))
        except BaseException:
            consumer.close(autocommit=False)
            raise
        self.kafka_consumer = consumer  # the client in use, for diagnostics and tests
        return consumer

    def _apply(
        self,
        items: Sequence[SourceItem],
        checkpoints: dict[str, str],
        sink: KafkaDeadLetters,
        stop: threading.Event,
    ) -> BatchOutcome:
        backoff = self.config.initial_backoff
        for attempt in range(1, self.config.max_retries + 2):
            try:
                return apply_batch(self.projection, self.target, items, checkpoints, sink)
            except _RETRIED as exc:
                if attempt > self.config.max_retries or not _transient(exc):
                    raise
                self.stats.retries += 1
                log.warning(
                    "consumer %s: %s: %s; retrying the batch in %.1f s (%d/%d)",
                    self.projection.qualified_name,
                    type(exc).__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                    backoff,
                    attempt,
                    self.config.max_retries,
                )
                # Giving up on stop is fine: the batch is simply not applied, and whoever owns
                # these partitions next starts from the target's checkpoint.
                if stop.wait(backoff):
                    raise _Stopped from exc
                backoff = min(backoff * 2, self.config.max_backoff)
        raise AssertionError("unreachable")

    def _await_topic_metadata(self, consumer: KafkaConsumer, stop: threading.Event) -> None:
        # A group joined before the client knows a just-created topic's partitions assigns none of
        # them, and notices only at the next metadata refresh (minutes): know them all first.
        deadline = time.monotonic() + 60
        while not stop.is_set():
            missing = [t for t in self.topics if not consumer.partitions_for_topic(t)]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"no partition metadata for {', '.join(missing)} after 60 s")
            stop.wait(0.1)

    def _create_topics(self) -> None:
        admin = KafkaAdminClient(**self.kafka_config)
        try:
            create_missing_topics(
                admin, [*self.topics], self.config.partitions, self.config.replication_factor
            )
            # One partition is enough: dead letters are rare and read by people, in order.
            create_missing_topics(admin, [self.dead_letter_topic], 1, self.config.replication_factor)
        finally:
            admin.close()

    def seek_to_checkpoints(self, consumer: KafkaConsumer, assigned: Sequence[TopicPartition]) -> None:
        """Position each newly assigned partition just after the target's last committed batch.

        A partition of a topic created again since its offsets were stored (its id differs, see
        ``consumers.topic_ids``) starts from its beginning instead: the stored offset would skip
        the new topic's records before it, and the stream versions skip what was applied already.
        """
        # Whoever held these partitions before may have applied their streams since this target last
        # did: versions it remembers from its own batches are read again.
        self.target.forget_applied_versions()
        stored = self._read_checkpoints()
        current = current_topic_ids(consumer, {tp.topic for tp in assigned})
        recreated = recreated_topics(stored, current)
        self._topic_ids.update(current)
        for topic in sorted(recreated):
            log.warning(
                "consumer %s: topic %s was created again since the read model's offsets were stored "
                "(id %s, now %s): reading its partitions from the beginning",
                self.projection.qualified_name,
                topic,
                stored[topic_id_checkpoint(topic)],
                current[topic],
            )
        for tp in assigned:
            position = None if tp.topic in recreated else stored.get(f"{tp.topic}:{tp.partition}")
            if position is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, int(position))
        self.stats.assigned |= set(assigned)
        log.info(
            "consumer %s: assigned %s",
            self.projection.qualified_name,
            ", ".join(f"{tp.topic}:{tp.partition}" for tp in sorted(assigned)) or "nothing",
        )

    def _read_checkpoints(self) -> dict[str, str]:
        # If the target stays unreachable, the error reaches kafka-python, which logs it and falls
        # back to the group's committed offsets: never ahead of the target's, so still exact.
        backoff = self.config.initial_backoff
        for attempt in range(1, self.config.max_retries + 2):
            try:
                return self.target.checkpoints()
            except TRANSIENT_ERRORS as exc:
                if attempt > self.config.max_retries:
                    raise
                log.warning("consumer %s: reading checkpoints: %s; retrying", self.projection.name, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_backoff)
        raise AssertionError("unreachable")


_gc_lock = threading.Lock()
_gc_frozen = False

# Allocations between two young-generation collections, once start-up objects are frozen (Python's
# default is 700).
YOUNG_COLLECTION_THRESHOLD = 50_000


def _freeze_startup_objects() -> None:
    """Once per process: collect, move every object alive now out of the collector's sight, and
    collect young objects less often.

    Why: a batch allocates tens of thousands of short-lived containers, which trigger full
    collections, and each full collection also walks every object loaded at start-up (modules,
    SQLAlchemy, the Kafka client: ~100,000 of them) -- about a fifth of a PostgreSQL consumer's time.
    Frozen objects are still freed by reference counting; only cycles among them are never collected,
    and collecting first leaves none behind. Objects created later are collected as usual, though
    after 50,000 allocations rather than 700: a batch's events and pending writes live until its
    commit, and every young collection walked them again (a tenth to a quarter of a replay's CPU).
    Garbage without cycles is freed at once either way, by reference counting.
    """
    global _gc_frozen
    with _gc_lock:
        if _gc_frozen:
            return
        _gc_frozen = True
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


class _Stopped(Exception):
    """Stop was requested while a failed batch waited to be retried."""


class _SeekToTargetCheckpoints(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: ProjectionConsumer, consumer: KafkaConsumer) -> None:
        self.owner = owner
        self.consumer = consumer

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # A commit sent before this poll is confirmed first; nothing else is pending.
        self.owner._confirm_in_rebalance()
        self.owner.stats.assigned -= set(revoked)
        for partition in revoked:
            self.owner._last_offsets.pop(partition, None)
        self.owner.target.forget_applied_versions()

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.owner._confirm_in_rebalance()
        self.owner.seek_to_checkpoints(self.consumer, assigned)


def _leave_group(consumer: KafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
    """Close ``consumer`` so that its group sees it leave at once.

    Why the last commit waits: the batches' ``commit_async`` requests still in flight can fill the
    connection's in-flight limit, and close()'s LeaveGroup then fails ("Node paused"). The group
    would wait for the closed member, and whoever takes its partitions next (the live consumer
    after a rebuild's handover) would hold none for its session's timeout or longer.
    """
    if offsets:
        with contextlib.suppress(Exception):
            consumer.commit(offsets=offsets, timeout_ms=5000)
    consumer.close(autocommit=False)


@dataclass(slots=True)
class _Batch:
    """A batch applied by the consumer: its records, checkpoints and Kafka offsets, its outcome, and
    the seconds spent applying (and confirming) it."""

    items: Sequence[SourceItem]
    checkpoints: dict[str, str]
    offsets: dict[TopicPartition, OffsetAndMetadata]
    outcome: BatchOutcome
    seconds: float


def _transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or, for a handler's read that failed, its cause) is worth a retry."""
    if isinstance(exc, TargetReadFailed):
        return isinstance(exc.__cause__, TRANSIENT_ERRORS)
    return isinstance(exc, TRANSIENT_ERRORS)


def _read(
    polled: dict[TopicPartition, list[Any]], topic_ids: Mapping[str, str] | None = None
) -> tuple[list[SourceItem], dict[str, str], dict[TopicPartition, OffsetAndMetadata]]:
    """Parse a poll's records into source items, and the next offset of each partition (with the
    ids of their topics, where ``topic_ids`` knows them)."""
    items: list[SourceItem] = []
    checkpoints: dict[str, str] = {}
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for tp, records in polled.items():
        for record in records:
            try:
                items.append(SourceItem(event_from_envelope(record.value), record))
            except MalformedEvent as exc:
                items.append(SourceItem(None, record, exc))
        next_offset = records[-1].offset + 1
        checkpoints[f"{tp.topic}:{tp.partition}"] = str(next_offset)
        offsets[tp] = OffsetAndMetadata(next_offset, "", -1)
    if topic_ids:
        for topic in {tp.topic for tp in polled}:
            topic_id = topic_ids.get(topic)
            if topic_id is not None:
                checkpoints[topic_id_checkpoint(topic)] = topic_id
    return items, checkpoints, offsets
