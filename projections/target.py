"""What a projection writes to: a read-model store that keeps its checkpoints with its data.

A target applies one batch atomically: the handlers' writes, the last applied version of each
stream, and the source checkpoints (Kafka offsets per partition, or a store log position) commit
together or not at all. That is what makes every event take effect exactly once.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

W_co = TypeVar("W_co", covariant=True)


class BatchConflict(Exception):
    """Another process applied events of the same streams while this batch was being computed.

    The batch is rolled back; applying it again re-reads the versions and skips what is done.
    """


class TargetReadFailed(Exception):
    """A row a handler asked the batch's writes for could not be read from the target.

    The target failed, not the event: the runner fails the whole batch with the cause (retried as
    a batch when it is transient, such as a server restart) instead of dead-lettering the event.
    """


class TargetBatch(Protocol[W_co]):
    """One open batch: read versions, collect each event's writes, then :meth:`commit`."""

    @property
    def writes(self) -> W_co:
        """What handlers write through (``SqlWrites``, ``RedisWrites``)."""
        ...

    def applied_versions(self, stream_ids: Collection[str], fresh: Collection[str] = ()) -> dict[str, int]:
        """The last applied version of each of ``stream_ids`` that has one.

        ``fresh`` names those whose first event in the batch is their initial version. A target may
        take them as never applied without reading them, provided its commit then raises
        :class:`BatchConflict` if one was (a redelivery) and the batch applied again reads them.
        The commit checks every version read, too: a stream another process moved meanwhile is a
        conflict, never an overwrite.
        """
        ...

    def start_event(self) -> None:
        """Writes from here on belong to one event, until :meth:`keep_event` or :meth:`drop_event`.

        The runner calls it only when it may have to drop an event's writes: a batch's first attempt
        calls :meth:`keep_event` alone after each event, and is rolled back if a handler raises.
        """
        ...

    def keep_event(self) -> None:
        """The event's handler succeeded: fold its writes into the batch."""
        ...

    def drop_event(self) -> None:
        """The event's handler raised: forget every write it made."""
        ...

    def commit(self, versions: Mapping[str, int], checkpoints: Mapping[str, str]) -> None:
        """Apply the writes, the new stream versions and the checkpoints atomically.

        Raises :class:`BatchConflict` when versions read by :meth:`applied_versions` changed meanwhile.
        """
        ...


class ProjectionTarget(Protocol[W_co]):
    """A read-model store for one projection version (PostgreSQL schema, Redis key prefix)."""

    def setup(self) -> None:
        """Create what the read model needs (tables, indexes); idempotent."""
        ...

    def batch(self) -> AbstractContextManager[TargetBatch[W_co]]:
        """Open a batch; leaving the block without :meth:`TargetBatch.commit` rolls it back."""
        ...

    def checkpoints(self) -> dict[str, str]:
        """Every stored checkpoint: source key (``topic:partition``, ``log``) -> position."""
        ...

    def applied_version(self, stream_id: str) -> int | None:
        """The last version of ``stream_id`` applied, or None: what read-your-writes waits on."""
        ...

    def forget_applied_versions(self) -> None:
        """Forget any stream versions remembered between batches: another process may have
        applied those streams since (the consumer calls it when its partitions change)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
