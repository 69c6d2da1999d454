"""Verification: rebuild a projection into a shadow copy and diff it with the live read model.

This is the data-quality check. A read model that drifted from the log (a row edited by hand, a
key deleted, a bug fixed since) is found and named. The two copies are compared only once the live
one has applied exactly the stream versions the shadow replayed. While writers are busy that may
take a few rounds; if it never happens within the timeout, the check says so instead of reporting
differences that are only lag.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import column, select
from sqlalchemy import table as table_clause

from eventstore.store import EventStore
from projections.projection import Projection
from projections.replay import replay
from projections.target import ProjectionTarget
from projections.targets.postgres import PostgresTarget
from projections.targets.redis import RedisTarget


@dataclass(frozen=True, slots=True)
class Difference:
    """One row or key that differs: ``missing`` from the live copy, ``extra`` in it, or ``different``."""

    kind: str
    where: str  # table name, or "redis"
    key: str
    live: Any
    expected: Any


@dataclass
class VerifyReport:
    """The outcome of a verification: what was compared and every difference found."""

    live: str
    compared: int
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def counts(self) -> dict[str, int]:
        counts = {"missing": 0, "extra": 0, "different": 0}
        for d in self.differences:
            counts[d.kind] += 1
        return counts


class NotSettled(Exception):
    """The live read model never stood at the shadow's stream versions within the timeout."""


def verify(
    projection: Projection[Any],
    live: ProjectionTarget[Any],
    shadow: ProjectionTarget[Any],
    store: EventStore,
    *,
    settle_timeout: float = 30.0,
) -> VerifyReport:
    """Replay ``store`` into ``shadow`` (which must start empty) and diff it against ``live``."""
    shadow.setup()
    deadline = time.monotonic() + settle_timeout
    while True:
        replay(projection, shadow, store)
        expected_versions = stream_versions(shadow)
        if stream_versions(live) == expected_versions:
            break
        if time.monotonic() > deadline:
            raise NotSettled(
                "the live read model did not settle at the log's stream versions within "
                f"{settle_timeout:g} s (writers or consumers busy, or a consumer down); "
                "try again, or with a longer --timeout"
            )
        time.sleep(0.2)  # let the live consumers apply what the shadow has already read
    live_rows, expected_rows = contents(live), contents(shadow)
    report = VerifyReport(live=_name(live), compared=sum(len(rows) for rows in expected_rows.values()))
    for where in sorted(set(live_rows) | set(expected_rows)):
        report.differences.extend(_diff(where, live_rows.get(where, {}), expected_rows.get(where, {})))
    return report


def _diff(where: str, live: dict[str, Any], expected: dict[str, Any]) -> Iterator[Difference]:
    for key in sorted(set(live) | set(expected)):
        if key not in live:
            yield Difference("missing", where, key, None, expected[key])
        elif key not in expected:
            yield Difference("extra", where, key, live[key], None)
        elif live[key] != expected[key]:
            yield Difference("different", where, key, live[key], expected[key])


def stream_versions(target: ProjectionTarget[Any]) -> dict[str, int]:
    """Every stream's last applied version in ``target``."""
    if isinstance(target, PostgresTarget):
        table = _bookkeeping_versions(target.schema)
        with target.engine.connect() as conn:
            return {str(s): int(v) for s, v in conn.execute(select(table.c.stream_id, table.c.version))}
    if isinstance(target, RedisTarget):
        raw = target.client.hgetall(target.key("meta:versions"))
        return {_text(k): int(v) for k, v in raw.items()}
    raise TypeError(f"cannot read the versions of a {type(target).__name__}")


def contents(target: ProjectionTarget[Any]) -> dict[str, dict[str, Any]]:
    """The read model's data by table (rows by primary key) or, for Redis, by relative key."""
    if isinstance(target, PostgresTarget):
        found: dict[str, dict[str, Any]] = {}
        with target.engine.connect() as conn:
            conn.execution_options(schema_translate_map={None: target.schema})
            for table in target.projection.metadata.sorted_tables:
                pk = list(table.primary_key.columns)
                rows = conn.execute(select(table)).mappings()
                found[table.name] = {"/".join(str(row[c.name]) for c in pk): dict(row) for row in rows}
        return found
    if isinstance(target, RedisTarget):
        return {"redis": _redis_contents(target.client, target.prefix)}
    raise TypeError(f"cannot read the contents of a {type(target).__name__}")


def _redis_contents(client: redis.Redis, prefix: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    for raw_key in client.scan_iter(match=pattern, count=1000):
        key = _text(raw_key)[len(prefix) :]
        if key.startswith("meta:"):
            continue
        kind = _text(client.type(raw_key))
        if kind == "hash":
            found[key] = {_text(f): _text(v) for f, v in client.hgetall(raw_key).items()}
        elif kind == "zset":
            members: list[tuple[bytes, float]] = client.zrange(raw_key, 0, -1, withscores=True)  # type: ignore[assignment]
            found[key] = [(_text(m), s) for m, s in members]
        else:
            found[key] = client.get(raw_key)
    return found


def _bookkeeping_versions(schema: str) -> Any:
    # The target's own table, named as PostgresTarget creates it; read-only here.
    return table_clause("projection_stream_versions", column("stream_id"), column("version"), schema=schema)


def _name(target: ProjectionTarget[Any]) -> str:
    if isinstance(target, PostgresTarget):
        return f"schema {target.schema}"
    if isinstance(target, RedisTarget):
        return f"prefix {target.prefix}"
    return type(target).__name__


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
