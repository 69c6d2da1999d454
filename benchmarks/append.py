"""Append and load throughput of the datalayer event store, against its baselines in one run.

What it measures, all against the same PostgreSQL server, each in a fresh schema it drops again:

(a) **store**: 16 writer threads, each saving one new ``eventsourcing`` aggregate (2 events: created
    and credited) per transaction through an ``Application`` on ``eventstore.persistence``;
(b) **stock**: the same workload on eventsourcing's own ``eventsourcing.postgres`` persistence (pool
    of 16, no database functions), which serialises writers with a table lock;
(c) **ceiling**: raw psycopg, 16 threads with a connection each, every transaction inserting the same
    2 rows (same columns, indexes and payload sizes as (a)) into a plain table without triggers;
(d) **batch**: 100,000 events (10,000 streams x 10 events, ~100-byte JSON payloads) through
    ``EventStore.import_events``;
(e) **load**: ``app.repository.get(id)`` of aggregates of 10 and 10,000 events, without and with a
    snapshot at the latest version (no aggregate cache, so every load reads the database).

Why: an event store that gives up the stock table lock must earn it in concurrent write throughput
(a/b), should not lose much to a framework-free insert of the same rows (a/ceiling), must load data
in bulk quickly, and with snapshots must load a long-lived aggregate about as fast as a short one.

The throughput runs (a), (b), (c) are interleaved round by round so that the noise of a shared
2-core machine affects them alike; each figure is the median of the rounds. Each round also
measures the CPU per transaction of the benchmark process and (when PostgreSQL runs on this
machine) of the server's processes: steadier than throughput, and it says which side a change
helped. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from psycopg import sql

from datalayer.settings import load_settings
from eventstore.records import NewEvent
from eventstore.store import EventStore

WRITERS = 16
ROUNDS = 3
WARMUP_S = 1.0
MEASURE_S = 5.0

BATCH_STREAMS = 10_000
BATCH_EVENTS_PER_STREAM = 10
BATCH_PAYLOAD_BYTES = 100

LOAD_SIZES = (10, 10_000)
LOAD_REPEATS = {"10": 25, "10000": 7, "10_snapshot": 25, "10000_snapshot": 25}

TARGET_RATIO_VS_STOCK = 5.0
TARGET_RATIO_VS_CEILING = 0.5
TARGET_BATCH_EVENTS_PER_S = 100_000.0
TARGET_SNAPSHOT_LOAD_FACTOR = 2.0

Step = Callable[[], int]
"""One transaction of a writer thread; returns the number of events it wrote."""


class Account(Aggregate):
    """The benchmark's aggregate: created, then credited (one event per credit)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0

    @event("Credited")
    def credit(self, amount: int) -> None:
        self.balance += amount


class Accounts(Application[UUID]):
    """The application every app-level measurement runs through; only its persistence differs."""


# -- setup ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schemas:
    """The fresh schemas of one run, all dropped at its end."""

    store: str
    stock: str
    ceiling: str

    @classmethod
    def fresh(cls) -> Schemas:
        base = f"bench_{uuid.uuid4().hex[:12]}"
        return cls(store=base, stock=f"{base}_stock", ceiling=f"{base}_ceiling")

    def all(self) -> tuple[str, ...]:
        return (self.store, self.stock, self.ceiling)


def drop_schemas(conninfo: str, schemas: Sequence[str]) -> None:
    """Drop every schema this run may have created (missing ones are fine)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def store_app(conninfo_env: dict[str, str], *, snapshotting: bool = False) -> Accounts:
    """An application on this store; ``conninfo_env`` is ``Settings.eventsourcing_env(schema)``."""
    env = {**conninfo_env, "AGGREGATE_CACHE_MAXSIZE": "", "DATALAYER_POOL_SIZE": str(WRITERS)}
    if snapshotting:
        env["IS_SNAPSHOTTING_ENABLED"] = "y"
    return checked_app(Accounts(env=env))


def stock_app(conninfo: str, schema: str) -> Accounts:
    """An application on eventsourcing's own PostgreSQL persistence, in its own schema."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(params["dbname"]),
        "POSTGRES_HOST": str(params.get("host", "127.0.0.1")),
        "POSTGRES_PORT": str(params.get("port", "5432")),
        "POSTGRES_USER": str(params["user"]),
        "POSTGRES_PASSWORD": str(params.get("password", "")),
        "POSTGRES_SCHEMA": schema,
        "POSTGRES_POOL_SIZE": str(WRITERS),
        "POSTGRES_MAX_OVERFLOW": "0",
        "POSTGRES_ENABLE_DB_FUNCTIONS": "n",
        "AGGREGATE_CACHE_MAXSIZE": "",
    }
    return checked_app(Accounts(env=env))


