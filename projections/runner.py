"""The one code path that applies events to a projection's target, live (Kafka) or replayed (store).

For each batch: read the streams' applied versions, then per event skip a duplicate, dead-letter a
gap or a malformed event, run the handler (dead-letter it if it raises), and commit the writes,
versions and checkpoints in one transaction. Dead letters are handed over before that commit, so
a crash in between re-delivers them rather than losing them.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from projections.events import EventDecoder, MalformedEvent, ProjectedEvent
from projections.projection import Projection
from projections.target import BatchConflict, ProjectionTarget, TargetReadFailed

log = logging.getLogger("datalayer.projections")

W = TypeVar("W")

MAX_CONFLICT_RETRIES = 5


@dataclass(slots=True)
class SourceItem:
    """One record from a source: the event (None if it could not be parsed), its parse error, the original."""

    event: ProjectedEvent | None
    original: Any
    error: MalformedEvent | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event the projection could not apply, and why.

    ``reason``: ``poison`` (the handler raised), ``version_gap`` (versions missing before it), or a
    :class:`MalformedEvent` reason. ``original`` is the source's record, kept whole.
    """

    reason: str
    error: str
    event: ProjectedEvent | None
    original: Any


DeadLetterSink = Callable[[Sequence[DeadLetter]], None]


@dataclass(slots=True)
class BatchOutcome:
    """What a batch did: events applied (handled or not), duplicates skipped, dead letters."""

    applied: int = 0
    duplicates: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)


def apply_batch(
    projection: Projection[W],
    target: ProjectionTarget[W],
    items: Sequence[SourceItem],
    checkpoints: Mapping[str, str],
    dead_letters: DeadLetterSink,
    *,
    fresh_streams: bool = False,
) -> BatchOutcome:
    """Apply ``items`` in order and store ``checkpoints`` with them, exactly once per event.

    Retries the whole batch if another process applied some of the same streams meanwhile.
    With ``fresh_streams`` (a replay past every checkpoint of its target, where nothing can have
    been applied yet), a stream whose first event here is its initial version is not read: the
    target takes it as never applied, and a retry reads it if that was wrong.
    """
    attempt = 1
    isolated = False
    while True:
        try:
            # A retry reads every stream: the conflict may be a redelivered stream taken as fresh.
            return _apply_once(
                projection, target, items, checkpoints, dead_letters, fresh_streams and attempt == 1, isolated
            )
        except _HandlerRaised:
            # Not a conflict: the same batch again, each event's writes kept apart this time so that
            # the failing one's can be taken back alone.
            isolated = True
        except BatchConflict:
            if attempt == MAX_CONFLICT_RETRIES:
                raise
            attempt += 1
            log.info("projection %s: batch conflicted with another process, retrying", projection.name)


class _HandlerRaised(Exception):
    """A handler raised in a batch applied without per-event isolation: apply it again, isolated."""


def _handler_lookup(projection: Projection[W]) -> Callable[[str], Callable[[ProjectedEvent, W], None] | None]:
    """``projection.handler_for``, or its dict's own ``get`` when the projection does not override it
    (a builtin call per event instead of a method and a lookup)."""
    if type(projection).handler_for is Projection.handler_for:
        return projection._bound.get
    return projection.handler_for


def _preparer(decoder: EventDecoder) -> Callable[[ProjectedEvent], None]:
    """``decoder.prepare`` (check, bind and decode in one call), unless the decoder has none, or a
    subclass overrides ``check`` or ``bind`` but not it: then those, and ``data``, one by one."""
    kind = type(decoder)
    own = getattr(kind, "prepare", None)
    if own is not None and (
        own is not EventDecoder.prepare
        or (kind.check is EventDecoder.check and kind.bind is EventDecoder.bind)
    ):
        return decoder.prepare

    def prepare(event: ProjectedEvent) -> None:
        decoder.check(event)
        decoder.bind(event)
        event.data  # noqa: B018 -- decoding is the point

    return prepare


