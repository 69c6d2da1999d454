"""Following the commit-ordered log as it grows: LISTEN/NOTIFY wakes, polling backs it up.

A lost notification (a dropped connection, a writer killed between commit and notify) costs at most
``poll_interval``. A notification names the highest position written (see ``eventstore.wakeup``):
when a read finds nothing at or beyond it, those events are committed but held back by the read
horizon (a transaction older than theirs still running anywhere in the database, such as a
projection's batch), and the follower looks again after ``HELD_BACK_RETRY``, doubling up to
``poll_interval``: that transaction may end without writing an event, so without a notification.
No query is added for this; only reads that leave announced events behind are followed by sooner ones.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, cast, overload

import psycopg
from psycopg import sql

from eventstore.records import LOG_START, LogPosition, RecordedEvent
from eventstore.store import EventStore

EntryT = TypeVar("EntryT")

# Seconds before a follower looks again for announced events the horizon held back (see above).
HELD_BACK_RETRY = 0.002


def _recorded_position(event: RecordedEvent) -> LogPosition:
    return event.log_position


class _Either(threading.Event):
    """Set when either of two events is set (checked by :meth:`LogFollower.batches`)."""

    def __init__(self, first: threading.Event, second: threading.Event) -> None:
        super().__init__()
        self._events = (first, second)

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


class LogFollower(Generic[EntryT]):
    """Yields batches of new events in commit order, resuming after ``after``, until stopped.

    Batches are :class:`RecordedEvent` lists from :meth:`EventStore.read_all`, or whatever ``read``
    returns: a reader of the same never-skipping query that selects what it needs (the relay does),
    with ``position_of`` telling each entry's place in the log.
    """

    @overload
    def __init__(
        self: LogFollower[RecordedEvent],
        store: EventStore,
        after: LogPosition = LOG_START,
        *,
        batch_size: int = 1000,
        poll_interval: float = 0.5,
        report_idle: bool = False,
        read: None = None,
        position_of: None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        store: EventStore,
        after: LogPosition = LOG_START,
        *,
        batch_size: int = 1000,
        poll_interval: float = 0.5,
        report_idle: bool = False,
        read: Callable[[LogPosition, int], Sequence[EntryT]],
        position_of: Callable[[EntryT], LogPosition],
    ) -> None: ...

    def __init__(
        self,
        store: EventStore,
        after: LogPosition = LOG_START,
        *,
        batch_size: int = 1000,
        poll_interval: float = 0.5,
        report_idle: bool = False,
        read: Callable[[LogPosition, int], Sequence[Any]] | None = None,
        position_of: Callable[[Any], LogPosition] | None = None,
    ) -> None:
        self.store = store
        # The overloads pair the default reader with RecordedEvent entries, a given one with its own.
        self._read = cast(Callable[[LogPosition, int], Sequence[EntryT]], read or store.read_all)
        self._position_of = cast(Callable[[EntryT], LogPosition], position_of or _recorded_position)
        self.position = after
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.report_idle = report_idle
        self._listener: psycopg.Connection[Any] | None = None
        # The highest position a notification announced, and the highest this follower has read.
        self._announced = 0
        self._read_up_to = after.position

    def batches(self, stop: threading.Event | None = None) -> Iterator[Sequence[EntryT]]:
        """Each batch as it becomes readable; :attr:`position` moves past it when yielded.

        With ``report_idle`` an empty batch is yielded each time the follower has caught up and is
        about to wait, so that a consumer can finish work it deferred while there was a backlog.
        """
        stop = stop or threading.Event()
        retry = HELD_BACK_RETRY
        try:
            self._try_listen()  # before the first read, so nothing committed after it goes unannounced
            while not stop.is_set():
                batch = self._read(self.position, self.batch_size)
                if batch:
                    self.position = self._position_of(batch[-1])
                    full = len(batch) == self.batch_size
                    self._note_read(batch, full)
                    yield batch
                    if full:
                        continue
                elif self.report_idle:
                    yield batch
                if self._announced > self._read_up_to:
                    # Announced, committed, and not readable yet: held back by the horizon.
                    self.wait(retry)
                    retry = min(retry * 2, self.poll_interval)
                    continue
                retry = HELD_BACK_RETRY
                self.wait(self.poll_interval)
        finally:
            self.close()

    def prefetched(self, stop: threading.Event, depth: int = 2) -> Iterator[Sequence[EntryT]]:
        """:meth:`batches`, read ahead by a thread: the next batch is fetched while this one is used.

        The database's time to answer then overlaps the caller's work. An error in the reading
        thread is raised here; leaving the loop stops the thread.
        """
        done = threading.Event()
        ready: queue.Queue[Sequence[EntryT] | BaseException | None] = queue.Queue(maxsize=depth)

        def read() -> None:
            try:
                for batch in self.batches(_Either(stop, done)):
                    while not done.is_set():
                        try:
                            ready.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                ready.put(None)
            except BaseException as exc:  # handed to the consuming thread, which raises it
                ready.put(exc)

        reader = threading.Thread(target=read, name="datalayer-log-reader", daemon=True)
        reader.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            done.set()
            reader.join(timeout=10)

    def _note_read(self, batch: Sequence[EntryT], full: bool) -> None:
        """Raise the highest position read. Positions follow insertion, not commit, so a batch's
        highest may be anywhere in it: the batch is searched only when its last entry leaves an
        announced position unread, and not when it is full (another read follows at once)."""
        position_of = self._position_of
        highest = position_of(batch[-1]).position
        if not full and highest < self._announced:
            highest = max(position_of(entry).position for entry in batch)
        if highest > self._read_up_to:
            self._read_up_to = highest

    def wait(self, timeout: float) -> bool:
        """Block until a writer announces new events or ``timeout`` passes; True when announced."""
        try:
            listener = self._listen()
            announced = False
            for notify in listener.notifies(timeout=timeout, stop_after=1):
                announced = True
                if notify.payload.isdigit() and int(notify.payload) > self._announced:
                    self._announced = int(notify.payload)
            return announced
        except psycopg.OperationalError:
            self.close()  # reconnect on the next wait; meanwhile this wait degraded to a poll
            threading.Event().wait(timeout)
            return False

    def _try_listen(self) -> None:
        try:
            self._listen()
        except psycopg.OperationalError:
            self.close()  # polling still works; the next wait tries again

    def _listen(self) -> psycopg.Connection[Any]:
        if self._listener is None or self._listener.closed:
            listener = self.store.dedicated_connection()
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.store.channel)))
            self._listener = listener
        return self._listener

    @property
    def listening(self) -> bool:
        """True while a LISTEN connection is open (otherwise the follower only polls)."""
        return self._listener is not None and not self._listener.closed

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
