"""A fix for kafka-python 3.0's consumer group join, which can leave a consumer in a rebalance forever.

kafka-python (up to 3.0.12 at least) loses a join that outlives the ``poll()`` that started it:

- A join the client starts by itself (a subscribed topic appeared or grew after the last
  assignment) does not set the coordinator's ``rejoin_needed``. Its reason, the difference
  between the assignment's and the metadata's view of the topics, disappears once the leader has
  computed the new assignment, while the JoinGroup/SyncGroup round trip is still in flight.
- A ``poll()`` whose timeout ends during that round trip leaves the join in flight. The next
  ``poll()`` asks ``need_rejoin()``, gets False, and never reads the join's result: the
  partitions stay revoked, no heartbeat is sent, and no record is fetched again. With
  ``poll(timeout_ms=0)``, which the runtime uses while a deferred commit is out, it happens
  every time a topic appears (``tests/test_kafka_group_join.py``).
- And a join that completed while no ``poll()`` awaited it is thrown away for a new JoinGroup.

The fix (Java's consumer does the same, ``rejoinNeededOrPending``): a join in flight counts as a
rejoin needed, and a join that completed meanwhile is finished with its own result. The runtime
applies it to each client it creates (:func:`fix_group_join`).
"""

from __future__ import annotations

import logging
from types import MethodType
from typing import Any

from kafka import KafkaConsumer
from kafka.coordinator.consumer import ConsumerCoordinator
from kafka.structs import MemberState

log = logging.getLogger("datalayer.consumer")


def fix_group_join(consumer: KafkaConsumer) -> bool:
    """Have ``consumer``'s group coordinator finish every join it starts; whether it was fixed.

    Returns False, with a warning, and leaves the consumer as it is when its coordinator is not
    the kafka-python one this was written for.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    wanted = ("_join_task", "_lock", "_generation", "_on_join_complete_async", "_enable_heartbeat")
    if not isinstance(coordinator, ConsumerCoordinator) or not all(hasattr(coordinator, n) for n in wanted):
        log.warning("this kafka-python's group coordinator is not the one datalayer's join fix expects")
        return False
    need_rejoin = coordinator.need_rejoin
    join_group_async = coordinator.join_group_async

    def pending_or_needed(self: Any) -> bool:
        # A join in flight, or completed and not yet read, is a rejoin still to finish.
        return self._join_task is not None or bool(need_rejoin())

    async def finish_or_join(self: Any, timeout_ms: float | None = None) -> bool:
        task = self._join_task
        if task is not None and task.is_done and task.succeeded():
            # Completed while no poll() awaited it: finish it as kafka-python does after awaiting
            # it, rather than let it start a new JoinGroup and drop this assignment.
            self._join_task = None
            with self._lock:
                self.rejoining = False
                self.rejoin_needed = False
                self.state = MemberState.STABLE
                self._enable_heartbeat()
            generation = self._generation
            await self._on_join_complete_async(
                generation.generation_id, generation.member_id, generation.protocol, task.value
            )
            return True
        # In flight (awaited there, its errors handled there), failed (retried there), or none.
        return bool(await join_group_async(timeout_ms))

    coordinator.need_rejoin = MethodType(pending_or_needed, coordinator)
    coordinator.join_group_async = MethodType(finish_or_join, coordinator)
    return True
