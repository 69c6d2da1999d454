"""Redis answers: strings, hashes, sorted sets and a MULTI/EXEC pipeline, under a unique prefix."""

from __future__ import annotations

import redis

from tests.helpers import unique_name


def test_redis_round_trip(redis_conn: redis.Redis) -> None:
    prefix = unique_name("test") + ":"
    try:
        with redis_conn.pipeline(transaction=True) as pipe:
            pipe.set(prefix + "greeting", "hello")
            pipe.hset(prefix + "order:1", mapping={"status": "placed", "total": "12.50"})
            pipe.zadd(prefix + "best", {"apple": 3, "pear": 7, "plum": 5})
            pipe.incrby(prefix + "count", 4)
            results = pipe.execute()
        assert results == [True, 2, 3, 4]
        assert redis_conn.get(prefix + "greeting") == b"hello"
        assert redis_conn.hgetall(prefix + "order:1") == {b"status": b"placed", b"total": b"12.50"}
        assert redis_conn.zrevrange(prefix + "best", 0, 1) == [b"pear", b"plum"]
    finally:
        keys = list(redis_conn.scan_iter(prefix + "*"))
        if keys:
            redis_conn.delete(*keys)
    assert list(redis_conn.scan_iter(prefix + "*")) == []
