"""Envelope encryption for crypto-shredding: one data key per subject, wrapped by a master key.

Data keys live in the store's ``data_keys`` table, each encrypted (AES-256-GCM) by the master key
given in the environment (``DATALAYER_MASTER_KEY`` or ``DATALAYER_MASTER_KEY_FILE``), never stored
anywhere by datalayer. Forgetting a subject destroys its data key and leaves a tombstone, so no new
key is ever made for it; rotating the master key re-wraps every data key under the new one.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from psycopg import sql

from eventstore.errors import EventStoreError
from eventstore.master_key import (
    MASTER_KEY_ENV,
    PREVIOUS_MASTER_KEY_ENV,
    MasterKey,
    MasterKeyError,
    MasterKeys,
    master_key_from_env,
    new_master_key,
)
from eventstore.store import EventStore


class MissingDataKey(EventStoreError):
    """An encrypted field names a subject this store has no data key (nor tombstone) for.

    The events were written to another store, or its ``data_keys`` table was not copied with them.
    """


class SubjectForgotten(EventStoreError):
    """Personal data was about to be written for a subject that was forgotten: refused."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        super().__init__(f"subject {subject} was forgotten: no personal data may be recorded for it")


@dataclass(frozen=True)
class Forgotten:
    """What ``forget`` did: ``destroyed`` a key, made a ``tombstone`` only (no key yet), or nothing
    (``already`` forgotten), and when the subject was forgotten."""

    subject: str
    outcome: Literal["destroyed", "tombstone", "already"]
    erased_at: datetime


