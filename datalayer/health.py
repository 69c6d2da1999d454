"""Health checks for probes: each server answers, and the pipeline keeps up within thresholds.

A check is a name, a verdict and one line saying why. :func:`check_health` runs those of a scope
(``servers``, ``relay``, ``consumers`` or ``all``) and never raises: an unreachable server is a
failed check naming the address and the error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datalayer.settings import Settings
from datalayer.status import (
    KAFKA_TIMEOUTS,
    PG_CONNECT_TIMEOUT,
    StatusReport,
    gather_status,
    one_line,
    unreachable_message,
)
from projections.projection import Projection

SCOPES = ("all", "servers", "relay", "consumers")


@dataclass(frozen=True)
class Thresholds:
    """How far behind the pipeline may be and still count as healthy."""

    relay_lag_seconds: float = 30.0
    consumer_lag_seconds: float = 60.0
    horizon_stall_seconds: float = 60.0


@dataclass(frozen=True)
class Check:
    """One verdict: ``name`` (``postgresql``, ``relay``, ``projection order_views``...), ok, why."""

    name: str
    ok: bool
    detail: str


def check_health(
    settings: Settings,
    projections: Sequence[Projection[Any]],
    scope: str = "all",
    thresholds: Thresholds | None = None,
    relay_name: str = "default",
) -> list[Check]:
    """The checks of ``scope``: the servers it needs, then its part of the pipeline."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    limits = thresholds or Thresholds()
    needs_redis = scope in ("all", "servers", "consumers")
    checks = [_postgres(settings), _kafka(settings)]
    if needs_redis:
        checks.append(_redis(settings))
    if scope == "servers" or not all(c.ok for c in checks):
        return checks
    wanted = list(projections) if scope in ("all", "consumers") else []
    report = gather_status(settings, wanted, relay_name)
    for server, error in report.errors.items():
        checks.append(Check(f"status ({server})", False, error))
    if scope in ("all", "relay"):
        checks += _relay_checks(report, limits)
    if scope in ("all", "consumers"):
        checks += _consumer_checks(report, limits)
    return checks


def _timed(name: str, where: str, probe: Any) -> Check:
    started = time.monotonic()
    try:
        probe()
    except Exception as exc:
        return Check(name, False, f"{where}: {one_line(exc)}")
    return Check(name, True, f"{where} answered in {(time.monotonic() - started) * 1000:.0f} ms")


def _postgres(settings: Settings) -> Check:
    from urllib.parse import urlsplit

    from datalayer.clients import postgres_connection

    url = urlsplit(settings.psycopg_url())

    def probe() -> None:
        with postgres_connection(settings, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT) as conn:
            conn.execute("SELECT 1")

    return _timed("postgresql", f"{url.hostname}:{url.port or 5432}", probe)


def _redis(settings: Settings) -> Check:
    from urllib.parse import urlsplit

    from datalayer.clients import redis_client

    url = urlsplit(settings.redis_url)

    def probe() -> None:
        client = redis_client(settings, socket_connect_timeout=3, socket_timeout=3)
        try:
            client.ping()
        finally:
            client.close()

    return _timed("redis", f"{url.hostname}:{url.port or 6379}", probe)


def _kafka(settings: Settings) -> Check:
    from kafka import KafkaAdminClient

    from datalayer.clients import check_kafka_tls

    def probe() -> None:
        # Over SSL, an untrusted broker is named as such at once (kafka-python only times out).
        check_kafka_tls(settings)
        admin = KafkaAdminClient(**settings.kafka_config(), **KAFKA_TIMEOUTS)
        try:
            admin.describe_cluster()
        finally:
            admin.close()

    return _timed("kafka", settings.kafka_bootstrap, probe)


def _relay_checks(report: StatusReport, limits: Thresholds) -> list[Check]:
    checks: list[Check] = []
    store, relay = report.store, report.relay
    if store is not None:
        if store.unreachable_events:
            checks.append(Check("read horizon", False, unreachable_message(store.unreachable_events)))
        elif store.horizon_stalled and store.blocking_seconds > limits.horizon_stall_seconds:
            checks.append(
                Check(
                    "read horizon",
                    False,
                    f"{store.held_back_events} committed events held back for {store.blocking_seconds:.0f} s "
                    f"(max {limits.horizon_stall_seconds:.0f}) by backend {store.blocking_pid}: "
                    f"{store.blocking_query or '?'}",
                )
            )
        elif store.horizon_stalled:
            checks.append(
                Check(
                    "read horizon",
                    True,
                    f"{store.held_back_events} events wait {store.blocking_seconds:.1f} s behind backend "
                    f"{store.blocking_pid} (max {limits.horizon_stall_seconds:.0f} s)",
                )
            )
        else:
            checks.append(Check("read horizon", True, "no committed event is held back"))
    if relay is not None:
        who = f"active in backend {relay.active_pid}" if relay.active_pid else "no relay holds the lock"
        ok = relay.lag_seconds <= limits.relay_lag_seconds
        checks.append(
            Check(
                f"relay {relay.name}",
                ok,
                f"lag {relay.lag_events} events, {relay.lag_seconds:.1f} s "
                f"(max {limits.relay_lag_seconds:.0f} s); {who}",
            )
        )
    return checks


def _consumer_checks(report: StatusReport, limits: Thresholds) -> list[Check]:
    checks: list[Check] = []
    for projection in report.projections:
        name = f"projection {projection.name}"
        if projection.error is not None:
            checks.append(Check(name, False, projection.error))
            continue
        active = projection.active
        if active is None:
            checks.append(Check(name, False, "no active generation (start `datalayer consume` or rebuild)"))
            continue
        if active.error is not None:
            checks.append(Check(name, False, f"{active.name}: {active.error}"))
            continue
        past_end = active.past_end
        if past_end:
            first = past_end[0]
            checks.append(
                Check(
                    name,
                    False,
                    f"{active.name}: stored offsets past the end of {len(past_end)} partition(s), "
                    f"e.g. {first.source} at {first.applied:,} of {first.end:,}: the topic was created "
                    f"again since this read model consumed it; (re)start its consumer, which reads "
                    f"the new topic from its beginning, or rebuild it (datalayer rebuild {projection.name})",
                )
            )
            continue
        if active.recreated:
            checks.append(
                Check(
                    name,
                    False,
                    f"{active.name}: {', '.join(active.recreated)} created again since this read model "
                    f"stored its offsets; restart its consumer, which reads the new topic from its beginning",
                )
            )
            continue
        seconds = active.lag_seconds
        ok = seconds is not None and seconds <= limits.consumer_lag_seconds
        assigned = active.group_assigned
        held = ""
        if active.group_members and assigned is not None and assigned < len(active.partitions):
            # Shown, not failed: a rebalance passes through this; lag that grows is the failure.
            held = f" holding {assigned} of {len(active.partitions)} partitions"
        shown = f"{seconds:.1f} s" if seconds is not None else "unknown age"
        members = active.group_members if active.group_members is not None else "?"
        checks.append(
            Check(
                name,
                ok,
                f"{active.name}: lag {active.lag_events} events, {shown} "
                f"(max {limits.consumer_lag_seconds:.0f} s); {members} consumer(s){held}; "
                f"{projection.dead_letters or 0} dead letters",
            )
        )
    return checks
