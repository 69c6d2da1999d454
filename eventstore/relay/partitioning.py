"""The partition of a keyed record, as kafka-python's default partitioner picks it, for less CPU.

kafka-python hashes every key with a pure-Python murmur2 (about 4.7 µs for a 36-byte stream id) and
builds sets and a sorted list of the topic's partitions for each record: about a fifth of the
relay's CPU per event, in a process whose one core is the limit. The relay passes ``partition=``
instead, computed here exactly as the default partitioner would (``murmur2(key) & 0x7fffffff``
modulo the topic's partition count, indexing its sorted partitions), so consumers see every
stream in one partition just as any other kafka-python or Java producer would place it. The hash
is computed word-wise (about half the time) and remembered per key: a stream's events usually
come in runs (every event of a stream has the same key), and a remembered hash costs a dict lookup.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

_SEED: Final = 0x9747B28C
_M: Final = 0x5BD1E995
_MASK: Final = 0xFFFFFFFF

# struct readers of n little-endian 32-bit words, one per key length in words (stream ids: 9).
_word_readers: dict[int, Callable[[bytes], tuple[int, ...]]] = {}


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of ``data`` as an unsigned 32-bit integer (Java's ``Utils.murmur2``).

    The same value as ``kafka.partitioner.default.murmur2``, which takes the key byte by byte;
    this reads whole 32-bit words with :mod:`struct` and folds the masking.
    """
    length = len(data)
    h = _SEED ^ length
    words = length >> 2
    read = _word_readers.get(words)
    if read is None:
        read = _word_readers[words] = struct.Struct(f"<{words}I").unpack_from
    for k in read(data):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    extra = length & 3
    if extra:
        tail = length & ~3
        if extra == 3:
            h ^= data[tail + 2] << 16
        if extra >= 2:
            h ^= data[tail + 1] << 8
        h = ((h ^ data[tail]) * _M) & _MASK
    h = ((h ^ (h >> 13)) * _M) & _MASK
    return h ^ (h >> 15)


class KeyHashes:
    """``murmur2(key) & 0x7fffffff`` per key, remembered for up to ``limit`` keys.

    The partition is ``sorted(partitions)[hash % len(partitions)]``; the hash does not depend on
    the partition count, so a topic that gains partitions is still placed right.
    When full, the memory is simply dropped and refilled (cheaper than tracking recency).
    """

    def __init__(self, limit: int = 65_536) -> None:
        self.limit = limit
        self._hashes: dict[bytes, int] = {}
        # The remembered hash or None, without a call of this object: for the relay's hot loop.
        self.known: Callable[[bytes], int | None] = self._hashes.get

    def __call__(self, key: bytes) -> int:
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self.limit:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return hashed
