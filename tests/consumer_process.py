"""A projection consumer in a process of its own, for tests that kill -9 it or run several.

``python -m tests.consumer_process views|cache PIPELINE_NAME VIEWS_SCHEMA CACHE_PREFIX``; SIGTERM stops it.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from consumers.runtime import ConsumerConfig, ProjectionConsumer
from datalayer.clients import postgres_engine, redis_client
from datalayer.settings import load_settings
from projections.orders import OrderCache, OrderViews
from projections.targets import PostgresTarget, RedisTarget


def main(argv: list[str]) -> int:
    which, name, views_schema, cache_prefix = argv
    settings = load_settings()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {which}[%(process)d] %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    target: PostgresTarget | RedisTarget
    if which == "views":
        target = PostgresTarget(
            postgres_engine(settings, pool_pre_ping=True), OrderViews(), schema=views_schema
        )
    else:
        target = RedisTarget(redis_client(settings), OrderCache(), prefix=cache_prefix)
    config = ConsumerConfig(
        topic_prefix=f"{name}.events.",
        dead_letter_prefix=f"{name}.dlq.",
        max_batch=200,
        group_id=f"{name}.{which}",
    )
    consumer = ProjectionConsumer(target.projection, target, settings.kafka_config(), config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    consumer.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
