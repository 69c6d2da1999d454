"""Least privilege in PostgreSQL: group roles for one event store schema, and a superuser warning.

For a store in schema ``s`` there are four ``NOLOGIN`` group roles; login users are made members of
the one their process needs (``GRANT s_app TO orders_api``):

``s_owner``
    owns the schema and every object in it; migrations run as this role (the migrating login must
    be a member). Also holds CREATE on the database, which ``CREATE SCHEMA IF NOT EXISTS`` checks.
``s_app``
    command handlers: SELECT and INSERT on ``events``, ``snapshots`` and ``data_keys`` (a new
    subject's key), SELECT on ``schema_migrations``. No UPDATE, DELETE or TRUNCATE: the database
    refuses them before the append-only trigger would, and destroying a data key (``forget``) or
    re-wrapping it (``keys rotate-master``) is the owner's job.
``s_relay``
    the relay: SELECT on ``events`` and ``schema_migrations``; SELECT, INSERT, UPDATE on
    ``relay_checkpoints``.
``s_reader``
    read-only queries: SELECT on every table of the schema.

Roles are cluster-wide while migrations are per schema, and creating a role needs CREATEROLE,
which a migrating login usually lacks; so roles are not a migration but an explicit, idempotent
step (:func:`create_store_roles`, ``datalayer db roles``). Once the roles exist, :func:`migrate`
runs as the owner and grants each role its privileges on what a migration added.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger("datalayer.security")

# What each role may do, per table of the store's schema (tables not named: nothing).
_TABLE_PRIVILEGES: dict[str, dict[str, tuple[str, ...]]] = {
    "app": {
        "events": ("SELECT", "INSERT"),
        "snapshots": ("SELECT", "INSERT"),
        "data_keys": ("SELECT", "INSERT"),
        "schema_migrations": ("SELECT",),
    },
    "relay": {
        "events": ("SELECT",),
        "schema_migrations": ("SELECT",),
        "relay_checkpoints": ("SELECT", "INSERT", "UPDATE"),
    },
}


@dataclass(frozen=True)
class StoreRoles:
    """The group roles of the event store in ``schema``."""

    schema: str

    @property
    def owner(self) -> str:
        return f"{self.schema}_owner"

    @property
    def app(self) -> str:
        return f"{self.schema}_app"

    @property
    def relay(self) -> str:
        return f"{self.schema}_relay"

    @property
    def reader(self) -> str:
        return f"{self.schema}_reader"

    def all(self) -> tuple[str, str, str, str]:
        return (self.owner, self.app, self.relay, self.reader)


def store_roles(schema: str) -> StoreRoles:
    from eventstore.store import validate_schema_name

    return StoreRoles(validate_schema_name(schema))


def existing_roles(conn: psycopg.Connection[Any], names: tuple[str, ...]) -> set[str]:
    rows = conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(names),)).fetchall()
    return {str(r[0]) for r in rows}


def acting_owner(conn: psycopg.Connection[Any], schema: str) -> str | None:
    """The owner role migrations of ``schema`` should run as: it exists and the user may SET ROLE to it."""
    row = conn.execute(
        "SELECT rolname FROM pg_roles WHERE rolname = %s AND pg_has_role(current_user, oid, 'MEMBER')",
        (store_roles(schema).owner,),
    ).fetchone()
    return str(row[0]) if row else None


def create_store_roles(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    """Create the missing roles of ``schema``'s store, hand the schema to its owner role and grant.

    Idempotent. Needs CREATEROLE (to create a role, and to join the owner role), ownership of the
    database (to grant the owner CREATE on it) and of the schema's objects; or a superuser. The
    current user becomes a member of the owner role so that it can run migrations. Returns the
    roles created now.
    """
    roles = store_roles(schema)
    created: list[str] = []
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"datalayer.migrate.{schema}",)
        )
        have = existing_roles(conn, roles.all())
        for name in roles.all():
            if name not in have:
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
                created.append(name)
        owner = sql.Identifier(roles.owner)
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        if not (superuser and superuser[0]) and acting_owner(conn, schema) is None:
            conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(owner))
        conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(conn.info.dbname), owner)
        )
        conn.execute(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(sql.Identifier(schema), owner)
        )
        _hand_to_owner(conn, schema, roles.owner)
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(owner))
        grant_store_privileges(conn, schema)
    return created


def _hand_to_owner(conn: psycopg.Connection[Any], schema: str, owner: str) -> None:
    """Make ``owner`` the owner of the schema and of every table, view, sequence and function in it."""
    conn.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(schema), sql.Identifier(owner)))
    relations = conn.execute(
        """
        SELECT c.relname, c.relkind::text FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
           AND pg_get_userbyid(c.relowner) <> %s
           -- identity and serial sequences follow their table
           AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                            AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
        """,
        (schema, owner),
    ).fetchall()
    kinds = {"v": "VIEW", "m": "MATERIALIZED VIEW", "f": "FOREIGN TABLE", "S": "SEQUENCE"}
    for name, kind in relations:
        conn.execute(
            sql.SQL("ALTER {} {} OWNER TO {}").format(
                sql.SQL(kinds.get(kind, "TABLE")), sql.Identifier(schema, name), sql.Identifier(owner)
            )
        )
    functions = conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = %s AND pg_get_userbyid(p.proowner) <> %s",
        (schema, owner),
    ).fetchall()
    for (signature,) in functions:
        # regprocedure text is already a qualified, quoted signature.
        conn.execute(
            sql.SQL("ALTER ROUTINE {} OWNER TO {}").format(sql.SQL(signature), sql.Identifier(owner))
        )


def grant_store_privileges(conn: psycopg.Connection[Any], schema: str) -> None:
    """Set each existing role's privileges on the schema's tables to exactly its definition.

    Run by the owner (or a member acting as it), inside the caller's transaction. Privileges not in
    the definition are revoked, so a stray ``GRANT UPDATE`` does not survive the next migration.
    """
    roles = store_roles(schema)
    have = existing_roles(conn, (roles.app, roles.relay, roles.reader))
    s = sql.Identifier(schema)
    tables = {
        str(r[0])
        for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm')",
            (schema,),
        ).fetchall()
    }
    for kind, name in (("app", roles.app), ("relay", roles.relay), ("reader", roles.reader)):
        if name not in have:
            continue
        role = sql.Identifier(name)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, role))
        conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA {} FROM {}").format(s, role))
        conn.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(s, role))
        conn.execute(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(s, role))
        if kind == "reader":
            conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, role))
            continue
        for table, privileges in _TABLE_PRIVILEGES[kind].items():
            if table in tables:
                conn.execute(
                    sql.SQL("GRANT {} ON {} TO {}").format(
                        sql.SQL(", ").join(map(sql.SQL, privileges)), sql.Identifier(schema, table), role
                    )
                )


def drop_store_roles(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    """Drop the store's roles; what the owner role owned (in this database) becomes the current user's.

    Needs CREATEROLE (or a superuser): the current user joins each role to take over what it owns
    and revoke what it was granted, here and on the database. Returns the roles dropped.
    """
    roles = store_roles(schema)
    dropped: list[str] = []
    with conn.transaction():
        have = existing_roles(conn, roles.all())
        for name in roles.all():
            if name not in have:
                continue
            role = sql.Identifier(name)
            member = conn.execute("SELECT pg_has_role(current_user, %s, 'USAGE')", (name,)).fetchone()
            if not (member and member[0]):
                conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(role))
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(role))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(role))  # revokes its privileges here
            conn.execute(sql.SQL("DROP ROLE {}").format(role))
            dropped.append(name)
    return dropped


# -- the superuser warning -------------------------------------------------------------------------

_warned_lock = threading.Lock()
_warned = False


def warn_if_superuser(conn: psycopg.Connection[Any]) -> bool:
    """Log a WARNING, once per process, when ``conn`` is a superuser's session; True if it is.

    Free of round trips: the server reports ``is_superuser`` at connection start.
    """
    global _warned
    if conn.info.parameter_status("is_superuser") != "on":
        return False
    with _warned_lock:
        if _warned:
            return True
        _warned = True
    user = conn.info.parameter_status("session_authorization") or conn.info.user
    log.warning(
        "connected to PostgreSQL as %r, a superuser: it bypasses every privilege check (even row "
        "security); connect as a login role that is a member of the store's <schema>_app, "
        "<schema>_relay or <schema>_reader group role instead (see docs/security.md)",
        user,
    )
    return True
