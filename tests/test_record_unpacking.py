"""The projection consumer's record unpacking gives exactly what kafka-python's own gives.

Record batches are built with kafka-python's own builder and read both ways, whole and in small
takes; then the same comparison on a real broker, with compression, headers and transactions.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.codec import has_gzip, has_lz4, has_snappy, has_zstd
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record import MemoryRecords, MemoryRecordsBuilder
from kafka.record.default_records import DefaultRecordBatch

from consumers.record_unpacking import LeanPartitionRecords, compatible, install
from tests.helpers import polled_records, unique_name

CODECS = [0] + [
    codec
    for codec, available in ((1, has_gzip()), (2, has_snappy()), (3, has_lz4()), (4, has_zstd()))
    if available
]
TP = TopicPartition("orders", 3)

# Sizes either side of the one-, two- and three-byte varint boundaries (63, 8191 after zigzag).
_sizes = st.sampled_from([0, 1, 36, 63, 64, 600, 8191, 8192, 20_000])
_blob = st.one_of(st.none(), _sizes.map(lambda n: bytes(i % 251 for i in range(n))))
_header = st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=80)))
_record = st.tuples(
    st.integers(min_value=0, max_value=10_000_000),  # timestamp delta from the batch's first
    _blob,
    _blob,
    st.lists(_header, max_size=3),
)


def _batches(batches: list[list[tuple[int, Any, Any, list[Any]]]], codec: int, base: int) -> bytes:
    """Record batches built by kafka-python's own builder, back to back, offsets from ``base``."""
    data = b""
    offset = base
    for records in batches:
        builder = MemoryRecordsBuilder(magic=2, compression_type=codec, batch_size=10_000_000, offset=offset)
        for delta, key, value, headers in records:
            assert builder.append(1_700_000_000_000 + delta, key, value, headers) is not None
        builder.close()
        data += builder.buffer()
        offset += len(records)
    return data


def _take_all(kind: type, data: bytes, fetch_offset: int, step: int | None) -> tuple[list[Any], Any]:
    part = kind(fetch_offset, TP, MemoryRecords(data), check_crcs=True)
    taken: list[Any] = []
    offsets = []
    while part:
        got = part.take(step)
        taken.extend(got)
        offsets.append(part.next_fetch_offset)
        if not got:
            break
    return taken, (offsets, part.records_read, part.bytes_read)


def test_this_kafka_python_is_the_shape_it_expects() -> None:
    assert compatible()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(_record, min_size=1, max_size=6), min_size=1, max_size=4),
    codec=st.sampled_from(CODECS),
    skip=st.integers(min_value=0, max_value=5),
    step=st.one_of(st.none(), st.integers(min_value=1, max_value=4)),
)
def test_records_equal_kafka_pythons(
    batches: list[list[tuple[int, Any, Any, list[Any]]]], codec: int, skip: int, step: int | None
) -> None:
    base = 1_000
    data = _batches(batches, codec, base)
    # A fetch may start inside a batch: the records before the fetch offset are skipped.
    fetch_offset = base + min(skip, sum(map(len, batches)) - 1)
    stock, stock_state = _take_all(Fetcher.PartitionRecords, data, fetch_offset, step)
    lean, lean_state = _take_all(LeanPartitionRecords, data, fetch_offset, step)
    assert lean == stock
    assert [type(r) for r in lean] == [type(r) for r in stock]
    assert lean_state == stock_state
    assert [r.offset for r in lean] == list(range(fetch_offset, base + sum(map(len, batches))))


def test_log_append_time_batches_take_the_brokers_timestamp() -> None:
    data = bytearray(_batches([[(5, b"k", b"v", []), (9, None, b"w", [])]], 0, 0))
    attributes = DefaultRecordBatch.ATTRIBUTES_OFFSET
    data[attributes + 1] |= DefaultRecordBatch.TIMESTAMP_TYPE_MASK  # the low byte of the int16
    stock = Fetcher.PartitionRecords(0, TP, MemoryRecords(bytes(data)), check_crcs=False).take()
    lean = LeanPartitionRecords(0, TP, MemoryRecords(bytes(data)), check_crcs=False).take()
    assert lean == stock
    assert {r.timestamp_type for r in lean} == {1}
    assert len({r.timestamp for r in lean}) == 1