def checked_app(app: Accounts) -> Accounts:
    """``app``, after making sure that loading really reads the database (no aggregate cache)."""
    if app.repository.cache is not None:
        app.close()
        raise RuntimeError("the application has an aggregate cache; loads would not hit the database")
    return app


@dataclass(frozen=True)
class SampleEvent:
    """One stored event of the app workload, to give the ceiling the same row shape."""

    stream_type: str
    event_type: str
    payload: bytes


def sample_events(app: Accounts) -> list[SampleEvent]:
    """The 2 events one app transaction writes, as the app's mapper stores them."""
    account = Account(owner="bench")
    account.credit(1)
    stored = [app.mapper.to_stored_event(e) for e in account.collect_events()]
    return [SampleEvent(Account.__qualname__, s.topic, s.state) for s in stored]


def create_ceiling_table(conninfo: str, schema: str, like_schema: str) -> None:
    """A plain events table: the store's columns, defaults and indexes, but none of its triggers."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("CREATE TABLE {}.events (LIKE {}.events INCLUDING ALL)").format(
                sql.Identifier(schema), sql.Identifier(like_schema)
            )
        )


# -- concurrent throughput ----------------------------------------------------------------------------


def app_steps(app: Accounts) -> list[Step]:
    """Each writer saves one new aggregate of 2 events per transaction."""

    def step() -> int:
        account = Account(owner="bench")
        account.credit(1)
        app.save(account)
        return 2

    return [step] * WRITERS


def ceiling_steps(stack: ExitStack, conninfo: str, schema: str, samples: list[SampleEvent]) -> list[Step]:
    """Each writer has its own autocommit connection; one 2-row INSERT is one transaction."""
    insert = sql.SQL(
        "INSERT INTO {}.events"
        " (stream_id, stream_type, stream_version, event_id, event_type, payload, metadata)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb), (%s, %s, %s, %s, %s, %s, %s::jsonb)"
    ).format(sql.Identifier(schema))

    def writer(conn: psycopg.Connection[Any]) -> Step:
        def step() -> int:
            stream_id = uuid.uuid4()
            params: list[Any] = []
            for version, sample in enumerate(samples, start=1):
                params += [
                    stream_id,
                    sample.stream_type,
                    version,
                    uuid.uuid4(),
                    sample.event_type,
                    sample.payload,
                    "{}",
                ]
            conn.execute(insert, params)
            return len(samples)

        return step

    return [writer(stack.enter_context(psycopg.connect(conninfo, autocommit=True))) for _ in range(WRITERS)]


@dataclass(frozen=True)
class Round:
    """One measured run of a workload: its rate and the CPU each of its transactions cost."""

    events_per_s: float
    client_cpu_us_per_txn: float
    server_cpu_us_per_txn: float | None  # None when the server's processes are not on this machine


class ServerCpu:
    """CPU seconds used so far by all processes of the PostgreSQL server, when it runs on this machine.

    The store and the ceiling differ in server work (trigger, ON CONFLICT, RETURNING) as much as in
    client work, and throughput on a shared 2-core machine moves with the other load: CPU per
    transaction, client and server, says which side a change helped. The server's processes are the
    postmaster's children (backends, WAL writer, checkpointer...), read from ``/proc``; a server
    elsewhere (or unreadable ``/proc``) gives None.
    """

    def __init__(self, conninfo: str) -> None:
        with psycopg.connect(conninfo) as conn:
            self.postmaster = _parent_pid(conn.info.backend_pid)
        self.tick = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float | None:
        if self.postmaster is None:
            return None
        total = 0
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = _stat_fields(int(entry.name))
                # Fields after the command: [1] parent pid, [11] utime, [12] stime (clock ticks).
                if fields and (int(entry.name) == self.postmaster or int(fields[1]) == self.postmaster):
                    total += int(fields[11]) + int(fields[12])
        return total / self.tick


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parent_pid(pid: int) -> int | None:
    """The parent of backend ``pid`` if that is a local PostgreSQL process (a remote server's backend
    pid may name an unrelated process here)."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            if comm.read().strip() not in ("postgres", "postmaster"):
                return None
    except OSError:
        return None
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def measure_round(steps: list[Step], server: ServerCpu) -> Round:
    """Run one thread per step until stopped; the rate and CPU over ``MEASURE_S`` after ``WARMUP_S``."""
    counts = [0] * len(steps)
    transactions = [0] * len(steps)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(index: int) -> None:
        step = steps[index]
        try:
            while not stop.is_set():
                counts[index] += step()
                transactions[index] += 1
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(steps))]
    try:
        for thread in threads:
            thread.start()
        stop.wait(WARMUP_S)
        server_before = server.seconds()
        before, txns_before, cpu_before, started = (
            sum(counts),
            sum(transactions),
            time.process_time(),
            time.perf_counter(),
        )
        stop.wait(MEASURE_S)
        after, txns_after, cpu_after, ended = (
            sum(counts),
            sum(transactions),
            time.process_time(),
            time.perf_counter(),
        )
        server_after = server.seconds()
    finally:
        stop.set()
        for thread in threads:
            if thread.ident is not None:
                thread.join()
    if errors:
        raise errors[0]
    txns = max(txns_after - txns_before, 1)
    server_us = (
        None if server_before is None or server_after is None else (server_after - server_before) / txns * 1e6
    )
    return Round((after - before) / (ended - started), (cpu_after - cpu_before) / txns * 1e6, server_us)


