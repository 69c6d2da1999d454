"""``datalayer demo``, the main job, as ``make demo`` runs it: a short workload in its own namespace.

The demo checks the read models itself and exits 1 on a mismatch; here what it printed is checked
once more against the store and the read models it leaves behind with ``--keep``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import redis
from kafka import KafkaAdminClient, KafkaProducer
from psycopg import sql
from sqlalchemy import Engine, func, select

from datalayer.clients import postgres_connection
from datalayer.demo import remove_namespace
from datalayer.settings import Settings
from eventstore.relay.topics import create_missing_topics
from projections.generations import REDIS_ALIASES
from projections.orders.tables import order_summaries

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("datalayer")


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), "demo", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env or dict(os.environ),
    )


def figure(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found is not None, f"{pattern!r} not in the demo's output:\n{text}"
    return int(found.group(1).replace(",", ""))


def test_the_demo_runs_the_main_job_and_what_it_prints_matches_the_read_models(
    settings: Settings, engine: Engine, redis_conn: redis.Redis
) -> None:
    ns = f"demo_{uuid.uuid4().hex[:10]}"
    try:
        result = demo("--orders", "24", "--writers", "3", "--namespace", ns, "--keep", "--timeout", "60")
        out = result.stdout
        assert result.returncode == 0, f"{out}\n{result.stderr}"
        assert out.rstrip().splitlines()[-1].startswith("demo: ok in")
        assert out.count("refused ") == 5
        assert "conflicting appends retried" in out
        orders = figure(r"(\d+) of \d+ orders match", out)
        assert orders == 24 + 1  # the workload's orders and the one the refused commands aimed at
        assert out.count("equal a fresh replay of the store") == 2
        assert "the live consumer moved over" in out
        assert re.search(rf"{ns}_views\s+postgresql\s+{ns}_views_v1_r1\s+active\s+0\s+0\.0\s+1\s+0", out), out
        assert re.search(rf"{ns}_cache\s+redis\s+{ns}_cache_v1\s+active\s+0\s+0\.0\s+1\s+0", out), out
        assert "100%" in result.stderr  # the rebuild's progress bar reached the end

        # What it printed, against what it left behind (--keep).
        events = figure(rf"schema {ns}: ([\d,]+) events", out)
        published = figure(r"lag 0 events / 0\.0 s, ([\d,]+) published", out)
        with postgres_connection(settings, autocommit=True) as conn:
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(ns, "events"))
            ).fetchone()
        assert row is not None and row[0] == events == published
        with engine.connect().execution_options(schema_translate_map={None: f"{ns}_views"}) as conn:
            rows = conn.execute(select(func.count()).select_from(order_summaries)).scalar_one()
        assert rows == orders + 1  # and the order placed after the blue/green switch
        alias = redis_conn.hget(REDIS_ALIASES, f"{ns}_cache")
        assert alias == f"dl:{{{ns}_cache_v1}}:".encode()
        statuses = redis_conn.hlen(f"dl:{{{ns}_cache_v1}}:order_status")
        assert statuses == orders + 1
    finally:
        remove_namespace(settings, ns)
    with postgres_connection(settings, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE %s", (f"{ns}%",)).fetchone()
    assert left is not None and left[0] == 0
    assert redis_conn.hget(REDIS_ALIASES, f"{ns}_cache") is None


def test_the_demo_fails_loudly_on_what_does_not_match(settings: Settings) -> None:
    ns = f"demo_{uuid.uuid4().hex[:10]}"
    topic = f"{ns}.events.Order"
    admin = KafkaAdminClient(**settings.kafka_config())
    try:
        create_missing_topics(admin, [topic], settings.topic_partitions, 1)
        admin.wait_for_topics([topic])
        # A record no projection can read: both consumers dead-letter it, which the demo must not accept.
        producer = KafkaProducer(**settings.kafka_config())
        producer.send(topic, key=b"not-a-stream", value=b"not an envelope").get(timeout=30)
        producer.close()
        result = demo("--orders", "5", "--namespace", ns, "--timeout", "60")
    finally:
        admin.close()
        remove_namespace(settings, ns)
    assert result.returncode == 1, result.stdout
    assert "demo: ok" not in result.stdout
    failure = result.stderr.strip().splitlines()[-1]
    assert failure == f"datalayer demo: FAILED: dead letters: {{'{ns}_views': 1, '{ns}_cache': 1}}", (
        result.stderr
    )


def test_the_demo_names_a_server_that_does_not_answer_in_one_line() -> None:
    env = dict(os.environ, DATALAYER_REDIS_URL="redis://127.0.0.1:1/0")
    result = demo("--orders", "5", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("datalayer demo: FAILED: redis at 127.0.0.1:1: ConnectionError")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