class DataKeys:
    """The data keys of one event store, created on first use, cached for ``cache_ttl`` seconds.

    ``store`` may be a callable, so that a reader connects only once it meets an encrypted field.
    A cached key may outlive a ``forget`` by up to ``cache_ttl`` in another process: what that
    process writes meanwhile is encrypted under the destroyed key, so it is unreadable all the same.
    """

    def __init__(
        self,
        store: EventStore | Callable[[], EventStore],
        master: MasterKeys,
        *,
        cache_ttl: float = 60.0,
        cache_size: int = 10_000,
    ) -> None:
        self._store = store if isinstance(store, EventStore) else None
        self._connect = None if isinstance(store, EventStore) else store
        self.master = master
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self._cache: dict[str, tuple[bytes | None, float]] = {}
        self._lock = threading.Lock()

    @property
    def store(self) -> EventStore:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    assert self._connect is not None
                    self._store = self._connect()
        return self._store

    def close(self) -> None:
        """Close the store if this object opened it."""
        if self._connect is not None and self._store is not None:
            self._store.close()
            self._store = None

    def _table(self) -> sql.Identifier:
        return sql.Identifier(self.store.schema, "data_keys")

    def _cached(self, subject: str) -> tuple[bool, bytes | None]:
        entry = self._cache.get(subject)
        if entry is None:
            return False, None
        key, expires = entry
        # A forgotten subject (None) stays forgotten: only live keys expire.
        if key is not None and expires < time.monotonic():
            return False, None
        return True, key

    def _remember(self, subject: str, key: bytes | None) -> None:
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[subject] = (key, time.monotonic() + self.cache_ttl)

    def for_write(self, subject: str) -> bytes:
        """The subject's data key, made now if it has none; :class:`SubjectForgotten` if forgotten."""
        hit, key = self._cached(subject)
        if hit:
            if key is None:
                raise SubjectForgotten(subject)
            return key
        current = self.master.require_current()
        fresh = AESGCM.generate_key(bit_length=256)
        with self.store.pool.connection() as conn:
            made = conn.execute(
                sql.SQL(
                    "INSERT INTO {} (subject, master_key_id, wrapped_key) VALUES (%s, %s, %s)"
                    " ON CONFLICT (subject) DO NOTHING RETURNING subject"
                ).format(self._table()),
                (subject, current.key_id, current.wrap(subject, fresh)),
            ).fetchone()
        if made is not None:
            self._remember(subject, fresh)
            return fresh
        key = self._load(subject)
        if key is None:
            raise SubjectForgotten(subject)
        return key

    def for_read(self, subject: str) -> bytes | None:
        """The subject's data key, or None once it was forgotten."""
        hit, key = self._cached(subject)
        return key if hit else self._load(subject)

    def _load(self, subject: str) -> bytes | None:
        with self.store.pool.connection() as conn:
            row = conn.execute(
                sql.SQL("SELECT master_key_id, wrapped_key FROM {} WHERE subject = %s").format(self._table()),
                (subject,),
            ).fetchone()
        if row is None:
            raise MissingDataKey(
                f"no data key for subject {subject} in {self.store.schema}.data_keys: were these events "
                "written to another store (or schema), without copying its data_keys table?"
            )
        key_id, wrapped = row
        key = None if wrapped is None else self.master.for_id(key_id, subject).unwrap(subject, bytes(wrapped))
        self._remember(subject, key)
        return key

    def forget(self, subject: str) -> Forgotten:
        """Destroy the subject's data key, leaving a tombstone so that none is ever made again.

        Idempotent: forgetting a forgotten subject changes nothing. A subject without a key yet gets
        the tombstone too, so that no personal data can be recorded for it later.
        """
        with self.store.pool.connection() as conn, conn.transaction():
            destroyed = conn.execute(
                sql.SQL(
                    "UPDATE {} SET wrapped_key = NULL, master_key_id = NULL, erased_at = now()"
                    " WHERE subject = %s AND erased_at IS NULL RETURNING erased_at"
                ).format(self._table()),
                (subject,),
            ).fetchone()
            if destroyed is not None:
                result = Forgotten(subject, "destroyed", destroyed[0])
            else:
                made = conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (subject, erased_at) VALUES (%s, now())"
                        " ON CONFLICT (subject) DO NOTHING RETURNING erased_at"
                    ).format(self._table()),
                    (subject,),
                ).fetchone()
                if made is not None:
                    result = Forgotten(subject, "tombstone", made[0])
                else:
                    row = conn.execute(
                        sql.SQL("SELECT erased_at FROM {} WHERE subject = %s").format(self._table()),
                        (subject,),
                    ).fetchone()
                    assert row is not None
                    result = Forgotten(subject, "already", row[0])
        self._remember(subject, None)
        return result

    def rotate_master(self, batch_size: int = 500) -> int:
        """Re-wrap every data key not under the current master key; returns how many were re-wrapped.

        Each batch is one transaction, so an interrupted rotation resumes where it stopped. A key
        wrapped by a master key that is neither current nor previous stops it, naming that key's id.
        """
        current = self.master.require_current()
        done = 0
        while True:
            with self.store.pool.connection() as conn, conn.transaction():
                rows = conn.execute(
                    sql.SQL(
                        "SELECT subject, master_key_id, wrapped_key FROM {} WHERE wrapped_key IS NOT NULL"
                        " AND master_key_id <> %s ORDER BY subject LIMIT %s FOR UPDATE"
                    ).format(self._table()),
                    (current.key_id, batch_size),
                ).fetchall()
                if not rows:
                    return done
                params = []
                for subject, key_id, wrapped in rows:
                    key = self.master.for_id(key_id, subject).unwrap(subject, bytes(wrapped))
                    params.append((current.key_id, current.wrap(subject, key), subject))
                with conn.cursor() as cur:
                    cur.executemany(
                        sql.SQL(
                            "UPDATE {} SET master_key_id = %s, wrapped_key = %s, rotated_at = now()"
                            " WHERE subject = %s"
                        ).format(self._table()),
                        params,
                    )
                done += len(rows)

    def counts(self) -> dict[str, int]:
        """Data keys per master key id, and forgotten subjects under ``"forgotten"``."""
        with self.store.pool.connection() as conn:
            rows = conn.execute(
                sql.SQL("SELECT coalesce(master_key_id, 'forgotten'), count(*) FROM {} GROUP BY 1").format(
                    self._table()
                )
            ).fetchall()
        return {str(k): int(n) for k, n in rows}


