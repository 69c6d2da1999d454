"""A rebuild's replay split across processes: each replays one partition of the streams.

Why processes: the replay is Python work per event (decoding, handlers, coalescing) under one GIL,
while the servers have CPU to spare; two processes use two cores. Streams are partitioned by their
id (see ``projections.log_reader.partition_bounds``), so each stream's events are applied by one
process, in order, and the per-stream versions keep each event's effect exactly-once as in a single
replay. Each partition commits its own checkpoint with its batches (``log:<index>/<count>``), so an
interrupted rebuild resumes every partition where it stopped.

Only for projections whose writes commute across streams (``Projection.parallel_replay``): rows or
keys of one stream, and shared rows or keys changed by increments only, whose sum does not depend on
the order in which the processes' batches commit.

The calling process replays partition 0 itself and forks one worker per other partition: with two
partitions, two processes in all. Each process holds its own copy of the modules (~90 MB resident,
counted in each one's RSS although forked pages are shared until written), so a parent that only
waited would add a third. The workers inherit the projection and the target factory as they are
(nothing is pickled), then open connections of their own (see :func:`_own_connections`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from eventstore.records import LogPosition
from eventstore.store import EventStore
from projections.projection import Projection
from projections.replay import LOG_CHECKPOINT, ReplayStats, partition_checkpoint, replay
from projections.runner import DeadLetterSink
from projections.target import ProjectionTarget

log = logging.getLogger("datalayer.rebuild")

# A sink for dead letters and the function that closes it, made in each worker.
SinkFactory = Callable[[], tuple[DeadLetterSink, Callable[[], None]]]


@dataclass(frozen=True)
class _Report:
    """What a worker sends after each batch, and once more when it ends (``done``)."""

    index: int
    stats: ReplayStats
    done: bool = False
    error: str | None = None


class WorkerFailed(RuntimeError):
    """A replay worker raised or died; its partition stays resumable from its checkpoint."""


def replay_in_parallel(
    projection: Projection[Any],
    make_target: Callable[[], ProjectionTarget[Any]],
    store: EventStore,
    *,
    target: ProjectionTarget[Any],
    workers: int,
    batch_size: int,
    make_sink: SinkFactory,
    stop: threading.Event,
    on_progress: Callable[[ReplayStats], None],
    max_rate: float | None = None,
) -> bool:
    """Replay the partitions ``0..workers-1``; True when all reached the end.

    This process replays partition 0 into ``target`` while ``workers - 1`` forked processes replay
    the others: ``workers`` processes in all, not a parent idling beside them (a process costs its
    modules' ~90 MB whether it replays or waits). False when ``stop`` was set first (every process
    stops after its current batch). ``on_progress`` gets the sum of all partitions' figures after
    each of their batches. ``max_rate`` (events/s) is shared out evenly. Raises
    :class:`WorkerFailed` if a worker fails; this process then stops after its current batch too.
    """
    context = multiprocessing.get_context("fork")
    reports: Any = context.Queue()
    halt = context.Event()
    share = max_rate / workers if max_rate else None

    def work(index: int) -> None:
        stats = ReplayStats()
        try:
            stats = _work(
                projection, make_target, store, index, workers, batch_size, make_sink, share, halt, reports
            )
            reports.put(_Report(index, stats, done=True))
        except BaseException:
            reports.put(_Report(index, stats, done=True, error=traceback.format_exc()))
            raise

    processes = {
        i: context.Process(target=work, args=(i,), name=f"replay-{projection.name}-{i}", daemon=True)
        for i in range(1, workers)
    }
    for process in processes.values():
        process.start()
    crew = _Crew(processes, reports)
    try:
        finished = _replay_own_partition(
            projection, target, store, workers, batch_size, make_sink, share, stop, crew, on_progress
        )
        if finished:
            while not crew.all_finished() and not crew.errors:
                if stop.is_set():
                    halt.set()
                if crew.collect(timeout=0.2):
                    on_progress(crew.total())
    finally:
        halt.set()
        for process in processes.values():
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
        reports.close()
    if crew.errors:
        failures = "\n".join(crew.errors)
        raise WorkerFailed(f"replay worker failed; run the rebuild again to resume:\n{failures}")
    return not stop.is_set()


class _Crew:
    """The forked workers as this process sees them: who finished, who failed, and every partition's
    latest figures (partition 0's, this process's own, included)."""

    def __init__(self, processes: dict[int, Any], reports: Any) -> None:
        self.processes = processes
        self.reports = reports
        self.latest: dict[int, ReplayStats] = {}
        self.finished: set[int] = set()
        self.errors: list[str] = []

    def collect(self, timeout: float) -> bool:
        """Take the reports waiting (after ``timeout`` s for the first); True if any came."""
        got = False
        block = timeout > 0
        while True:
            try:
                report: _Report = self.reports.get(timeout=timeout) if block else self.reports.get_nowait()
            except queue.Empty:
                break
            block = False
            got = True
            self.latest[report.index] = report.stats
            if report.done:
                self.finished.add(report.index)
                if report.error:
                    self.errors.append(f"worker {report.index}:\n{report.error}")
        # Only once the queue is drained: a worker's last report is in the pipe before it exits.
        for index, process in self.processes.items():
            # Killed (OOM, a signal): it never said goodbye, and nothing more will come.
            if index not in self.finished and process.exitcode not in (None, 0):
                self.finished.add(index)
                self.errors.append(f"worker {index} died with exit code {process.exitcode}")
        return got

    def all_finished(self) -> bool:
        return len(self.finished) == len(self.processes)

    def total(self) -> ReplayStats:
        return _total(self.latest.values())


def _replay_own_partition(
    projection: Projection[Any],
    target: ProjectionTarget[Any],
    store: EventStore,
    workers: int,
    batch_size: int,
    make_sink: SinkFactory,
    max_rate: float | None,
    stop: threading.Event,
    crew: _Crew,
    on_progress: Callable[[ReplayStats], None],
) -> bool:
    """Partition 0 in this process, hearing from the workers between batches; False if halted."""
    sink, close_sink = make_sink()
    begun = time.monotonic()

    def on_batch(stats: ReplayStats) -> None:
        crew.latest[0] = stats
        crew.collect(timeout=0)
        on_progress(crew.total())
        if max_rate:
            ahead = stats.events_read / max_rate - (time.monotonic() - begun)
            if ahead > 0:
                stop.wait(ahead)
        # A failed worker fails the rebuild: this partition stops after its batch, as on Ctrl-C.
        if stop.is_set() or crew.errors:
            raise _Halted

    try:
        replay(
            projection,
            target,
            store,
            batch_size=batch_size,
            dead_letters=sink,
            on_batch=on_batch,
            partition=(0, workers),
        )
    except _Halted:
        return False
    finally:
        close_sink()
    return True


def settle_log_checkpoint(target: ProjectionTarget[Any], workers: int) -> None:
    """After every partition reached the end: move ``log`` up to the least partition checkpoint.

    Every partition's events are applied up to its own checkpoint and, as its last read found no
    more, beyond it; so all of the log is applied up to the least of them. A sequential replay from
    there (mostly skipping duplicates) then brings ``log`` to the end, as after a single replay.
    """
    stored = target.checkpoints()
    names = (partition_checkpoint(i, workers) for i in range(workers))
    ends = [LogPosition.parse(stored[name]) for name in names if name in stored]
    if not ends:
        return
    settled = min(ends)
    current = stored.get(LOG_CHECKPOINT)
    if current is not None and LogPosition.parse(current) >= settled:
        return
    with target.batch() as batch:
        batch.commit({}, {LOG_CHECKPOINT: str(settled)})


def _work(
    projection: Projection[Any],
    make_target: Callable[[], ProjectionTarget[Any]],
    store: EventStore,
    index: int,
    workers: int,
    batch_size: int,
    make_sink: SinkFactory,
    max_rate: float | None,
    halt: Any,
    reports: Any,
) -> ReplayStats:
    """One worker (in its own process): replay partition ``index`` of ``workers``."""
    # The parent's handlers came along with the fork and would only set its stop event's copy here.
    # Ctrl-C reaches the whole process group: the parent stops the workers after their batch. A
    # SIGTERM to a worker alone ends it (its open batch rolls back) and fails the rebuild.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = os.getppid()
    own_store = _own_store(store)
    target = make_target()
    _own_connections(target)
    sink, close_sink = make_sink()
    begun = time.monotonic()
    last = ReplayStats()

    def on_batch(stats: ReplayStats) -> None:
        nonlocal last
        last = stats
        reports.put(_Report(index, stats))
        if max_rate:
            ahead = stats.events_read / max_rate - (time.monotonic() - begun)
            if ahead > 0:
                halt.wait(ahead)
        # A parent killed outright (kill -9) cannot tell its workers to stop: they notice it is gone.
        if halt.is_set() or os.getppid() != parent:
            raise _Halted

    try:
        return replay(
            projection,
            target,
            own_store,
            batch_size=batch_size,
            dead_letters=sink,
            on_batch=on_batch,
            partition=(index, workers),
        )
    except _Halted:
        return last
    finally:
        close_sink()
        own_store.close()


def _own_store(store: EventStore) -> EventStore:
    """A store like ``store`` on a pool of this process: the inherited pool's sockets are the parent's."""
    given = store.pool.kwargs
    kwargs = dict(given() if callable(given) else given or {})
    kwargs.pop("autocommit", None)
    return EventStore.connect(str(store.pool.conninfo), store.schema, max_size=2, connect_kwargs=kwargs)


def _own_connections(target: ProjectionTarget[Any]) -> None:
    """Make a target made in a forked worker open connections of its own.

    An SQLAlchemy engine's pool would hand out the parent's connections: it is replaced without
    closing them (the parent still uses them). A redis-py client notices the new process by itself.
    """
    engine = getattr(target, "engine", None)
    if isinstance(engine, Engine):
        engine.dispose(close=False)


def _total(parts: Any) -> ReplayStats:
    total = ReplayStats()
    for stats in parts:
        total.events_read += stats.events_read
        total.applied += stats.applied
        total.duplicates += stats.duplicates
        total.dead_letters += stats.dead_letters
    return total


class _Halted(Exception):
    pass
