"""Aggregates as they were: at a version, or at a moment in time."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application

from eventstore.persistence import Factory


def get_as_of(app: Application[UUID], aggregate_id: UUID, moment: datetime) -> Any:
    """The aggregate with every event recorded up to ``moment`` applied (snapshots still help).

    Raises ``AggregateNotFoundError`` when the aggregate did not exist yet at ``moment``.
    """
    factory = app.factory
    if not isinstance(factory, Factory):
        raise TypeError("time travel by timestamp needs an application on the datalayer store")
    version = factory.store.version_at(aggregate_id, moment)
    if version == 0:
        raise AggregateNotFoundError(f"aggregate {aggregate_id} did not exist at {moment.isoformat()}")
    return app.repository.get(aggregate_id, version=version)