_KEY_COLUMNS = ("subject", "master_key_id", "wrapped_key", "created_at", "rotated_at", "erased_at")


def dump_data_keys(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    """Every row of ``schema``'s data keys, JSON-ready (the wrapped key in base64): for exports.

    Wrapped keys open only with the master key, which is never exported; tombstones travel too, so
    a restored store keeps forgotten subjects forgotten.
    """
    rows = conn.execute(
        sql.SQL("SELECT {} FROM {} ORDER BY subject").format(
            sql.SQL(", ").join(map(sql.Identifier, _KEY_COLUMNS)), sql.Identifier(schema, "data_keys")
        )
    ).fetchall()
    dumped = []
    for row in rows:
        item = dict(zip(_KEY_COLUMNS, row, strict=True))
        item["wrapped_key"] = None if row[2] is None else base64.b64encode(bytes(row[2])).decode("ascii")
        for column in ("created_at", "rotated_at", "erased_at"):
            item[column] = None if item[column] is None else item[column].isoformat()
        dumped.append(item)
    return dumped


def load_data_keys(conn: psycopg.Connection[Any], schema: str, rows: list[dict[str, Any]]) -> int:
    """Insert rows of :func:`dump_data_keys` into ``schema`` (inside the caller's transaction).

    A subject the target already has keeps its row, except that a tombstone always wins: a subject
    forgotten in either store stays forgotten. Raises ``ValueError`` naming a malformed row.
    """
    params = []
    for number, item in enumerate(rows, start=1):
        try:
            wrapped = item["wrapped_key"]
            params.append(
                (
                    str(item["subject"]),
                    item["master_key_id"],
                    None if wrapped is None else base64.b64decode(wrapped, validate=True),
                    item["created_at"],
                    item["rotated_at"],
                    item["erased_at"],
                )
            )
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ValueError(f"data key {number}: malformed ({type(exc).__name__}: {exc})") from None
    if params:
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL(
                    "INSERT INTO {} ({}) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (subject) DO UPDATE"
                    " SET master_key_id = NULL, wrapped_key = NULL, erased_at = excluded.erased_at"
                    " WHERE excluded.erased_at IS NOT NULL AND {}.erased_at IS NULL"
                ).format(
                    sql.Identifier(schema, "data_keys"),
                    sql.SQL(", ").join(map(sql.Identifier, _KEY_COLUMNS)),
                    sql.Identifier("data_keys"),
                ),
                params,
            )
    return len(params)


def store_from_env(env: Mapping[str, Any]) -> EventStore:
    """A small pool on the store the ``DATALAYER_*`` variables of ``env`` name (URL, schema, TLS)."""
    from eventstore.store import libpq_tls_kwargs

    url = str(
        env.get("DATALAYER_DATABASE_URL") or "postgresql://datalayer:datalayer@127.0.0.1:5432/datalayer"
    )
    tls = libpq_tls_kwargs(
        env.get("DATALAYER_DATABASE_SSLMODE"),
        env.get("DATALAYER_DATABASE_TLS_CA_FILE"),
        env.get("DATALAYER_DATABASE_TLS_CERT_FILE"),
        env.get("DATALAYER_DATABASE_TLS_KEY_FILE"),
    )
    return EventStore.connect(
        url.replace("postgresql+psycopg://", "postgresql://", 1),
        schema=str(env.get("DATALAYER_EVENTSTORE_SCHEMA") or "datalayer"),
        max_size=2,
        connect_kwargs=tls,
    )


__all__ = [
    "MASTER_KEY_ENV",
    "PREVIOUS_MASTER_KEY_ENV",
    "DataKeys",
    "Forgotten",
    "MasterKey",
    "MasterKeyError",
    "MasterKeys",
    "MissingDataKey",
    "SubjectForgotten",
    "dump_data_keys",
    "load_data_keys",
    "master_key_from_env",
    "new_master_key",
    "store_from_env",
]
