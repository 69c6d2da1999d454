"""Clients of the three servers, built from :class:`~datalayer.settings.Settings`.

Library packages take these clients (or plain parameters) as arguments and never read the
environment themselves, so that tests and services can point them anywhere.
"""

from __future__ import annotations

from typing import Any

import psycopg
import redis
from psycopg.conninfo import make_conninfo
from sqlalchemy import Engine, create_engine

from datalayer.settings import Settings


def postgres_connection(settings: Settings, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg connection with the configured TLS parameters."""
    conninfo = make_conninfo(settings.psycopg_url(), **settings.postgres_connect_kwargs())
    return psycopg.connect(conninfo, **kwargs)


def postgres_engine(settings: Settings, **kwargs: Any) -> Engine:
    """A SQLAlchemy engine on psycopg 3 with the configured TLS parameters."""
    return create_engine(settings.sqlalchemy_url(), connect_args=settings.postgres_connect_kwargs(), **kwargs)


def redis_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A Redis client with the configured TLS files."""
    return redis.Redis.from_url(settings.redis_url, **settings.redis_kwargs(), **kwargs)
