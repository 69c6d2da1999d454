"""Read-your-writes waits are woken by the commit that applies the write, not by polling."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import Engine

from datalayer.settings import Settings
from eventstore import EventStore
from projections import freshness
from projections.commit_signal import CommitSignal
from projections.freshness import wait_until_applied
from projections.replay import replay
from projections.targets import PostgresTarget, RedisTarget
from tests.helpers import wait_until
from tests.pipeline import Pipeline, pipeline


@pytest.fixture
def pl(settings: Settings, store: EventStore, engine: Engine, redis_conn: redis.Redis) -> Iterator[Pipeline]:
    with pipeline(settings, store, engine, redis_conn) as p:
        yield p


class ApplyOnFirstRead:
    """The target as a wait sees it; its first read of a version starts applying the store's
    events into it from another thread, so that the write lands while the wait is waiting."""

    def __init__(self, pl: Pipeline, target: PostgresTarget | RedisTarget) -> None:
        self.pl = pl
        self.target = target
        self.applier: threading.Thread | None = None
        self.reads = 0

    def applied_version(self, stream_id: str) -> int | None:
        self.reads += 1
        if self.applier is None:
            self.applier = threading.Thread(
                target=replay, args=(self.target.projection, self.target, self.pl.store), daemon=True
            )
            self.applier.start()
            return None
        return self.target.applied_version(stream_id)

    def commit_signal(self) -> CommitSignal:
        return self.target.commit_signal()


@pytest.mark.parametrize("which", ["postgres", "redis"])
def test_a_wait_wakes_when_the_batch_that_applies_its_write_commits(
    pl: Pipeline, which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    target: PostgresTarget | RedisTarget = pl.views if which == "postgres" else pl.cache
    target.setup()
    signal = target.commit_signal()
    wait_until(lambda: signal.listening, what="the commit listener to listen")
    # Neither polling nor the signalled wait's fallback read could end the wait before its timeout.
    for name in ("FIRST_INTERVAL", "MAX_INTERVAL", "SIGNALLED_INTERVAL"):
        monkeypatch.setattr(freshness, name, 600.0)
    customer, (product,) = pl.seed_catalog(1)
    line = {"product_id": product, "quantity": 1}
    placed = pl.commands.place_order({"customer_id": customer, "lines": [line]})
    before = signal.count()

    versions: Any = ApplyOnFirstRead(pl, target)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            wait_until_applied(target.projection, versions, placed.written, timeout=600)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    # Unwoken, the wait would sleep its 600 s: only the commit's announcement ends it within this.
    waiter.join(timeout=60)
    assert not waiter.is_alive(), "the wait was not woken by the commit"
    assert errors == []
    assert versions.reads >= 2 and signal.count() > before
    assert versions.applier is not None
    versions.applier.join(timeout=60)
