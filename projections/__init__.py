"""Projection definitions, their read-model targets in PostgreSQL and Redis, and queries."""

from projections.events import EventDecoder, MalformedEvent, ProjectedEvent, event_decoder
from projections.freshness import ReadModelTimeout, wait_until_applied
from projections.projection import Projection, handles
from projections.replay import ReplayStats, replay
from projections.runner import BatchOutcome, DeadLetter, SourceItem, apply_batch
from projections.target import BatchConflict, ProjectionTarget, TargetBatch

__all__ = [
    "BatchConflict",
    "BatchOutcome",
    "DeadLetter",
    "EventDecoder",
    "MalformedEvent",
    "ProjectedEvent",
    "Projection",
    "ProjectionTarget",
    "ReadModelTimeout",
    "ReplayStats",
    "SourceItem",
    "TargetBatch",
    "apply_batch",
    "event_decoder",
    "handles",
    "replay",
    "wait_until_applied",
]
