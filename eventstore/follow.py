"""Following the commit-ordered log as it grows: LISTEN/NOTIFY wakes, polling backs it up.

A lost notification (a dropped connection, a writer killed between commit and notify) or a
horizon released by a transaction that wrote no event costs at most ``poll_interval``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from eventstore.records import LOG_START, LogPosition, RecordedEvent
from eventstore.store import EventStore


class LogFollower:
    """Yields batches of new events in commit order, resuming after ``after``, until stopped."""

    def __init__(
        self,
        store: EventStore,
        after: LogPosition = LOG_START,
        *,
        batch_size: int = 1000,
        poll_interval: float = 0.5,
    ) -> None:
        self.store = store
        self.position = after
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._listener: psycopg.Connection[Any] | None = None

    def batches(self, stop: threading.Event | None = None) -> Iterator[list[RecordedEvent]]:
        """Each non-empty batch as it becomes readable; :attr:`position` moves past it when yielded."""
        stop = stop or threading.Event()
        try:
            self._try_listen()  # before the first read, so nothing committed after it goes unannounced
            while not stop.is_set():
                batch = self.store.read_all(self.position, self.batch_size)
                if batch:
                    self.position = batch[-1].log_position
                    yield batch
                    if len(batch) == self.batch_size:
                        continue
                self.wait(self.poll_interval)
        finally:
            self.close()

    def wait(self, timeout: float) -> bool:
        """Block until a writer announces new events or ``timeout`` passes; True when announced."""
        try:
            listener = self._listen()
            return any(True for _ in listener.notifies(timeout=timeout, stop_after=1))
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
