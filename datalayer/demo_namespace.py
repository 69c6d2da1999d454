"""``datalayer demo --namespace NAME``: the demo on names of its own, and removing them afterwards.

The store's schema, the topic prefixes and both read models are named after NAME, so a run (in CI,
beside other tests) shares nothing with the configured pipeline and can be dropped whole.
"""

from __future__ import annotations

from typing import Any

from consumers.live import group_for
from datalayer.clients import postgres_engine, redis_client
from datalayer.settings import Settings
from projections.orders import OrderCache, OrderViews
from projections.projection import Projection


def namespaced(settings: Settings, namespace: str) -> tuple[Settings, Projection[Any], Projection[Any]]:
    """The settings and the order read models (views, cache) of a run named ``namespace``."""
    isolated = settings.model_copy(
        update={
            "eventstore_schema": namespace,
            "topic_prefix": f"{namespace}.events.",
            "dead_letter_topic_prefix": f"{namespace}.dlq.",
        }
    )
    views: Projection[Any] = type("DemoViews", (OrderViews,), {"name": f"{namespace}_views"})()
    cache: Projection[Any] = type("DemoCache", (OrderCache,), {"name": f"{namespace}_cache"})()
    return isolated, views, cache


def remove_namespace(settings: Settings, namespace: str) -> None:
    """Drop what a run named ``namespace`` created, whether it finished or not.

    The store's schema, both read models' generations, registry entries and aliases, the topics and
    the consumer groups. ``settings`` only say where the servers are.
    """
    from kafka import KafkaAdminClient
    from sqlalchemy import text

    from projections.generations import REDIS_ALIASES

    views, cache = f"{namespace}_views", f"{namespace}_cache"
    engine = postgres_engine(settings)
    client = redis_client(settings)
    generations: list[str] = []
    try:
        with engine.begin() as conn:
            registry = conn.exec_driver_sql(
                "SELECT to_regclass('datalayer_read_models.generations')"
            ).scalar()
            if registry is not None:
                rows = conn.execute(
                    text("SELECT generation FROM datalayer_read_models.generations WHERE projection = :p"),
                    {"p": views},
                ).all()
                generations += [r[0] for r in rows]
                conn.execute(
                    text("DELETE FROM datalayer_read_models.generations WHERE projection = :p"), {"p": views}
                )
            for schema in [*generations, views, namespace]:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        cached = [_text(g) for g in client.hkeys(f"dl:generations:{cache}")]
        generations += cached
        for generation in cached:
            for key in client.scan_iter(match=f"dl:{{{generation}}}:*", count=1000):
                client.unlink(key)
        client.delete(f"dl:generations:{cache}")
        client.hdel(REDIS_ALIASES, cache)
    finally:
        engine.dispose()
        client.close()
    admin = KafkaAdminClient(**settings.kafka_config())
    try:
        topics = [t for t in admin.list_topics() if t.startswith(f"{namespace}.")]
        if topics:
            admin.delete_topics(topics)
        groups = {group_for(g) for g in generations}
        existing = {g["group_id"] for g in admin.list_groups()}
        if groups & existing:
            admin.delete_groups(sorted(groups & existing))
    finally:
        admin.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
