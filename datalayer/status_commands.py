"""The CLI's operations commands: ``status``, ``health`` and ``demo``; and the metrics options.

Thin layers over :mod:`datalayer.status`, :mod:`datalayer.health` and :mod:`datalayer.demo`;
:func:`add_commands` registers them. Imports are lazy, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

from datalayer.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port`` and ``--metrics-host`` on a long-running command."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: no endpoint)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics endpoint listens on (default 127.0.0.1; 0.0.0.0: every interface)",
    )


def _projections(names: list[str]) -> list[Any]:
    from datalayer.wiring import KNOWN_PROJECTIONS, load_projection

    return [load_projection(name) for name in (names or sorted(KNOWN_PROJECTIONS))]


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from datalayer.status import gather_status

    report = gather_status(settings, _projections(args.projections), args.relay)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print_status(report, sys.stdout, partitions=args.partitions)
    return EXIT_FAILED if report.errors else EXIT_OK


def print_status(report: Any, out: SupportsWrite[str], partitions: bool = False) -> None:
    """The status report as a few lines and one table, for a person."""
    from datalayer.status import unreachable_message

    store, relay = report.store, report.relay
    if store is not None:
        age = ""
        if store.last_recorded_at is not None:
            age = f", newest {(datetime.now(UTC) - store.last_recorded_at).total_seconds():,.1f} s ago"
        print(
            f"event store   schema {store.schema}: {'' if store.events_exact else '~'}{store.events:,} "
            f"events{'' if store.events_exact else ' (estimate)'}, "
            f"head position {store.head_position or 0:,}{age}",
            file=out,
        )
        if store.unreachable_events:
            print(f"read horizon  {unreachable_message(store.unreachable_events)}", file=out)
        if store.horizon_stalled:
            print(
                f"read horizon  STALLED: {store.held_back_events:,} committed events held back for "
                f"{store.blocking_seconds:,.1f} s by backend {store.blocking_pid}: "
                f"{store.blocking_query or '?'}",
                file=out,
            )
        else:
            print("read horizon  ok: no committed event is held back", file=out)
    if relay is not None:
        who = f"active (backend {relay.active_pid})" if relay.active_pid else "not running"
        print(
            f"relay         {relay.name}: {who}, checkpoint {relay.checkpoint}, lag {relay.lag_events:,} "
            f"events / {relay.lag_seconds:,.1f} s, {relay.published:,} published",
            file=out,
        )
    if report.projections:
        rows: list[tuple[str, ...]] = [
            ("projection", "target", "generation", "status", "lag", "lag s", "consumers", "dead letters")
        ]
        for p in report.projections:
            if p.error is not None:
                rows.append((p.name, p.target, f"error: {p.error}", "", "", "", "", ""))
                continue
            if not p.generations:
                rows.append((p.name, p.target, "(none yet)", "", "", "", "", _count(p.dead_letters)))
            for i, g in enumerate(p.generations):
                if g.error is not None:
                    rows.append((p.name, p.target, g.name, g.status, f"error: {g.error}", "", "", ""))
                    continue
                lag = _count(g.lag_events)
                if g.status == "building" and g.log_checkpoint is not None:
                    lag += f" (replayed to {g.log_checkpoint})"
                seconds = f"{g.lag_seconds:,.1f}" if g.lag_seconds is not None else "?"
                members = _count(g.group_members) if g.status != "retired" else ""
                if g.group_members and g.group_assigned is not None and g.group_assigned < len(g.partitions):
                    members += f" ({g.group_assigned} of {len(g.partitions)} partitions)"
                rows.append(
                    (
                        p.name if i == 0 else "",
                        p.target if i == 0 else "",
                        g.name,
                        g.status,
                        lag,
                        seconds,
                        members,
                        _count(p.dead_letters) if i == 0 else "",
                    )
                )
                if partitions:
                    for part in g.partitions:
                        at = f"{part.applied:,}" if part.applied is not None else "-"
                        lag = f"{part.lag:,} (at {at} of {part.end:,})"
                        rows.append(("", "", f"  {part.source}", "", lag, "", "", ""))
        print(file=out)
        _table(rows, out)
        for p in report.projections:
            for g in p.generations:
                if g.error is None and g.status != "retired" and g.past_end:  # a retired one reads nothing
                    print(
                        f"  warning: {g.name} stored offsets past the end of {len(g.past_end)} "
                        f"partition(s) (--partitions shows them): the topic was created again since; "
                        f"its consumer reads the new one from the beginning once it runs",
                        file=out,
                    )
                if g.error is None and g.status != "retired" and g.recreated and not g.past_end:
                    print(
                        f"  warning: {g.name}: {', '.join(g.recreated)} created again since its offsets "
                        f"were stored; its consumer reads the new topic from the beginning when restarted",
                        file=out,
                    )
    for server, error in report.errors.items():
        print(f"error: {server}: {error}", file=out)
    print(f"(read in {report.took_seconds * 1000:,.0f} ms)", file=out)


def _count(value: int | None) -> str:
    return f"{value:,}" if value is not None else "?"


def _table(rows: list[tuple[str, ...]], out: SupportsWrite[str]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    from datalayer.health import Thresholds, check_health

    thresholds = Thresholds(
        relay_lag_seconds=args.max_relay_lag,
        consumer_lag_seconds=args.max_consumer_lag,
        horizon_stall_seconds=args.max_stall,
    )
    projections = _projections(args.projection) if args.scope in ("all", "consumers") else []
    checks = check_health(settings, projections, args.scope, thresholds, args.relay)
    width = max(len(c.name) for c in checks)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<{width}}  {check.detail}")
    failed = [c for c in checks if not c.ok]
    if failed:
        print(f"unhealthy: {failed[0].name}: {failed[0].detail}")
        return EXIT_FAILED
    print(f"healthy: {len(checks)} checks passed")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from datalayer.demo import DemoFailed, DemoOptions, run_demo

    options = DemoOptions(
        orders=args.orders,
        writers=args.writers,
        namespace=args.namespace,
        keep=args.keep,
        timeout=args.timeout,
    )
    try:
        run_demo(settings, options)
    except DemoFailed as exc:
        print(f"datalayer demo: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds >= 0")
    return number


def positive_int(value: str) -> int:
    """An argparse type: a whole number >= 1, or a one-line error naming the value."""
    return _whole_number(value, 1)


def non_negative_int(value: str) -> int:
    """An argparse type: a whole number >= 0, or a one-line error naming the value."""
    return _whole_number(value, 0)


def _whole_number(value: str, least: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= {least}") from None
    if number < least:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= {least}")
    return number


def add_commands(commands: Any) -> None:
    """Register ``status``, ``health`` and ``demo`` on the CLI's subparsers."""
    status = commands.add_parser(
        "status",
        help="the store, the relay and every projection: positions, lag, consumers, dead letters",
        description="Read, without writing anything: the event store's events and head position, the "
        "read horizon (and which backend stalls it, for how long), the relay's checkpoint and lag in "
        "events and seconds, and for each generation of each projection whether it is active or being "
        "rebuilt, its lag in events and seconds (end to end, from the commit of the oldest unapplied "
        "event), its consumer group's members, and the projection's dead letters. Exit 1 when a server "
        "could not be read.",
        epilog="example: datalayer status\n"
        "         datalayer status --json | jq '.projections[].generations[].lag_events'\n"
        "         datalayer status order_views --partitions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument(
        "projections", nargs="*", metavar="PROJECTION", help="names or module:Class (default: all known)"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--partitions", action="store_true", help="show the lag of every partition")
    status.add_argument("--relay", default="default", help="the relay's name (default)")
    status.set_defaults(handler=cmd_status)

    health = commands.add_parser(
        "health",
        help="check the servers and the pipeline's lag; exit 1 when unhealthy (for probes)",
        description="Check that PostgreSQL, Kafka and Redis answer, then that the pipeline keeps up: "
        "the read horizon is not stalled longer than --max-stall, the relay's lag is within "
        "--max-relay-lag, and each projection has an active generation whose lag is within "
        "--max-consumer-lag. One line per check, then a one-line verdict. Exit 0 when healthy, 1 when "
        "not. SCOPE narrows it for one process type's probe: servers, relay (PostgreSQL, Kafka, horizon, "
        "relay lag) or consumers (the three servers and the projections' lag).",
        epilog="example: datalayer health\n"
        "         datalayer health relay --max-relay-lag 10     # a relay's readiness probe\n"
        "         datalayer health consumers --projection order_views",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    health.add_argument(
        "scope",
        nargs="?",
        default="all",
        choices=("all", "servers", "relay", "consumers"),
        metavar="SCOPE",
        help="all (default), servers, relay or consumers",
    )
    health.add_argument(
        "--projection", action="append", default=[], metavar="PROJECTION", help="check only these (repeat)"
    )
    health.add_argument("--relay", default="default", help="the relay's name (default)")
    health.add_argument(
        "--max-relay-lag", type=_non_negative, default=30.0, metavar="S", help="seconds (default 30)"
    )
    health.add_argument(
        "--max-consumer-lag", type=_non_negative, default=60.0, metavar="S", help="seconds (default 60)"
    )
    health.add_argument(
        "--max-stall",
        type=_non_negative,
        default=60.0,
        metavar="S",
        help="horizon stall seconds (default 60)",
    )
    health.set_defaults(handler=cmd_health)

    demo = commands.add_parser(
        "demo",
        help="the main job end to end: workload, relay, consumers, queries, rebuild, verify, status",
        description="Migrate the store, start the relay and a consumer per projection (threads of this "
        "process, with a metrics endpoint), drive a workload of customers, products and orders through "
        "the command handlers (concurrent writers whose conflicts retry, invalid commands refused), "
        "wait until the read models caught up, check the PostgreSQL and Redis read models against the "
        "write side, rebuild order_views blue/green and verify both read models against a fresh replay, "
        "print the status and stop what it started. Exit 1 with the reason when anything does not match. "
        "Without --namespace it uses the configured store and the projections' real names, and leaves the "
        "data for you to explore; with one, everything is named after it and removed at the end.",
        epilog="example: datalayer demo\n"
        "         datalayer demo --orders 40 --namespace demo_ci   # isolated, cleaned up afterwards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--orders", type=positive_int, default=300, help="orders to place (default 300)")
    demo.add_argument("--writers", type=positive_int, default=4, help="concurrent writer threads (default 4)")
    demo.add_argument(
        "--namespace",
        type=_namespace,
        metavar="NAME",
        help="isolate the run: store schema, topics and read models named after NAME, dropped afterwards",
    )
    demo.add_argument("--keep", action="store_true", help="with --namespace: keep what the run created")
    demo.add_argument(
        "--timeout", type=_non_negative, default=120.0, metavar="S", help="for each wait (default 120)"
    )
    demo.set_defaults(handler=cmd_demo)


def _namespace(value: str) -> str:
    import re

    if not re.fullmatch(r"[a-z][a-z0-9_]{0,23}", value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: use 1-24 lower-case letters, digits and _, starting with a letter"
        )
    return value
