"""The PostgreSQL event store: schema migrations, appends, commit-ordered reading and the relay.

Knows nothing of any particular domain. Start with :class:`EventStore`.
"""

from eventstore.errors import ConcurrencyError, EventStoreError, MigrationError
from eventstore.follow import LogFollower
from eventstore.horizon import Horizon
from eventstore.records import (
    LOG_START,
    AppendResult,
    EventMetadata,
    LogPosition,
    NewEvent,
    RecordedEvent,
    StreamAppend,
)
from eventstore.store import EventStore

__all__ = [
    "LOG_START",
    "AppendResult",
    "ConcurrencyError",
    "EventMetadata",
    "EventStore",
    "EventStoreError",
    "Horizon",
    "LogFollower",
    "LogPosition",
    "MigrationError",
    "NewEvent",
    "RecordedEvent",
    "StreamAppend",
]
