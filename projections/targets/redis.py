"""Redis read models: a projection's keys under one prefix, each batch applied by one Lua script.

The script checks that no other process applied the batch's streams meanwhile, then applies the
coalesced writes, the stream versions and the checkpoints together: Redis runs a script alone, so
readers never see half a batch, and a conflicting batch writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import orjson
import redis
import redis.exceptions

from projections.commit_signal import CommitSignal
from projections.projection import Projection
from projections.target import BatchConflict
from projections.targets.redis_commit_signal import commit_signal
from projections.targets.redis_writes import RedisWrites, coalesced_commands

if TYPE_CHECKING:
    from projections.target import ProjectionTarget, TargetBatch

__all__ = ["RedisProjection", "RedisTarget", "RedisWrites"]

log = logging.getLogger("datalayer.projections")

# Keys UNLINKed per call by drop().
_DROP_CHUNK: Final = 500
# Stream versions a target remembers at most (see RedisTarget._known); about 100 bytes each.
_KNOWN_LIMIT: Final = 200_000

# KEYS[1]: meta:versions, KEYS[2]: meta:checkpoints. ARGV[1]: the key prefix. ARGV[2]: the batch as
# JSON: [stream ids read, the version each had ("" for none), [stream id, version, ...],
# [source, position, ...], coalesced_commands()]. JSON rather than MessagePack: for a 500-event
# batch cmsgpack.unpack saves Redis ~70 us over cjson.decode (~190 vs ~260 us), but the project has
# no msgpack encoder, and orjson encodes the payload in ~15 us where pure Python would take a ms.
#
# Redis does not roll back a script that fails midway, so the Python side rejects every write it
# can foresee failing (a key used as two types, HINCRBY of a non-integer, int64 overflow, NaN
# scores) before the script runs. What it cannot foresee -- a key already holding another type in
# Redis, an INCRBY overflowing the stored value -- fails that one command only (redis.pcall), as
# it would in a MULTI/EXEC of one command per write; the errors are returned and logged. The
# versions and checkpoints are written first so that such a batch still counts as applied and is
# never applied a second time over what it did write.
_COMMIT_LUA: Final = """
local vkey, ckey, p = KEYS[1], KEYS[2], ARGV[1]
local b = cjson.decode(ARGV[2])
local N = 1000  -- arguments per command: Lua's unpack has a stack limit
local ids, want = b[1], b[2]
for i = 1, #ids, N do
  local j = math.min(i + N - 1, #ids)
  local got = redis.call('HMGET', vkey, unpack(ids, i, j))
  for k = i, j do
    if (got[k - i + 1] or '') ~= want[k] then
      return {1, ids[k]}
    end
  end
end

local errors = {}
local function call(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then
    errors[#errors + 1] = r.err
  end
end
local function chunked(cmd, key, args)
  for i = 1, #args, N do
    call(cmd, key, unpack(args, i, math.min(i + N - 1, #args)))
  end
end

chunked('HSET', vkey, b[3])
chunked('HSET', ckey, b[4])

local w = b[5]
local dels = w[1]
for i = 1, #dels, N do
  local keys = {}
  for k = i, math.min(i + N - 1, #dels) do
    keys[#keys + 1] = p .. dels[k]
  end
  call('DEL', unpack(keys))
end
for _, h in ipairs(w[2]) do
  local key = p .. h[1]
  chunked('HDEL', key, h[2])
  chunked('HSET', key, h[3])
  local incr = h[4]
  for i = 1, #incr, 2 do
    call('HINCRBY', key, incr[i], incr[i + 1])
  end
end
for _, z in ipairs(w[3]) do
  local key = p .. z[1]
  chunked('ZREM', key, z[2])
  chunked('ZADD', key, z[3])
  local incr = z[4]
  for i = 1, #incr, 2 do
    call('ZINCRBY', key, incr[i], incr[i + 1])
  end
end
local sets = w[4]
for i = 1, #sets, 2 do
  call('SET', p .. sets[i], sets[i + 1])
end
local incrs = w[5]
for i = 1, #incrs, 2 do
  call('INCRBY', p .. incrs[i], incrs[i + 1])
end
-- Announced to read-your-writes waits (see projections.commit_signal): the channel is CHANNEL.
redis.pcall('PUBLISH', 'datalayer:applied', p)  -- pcall: a user without the channel still commits
return {0, #errors, unpack(errors, 1, math.min(#errors, 10))}
"""


class RedisProjection(Projection[RedisWrites]):
    """Base class of projections whose read model lives in Redis (handlers write :class:`RedisWrites`)."""


class RedisTarget:
    """A Redis projection's keys under one prefix, with its stream versions and checkpoints.

    The default prefix ``dl:{<name>_v<version>}:`` carries a hash tag, so on a Redis Cluster every
    key of one read model sits in one slot and the commit script may touch them all. The
    bookkeeping hashes are ``meta:versions`` (stream id -> last applied version) and
    ``meta:checkpoints`` (source -> position) under the same prefix.
    """

    def __init__(self, client: redis.Redis, projection: RedisProjection, prefix: str | None = None) -> None:
        self.client = client
        self.projection = projection
        self.prefix = prefix if prefix is not None else f"dl:{{{projection.qualified_name}}}:"
        self._versions_key = self.prefix + "meta:versions"
        self._checkpoints_key = self.prefix + "meta:checkpoints"
        # EVALSHA, loading the script on NOSCRIPT (a restarted or different server).
        self._commit_script = client.register_script(_COMMIT_LUA)
        # Stream versions as they stood when this target's last batches committed (the commit script
        # found them unchanged, or wrote them), so a batch reads only the others with HMGET. Only a
        # guess: the script still checks every one before writing, and a conflict forgets them all.
        # Forgotten too on every partition assignment (see forget_applied_versions).
        self._known: dict[str, int] = {}
        # Deferred confirmation (see defer_commits): whether commits only send their script, and
        # the one sent and not yet confirmed.
        self._defer = False
        self._pending: _PendingCommit | None = None

    def key(self, relative: str) -> str:
        """The absolute Redis key of a key a handler wrote as ``relative``: what queries read."""
        return self.prefix + relative

    def setup(self) -> None:
        """Nothing to create in Redis; checks the server answers."""
        self.client.ping()

    def batch(self) -> _RedisBatch:
        """Open a batch; nothing reaches Redis before its commit, so leaving without one discards it."""
        return _RedisBatch(self)

    def checkpoints(self) -> dict[str, str]:
        """Every stored checkpoint: source key -> position."""
        stored: dict[Any, Any] = self.client.hgetall(self._checkpoints_key)
        return {_text(source): _text(position) for source, position in stored.items()}

    def applied_version(self, stream_id: str) -> int | None:
        """The last version of ``stream_id`` applied, or None."""
        version = self.client.hget(self._versions_key, stream_id)
        return None if version is None else int(version)

    def commit_signal(self) -> CommitSignal:
        """Woken by every batch committed under this prefix, by any process (see ``commit_signal``)."""
        return commit_signal(self.client, self.prefix)

    def forget_applied_versions(self) -> None:
        """Read every stream's version from Redis again from the next batch on.

        The consumer calls it when its partitions change: another process may have applied their
        streams meanwhile, and a remembered version behind the stored one would make the runner
        see a version gap (and dead-letter the event) before the commit script could refuse it.
        """
        self._known.clear()

    def close(self) -> None:
        """Nothing to release: the client is the caller's, and stays open for its other users."""

    def drop(self) -> None:
        """Delete every key under the prefix: the read model, its versions and its checkpoints."""
        chunk: list[Any] = []
        for key in self.client.scan_iter(match=_glob_escape(self.prefix) + "*", count=1000):
            chunk.append(key)
            if len(chunk) >= _DROP_CHUNK:
                self.client.unlink(*chunk)
                chunk.clear()
        if chunk:
            self.client.unlink(*chunk)

    def defer_commits(self, enabled: bool = True) -> None:
        """With ``enabled``, a batch's commit sends its script and returns without waiting for Redis;
        :meth:`confirm_commit` then reads the outcome. Without, commits wait (the default).

        Why: the consumer runtime polls Kafka for the next batch while Redis runs this one's script,
        instead of waiting for it first. Only the wait moves: the script and what it checks and
        writes are the same, and the runtime confirms a batch before it applies the next one, so
        every batch still reads versions that the previous one's commit left.
        """
        if not enabled and self._pending is not None:
            raise RuntimeError("a commit awaits confirm_commit()")
        self._defer = enabled

    def confirm_commit(self) -> None:
        """Wait for the commit sent last, if it awaits confirmation, and raise what a waiting commit
        would have raised: :class:`BatchConflict`, or the connection's error (when the script may
        or may not have run: applying the batch again is safe, the versions skip what it did)."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        pool = self.client.connection_pool
        try:
            try:
                result: list[Any] | None = pending.connection.read_response()
            except redis.exceptions.NoScriptError:
                result = None  # a restarted or other server without the script: it did not run
        except BaseException:
            self._known.clear()  # the script may have run: remember nothing that may be stale
            pending.connection.disconnect()
            raise
        finally:
            pool.release(pending.connection)
        if result is None:
            self._commit(pending.payload)  # loads the script, runs it and waits
        else:
            self._check(result)
        pending.committed()

    def _commit(self, payload: bytes) -> None:
        try:
            result: list[Any] = self._commit_script(
                keys=[self._versions_key, self._checkpoints_key],
                args=[self.prefix, payload],
                client=self.client,
            )
        except BaseException:
            self._known.clear()  # the script may have run: remember nothing that may be stale
            raise
        self._check(result)

    def _send(self, payload: bytes, committed: Callable[[], None]) -> None:
        """Send the commit script's EVALSHA on a connection of its own and return: confirm_commit()
        reads the reply, and calls ``committed`` once the batch is known to be applied."""
        if self._pending is not None:
            raise RuntimeError("a commit already awaits confirm_commit()")
        pool = self.client.connection_pool
        connection: Any = pool.get_connection()  # redis-py leaves its methods untyped
        try:
            connection.send_command(
                "EVALSHA",
                self._commit_script.sha,
                2,
                self._versions_key,
                self._checkpoints_key,
                self.prefix,
                payload,
            )
        except BaseException:
            self._known.clear()
            connection.disconnect()
            pool.release(connection)
            raise
        self._pending = _PendingCommit(connection, payload, committed)

    def _check(self, result: list[Any]) -> None:
        """Raise :class:`BatchConflict` if the script refused the batch; log writes that failed."""
        if result[0] == 1:
            self._known.clear()
            raise BatchConflict(f"stream {_text(result[1])} was applied by another process meanwhile")
        if result[1]:
            log.error(
                "projection %s: %d Redis writes failed and were skipped (the rest of the batch is "
                "applied): %s",
                self.projection.name,
                result[1],
                "; ".join(_text(error) for error in result[2:]),
            )


class _RedisBatch:
    """One batch of a :class:`RedisTarget`: the versions it read and the writes it coalesces."""

    __slots__ = (
        "_committed",
        "_ids",
        "_seen",
        "_target",
        "drop_event",
        "keep_event",
        "start_event",
        "writes",
    )

    # The per-event isolation the runner calls around every handler, straight into the writes:
    # start_event and keep_event forget the undo records (a builtin call each, no Python frame),
    # drop_event takes the event's writes back. See RedisWrites.start_event and its neighbours.
    start_event: Callable[[], None]
    keep_event: Callable[[], None]
    drop_event: Callable[[], None]

    def __init__(self, target: RedisTarget) -> None:
        self._target = target
        self.writes = writes = RedisWrites()
        self.start_event = self.keep_event = writes.undo_clear()
        self.drop_event = writes.drop_event
        self._ids: list[str] = []
        self._seen: list[str] = []  # the version each of _ids had, "" for none
        self._committed = False

    def __enter__(self) -> _RedisBatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def applied_versions(self, stream_ids: Collection[str], fresh: Collection[str] = ()) -> dict[str, int]:
        """The versions this target remembers, and one HMGET for the others but ``fresh`` ones,
        taken as never applied; the commit script checks all of them are unchanged before writing,
        so a fresh stream applied after all makes the batch conflict, and its retry reads it."""
        known = self._target._known
        found: dict[str, int] = {}
        ids = self._ids
        seen = self._seen
        unknown: list[str] = []
        skipped = set(fresh) if fresh else ()
        for sid in stream_ids:
            version = known.get(sid)
            if version is None:
                if sid in skipped:
                    ids.append(sid)
                    seen.append("")  # absent, as the script will check
                else:
                    unknown.append(sid)
            else:
                found[sid] = version
                ids.append(sid)
                seen.append(str(version))
        if unknown:
            stored: list[Any] = self._target.client.hmget(self._target._versions_key, unknown)
            for sid, value in zip(unknown, stored, strict=True):
                ids.append(sid)
                if value is None:
                    seen.append("")
                else:
                    text = _text(value)
                    seen.append(text)
                    found[sid] = int(text)
        return found

    def commit(self, versions: Mapping[str, int], checkpoints: Mapping[str, str]) -> None:
        """Apply writes, versions and checkpoints in one script; :class:`BatchConflict` writes nothing."""
        if self._committed:
            raise RuntimeError("this batch is already committed")
        commands = coalesced_commands(self.writes)
        version_args: list[str] = []
        for sid, version in versions.items():
            version_args += (sid, str(version))
        checkpoint_args: list[str] = []
        for source, position in checkpoints.items():
            checkpoint_args += (source, position)
        if version_args or checkpoint_args or any(commands):
            payload = orjson.dumps([self._ids, self._seen, version_args, checkpoint_args, commands])
            target = self._target

            def committed() -> None:
                # What the script checked and what it wrote is what Redis holds now.
                known = target._known
                if len(known) + len(self._ids) > _KNOWN_LIMIT:
                    known.clear()
                for sid, text in zip(self._ids, self._seen, strict=True):
                    if text:
                        known[sid] = int(text)
                known.update(versions)

            if target._defer:
                target._send(payload, committed)
            else:
                target._commit(payload)
                committed()
        self._committed = True


@dataclass(frozen=True, slots=True)
class _PendingCommit:
    """A commit script sent and not yet confirmed: its connection (out of the pool until the reply is
    read), its payload (to run again if the server had no script), what to do once applied."""

    connection: Any
    payload: bytes
    committed: Callable[[], None]


def _text(value: bytes | str) -> str:
    """A reply as text, whether or not the client decodes responses."""
    return value if isinstance(value, str) else value.decode()


def _glob_escape(text: str) -> str:
    """``text`` matched literally by SCAN MATCH."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


if TYPE_CHECKING:
    # mypy checks here that the target and its batch implement the protocols the runner uses.
    def _conforms(
        target: RedisTarget, batch: _RedisBatch
    ) -> tuple[ProjectionTarget[RedisWrites], TargetBatch[RedisWrites]]:
        return target, batch
