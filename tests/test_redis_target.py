"""RedisTarget on the real Redis: coalesced writes, exactly-once batches, per-event isolation.

Events are built directly and fed through ``apply_batch``, the runner's one code path; a tiny
projection runs the Redis writes each event's payload lists.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import hypothesis.strategies as st
import pytest
import redis
from hypothesis import HealthCheck, given, settings

from consumers.runtime import ConsumerConfig, ProjectionConsumer, _Batch
from projections.events import ProjectedEvent
from projections.projection import handles
from projections.runner import BatchOutcome, DeadLetter, SourceItem, apply_batch
from projections.target import BatchConflict
from projections.targets import RedisProjection, RedisTarget, RedisWrites
from projections.targets.redis_writes import coalesced_commands
from tests.helpers import unique_name

OP = "tests.Op"
Op = tuple[str, tuple[Any, ...]]


class StubDecoder:
    """Accepts every event; its payload is the raw payload itself."""

    def check(self, event: ProjectedEvent) -> None:
        pass

    def bind(self, event: ProjectedEvent) -> None:
        event._decode = lambda e: e.raw_payload


class OpsProjection(RedisProjection):
    """Runs the writes listed in each event's payload, then raises if the payload says so."""

    name = "redis_target_test"
    stream_types = ("Test",)

    def __init__(self) -> None:
        super().__init__(decoder=StubDecoder())  # type: ignore[arg-type]
        self.calls: list[int] = []
        self.hook: Callable[[ProjectedEvent], None] | None = None

    @handles(OP)
    def run(self, event: ProjectedEvent, writes: RedisWrites) -> None:
        self.calls.append(event.stream_version)
        if self.hook is not None:
            self.hook(event)
        for name, args in event.data["ops"]:
            getattr(writes, name)(*args)
        if event.data.get("poison"):
            raise RuntimeError("poisoned on purpose")


@pytest.fixture
def setup(redis_conn: redis.Redis) -> Iterator[tuple[OpsProjection, RedisTarget]]:
    projection = OpsProjection()
    target = RedisTarget(redis_conn, projection, prefix=unique_name("rt") + ":")
    target.setup()
    yield projection, target
    target.drop()
    assert list(redis_conn.scan_iter(match=target.prefix + "*")) == []


def item(stream_id: str, version: int, ops: Sequence[Op], poison: bool = False) -> SourceItem:
    event = ProjectedEvent(
        stream_id=stream_id,
        stream_type="Test",
        stream_version=version,
        event_id=str(uuid.uuid4()),
        event_type=OP,
        schema_version=1,
        position=version,
        transaction_id=version,
        recorded_at=datetime.now(UTC),
        metadata={},
        payload_encoding="json",
        raw_payload={"ops": list(ops), "poison": poison},
    )
    return SourceItem(event=event, original=("record", stream_id, version))


def apply(
    projection: OpsProjection, target: RedisTarget, items: Sequence[SourceItem], position: str = "1"
) -> tuple[BatchOutcome, list[DeadLetter]]:
    dead: list[DeadLetter] = []
    outcome = apply_batch(projection, target, items, {"test:0": position}, dead.extend)
    return outcome, dead


def reference(client: redis.Redis, prefix: str, name: str, args: tuple[Any, ...]) -> None:
    """Issue one write straight to Redis, as redis-py would."""
    key = prefix + args[0]
    if name == "hset":
        client.hset(key, mapping={f: str(v) if isinstance(v, Decimal) else v for f, v in args[1].items()})
    elif name == "hincrby":
        client.hincrby(key, args[1], args[2])
    elif name == "hdel":
        client.hdel(key, *args[1:])
    elif name == "zadd":
        client.zadd(key, args[1])
    elif name == "zincrby":
        client.zincrby(key, args[2], args[1])
    elif name == "zrem":
        client.zrem(key, *args[1:])
    elif name == "set":
        client.set(key, str(args[1]) if isinstance(args[1], Decimal) else args[1])
    elif name == "incrby":
        client.incrby(key, args[1])
    elif name == "delete":
        client.delete(key)
    else:
        raise AssertionError(name)


