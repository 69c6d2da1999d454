"""The demo's running parts: the relay and a live consumer per projection, in threads of one process.

:class:`DemoPipeline` creates the topics, starts the parts, watches them (a thread that dies fails
the demo), and stops them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from consumers.live import LiveConsumer
from datalayer.demo_workload import DemoFailed
from datalayer.metrics import PipelineMetrics
from datalayer.settings import Settings
from datalayer.wiring import ReadModelStore, consumer_config
from eventstore import EventStore
from eventstore.relay import Relay, RelayConfig
from projections.projection import Projection

# Seconds a consumer may hold no partition before it rejoins with a new client (a kafka-python
# fault after some rebalances; see consumers.assignment_watch): shorter than the runtime's default,
# so a demo run is not held up by it. The runtime logs each rejoin as a warning.
UNASSIGNED_LIMIT = 10.0


@dataclass
class _Live:
    """A live consumer, the event that stops it alone, and its thread."""

    consumer: LiveConsumer
    halt: threading.Event
    thread: threading.Thread


class DemoPipeline:
    """The relay and the consumers of ``projections`` on ``settings``' servers, until :meth:`stop`.

    ``rebuild_first`` is called for a projection whose active generation is of another version
    than this code's: its consumer would otherwise wait for a rebuild.
    """

    def __init__(
        self,
        settings: Settings,
        projections: list[Projection[Any]],
        models: dict[str, ReadModelStore],
        store: EventStore,
        metrics: PipelineMetrics,
        say: Callable[[str], None],
        timeout: float,
        rebuild_first: Callable[[Projection[Any]], None],
    ) -> None:
        self.settings = settings
        self.projections = projections
        self.models = models
        self.store = store
        self.metrics = metrics
        self.say = say
        self.timeout = timeout
        self.rebuild_first = rebuild_first
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.halts: list[threading.Event] = []
        self.failures: list[BaseException] = []
        self.live: dict[str, _Live] = {}
        self.relay: Relay | None = None
        self.relay_was_active = False

    @property
    def consumers(self) -> list[LiveConsumer]:
        return [live.consumer for live in self.live.values()]

    def start(self) -> int:
        """Start everything and wait until the consumers run; returns the metrics endpoint's port."""
        s = self.settings
        prefixes = {"topic_prefix": s.topic_prefix, "dead_letter_prefix": s.dead_letter_topic_prefix}
        self.metrics.watch_pipeline(s, self.projections, **prefixes)
        port = self.metrics.serve(0)
        config = RelayConfig(
            topic_prefix=s.topic_prefix,
            partitions=s.topic_partitions,
            replication_factor=s.topic_replication_factor,
            poll_interval=0.1,
        )
        self.relay = Relay(
            self.store, s.kafka_config(), config, on_published=self.metrics.relay_observer("default")
        )
        self._create_topics()
        self._thread("relay", self.relay.run)
        for projection in self.projections:
            self._start_consumer(projection)
        self.wait("the consumers to join their groups", self._consumers_running)
        return port

    def wait(self, what: str, condition: Callable[[], bool]) -> float:
        """Poll ``condition`` until true; fail on a dead thread or after the timeout. Returns seconds."""
        started = time.monotonic()
        while not condition():
            self.check_alive()
            if time.monotonic() - started > self.timeout:
                raise DemoFailed(f"timed out after {self.timeout:.0f} s waiting for {what}")
            time.sleep(0.05)
        return time.monotonic() - started

    def check_alive(self) -> None:
        """Raise :class:`DemoFailed` if a part stopped with an error."""
        if self.failures:
            exc = self.failures[0]
            raise DemoFailed(f"a pipeline thread stopped: {type(exc).__name__}: {exc}")
        if self.relay is not None and self.relay.is_active.is_set():
            self.relay_was_active = True

    def stop(self) -> None:
        """Stop every part (each finishes its batch) and wait for it."""
        self.stop_event.set()
        for halt in self.halts:
            halt.set()
        for thread in self.threads:
            thread.join(timeout=60)
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:
            raise DemoFailed(f"{', '.join(stuck)} did not stop within 60 s")
        self.say(f"stopped the relay and the {len(self.consumers)} consumers")

    def _start_consumer(self, projection: Projection[Any]) -> None:
        s = self.settings
        models = self.models[projection.name]
        config = consumer_config(
            s, observer=self.metrics.consumer_observer, max_batch=500, unassigned_limit_s=UNASSIGNED_LIMIT
        )
        consumer = LiveConsumer(projection, models.registry, models.make_target, s.kafka_config(), config)
        halt = threading.Event()
        self.live[projection.name] = _Live(consumer, halt, self._thread(projection.name, consumer.run, halt))

    def _create_topics(self) -> None:
        """Create every topic the run will use, and wait until each partition has a leader.

        Why: a topic created while a consumer group runs (the relay's first event of a stream
        type, another consumer's dead-letter topic) makes kafka-python rebalance the group, and we
        saw a consumer of kafka-python 3.0.12 stop fetching after such a rebalance (assigned all
        partitions, fetching none). Created up front, no topic appears while the consumers run.
        """
        from kafka import KafkaAdminClient

        from consumers.dead_letters import dead_letter_topic
        from eventstore.relay.topics import create_missing_topics, topic_for

        s = self.settings
        stream_types = {"Customer", "Product", "Order"} | {
            t for p in self.projections for t in p.stream_types
        }
        events = {topic_for(s.topic_prefix, t) for t in stream_types}
        letters = {dead_letter_topic(s.dead_letter_topic_prefix, p.name) for p in self.projections}
        admin = KafkaAdminClient(**s.kafka_config())
        try:
            create_missing_topics(admin, events, s.topic_partitions, s.topic_replication_factor)
            create_missing_topics(admin, letters, 1, s.topic_replication_factor)  # as the consumers do
            admin.wait_for_topics(sorted(events | letters), timeout_ms=int(self.timeout * 1000))
        finally:
            admin.close()

    def _consumers_running(self) -> bool:
        for consumer in self.consumers:
            if consumer.waiting_for is not None and self._active_version(consumer.projection) is not None:
                # The active generation is of another version of this code: build this version's.
                self.say(f"  {consumer.waiting_for}: rebuilding it first")
                self.rebuild_first(consumer.projection)
            if consumer.current is None or not consumer.current.running.is_set():
                return False
        return True

    def _active_version(self, projection: Projection[Any]) -> int | None:
        active = self.models[projection.name].registry.active(projection.name)
        return active.version if active is not None else None

    def _thread(
        self, name: str, run: Callable[[threading.Event], None], halt: threading.Event | None = None
    ) -> threading.Thread:
        """Run ``run(stop)`` in a thread; ``halt`` stops it alone, :meth:`stop` stops them all."""
        stop = halt or self.stop_event

        def guarded() -> None:
            try:
                run(stop)
            except BaseException as exc:
                self.failures.append(exc)

        thread = threading.Thread(target=guarded, name=f"demo-{name}", daemon=True)
        thread.start()
        self.threads.append(thread)
        if halt is not None:
            self.halts.append(halt)
        return thread
