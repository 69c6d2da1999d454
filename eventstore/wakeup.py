"""Announcing new events to followers, coalesced: at most one NOTIFY per interval per store object.

Sending NOTIFY inside each append would make every appending transaction queue for PostgreSQL's
notification lock at commit; sending one after each commit costs every append a round trip. A
background thread instead sends one NOTIFY for all appends committed since the last one. Followers
poll as well, so a notification lost to a crash costs them at most their poll interval.

The thread has a connection of its own: borrowing one from the writers' pool made a writer wait for
it now and then. A NOTIFY's transaction gets a transaction id and so a commit record; its session
does not wait for that record's disk flush (``synchronous_commit = off``), because a notification
lost to a server crash only costs followers a poll interval, while waiting would add a flush per
NOTIFY to the disk the writers' commits wait on.

Each NOTIFY carries the highest log position announced so far. A follower whose read after it
returns no event at or beyond that position knows the events are committed but held back by the
read horizon (an older transaction still running), and looks again soon rather than at the next
NOTIFY, which may never come (see ``eventstore.follow``).

Under sustained writes the thread runs every interval, in the writers' process: it sends its NOTIFY
with one libpq call (the GIL released once, for the round trip) and sleeps without a timed wait on
an event, because each time it takes the GIL it takes it from the writers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq, sql


class ReaderWakeup:
    """Sends ``NOTIFY channel`` soon after :meth:`announce`, once for any number of announcements.

    ``connect`` opens an autocommit connection; the thread opens one when it first needs it and
    again after an error.
    """

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], channel: str, min_interval: float = 0.002
    ) -> None:
        self._connect = connect
        self._channel = sql.Identifier(channel)
        self._notify = sql.SQL("NOTIFY {}").format(self._channel).as_bytes()
        # The highest position announced (0: none known). Raised without a lock: two appending
        # threads racing may leave the lower of their positions, which only costs followers the
        # quick second look for the higher one (they still get its NOTIFY, and poll).
        self._position = 0
        self._min_interval = min_interval
        self._pending = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None

    def announce(self, position: int = 0) -> None:
        """Note that events up to log ``position`` (the highest written; 0 if unknown) were committed;
        the thread notifies followers shortly."""
        if position > self._position:
            self._position = position
        # Already pending: the thread has yet to clear it, so its NOTIFY follows this commit.
        # Setting it again would only take the event's lock on every append.
        if not self._pending.is_set():
            self._pending.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closed.is_set():
                    self._thread = threading.Thread(target=self._run, name="datalayer-wakeup", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                if not self._pending.wait(timeout=0.5):
                    continue
                self._pending.clear()
                self._send(self._position)
                time.sleep(self._min_interval)  # coalesce a burst of commits into one NOTIFY
        finally:
            self._disconnect()

    def _send(self, position: int = 0) -> None:
        try:
            if self._conn is None or self._conn.closed:
                conn = self._connect()
                conn.execute("SET synchronous_commit = off")
                self._conn = conn
            notify = self._notify
            if position:
                # An int, rendered as a string literal: nothing from outside goes into the statement.
                notify = sql.SQL("NOTIFY {}, {}").format(self._channel, sql.Literal(str(position))).as_bytes()
            if self._conn.pgconn.exec_(notify).status != pq.ExecStatus.COMMAND_OK:
                self._disconnect()  # a broken connection; the next NOTIFY opens a new one
        except psycopg.Error:
            self._disconnect()  # the server is going away; followers' polling covers this one

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Send what is pending and stop the thread."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._pending.is_set() and not self._thread.is_alive():
                self._send(self._position)
                self._disconnect()
