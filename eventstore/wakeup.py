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
        self._notify = sql.SQL("NOTIFY {}").format(sql.Identifier(channel)).as_bytes()
        self._min_interval = min_interval
        self._pending = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None

    def announce(self) -> None:
        """Note that events were committed; the thread notifies followers shortly."""
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
                self._send()
                time.sleep(self._min_interval)  # coalesce a burst of commits into one NOTIFY
        finally:
            self._disconnect()

    def _send(self) -> None:
        try:
            if self._conn is None or self._conn.closed:
                conn = self._connect()
                conn.execute("SET synchronous_commit = off")
                self._conn = conn
            if self._conn.pgconn.exec_(self._notify).status != pq.ExecStatus.COMMAND_OK:
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
                self._send()
                self._disconnect()
