"""Array parameters in binary: a column of many rows sent to PostgreSQL as one value.

The PostgreSQL target sends a batch's ids, versions and rows as one array per column and unnests
them in SQL, so a batch costs one statement per table, not one per row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import ARRAY, Text, TypeDecorator, Uuid, bindparam, cast, func
from sqlalchemy.engine import Dialect

__all__ = ["BinaryArray", "BinaryList", "unnest_param", "uuid_texts_param"]


class BinaryList(list[Any]):
    """A list psycopg sends as a binary array (see :class:`BinaryArray`)."""


# Why binary: psycopg sends an array parameter as text by default, and builds that text in Python,
# quoting and escaping each element: ~24 ms for a 1,000-row batch of order summaries (the JSON
# lines, the timestamps and the UUIDs most of all), against ~5 ms in binary. Registered for this
# private list type only, so no other parameter anywhere changes format. A connection made before
# this module was imported does not know it and sends the same values as text: slower, not wrong.
# Psycopg itself falls back to text for a list without a value to take the element type from.
psycopg.adapters.register_dumper(BinaryList, ListBinaryDumper)


class BinaryArray(TypeDecorator[Any]):
    """``ARRAY(item_type)`` for bound parameters, its value handed to psycopg as a :class:`BinaryList`."""

    impl = ARRAY
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any]:
        process = super().bind_processor(dialect)

        def binary(value: Any) -> Any:
            if process is not None:
                value = process(value)
            return None if value is None else BinaryList(value)

        return binary


def unnest_param(name: str, item_type: Any) -> Any:
    """``unnest(:name)``, ``name`` a binary array of ``item_type``: a column of rows as one value."""
    return func.unnest(bindparam(name, type_=BinaryArray(item_type)))


def uuid_texts_param(name: str) -> Any:
    """``:name`` as a ``uuid[]``, bound to UUID texts (a binary ``text[]``) that PostgreSQL casts.

    Why texts: ids are canonical texts in Python already (stream ids, ``sql_writes.uuid_key``),
    and a :class:`~uuid.UUID` per id costs ~1.2 µs to build and more to dump, where the cast is
    PostgreSQL's, in C. Any form ``uuid`` accepts may be bound; a text that is not one fails the
    statement.
    """
    return cast(bindparam(name, type_=BinaryArray(Text)), ARRAY(Uuid))