def snapshot(client: redis.Redis, prefix: str) -> dict[str, tuple[str, Any]]:
    """Every read-model key under ``prefix`` (not the bookkeeping): relative key -> (type, content)."""
    found: dict[str, tuple[str, Any]] = {}
    for raw in client.scan_iter(match=prefix + "*"):
        key = raw.decode()
        relative = key[len(prefix) :]
        if relative.startswith("meta:"):
            continue
        kind = client.type(key).decode()
        if kind == "hash":
            found[relative] = (kind, client.hgetall(key))
        elif kind == "zset":
            found[relative] = (kind, client.zrange(key, 0, -1, withscores=True))
        else:
            found[relative] = (kind, client.get(key))
    return found


# -- coalescing equals one-by-one application ---------------------------------------------------

_ints = st.integers(-1000, 1000)
# Values an increment can read back: canonical integers, whatever type they were written as.
_numeric = st.one_of(_ints, _ints.map(str), _ints.map(Decimal))
_text = st.one_of(
    st.text(max_size=6),
    st.floats(allow_nan=False),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
)
# Quarters add exactly, so float sums do not depend on how they are grouped.
_scores = st.integers(-40, 40).map(lambda i: i / 4)
_hash_keys = st.sampled_from(["h:1", "h:2"])
_zset_keys = st.sampled_from(["z:1", "z:2"])
_members = st.sampled_from(["a", "b", "c"])
_number_fields = st.sampled_from(["n1", "n2"])


def _hash_mapping() -> st.SearchStrategy[dict[str, Any]]:
    numbers = st.dictionaries(_number_fields, _numeric, max_size=2)
    text = st.dictionaries(st.just("t"), _text, max_size=1)
    return st.builds(lambda n, t: {**n, **t}, numbers, text).filter(bool)


_ops: st.SearchStrategy[Op] = st.one_of(
    st.tuples(st.just("hset"), st.tuples(_hash_keys, _hash_mapping())),
    st.tuples(st.just("hincrby"), st.tuples(_hash_keys, _number_fields, _ints)),
    st.builds(
        lambda k, fs: ("hdel", (k, *fs)),
        _hash_keys,
        st.lists(st.sampled_from(["n1", "n2", "t"]), min_size=1, max_size=2, unique=True),
    ),
    st.tuples(st.just("zadd"), st.tuples(_zset_keys, st.dictionaries(_members, _scores, min_size=1))),
    st.tuples(st.just("zincrby"), st.tuples(_zset_keys, _members, _scores)),
    st.builds(
        lambda k, ms: ("zrem", (k, *ms)), _zset_keys, st.lists(_members, min_size=1, max_size=2, unique=True)
    ),
    st.tuples(st.just("set"), st.tuples(st.just("count"), _numeric)),
    st.tuples(st.just("incrby"), st.tuples(st.just("count"), _ints)),
    st.tuples(st.just("set"), st.tuples(st.just("label"), _text)),
    st.tuples(st.just("delete"), st.tuples(st.sampled_from(["h:1", "h:2", "z:1", "z:2", "count", "label"]))),
)
_INITIAL: list[Op] = [
    ("hset", ("h:1", {"n1": 5, "n2": -3, "t": "text"})),
    ("hset", ("h:2", {"n1": 7, "t": "1.25"})),
    ("zadd", ("z:1", {"a": 2.5, "b": -1.0, "c": 0.75})),
    ("zadd", ("z:2", {"a": 1.0, "c": 3.0})),
    ("set", ("count", 11)),
    ("set", ("label", "start")),
]
_events = st.tuples(st.lists(_ops, min_size=1, max_size=5), st.sampled_from([False, False, False, True]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(_events, min_size=1, max_size=8), min_size=1, max_size=3))
def test_coalesced_batches_equal_one_by_one_writes(
    redis_conn: redis.Redis, batches: list[list[tuple[list[Op], bool]]]
) -> None:
    projection = OpsProjection()
    target = RedisTarget(redis_conn, projection, prefix=unique_name("rt") + ":")
    expected = unique_name("ref") + ":"
    stream = str(uuid.uuid4())
    try:
        # Every key starts out holding data, so each pending write lands on a stored value.
        for prefix in (target.prefix, expected):
            for name, args in _INITIAL:
                reference(redis_conn, prefix, name, args)
        version = 0
        for events in batches:
            items = []
            for ops, poison in events:
                version += 1
                items.append(item(stream, version, ops, poison))
                if not poison:
                    for name, args in ops:
                        reference(redis_conn, expected, name, args)
            outcome, dead = apply(projection, target, items, position=str(version))
            assert outcome.applied == len(events)
            assert [d.reason for d in dead] == ["poison"] * sum(poison for _, poison in events)
        assert snapshot(redis_conn, target.prefix) == snapshot(redis_conn, expected)
        assert target.applied_version(stream) == version
        assert target.checkpoints() == {"test:0": str(version)}
    finally:
        target.drop()
        RedisTarget(redis_conn, projection, prefix=expected).drop()


