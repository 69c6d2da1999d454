"""Blue/green rebuilds: replay the store into a new generation, catch up from Kafka, switch readers.

The order of steps is what makes the handover exact:

1. Pin the start: the Kafka end offsets of the projection's topics, *before* reading the store,
   are stored as the new generation's checkpoints.
2. Replay the store's log into the generation. Everything published before the pinned offsets
   was committed before them, so the replay has it; its ``log`` checkpoint makes it resumable.
3. Consume from the pinned offsets until caught up. Events that the replay already applied
   come round again, and the per-stream versions skip them.
4. Activate the generation: the readers' alias moves in one transaction, and the live consumers
   move to the new generation's group and checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg.sql
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from consumers.dead_letters import DEAD_LETTER_PRODUCER_SETTINGS, KafkaDeadLetters, dead_letter_topic
from consumers.live import TargetFactory, group_for
from consumers.parallel_replay import replay_in_parallel, settle_log_checkpoint
from consumers.runtime import ConsumerConfig, ProjectionConsumer, _freeze_startup_objects
from consumers.topic_ids import current_topic_ids, topic_id_checkpoint
from eventstore.relay.topics import create_missing_topics, topic_for
from eventstore.store import EventStore
from projections.generations import BUILDING, RETIRED, Generation, GenerationRegistry
from projections.projection import Projection
from projections.replay import LOG_CHECKPOINT, ReplayStats, is_log_checkpoint, pinned_checkpoint, replay
from projections.runner import DeadLetter
from projections.target import ProjectionTarget

log = logging.getLogger("datalayer.rebuild")


@dataclass(frozen=True)
class RebuildOptions:
    """How fast to replay, and how long to wait for the catch-up and the handover.

    ``workers`` > 1 replays partitions of the streams in that many processes at once, for
    projections that allow it (``Projection.parallel_replay``); others replay in one.
    """

    batch_size: int = 2000
    max_rate: float | None = None  # events/s read from the store; None: as fast as it goes
    workers: int = 1
    catch_up_timeout: float = 300.0
    handover_timeout: float = 30.0
    drop_old: bool = False


@dataclass
class RebuildProgress:
    """Where a rebuild is, for a progress bar: phase, events read of the total, rate and ETA."""

    generation: str
    phase: str  # replay | catch-up | handover | done
    events_read: int = 0
    total: int = 0
    rate: float = 0.0
    lag: int | None = None

    @property
    def eta_s(self) -> float | None:
        if self.rate <= 0 or self.total <= self.events_read:
            return None
        return (self.total - self.events_read) / self.rate


@dataclass
class RebuildReport:
    """What a finished (or interrupted) rebuild did."""

    generation: str
    activated: bool
    replayed: ReplayStats
    caught_up_events: int
    handed_over: bool
    dropped: list[str]
    seconds: float


class Rebuild:
    """Builds and activates a new generation of ``projection``; :meth:`run` it once."""

    def __init__(
        self,
        projection: Projection[Any],
        registry: GenerationRegistry,
        make_target: TargetFactory,
        drop_target: Callable[[str], None],
        store: EventStore,
        kafka_config: dict[str, Any],
        config: ConsumerConfig | None = None,
        options: RebuildOptions | None = None,
        on_progress: Callable[[RebuildProgress], None] | None = None,
    ) -> None:
        self.projection = projection
        self.registry = registry
        self.make_target = make_target
        self.drop_target = drop_target
        self.store = store
        self.kafka_config = kafka_config
        self.config = config or ConsumerConfig()
        self.options = options or RebuildOptions()
        self.on_progress = on_progress or (lambda _: None)
        self.topics = sorted({topic_for(self.config.topic_prefix, t) for t in projection.stream_types})

    def run(self, stop: threading.Event) -> RebuildReport:
        """Run the four steps; if ``stop`` is set midway, return with the generation still building.

        Running it again resumes that generation where it stopped.
        """
        started = time.monotonic()
        generation = self._building_generation()
        target = self.make_target(generation.name)
        target.setup()
        self._pin_kafka_start(target)
        progress = RebuildProgress(generation.name, "replay", total=self._count_events())
        replayed = self._replay(target, progress, stop)
        report = RebuildReport(generation.name, False, replayed, 0, False, [], 0.0)
        if stop.is_set():
            report.seconds = time.monotonic() - started
            return report
        self._catch_up_and_activate(generation, target, progress, report, stop)
        if report.activated and self.options.drop_old:
            report.dropped = self.drop_retired()
        progress.phase = "done"
        self.on_progress(progress)
        report.seconds = time.monotonic() - started
        return report

    def drop_retired(self) -> list[str]:
        """Drop every retired generation's read model and forget it; returns their names."""
        dropped = []
        for old in self.registry.generations(self.projection.name):
            if old.status == RETIRED:
                self.drop_target(old.name)
                self.registry.forget(self.projection.name, old.name)
                dropped.append(old.name)
        return dropped

    # -- the steps ---------------------------------------------------------------------------

    def _building_generation(self) -> Generation:
        for existing in self.registry.generations(self.projection.name):
            if existing.status == BUILDING and existing.version == self.projection.version:
                log.info("rebuild %s: resuming generation %s", self.projection.name, existing.name)
                return existing
        created = self.registry.create(self.projection)
        assert created is not None
        log.info("rebuild %s: building generation %s", self.projection.name, created.name)
        return created

    def _pin_kafka_start(self, target: ProjectionTarget[Any]) -> None:
        stored = target.checkpoints()
        if any(not is_log_checkpoint(source) for source in stored):
            return  # pinned by the interrupted run this one resumes
        admin = KafkaAdminClient(**self.kafka_config)
        try:
            rf = self.config.replication_factor
            create_missing_topics(admin, self.topics, self.config.partitions, rf)
            dlq = dead_letter_topic(self.config.dead_letter_prefix, self.projection.name)
            create_missing_topics(admin, [dlq], 1, rf)
        finally:
            admin.close()
        consumer = KafkaConsumer(**self.kafka_config)
        try:
            partitions = [TopicPartition(t, p) for t in self.topics for p in sorted(_partitions(consumer, t))]
            ends = consumer.end_offsets(partitions)
            ids = current_topic_ids(consumer, self.topics)
        finally:
            consumer.close()
        pins = {f"{tp.topic}:{tp.partition}": str(offset) for tp, offset in ends.items()}
        pins.update((topic_id_checkpoint(topic), topic_id) for topic, topic_id in ids.items())
        # Each pin twice: the copy says, while the two agree, that nothing came from Kafka yet, so the
        # replay may take streams new to a batch as never applied (see pinned_checkpoint).
        copies = {pinned_checkpoint(source): offset for source, offset in pins.items()}
        with target.batch() as batch:
            batch.commit({}, {**pins, **copies})

    def _replay(
        self, target: ProjectionTarget[Any], progress: RebuildProgress, stop: threading.Event
    ) -> ReplayStats:
        if self.config.freeze_gc:
            _freeze_startup_objects()  # as a consumer does: the same batches, the same garbage
        workers = self.options.workers if self.projection.parallel_replay else 1
        parallel = ReplayStats()
        if workers > 1:
            found = self._replay_in_parallel(target, workers, progress, stop)
            if found is None:
                log.info("rebuild %s: interrupted; run it again to resume", self.projection.name)
                return ReplayStats(events_read=progress.events_read)
            parallel = found
            # Every partition is done: one pass over the log's tail (duplicates, and what was
            # appended meanwhile) sets `log` as a single replay would, so resuming or verifying
            # later starts from there.
            settle_log_checkpoint(target, workers)
        begun = time.monotonic()
        max_rate = self.options.max_rate if workers == 1 else None
        already = self._already_applied(target)

        def on_batch(stats: ReplayStats) -> None:
            elapsed = time.monotonic() - begun
            done = stats.applied + stats.duplicates
            progress.events_read = already + done
            progress.rate = done / elapsed if elapsed > 0 else 0.0
            self.on_progress(progress)
            if max_rate:
                # Throttle: never read ahead of max_rate, so live traffic keeps its share.
                ahead = stats.events_read / max_rate - elapsed
                if ahead > 0:
                    stop.wait(ahead)
            if stop.is_set():
                raise _Interrupted

        sink = _ReplayDeadLetters(self.kafka_config, self.config.dead_letter_prefix, self.projection.name)
        try:
            tail = replay(
                self.projection,
                target,
                self.store,
                batch_size=self.options.batch_size,
                dead_letters=sink,
                on_batch=on_batch,
            )
        except _Interrupted:
            log.info("rebuild %s: interrupted; run it again to resume", self.projection.name)
            return ReplayStats(events_read=progress.events_read)
        finally:
            sink.close()
        return ReplayStats(
            events_read=parallel.events_read + tail.events_read,
            applied=parallel.applied + tail.applied,
            duplicates=parallel.duplicates + tail.duplicates,
            dead_letters=parallel.dead_letters + tail.dead_letters,
            position=tail.position,
        )

    def _replay_in_parallel(
        self, target: ProjectionTarget[Any], workers: int, progress: RebuildProgress, stop: threading.Event
    ) -> ReplayStats | None:
        """The partitions in ``workers`` processes, this one among them (see
        :mod:`consumers.parallel_replay`).

        Returns the partitions' summed figures, None if ``stop`` interrupted them.
        """
        begun = time.monotonic()
        already = self._already_applied(target)
        name = self.projection.name
        log.info("rebuild %s: replaying in %d processes", name, workers)
        totals = ReplayStats()

        def on_progress(stats: ReplayStats) -> None:
            nonlocal totals
            totals = stats
            elapsed = time.monotonic() - begun
            done = stats.applied + stats.duplicates
            progress.events_read = already + done
            progress.rate = done / elapsed if elapsed > 0 else 0.0
            self.on_progress(progress)

        def make_sink() -> tuple[Any, Callable[[], None]]:
            sink = _ReplayDeadLetters(self.kafka_config, self.config.dead_letter_prefix, name)
            return sink, sink.close

        generation = progress.generation
        finished = replay_in_parallel(
            self.projection,
            lambda: self.make_target(generation),
            self.store,
            target=target,
            workers=workers,
            batch_size=self.options.batch_size,
            make_sink=make_sink,
            stop=stop,
            on_progress=on_progress,
            max_rate=self.options.max_rate,
        )
        return totals if finished else None

    def _catch_up_and_activate(
        self,
        generation: Generation,
        target: ProjectionTarget[Any],
        progress: RebuildProgress,
        report: RebuildReport,
        stop: threading.Event,
    ) -> None:
        # Commits waited for: the catch-up ends when the target's checkpoints reach Kafka's ends, and
        # its report counts the consumer's stats, which a deferred commit adds only when confirmed.
        config = dataclasses.replace(self.config, group_id=group_for(generation.name), defer_commits=False)
        consumer = ProjectionConsumer(self.projection, target, self.kafka_config, config)
        consumer_stop = threading.Event()
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                consumer.run(consumer_stop)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=consume, name=f"rebuild-{generation.name}", daemon=True)
        thread.start()
        offsets = KafkaConsumer(**self.kafka_config)  # no group: only reads the end offsets
        try:
            progress.phase = "catch-up"
            deadline = time.monotonic() + self.options.catch_up_timeout
            while not stop.is_set():
                if errors:
                    raise errors[0]
                progress.lag = self._lag(target, offsets)
                self.on_progress(progress)
                if progress.lag == 0:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"rebuild {generation.name}: still {progress.lag} events behind Kafka after "
                        f"{self.options.catch_up_timeout:g} s; run it again to resume"
                    )
                stop.wait(0.2)
            if stop.is_set():
                return
            report.caught_up_events = consumer.stats.applied
            self.registry.activate(self.projection, generation.name)
            report.activated = True
            log.info("rebuild %s: generation %s is active", self.projection.name, generation.name)
            progress.phase = "handover"
            self.on_progress(progress)
            report.handed_over = self._await_live_consumers(generation, stop)
        finally:
            offsets.close()
            consumer_stop.set()
            thread.join(timeout=60)

    def _await_live_consumers(self, generation: Generation, stop: threading.Event) -> bool:
        """Keep consuming until a live consumer joined the new group (or the timeout passes)."""
        deadline = time.monotonic() + self.options.handover_timeout
        admin = KafkaAdminClient(**self.kafka_config)
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    group = admin.describe_groups([group_for(generation.name)])[group_for(generation.name)]
                except KafkaError as exc:
                    # A fresh broker has no group coordinator until its offsets topic exists.
                    if not exc.retriable:
                        raise
                    group = {"members": ()}
                if len(group["members"]) >= 2:
                    return True
                stop.wait(0.5)
        finally:
            admin.close()
        log.info(
            "rebuild %s: no live consumer joined within %g s; `datalayer consume` will continue from "
            "the generation's checkpoints",
            self.projection.name,
            self.options.handover_timeout,
        )
        return False

    # -- measuring ---------------------------------------------------------------------------

    def _lag(self, target: ProjectionTarget[Any], consumer: KafkaConsumer) -> int:
        stored = target.checkpoints()
        partitions = [TopicPartition(t, p) for t in self.topics for p in _partitions(consumer, t)]
        ends = consumer.end_offsets(partitions)
        return sum(max(0, end - int(stored.get(f"{tp.topic}:{tp.partition}", 0))) for tp, end in ends.items())

    def _count_events(self) -> int:
        query = psycopg.sql.SQL("SELECT count(*) FROM {}.events WHERE stream_type = ANY(%s)").format(
            psycopg.sql.Identifier(self.store.schema)
        )
        with self.store.pool.connection() as conn:
            row = conn.execute(query, (list(self.projection.stream_types),)).fetchone()
        return int(row[0]) if row else 0

    def _already_applied(self, target: ProjectionTarget[Any]) -> int:
        stored = target.checkpoints().get(LOG_CHECKPOINT)
        if stored is None:
            return 0
        query = psycopg.sql.SQL(
            "SELECT count(*) FROM {}.events WHERE stream_type = ANY(%s) AND (transaction_id, position) "
            "<= (%s::xid8, %s)"
        ).format(psycopg.sql.Identifier(self.store.schema))
        xid, position = stored.split("/")
        with self.store.pool.connection() as conn:
            row = conn.execute(query, (list(self.projection.stream_types), xid, int(position))).fetchone()
        return int(row[0]) if row else 0


