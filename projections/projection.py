"""The projection: a named, versioned class with one handler per event type, writing to one target.

::

    class OrderStatuses(Projection[RedisWrites]):
        name = "order_statuses"
        version = 1
        stream_types = ("Order",)

        @handles(Order.Placed)
        def placed(self, event: ProjectedEvent, writes: RedisWrites) -> None:
            writes.hset("status", {event.stream_id: "placed"})

Handlers only describe writes; the target applies them, coalesced, in one transaction per batch,
together with the checkpoint. A handler that raises has none of its writes applied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from eventsourcing.utils import get_topic

from projections.events import EventDecoder, ProjectedEvent, event_decoder

W = TypeVar("W")
Handler = Callable[[Any, ProjectedEvent, Any], None]

_HANDLES = "__projection_handles__"


def handles(*event_types: type | str) -> Callable[[Handler], Handler]:
    """Mark a method as the handler of these event types (classes, or their topic strings)."""

    def mark(method: Handler) -> Handler:
        topics = [t if isinstance(t, str) else get_topic(t) for t in event_types]
        setattr(method, _HANDLES, (*getattr(method, _HANDLES, ()), *topics))
        return method

    return mark


class Projection(Generic[W]):
    """Base class of projections; subclasses set ``name``, ``version``, ``stream_types`` and handlers.

    ``version`` names the read model's shape: bump it when the handlers or the tables change, and
    rebuild. ``initial_version`` is the first version of every stream (1 for eventsourcing aggregates,
    0 for streams appended with ``expected_version=-1``): a stream first seen above it is a gap.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    stream_types: ClassVar[tuple[str, ...]]
    initial_version: ClassVar[int] = 1
    application_name: ClassVar[str] = ""
    # Whether a rebuild may replay partitions of the streams in parallel processes: only when every
    # write is to rows or keys of the event's own stream, or an increment of shared ones (sums do
    # not depend on the order in which the processes' batches commit). An overwrite of a shared
    # row or key ("the latest order") would end as whichever process committed last: leave False.
    parallel_replay: ClassVar[bool] = False
    handlers: ClassVar[dict[str, str]]  # event topic -> method name

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for topic in getattr(value, _HANDLES, ()):
                    found[topic] = attr
        cls.handlers = found

    def __init__(self, decoder: EventDecoder | None = None) -> None:
        for attr in ("name", "stream_types"):
            if not hasattr(type(self), attr):
                raise TypeError(f"projection {type(self).__name__} must set {attr}")
        self.decoder = decoder if decoder is not None else event_decoder(self.application_name)
        self._bound: dict[str, Callable[[ProjectedEvent, W], None]] = {
            topic: getattr(self, attr) for topic, attr in self.handlers.items()
        }

    @property
    def qualified_name(self) -> str:
        """``name`` and ``version``, e.g. ``order_views_v1``: names the read model's tables or keys."""
        return f"{self.name}_v{self.version}"

    def handler_for(self, event_type: str) -> Callable[[ProjectedEvent, W], None] | None:
        """The bound handler for ``event_type``, or None: events without one only move the checkpoint."""
        return self._bound.get(event_type)
