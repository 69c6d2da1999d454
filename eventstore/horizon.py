"""The read horizon: how far commit-ordered readers may go, and what holds them back.

Readers stop at the oldest transaction still running anywhere in the database. A transaction
left open (a stuck batch job, an idle-in-transaction session) stalls them; this module names it
instead of letting readers skip past it. It also finds events no reader can see at all yet: ones
whose transaction ids this cluster has not reached, as a ``pg_dump`` restored from another
cluster leaves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql


@dataclass(frozen=True)
class Horizon:
    """Readers see transactions below ``transaction_id``; ``held_back_events`` are committed but not yet.

    ``unreachable_events`` carry transaction ids beyond this cluster's counter (restored from
    another cluster): hidden from every reader until the counter passes them, which may be never.
    """

    transaction_id: int
    held_back_events: int
    unreachable_events: int
    blocking_pid: int | None
    blocking_seconds: float
    blocking_state: str | None
    blocking_query: str | None

    @property
    def stalled(self) -> bool:
        """True when committed events wait behind an open transaction."""
        return self.held_back_events > 0


def read_horizon(conn: psycopg.Connection[Any], schema: str) -> Horizon:
    query = sql.SQL(
        """
        WITH h AS (
            SELECT pg_snapshot_xmin(s) AS xmin, pg_snapshot_xmax(s) AS xmax FROM pg_current_snapshot() s
        ),
        blocker AS (
            SELECT pid, extract(epoch FROM clock_timestamp() - xact_start) AS seconds, state,
                   left(query, 200) AS query
              FROM pg_stat_activity
             WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
             ORDER BY age(backend_xid) DESC
             LIMIT 1
        )
        SELECT h.xmin::text::int8,
               (SELECT count(*) FROM {events} e
                 WHERE e.transaction_id >= h.xmin AND e.transaction_id < h.xmax),
               b.pid, coalesce(b.seconds, 0), b.state, b.query,
               -- No transaction of this cluster that a snapshot can see has an id >= xmax: a
               -- visible row with one was written elsewhere.
               (SELECT count(*) FROM {events} e WHERE e.transaction_id >= h.xmax)
          FROM h LEFT JOIN blocker b ON true
        """
    ).format(events=sql.Identifier(schema, "events"))
    row = conn.execute(query).fetchone()
    assert row is not None
    held_back = int(row[1])
    return Horizon(
        transaction_id=int(row[0]),
        held_back_events=held_back,
        unreachable_events=int(row[6]),
        blocking_pid=int(row[2]) if row[2] is not None and held_back else None,
        blocking_seconds=float(row[3]) if held_back else 0.0,
        blocking_state=row[4] if held_back else None,
        blocking_query=row[5] if held_back else None,
    )
