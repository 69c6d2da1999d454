"""Least privilege for PostgreSQL read models: two group roles per projection, granted as it grows.

A projection named ``n`` has its alias schema ``n`` (views that follow the active generation) and
one schema per generation (``n_v1``, ``n_v2_r1``, ...). Its ``NOLOGIN`` group roles:

``n_writer``
    live consumers: USAGE on the generation schemas, SELECT, INSERT, UPDATE, DELETE on their
    tables and USAGE on their sequences; SELECT on the generation registry.
``n_reader``
    query services: USAGE and SELECT on the alias schema, the generation schemas (read-your-writes
    reads the applied versions there) and the registry.

The roles are created once with ``datalayer db grant-projection n`` (CREATEROLE needed), which also
grants on every schema that exists. New generations are covered as they appear: the target's
``setup`` and the registry's ``activate`` grant to whichever of the two roles exist, when run by a
user who owns the schema (the operator who builds generations; a writer's ``setup`` creates
nothing and grants nothing). Creating a generation (a rebuild, a projection's very first start)
needs CREATE on the database, which the writer role does not have.
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, quoted_name, text

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,52}$")


def projection_roles(projection: str) -> tuple[str, str]:
    """``(writer, reader)`` role names of the projection named ``projection``."""
    if not _NAME.match(projection):
        raise ValueError(
            f"projection name {projection!r}: lower-case letters, digits and _, at most 53 (role names end "
            "in _writer/_reader and PostgreSQL names are at most 63 bytes)"
        )
    return f"{projection}_writer", f"{projection}_reader"


def _q(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(quoted_name(name, quote=True))


def _existing(conn: Connection, names: tuple[str, ...]) -> set[str]:
    rows = conn.execute(
        text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)"), {"names": list(names)}
    )
    return {str(r[0]) for r in rows}


def _owned_by_me(conn: Connection, schema: str) -> bool:
    row = conn.execute(
        text("SELECT pg_has_role(current_user, nspowner, 'USAGE') FROM pg_namespace WHERE nspname = :schema"),
        {"schema": schema},
    ).first()
    return bool(row and row[0])


def grant_projection_schema(
    conn: Connection, projection: str, schema: str, *, alias: bool = False
) -> list[str]:
    """Grant ``projection``'s existing roles their privileges on ``schema``; returns the roles granted to.

    ``alias`` marks the alias schema of views, which the writer never touches. A no-op when the
    roles do not exist or the current user does not own the schema.
    """
    if not _NAME.match(projection):
        return []  # a name no role can be made for: nothing to grant to
    writer, reader = projection_roles(projection)
    have = _existing(conn, (writer, reader))
    if not have or not _owned_by_me(conn, schema):
        return []
    s = _q(conn, schema)
    granted = []
    if writer in have and not alias:
        w = _q(conn, writer)
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {s} TO {w}")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {w}")
        conn.exec_driver_sql(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {w}")
        granted.append(writer)
    if reader in have:
        r = _q(conn, reader)
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {s} TO {r}")
        conn.exec_driver_sql(f"GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {r}")
        granted.append(reader)
    return granted


def create_projection_roles(conn: Connection, projection: str) -> dict[str, list[str]]:
    """Create the projection's missing roles and grant on its registry, alias and generation schemas.

    Idempotent; run inside the caller's transaction. Returns each schema granted on -> the roles.
    """
    from projections.generations import REGISTRY_SCHEMA

    writer, reader = projection_roles(projection)
    have = _existing(conn, (writer, reader))
    for name in (writer, reader):
        if name not in have:
            conn.exec_driver_sql(f"CREATE ROLE {_q(conn, name)} NOLOGIN")
    schemas: dict[str, list[str]] = {}
    registry = conn.execute(text("SELECT to_regclass(:t)"), {"t": f"{REGISTRY_SCHEMA}.generations"}).scalar()
    if registry is not None and _owned_by_me(conn, REGISTRY_SCHEMA):
        rs = _q(conn, REGISTRY_SCHEMA)
        for role in (writer, reader):
            conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {rs} TO {_q(conn, role)}")
            conn.exec_driver_sql(f"GRANT SELECT ON {rs}.generations TO {_q(conn, role)}")
        schemas[REGISTRY_SCHEMA] = [writer, reader]
        generations = conn.execute(
            text(f"SELECT generation FROM {rs}.generations WHERE projection = :p"), {"p": projection}
        ).scalars()
        for generation in generations:
            if _schema_exists(conn, generation):
                schemas[generation] = grant_projection_schema(conn, projection, generation)
    if _schema_exists(conn, projection):
        schemas[projection] = grant_projection_schema(conn, projection, projection, alias=True)
    return schemas


def _schema_exists(conn: Connection, schema: str) -> bool:
    return conn.execute(text("SELECT to_regnamespace(:s)"), {"s": f'"{schema}"'}).scalar() is not None


__all__ = ["create_projection_roles", "grant_projection_schema", "projection_roles"]
