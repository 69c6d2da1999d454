"""Errors the event store raises, each naming what went wrong."""

from __future__ import annotations

from uuid import UUID

from eventsourcing.persistence import IntegrityError


class EventStoreError(Exception):
    """Base class of the event store's own errors."""


class ConcurrencyError(IntegrityError, EventStoreError):
    """An append expected a stream at one version but found it at another; nothing was written.

    Subclasses ``eventsourcing``'s ``IntegrityError`` so that the library's own retry and conflict
    handling treat it as the optimistic-concurrency conflict it is.
    """

    def __init__(self, stream_id: UUID, expected_version: int, actual_version: int) -> None:
        self.stream_id = stream_id
        self.expected_version = expected_version
        self.actual_version = actual_version
        super().__init__(
            f"stream {stream_id} was expected at version {expected_version} "
            f"but is at version {actual_version}; nothing was appended"
        )


class MigrationError(EventStoreError):
    """The database schema cannot be brought to the version this code expects."""
