"""Rebuild speed: replaying the store into fresh read models, against the bare read of the log.

1,000,000 events of the orders domain (products, stock, orders placed, paid, shipped and
cancelled, encoded by the real ``eventsourcing`` mapper) are bulk-loaded into a store of its own.
Then, each in a process of its own so that peak memory is its own:

(a) **bare read** (the ceiling): ``EventStore.read_all`` over the whole log in commit order, in the
    same batch size, doing nothing with the rows (rows/s);
(b) **PostgreSQL**: ``datalayer rebuild``'s code (:class:`consumers.rebuild.Rebuild`) building a new
    generation of ``order_views`` (events/s of the projection's stream types, Order);
(c) **Redis**: the same for ``order_cache`` (Order and Product events).

A rebuild replays in ``--workers`` processes (``RebuildOptions.workers``, default 2 here; 1 is the
single-process replay): the rebuild's own and ``--workers`` - 1 forked workers, each replaying the
streams of one partition of the log. Its rate is the events of the projection's stream types over
the replay phase, all processes together.

Rounds alternate; figures are medians. Peak RSS is the highest of the rebuild runs: a run's is its
process's peak RSS plus, with workers, each worker's, as the kernel tracks them (an upper bound of
their sum at any moment: the peaks need not coincide, and forked workers share pages with their
parent, which the sum counts twice). Peak PSS (shared pages counted once) is sampled every second.
Activation (``GenerationRegistry.activate``: building the generation's deferred indexes, moving the
readers' alias) is timed on its own, outside the replay phase (``pg_activate_s``,
``redis_activate_s``). The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from decimal import Decimal
from pathlib import Path
from typing import Any

# This folder also holds projections.py (a benchmark), which would shadow the projections package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eventsourcing.persistence import Mapper  # noqa: E402

from datalayer.settings import Settings, load_settings  # noqa: E402
from domain import Order, OrderLine, OrdersApplication, Product  # noqa: E402
from eventstore import EventStore, NewEvent  # noqa: E402
from eventstore.store import ImportRow  # noqa: E402

TARGET_PG = 50_000
TARGET_REDIS = 100_000
TARGET_RSS_MB = 300
BATCH = 5000


def domain_events(total: int, products: int, seed: int = 7) -> Iterator[tuple[str, Any]]:
    """Realistic event sequences from real aggregates: ``(stream type, domain event)`` in log order."""
    rng = random.Random(seed)
    catalog = []
    emitted = 0
    for i in range(products):
        product = Product.create(sku=f"SKU-{i:05d}", name=f"Product {i}", price=Decimal("2.50") + i % 40)
        product.receive_stock(10_000_000)
        catalog.append(product)
        for e in product.collect_events():
            yield "Product", e
            emitted += 1
    customers = [uuid.uuid4() for _ in range(max(1, products // 2))]
    n = 0
    while emitted < total:
        chosen = rng.sample(catalog, 2)
        lines = [OrderLine(p.id, rng.randint(1, 3), p.price) for p in chosen]
        order = Order.place(rng.choice(customers), lines)
        for p, line in zip(chosen, lines, strict=True):
            p.reserve(order.id, line.quantity)
        if n % 5 == 4:
            order.cancel("changed mind")
            for p, line in zip(chosen, lines, strict=True):
                p.release(order.id, line.quantity)
        else:
            order.pay(order.total)
            if n % 3 == 0:
                order.ship()
        for e in order.collect_events():
            yield "Order", e
            emitted += 1
        for p in chosen:
            for e in p.collect_events():
                yield "Product", e
                emitted += 1
        n += 1


def fill(store: EventStore, total: int, products: int) -> int:
    mapper: Mapper[uuid.UUID] = OrdersApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}).mapper
    rows: list[ImportRow] = []
    written = 0
    for stream_type, event in domain_events(total, products):
        stored = mapper.to_stored_event(event)
        rows.append(
            (
                stored.originator_id,
                stream_type,
                stored.originator_version,
                NewEvent(uuid.uuid4(), stored.topic, stored.state),
            )
        )
        if len(rows) >= 20_000:
            written += store.import_events(rows)
            rows = []
    if rows:
        written += store.import_events(rows)
    return written


def child_read(schema: str) -> dict[str, float]:
    settings = load_settings()
    store = _store(settings, schema)
    started = time.perf_counter()
    rows = 0
    position = None
    while True:
        events = store.read_all(after=position, limit=BATCH) if position else store.read_all(limit=BATCH)
        if not events:
            break
        rows += len(events)
        position = events[-1].log_position
    seconds = time.perf_counter() - started
    store.close()
    return {"rate": rows / seconds, "events": rows, "rss_mb": _rss_mb()}


def child_rebuild(schema: str, which: str, prefix: str, workers: int = 1) -> dict[str, float]:
    from consumers.rebuild import Rebuild, RebuildOptions, RebuildProgress
    from datalayer.wiring import consumer_config, read_model_store
    from projections.orders import OrderCache, OrderViews

    settings = load_settings()
    base = OrderViews if which == "pg" else OrderCache
    projection = type(base.__name__, (base,), {"name": f"{prefix}_{which}"})()
    models = read_model_store(projection, settings)
    store = _store(settings, schema)
    marks: list[tuple[float, int]] = []

    def on_progress(progress: RebuildProgress) -> None:
        if progress.phase == "replay":
            marks.append((time.perf_counter(), progress.events_read))

    config = consumer_config(settings, topic_prefix=f"{prefix}.events.", dead_letter_prefix=f"{prefix}.dlq.")
    options = RebuildOptions(batch_size=BATCH, handover_timeout=0.0, workers=workers)
    rebuild = Rebuild(
        projection, models.registry, models.make_target, models.drop_target, store,
        settings.kafka_config(), config, options, on_progress=on_progress,
    )  # fmt: skip
    # Activation (building the deferred indexes, moving the readers' alias), timed around the call.
    activate = models.registry.activate
    activation: list[float] = []

    def timed_activate(*args: Any, **kwargs: Any) -> Any:
        begun = time.perf_counter()
        try:
            return activate(*args, **kwargs)
        finally:
            activation.append(time.perf_counter() - begun)

    models.registry.activate = timed_activate  # type: ignore[method-assign]
    sampler = _MemorySampler()
    sampler.start()
    try:
        report = rebuild.run(threading.Event())
    finally:
        sampler.stop()
    assert report.activated, "the rebuild did not finish"
    # The replay phase alone, from its first batch to its last: setting the generation up and the
    # Kafka steps around it take about the same second whatever the size of the log.
    (first_at, first_events), (last_at, events) = marks[0], marks[-1]
    replay_seconds = last_at - first_at
    events -= first_events
    for generation in models.registry.generations(projection.name):
        models.drop_target(generation.name)
    _forget(settings, projection.name, which)
    models.close()
    store.close()
    # Each process's own peak, summed: the kernel's figures, so no sampling is needed (sampling
    # every 100 ms cost the replaying parent ~3% of its CPU). The workers are reaped by now;
    # RUSAGE_CHILDREN gives the largest one's peak, counted once per worker.
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB
    rss = _rss_mb() + (workers - 1) * children
    pss = sampler.peak_pss_mb
    return {
        "rate": events / replay_seconds,
        "events": events,
        "rss_mb": rss,
        "pss_mb": pss,
        "activate_s": sum(activation),
    }


def _forget(settings: Settings, name: str, which: str) -> None:
    from datalayer.clients import postgres_engine, redis_client
    from projections.generations import REDIS_ALIASES

    if which == "pg":
        from sqlalchemy import text

        engine = postgres_engine(settings)
        with engine.begin() as conn:
            conn.execute(
                text("DELETE FROM datalayer_read_models.generations WHERE projection = :p"), {"p": name}
            )
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        engine.dispose()
    else:
        client = redis_client(settings)
        client.delete(f"dl:generations:{name}")
        client.hdel(REDIS_ALIASES, name)
        client.close()


def settle(settings: Settings, schema: str) -> None:
    """VACUUM ANALYZE the fresh log, as autovacuum soon would: rounds must not race its first pass."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        settings.psycopg_url(), autocommit=True, **settings.postgres_connect_kwargs()
    ) as conn:
        conn.execute(sql.SQL("VACUUM ANALYZE {}.events").format(sql.Identifier(schema)))


