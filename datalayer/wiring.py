"""From names and settings to running parts: which projections exist, and their targets and consumers.

The packages take clients as arguments; this module is where the CLI builds those clients from
:class:`~datalayer.settings.Settings`.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from consumers.runtime import ConsumerConfig
from datalayer.settings import Settings
from eventstore.store import EventStore
from projections.generations import GenerationRegistry
from projections.projection import Projection
from projections.target import ProjectionTarget

# The projections shipped with datalayer; any other is named as ``package.module:Class``.
KNOWN_PROJECTIONS: dict[str, str] = {
    "order_views": "projections.orders:OrderViews",
    "order_cache": "projections.orders:OrderCache",
    "customer_directory": "projections.customers:CustomerDirectory",
    "customer_cache": "projections.customers:CustomerCache",
}


class UnknownProjection(ValueError):
    """A projection named on the command line that cannot be loaded: a usage error (exit 2)."""


def event_store(settings: Settings, schema: str | None = None, url: str | None = None) -> EventStore:
    """A small connection pool on the configured (or given) store, for one CLI command."""
    conninfo = (url or settings.psycopg_url()).replace("postgresql+psycopg://", "postgresql://", 1)
    return EventStore.connect(
        conninfo,
        schema=schema or settings.eventstore_schema,
        max_size=2,
        connect_kwargs=settings.postgres_connect_kwargs(),
    )


def load_projection(name: str) -> Projection[Any]:
    """The projection called ``name`` (see ``KNOWN_PROJECTIONS``) or at ``module:Class``."""
    path = KNOWN_PROJECTIONS.get(name, name)
    module_name, _, class_name = path.partition(":")
    if not class_name:
        known = ", ".join(sorted(KNOWN_PROJECTIONS))
        raise UnknownProjection(f"unknown projection {name!r}: use one of {known}, or package.module:Class")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the operator's own module, found as `python -m` would
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise UnknownProjection(f"cannot load projection {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Projection)):
        raise UnknownProjection(f"{path} is not a Projection class")
    projection: Projection[Any] = cls()
    return projection


def consumer_config(settings: Settings, **overrides: Any) -> ConsumerConfig:
    """The consumer runtime's configuration from the topic settings; ``overrides`` win."""
    fields: dict[str, Any] = {
        "topic_prefix": settings.topic_prefix,
        "dead_letter_prefix": settings.dead_letter_topic_prefix,
        "partitions": settings.topic_partitions,
        "replication_factor": settings.topic_replication_factor,
    }
    fields.update(overrides)
    return ConsumerConfig(**fields)


@dataclass(frozen=True)
class ReadModelStore:
    """Where a projection's generations live: their registry, and how to open or drop one."""

    registry: GenerationRegistry
    make_target: Callable[[str], ProjectionTarget[Any]]
    drop_target: Callable[[str], None]
    close: Callable[[], None]


def read_model_store(projection: Projection[Any], settings: Settings) -> ReadModelStore:
    """PostgreSQL generations for a ``SqlProjection``, Redis ones for a ``RedisProjection``."""
    from datalayer.clients import postgres_engine, redis_client
    from projections.generations import PostgresGenerations, RedisGenerations
    from projections.targets import PostgresTarget, RedisProjection, RedisTarget, SqlProjection

    if isinstance(projection, SqlProjection):
        engine = postgres_engine(settings, pool_pre_ping=True)

        def pg_target(name: str) -> ProjectionTarget[Any]:
            return PostgresTarget(engine, projection, schema=name)

        return ReadModelStore(
            PostgresGenerations(engine),
            pg_target,
            lambda name: PostgresTarget(engine, projection, schema=name).drop(),
            engine.dispose,
        )
    if isinstance(projection, RedisProjection):
        client = redis_client(settings)

        def redis_target(name: str) -> ProjectionTarget[Any]:
            return RedisTarget(client, projection, prefix=RedisGenerations.prefix(name))

        return ReadModelStore(
            RedisGenerations(client),
            redis_target,
            lambda name: RedisTarget(client, projection, prefix=RedisGenerations.prefix(name)).drop(),
            client.close,
        )
    raise ValueError(f"projection {projection.name} has no known target type")
