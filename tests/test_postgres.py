"""PostgreSQL answers through psycopg and through SQLAlchemy Core with explicit transactions."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from sqlalchemy import BigInteger, Column, Engine, MetaData, String, Table, func, insert, select

from tests.helpers import unique_name


def test_psycopg_round_trip(pg: psycopg.Connection[Any]) -> None:
    table = unique_name("t_psycopg")
    with pg.transaction():
        pg.execute(
            psycopg.sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(
                psycopg.sql.Identifier(table)
            )
        )
        with pg.cursor() as cur:
            cur.executemany(
                psycopg.sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(psycopg.sql.Identifier(table)),
                [(i, f"row {i}") for i in range(50)],
            )
    try:
        rows = pg.execute(
            psycopg.sql.SQL("SELECT id, body FROM {} ORDER BY id").format(psycopg.sql.Identifier(table))
        ).fetchall()
        assert rows == [(i, f"row {i}") for i in range(50)]
        assert pg.execute("SELECT pg_current_xact_id()::text").fetchone() is not None
    finally:
        pg.execute(psycopg.sql.SQL("DROP TABLE {}").format(psycopg.sql.Identifier(table)))
        pg.commit()


def test_sqlalchemy_core_transaction_commits_or_rolls_back(engine: Engine) -> None:
    metadata = MetaData()
    table = Table(
        unique_name("t_sqla"),
        metadata,
        Column("id", BigInteger, primary_key=True),
        Column("body", String, nullable=False),
    )
    metadata.create_all(engine)
    try:
        with engine.begin() as conn:
            conn.execute(insert(table), [{"id": i, "body": str(i)} for i in range(10)])
        with pytest.raises(Exception, match="duplicate key"), engine.begin() as conn:
            conn.execute(insert(table), [{"id": 100, "body": "new"}])
            conn.execute(insert(table), [{"id": 0, "body": "clash"}])
        with engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(table)).scalar_one()
            ids = conn.execute(select(table.c.id).order_by(table.c.id)).scalars().all()
        assert count == 10  # the failed transaction left nothing behind, not even id 100
        assert ids == list(range(10))
    finally:
        metadata.drop_all(engine)
