"""Replay: feed a projection from the store's log instead of Kafka, through the same runner.

The target keeps the log position it has applied up to as checkpoint ``log``, so a replay that
stops resumes where it left off. Rebuilds, verification and the tests' "equal to a fresh replay"
checks all go through here.
"""

from __future__ import annotations

import gc
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, event

from eventstore.records import LOG_START, LogPosition
from eventstore.store import EventStore
from projections.events import ProjectedEvent
from projections.log_reader import LogReader, recorded_event
from projections.projection import Projection
from projections.runner import DeadLetter, DeadLetterSink, SourceItem, apply_batch
from projections.target import ProjectionTarget

LOG_CHECKPOINT = "log"
_PARTITION_CHECKPOINT = re.compile(r"log:\d+/\d+")
# Kafka topic names cannot hold "/": no topic's checkpoint (``topic:partition``) starts like this.
_PINNED = "pinned/"


def _nothing_applied_after(checkpoints: Mapping[str, str]) -> LogPosition | None:
    """The log position after which nothing in the target was applied: the furthest of its replay
    checkpoints (the whole log's and every partition's), or None once a Kafka consumer fed it.

    A replay that starts behind another's checkpoint (the whole log's catch-up after a parallel
    replay) meets events applied already, which the versions must absorb: they have to be read.
    A Kafka checkpoint that still stands where a rebuild pinned it before replaying (see
    :func:`pinned_checkpoint`) says no record was applied from Kafka: a consumer's batch moves it.
    """
    replays = []
    for source, position in checkpoints.items():
        if is_log_checkpoint(source):
            replays.append(LogPosition.parse(position))
        elif not source.startswith(_PINNED) and checkpoints.get(pinned_checkpoint(source)) != position:
            return None
    return max(replays, default=LOG_START)


def pinned_checkpoint(source: str) -> str:
    """Where a rebuild keeps the Kafka checkpoint ``source`` as it pinned it, before its replay
    (``pinned/topic:0``): while the two agree, no Kafka consumer has applied anything to the target."""
    return f"{_PINNED}{source}"


def partition_checkpoint(index: int, count: int) -> str:
    """The checkpoint of partition ``index`` of ``count``, replayed on its own (``log:0/2``)."""
    return f"{LOG_CHECKPOINT}:{index}/{count}"


def is_log_checkpoint(source: str) -> bool:
    """Whether ``source`` is the replay's (whole log or one partition), not a Kafka partition's.

    A Kafka checkpoint is ``topic:partition``: ``log:3`` would be a topic named ``log``, never this.
    """
    return source == LOG_CHECKPOINT or _PARTITION_CHECKPOINT.fullmatch(source) is not None


@dataclass
class ReplayStats:
    """What a replay read and applied."""

    events_read: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    position: LogPosition = LOG_START


def replay(
    projection: Projection[Any],
    target: ProjectionTarget[Any],
    store: EventStore,
    *,
    batch_size: int = 1000,
    dead_letters: DeadLetterSink | None = None,
    until: LogPosition | None = None,
    on_batch: Callable[[ReplayStats], None] | None = None,
    partition: tuple[int, int] | None = None,
) -> ReplayStats:
    """Apply the log from the target's ``log`` checkpoint to its end (or to ``until``, inclusive).

    Only events of the projection's stream types are read (the store filters them), so the
    checkpoint is the last of those applied. Dead letters go to ``dead_letters`` (default:
    collected and raised as one error at the end, so a replay never hides them).

    ``partition=(index, count)`` replays only that partition's streams, under a checkpoint of its
    own (:func:`partition_checkpoint`), starting from it, else from ``log``: other processes replay
    the other partitions at the same time (see :mod:`projections.parallel_replay`).
    """
    collected: list[DeadLetter] = []
    given = dead_letters or collected.extend

    def sink(letters: Sequence[DeadLetter]) -> None:
        # The items carry the events themselves as their originals; a dead letter gets the record.
        given([_with_record(letter) for letter in letters])

    checkpoints = target.checkpoints()
    name = LOG_CHECKPOINT if partition is None else partition_checkpoint(*partition)
    # A partition goes on from its own checkpoint or from the whole log's, whichever is further:
    # each says its events up to there are applied.
    stored = [LogPosition.parse(checkpoints[s]) for s in {name, LOG_CHECKPOINT} if s in checkpoints]
    stats = ReplayStats(position=max(stored, default=LOG_START))
    fresh_after = _nothing_applied_after(checkpoints)
    reader_of_log = LogReader(store, projection.stream_types, partition)

    def read(after: LogPosition) -> list[ProjectedEvent]:
        return reader_of_log.read(after, batch_size)

    # Why a reader thread: the next batch's query runs in the server (and its rows arrive) while
    # this batch is applied. Each batch still commits its own checkpoint, in order.
    with (
        _commits_without_flush_wait(target),
        _CollectionBetweenBatches() as collection,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-read") as reader,
    ):
        pending = reader.submit(read, stats.position)
        while True:
            events = pending.result()
            if until is not None:
                events = [e for e in events if (e.transaction_id, e.position) <= until]
            if not events:
                break
            last = LogPosition(events[-1].transaction_id, events[-1].position)
            pending = reader.submit(read, last)
            items: Sequence[SourceItem] = [SourceItem(e, e) for e in events]
            count = len(events)
            # Let go of the batch once applied: kept until the next one replaces it, it would be
            # alive beside that one while the loop waits for it.
            del events
            # Past every replay's checkpoint, a stream starting at its initial version is new (see
            # apply_batch): its versions and rows need no read.
            fresh = fresh_after is not None and stats.position >= fresh_after
            outcome = apply_batch(projection, target, items, {name: str(last)}, sink, fresh_streams=fresh)
            del items
            collection.after_batch(count)
            stats.events_read += count
            stats.applied += outcome.applied
            stats.duplicates += outcome.duplicates
            stats.dead_letters += len(outcome.dead_letters)
            stats.position = last
            if on_batch is not None:
                on_batch(stats)
    if collected:
        reasons = ", ".join(sorted({d.reason for d in collected}))
        raise ReplayDeadLetters(collected, f"{len(collected)} events could not be applied ({reasons})")
    return stats