class _Interrupted(Exception):
    pass


class _ReplayDeadLetters:
    """The projection's dead-letter topic for a replay, its producer made at the first dead letter.

    A replay seldom meets one, and a producer is a thread, buffers and a broker connection in each
    replaying process (~1.5 MB) for nothing. A dead letter is still acknowledged by Kafka before
    its batch commits, as ever (see :class:`KafkaDeadLetters`).
    """

    def __init__(self, kafka_config: dict[str, Any], prefix: str, projection: str) -> None:
        self.kafka_config = kafka_config
        self.topic = dead_letter_topic(prefix, projection)
        self.projection = projection
        self._sink: KafkaDeadLetters | None = None

    def __call__(self, letters: Sequence[DeadLetter]) -> None:
        if self._sink is None:
            producer = KafkaProducer(**DEAD_LETTER_PRODUCER_SETTINGS, **self.kafka_config)
            self._sink = KafkaDeadLetters(producer, self.topic, self.projection)
        self._sink(letters)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.producer.close(timeout=10)


def _partitions(consumer: KafkaConsumer, topic: str) -> set[int]:
    deadline = time.monotonic() + 30
    while True:
        found = consumer.partitions_for_topic(topic)
        if found:
            return set(found)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no partition metadata for topic {topic} after 30 s")
        time.sleep(0.1)


__all__ = ["Rebuild", "RebuildOptions", "RebuildProgress", "RebuildReport"]
