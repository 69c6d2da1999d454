"""The CLI's read-model commands: ``consume``, ``rebuild``, ``verify`` and ``generations``.

Thin layers over :mod:`consumers` and :mod:`projections`; :func:`add_commands` registers them.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any, TextIO

from datalayer.settings import Settings
from datalayer.status_commands import add_metrics_arguments, non_negative_int, positive_int

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _projections(names: list[str]) -> list[Any]:
    from datalayer.wiring import KNOWN_PROJECTIONS, load_projection

    return [load_projection(name) for name in (names or sorted(KNOWN_PROJECTIONS))]


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)


def _check_kafka_tls(settings: Settings) -> None:
    from datalayer.clients import check_kafka_tls

    check_kafka_tls(settings)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def cmd_consume(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.live import LiveConsumer
    from datalayer.wiring import consumer_config, read_model_store

    projections = _projections(args.projections)
    _logging()
    _check_kafka_tls(settings)
    # Only what is given here overrides the runtime's own defaults.
    sizes = {} if args.batch_size is None else {"max_batch": args.batch_size}
    if args.fetch_wait_ms is not None:
        sizes["fetch_wait_ms"] = args.fetch_wait_ms
    config = consumer_config(settings, **sizes)
    if args.metrics_port is not None:
        from datalayer.metrics import PipelineMetrics

        metrics = PipelineMetrics()
        metrics.watch_pipeline(settings, projections)
        metrics.count_logged_errors("consumer", "datalayer.consumer")
        config = consumer_config(settings, **sizes, observer=metrics.consumer_observer)
        metrics.serve(args.metrics_port, args.metrics_host)
    stores = [read_model_store(p, settings) for p in projections]
    consumers = [
        LiveConsumer(p, s.registry, s.make_target, settings.kafka_config(), config)
        for p, s in zip(projections, stores, strict=True)
    ]
    stop = _stop_on_signals()
    failures: list[BaseException] = []

    def run(consumer: LiveConsumer) -> None:
        try:
            consumer.run(stop)
        except BaseException as exc:
            failures.append(exc)
            stop.set()  # one projection failing stops the process, so a supervisor restarts it whole

    threads = [threading.Thread(target=run, args=(c,), name=c.projection.name) for c in consumers]
    for thread in threads:
        thread.start()
    # Waiting on the event, not join(): the main thread must stay free to run the signal handler.
    while not stop.wait(0.5):
        if not any(t.is_alive() for t in threads):
            break
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    if failures:
        raise failures[0]
    return EXIT_OK


class ProgressBar:
    """One line on a terminal, redrawn in place; a line every few seconds otherwise (logs)."""

    def __init__(self, stream: TextIO, every: float = 2.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self._last = 0.0

    def show(self, progress: Any) -> None:
        now = time.monotonic()
        final = progress.phase == "done"
        if not (self.tty or final or now - self._last >= self.every):
            return
        self._last = now
        self.stream.write(("\r" if self.tty else "") + self.render(progress) + ("" if self.tty else "\n"))
        if self.tty and final:
            self.stream.write("\n")
        self.stream.flush()

    @staticmethod
    def render(progress: Any) -> str:
        total = max(progress.total, 1)
        share = min(progress.events_read / total, 1.0)
        bar = "#" * int(share * 24)
        eta = progress.eta_s
        parts = [
            f"{progress.generation} {progress.phase:<8}",
            f"[{bar:<24}] {share:4.0%}",
            f"{progress.events_read:,}/{progress.total:,} events",
            f"{progress.rate:,.0f} ev/s",
            f"ETA {int(eta) // 60}:{int(eta) % 60:02d}" if eta is not None else "",
            f"lag {progress.lag:,}" if progress.phase == "catch-up" and progress.lag is not None else "",
        ]
        return "  ".join(p for p in parts if p)


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.rebuild import Rebuild, RebuildOptions
    from datalayer.wiring import consumer_config, event_store, load_projection, read_model_store

    projection = load_projection(args.projection)
    _logging()
    _check_kafka_tls(settings)
    store = event_store(settings)
    models = read_model_store(projection, settings)
    bar = ProgressBar(sys.stderr)
    options = RebuildOptions(
        batch_size=args.batch_size,
        max_rate=args.max_rate,
        workers=args.workers,
        handover_timeout=args.handover_timeout,
        drop_old=args.drop_old,
    )
    rebuild = Rebuild(
        projection,
        models.registry,
        models.make_target,
        models.drop_target,
        store,
        settings.kafka_config(),
        consumer_config(settings),
        options,
        on_progress=bar.show,
    )
    try:
        report = rebuild.run(_stop_on_signals())
    finally:
        store.close()
        models.close()
    if not report.activated:
        print(
            f"rebuild of {report.generation} interrupted after {report.seconds:.1f} s; run it again to resume"
        )
        return EXIT_FAILED
    print(
        f"generation {report.generation} is active: {report.replayed.applied:,} events replayed, "
        f"{report.caught_up_events:,} caught up from Kafka in {report.seconds:.1f} s; "
        + ("live consumers took over" if report.handed_over else "no live consumer joined yet")
        + (f"; dropped {', '.join(report.dropped)}" if report.dropped else "")
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    import uuid

    from datalayer.wiring import event_store, load_projection, read_model_store
    from projections.verify import NotSettled, verify

    projection = load_projection(args.projection)
    models = read_model_store(projection, settings)
    active = models.registry.active(projection.name)
    if active is None:
        print(f"datalayer verify: {projection.name} has no active generation to verify", file=sys.stderr)
        models.close()
        return EXIT_FAILED
    store = event_store(settings)
    shadow_name = f"{projection.name[:40]}_verify_{uuid.uuid4().hex[:8]}"
    shadow = models.make_target(shadow_name)
    try:
        report = verify(
            projection, models.make_target(active.name), shadow, store, settle_timeout=args.timeout
        )
    except NotSettled as exc:
        print(f"datalayer verify: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        models.drop_target(shadow_name)
        store.close()
        models.close()
    if report.ok:
        print(f"{active.name}: {report.compared:,} rows/keys equal a fresh replay of the store")
        return EXIT_OK
    counts = report.counts()
    print(
        f"{active.name}: differs from a fresh replay: {counts['missing']} missing, {counts['extra']} extra, "
        f"{counts['different']} different"
    )
    for d in report.differences[: args.examples]:
        print(f"  {d.kind:<9} {d.where} {d.key}: live={_short(d.live)} expected={_short(d.expected)}")
    return EXIT_FAILED


def _short(value: Any, width: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_generations(args: argparse.Namespace, settings: Settings) -> int:
    from datalayer.wiring import load_projection, read_model_store

    projection = load_projection(args.projection)
    models = read_model_store(projection, settings)
    try:
        if args.drop:
            found = {g.name: g for g in models.registry.generations(projection.name)}
            if args.drop not in found or found[args.drop].status == "active":
                print(f"datalayer generations: {args.drop!r} is not an inactive generation", file=sys.stderr)
                return EXIT_FAILED
            models.drop_target(args.drop)
            models.registry.forget(projection.name, args.drop)
            print(f"dropped {args.drop}")
            return EXIT_OK
        for g in models.registry.generations(projection.name):
            when = g.activated_at or g.created_at
            print(f"{g.name:<40} v{g.version:<4} {g.status:<9} {when:%Y-%m-%d %H:%M:%S}")
        return EXIT_OK
    finally:
        models.close()


def add_commands(commands: Any) -> None:
    """Register the read-model commands on the CLI's subparsers."""
    consume = commands.add_parser(
        "consume",
        help="feed projections from Kafka into their read models (runs until SIGTERM)",
        description="Run projections from their Kafka topics into the active generation of their read "
        "models. Each batch's writes, the last applied version of each stream and the Kafka offsets commit "
        "together, so every event takes effect once, across crashes and rebalances. Run more processes to "
        "share the partitions. After a rebuild activates a new generation, consumers move to it by "
        "themselves. Events a projection cannot apply go to DATALAYER_DEAD_LETTER_TOPIC_PREFIX + projection "
        "name. SIGTERM finishes the batch in hand and exits 0.",
        epilog="example: datalayer consume                # every known projection\n"
        "         datalayer consume order_views    # one of them\n"
        "         datalayer consume mypkg.views:Stats\n"
        "         datalayer consume --metrics-port 9301   # Prometheus metrics on :9301/metrics",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    consume.add_argument(
        "projections", nargs="*", metavar="PROJECTION", help="names or module:Class (default: all known)"
    )
    consume.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="records per batch (default: the runtime's ConsumerConfig.max_batch, 2000)",
    )
    consume.add_argument(
        "--fetch-wait-ms",
        type=non_negative_int,
        default=None,
        metavar="MS",
        help="how long Kafka may hold a fetch for more records: less CPU at low rates, at most this "
        "much more latency; 0 answers at once (default: ConsumerConfig.fetch_wait_ms, 10)",
    )
    add_metrics_arguments(consume)
    consume.set_defaults(handler=cmd_consume)

    rebuild = commands.add_parser(
        "rebuild",
        help="rebuild a projection's read model from the store into a new generation (blue/green)",
        description="Replay the event store into a new generation of the projection's read model while "
        "the live one keeps serving and consuming; then catch up from Kafka, switch readers atomically and "
        "hand over to the live consumers. Interrupted, it resumes where it stopped when run again. Use it "
        "after changing a projection (bump its version) or to restore a lost or drifted read model.",
        epilog="example: datalayer rebuild order_views\n"
        "         datalayer rebuild order_cache --max-rate 20000 --drop-old\n"
        "         datalayer rebuild order_views --workers 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rebuild.add_argument("projection", metavar="PROJECTION", help="name or module:Class")
    rebuild.add_argument("--batch-size", type=int, default=2000, help="events per batch (default 2000)")
    rebuild.add_argument("--max-rate", type=float, help="throttle: at most this many events/s from the store")
    rebuild.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="replay in N processes, each a partition of the streams, if the projection allows it (1)",
    )
    rebuild.add_argument(
        "--handover-timeout", type=float, default=30.0, help="seconds to wait for live consumers (30)"
    )
    rebuild.add_argument("--drop-old", action="store_true", help="drop retired generations afterwards")
    rebuild.set_defaults(handler=cmd_rebuild)

    check = commands.add_parser(
        "verify",
        help="diff a projection's live read model against a fresh replay; exit 1 on any difference",
        description="Rebuild the projection into a throwaway shadow copy and compare it with the active "
        "generation, row by row or key by key. Prints how many rows are missing, extra or different, with "
        "the first examples. Exit 0 when equal, 1 when not (or when the live copy never settles).",
        epilog="example: datalayer verify order_views --examples 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("projection", metavar="PROJECTION", help="name or module:Class")
    check.add_argument("--examples", type=int, default=10, help="differences to print (default 10)")
    check.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the live copy to settle"
    )
    check.set_defaults(handler=cmd_verify)

    generations = commands.add_parser(
        "generations",
        help="list a projection's read-model generations, or drop an inactive one",
        description="List the generations of a projection's read model (building, active, retired), or "
        "drop a retired one with --drop.",
        epilog="example: datalayer generations order_views\n"
        "         datalayer generations order_views --drop order_views_v1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generations.add_argument("projection", metavar="PROJECTION", help="name or module:Class")
    generations.add_argument("--drop", metavar="GENERATION", help="drop this inactive generation")
    generations.set_defaults(handler=cmd_generations)
