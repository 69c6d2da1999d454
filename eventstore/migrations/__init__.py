"""Versioned schema migrations of the event store, applied in order and recorded once each.

A migration is a module ``vNNNN_name.py`` in this package with a list ``STATEMENTS`` of SQL
templates (``{schema}`` is the only placeholder, filled with a quoted identifier). Applying is
idempotent and safe to run from several processes at once (an advisory lock serialises them);
an applied migration whose text has since changed is refused rather than silently skipped.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from eventstore.errors import MigrationError


@dataclass(frozen=True)
class Migration:
    """One versioned step of the schema."""

    version: int
    name: str
    statements: tuple[str, ...]

    @property
    def checksum(self) -> str:
        return hashlib.sha256("\n;\n".join(self.statements).encode()).hexdigest()


def available_migrations() -> list[Migration]:
    """Every migration shipped in this package, in version order."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("v"):
            continue
        number, _, name = info.name[1:].partition("_")
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.append(Migration(int(number), name, tuple(module.STATEMENTS)))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must run 1..N without gaps: {[m.version for m in found]}")
    return found


def migrate(conn: psycopg.Connection[Any], schema: str) -> list[Migration]:
    """Bring ``schema`` to the newest version; returns the migrations applied now (maybe none).

    A schema already at the newest version is only read, so any role that may read
    ``schema_migrations`` can call this at start-up. When the store's group roles exist (see
    :mod:`eventstore.privileges`), migrations run as ``<schema>_owner`` and each role's privileges
    are granted again afterwards, covering what the migrations added.
    """
    from eventstore.privileges import acting_owner, grant_store_privileges

    ident = sql.Identifier(schema)
    applied_now: list[Migration] = []
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"datalayer.migrate.{schema}",)
        )
        shipped = available_migrations()
        recorded = _recorded(conn, schema)
        pending = _pending(schema, shipped, recorded or {})
        if recorded is not None and not pending:
            return []
        owner = acting_owner(conn, schema)
        if owner is not None:
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner)))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(ident)
        )
        for migration in pending:
            for statement in migration.statements:
                conn.execute(sql.SQL(statement).format(schema=ident))
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)"
                ).format(ident),
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration)
        if owner is not None:
            grant_store_privileges(conn, schema)
    return applied_now


def _recorded(conn: psycopg.Connection[Any], schema: str) -> dict[int, tuple[str, str]] | None:
    """Applied migrations by version (name, checksum); None when the schema has no record yet."""
    exists = conn.execute("SELECT to_regclass(quote_ident(%s) || '.schema_migrations')", (schema,)).fetchone()
    if exists is None or exists[0] is None:
        return None
    rows = conn.execute(
        sql.SQL("SELECT version, name, checksum FROM {}.schema_migrations").format(sql.Identifier(schema))
    ).fetchall()
    return {int(r[0]): (str(r[1]), str(r[2])) for r in rows}


def _pending(schema: str, shipped: list[Migration], recorded: dict[int, tuple[str, str]]) -> list[Migration]:
    """The shipped migrations not applied yet, after checking the applied ones are unchanged."""
    newest = shipped[-1].version if shipped else 0
    if recorded and max(recorded) > newest:
        raise MigrationError(
            f"schema {schema} is at version {max(recorded)}, newer than this code ({newest})"
        )
    pending = []
    for migration in shipped:
        if migration.version not in recorded:
            pending.append(migration)
            continue
        name, checksum = recorded[migration.version]
        if checksum != migration.checksum:
            raise MigrationError(
                f"migration {migration.version} ({name}) was applied to schema {schema} with "
                "different text; applied migrations must never be edited, add a new one"
            )
    return pending


def current_version(conn: psycopg.Connection[Any], schema: str) -> int:
    """The newest migration applied to ``schema``, 0 when none is."""
    exists = conn.execute("SELECT to_regclass(quote_ident(%s) || '.schema_migrations')", (schema,)).fetchone()
    if exists is None or exists[0] is None:
        return 0
    row = conn.execute(
        sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_migrations").format(sql.Identifier(schema))
    ).fetchone()
    return int(row[0]) if row else 0
