"""Read-your-writes: wait, with a deadline, until a projection has applied what a command wrote.

Waiting is per stream and version, not per global position: positions are unique but not in
commit order, while a stream's versions are, and every projection records the last version it
applied of each stream it consumes. A target with a commit signal (``commit_signal()``: both of
ours) wakes the wait as soon as a batch commits; without one, or while its listener is not
connected, the wait polls.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol
from uuid import UUID

from projections.commit_signal import CommitSignal
from projections.projection import Projection

FIRST_INTERVAL = 0.001
MAX_INTERVAL = 0.02
# With a listening commit signal, how long a wait sleeps at most between reads of the versions:
# announcements are a shortcut, and one missed (a listener reconnecting) costs this much at most.
SIGNALLED_INTERVAL = 0.25


class StreamWrite(Protocol):
    """What a command wrote to one stream (``domain.StreamWrite`` fits)."""

    @property
    def stream_type(self) -> str: ...
    @property
    def stream_id(self) -> UUID | str: ...
    @property
    def version(self) -> int: ...


class AppliedVersions(Protocol):
    """Anything that knows a projection's applied versions: its target. One that also has a
    ``commit_signal()`` returning a :class:`CommitSignal` wakes waits as soon as a batch commits."""

    def applied_version(self, stream_id: str) -> int | None: ...


class ReadModelTimeout(TimeoutError):
    """The projection did not apply a write within the timeout: its consumer is down or behind."""

    def __init__(self, projection: str, stream_id: str, version: int, applied: int | None, timeout: float):
        seen = "nothing of it" if applied is None else f"version {applied}"
        super().__init__(
            f"projection {projection} has not applied stream {stream_id} version {version} within "
            f"{timeout:g} s (it has applied {seen}); is its consumer running and keeping up?"
        )
        self.projection = projection
        self.stream_id = stream_id
        self.version = version
        self.applied = applied


def wait_until_applied(
    projection: Projection[Any],
    versions: AppliedVersions,
    writes: Iterable[StreamWrite],
    timeout: float = 5.0,
) -> None:
    """Return once ``projection`` has applied every one of ``writes`` to streams it consumes.

    Writes to stream types the projection does not consume are ignored, so a command result can
    be passed as it is (``wait_until_applied(p, target, result.written)``). Raises
    :class:`ReadModelTimeout` after ``timeout`` seconds.
    """
    wanted = [(str(w.stream_id), w.version) for w in writes if w.stream_type in projection.stream_types]
    if not wanted:
        return
    deadline = time.monotonic() + timeout
    interval = FIRST_INTERVAL
    signal_of = getattr(versions, "commit_signal", None)
    signal: CommitSignal | None = signal_of() if callable(signal_of) else None
    for stream_id, version in wanted:
        while True:
            # Counted before the read: a commit between the read and the wait ends the wait at once.
            seen = signal.count() if signal is not None else 0
            applied = versions.applied_version(stream_id)
            if applied is not None and applied >= version:
                break
            now = time.monotonic()
            if now >= deadline:
                raise ReadModelTimeout(projection.qualified_name, stream_id, version, applied, timeout)
            if signal is not None and signal.listening:
                signal.wait(seen, min(SIGNALLED_INTERVAL, deadline - now))
            else:
                # Polling from 1 ms up to 20 ms: cheap reads, the wait ending within a few ms of the apply.
                time.sleep(min(interval, deadline - now))
                interval = min(interval * 2, MAX_INTERVAL)
