"""The writes a PostgreSQL projection's handlers describe, coalesced per row until the batch commits.

Each (table, primary key) keeps one pending change that is equivalent to applying its writes one by
one: the row values to insert if it is absent, the columns to overwrite and the amounts to add if it
exists, after an optional delete. The target turns these into a few multi-row statements.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import Table, Uuid

from projections.target import TargetReadFailed

Key = Any  # the primary key value for one-column keys, else a tuple of values in key order
Row = dict[str, Any]
RowLoader = Callable[["TableSpec", Key], "Row | None"]

_UUIDS: dict[Any, UUID] = {}
# Per-batch reuse (a stream's key is looked up at its versions, by each handler and at the flush)
# and hot ids need only a few batches' worth; 100,000 entries held ~20 MB per cache in a replay
# that meets each stream once. Cleared when full: cheaper per call than an LRU.
_UUID_CACHE_LIMIT = 16_384
_UUID_TEXTS: dict[str, str] = {}
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def as_uuid(value: Any) -> UUID:
    """``value`` as a :class:`UUID`: stream ids arrive as strings but UUID columns compare as UUIDs."""
    if value.__class__ is UUID:
        return value
    found = _UUIDS.get(value)
    if found is None:
        found = value if isinstance(value, UUID) else UUID(str(value))
        if len(_UUIDS) >= _UUID_CACHE_LIMIT:
            _UUIDS.clear()
        _UUIDS[value] = found
    return found


def uuid_key(value: Any) -> str:
    """The key of a UUID column's value in Python: its canonical text (``str(UUID)``).

    Why text and not the UUID: writes are looked up by key several times per event, and a UUID
    hashes in Python (``UUID.__hash__``) while a string hashes once, in C, and keeps its hash.
    Canonical UUID texts compare, and sort, as the UUIDs do. Stream ids arrive in that form.
    """
    if value.__class__ is str:
        found = _UUID_TEXTS.get(value)
        if found is None:
            # Most texts are canonical already (stream ids): checked in C, not parsed and printed.
            found = value if _CANONICAL_UUID.fullmatch(value) else str(UUID(value))
            if len(_UUID_TEXTS) >= _UUID_CACHE_LIMIT:
                _UUID_TEXTS.clear()
            _UUID_TEXTS[value] = found
        return found
    return str(value if isinstance(value, UUID) else UUID(str(value)))


class TableSpec:
    """What the write path needs to know about one table, computed once per target."""

    __slots__ = (
        "column_names",
        "columns",
        "index",
        "name",
        "normalizers",
        "pk",
        "pk0",
        "pk_set",
        "table",
        "width",
    )

    def __init__(self, table: Table, index: int) -> None:
        pk = tuple(column.name for column in table.primary_key.columns)
        if not pk:
            raise ValueError(f"table {table.name!r} has no primary key: projections write rows by key")
        self.table = table
        self.name = table.name
        self.index = index  # flush order: position in metadata.sorted_tables
        self.pk = pk
        self.pk0 = pk[0] if len(pk) == 1 else None
        self.pk_set = frozenset(pk)
        self.column_names = tuple(column.name for column in table.columns)
        self.columns = frozenset(self.column_names)
        self.width = len(self.column_names)
        # Keys are compared in Python (coalescing, prefetched rows), so a UUID column's key must be
        # the same whether the handler passed a string or a UUID: its canonical text (uuid_key).
        self.normalizers: tuple[Callable[[Any], Any] | None, ...] = tuple(
            uuid_key if isinstance(table.c[name].type, Uuid) else None for name in pk
        )

    def key(self, values: Mapping[str, Any]) -> Key:
        """The normalized primary key of ``values``; ValueError naming what is missing."""
        try:
            if self.pk0 is not None:
                value = values[self.pk0]
                if value is None:
                    raise KeyError(self.pk0)
                normalize = self.normalizers[0]
                return value if normalize is None else normalize(value)
            parts = []
            for name, normalize in zip(self.pk, self.normalizers, strict=True):
                value = values[name]
                if value is None:
                    raise KeyError(name)
                parts.append(value if normalize is None else normalize(value))
            return tuple(parts)
        except KeyError:
            missing = [name for name in self.pk if values.get(name) is None]
            raise ValueError(
                f"table {self.name!r}: primary key column(s) {missing} missing or None"
            ) from None

    def check_columns(self, values: Mapping[str, Any], what: str) -> None:
        if not values.keys() <= self.columns:
            unknown = sorted(set(values) - self.columns)
            raise ValueError(f"table {self.name!r} has no column(s) {unknown} ({what})")


class Change:
    """The pending change of one row; ``values`` always includes the primary key columns.

    After the optional delete, if ``exists``: insert ``values`` when the row is absent, otherwise
    overwrite the ``sets`` columns and add ``adds`` to theirs. Columns only in ``values`` are
    increment defaults: they apply only to an inserted row.

    ``sets`` is the table's ``TableSpec.columns`` itself (a frozenset) after an upsert of every
    column: shared, so it is replaced by a set of its own before anything adds to it.
    """

    __slots__ = ("adds", "deleted", "exists", "sets", "values")

    deleted: bool
    exists: bool
    values: Row
    sets: set[str] | frozenset[str]
    adds: dict[str, Any]

    def __init__(self) -> None:
        self.deleted = False
        self.exists = False
        self.values = {}
        self.sets = set()
        self.adds = {}

    def copy(self) -> Change:
        # Why __new__: __init__'s five assignments would all be overwritten; this runs per event.
        other = _new_change(Change)
        other.deleted = self.deleted
        other.exists = self.exists
        other.values = dict(self.values)
        sets = self.sets
        other.sets = sets if sets.__class__ is frozenset else set(sets)  # a frozenset is never changed
        other.adds = dict(self.adds)
        return other


_new_change = object.__new__


def _plus(value: Any, amount: Any) -> Any:
    # Increments treat NULL as zero, as the flushed `coalesce(col, 0) + amount` does.
    return amount if value is None else value + amount


def _check_amounts(spec: TableSpec, amounts: Mapping[str, Any]) -> None:
    for column, amount in amounts.items():
        if not isinstance(amount, int | Decimal) or isinstance(amount, bool):
            raise TypeError(
                f"table {spec.name!r}: increment of {column!r} by {amount!r}: not an int or Decimal"
            )


class SqlWrites:
    """What handlers write through: upserts, atomic increments and deletes, applied at commit.

    Writes made between :meth:`start_event` and :meth:`drop_event` vanish; :meth:`get` reads a row
    as the batch would leave it so far.
    """

    def __init__(self, specs: Mapping[Table, TableSpec], loader: RowLoader) -> None:
        self._specs = specs
        self._loader = loader
        self._changes: dict[TableSpec, dict[Key, Change]] = {}
        self._rows: dict[TableSpec, dict[Key, Row | None]] = {}
        # (table, key) -> the change as it was before the current event touched it (None: no change).
        self._undo: dict[tuple[TableSpec, Key], Change | None] | None = None

    def upsert(self, table: Table, values: Mapping[str, Any]) -> None:
        """Insert the row with this primary key, or overwrite the columns in ``values`` if it exists.

        Later upserts of the same key merge into this one, the last value of a column winning.
        """
        spec = self._spec(table)
        key = spec.key(values)
        spec.check_columns(values, "upsert")
        if len(values) == spec.width:
            self._replace(spec, key, values)
            return
        change = self._change(spec, key)
        if change.exists:
            change.values.update(values)
            sets = change.sets
            if sets.__class__ is not set:  # the spec's shared frozenset (see Change)
                change.sets = sets = set(sets)
            sets.update(values)
            adds = change.adds
            if adds:
                for column in values:
                    adds.pop(column, None)
        else:
            change.exists = True
            change.values = dict(values)
            change.sets = set(values)

    def increment(
        self,
        table: Table,
        key: Mapping[str, Any],
        amounts: Mapping[str, int | Decimal],
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        """Add ``amounts`` atomically; if the row is absent insert ``key``, ``defaults`` and ``amounts``.

        Safe when several processes increment the same row: the addition happens in the database.
        NULL counts as 0, and so does a column the batch's own insert of the row left unset.
        """
        spec = self._spec(table)
        k = spec.key(key)
        if key.keys() != spec.pk_set:
            raise ValueError(f"table {spec.name!r}: increment key must be exactly the primary key {spec.pk}")
        spec.check_columns(amounts, "increment amounts")
        for amount in amounts.values():
            if amount.__class__ is not int and amount.__class__ is not Decimal:
                _check_amounts(spec, amounts)  # the rare other classes, and a precise error
                break
        if defaults:
            spec.check_columns(defaults, "increment defaults")
            overlap = (defaults.keys() & amounts.keys()) | (defaults.keys() & spec.pk_set)
            if overlap:
                raise ValueError(f"table {spec.name!r}: increment defaults overlap amounts or key: {overlap}")
        if not spec.pk_set.isdisjoint(amounts):
            raise ValueError(f"table {spec.name!r}: cannot increment primary key columns")
        change = self._change(spec, k)
        if not change.exists:
            change.exists = True
            values = dict(key)
            if defaults:
                values.update(defaults)
            values.update(amounts)
            change.values = values
            change.adds = dict(amounts)
            return
        values = change.values
        adds = change.adds
        sets = change.sets
        for column, amount in amounts.items():
            if column in adds:
                adds[column] += amount
                values[column] += amount
            elif column in sets:
                values[column] = _plus(values[column], amount)
            else:
                # Absent from the row's pending values, or only an insert default: on an existing row
                # it is the stored value that grows.
                values[column] = _plus(values.get(column), amount)
                adds[column] = amount

    def _replace(self, spec: TableSpec, key: Key, values: Mapping[str, Any]) -> None:
        """An upsert of every column: the row's pending change becomes a new one.

        Equivalent to merging into the old change (every column overwritten, no increment left),
        without copying it: the old object is not changed, so it is its own undo.
        """
        changes = self._changes.get(spec)
        if changes is None:
            changes = self._changes[spec] = {}
        old = changes.get(key)
        undo = self._undo
        if undo is not None:
            slot = (spec, key)
            if slot not in undo:
                undo[slot] = old
        change = _new_change(Change)
        change.deleted = old is not None and old.deleted
        change.exists = True
        change.values = dict(values)
        change.sets = spec.columns
        change.adds = {}
        changes[key] = change

    def delete(self, table: Table, key: Mapping[str, Any]) -> None:
        """Delete the row; writes to it after this apply to a fresh row."""
        spec = self._spec(table)
        change = self._change(spec, spec.key(key))
        change.deleted = True
        change.exists = False
        change.values = {}
        change.sets = set()
        change.adds = {}

    def get(self, table: Table, key: Mapping[str, Any]) -> Row | None:
        """The row as this batch sees it: stored row plus pending writes (a copy), or None.

        On a row the batch creates, columns it did not write read as None rather than their defaults.
        """
        spec = self._spec(table)
        k = spec.key(key)
        row = self._stored(spec, k)
        change = self._changes.get(spec, {}).get(k)
        if change is None:
            return None if row is None else dict(row)
        if change.deleted:
            row = None
        if not change.exists:
            return None if row is None else dict(row)
        values = change.values
        if change.sets is spec.columns and not change.adds:
            # Every column written (see _replace): the pending values are the row, but for the
            # stored row's own key values.
            fresh = dict(values)
            if row is not None:
                for column in spec.pk:
                    fresh[column] = row[column]
            return fresh
        if row is None:
            fresh = dict.fromkeys(spec.column_names)
            fresh.update(change.values)
            return fresh
        row = dict(row)
        for column in change.sets:
            if column not in spec.pk_set:
                row[column] = values[column]
        for column, amount in change.adds.items():
            row[column] = _plus(row[column], amount)
        return row

    # --- event isolation (called by the target's batch) ---

    def start_event(self) -> None:
        """Writes from here on belong to one event: remember each row's change before it touches it."""
        self._undo = {}

    def keep_event(self) -> None:
        """The event's writes stay in the batch."""
        self._undo = None

    def drop_event(self) -> None:
        """Put back every row change the event touched, as it was before the event."""
        undo = self._undo
        self._undo = None
        if not undo:
            return
        for (spec, key), before in undo.items():
            changes = self._changes[spec]
            if before is None:
                del changes[key]
            else:
                changes[key] = before

    # --- for the target ---

    def preload(self, table: Table, rows: Mapping[Key, Row | None]) -> None:
        """Remember stored rows (None: known absent) so :meth:`get` needs no round trip for them."""
        self._rows.setdefault(self._spec(table), {}).update(rows)

    def pending(self) -> Iterator[tuple[TableSpec, dict[Key, Change]]]:
        """Each table with pending changes, in flush order (``metadata.sorted_tables``)."""
        for spec in sorted(self._changes, key=lambda s: s.index):
            changes = self._changes[spec]
            if changes:
                yield spec, changes

    def _spec(self, table: Table) -> TableSpec:
        spec = self._specs.get(table)
        if spec is None:
            raise ValueError(f"table {getattr(table, 'name', table)!r} is not in this projection's metadata")
        return spec

    def _change(self, spec: TableSpec, key: Key) -> Change:
        changes = self._changes.get(spec)
        if changes is None:
            changes = self._changes[spec] = {}
        change = changes.get(key)
        undo = self._undo
        if undo is not None:
            slot = (spec, key)
            if slot not in undo:
                undo[slot] = None if change is None else change.copy()
        if change is None:
            change = changes[key] = Change()
        return change

    def _stored(self, spec: TableSpec, key: Key) -> Row | None:
        rows = self._rows.get(spec)
        if rows is None:
            rows = self._rows[spec] = {}
        if key in rows:
            return rows[key]
        try:
            row = self._loader(spec, key)
        except Exception as exc:
            raise TargetReadFailed(f"table {spec.name!r}: reading the row {key!r} failed: {exc}") from exc
        rows[key] = row
        return row