def interleaved_medians(workloads: dict[str, list[Step]], server: ServerCpu) -> dict[str, Round]:
    """Run every workload once per round, rotating the order; the medians of each figure per workload."""
    names = list(workloads)
    results: dict[str, list[Round]] = {name: [] for name in names}
    for round_no in range(ROUNDS):
        for name in names[round_no % len(names) :] + names[: round_no % len(names)]:
            measured = measure_round(workloads[name], server)
            results[name].append(measured)
            server_text = (
                ""
                if measured.server_cpu_us_per_txn is None
                else f", server {measured.server_cpu_us_per_txn:.0f}"
            )
            print(
                f"  round {round_no + 1}: {name:<8} {measured.events_per_s:>10,.0f} events/s"
                f" (CPU per transaction, µs: client {measured.client_cpu_us_per_txn:.0f}{server_text})",
                flush=True,
            )
    return {name: _median_round(rounds) for name, rounds in results.items()}


def _median_round(rounds: list[Round]) -> Round:
    server = [r.server_cpu_us_per_txn for r in rounds if r.server_cpu_us_per_txn is not None]
    return Round(
        statistics.median(r.events_per_s for r in rounds),
        statistics.median(r.client_cpu_us_per_txn for r in rounds),
        statistics.median(server) if len(server) == len(rounds) else None,
    )


# -- batch import -------------------------------------------------------------------------------------


def batch_rows(stream_type: str) -> list[tuple[UUID, str, int, NewEvent]]:
    """10,000 new streams of 10 events each, with ~100-byte JSON payloads."""
    rows = []
    for _ in range(BATCH_STREAMS):
        stream_id = uuid.uuid4()
        for version in range(1, BATCH_EVENTS_PER_STREAM + 1):
            body = {"stream": str(stream_id), "version": version, "note": ""}
            pad = BATCH_PAYLOAD_BYTES - len(json.dumps(body, separators=(",", ":")))
            body["note"] = "x" * max(pad, 0)
            payload = json.dumps(body, separators=(",", ":")).encode()
            rows.append((stream_id, stream_type, version, NewEvent(uuid.uuid4(), "Imported", payload)))
    return rows