def _apply_once(
    projection: Projection[W],
    target: ProjectionTarget[W],
    items: Sequence[SourceItem],
    checkpoints: Mapping[str, str],
    dead_letters: DeadLetterSink,
    take_fresh: bool = False,
    isolated: bool = True,
) -> BatchOutcome:
    """One attempt at the batch. Unless ``isolated``, events' writes are not kept apart (no
    ``start_event``): a handler that raises, other than a failed read, abandons the attempt with
    :class:`_HandlerRaised`.

    Why not always isolated: remembering what each event changed, so that a failing event's writes
    can be taken back, costs the PostgreSQL target ~1 µs per event (its changes copied before each
    event touches them), for handlers that almost never fail. A batch with a poison event is rolled
    back and applied again, isolated; what it writes and dead-letters is the same either way.
    """
    outcome = BatchOutcome()
    decoder = projection.decoder
    initial = projection.initial_version
    # Why the local names: this loop runs once per event, and each of these would otherwise be an
    # attribute lookup (and a new bound method) per event.
    handler_for = _handler_lookup(projection)
    check = decoder.check
    prepare = _preparer(decoder)
    with target.batch() as batch:
        # Each stream's first version in the batch: with take_fresh, a stream that starts at its
        # initial version here is taken as never applied (the target's commit detects otherwise).
        first: dict[str, int] = {}
        for item in items:
            event = item.event
            if event is not None and event.stream_id not in first:
                first[event.stream_id] = event.stream_version
        fresh = [sid for sid, version in first.items() if version == initial] if take_fresh else []
        applied = batch.applied_versions(first.keys(), fresh) if first else {}
        versions = outcome.versions
        writes = batch.writes
        dead = outcome.dead_letters
        start_event = batch.start_event
        keep_event = batch.keep_event
        duplicates = applied_count = 0
        for item in items:
            event = item.event
            if event is None:
                error = item.error or MalformedEvent("bad_envelope", "unreadable record")
                dead.append(DeadLetter(error.reason, str(error), None, item.original))
                continue
            sid = event.stream_id
            last = versions.get(sid)
            if last is None:
                last = applied.get(sid)
            version = event.stream_version
            if last is not None and version <= last:
                duplicates += 1
                continue
            expected = initial if last is None else last + 1
            if version != expected:
                dead.append(
                    DeadLetter(
                        "version_gap",
                        f"stream {sid} expected version {expected}, got {version}",
                        event,
                        item.original,
                    )
                )
                continue
            # From here the event counts as applied: a malformed or poison event is dead-lettered
            # and the stream moves past it, so the events after it still apply.
            versions[sid] = version
            applied_count += 1
            if item.error is not None:
                dead.append(DeadLetter(item.error.reason, str(item.error), event, item.original))
                continue
            handler = handler_for(event.event_type)
            try:
                if handler is None:
                    check(event)
                    continue
                # Checked, bound and decoded up front, so a bad payload is named as such.
                prepare(event)
            except MalformedEvent as exc:
                dead.append(DeadLetter(exc.reason, str(exc), event, item.original))
                continue
            if isolated:
                start_event()
            try:
                handler(event, writes)
            except MalformedEvent as exc:
                if not isolated:
                    raise _HandlerRaised from None
                batch.drop_event()
                dead.append(DeadLetter(exc.reason, str(exc), event, item.original))
                continue
            except TargetReadFailed:
                # Not the event's fault: the whole batch fails, and the consumer retries it when
                # the cause is transient (a server restarting).
                raise
            except Exception as exc:
                if not isolated:
                    raise _HandlerRaised from None
                batch.drop_event()
                detail = "".join(traceback.format_exception_only(exc)).strip()
                dead.append(DeadLetter("poison", detail, event, item.original))
                log.warning(
                    "projection %s: %s v%d (%s) dead-lettered: %s",
                    projection.name,
                    sid,
                    version,
                    event.event_type,
                    detail,
                )
                continue
            keep_event()
        outcome.applied = applied_count
        outcome.duplicates = duplicates
        if dead:
            dead_letters(dead)
        batch.commit(versions, checkpoints)
    return outcome
