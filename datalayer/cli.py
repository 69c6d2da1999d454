"""The ``datalayer`` command: a thin layer over the packages, for operators.

Every command reads its settings from the environment (see ``datalayer settings``), prints errors
as one line (``--debug`` adds the traceback) and exits 0 on success, 1 when the work failed and
2 when the command line or the settings are wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence

from datalayer.settings import Settings, SettingsError, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace, Settings], int]


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from datalayer.smoke import run_smoke

    print("datalayer demo: a round trip PostgreSQL -> Kafka -> Redis on the configured servers")
    run_smoke(settings, messages=args.messages)
    print("demo: ok")
    return EXIT_OK


def _cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    shown = settings.describe()
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        width = max(map(len, shown))
        for name, value in shown.items():
            print(f"{name:<{width}}  {value}")
    return EXIT_OK


def _cmd_db_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from datalayer.clients import postgres_connection
    from eventstore.migrations import available_migrations, current_version, migrate

    schema = args.schema or settings.eventstore_schema
    with postgres_connection(settings, autocommit=True) as conn:
        applied = migrate(conn, schema)
        version = current_version(conn, schema)
    for m in applied:
        print(f"applied migration {m.version:04d} {m.name} to schema {schema}")
    newest = available_migrations()[-1].version
    print(
        f"schema {schema} is at version {version} (newest {newest})" + ("" if applied else "; nothing to do")
    )
    return EXIT_OK


def _cmd_db_status(args: argparse.Namespace, settings: Settings) -> int:
    from datalayer.clients import postgres_connection
    from eventstore.migrations import available_migrations, current_version

    schema = args.schema or settings.eventstore_schema
    with postgres_connection(settings, autocommit=True) as conn:
        version = current_version(conn, schema)
    newest = available_migrations()[-1].version
    print(
        f"schema {schema} is at version {version} of {newest}"
        + ("" if version == newest else " (run: datalayer db migrate)")
    )
    return EXIT_OK if version == newest else EXIT_FAILED


def _cmd_relay(args: argparse.Namespace, settings: Settings) -> int:
    import logging
    import signal
    import threading

    from eventstore import EventStore
    from eventstore.relay import Relay, RelayConfig

    store = EventStore.connect(
        settings.psycopg_url(),
        schema=settings.eventstore_schema,
        max_size=4,
        connect_kwargs=settings.postgres_connect_kwargs(),
    )
    config = RelayConfig(
        name=args.name,
        topic_prefix=settings.topic_prefix,
        partitions=settings.topic_partitions,
        replication_factor=settings.topic_replication_factor,
        batch_size=args.batch_size,
    )
    relay = Relay(store, settings.kafka_config(), config)
    try:
        if args.lag:
            print(json.dumps(relay.lag().as_dict(), indent=2))
            return EXIT_OK
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("kafka").setLevel(logging.WARNING)
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        relay.run(stop)  # returns after a clean stop: the last batch acknowledged and checkpointed
        return EXIT_OK
    finally:
        store.close()


def _cmd_consume(args: argparse.Namespace, settings: Settings) -> int:
    import logging
    import signal
    import threading

    from consumers.runtime import ProjectionConsumer
    from datalayer.wiring import KNOWN_PROJECTIONS, consumer_config, load_projection, target_for

    names = args.projections or sorted(KNOWN_PROJECTIONS)
    try:
        projections = [load_projection(name) for name in names]
    except ValueError as exc:
        print(f"datalayer consume: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    config = consumer_config(settings, max_batch=args.batch_size)
    consumers = [
        ProjectionConsumer(p, target_for(p, settings), settings.kafka_config(), config) for p in projections
    ]
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    failures: list[BaseException] = []

    def run(consumer: ProjectionConsumer) -> None:
        try:
            consumer.run(stop)
        except BaseException as exc:
            failures.append(exc)
            stop.set()  # one projection failing stops the process, so a supervisor restarts it whole
        finally:
            consumer.target.close()

    threads = [threading.Thread(target=run, args=(c,), name=c.projection.name) for c in consumers]
    for thread in threads:
        thread.start()
    # Waiting on the event, not join(): the main thread must stay free to run the signal handler.
    while not stop.wait(0.5):
        if not any(t.is_alive() for t in threads):
            break
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return EXIT_OK


def _schema_arg(value: str) -> str:
    from eventstore.store import validate_schema_name

    try:
        return validate_schema_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datalayer",
        description="Operate a datalayer event store, its relay, consumers and projections.",
        epilog="example: DATALAYER_DATABASE_URL=postgresql://app:secret@db:5432/app datalayer settings",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="run a round trip through PostgreSQL, Kafka and Redis",
        description="Write rows to PostgreSQL, publish them to Kafka, consume them and store them in "
        "Redis, checking each step.",
        epilog="example: datalayer demo --messages 100",
    )
    demo.add_argument("--messages", type=int, default=10, help="how many records (default 10)")
    demo.set_defaults(handler=_cmd_demo)

    show = commands.add_parser(
        "settings",
        help="print the effective settings (passwords masked)",
        description="Print every DATALAYER_* setting in effect, passwords masked.",
        epilog="example: datalayer settings --json",
    )
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_cmd_settings)

    relay = commands.add_parser(
        "relay",
        help="publish every event of the store to Kafka (runs until SIGTERM)",
        description="Follow the event store's commit-ordered log and publish every event to Kafka: one "
        "topic per stream type (DATALAYER_TOPIC_PREFIX + type), key = stream id, a JSON envelope as value. "
        "At least once: the checkpoint moves only after Kafka acknowledged. One relay per store and name is "
        "active; more instances wait as hot standbys. SIGTERM flushes, checkpoints and exits 0.",
        epilog="example: DATALAYER_TOPIC_PREFIX=prod.events. datalayer relay\n"
        "         datalayer relay --lag   # checkpoint, lag in events and seconds, horizon stall (JSON)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    relay.add_argument("--name", default="default", help="relay name: one active relay per name (default)")
    relay.add_argument("--batch-size", type=int, default=5000, help="events per batch (default 5000)")
    relay.add_argument("--lag", action="store_true", help="print the relay's lag as JSON and exit")
    relay.set_defaults(handler=_cmd_relay)

    consume = commands.add_parser(
        "consume",
        help="feed projections from Kafka into their read models (runs until SIGTERM)",
        description="Run projections from their Kafka topics into their read models, one consumer group "
        "per projection version. Each batch's writes, the last applied version of each stream and the Kafka "
        "offsets commit together, so every event takes effect once, across crashes and rebalances. Run more "
        "processes to share the partitions. Events a projection cannot apply go to DATALAYER_DEAD_LETTER_"
        "TOPIC_PREFIX + projection name. SIGTERM finishes the batch in hand and exits 0.",
        epilog="example: datalayer consume                # every known projection\n"
        "         datalayer consume order_views    # one of them\n"
        "         datalayer consume mypkg.views:Stats",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    consume.add_argument(
        "projections", nargs="*", metavar="PROJECTION", help="names or module:Class (default: all known)"
    )
    consume.add_argument("--batch-size", type=int, default=1000, help="records per batch (default 1000)")
    consume.set_defaults(handler=_cmd_consume)

    db = commands.add_parser(
        "db", help="the event store's schema", description="Manage the event store's schema."
    )
    db_commands = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    for name, handler, text in (
        ("migrate", _cmd_db_migrate, "create or upgrade the schema; idempotent, safe to run concurrently"),
        ("status", _cmd_db_status, "print the schema's migration version; exit 1 when behind"),
    ):
        cmd = db_commands.add_parser(
            name,
            help=text,
            description=text[0].upper() + text[1:] + ".",
            epilog=f"example: DATALAYER_EVENTSTORE_SCHEMA=orders datalayer db {name}",
        )
        cmd.add_argument(
            "--schema", type=_schema_arg, help="PostgreSQL schema (default: DATALAYER_EVENTSTORE_SCHEMA)"
        )
        cmd.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"datalayer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(f"datalayer {args.command}: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


def one_line(exc: BaseException) -> str:
    """The error as one line: the driver's own error rather than SQLAlchemy's wrapper and its link."""
    cause = getattr(exc, "orig", None) or exc
    text = " ".join(part.strip() for part in str(cause).splitlines() if part.strip())
    return f"{type(cause).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