# Net new tracked objects (allocated less freed) since the last collection above which a replay
# collects cycles after its batch: order_views replaying 5,000-event batches stays at 20,000-50,000
# (the next batch being read, the id caches); a projection that made cyclic garbage would pass this
# within a few batches, holding some tens of MB at most.
_YOUNG_LIMIT = 250_000
# Events after which a replay collects anyway: that count is lowered by every object freed, old
# ones too, so it can stay low while cycles pile up. A full collection of a replaying process
# (its frozen start-up objects left out) takes ~20-50 ms: under 0.5 us per event at this period.
_COLLECT_EVERY = 100_000


class _CollectionBetweenBatches:
    """The garbage collector paused while a replay runs, collecting between batches when needed.

    Why: a batch's events and pending writes live until it commits, and the next batch arrives
    meanwhile, so the collector's automatic young collections (every 50,000 allocations, see
    ``consumers.runtime``) walked them again and again: ~7% of a PostgreSQL replay's CPU, for no
    garbage (its objects are freed by reference counting; peak memory is the same without them).
    Cycles still get collected: after a batch, once the net count of new objects passes
    ``_YOUNG_LIMIT``, and at least every ``_COLLECT_EVERY`` events. Left alone if something else
    had disabled the collector; the process's other threads see it paused too.
    """

    def __enter__(self) -> _CollectionBetweenBatches:
        self.paused = gc.isenabled()
        self.events = 0
        if self.paused:
            gc.disable()
        return self

    def after_batch(self, events: int) -> None:
        if not self.paused:
            return
        self.events += events
        if self.events >= _COLLECT_EVERY or gc.get_count()[0] > _YOUNG_LIMIT:
            self.events = 0
            gc.collect()

    def __exit__(self, *exc: object) -> None:
        if self.paused:
            gc.enable()


@contextmanager
def _commits_without_flush_wait(target: ProjectionTarget[Any]) -> Iterator[None]:
    """While it lasts, this thread's transactions on a PostgreSQL target's engine commit with
    ``synchronous_commit = off`` (``SET LOCAL``: that transaction only, whatever the session).

    Why it is safe for a replay, and only for it: each batch commits its ``log`` checkpoint in the
    same transaction as its writes, and WAL is flushed in order, so a server crash can only lose the
    last few batches whole, their checkpoint with them; the replay resumes from the checkpoint that
    survived and applies them again. Any later commit that does wait (the rebuild's activation, a
    live consumer's batch) flushes them first. The COMMIT then returns without waiting for the WAL
    flush (an fsync per batch). Live consumption never runs through here: what it commits is served
    to readers as done at once, and it keeps the durability every other commit has.
    """
    engine = getattr(target, "engine", None)
    if not isinstance(engine, Engine) or engine.dialect.name != "postgresql":
        yield
        return
    replaying = threading.get_ident()

    def begin(conn: Connection) -> None:
        if threading.get_ident() != replaying:
            return  # another thread's transaction on the same engine (a live consumer's, a registry's)
        # Through the DBAPI cursor: SQLAlchemy's transaction is not set up yet while this event runs.
        # Its first statement begins the driver's transaction, which SET LOCAL applies to.
        with conn.connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
            cursor.execute(_ASYNC_COMMIT)

    event.listen(engine, "begin", begin)
    try:
        yield
    finally:
        event.remove(engine, "begin", begin)


_ASYNC_COMMIT = "SET LOCAL synchronous_commit = off"


def _with_record(letter: DeadLetter) -> DeadLetter:
    original = letter.original
    if isinstance(original, ProjectedEvent):
        return DeadLetter(letter.reason, letter.error, letter.event, recorded_event(original))
    return letter


class ReplayDeadLetters(Exception):
    """A replay without a dead-letter sink met events it could not apply; they are in ``letters``."""

    def __init__(self, letters: list[DeadLetter], message: str) -> None:
        super().__init__(message)
        self.letters = letters
