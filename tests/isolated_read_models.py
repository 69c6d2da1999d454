"""Removing a test's uniquely named read models: every generation, the registry rows, the aliases."""

from __future__ import annotations

import redis
from sqlalchemy import Engine, text

from projections.generations import REDIS_ALIASES


def drop_postgres_read_models(engine: Engine, projection: str) -> None:
    """Drop every generation schema of ``projection``, its alias schema and its registry rows."""
    with engine.begin() as conn:
        if conn.exec_driver_sql("SELECT to_regclass('datalayer_read_models.generations')").scalar() is None:
            return
        rows = conn.execute(
            text("SELECT generation FROM datalayer_read_models.generations WHERE projection = :p"),
            {"p": projection},
        ).all()
        for (generation,) in rows:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{generation}" CASCADE')
        conn.execute(
            text("DELETE FROM datalayer_read_models.generations WHERE projection = :p"), {"p": projection}
        )
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{projection}" CASCADE')


def drop_redis_read_models(client: redis.Redis, projection: str) -> None:
    """Delete every key of ``projection``'s generations, its registry hash and its alias."""
    for key in client.scan_iter(match=f"dl:{{{projection}_v*", count=1000):
        client.delete(key)
    client.delete(f"dl:generations:{projection}")
    client.hdel(REDIS_ALIASES, projection)
