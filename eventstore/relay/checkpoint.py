"""The relay's checkpoint and lag, kept in the store's schema."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from eventstore.horizon import Horizon, read_horizon
from eventstore.records import LOG_START, LogPosition


@dataclass(frozen=True)
class RelayCheckpoint:
    """Everything up to ``position`` is acknowledged by Kafka; ``published`` counts sends, duplicates too."""

    position: LogPosition
    published: int
    updated_at: datetime | None


def load_checkpoint(conn: psycopg.Connection[Any], schema: str, relay: str) -> RelayCheckpoint:
    row = conn.execute(
        sql.SQL(
            "SELECT transaction_id::text::int8, position, published, updated_at FROM {} WHERE relay_name = %s"
        ).format(sql.Identifier(schema, "relay_checkpoints")),
        (relay,),
    ).fetchone()
    if row is None:
        return RelayCheckpoint(LOG_START, 0, None)
    return RelayCheckpoint(LogPosition(int(row[0]), int(row[1])), int(row[2]), row[3])


def save_checkpoint(
    conn: psycopg.Connection[Any], schema: str, relay: str, position: LogPosition, published: int
) -> None:
    """Move the checkpoint forward (never back: a stale relay cannot rewind a newer one's progress).

    Committed without waiting for the WAL flush: a checkpoint lost to a server crash only makes the
    relay publish a little again (at least once), and the relay does not stall on every disk flush.
    The transaction's statements go in one pipeline: one round trip instead of four, which a
    caught-up relay pays on every batch.
    """
    table = sql.Identifier(schema, "relay_checkpoints")
    with conn.pipeline(), conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = off")
        _advance(conn, table, relay, position, published)


def _advance(
    conn: psycopg.Connection[Any], table: sql.Identifier, relay: str, position: LogPosition, published: int
) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {t} AS c (relay_name, transaction_id, position, published)"
            " VALUES (%s, %s::text::xid8, %s, %s)"
            " ON CONFLICT (relay_name) DO UPDATE SET transaction_id = excluded.transaction_id,"
            " position = excluded.position, published = c.published + excluded.published, updated_at = now()"
            " WHERE (c.transaction_id, c.position) < (excluded.transaction_id, excluded.position)"
        ).format(t=table),
        (relay, str(position.transaction_id), position.position, published),
    )


@dataclass(frozen=True)
class RelayLag:
    """How far the relay is behind what readers may see, and what holds readers back."""

    checkpoint: LogPosition
    events: int
    seconds: float
    published: int
    horizon: Horizon

    def as_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "lag_events": self.events,
            "lag_seconds": round(self.seconds, 3),
            "published": self.published,
            "horizon": {
                "transaction_id": self.horizon.transaction_id,
                "stalled": self.horizon.stalled,
                "held_back_events": self.horizon.held_back_events,
                "unreachable_events": self.horizon.unreachable_events,
                "blocking_pid": self.horizon.blocking_pid,
                "blocking_seconds": round(self.horizon.blocking_seconds, 3),
                "blocking_query": self.horizon.blocking_query,
            },
        }


def read_lag(conn: psycopg.Connection[Any], schema: str, relay: str) -> RelayLag:
    """Readable events after the checkpoint, and the age of the oldest of them."""
    checkpoint = load_checkpoint(conn, schema, relay)
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), min(recorded_at) FROM {}"
            " WHERE (transaction_id, position) > (%s::text::xid8, %s)"
            " AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())"
        ).format(sql.Identifier(schema, "events")),
        (str(checkpoint.position.transaction_id), checkpoint.position.position),
    ).fetchone()
    assert row is not None
    oldest: datetime | None = row[1]
    seconds = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0
    return RelayLag(
        checkpoint.position, int(row[0]), max(seconds, 0.0), checkpoint.published, read_horizon(conn, schema)
    )
