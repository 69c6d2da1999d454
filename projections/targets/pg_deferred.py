"""The end of a PostgreSQL batch's transaction sent without waiting for it: how its commit is deferred.

Why: a live consumer's batch of 2,000 order events spends ~10 µs per event waiting for PostgreSQL
to merge the staged rows into the read model's tables (their indexes most of all) and to flush the
commit to the WAL. Sent in psycopg's pipeline mode and read back later, that time overlaps with
what the consumer does meanwhile: polling and parsing the next batch's records (see
``ConsumerConfig.defer_commits``).

:class:`SentPipeline` sends a batch's stream versions and checkpoints, the flush's upserts (small
groups' rows as array parameters, see :class:`PipelinedStatement`; big groups' merges from staging
tables, whose rows travel by ``COPY``, which a pipeline cannot carry) and ``COMMIT``. The flush runs
what it must before a statement it cannot send this way. Values are never formatted into SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, suppress
from typing import Any

import psycopg
from sqlalchemy import Connection, Executable
from sqlalchemy.exc import DBAPIError


def render(conn: Connection, statement: Executable, schema: str) -> str:
    """``statement`` as SQL text for ``conn``'s dialect, in ``schema``; it must have no parameter
    but constants of its own (such as ``coalesce(col, 0)``), which are rendered inline."""
    compiled = statement.compile(  # type: ignore[attr-defined]  # every Executable here is a ClauseElement
        dialect=conn.dialect,
        schema_translate_map={None: schema},
        render_schema_translate=True,
        compile_kwargs={"literal_binds": True},
    )
    return str(compiled)


# A statement for a pipeline: SQL text with ``%(name)s`` placeholders, and its parameters (or None).
Statement = tuple[str, Mapping[str, Any] | None]


class PipelinedStatement:
    """A SQLAlchemy statement with parameters, rendered once to be sent in a pipeline.

    Why: a live consumer's small batch flushes its rows as array parameters, and executed through
    SQLAlchemy each such statement waited for its round trip before the next one went out. Rendered
    here, it goes with the batch's versions and ``COMMIT`` instead. :meth:`bind` turns values into
    what psycopg takes as SQLAlchemy would, through each parameter type's bind processor, and adds
    the constants the statement binds itself (such as the 0 of ``coalesce(col, 0)``).
    """

    __slots__ = ("_compiled", "_processors", "_results", "sql")

    def __init__(self, conn: Connection, statement: Executable, schema: str) -> None:
        dialect = conn.dialect
        compiled = statement.compile(  # type: ignore[attr-defined]  # every Executable here is a ClauseElement
            dialect=dialect, schema_translate_map={None: schema}, render_schema_translate=True
        )
        self._compiled = compiled
        self.sql: str = str(compiled)
        processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                processors[name] = process
        self._processors = processors
        self._results: list[Callable[[Any], Any] | None] | None = None  # set by the first rows()

    def bind(self, values: Mapping[str, Any]) -> Statement:
        """The statement with ``values`` bound, ready for :class:`SentPipeline`."""
        params: dict[str, Any] = self._compiled.construct_params(values)
        for name, process in self._processors.items():
            params[name] = process(params[name])
        return self.sql, params

    def rows(self, cursor: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
        """The rows of this statement (a SELECT) that ``cursor`` holds, each column's values through
        its type's result processor, as SQLAlchemy would hand them out."""
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        processors = self._results
        if processors is None:
            # The processors may depend on the type PostgreSQL sent (numeric as Decimal or float):
            # known from the first result.
            dialect = self._compiled.dialect
            columns = self._compiled.statement.selected_columns
            processors = self._results = [
                column.type.dialect_impl(dialect).result_processor(dialect, described.type_code)
                for column, described in zip(columns, cursor.description or (), strict=True)
            ]
        if not any(processors):
            return rows
        return [
            tuple(
                value if process is None else process(value)
                for process, value in zip(processors, row, strict=True)
            )
            for row in rows
        ]


def fetch_pipelined(
    conn: Connection, statements: Sequence[tuple[PipelinedStatement, Mapping[str, Any]]]
) -> list[list[tuple[Any, ...]]]:
    """Run SELECT ``statements`` in one round trip (pipeline mode) and return each one's rows.

    Why: a batch reads its streams' versions and the rows it prefetches before its handlers run;
    one after the other they cost a round trip each, which a live consumer's small batches pay in
    latency on a busy machine.
    """
    driver = _driver(conn)
    cursors = []
    try:
        with driver.pipeline():
            for statement, values in statements:
                cursor = driver.cursor()
                cursor.execute(*statement.bind(values))
                cursors.append(cursor)
        return [statement.rows(cursor) for (statement, _), cursor in zip(statements, cursors, strict=True)]
    except psycopg.Error as exc:
        raise _wrapped(exc) from exc
    finally:
        for cursor in cursors:
            cursor.close()


class SentPipeline:
    """Statements sent on a connection in pipeline mode, their outcome read by :meth:`wait`.

    PostgreSQL runs them as they arrive; the connection stays in pipeline mode, unusable for
    anything else, until :meth:`wait` has read every result.
    """

    __slots__ = ("_stack",)

    def __init__(self, conn: Connection, statements: Sequence[Statement]) -> None:
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


def run_now(conn: Connection, statements: list[Statement]) -> None:
    """Send ``statements`` (if any) and wait for them; the list is emptied."""
    if statements:
        sent = SentPipeline(conn, statements)
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