def test_writes_to_one_field_become_one_command() -> None:
    writes = RedisWrites()
    for _ in range(3):
        writes.hincrby("stock:1", "reserved", 2)
        writes.zincrby("best", "p1", 1)
        writes.incrby("count", 5)
    writes.hset("stock:1", {"sku": "A-1", "price": Decimal("9.50")})
    writes.hincrby("stock:1", "units", 1)
    writes.hset("stock:1", {"units": 7})  # overrides the increment before it
    writes.hincrby("stock:1", "units", 3)  # folds into the pending value
    writes.zadd("best", {"p2": 1.5})
    writes.zincrby("best", "p2", 1)
    writes.hdel("stock:1", "old")
    writes.hincrby("stock:1", "old", 4)  # after HDEL the field starts from 0
    writes.delete("gone")
    assert coalesced_commands(writes) == [
        ["gone"],
        [["stock:1", [], ["sku", "A-1", "price", "9.50", "units", "10", "old", "4"], ["reserved", "6"]]],
        [["best", [], ["2.5", "p2"], ["3.0", "p1"]]],
        [],
        ["count", "15"],
    ]


def test_delete_drops_pending_writes_and_later_ones_apply_after_it(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    redis_conn.hset(target.key("h"), mapping={"old": "1", "n": "5"})
    ops: list[Op] = [
        ("hincrby", ("h", "n", 2)),
        ("delete", ("h",)),
        ("hincrby", ("h", "n", 3)),
        ("hset", ("h", {"new": "x"})),
    ]
    apply(projection, target, [item(str(uuid.uuid4()), 1, ops)])
    assert redis_conn.hgetall(target.key("h")) == {b"n": b"3", b"new": b"x"}


# -- exactly once -------------------------------------------------------------------------------


def test_redelivered_events_are_skipped(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    stream = str(uuid.uuid4())
    ops: list[Op] = [("hincrby", ("counts", "n", 1)), ("zincrby", ("best", "x", 2))]
    items = [item(stream, v, ops) for v in (1, 2, 3)]
    first, _ = apply(projection, target, items)
    again, dead = apply(projection, target, items)
    assert (first.applied, first.duplicates) == (3, 0)
    assert (again.applied, again.duplicates, dead) == (0, 3, [])
    assert redis_conn.hget(target.key("counts"), "n") == b"3"
    assert redis_conn.zscore(target.key("best"), "x") == 6.0
    assert projection.calls == [1, 2, 3]


def test_a_version_gap_is_dead_lettered_and_not_applied(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    stream = str(uuid.uuid4())
    items = [item(stream, 1, [("incrby", ("count", 1))]), item(stream, 3, [("incrby", ("count", 10))])]
    outcome, dead = apply(projection, target, items)
    assert [(d.reason, d.event.stream_version if d.event else None) for d in dead] == [("version_gap", 3)]
    assert dead[0].original == ("record", stream, 3)
    assert outcome.applied == 1
    assert redis_conn.get(target.key("count")) == b"1"
    assert target.applied_version(stream) == 1


def test_a_poison_event_is_dead_lettered_with_none_of_its_writes(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    stream = str(uuid.uuid4())
    setup_ops: list[Op] = [("hset", ("h", {"a": "1"})), ("zadd", ("z", {"m": 1})), ("set", ("s", "kept"))]
    apply(projection, target, [item(stream, 1, setup_ops)], position="1")
    poison_ops: list[Op] = [
        ("hincrby", ("h", "a", 5)),
        ("hset", ("h", {"b": "2"})),
        ("hdel", ("h", "a")),
        ("zincrby", ("z", "m", 3)),
        ("zrem", ("z", "m")),
        ("set", ("s", "lost")),
        ("delete", ("s",)),
        ("incrby", ("n", 1)),
    ]
    items = [
        item(stream, 2, [("hincrby", ("h", "a", 1))]),
        item(stream, 3, poison_ops, poison=True),
        item(stream, 4, [("hincrby", ("h", "a", 1)), ("zincrby", ("z", "m", 1))]),
    ]
    outcome, dead = apply(projection, target, items, position="4")
    assert [d.reason for d in dead] == ["poison"]
    assert dead[0].event is items[1].event
    assert "RuntimeError: poisoned on purpose" in dead[0].error
    assert outcome.applied == 3
    assert snapshot(redis_conn, target.prefix) == {
        "h": ("hash", {b"a": b"3"}),
        "z": ("zset", [(b"m", 2.0)]),
        "s": ("string", b"kept"),
    }
    assert target.applied_version(stream) == 4


def test_versions_and_checkpoints_commit_with_the_writes(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    one, two = str(uuid.uuid4()), str(uuid.uuid4())
    assert target.checkpoints() == {}
    assert target.applied_version(one) is None
    items = [item(one, 1, [("incrby", ("n", 1))]), item(two, 1, []), item(one, 2, [("incrby", ("n", 1))])]
    dead: list[DeadLetter] = []
    apply_batch(projection, target, items, {"orders:0": "41", "orders:1": "7"}, dead.extend)
    assert (target.applied_version(one), target.applied_version(two)) == (2, 1)
    assert target.checkpoints() == {"orders:0": "41", "orders:1": "7"}
    assert redis_conn.hgetall(target.key("meta:versions")) == {one.encode(): b"2", two.encode(): b"1"}
    apply_batch(projection, target, [item(two, 2, [("incrby", ("n", 1))])], {"orders:1": "8"}, dead.extend)
    assert target.checkpoints() == {"orders:0": "41", "orders:1": "8"}
    assert redis_conn.get(target.key("n")) == b"3"
    assert dead == []


@pytest.mark.parametrize("changed", ["known stream", "new stream"])
def test_a_batch_whose_streams_changed_meanwhile_writes_nothing(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis, changed: str
) -> None:
    projection, target = setup
    known, new = str(uuid.uuid4()), str(uuid.uuid4())
    apply(projection, target, [item(known, 1, [("hset", ("h", {"a": "1"}))])], position="1")
    before = snapshot(redis_conn, target.prefix)
    with target.batch() as batch:
        assert batch.applied_versions([known, new]) == {known: 1}
        batch.writes.hset("h", {"a": "2"})
        batch.writes.zadd("z", {"m": 1})
        batch.writes.delete("h")
        # Another process applies one of the streams between the read and the commit.
        redis_conn.hset(target.key("meta:versions"), known if changed == "known stream" else new, "2")
        with pytest.raises(BatchConflict, match=known if changed == "known stream" else new):
            batch.commit({known: 2, new: 1}, {"test:0": "2"})
    assert snapshot(redis_conn, target.prefix) == before
    assert target.checkpoints() == {"test:0": "1"}


def test_the_runner_retries_a_conflict_and_skips_what_the_other_process_did(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    projection, target = setup
    stream = str(uuid.uuid4())

    def other_process_applies_version_1(event: ProjectedEvent) -> None:
        projection.hook = None
        redis_conn.hincrby(target.key("h"), "n", 1)
        redis_conn.hset(target.key("meta:versions"), stream, "1")

    projection.hook = other_process_applies_version_1
    items = [item(stream, 1, [("hincrby", ("h", "n", 1))]), item(stream, 2, [("hincrby", ("h", "n", 1))])]
    with caplog.at_level(logging.INFO, logger="datalayer.projections"):
        outcome, dead = apply(projection, target, items, position="2")
    assert any("conflicted" in record.getMessage() for record in caplog.records)
    assert projection.calls == [1, 2, 2]  # the first attempt ran both, the retry only version 2
    assert (outcome.applied, outcome.duplicates, dead) == (1, 1, [])
    assert redis_conn.hget(target.key("h"), "n") == b"2"
    assert target.applied_version(stream) == 2
    assert target.checkpoints() == {"test:0": "2"}


def test_versions_a_target_committed_are_remembered_and_not_read_again(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    known, new = str(uuid.uuid4()), str(uuid.uuid4())
    apply(projection, target, [item(known, 1, [("hincrby", ("h", "n", 1))])], position="1")
    # Hidden from HMGET but not from the script: the remembered version is used, and the script
    # still finds it current, so the batch applies.
    with target.batch() as batch:
        assert batch.applied_versions([known, new]) == {known: 1}
        assert batch._ids == [known, new] and batch._seen == ["1", ""]
    outcome, dead = apply(
        projection,
        target,
        [item(known, 2, [("hincrby", ("h", "n", 1))]), item(new, 1, [("hincrby", ("h", "n", 1))])],
        position="2",
    )
    assert (outcome.applied, outcome.duplicates, dead) == (2, 0, [])
    assert redis_conn.hget(target.key("h"), "n") == b"3"


def test_fresh_streams_are_not_read_and_one_applied_already_conflicts_and_is_read_on_the_retry(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    """With ``fresh_streams`` (a replay), streams starting in the batch are taken as absent without
    an HMGET; one applied after all (by another target object: nothing remembered) makes the script
    refuse the batch, which is applied again reading every stream: nothing is applied twice."""
    projection, target = setup
    done, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    apply(projection, target, [item(done, 1, [("hincrby", ("h", "n", 1))])], position="1")
    other = RedisTarget(redis_conn, projection, prefix=target.prefix)  # remembers nothing
    with other.batch() as batch:
        assert batch.applied_versions([done, fresh], fresh=[done, fresh]) == {}
        assert batch._ids == [done, fresh] and batch._seen == ["", ""]
    items = [item(sid, 1, [("hincrby", ("h", "n", 1))]) for sid in (done, fresh)]
    items.append(item(fresh, 2, [("hincrby", ("h", "n", 1))]))
    outcome = apply_batch(projection, other, items, {"test:0": "2"}, [].extend, fresh_streams=True)
    assert (outcome.applied, outcome.duplicates) == (2, 1)  # the retry's: done's version 1 skipped
    assert redis_conn.hget(target.key("h"), "n") == b"3"
    assert other.applied_version(done) == 1 and other.applied_version(fresh) == 2


def test_a_remembered_version_another_process_moved_is_caught_by_the_script(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    stream = str(uuid.uuid4())
    apply(projection, target, [item(stream, 1, [("hincrby", ("h", "n", 1))])], position="1")
    # Another process (holding the partition for a while) applies version 2 behind this target's back.
    other = RedisTarget(redis_conn, projection, prefix=target.prefix)
    apply(projection, other, [item(stream, 2, [("hincrby", ("h", "n", 1))])], position="2")
    # Version 2 again, then 3: the remembered version 1 says 2 is new, the script refuses the
    # batch, the retry reads versions from Redis and skips 2.
    items = [item(stream, 2, [("hincrby", ("h", "n", 1))]), item(stream, 3, [("hincrby", ("h", "n", 1))])]
    outcome, dead = apply(projection, target, items, position="3")
    assert (outcome.applied, outcome.duplicates, dead) == (1, 1, [])
    assert redis_conn.hget(target.key("h"), "n") == b"3"
    assert target.applied_version(stream) == 3


def test_forgotten_versions_are_read_again_so_no_gap_is_seen(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    stream = str(uuid.uuid4())
    apply(projection, target, [item(stream, 1, [("hincrby", ("h", "n", 1))])], position="1")
    other = RedisTarget(redis_conn, projection, prefix=target.prefix)
    apply(projection, other, [item(stream, 2, [("hincrby", ("h", "n", 1))])], position="2")
    # The partition comes back to this consumer after a rebalance: it forgets, and version 3 is
    # the next one, not a gap after a remembered 1.
    target.forget_applied_versions()
    outcome, dead = apply(projection, target, [item(stream, 3, [("hincrby", ("h", "n", 1))])], position="3")
    assert (outcome.applied, outcome.duplicates, dead) == (1, 0, [])
    assert target.applied_version(stream) == 3


# -- deferred commits (the consumer runtime polls Kafka while Redis runs the script) ------------


def test_a_deferred_commit_counts_once_confirmed_and_one_waits_at_a_time(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    stream = str(uuid.uuid4())
    target.defer_commits(True)
    apply(projection, target, [item(stream, 1, [("hincrby", ("h", "n", 1))])], position="1")
    with pytest.raises(RuntimeError, match="awaits"):
        apply(projection, target, [item(stream, 2, [("hincrby", ("h", "n", 1))])], position="2")
    with pytest.raises(RuntimeError, match="awaits"):
        target.defer_commits(False)
    assert target._known == {}  # remembered only once confirmed
    target.confirm_commit()
    target.confirm_commit()  # nothing awaits: a no-op
    assert target._known == {stream: 1}
    assert (target.applied_version(stream), target.checkpoints()) == (1, {"test:0": "1"})
    apply(projection, target, [item(stream, 2, [("hincrby", ("h", "n", 1))])], position="2")
    target.confirm_commit()
    target.defer_commits(False)
    assert redis_conn.hget(target.key("h"), "n") == b"2"
    assert (target.applied_version(stream), target.checkpoints()) == (2, {"test:0": "2"})


def test_a_deferred_commit_that_conflicts_raises_when_confirmed_and_writes_nothing(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    stream = str(uuid.uuid4())
    apply(projection, target, [item(stream, 1, [("hset", ("h", {"a": "1"}))])], position="1")
    before = snapshot(redis_conn, target.prefix)
    target.defer_commits(True)
    with target.batch() as batch:
        assert batch.applied_versions([stream]) == {stream: 1}
        batch.writes.hset("h", {"a": "2"})
        redis_conn.hset(target.key("meta:versions"), stream, "2")  # another process, meanwhile
        batch.commit({stream: 2}, {"test:0": "2"})  # sent: the outcome is read when confirmed
    with pytest.raises(BatchConflict, match=stream):
        target.confirm_commit()
    target.defer_commits(False)
    assert snapshot(redis_conn, target.prefix) == before
    assert target.checkpoints() == {"test:0": "1"}
    assert target._known == {}


def test_a_deferred_commit_runs_the_script_when_the_server_does_not_have_it(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    stream = str(uuid.uuid4())
    redis_conn.script_flush()  # as after a restart: EVALSHA answers NOSCRIPT and runs nothing
    target.defer_commits(True)
    apply(projection, target, [item(stream, 1, [("hincrby", ("h", "n", 1))])], position="1")
    target.confirm_commit()
    target.defer_commits(False)
    assert redis_conn.hget(target.key("h"), "n") == b"1"
    assert (target.applied_version(stream), target.checkpoints()) == (1, {"test:0": "1"})


def test_the_consumer_applies_again_a_batch_whose_deferred_commit_conflicted(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    stream = str(uuid.uuid4())
    consumer = ProjectionConsumer(projection, target, {}, ConsumerConfig())
    target.defer_commits(True)

    def other_process_applies_version_1(event: ProjectedEvent) -> None:
        projection.hook = None
        redis_conn.hincrby(target.key("h"), "n", 1)
        redis_conn.hset(target.key("meta:versions"), stream, "1")

    projection.hook = other_process_applies_version_1
    items = [item(stream, 1, [("hincrby", ("h", "n", 1))]), item(stream, 2, [("hincrby", ("h", "n", 1))])]
    dead: list[DeadLetter] = []
    stop = threading.Event()
    # The runner's commit only sent the script, so the conflict shows when the consumer confirms it.
    outcome = consumer._apply(items, {"test:0": "2"}, dead.extend, stop)  # type: ignore[arg-type]
    assert projection.calls == [1, 2] and outcome.applied == 2
    consumer._unconfirmed = _Batch(items, {"test:0": "2"}, {}, outcome, 0.0)
    consumer._confirm(dead.extend, stop)  # type: ignore[arg-type]
    assert consumer._unconfirmed is None
    assert projection.calls == [1, 2, 2]  # applied again: version 1 is now a duplicate
    assert (consumer.stats.applied, consumer.stats.duplicates, dead) == (1, 1, [])
    assert redis_conn.hget(target.key("h"), "n") == b"2"
    assert (target.applied_version(stream), target.checkpoints()) == (2, {"test:0": "2"})
    target.defer_commits(False)


# -- key types and rejected writes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("hset", ("k", {"f": "1"})), ("zadd", ("k", {"m": 1.0}))),
        (("zincrby", ("k", "m", 1.0)), ("hincrby", ("k", "f", 1))),
        (("incrby", ("k", 1)), ("hdel", ("k", "f"))),
        (("hdel", ("k", "f")), ("set", ("k", "v"))),
        (("zrem", ("k", "m")), ("incrby", ("k", 1))),
    ],
)
def test_a_key_used_as_two_types_raises_type_error(first: Op, second: Op) -> None:
    writes = RedisWrites()
    getattr(writes, first[0])(*first[1])
    writes.delete("k")  # the type stays with the key
    with pytest.raises(TypeError, match="'k'"):
        getattr(writes, second[0])(*second[1])


def test_a_handler_mixing_key_types_is_dead_lettered(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis
) -> None:
    projection, target = setup
    stream = str(uuid.uuid4())
    items = [
        item(stream, 1, [("hincrby", ("k", "f", 1))]),
        item(stream, 2, [("incrby", ("other", 1)), ("zincrby", ("k", "m", 1))]),
        item(stream, 3, [("hincrby", ("k", "f", 1))]),
    ]
    _, dead = apply(projection, target, items)
    assert [d.reason for d in dead] == ["poison"]
    assert "TypeError" in dead[0].error and "'k'" in dead[0].error
    assert snapshot(redis_conn, target.prefix) == {"k": ("hash", {b"f": b"2"})}


@pytest.mark.parametrize(
    ("ops", "error"),
    [
        ([("hset", ("k", {"f": "1.5"})), ("hincrby", ("k", "f", 1))], ValueError),
        ([("set", ("k", "01")), ("incrby", ("k", 1))], ValueError),
        ([("hincrby", ("k", "f", 2**62)), ("hincrby", ("k", "f", 2**62))], OverflowError),
        ([("hincrby", ("k", "f", 1.0))], TypeError),
        ([("zincrby", ("k", "m", float("nan")))], ValueError),
        ([("zincrby", ("k", "m", float("inf"))), ("zincrby", ("k", "m", float("-inf")))], ValueError),
        ([("hset", ("k", {"f": True}))], TypeError),
        ([("set", ("meta:versions", "1"))], ValueError),
    ],
)
def test_writes_redis_would_refuse_raise_in_the_handler(ops: list[Op], error: type[Exception]) -> None:
    writes = RedisWrites()
    writes.start_event()
    with pytest.raises(error):
        for name, args in ops:
            getattr(writes, name)(*args)
    writes.drop_event()
    assert coalesced_commands(writes) == [[], [], [], [], []]


def test_a_write_failing_in_redis_is_logged_and_the_rest_applies(
    setup: tuple[OpsProjection, RedisTarget], redis_conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    projection, target = setup
    stream = str(uuid.uuid4())
    redis_conn.hset(target.key("k"), "f", "1")  # a hash where the projection now wants a string
    with caplog.at_level(logging.ERROR, logger="datalayer.projections"):
        apply(projection, target, [item(stream, 1, [("incrby", ("k", 1)), ("hincrby", ("h", "f", 1))])])
    assert any("WRONGTYPE" in record.getMessage() for record in caplog.records)
    assert redis_conn.hget(target.key("h"), "f") == b"1"
    assert target.applied_version(stream) == 1


def test_default_prefix_and_keys(redis_conn: redis.Redis) -> None:
    target = RedisTarget(redis_conn, OpsProjection())
    assert target.prefix == "dl:{redis_target_test_v1}:"
    assert target.key("stock:1") == "dl:{redis_target_test_v1}:stock:1"