def batch_events_per_second(conninfo: str, schema: str) -> float:
    """Median events/s of ``import_events`` over ``ROUNDS`` imports (rows built beforehand)."""
    rates = []
    with EventStore.connect(conninfo, schema=schema, max_size=1) as store:
        for round_no in range(ROUNDS):
            rows = batch_rows("Imported")
            started = time.perf_counter()
            count = store.import_events(rows)
            rate = count / (time.perf_counter() - started)
            rates.append(rate)
            print(f"  round {round_no + 1}: batch    {rate:>10,.0f} events/s", flush=True)
    return statistics.median(rates)


# -- loading ------------------------------------------------------------------------------------------


def account_with_events(app: Accounts, total: int) -> UUID:
    """Save an account of ``total`` events (created + credits) and return its id."""
    account = Account(owner="bench")
    for _ in range(total - 1):
        account.credit(1)
    app.save(account)
    return account.id


def load_ms(app: Accounts, aggregate_id: UUID, expected_version: int) -> float:
    """Wall time of one ``repository.get`` in ms, checking that it rebuilt the whole aggregate."""
    started = time.perf_counter()
    account: Account = app.repository.get(aggregate_id)
    elapsed = (time.perf_counter() - started) * 1000
    if account.version != expected_version:
        raise RuntimeError(f"loaded version {account.version}, expected {expected_version}")
    return elapsed


def load_times(app: Accounts) -> dict[str, float]:
    """Median load times in ms keyed "10", "10000", "10_snapshot", "10000_snapshot".

    One aggregate per case, snapshotted at its latest version in the ``_snapshot`` cases. The
    cases are loaded round-robin (after one untimed load each) so that noise hits them alike.
    """
    cases: dict[str, tuple[UUID, int]] = {}
    for size in LOAD_SIZES:
        cases[str(size)] = (account_with_events(app, size), size)
        snapshotted = account_with_events(app, size)
        app.take_snapshot(snapshotted)
        cases[f"{size}_snapshot"] = (snapshotted, size)
    timings: dict[str, list[float]] = {key: [] for key in cases}
    for repeat in range(max(LOAD_REPEATS.values()) + 1):
        for key, (aggregate_id, size) in cases.items():
            if repeat <= LOAD_REPEATS[key]:
                elapsed = load_ms(app, aggregate_id, size)
                if repeat:
                    timings[key].append(elapsed)
    return {key: statistics.median(timings[key]) for key in LOAD_REPEATS}


# -- report -------------------------------------------------------------------------------------------


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def _cpu_text(figures: dict[str, Any], name: str) -> str:
    """Client (and, when measured, server) CPU per transaction of one workload, in µs."""
    client = figures["client_cpu_us_per_txn"][name]
    server = figures["server_cpu_us_per_txn"][name]
    return f"{client:.0f} µs client" + ("" if server is None else f" + {server:.0f} server")


