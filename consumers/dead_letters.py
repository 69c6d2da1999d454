"""The dead-letter topic: events a projection could not apply, kept whole, with the reason why.

The record's key and value are the original's, byte for byte, so a fixed consumer can re-read
it; the reason, the error and where the record came from travel in ``dlq.*`` headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kafka import KafkaProducer

from eventstore.records import RecordedEvent
from eventstore.relay.relay import kafka_record
from projections.runner import DeadLetter

MAX_ERROR_BYTES = 4000

# Dead letters must not be lost either: acks from all replicas, idempotent retries.
DEAD_LETTER_PRODUCER_SETTINGS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 0,
    "max_block_ms": 30_000,
    "delivery_timeout_ms": 30_000,
    "metrics_enabled": False,  # nothing reads kafka-python's own metrics
}


def dead_letter_topic(prefix: str, projection_name: str) -> str:
    """The projection's dead-letter topic, e.g. ``datalayer.dlq.order_views``."""
    return f"{prefix}{projection_name}"


class KafkaDeadLetters:
    """Sends dead letters to ``topic`` and waits for Kafka's acknowledgement before returning.

    The runner calls it before committing the batch, so a dead letter is never dropped: at worst a
    crash between the two sends it again (``dlq.event_id`` lets readers recognise a repeat).
    """

    def __init__(self, producer: KafkaProducer, topic: str, projection: str) -> None:
        self.producer = producer
        self.topic = topic
        self.projection = projection.encode()
        self.sent = 0

    def __call__(self, letters: Sequence[DeadLetter]) -> None:
        futures = [self.producer.send(self.topic, **self._record(letter)) for letter in letters]
        self.producer.flush()
        for future in futures:
            future.get(timeout=30)
        self.sent += len(futures)

    def _record(self, letter: DeadLetter) -> dict[str, Any]:
        original = letter.original
        headers: list[tuple[str, bytes]]
        if isinstance(original, RecordedEvent):
            key, value, headers = kafka_record(original)
            source = [("dlq.source", b"store"), ("dlq.position", b"%d" % original.position)]
        else:
            key, value = original.key, original.value
            headers = list(original.headers or [])
            source = [
                ("dlq.source", b"kafka"),
                ("dlq.topic", original.topic.encode()),
                ("dlq.partition", b"%d" % original.partition),
                ("dlq.offset", b"%d" % original.offset),
            ]
        headers += source
        headers += [
            ("dlq.projection", self.projection),
            ("dlq.reason", letter.reason.encode()),
            ("dlq.error", letter.error.encode()[:MAX_ERROR_BYTES]),
        ]
        if letter.event is not None:
            headers += [
                ("dlq.event_id", letter.event.event_id.encode()),
                ("dlq.stream_id", letter.event.stream_id.encode()),
                ("dlq.stream_version", b"%d" % letter.event.stream_version),
            ]
        return {"key": key, "value": value, "headers": headers}
