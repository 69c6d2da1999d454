"""A round trip through all three servers: what ``make demo`` runs until the end-to-end demo exists.

A row is written to PostgreSQL, published to Kafka keyed by its id, consumed back in a consumer
group and stored in Redis; each step is checked against the previous one, so a stack that only
half works fails here with the step that broke.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text

from datalayer.clients import postgres_engine, redis_client
from datalayer.settings import Settings


@dataclass
class SmokeReport:
    """What the round trip did, step by step, with the servers' versions."""

    steps: list[tuple[str, float]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.steps.append((description, (time.perf_counter() - started) * 1000))


def run_smoke(settings: Settings, say: Callable[[str], None] = print, messages: int = 10) -> SmokeReport:
    """Run the round trip and report each step through ``say``; raises on the first failure."""
    report = SmokeReport()
    run_id = uuid.uuid4().hex[:8]
    topic = f"datalayer.smoke.{run_id}"
    rows = [{"id": i, "body": f"hello {i} from run {run_id}"} for i in range(messages)]

    engine = postgres_engine(settings)
    metadata = MetaData()
    table = Table(
        f"smoke_{run_id}", metadata, Column("id", Integer, primary_key=True), Column("body", String)
    )
    with report.step(f"PostgreSQL: wrote and read back {messages} rows in table {table.name}"):
        with engine.begin() as conn:
            report.versions["postgresql"] = str(conn.execute(text("SHOW server_version")).scalar_one())
            metadata.create_all(conn)
            conn.execute(table.insert(), rows)
        with engine.connect() as conn:
            stored = [dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.id))]
        if stored != rows:
            raise RuntimeError("PostgreSQL returned other rows than were written")

    kafka = settings.kafka_config()
    admin = KafkaAdminClient(**kafka)
    try:
        with report.step(f"Kafka: created topic {topic} (3 partitions), produced {messages} keyed records"):
            admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
            producer = KafkaProducer(acks="all", enable_idempotence=True, **kafka)
            for row in stored:
                producer.send(topic, key=str(row["id"]).encode(), value=json.dumps(row).encode())
            producer.flush(timeout=30)
            producer.close()
            broker = admin.describe_cluster()["brokers"][0]["broker_id"]
            report.versions["kafka"] = admin.get_broker_version_data(broker).broker_version_str
        with report.step(f"Kafka: consumed {messages} records in group smoke-{run_id}, committed"):
            consumer = KafkaConsumer(
                topic,
                group_id=f"smoke-{run_id}",
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                consumer_timeout_ms=20000,
                **kafka,
            )
            received = []
            for record in consumer:
                received.append(json.loads(record.value))
                if len(received) == messages:
                    break
            consumer.commit()
            consumer.close()
        if sorted(received, key=lambda r: r["id"]) != stored:
            raise RuntimeError(f"Kafka returned {len(received)} of {messages} records")

        client = redis_client(settings, decode_responses=True)
        key = f"datalayer:smoke:{run_id}"
        with report.step(f"Redis: stored the {messages} consumed records in hash {key}, read back"):
            report.versions["redis"] = str(client.info("server")["redis_version"])
            client.hset(key, mapping={str(r["id"]): r["body"] for r in received})
            back = {int(k): str(v) for k, v in client.hgetall(key).items()}
            client.delete(key)
        if back != {r["id"]: r["body"] for r in stored}:
            raise RuntimeError("Redis returned other values than were written")
    finally:
        admin.delete_topics([topic])
        admin.close()
        with engine.begin() as conn:
            table.drop(conn, checkfirst=True)
        engine.dispose()

    for description, ms in report.steps:
        say(f"  ok  {description}  ({ms:.0f} ms)")
    say("  servers: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()))
    return report