def report(figures: dict[str, Any]) -> None:
    """The readable table, the targets, then the JSON line (always last)."""
    load = figures["load_ms"]
    rows = [
        ("(a) store, 16 writers", f"{figures['store_events_per_s']:,.0f} events/s"),
        ("(b) stock eventsourcing.postgres", f"{figures['stock_events_per_s']:,.0f} events/s"),
        ("(c) ceiling, raw psycopg", f"{figures['ceiling_events_per_s']:,.0f} events/s"),
        ("    a / b", f"{figures['ratio_vs_stock']:.2f}"),
        ("    a / ceiling", f"{figures['ratio_vs_ceiling']:.2f}"),
        *(
            (f"    CPU per transaction, {name}", _cpu_text(figures, name))
            for name in figures["client_cpu_us_per_txn"]
        ),
        ("(d) batch import_events", f"{figures['batch_events_per_s']:,.0f} events/s"),
        *((f"(e) load {key.replace('_', ' with ')}", f"{load[key]:.2f} ms") for key in load),
    ]
    width = max(len(label) for label, _ in rows)
    print()
    print(f"{'measurement (median of ' + str(ROUNDS) + ' runs)':<{width}}  value")
    print("-" * (width + 24))
    for label, value in rows:
        print(f"{label:<{width}}  {value:>20}")
    print()
    snapshot_factor = load["10000_snapshot"] / load["10"]
    targets = [
        (f"a/b >= {TARGET_RATIO_VS_STOCK:g}", figures["ratio_vs_stock"] >= TARGET_RATIO_VS_STOCK),
        (f"a/ceiling >= {TARGET_RATIO_VS_CEILING:g}", figures["ratio_vs_ceiling"] >= TARGET_RATIO_VS_CEILING),
        (
            f"batch >= {TARGET_BATCH_EVENTS_PER_S:,.0f} events/s",
            figures["batch_events_per_s"] >= TARGET_BATCH_EVENTS_PER_S,
        ),
        (
            f"load 10,000 with snapshot <= {TARGET_SNAPSHOT_LOAD_FACTOR:g} x load 10"
            f" (is {snapshot_factor:.2f} x)",
            snapshot_factor <= TARGET_SNAPSHOT_LOAD_FACTOR,
        ),
    ]
    for label, met in targets:
        print(f"target {label}: {verdict(met)}")
    print(json.dumps(figures))


# -- main ---------------------------------------------------------------------------------------------


def closing(stack: ExitStack, app: Accounts) -> Accounts:
    """``app``, closed (its pool too) when ``stack`` unwinds."""
    stack.callback(app.close)
    return app


def run(conninfo: str, env_for: Callable[[str], dict[str, str]], schemas: Schemas) -> dict[str, Any]:
    with ExitStack() as stack:
        store = closing(stack, store_app(env_for(schemas.store)))
        stock = closing(stack, stock_app(conninfo, schemas.stock))
        create_ceiling_table(conninfo, schemas.ceiling, like_schema=schemas.store)
        samples = sample_events(store)
        print(
            f"{WRITERS} writers, {ROUNDS} rounds of {WARMUP_S:g} s warm-up + {MEASURE_S:g} s; payloads "
            f"{[len(s.payload) for s in samples]} bytes",
            flush=True,
        )
        measured = interleaved_medians(
            {
                "store": app_steps(store),
                "stock": app_steps(stock),
                "ceiling": ceiling_steps(stack, conninfo, schemas.ceiling, samples),
            },
            ServerCpu(conninfo),
        )
        rates = {name: m.events_per_s for name, m in measured.items()}
    batch = batch_events_per_second(conninfo, schemas.store)
    with ExitStack() as stack:
        loader = closing(stack, store_app(env_for(schemas.store), snapshotting=True))
        loads = load_times(loader)
    return {
        "store_events_per_s": round(rates["store"], 1),
        "stock_events_per_s": round(rates["stock"], 1),
        "ratio_vs_stock": round(rates["store"] / rates["stock"], 3),
        "ceiling_events_per_s": round(rates["ceiling"], 1),
        "ratio_vs_ceiling": round(rates["store"] / rates["ceiling"], 3),
        "batch_events_per_s": round(batch, 1),
        "load_ms": {key: round(value, 3) for key, value in loads.items()},
        # One transaction is one save (a, b) or one 2-row INSERT (c); the client is this process.
        "client_cpu_us_per_txn": {name: round(m.client_cpu_us_per_txn, 1) for name, m in measured.items()},
        "server_cpu_us_per_txn": {
            name: None if m.server_cpu_us_per_txn is None else round(m.server_cpu_us_per_txn, 1)
            for name, m in measured.items()
        },
    }


def main() -> None:
    settings = load_settings()
    conninfo = settings.psycopg_url()
    schemas = Schemas.fresh()
    try:
        figures = run(conninfo, settings.eventsourcing_env, schemas)
    finally:
        drop_schemas(conninfo, schemas.all())
    report(figures)


if __name__ == "__main__":
    main()
