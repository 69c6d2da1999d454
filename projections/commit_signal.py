"""Commit signals: every committed batch is announced, so that read-your-writes waits wake at once.

A target's commit announces its read model's name (PostgreSQL: ``NOTIFY`` in the batch's
transaction, so it is delivered when, and only if, the batch commits; Redis: ``PUBLISH`` from the
commit script). One listener thread per process and server hears them and wakes the waits on that
read model, which then read the versions again. Without a listener (not yet connected, or its
connection lost) waits poll as before: a signal is a shortcut, never what correctness rests on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("datalayer.projections")

__all__ = ["CommitListener", "CommitSignal"]

# How long a listener waits before connecting again after losing its connection.
RECONNECT_DELAY = 1.0

# listen(route, connected): connect, subscribe, call connected(), then route(name) per announcement.
Listen = Callable[[Callable[[str], None], Callable[[], None]], None]


class CommitSignal:
    """The commits heard for one read model: a count, and a wait for the next one."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()
        self.listening = False

    def count(self) -> int:
        """Commits heard so far (and listener (re)connections, after which anything may have changed)."""
        return self._count

    def wait(self, seen: int, timeout: float) -> None:
        """Until :meth:`count` differs from ``seen``, or ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self._count != seen, timeout)

    def heard(self) -> None:
        with self._changed:
            self._count += 1
            self._changed.notify_all()


class CommitListener:
    """A daemon thread that runs ``listen`` and hands each announced name to that read model's signal.

    ``listen(route, connected)`` connects, subscribes, calls ``connected()`` once it hears, then
    ``route(name)`` per announcement, and returns or raises when its connection ends; it is called
    again after :data:`RECONNECT_DELAY`.
    """

    def __init__(self, what: str, listen: Listen) -> None:
        self._what = what
        self._listen = listen
        self._signals: dict[str, CommitSignal] = {}
        self._lock = threading.Lock()
        self._on = False
        self._thread = threading.Thread(target=self._run, name=f"commit-listener-{what}", daemon=True)
        self._thread.start()

    def signal(self, name: str) -> CommitSignal:
        """The signal of the read model ``name`` (a schema, a key prefix)."""
        with self._lock:
            found = self._signals.get(name)
            if found is None:
                found = self._signals[name] = CommitSignal()
                found.listening = self._on
            return found

    def _route(self, name: str) -> None:
        found = self._signals.get(name)
        if found is not None:
            found.heard()

    def _listening(self, on: bool) -> None:
        # Each change wakes every wait: what was committed while nobody listened is read again.
        with self._lock:
            self._on = on
            signals = list(self._signals.values())
        for signal in signals:
            signal.listening = on
            signal.heard()

    def _run(self) -> None:
        failures = 0
        while True:
            try:
                self._listen(self._route, lambda: self._listening(True))
            except Exception as exc:
                if self._on:
                    failures = 0  # it had connected: a new outage
                failures += 1
                # Said once per outage: waits poll meanwhile, so nothing is wrong but their speed.
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "commit listener %s: %s; read-your-writes waits poll until it reconnects",
                    self._what,
                    exc,
                )
            else:
                failures = 0
            self._listening(False)
            time.sleep(RECONNECT_DELAY)  # between attempts to connect, not waiting for a result
