"""The end of a PostgreSQL batch's transaction sent without waiting for it: how its commit is deferred.

Why: a live consumer's batch of 2,000 order events spends ~10 µs per event waiting for PostgreSQL
to merge the staged rows into the read model's tables (their indexes most of all) and to flush the
commit to the WAL. Sent as one simple query (``INSERT ...; INSERT ...; COMMIT``) and read back
later, that time overlaps with what the consumer does meanwhile: polling and parsing the next
batch's records (see ``ConsumerConfig.defer_commits``).

:class:`SentPipeline` sends a batch's stream versions and checkpoints, the flush's merges from the
staging tables (the rows travel by ``COPY``, see ``sql_staging``, which a pipeline cannot carry)
and ``COMMIT`` in psycopg's pipeline mode; :class:`SentQuery` sends statements without parameters
as one simple query (the flush runs those it must before a statement with parameters). Values are
never formatted into SQL either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack, suppress
from typing import Any

import psycopg
from psycopg import errors, generators, pq
from sqlalchemy import Connection, Executable
from sqlalchemy.exc import DBAPIError

_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR


def render(conn: Connection, statement: Executable, schema: str, *, literal: bool = True) -> str:
    """``statement`` as SQL text for ``conn``'s dialect, in ``schema``.

    ``literal``: the statement must have no parameter but constants of its own (such as
    ``coalesce(col, 0)``), which are rendered inline; otherwise parameters stay placeholders
    (``%(name)s``), for psycopg to bind.
    """
    compiled = statement.compile(  # type: ignore[attr-defined]  # every Executable here is a ClauseElement
        dialect=conn.dialect,
        schema_translate_map={None: schema},
        render_schema_translate=True,
        compile_kwargs={"literal_binds": literal},
    )
    return str(compiled)


class SentPipeline:
    """Statements sent on a connection in pipeline mode, their outcome read by :meth:`wait`.

    PostgreSQL runs them as they arrive; the connection stays in pipeline mode, unusable for
    anything else, until :meth:`wait` has read every result.
    """

    __slots__ = ("_stack",)

    def __init__(self, conn: Connection, statements: Sequence[tuple[str, Mapping[str, Any] | None]]) -> None:
        driver = _driver(conn)
        self._stack = stack = ExitStack()
        try:
            stack.enter_context(driver.pipeline())
            cursor = driver.cursor()
            for sql, params in statements:
                cursor.execute(sql, params)  # sent; its result is read when the pipeline ends
        except psycopg.Error as exc:
            # An error came back while sending: leave the pipeline, the rest of its results read.
            with suppress(psycopg.Error):
                stack.close()
            raise _wrapped(exc) from exc

    def wait(self) -> None:
        """End the pipeline: wait for every result, and raise the first error as SQLAlchemy would.

        PostgreSQL skips the statements after a failed one, and the transaction is then aborted:
        the caller rolls it back.
        """
        try:
            self._stack.close()
        except psycopg.Error as exc:
            raise _wrapped(exc) from exc


class SentQuery:
    """Statements sent on a connection as one simple query, their outcome read by :meth:`wait`.

    Until then the connection must not be used for anything else: libpq refuses a second query.
    """

    __slots__ = ("_driver",)

    def __init__(self, conn: Connection, statements: Sequence[str]) -> None:
        self._driver = driver = _driver(conn)
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


def _driver(conn: Connection) -> psycopg.Connection[Any]:
    driver = conn.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise TypeError("deferred statements need a psycopg 3 connection")
    return driver


def _wrapped(exc: psycopg.Error) -> DBAPIError:
    """``exc`` as the SQLAlchemy error a statement executed through the engine would have raised."""
    wrapped = DBAPIError.instance(None, None, exc, psycopg.Error)
    assert isinstance(wrapped, DBAPIError)
    return wrapped
