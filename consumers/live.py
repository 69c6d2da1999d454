"""Live consumption that follows the active generation: what ``datalayer consume`` runs.

A consumer writes to its projection's *active* generation, with that generation's consumer group.
When a rebuild activates another generation of the same version, the consumer notices within
``check_interval``, finishes its batch and moves over, resuming at the new generation's own
checkpoints. A generation of another version means other code: the consumer waits, consuming
nothing, until one of its own version is active.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from consumers.runtime import TRANSIENT_ERRORS, ConsumerConfig, ProjectionConsumer
from projections.generations import Generation, GenerationRegistry
from projections.projection import Projection
from projections.target import ProjectionTarget

log = logging.getLogger("datalayer.consumer")

TargetFactory = Callable[[str], ProjectionTarget[Any]]


def group_for(generation: str) -> str:
    """The consumer group of one generation: ``datalayer.projection.order_views_v1``."""
    return f"datalayer.projection.{generation}"


class LiveConsumer:
    """Runs ``projection`` into whichever of its generations is active, until ``stop``."""

    def __init__(
        self,
        projection: Projection[Any],
        registry: GenerationRegistry,
        make_target: TargetFactory,
        kafka_config: dict[str, Any],
        config: ConsumerConfig | None = None,
        check_interval: float = 1.0,
    ) -> None:
        self.projection = projection
        self.registry = registry
        self.make_target = make_target
        self.kafka_config = kafka_config
        self.config = config or ConsumerConfig()
        self.check_interval = check_interval
        self.current: ProjectionConsumer | None = None
        self.generation: Generation | None = None
        self.waiting_for: str | None = None  # why nothing is consumed now, for status and health

    def run(self, stop: threading.Event) -> None:
        announced = 0.0
        while not stop.is_set():
            try:
                active = self._active_or_first()
            except TRANSIENT_ERRORS as exc:
                log.warning("consumer %s: reading the generations: %s; retrying", self.projection.name, exc)
                stop.wait(self.check_interval)
                continue
            if active is None or active.version != self.projection.version:
                self.waiting_for = self._why_waiting(active)
                if time.monotonic() - announced > 60:
                    log.warning("consumer %s: %s", self.projection.name, self.waiting_for)
                    announced = time.monotonic()
                stop.wait(self.check_interval)
                continue
            self.waiting_for = None
            self._consume(active, stop)

    def _active_or_first(self) -> Generation | None:
        active = self.registry.active(self.projection.name)
        if active is not None:
            return active
        # The projection's very first deployment: build its first generation live from Kafka.
        first = self.registry.create(self.projection, first=True)
        if first is None:
            return None  # a rebuild is building the first generation; wait for it
        self.make_target(first.name).setup()
        self.registry.activate(self.projection, first.name)
        log.info("consumer %s: created generation %s", self.projection.name, first.name)
        return self.registry.active(self.projection.name)

    def _why_waiting(self, active: Generation | None) -> str:
        mine = self.projection.version
        if active is None:
            return f"waiting for the first generation of {self.projection.name} (a rebuild is building it)"
        if active.version < mine:
            return (
                f"generation {active.name} (version {active.version}) is active, this code is "
                f"version {mine}: `datalayer rebuild {self.projection.name}` builds and activates it"
            )
        return f"generation {active.name} (version {active.version}) superseded this code's version {mine}"

    def _consume(self, generation: Generation, stop: threading.Event) -> None:
        target = self.make_target(generation.name)
        moved = threading.Event()
        config = dataclasses.replace(self.config, group_id=group_for(generation.name))
        consumer = ProjectionConsumer(self.projection, target, self.kafka_config, config)
        self.current, self.generation = consumer, generation

        def watch() -> None:
            while not (stop.is_set() or moved.is_set()):
                if stop.wait(self.check_interval):
                    break
                try:
                    now = self.registry.active(self.projection.name)
                except Exception as exc:  # a registry outage must not stop consumption
                    log.warning("consumer %s: checking the active generation: %s", self.projection.name, exc)
                    continue
                if now is None or now.name != generation.name:
                    log.info(
                        "consumer %s: generation %s is no longer active (now %s)",
                        self.projection.name,
                        generation.name,
                        now.name if now else "none",
                    )
                    moved.set()
            moved.set()

        watcher = threading.Thread(target=watch, name=f"{self.projection.name}-watch", daemon=True)
        watcher.start()
        try:
            consumer.run(moved)
        finally:
            moved.set()
            watcher.join()
            target.close()
