"""``datalayer rebuild``, ``verify`` and ``generations`` through the console script, on isolated names."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, text, update

from datalayer.settings import Settings
from eventstore import EventStore
from projections.generations import REDIS_ALIASES, RedisGenerations
from projections.orders.tables import order_summaries
from tests.helpers import unique_name, wait_until
from tests.pipeline import Pipeline, pipeline

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("datalayer")


@pytest.fixture
def pl(settings: Settings, store: EventStore, engine: Engine, redis_conn: redis.Redis) -> Iterator[Pipeline]:
    with pipeline(settings, store, engine, redis_conn) as p:
        yield p


def cli(pl: Pipeline, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        DATALAYER_EVENTSTORE_SCHEMA=pl.store.schema,
        DATALAYER_TOPIC_PREFIX=pl.topic_prefix,
        DATALAYER_DEAD_LETTER_TOPIC_PREFIX=pl.dlq_prefix,
        TEST_PROJECTION_NAME=name,
    )
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_rebuild_verify_and_generations_from_the_command_line(pl: Pipeline, engine: Engine) -> None:
    name = unique_name("cliov")
    projection = "tests.cli_projections:IsolatedViews"
    try:
        pl.start_relay()
        customer, products = pl.seed_catalog(2)
        pl.order_flow(customer, products, 12)

        built = cli(pl, name, "rebuild", projection, "--handover-timeout", "0.5")
        assert built.returncode == 0, built.stderr
        assert f"generation {name}_v1 is active" in built.stdout
        assert "100%" in built.stderr  # the progress line reached the end

        ok = cli(pl, name, "verify", projection)
        assert ok.returncode == 0, ok.stderr
        assert "equal a fresh replay" in ok.stdout

        with engine.begin() as conn:
            conn.execution_options(schema_translate_map={None: f"{name}_v1"})
            conn.execute(update(order_summaries).values(units=order_summaries.c.units + 1))
        drifted = cli(pl, name, "verify", projection, "--examples", "2")
        assert drifted.returncode == 1
        assert "0 missing, 0 extra, 12 different" in drifted.stdout
        assert drifted.stdout.count("different order_summaries") == 2

        again = cli(pl, name, "rebuild", projection, "--handover-timeout", "0.5", "--drop-old")
        assert again.returncode == 0, again.stderr
        assert f"{name}_v1_r1 is active" in again.stdout and f"dropped {name}_v1" in again.stdout
        listed = cli(pl, name, "generations", projection)
        assert listed.returncode == 0
        assert f"{name}_v1_r1" in listed.stdout and "active" in listed.stdout
        assert f"{name}_v1 " not in listed.stdout
        assert cli(pl, name, "verify", projection).returncode == 0

        refused = cli(pl, name, "generations", projection, "--drop", f"{name}_v1_r1")
        assert refused.returncode == 1 and "not an inactive generation" in refused.stderr
    finally:
        with engine.begin() as conn:
            rows = conn.execute(
                text("SELECT generation FROM datalayer_read_models.generations WHERE projection = :p"),
                {"p": name},
            ).all()
            for (generation,) in rows:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{generation}" CASCADE')
            conn.execute(
                text("DELETE FROM datalayer_read_models.generations WHERE projection = :p"), {"p": name}
            )
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def test_rebuild_of_a_redis_projection_switches_the_alias(pl: Pipeline, redis_conn: redis.Redis) -> None:
    name = unique_name("clioc")
    try:
        pl.start_relay()
        customer, products = pl.seed_catalog(2)
        pl.order_flow(customer, products, 5)
        built = cli(
            pl,
            name,
            "rebuild",
            "tests.cli_projections:IsolatedCache",
            "--handover-timeout",
            "0.5",
            "--workers",
            "2",
        )
        assert built.returncode == 0, built.stderr
        assert redis_conn.hget(REDIS_ALIASES, name) == RedisGenerations.prefix(f"{name}_v1").encode()
        assert cli(pl, name, "verify", "tests.cli_projections:IsolatedCache").returncode == 0
    finally:
        for key in redis_conn.scan_iter(match=f"dl:{{{name}*", count=1000):
            redis_conn.delete(key)
        redis_conn.delete(f"dl:generations:{name}")
        redis_conn.hdel(REDIS_ALIASES, name)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # an orphan's zombie waits for whoever reaps it: it runs no more


@pytest.mark.slow
def test_replay_workers_stop_when_the_rebuild_is_killed(pl: Pipeline, redis_conn: redis.Redis) -> None:
    name = unique_name("clikill")
    try:
        customer, products = pl.seed_catalog(2)
        pl.order_flow(customer, products, 100)
        env = dict(
            os.environ,
            DATALAYER_EVENTSTORE_SCHEMA=pl.store.schema,
            DATALAYER_TOPIC_PREFIX=pl.topic_prefix,
            DATALAYER_DEAD_LETTER_TOPIC_PREFIX=pl.dlq_prefix,
            TEST_PROJECTION_NAME=name,
        )
        # Three partitions: the rebuild replays one of them itself and forks a worker for each other.
        args = ["rebuild", "tests.cli_projections:IsolatedCache", "--workers", "3", "--batch-size", "5"]
        # Throttled, so that the workers are still replaying when their parent is killed.
        process = subprocess.Popen(
            [str(BIN), *args, "--max-rate", "20"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            workers = wait_until(lambda: w if len(w := _children(process.pid)) >= 2 else None, what="workers")
        finally:
            process.kill()
            process.wait(timeout=30)
        wait_until(
            lambda: all(_gone(pid) for pid in workers), timeout=10, what="the orphaned workers to stop"
        )
    finally:
        for key in redis_conn.scan_iter(match=f"dl:{{{name}*", count=1000):
            redis_conn.delete(key)
        redis_conn.delete(f"dl:generations:{name}")
        redis_conn.hdel(REDIS_ALIASES, name)
