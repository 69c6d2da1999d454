"""PostgreSQL's commit signal: ``NOTIFY`` in each batch's transaction, one ``LISTEN`` per engine.

The notification's payload is the target's schema; PostgreSQL delivers it when the transaction
commits, never for one rolled back. Why a channel for all read models rather than one each: one
listening connection per process serves every target on the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

from sqlalchemy import Engine

from projections.commit_signal import CommitListener, CommitSignal
from projections.targets.pg_deferred import Statement

__all__ = ["CHANNEL", "commit_signal", "notify_statement"]

CHANNEL = "datalayer_applied"

_LISTENERS: dict[Engine, CommitListener] = {}
_LOCK = threading.Lock()


def notify_statement(schema: str) -> Statement:
    """What a batch's transaction runs to announce its commit."""
    return "SELECT pg_notify(%(channel)s, %(schema)s)", {"channel": CHANNEL, "schema": schema}


def commit_signal(engine: Engine, schema: str) -> CommitSignal:
    """The signal of the read model in ``schema``, heard by this process's listener on ``engine``
    (started on first use: a connection of its own, out of the engine's pool)."""
    with _LOCK:
        listener = _LISTENERS.get(engine)
        if listener is None:
            listener = _LISTENERS[engine] = CommitListener("postgres", partial(_listen, engine))
    return listener.signal(schema)


def _listen(engine: Engine, route: Callable[[str], None], connected: Callable[[], None]) -> None:
    raw = engine.raw_connection()
    driver = raw.driver_connection
    raw.detach()  # held for good: the pool must neither count nor reuse it
    assert driver is not None
    try:
        driver.rollback()
        driver.autocommit = True
        driver.execute(f"LISTEN {CHANNEL}")
        connected()
        for notice in driver.notifies():
            route(notice.payload)
    finally:
        driver.close()
