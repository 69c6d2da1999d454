"""Fixtures for tests on the real servers that `make up` starts (or those DATALAYER_* points at)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import redis
from sqlalchemy import Engine

from datalayer.clients import postgres_connection, postgres_engine, redis_client
from datalayer.settings import Settings, load_settings
from eventstore.keys import MASTER_KEY_ENV, new_master_key
from eventstore.store import EventStore
from tests.helpers import unique_name

# Customers' personal fields are encrypted under a master key from the environment: a throwaway one
# for this test session (and the CLI processes tests start, which inherit it), unless one is given.
if not (os.environ.get(MASTER_KEY_ENV) or os.environ.get(f"{MASTER_KEY_ENV}_FILE")):
    os.environ[MASTER_KEY_ENV] = new_master_key()


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    # pre_ping: tests that restart PostgreSQL must not leave cut connections to the next test.
    engine = postgres_engine(settings, pool_size=5, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture
def pg(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with postgres_connection(settings) as conn:
        yield conn


@pytest.fixture
def redis_conn(settings: Settings) -> Iterator[redis.Redis]:
    client = redis_client(settings)
    yield client
    client.close()


@pytest.fixture
def kafka_config(settings: Settings) -> dict[str, Any]:
    return settings.kafka_config()


@contextmanager
def migrated_store(settings: Settings, prefix: str) -> Iterator[EventStore]:
    """A migrated event store in a schema of its own, dropped afterwards."""
    schema = unique_name(prefix)
    es = EventStore.connect(
        settings.psycopg_url(), schema=schema, max_size=24, connect_kwargs=settings.postgres_connect_kwargs()
    )
    es.migrate()
    try:
        yield es
    finally:
        es.close()
        with postgres_connection(settings, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP SCHEMA {} CASCADE").format(psycopg.sql.Identifier(schema)))


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    """A migrated event store in a schema of its own, dropped afterwards."""
    with migrated_store(settings, "es") as es:
        yield es


@pytest.fixture
def empty_store(settings: Settings) -> Iterator[EventStore]:
    """A second migrated store without events: where an export is restored or a log migrated."""
    with migrated_store(settings, "restore") as es:
        yield es


@pytest.fixture
def es_env(settings: Settings, store: EventStore) -> dict[str, str]:
    """Environment for an eventsourcing Application persisting into ``store``'s schema."""
    return settings.eventsourcing_env(store.schema)
