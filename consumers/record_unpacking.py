"""Fetched Kafka records unpacked with less work per record: the same records, the same positions.

kafka-python turns each record of a fetched batch into a ``ConsumerRecord`` through seven Python
calls that decode varints, a record object with a property per field, two deserializer calls and a
sum over the headers: about half of what a bare consumer spends per record, and a third of the
Redis projection consumer's CPU. :class:`LeanPartitionRecords` parses the same record batches with
the common one- and two-byte varints decoded inline and yields equal ``ConsumerRecord`` tuples,
field for field. Everything around the records stays kafka-python's: fetching, CRC checks,
decompression, control batches, positions, metrics.

It takes over only where nothing could differ: record batches of format v2 (the only format Kafka 4
writes), no deserializers, ``read_uncommitted``. Anything else is unpacked by kafka-python itself.
:func:`install` puts it into one consumer, after checking that kafka-python still has the shape it
relies on; on any other version it installs nothing and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CorruptRecordError
from kafka.protocol.consumer import IsolationLevel
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.util import decode_varint

log = logging.getLogger("datalayer.consumer")

__all__ = ["LeanPartitionRecords", "install"]

_FIELDS = (
    "topic",
    "partition",
    "leader_epoch",
    "offset",
    "timestamp",
    "timestamp_type",
    "key",
    "value",
    "headers",
    "checksum",
    "serialized_key_size",
    "serialized_value_size",
    "serialized_header_size",
)

_new_tuple = tuple.__new__
_READ_UNCOMMITTED = IsolationLevel.READ_UNCOMMITTED


class LeanPartitionRecords(Fetcher.PartitionRecords):  # type: ignore[misc]
    """kafka-python's records of one fetched partition, v2 record batches unpacked inline."""

    def _unpack_records(
        self, tp: Any, records: Any, key_deserializer: Any, value_deserializer: Any
    ) -> Iterator[ConsumerRecord]:
        if (
            key_deserializer is not None
            or value_deserializer is not None
            or self.isolation_level != _READ_UNCOMMITTED
        ):
            yield from super()._unpack_records(tp, records, key_deserializer, value_deserializer)
            return
        try:
            batch = records.next_batch()
            last_batch = None
            while batch is not None:
                if type(batch) is not DefaultRecordBatch:
                    # An older message format (not written by Kafka 4): kafka-python's own way, for
                    # this batch and the rest of the fetch.
                    yield from self._unpack_rest(tp, batch, records)
                    return
                last_batch = batch
                if self.check_crcs and not batch.validate_crc():
                    raise CorruptRecordError(
                        f"Record batch for partition {self.topic_partition} at offset "
                        f"{batch.base_offset} failed crc check"
                    )
                self.leader_epoch = batch.leader_epoch
                if batch.is_control_batch:
                    # A transaction marker, never returned to the consumer (as kafka-python does).
                    self.next_fetch_offset = batch.next_offset
                else:
                    yield from self._batch_records(tp, batch)
                batch = records.next_batch()
            # Format v2 keeps a batch's last offset even when compaction removed its last record:
            # the next fetch starts after it (kafka-python's rule).
            if last_batch is not None:
                self.next_fetch_offset = last_batch.next_offset
            self.drain()
        except StopIteration:
            # A StopIteration escaping a generator ends it silently (kafka-python's issue 545).
            log.exception("StopIteration raised unpacking messageset")
            raise RuntimeError("StopIteration raised unpacking messageset") from None

    def _unpack_rest(self, tp: Any, batch: Any, records: Any) -> Iterator[ConsumerRecord]:
        """kafka-python's own unpacking from ``batch`` on (it reads the following ones itself)."""

        class _Rest:
            """``records`` with ``batch`` put back in front of it."""

            def __init__(self) -> None:
                self.pending = batch

            def next_batch(self) -> Any:
                pending, self.pending = self.pending, None
                return pending if pending is not None else records.next_batch()

        yield from super()._unpack_records(tp, _Rest(), None, None)

    def _batch_records(self, tp: Any, batch: DefaultRecordBatch) -> Iterator[ConsumerRecord]:
        """The records of one v2 batch, as kafka-python's ``DefaultRecordBatch`` would read them.

        Why inline: almost every varint here (attributes, small deltas, key and header counts) is
        one byte and the rest (record and value lengths) two, so each is a few operations instead
        of a call; the rare longer ones go through kafka-python's ``decode_varint``.
        """
        batch._maybe_uncompress()
        data = bytes(batch._buffer)  # one copy; slices of bytes are the keys and values as they are
        pos: int = batch._pos
        end = len(data)
        header = batch._header_data
        base_offset: int = header[0]
        timestamp_type = 1 if header[5] & DefaultRecordBatch.TIMESTAMP_TYPE_MASK else 0
        log_append_time = timestamp_type == DefaultRecordBatch.LOG_APPEND_TIME
        first_timestamp: int = header[7]
        max_timestamp: int = header[8]
        count: int = header[12]
        topic, partition = tp.topic, tp.partition
        leader_epoch = self.leader_epoch
        varint = decode_varint
        new = _new_tuple
        record_type = ConsumerRecord
        try:
            for _ in range(count):
                # Length (the record after it, in bytes)
                b = data[pos]
                if b < 0x80:
                    length = (b >> 1) ^ -(b & 1)
                    pos += 1
                elif data[pos + 1] < 0x80:
                    raw = (b & 0x7F) | (data[pos + 1] << 7)
                    length = (raw >> 1) ^ -(raw & 1)
                    pos += 2
                else:
                    length, pos = varint(data, pos)
                start = pos
                # Attributes (unused), as a varint like kafka-python reads them
                if data[pos] < 0x80:
                    pos += 1
                else:
                    _, pos = varint(data, pos)
                # Timestamp delta
                b = data[pos]
                if b < 0x80:
                    delta = (b >> 1) ^ -(b & 1)
                    pos += 1
                else:
                    delta, pos = varint(data, pos)
                timestamp = max_timestamp if log_append_time else first_timestamp + delta
                # Offset delta
                b = data[pos]
                if b < 0x80:
                    delta = (b >> 1) ^ -(b & 1)
                    pos += 1
                elif data[pos + 1] < 0x80:
                    raw = (b & 0x7F) | (data[pos + 1] << 7)
                    delta = (raw >> 1) ^ -(raw & 1)
                    pos += 2
                else:
                    delta, pos = varint(data, pos)
                offset = base_offset + delta
                # Key
                b = data[pos]
                if b < 0x80:
                    size = (b >> 1) ^ -(b & 1)
                    pos += 1
                else:
                    size, pos = varint(data, pos)
                if size >= 0:
                    key: bytes | None = data[pos : pos + size]
                    pos += size
                    key_size = size
                else:
                    key, key_size = None, -1
                # Value
                b = data[pos]
                if b < 0x80:
                    size = (b >> 1) ^ -(b & 1)
                    pos += 1
                elif data[pos + 1] < 0x80:
                    raw = (b & 0x7F) | (data[pos + 1] << 7)
                    size = (raw >> 1) ^ -(raw & 1)
                    pos += 2
                else:
                    size, pos = varint(data, pos)
                if size >= 0:
                    value: bytes | None = data[pos : pos + size]
                    pos += size
                    value_size = size
                else:
                    value, value_size = None, -1
                # Headers
                if data[pos] == 0:
                    pos += 1
                    headers: list[tuple[str, bytes | None]] = []
                    header_size = -1
                else:
                    headers, header_size, pos = _headers(data, pos)
                if pos - start != length:
                    raise CorruptRecordError(
                        f"Invalid record size: expected to read {length} bytes in record payload, "
                        f"but instead read {pos - start}"
                    )
                # Before the yield: a consumer that stops taking here resumes after this record.
                self.records_read += 1
                self.bytes_read += length
                self.next_fetch_offset = offset + 1
                yield new(
                    record_type,
                    (
                        topic,
                        partition,
                        leader_epoch,
                        offset,
                        timestamp,
                        timestamp_type,
                        key,
                        value,
                        headers,
                        None,  # checksum: none per record in format v2
                        key_size,
                        value_size,
                        header_size,
                    ),
                )
        except (ValueError, IndexError) as err:
            raise CorruptRecordError(f"Found invalid record structure: {err!r}") from None
        if pos != end:
            raise CorruptRecordError(f"{end - pos} unconsumed bytes after all records consumed")


