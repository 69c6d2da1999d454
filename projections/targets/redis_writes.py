"""The writes a Redis projection's handlers make: described in Python, coalesced, applied at commit.

Each key's pending state is a plain dict of field (or member) -> final operation, so a batch of
events touching a few hot keys becomes a few commands. The final state equals issuing every write
one by one in order; the one exception is float arithmetic, see :meth:`RedisWrites.zincrby`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from decimal import Decimal
from enum import Enum
from typing import Any, Final

Value = str | int | float | Decimal

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
# Bookkeeping keys (versions, checkpoints) live under this relative name.
_RESERVED: Final = "meta:"


class _Missing(Enum):
    MISSING = 0


_MISSING: Final = _Missing.MISSING

# Pending state per field (hash) or member (sorted set):
#   str   -> HSET / ZADD with this (already encoded) value or score
#   int   -> HINCRBY by this amount (hash);  float -> ZINCRBY by this amount (sorted set)
#   None  -> HDEL / ZREM
HashFields = dict[str, str | int | None]
ZsetMembers = dict[str, str | float | None]
# A string key: str -> SET, int -> INCRBY, None -> no write pending (the key's type is still known).
StringValue = str | int | None

# One undo record: restore ``container[name]`` to ``old`` (or remove it if ``old`` is _MISSING).
_Undo = tuple[dict[str, Any], str, Any]


class RedisWrites:
    """What a Redis projection's handlers write through: relative keys, nothing sent until commit.

    Keys are relative (``stock:<product id>``); the target adds its prefix, so a rebuild can write
    to a new prefix with the same projection code. A key keeps one Redis type (hash, sorted set or
    string) within a projection: using it as another raises :class:`TypeError`. Writes Redis would
    reject (HINCRBY of a non-integer, int64 overflow, a NaN score) raise here, in the handler, so
    the runner dead-letters that one event instead of a script failing halfway through a batch.
    """

    __slots__ = ("_deleted", "_hashes", "_strings", "_undo", "_zsets")

    def __init__(self) -> None:
        self._hashes: dict[str, HashFields] = {}
        self._zsets: dict[str, ZsetMembers] = {}
        self._strings: dict[str, StringValue] = {}
        # Keys deleted in this batch: DEL runs before the key's pending writes.
        self._deleted: dict[str, bool] = {}
        # Every write since the current event started, to take back if its handler raises. Writing
        # in place and undoing on the rare failure is cheaper than buffering every event's writes.
        self._undo: list[_Undo] = []

    # -- hashes --------------------------------------------------------------------------------

    def hset(self, key: str, mapping: Mapping[str, Value]) -> None:
        """HSET ``key`` with every field of ``mapping``."""
        fields = self._hashes.get(key)
        if fields is None:
            fields = self._new_hash(key)
        undo = self._undo
        for field, value in mapping.items():
            undo.append((fields, field, fields.get(field, _MISSING)))
            fields[field] = value if type(value) is str else _encode(value)

    def hincrby(self, key: str, field: str, amount: int = 1) -> None:
        """HINCRBY ``key`` ``field`` by ``amount``."""
        fields = self._hashes.get(key)
        if fields is None:
            fields = self._new_hash(key)
        if type(amount) is not int:
            raise TypeError(f"hincrby {key!r} {field!r}: amount must be an int, got {amount!r}")
        current = fields.get(field, _MISSING)
        self._undo.append((fields, field, current))
        if type(current) is int:
            total = current + amount
            # The range test inline (not _checked_int): this is the common case, once per counter.
            fields[field] = total if _INT64_MIN <= total <= _INT64_MAX else _checked_int(total, key, field)
        elif current is _MISSING:
            fields[field] = amount if _INT64_MIN <= amount <= _INT64_MAX else _checked_int(amount, key, field)
        elif current is None:  # HDEL pending: the field counts from 0 again
            fields[field] = str(_checked_int(amount, key, field))
        else:
            assert isinstance(current, str)
            fields[field] = str(_checked_int(_stored_int(current, key, field) + amount, key, field))

    def hdel(self, key: str, *fields: str) -> None:
        """HDEL ``fields`` of ``key``."""
        pending = self._hashes.get(key)
        if pending is None:
            pending = self._new_hash(key)
        undo = self._undo
        for field in fields:
            undo.append((pending, field, pending.get(field, _MISSING)))
            pending[field] = None

    # -- sorted sets -----------------------------------------------------------------------------

    def zadd(self, key: str, mapping: Mapping[str, float]) -> None:
        """ZADD ``key`` with ``mapping``: member -> score."""
        members = self._zsets.get(key)
        if members is None:
            members = self._new_zset(key)
        undo = self._undo
        for member, score in mapping.items():
            undo.append((members, member, members.get(member, _MISSING)))
            members[member] = repr(_score(score, key, member))

    def zincrby(self, key: str, member: str, amount: float) -> None:
        """ZINCRBY ``key`` ``member`` by ``amount``.

        Increments of one member are summed here before Redis adds them to the stored score, so
        with fractional amounts the score can differ in its last bit from one ZINCRBY per write
        (float addition is not associative); integral amounts below 2**53 are exact.
        """
        members = self._zsets.get(key)
        if members is None:
            members = self._new_zset(key)
        if type(amount) is int:
            amount = float(amount)
        elif type(amount) is not float:
            amount = _score(amount, key, member)
        elif amount != amount:
            raise ValueError(f"zincrby {key!r} {member!r}: the amount is NaN")
        current = members.get(member, _MISSING)
        self._undo.append((members, member, current))
        if current is _MISSING:
            members[member] = amount
        elif type(current) is float:
            members[member] = _not_nan(current + amount, key, member)
        elif current is None:  # ZREM pending: the member starts from 0 again
            members[member] = repr(0.0 + amount)
        else:
            assert isinstance(current, str)
            members[member] = repr(_not_nan(float(current) + amount, key, member))

    def zrem(self, key: str, *members: str) -> None:
        """ZREM ``members`` from ``key``."""
        pending = self._zsets.get(key)
        if pending is None:
            pending = self._new_zset(key)
        undo = self._undo
        for member in members:
            undo.append((pending, member, pending.get(member, _MISSING)))
            pending[member] = None

    # -- strings and keys ------------------------------------------------------------------------

    def set(self, key: str, value: Value) -> None:
        """SET ``key`` to ``value``."""
        strings = self._strings
        current = strings.get(key, _MISSING)
        if current is _MISSING:
            self._check_type(key, "string")
        self._undo.append((strings, key, current))
        strings[key] = value if type(value) is str else _encode(value)

    def incrby(self, key: str, amount: int = 1) -> None:
        """INCRBY ``key`` by ``amount``."""
        strings = self._strings
        current = strings.get(key, _MISSING)
        if current is _MISSING:
            self._check_type(key, "string")
        if type(amount) is not int:
            raise TypeError(f"incrby {key!r}: amount must be an int, got {amount!r}")
        self._undo.append((strings, key, current))
        if current is _MISSING or current is None:
            strings[key] = _checked_int(amount, key)
        elif type(current) is int:
            strings[key] = _checked_int(current + amount, key)
        else:
            assert isinstance(current, str)
            strings[key] = str(_checked_int(_stored_int(current, key) + amount, key))

    def delete(self, key: str) -> None:
        """DEL ``key``: its pending writes are dropped, later writes apply after the DEL."""
        _check_key(key)
        undo = self._undo
        undo.append((self._deleted, key, self._deleted.get(key, _MISSING)))
        self._deleted[key] = True
        # Swap in a fresh dict rather than clearing: the undo records point at the old one.
        if key in self._hashes:
            undo.append((self._hashes, key, self._hashes[key]))
            self._hashes[key] = {}
        elif key in self._zsets:
            undo.append((self._zsets, key, self._zsets[key]))
            self._zsets[key] = {}
        elif key in self._strings:
            undo.append((self._strings, key, self._strings[key]))
            self._strings[key] = None

    # -- per-event isolation (called by the target's batch) ----------------------------------------

    def start_event(self) -> None:
        """Writes from here on belong to one event (writes before it stay)."""
        self._undo.clear()

    def keep_event(self) -> None:
        """The event's writes stay."""
        self._undo.clear()

    def undo_clear(self) -> Callable[[], None]:
        """What :meth:`start_event` and :meth:`keep_event` do, as one builtin bound method (the undo
        list's own ``clear``; the list is never replaced) for callers that run it per event."""
        return self._undo.clear

    def drop_event(self) -> None:
        """Take back every write since :meth:`start_event`, newest first."""
        undo = self._undo
        for container, name, old in reversed(undo):
            if old is _MISSING:
                container.pop(name, None)
            else:
                container[name] = old
        undo.clear()

    # -- internals ---------------------------------------------------------------------------------

    def _new_hash(self, key: str) -> HashFields:
        self._check_type(key, "hash")
        fields: HashFields = {}
        self._hashes[key] = fields
        return fields

    def _new_zset(self, key: str) -> ZsetMembers:
        self._check_type(key, "sorted set")
        members: ZsetMembers = {}
        self._zsets[key] = members
        return members

    def _check_type(self, key: str, wanted: str) -> None:
        """Runs once per key and batch, when the key is first written as a ``wanted``."""
        _check_key(key)
        for kind, name in ((self._hashes, "hash"), (self._zsets, "sorted set"), (self._strings, "string")):
            if name != wanted and key in kind:
                raise TypeError(
                    f"Redis key {key!r} is written as a {name} and as a {wanted}: "
                    "a key must keep one type within a projection"
                )


