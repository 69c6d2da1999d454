"""The ``datalayer`` command: a thin layer over the packages, for operators.

Every command reads its settings from the environment (see ``datalayer settings``), prints errors
as one line (``--debug`` adds the traceback) and exits 0 on success, 1 when the work failed and
2 when the command line or the settings are wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from datalayer.read_model_commands import add_commands as add_read_model_commands
from datalayer.security_commands import add_commands as add_security_commands
from datalayer.settings import Settings, SettingsError, load_settings
from datalayer.status_commands import add_commands as add_status_commands
from datalayer.status_commands import add_metrics_arguments, positive_int
from datalayer.wiring import UnknownProjection, event_store

if TYPE_CHECKING:
    pass

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace, Settings], int]


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


def _cmd_db_roles(args: argparse.Namespace, settings: Settings) -> int:
    from datalayer.clients import postgres_connection
    from eventstore.privileges import create_store_roles, drop_store_roles, store_roles

    schema = args.schema or settings.eventstore_schema
    roles = store_roles(schema)
    with postgres_connection(settings, autocommit=True) as conn:
        if args.drop:
            dropped = drop_store_roles(conn, schema)
            print(f"dropped roles {', '.join(dropped) or '(none existed)'}; schema {schema} is yours now")
            return EXIT_OK
        created = create_store_roles(conn, schema)
    print(f"roles created now: {', '.join(created) or 'none (all existed)'}")
    print(f"schema {schema} and its objects are owned by {roles.owner}; privileges granted:")
    print(f"  {roles.owner:<24} migrations (you are a member: 'datalayer db migrate' runs as it)")
    print(f"  {roles.app:<24} SELECT, INSERT on events and snapshots (no UPDATE, DELETE, TRUNCATE)")
    print(f"  {roles.relay:<24} SELECT on events; SELECT, INSERT, UPDATE on relay_checkpoints")
    print(f"  {roles.reader:<24} SELECT on every table")
    print(f"make a login a member, e.g.: CREATE ROLE orders_api LOGIN PASSWORD '...' IN ROLE {roles.app};")
    return EXIT_OK


def _cmd_db_grant_projection(args: argparse.Namespace, settings: Settings) -> int:
    from datalayer.clients import postgres_engine
    from projections.privileges import create_projection_roles, projection_roles

    try:
        writer, reader = projection_roles(args.projection)
    except ValueError as exc:
        print(f"datalayer db grant-projection: {exc}", file=sys.stderr)
        return EXIT_USAGE
    engine = postgres_engine(settings)
    try:
        with engine.begin() as conn:
            schemas = create_projection_roles(conn, args.projection)
    finally:
        engine.dispose()
    print(f"roles {writer} (consumers) and {reader} (queries) exist; granted on:")
    for schema, roles in schemas.items():
        print(f"  {schema:<32} {', '.join(roles) or '- (not owned by you: ask its owner to run this)'}")
    if not schemas:
        print("  nothing yet: generations built from now on are granted as they are set up")
    print(f"make a login a member, e.g.: GRANT {writer} TO orders_consumer;")
    return EXIT_OK


def _cmd_relay(args: argparse.Namespace, settings: Settings) -> int:
    import logging
    import signal
    import threading

    from datalayer.clients import check_kafka_tls
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
    on_published = None
    if args.metrics_port is not None and not args.lag:
        from datalayer.metrics import PipelineMetrics

        metrics = PipelineMetrics()
        metrics.watch_pipeline(settings, [], args.name)
        metrics.count_logged_errors("relay", "datalayer.relay")
        on_published = metrics.relay_observer(args.name)
        metrics.serve(args.metrics_port, args.metrics_host)
    relay = Relay(store, settings.kafka_config(), config, on_published=on_published)
    try:
        if args.lag:
            print(json.dumps(relay.lag().as_dict(), indent=2))
            return EXIT_OK
        check_kafka_tls(settings)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("kafka").setLevel(logging.WARNING)
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        relay.run(stop)  # returns after a clean stop: the last batch acknowledged and checkpointed
        return EXIT_OK
    finally:
        store.close()


class _Progress:
    """Events so far and the rate, redrawn on one stderr line at most twice a second."""

    def __init__(self, verb: str, enabled: bool) -> None:
        self.verb = verb
        self.enabled = enabled
        self.started = time.monotonic()
        self.shown = 0.0
        self.drawn = False

    def __call__(self, events: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.shown < 0.5:
            return
        self.shown = now
        rate = events / (now - self.started) if now > self.started else 0.0
        end = "\r" if sys.stderr.isatty() else "\n"
        sys.stderr.write(f"{self.verb} {events:,} events ({rate:,.0f} events/s){end}")
        sys.stderr.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn and sys.stderr.isatty():
            sys.stderr.write("\n")


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from eventstore.portable import export_log, open_export

    progress = _Progress("exported", args.progress or sys.stderr.isatty())
    with event_store(settings, args.schema) as store:
        try:
            with open_export(args.file) as out:
                summary = export_log(store, out, batch_size=args.batch_size, progress=progress)
        finally:
            progress.finish()
    print(
        f"exported {summary.events} events of schema {store.schema} to {args.file} in "
        f"{summary.seconds:.1f} s ({summary.events_per_second:,.0f} events/s), sha256 {summary.sha256}",
        file=sys.stderr if args.file == "-" else sys.stdout,  # stdout carries the export itself
    )
    if summary.held_back:
        print(
            f"note: {summary.held_back} committed events wait behind an open transaction and are not in "
            "this export (datalayer relay --lag names it)",
            file=sys.stderr,
        )
    return EXIT_OK


def _cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from eventstore.portable import import_log, open_import

    progress = _Progress("imported", args.progress or sys.stderr.isatty())
    with event_store(settings, args.schema) as store:
        store.migrate()
        try:
            with open_import(args.file) as source:
                summary = import_log(store, source, batch_size=args.batch_size, progress=progress)
        finally:
            progress.finish()
    print(
        f"imported {summary.events} events into schema {store.schema} in {summary.seconds:.1f} s "
        f"({summary.events_per_second:,.0f} events/s); count and sha256 {summary.sha256} verified"
    )
    return EXIT_OK


def _cmd_migrate_events(args: argparse.Namespace, settings: Settings) -> int:
    from eventstore.migrate_events import Transform, copy_unchanged, load_transform, migrate_events

    transform: Transform = copy_unchanged
    if args.transform:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # the operator's own module, found as `python -m` would
        try:
            transform = load_transform(args.transform)
        except ValueError as exc:
            print(f"datalayer migrate-events: {exc}", file=sys.stderr)
            return EXIT_USAGE
    progress = _Progress("migrated", args.progress or sys.stderr.isatty())
    with (
        event_store(settings, args.schema) as source,
        event_store(settings, args.to_schema, args.to_database_url) as target,
    ):
        try:
            report = migrate_events(
                source,
                target,
                transform,
                transform_name=args.transform or "copy_unchanged",
                resume=args.resume,
                batch_size=args.batch_size,
                progress=progress,
            )
        finally:
            progress.finish()
    for line in report.lines():
        print(line)
    return EXIT_OK if report.ok else EXIT_FAILED


def _add_transfer_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser(
        "export",
        help="write the event log to a portable file (JSON Lines, gzip for *.gz)",
        description="Write every event of the store, in commit order and with every stored field, to FILE: "
        "a header line, one JSON line per event (payload bytes exactly as stored) and a trailer with the "
        "count and a SHA-256 of the event lines. The log is taken as readable when the export starts; "
        "memory stays constant. FILE is written beside and renamed when complete.",
        epilog="example: datalayer export backup-2024-06-01.jsonl.gz\n"
        "         datalayer export - | ssh backup 'cat > orders.jsonl'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("file", metavar="FILE", help="where to write; *.gz is compressed, - is stdout")
    export.set_defaults(handler=_cmd_export)

    load = commands.add_parser(
        "import",
        help="restore an export into an empty store",
        description="Read an export into the store (created or migrated first), which must hold no events. "
        "Event ids, streams, versions, types, payload bytes, metadata and recorded_at are kept; positions "
        "are new, in the file's order. One transaction: the count and checksum in the trailer are checked "
        "before the commit, so a truncated or damaged file leaves the store empty.",
        epilog="example: DATALAYER_EVENTSTORE_SCHEMA=restored datalayer import backup-2024-06-01.jsonl.gz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load.add_argument("file", metavar="FILE", help="the export; gzip is recognised, - is stdin")
    load.set_defaults(handler=_cmd_import)

    migrate = commands.add_parser(
        "migrate-events",
        help="copy the event log through a transform into a new store (no cut-over)",
        description="Copy the log, in commit order, through a function transform(event) -> iterable of "
        "eventstore.migrate_events.NewStreamEvent into a new schema (and database): rename types, drop "
        "fields, split streams, fix data. Target streams are numbered contiguously in source order. The "
        "source is only read. Counts and stream contiguity are verified and reported (exit 1 when they "
        "disagree). Progress is recorded in the target, so --resume continues an interrupted run, or "
        "copies what the source gained since. Cutting over is a separate step: see "
        "docs/backup-and-migration.md.",
        epilog="example: datalayer migrate-events --to-schema orders_v2 --transform mymigration:rename\n"
        "         datalayer migrate-events --to-schema orders_v2 --transform mymigration:rename --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    migrate.add_argument(
        "--to-schema", required=True, type=_schema_arg, metavar="SCHEMA", help="the new store's schema"
    )
    migrate.add_argument(
        "--transform", metavar="MODULE:FUNCTION", help="the transform (default: copy every event unchanged)"
    )
    migrate.add_argument(
        "--to-database-url", metavar="URL", help="the new store's database (default: the source's)"
    )
    migrate.add_argument("--resume", action="store_true", help="continue a migration into --to-schema")
    migrate.set_defaults(handler=_cmd_migrate_events)

    for cmd, whose in ((export, "the store's"), (load, "the store's"), (migrate, "the source store's")):
        cmd.add_argument(
            "--schema", type=_schema_arg, help=f"{whose} schema (default: DATALAYER_EVENTSTORE_SCHEMA)"
        )
        cmd.add_argument(
            "--batch-size", type=positive_int, default=5000, metavar="N", help="events per batch (5000)"
        )
        cmd.add_argument("--progress", action="store_true", help="show progress on stderr (on for a TTY)")


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
    parser.add_argument(
        "--log-json", action="store_true", help="log one JSON object per line on stderr (for collectors)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
        "         datalayer relay --lag   # checkpoint, lag in events and seconds, horizon stall (JSON)\n"
        "         datalayer relay --metrics-port 9300   # Prometheus metrics on :9300/metrics",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    relay.add_argument("--name", default="default", help="relay name: one active relay per name (default)")
    relay.add_argument("--batch-size", type=int, default=5000, help="events per batch (default 5000)")
    relay.add_argument("--lag", action="store_true", help="print the relay's lag as JSON and exit")
    add_metrics_arguments(relay)
    relay.set_defaults(handler=_cmd_relay)

    add_read_model_commands(commands)
    add_status_commands(commands)

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

    roles = db_commands.add_parser(
        "roles",
        help="create the store's group roles and grant them least privilege (needs CREATEROLE)",
        description="Create the NOLOGIN group roles <schema>_owner, <schema>_app, <schema>_relay and "
        "<schema>_reader (those missing), make you a member of the owner, hand the schema and its objects "
        "to the owner and grant each role exactly its privileges. Idempotent; later migrations run as the "
        "owner and grant again. Log in as members of these roles, never as a superuser. See "
        "docs/security.md.",
        epilog="example: datalayer db roles\n"
        "         psql -c \"CREATE ROLE orders_api LOGIN PASSWORD '...' IN ROLE datalayer_app\"",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    roles.add_argument(
        "--schema", type=_schema_arg, help="PostgreSQL schema (default: DATALAYER_EVENTSTORE_SCHEMA)"
    )
    roles.add_argument(
        "--drop", action="store_true", help="drop the roles instead; what the owner role owned becomes yours"
    )
    roles.set_defaults(handler=_cmd_db_roles)

    grant = db_commands.add_parser(
        "grant-projection",
        help="create a projection's writer and reader roles and grant them on its schemas",
        description="Create the NOLOGIN roles <projection>_writer (live consumers: read and write the "
        "generation schemas) and <projection>_reader (queries: read the alias views and generations) and "
        "grant them on the registry, the alias schema and every generation that exists. Generations built "
        "later are granted when they are set up. Idempotent; needs CREATEROLE when a role is missing.",
        epilog="example: datalayer db grant-projection order_views",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    grant.add_argument("projection", metavar="PROJECTION", help="the projection's name, e.g. order_views")
    grant.set_defaults(handler=_cmd_db_grant_projection)

    _add_transfer_commands(commands)
    add_security_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"datalayer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    handler: Handler = args.handler
    if args.log_json:
        from datalayer.logs import use_json_logs

        use_json_logs()
    try:
        return handler(args, settings)
    except UnknownProjection as exc:
        print(f"datalayer {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
