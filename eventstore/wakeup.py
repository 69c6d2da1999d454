"""Announcing new events to followers, coalesced: at most one NOTIFY per interval per store object.

Sending NOTIFY inside each append would make every appending transaction queue for PostgreSQL's
notification lock at commit; sending one after each commit costs every append a round trip. A
background thread instead sends one NOTIFY for all appends committed since the last one. Followers
poll as well, so a notification lost to a crash costs them at most their poll interval.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool


class ReaderWakeup:
    """Sends ``NOTIFY channel`` soon after :meth:`announce`, once for any number of announcements."""

    def __init__(self, pool: ConnectionPool[Any], channel: str, min_interval: float = 0.002) -> None:
        self._pool = pool
        self._notify = sql.SQL("NOTIFY {}").format(sql.Identifier(channel))
        self._min_interval = min_interval
        self._pending = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def announce(self) -> None:
        """Note that events were committed; the thread notifies followers shortly."""
        self._pending.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closed.is_set():
                    self._thread = threading.Thread(target=self._run, name="datalayer-wakeup", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            if not self._pending.wait(timeout=0.5):
                continue
            self._pending.clear()
            try:
                with self._pool.connection() as conn:
                    conn.execute(self._notify)
            except (psycopg.Error, RuntimeError):
                pass  # the server or pool is going away; followers' polling covers this one
            self._closed.wait(self._min_interval)  # coalesce a burst of commits into one NOTIFY

    def close(self) -> None:
        """Send what is pending and stop the thread."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._pending.is_set():
                try:
                    with self._pool.connection(timeout=1) as conn:
                        conn.execute(self._notify)
                except (psycopg.Error, RuntimeError):
                    pass