def coalesced_commands(writes: RedisWrites) -> list[Any]:
    """The batch's writes as the commit script reads them (relative keys, every value a string).

    ``[deleted keys, hashes, sorted sets, string SETs, string INCRBYs]`` where a hash is
    ``[key, [HDEL fields], [HSET field, value, ...], [HINCRBY field, amount, ...]]`` and a sorted set
    ``[key, [ZREM members], [ZADD score, member, ...], [ZINCRBY amount, member, ...]]``. Numbers
    travel as strings: JSON numbers would reach Lua as doubles, inexact past 2**53.
    """
    hashes: list[Any] = []
    for key, fields in writes._hashes.items():
        if not fields:
            continue
        hdel: list[str] = []
        hset: list[str] = []
        hincr: list[str] = []
        for field, value in fields.items():
            if type(value) is str:
                hset += (field, value)
            elif value is None:
                hdel.append(field)
            else:
                hincr += (field, str(value))
        hashes.append([key, hdel, hset, hincr])
    zsets: list[Any] = []
    for key, members in writes._zsets.items():
        if not members:
            continue
        zrem: list[str] = []
        zadd: list[str] = []
        zincr: list[str] = []
        for member, score in members.items():
            if type(score) is str:
                zadd += (score, member)
            elif score is None:
                zrem.append(member)
            else:
                zincr += (repr(score), member)
        zsets.append([key, zrem, zadd, zincr])
    sets: list[str] = []
    incrs: list[str] = []
    for key, value in writes._strings.items():
        if type(value) is str:
            sets += (key, value)
        elif value is not None:
            incrs += (key, str(value))
    return [list(writes._deleted), hashes, zsets, sets, incrs]


