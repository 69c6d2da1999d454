"""The end of a PostgreSQL batch's transaction sent without waiting for it: how its commit is deferred.

Why: a live consumer's batch of 2,000 order events spends ~10 µs per event waiting for PostgreSQL
to merge the staged rows into the read model's tables (their indexes most of all) and to flush the
commit to the WAL. Sent as one simple query (``INSERT ...; INSERT ...; COMMIT``) and read back
later, that time overlaps with what the consumer does meanwhile: polling and parsing the next
batch's records (see ``ConsumerConfig.defer_commits``).

Only statements without parameters qualify: the simple query protocol carries none, and values are
never formatted into SQL. The flush's merges from the staging tables are such statements (the rows
travel by ``COPY``, see ``sql_staging``); everything else in a batch runs as before, and waits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import errors, generators, pq
from sqlalchemy import Connection, Executable
from sqlalchemy.exc import DBAPIError

_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR


def render(conn: Connection, statement: Executable, schema: str) -> str:
    """``statement`` as SQL text for ``conn``'s dialect, in ``schema``; it must have no parameter
    but constants of the statement itself (such as ``coalesce(col, 0)``), which it renders inline."""
    compiled = statement.compile(  # type: ignore[attr-defined]  # every Executable here is a ClauseElement
        dialect=conn.dialect,
        schema_translate_map={None: schema},
        render_schema_translate=True,
        compile_kwargs={"literal_binds": True},
    )
    return str(compiled)


class SentQuery:
    """Statements sent on a connection as one simple query, their outcome read by :meth:`wait`.

    Until then the connection must not be used for anything else: libpq refuses a second query.
    """

    __slots__ = ("_driver",)

    def __init__(self, conn: Connection, statements: Sequence[str]) -> None:
        driver = conn.connection.driver_connection
        if not isinstance(driver, psycopg.Connection):
            raise TypeError("deferred statements need a psycopg 3 connection")
        self._driver: psycopg.Connection[Any] = driver
        pgconn = driver.pgconn
        try:
            pgconn.send_query(";\n".join(statements).encode(driver.info.encoding))
            driver.wait(generators.send(pgconn))
        except psycopg.Error as exc:
            raise _wrapped(exc) from exc

    def wait(self) -> None:
        """Wait for every statement's result; raise the first one's error as SQLAlchemy would.

        PostgreSQL skips the statements after a failed one, and the transaction is then aborted: the
        caller rolls it back.
        """
        driver = self._driver
        try:
            results = driver.wait(generators.fetch_many(driver.pgconn))
            for result in results:
                if result.status == _FATAL_ERROR:
                    raise errors.error_from_result(result, encoding=driver.info.encoding)
        except psycopg.Error as exc:
            raise _wrapped(exc) from exc


def run_now(conn: Connection, statements: list[str]) -> None:
    """Send ``statements`` (if any) and wait for them; the list is emptied."""
    if statements:
        sent = SentQuery(conn, statements)
        statements.clear()
        sent.wait()


def _wrapped(exc: psycopg.Error) -> DBAPIError:
    """``exc`` as the SQLAlchemy error a statement executed through the engine would have raised."""
    wrapped = DBAPIError.instance(None, None, exc, psycopg.Error)
    assert isinstance(wrapped, DBAPIError)
    return wrapped
