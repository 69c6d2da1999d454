"""The values that go into and come out of the event store."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

import orjson


class LogPosition(NamedTuple):
    """A place in the commit-ordered log: the writing transaction's id, then the global position.

    The log is read in this order, which never lets a later-committed event slip in behind a
    reader (see :meth:`eventstore.store.EventStore.read_all`). ``str()`` gives a stable text form.
    """

    transaction_id: int
    position: int

    def __str__(self) -> str:
        return f"{self.transaction_id}/{self.position}"

    @classmethod
    def parse(cls, text: str) -> LogPosition:
        """Read the ``transaction_id/position`` form back; raises ``ValueError`` naming the input."""
        try:
            xid, pos = text.split("/")
            return cls(int(xid), int(pos))
        except ValueError:
            raise ValueError(f"not a log position (expected TRANSACTION/POSITION): {text!r}") from None


LOG_START = LogPosition(0, 0)


@dataclass(frozen=True)
class EventMetadata:
    """Who caused an event and in which flow; stored with it, never part of the payload."""

    correlation_id: str | None = None
    causation_id: str | None = None
    actor: str | None = None
    tenant: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        if self is NO_METADATA:
            return {}
        data: dict[str, Any] = {k: v for k, v in vars(self).items() if v is not None and k != "extra"}
        data.update(self.extra)
        return data

    def to_json(self) -> str:
        if self is NO_METADATA:
            return "{}"  # the common case on the append path, without a json.dumps
        return orjson.dumps(self.to_dict(), default=str).decode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EventMetadata:
        known = {k: data[k] for k in ("correlation_id", "causation_id", "actor", "tenant") if k in data}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**known, extra=extra)


NO_METADATA = EventMetadata()


@dataclass(frozen=True)
class NewEvent:
    """An event to append: its id makes a resubmission a no-op rather than a duplicate."""

    event_id: UUID
    event_type: str
    payload: bytes
    schema_version: int = 1
    metadata: EventMetadata = NO_METADATA


@dataclass(frozen=True)
class StreamAppend:
    """Events for one stream and the version it is expected to be at (0: new; -1: new, numbered from 0)."""

    stream_id: UUID
    stream_type: str
    expected_version: int
    events: tuple[NewEvent, ...]


@dataclass(frozen=True)
class RecordedEvent:
    """An event as stored, with where it sits in its stream and in the log."""

    position: int
    transaction_id: int
    stream_id: UUID
    stream_type: str
    stream_version: int
    event_id: UUID
    event_type: str
    schema_version: int
    payload: bytes
    metadata: EventMetadata
    recorded_at: datetime

    @property
    def log_position(self) -> LogPosition:
        return LogPosition(self.transaction_id, self.position)


@dataclass(frozen=True)
class AppendResult:
    """What an append wrote: the stream's new version and the global positions of its events.

    ``positions`` is empty when every event was already stored (an idempotent resubmission).
    """

    stream_id: UUID
    version: int
    positions: tuple[int, ...]