def _check_key(key: str) -> None:
    if type(key) is not str:
        raise TypeError(f"Redis key must be a str, got {key!r}")
    if key.startswith(_RESERVED):
        raise ValueError(f"Redis key {key!r}: keys under {_RESERVED!r} hold the target's bookkeeping")


def _encode(value: object) -> str:
    """A value as redis-py would send it (str of the number), rejecting what it would reject."""
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in Redis: use str, int, float or Decimal")


def _score(value: object, key: str, member: str) -> float:
    if not isinstance(value, int | float | Decimal) or isinstance(value, bool):
        raise TypeError(f"sorted set {key!r} {member!r}: score must be a number, got {value!r}")
    score = float(value)
    if math.isnan(score):
        raise ValueError(f"sorted set {key!r} {member!r}: the score is NaN")
    return score


def _not_nan(score: float, key: str, member: str) -> float:
    if score != score:
        raise ValueError(f"sorted set {key!r} {member!r}: the score would be NaN (inf - inf)")
    return score


def _checked_int(value: int, key: str, field: str | None = None) -> int:
    if _INT64_MIN <= value <= _INT64_MAX:
        return value
    where = key if field is None else f"{key!r} {field!r}"
    raise OverflowError(f"{where}: {value} is outside Redis's 64-bit integers")


def _stored_int(value: str, key: str, field: str | None = None) -> int:
    """``value`` as Redis's INCRBY reads it: a canonical base-10 integer, nothing else."""
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or str(number) != value:
        where = key if field is None else f"{key!r} {field!r}"
        raise ValueError(f"{where}: {value!r} is not an integer, Redis would refuse to increment it")
    return number