_HEADER = DefaultRecordBatch.HEADER_STRUCT.size  # the first record's length varint starts here


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda b: b.__setitem__(_HEADER, b[_HEADER] + 2), id="record-longer-than-it-is"),
        pytest.param(lambda b: b.__setitem__(_HEADER, b[_HEADER] - 2), id="record-shorter-than-it-is"),
        pytest.param(lambda b: b.__setitem__(_HEADER - 1, b[_HEADER - 1] + 1), id="more-records-than-bytes"),
        pytest.param(lambda b: b.__setitem__(_HEADER - 1, b[_HEADER - 1] - 1), id="bytes-after-the-records"),
    ],
)
def test_a_corrupt_batch_is_reported_either_way(corrupt: Any) -> None:
    data = bytearray(_batches([[(0, b"key", b"x" * 30, [("h", b"1")])] * 3], 0, 0))
    corrupt(data)
    for kind in (Fetcher.PartitionRecords, LeanPartitionRecords):
        part = kind(0, TP, MemoryRecords(bytes(data)), check_crcs=False)
        # The records before the fault come first; the error is raised by the take after them.
        with pytest.raises(CorruptRecordError):
            part.take()
            part.take()


def test_a_crc_mismatch_is_reported() -> None:
    data = bytearray(_batches([[(0, b"k", b"value", [])]], 0, 0))
    data[-2] ^= 0xFF
    part = LeanPartitionRecords(0, TP, MemoryRecords(bytes(data)), check_crcs=True)
    with pytest.raises(CorruptRecordError, match="crc"):
        part.take()


def _consume_all(kafka_config: dict[str, Any], topic: str, expected: int, lean: bool) -> list[Any]:
    consumer = KafkaConsumer(
        **kafka_config, auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=7
    )
    if lean:
        assert install(consumer)
    try:
        consumer.assign([TopicPartition(topic, 0)])
        return polled_records(consumer, expected, f"{expected} records from {topic}", timeout=30)
    finally:
        consumer.close()


def _one_partition_topic(kafka_config: dict[str, Any], prefix: str) -> str:
    topic = unique_name(prefix)
    admin = KafkaAdminClient(**kafka_config)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        admin.close()
    return topic


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_records_from_the_broker_equal_kafka_pythons(
    kafka_config: dict[str, Any], compression: str | None
) -> None:
    topic = _one_partition_topic(kafka_config, "unpack")
    producer = KafkaProducer(**kafka_config, compression_type=compression, linger_ms=5)
    sent = 0
    for i in range(300):
        headers = [("trace", str(i).encode()), ("empty", b"")] if i % 3 == 0 else []
        key = None if i % 11 == 1 else f"stream-{i % 17}".encode()
        # A tombstone (no value) needs a key: kafka-python refuses a record with neither.
        value = None if i % 29 == 0 and key is not None else bytes(j % 251 for j in range(i * 53 % 9000))
        producer.send(topic, key=key, value=value, headers=headers)
        sent += 1
    producer.flush()
    producer.close()
    stock = _consume_all(kafka_config, topic, sent, lean=False)
    lean = _consume_all(kafka_config, topic, sent, lean=True)
    assert lean == stock
    assert [r.offset for r in lean] == list(range(sent))


def test_transaction_markers_are_skipped_as_kafka_python_skips_them(kafka_config: dict[str, Any]) -> None:
    topic = _one_partition_topic(kafka_config, "unpack-txn")
    producer = KafkaProducer(**kafka_config, transactional_id=unique_name("txn"))
    producer.init_transactions()
    for committed in (True, False, True):
        producer.begin_transaction()
        for i in range(5):
            producer.send(topic, key=b"k", value=f"{committed}-{i}".encode())
        if committed:
            producer.commit_transaction()
        else:
            # Written first, so the aborted records are in the log (an abort drops unsent ones).
            producer.flush()
            producer.abort_transaction()
    producer.close()
    # read_uncommitted (the projection consumer's isolation) returns the aborted records too, and
    # never the markers: 15 records at offsets 0-4, 6-10 and 12-16.
    stock = _consume_all(kafka_config, topic, 15, lean=False)
    lean = _consume_all(kafka_config, topic, 15, lean=True)
    assert lean == stock
    assert [r.offset for r in lean] == [*range(0, 5), *range(6, 11), *range(12, 17)]


def test_install_puts_it_in_one_consumer_and_refuses_what_it_does_not_know(
    kafka_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    consumer = KafkaConsumer(**kafka_config, enable_auto_commit=False)
    other = KafkaConsumer(**kafka_config, enable_auto_commit=False)
    try:
        assert install(consumer)
        assert consumer._fetcher.PartitionRecords is LeanPartitionRecords
        assert other._fetcher.PartitionRecords is Fetcher.PartitionRecords  # the class is untouched
    finally:
        consumer.close()
        other.close()
    # Not a kafka-python consumer of the expected shape: nothing installed, and a warning says so.
    with caplog.at_level("WARNING", logger="datalayer.consumer"):
        assert not install(object())  # type: ignore[arg-type]
    assert "using its own" in caplog.text