def _store(settings: Settings, schema: str) -> EventStore:
    return EventStore.connect(
        settings.psycopg_url(), schema, max_size=2, connect_kwargs=settings.postgres_connect_kwargs()
    )


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


class _MemorySampler(threading.Thread):
    """The peak PSS of this process plus its child processes' (the replay workers), every second.

    ``peak_pss_mb`` sums their PSS (each shared page split between its sharers): what the processes
    occupy together. Why only every second: reading ``smaps_rollup`` walks a process's mappings, and
    every 100 ms it cost the replaying parent ~3% of its CPU.
    """

    def __init__(self) -> None:
        super().__init__(name="pss-sampler", daemon=True)
        self.peak_pss_mb = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(1.0):
            pss = sum(_memory_mb(pid, "smaps_rollup", "Pss:") for pid in _self_and_children())
            self.peak_pss_mb = max(self.peak_pss_mb, pss)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _self_and_children() -> list[int]:
    pids = [os.getpid()]
    for task in Path("/proc/self/task").iterdir():
        with suppress(OSError):
            pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


def _memory_mb(pid: int, source: str, field: str) -> float:
    """A KiB field of ``/proc/<pid>/<source>`` in MB."""
    try:
        text = Path(f"/proc/{pid}/{source}").read_text()
    except OSError:
        return 0.0  # it has just exited
    for line in text.splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_child(*args: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=2, help="replay processes of a rebuild (RebuildOptions.workers)"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, schema, *rest = args.child
        result = child_read(schema) if kind == "read" else child_rebuild(schema, kind, rest[0], int(rest[1]))
        print(json.dumps(result))
        return

    settings = load_settings()
    schema = f"bench_rebuild_{uuid.uuid4().hex[:8]}"
    store = _store(settings, schema)
    store.migrate()
    try:
        started = time.perf_counter()
        loaded = fill(store, args.events, args.products)
        print(f"loaded {loaded:,} events in {time.perf_counter() - started:.1f} s into {schema}")
        settle(settings, schema)
        rates: dict[str, list[float]] = {"read": [], "pg": [], "redis": []}
        rss: list[float] = []
        pss: list[float] = []
        activations: dict[str, list[float]] = {"pg": [], "redis": []}
        consumed: dict[str, float] = {}
        for round_no in range(1, args.rounds + 1):
            for kind in ("read", "pg", "redis"):
                extra = [] if kind == "read" else [f"bench_rb_{uuid.uuid4().hex[:8]}", str(args.workers)]
                result = run_child(kind, schema, *extra)
                rates[kind].append(result["rate"])
                consumed[kind] = result["events"]
                if kind != "read":
                    rss.append(result["rss_mb"])
                    pss.append(result["pss_mb"])
                    activations[kind].append(result["activate_s"])
                print(
                    f"round {round_no} {kind:<5} {result['rate']:>10,.0f} /s  "
                    f"({result['events']:,.0f} events)"
                )
    finally:
        store.close()
        import psycopg
        from psycopg import sql

        with psycopg.connect(
            settings.psycopg_url(), autocommit=True, **settings.postgres_connect_kwargs()
        ) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))

    read, pg, redis_rate = (statistics.median(rates[k]) for k in ("read", "pg", "redis"))
    peak, peak_pss = max(rss), max(pss)
    activate_pg, activate_redis = (statistics.median(activations[k]) for k in ("pg", "redis"))
    print()
    print(f"bare read of the log:   {read:>10,.0f} rows/s   ({consumed['read']:,.0f} rows)")
    print(
        f"rebuild into PostgreSQL {pg:>10,.0f} events/s ({consumed['pg']:,.0f} Order events)  "
        f"{pg / read:.2f} of the bare read  target >= {TARGET_PG:,}: {_verdict(pg >= TARGET_PG)}"
    )
    print(
        f"rebuild into Redis      {redis_rate:>10,.0f} events/s ({consumed['redis']:,.0f} events)  "
        f"{redis_rate / read:.2f} of the bare read  target >= {TARGET_REDIS:,}: "
        f"{_verdict(redis_rate >= TARGET_REDIS)}"
    )
    print(
        f"peak RSS of a rebuild   {peak:>10,.0f} MB  "
        f"target <= {TARGET_RSS_MB}: {_verdict(peak <= TARGET_RSS_MB)}  "
        f"(PSS, shared pages counted once: {peak_pss:,.0f} MB)"
    )
    print(
        f"activation (indexes built, readers switched): PostgreSQL {activate_pg:.2f} s, "
        f"Redis {activate_redis:.2f} s"
    )
    print(
        json.dumps(
            {
                "pg_events_per_s": round(pg, 1),
                "redis_events_per_s": round(redis_rate, 1),
                "read_rows_per_s": round(read, 1),
                "peak_rss_mb": round(peak, 1),
                "events": loaded,
                "peak_pss_mb": round(peak_pss, 1),
                "workers": args.workers,
                "pg_activate_s": round(activate_pg, 2),
                "redis_activate_s": round(activate_redis, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
