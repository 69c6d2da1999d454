"""Redis's commit signal: the commit script publishes its key prefix, one subscriber per client.

``PUBLISH`` from the script runs only when the batch is applied (a refused batch returns before
it), and a subscriber hears it once Redis has run the script. Why one channel for all read models
rather than one each: one subscribed connection per process serves every target on the client.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import redis

from projections.commit_signal import CommitListener, CommitSignal

__all__ = ["CHANNEL", "commit_signal"]

CHANNEL = "datalayer:applied"  # the commit script's PUBLISH names it too (projections.targets.redis)

_LISTENERS: dict[tuple[Any, ...], CommitListener] = {}
_LOCK = threading.Lock()


def commit_signal(client: redis.Redis, prefix: str) -> CommitSignal:
    """The signal of the read model under ``prefix``, heard by this process's subscriber to the
    server ``client`` connects to (started on first use, on a connection of that client's pool:
    clients made and closed one after another share it, and it reconnects as they do)."""
    key = _server(client)
    with _LOCK:
        listener = _LISTENERS.get(key)
        if listener is None:
            listener = _LISTENERS[key] = CommitListener("redis", partial(_listen, client))
    return listener.signal(prefix)


def _server(client: redis.Redis) -> tuple[Any, ...]:
    """Which server and database ``client`` talks to, as who: where announcements are heard alike."""
    kwargs = client.connection_pool.connection_kwargs
    found = tuple(kwargs.get(name) for name in ("host", "port", "path", "db", "username"))
    return found if any(part is not None for part in found) else (id(client),)


def _listen(client: redis.Redis, route: Callable[[str], None], connected: Callable[[], None]) -> None:
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(CHANNEL)
        while True:
            message = pubsub.get_message(timeout=60.0)
            if message is None:
                continue
            kind = message.get("type")
            if kind == "subscribe":
                # Redis confirmed the subscription: what is announced from now on is heard.
                connected()
            elif kind == "message":
                data = message["data"]
                route(data.decode() if isinstance(data, bytes) else str(data))
    finally:
        pubsub.close()