def _headers(data: bytes, pos: int) -> tuple[list[tuple[str, bytes | None]], int, int]:
    """A record's headers from ``pos`` (at their count): the list, its serialized size, the next position.

    The relay writes four per record, so their varints (all one byte) are decoded inline too.
    """
    varint = decode_varint
    b = data[pos]
    if b < 0x80:
        count = (b >> 1) ^ -(b & 1)
        pos += 1
    else:
        count, pos = varint(data, pos)
    if count < 0:
        raise CorruptRecordError(f"Found invalid number of record headers {count}")
    headers: list[tuple[str, bytes | None]] = []
    # kafka-python's serialized_header_size: the UTF-8 key bytes plus the value bytes of every
    # header. A key's UTF-8 bytes are the bytes it was decoded from, so their count is its length.
    size = 0
    for _ in range(count):
        b = data[pos]
        if b < 0x80:
            key_length = (b >> 1) ^ -(b & 1)
            pos += 1
        else:
            key_length, pos = varint(data, pos)
        if key_length < 0:
            raise CorruptRecordError(f"Invalid negative header key size {key_length}")
        key = data[pos : pos + key_length].decode("utf-8")
        pos += key_length
        b = data[pos]
        if b < 0x80:
            value_length = (b >> 1) ^ -(b & 1)
            pos += 1
        else:
            value_length, pos = varint(data, pos)
        value: bytes | None = None
        if value_length >= 0:
            value = data[pos : pos + value_length]
            pos += value_length
            size += key_length + value_length
        else:
            size += key_length
        headers.append((key, value))
    return headers, (size if headers else -1), pos


def compatible() -> bool:
    """Whether this kafka-python has the shape :class:`LeanPartitionRecords` relies on."""
    return (
        tuple(getattr(ConsumerRecord, "_fields", ())) == _FIELDS
        and callable(getattr(Fetcher.PartitionRecords, "_unpack_records", None))
        and callable(getattr(DefaultRecordBatch, "_maybe_uncompress", None))
        and {"_buffer", "_pos", "_header_data"} <= set(DefaultRecordBatch.__slots__)
    )


def install(consumer: KafkaConsumer) -> bool:
    """Have ``consumer`` unpack its fetched records with :class:`LeanPartitionRecords`.

    Returns False, with a warning, and leaves the consumer as it is when this kafka-python is not
    the shape it was written for: the records are the same either way, only slower.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    if not isinstance(fetcher, Fetcher) or not compatible():
        log.warning("this kafka-python is not the shape datalayer's record unpacking expects: using its own")
        return False
    # The fetcher builds each fetched partition's records through this attribute.
    fetcher.PartitionRecords = LeanPartitionRecords
    return True
