"""The `datalayer` console script: help, settings and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from psycopg import sql

from datalayer.clients import postgres_connection
from datalayer.settings import Settings
from eventstore import EventStore, NewEvent
from tests.helpers import unique_name

BIN = Path(sys.executable).with_name("datalayer")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands_with_an_example() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert "demo" in result.stdout and "settings" in result.stdout
    assert "example:" in result.stdout
    assert "example:" in run("demo", "--help").stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = run("no-such-command")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_settings_json_masks_passwords() -> None:
    env = dict(os.environ, DATALAYER_DATABASE_URL="postgresql://u:topsecret@h:5432/d")
    result = subprocess.run(
        [str(BIN), "settings", "--json"], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["DATALAYER_DATABASE_URL"] == "postgresql://u:***@h:5432/d"
    assert "topsecret" not in result.stdout


def test_unreachable_server_fails_with_one_line() -> None:
    env = dict(os.environ, DATALAYER_DATABASE_URL="postgresql://u:p@127.0.0.1:1/d")
    result = subprocess.run([str(BIN), "demo"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("datalayer demo: FAILED: postgresql at 127.0.0.1:1: OperationalError")
    assert "connection failed" in result.stderr


def test_db_migrate_is_idempotent_and_status_tells_the_version(settings: Settings) -> None:
    schema = unique_name("cli")
    try:
        behind = run("db", "status", "--schema", schema)
        assert behind.returncode == 1 and "version 0 of" in behind.stdout
        first = run("db", "migrate", "--schema", schema)
        assert first.returncode == 0, first.stderr
        assert f"applied migration 0001 event_log to schema {schema}" in first.stdout
        again = run("db", "migrate", "--schema", schema)
        assert again.returncode == 0 and "nothing to do" in again.stdout
        assert "applied" not in again.stdout
        assert run("db", "status", "--schema", schema).returncode == 0
    finally:
        with postgres_connection(settings, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_db_migrate_refuses_a_bad_schema_name() -> None:
    env = dict(os.environ, DATALAYER_EVENTSTORE_SCHEMA="Robert'); DROP TABLE students;--")
    result = subprocess.run([str(BIN), "db", "migrate"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "DATALAYER_EVENTSTORE_SCHEMA" in result.stderr
    bad_flag = run("db", "migrate", "--schema", "Bad-Name")
    assert bad_flag.returncode == 2 and "lower-case letters" in bad_flag.stderr


def test_relay_lag_reports_unpublished_events(store: EventStore) -> None:
    store.append(uuid.uuid4(), "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}") for _ in range(3)], 0)
    env = dict(os.environ, DATALAYER_EVENTSTORE_SCHEMA=store.schema)
    result = subprocess.run([str(BIN), "relay", "--lag"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    lag = json.loads(result.stdout)
    assert lag["lag_events"] == 3 and lag["checkpoint"] == "0/0" and lag["published"] == 0
    assert lag["lag_seconds"] >= 0 and lag["horizon"]["stalled"] is False
    assert "example:" in run("relay", "--help").stdout


def test_consume_names_an_unknown_projection_as_a_usage_error() -> None:
    result = run("consume", "no_such_projection")
    assert result.returncode == 2
    assert "unknown projection 'no_such_projection'" in result.stderr
    assert "order_cache, order_views" in result.stderr
    result = run("consume", "json:dumps")
    assert result.returncode == 2 and "is not a Projection class" in result.stderr
    assert "example:" in run("consume", "--help").stdout


def test_consume_batches_as_the_runtime_does_unless_told() -> None:
    """`datalayer consume` runs the consumer runtime's batch size (what the benchmark measures), and
    refuses a size that is not a positive number of records."""
    from consumers.runtime import ConsumerConfig
    from datalayer.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["consume"]).batch_size is None  # ConsumerConfig decides
    assert ConsumerConfig().max_batch == 2000
    assert parser.parse_args(["consume", "--batch-size", "500"]).batch_size == 500
    result = run("consume", "--batch-size", "0")
    assert result.returncode == 2 and "--batch-size" in result.stderr


def test_consume_holds_fetches_as_the_runtime_does_unless_told() -> None:
    """Kafka may hold a consumer's fetch up to ``fetch_wait_ms`` for a fuller one (less CPU per
    record at low rates); ``--fetch-wait-ms 0`` answers at once; a negative wait is refused."""
    from consumers.runtime import FETCH_MIN_BYTES, ConsumerConfig
    from datalayer.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["consume"]).fetch_wait_ms is None  # ConsumerConfig decides
    assert parser.parse_args(["consume", "--fetch-wait-ms", "0"]).fetch_wait_ms == 0
    held = ConsumerConfig().kafka_consumer_settings()
    assert (held["fetch_max_wait_ms"], held["fetch_min_bytes"]) == (10, FETCH_MIN_BYTES)
    at_once = ConsumerConfig(fetch_wait_ms=0).kafka_consumer_settings()
    assert (at_once["fetch_max_wait_ms"], at_once["fetch_min_bytes"]) == (0, 1)
    result = run("consume", "--fetch-wait-ms", "-1")
    assert result.returncode == 2 and "--fetch-wait-ms" in result.stderr and "'-1'" in result.stderr
