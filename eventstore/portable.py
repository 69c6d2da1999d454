"""The event log as a portable file: JSON Lines, streamed out of one store and into an empty one.

A file is a header line, one line per event in commit order with every stored field, one line per
data key (``{"data_key": ...}``: wrapped per-subject keys and tombstones of forgotten subjects, see
:mod:`eventstore.keys`), and a trailer with the counts and a SHA-256 over the event and key lines,
so an import can tell a complete file from a truncated or damaged one. A payload that is a JSON
object in canonical form is embedded as JSON (readable, greppable); any other payload (ciphertext,
compressed bytes) is base64 of the stored bytes. Either way an import stores exactly the bytes that
were exported.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from typing import Any, BinaryIO, Protocol
from uuid import UUID

import orjson
from psycopg import sql

from eventstore.errors import EventStoreError
from eventstore.keys import dump_data_keys, load_data_keys
from eventstore.migrations import current_version
from eventstore.records import LOG_START, NO_METADATA, EventMetadata, LogPosition, NewEvent, RecordedEvent
from eventstore.store import EventStore, ImportRow

FORMAT = "datalayer.events"
# 2 added the data key lines; version 1 files (events only) still import.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
BATCH_SIZE = 5000

# Called after each batch with the number of events exported or imported so far.
Progress = Callable[[int], None]


class Sink(Protocol):
    """Where an export goes: a binary file, stdout's buffer, a gzip file."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class PortableFileError(EventStoreError):
    """The file is not a complete, intact event-log export this code can read."""


class StoreNotEmptyError(EventStoreError):
    """The target store already holds events; a restore or a migration only writes into an empty one."""


@dataclass(frozen=True)
class TransferSummary:
    """What an export or import moved: the event count, the checksum of the event lines, and how long.

    ``last_position`` is the source store's log position of the last event (None for an empty log);
    ``held_back`` counts committed events an open transaction kept out of an export.
    """

    events: int
    sha256: str
    seconds: float
    last_position: LogPosition | None
    held_back: int = 0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


# -- export ----------------------------------------------------------------------------------------


def export_log(
    store: EventStore, out: Sink, *, batch_size: int = BATCH_SIZE, progress: Progress | None = None
) -> TransferSummary:
    """Write the store's log to ``out`` as it stands now, in commit order, in batches of ``batch_size``.

    "Now" is the read horizon at the start: events committed later are left for the next export, so
    the file is a consistent prefix of the log even while writers go on.
    """
    started = time.monotonic()
    with store.pool.connection() as conn:
        store_version = current_version(conn, store.schema)
    if store_version == 0:
        raise EventStoreError(f"schema {store.schema} holds no event store")
    horizon = store.horizon()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source_schema": store.schema,
        "store_version": store_version,
        "exported_at": datetime.now(UTC),
    }
    out.write(orjson.dumps(header, option=orjson.OPT_APPEND_NEWLINE))
    digest = hashlib.sha256()
    count = 0
    after = LOG_START
    while True:
        batch = store.read_all(after=after, limit=batch_size)
        # read_all is ordered by transaction id, so the events inside the horizon are a prefix.
        kept = [e for e in batch if e.transaction_id < horizon.transaction_id]
        for event in kept:
            line = _event_line(event)
            digest.update(line)
            out.write(line)
        count += len(kept)
        if kept:
            after = kept[-1].log_position
        done = len(kept) < batch_size
        del batch, kept  # let go of this batch before the next one is read
        if progress is not None:
            progress(count)
        if done:
            break
    # The keys after the events: every key an exported event was sealed with exists by now.
    with store.pool.connection() as conn:
        keys = dump_data_keys(conn, store.schema)
    for key in keys:
        line = orjson.dumps({"data_key": key}, option=orjson.OPT_APPEND_NEWLINE)
        digest.update(line)
        out.write(line)
    trailer = {"trailer": FORMAT, "events": count, "data_keys": len(keys), "sha256": digest.hexdigest()}
    out.write(orjson.dumps(trailer, option=orjson.OPT_APPEND_NEWLINE))
    out.flush()
    return TransferSummary(
        count,
        digest.hexdigest(),
        time.monotonic() - started,
        after if count else None,
        horizon.held_back_events,
    )


def _event_line(e: RecordedEvent) -> bytes:
    line: dict[str, Any] = {
        "position": e.position,
        "transaction_id": e.transaction_id,
        "event_id": e.event_id,
        "stream_id": e.stream_id,
        "stream_type": e.stream_type,
        "stream_version": e.stream_version,
        "event_type": e.event_type,
        "schema_version": e.schema_version,
        "recorded_at": e.recorded_at,
        "metadata": e.metadata.to_dict(),
    }
    if _is_canonical_json_object(e.payload):
        line["payload"] = orjson.Fragment(e.payload)  # embedded as stored: it is already this JSON
    else:
        line["payload_base64"] = base64.b64encode(e.payload).decode("ascii")
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


def _is_canonical_json_object(payload: bytes) -> bool:
    """True when parsing and re-encoding the payload gives back these exact bytes (so import can)."""
    if not payload.startswith(b"{"):
        return False  # ciphertext and compressed payloads, without trying to parse them
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return isinstance(value, dict) and orjson.dumps(value) == payload


# -- import ----------------------------------------------------------------------------------------


def import_log(
    store: EventStore,
    source: Iterable[bytes],
    *,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> TransferSummary:
    """Read an export from ``source`` into ``store``, which must be migrated and hold no events.

    One transaction, COPY in batches of ``batch_size``: the file is verified against its trailer
    before the commit, so a truncated or damaged file leaves the store as empty as it was. Event ids,
    streams, versions, types, payload bytes, metadata and ``recorded_at`` are kept; positions and
    transaction ids are the store's own, in the file's (the source's commit) order.
    """
    started = time.monotonic()
    reader = _Reader(source)
    try:
        with store.pool.connection() as conn, conn.transaction():
            table = sql.Identifier(store.schema, "events")
            # Writers wait for the restore to finish; readers go on (and see nothing until the commit).
            conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table))
            # Counting a big table would take a while, only to say how far from empty it is.
            capped = sql.SQL("SELECT count(*) FROM (SELECT FROM {} LIMIT 1000) AS held").format(table)
            row = conn.execute(capped).fetchone()
            if row is not None and row[0]:
                raise StoreNotEmptyError(
                    f"schema {store.schema} already holds {row[0]}{'+' if row[0] == 1000 else ''} events: "
                    "import restores into an empty store only (choose a new schema)"
                )
            rows = reader.rows()
            count = 0
            while imported := store.import_in(conn, islice(rows, batch_size)):
                count += imported
                if progress is not None:
                    progress(count)
            for _ in rows:  # a file without events: read on to the trailer all the same
                pass
            try:
                load_data_keys(conn, store.schema, reader.data_keys)
            except ValueError as exc:
                raise PortableFileError(str(exc)) from None
    except PortableFileError as exc:
        raise PortableFileError(f"{exc}; nothing was imported into schema {store.schema}") from None
    store.analyze()  # a rebuild usually follows: its reads plan by these statistics
    return TransferSummary(count, reader.sha256, time.monotonic() - started, reader.last_position)


class _Reader:
    """The lines of an export: checks the header first and the trailer after the last event."""

    def __init__(self, source: Iterable[bytes]) -> None:
        self._lines = self._numbered(source)
        self._digest = hashlib.sha256()
        self.last_position: LogPosition | None = None
        self.data_keys: list[dict[str, Any]] = []
        first = next(self._lines, None)
        if first is None:
            raise PortableFileError("the file is empty")
        header = self._parse(*first)
        if header.get("format") != FORMAT:
            raise PortableFileError(f"not a {FORMAT} export (its first line has no format {FORMAT!r})")
        version = header.get("format_version")
        if version not in _READABLE_VERSIONS:
            raise PortableFileError(
                f"format version {version!r} is not one this code reads ({FORMAT_VERSION})"
            )

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def rows(self) -> Iterator[ImportRow]:
        """The events as import rows; raises :class:`PortableFileError` once the end does not check out."""
        count = 0
        for number, line in self._lines:
            data = self._parse(number, line)
            if "trailer" in data:
                self._check_trailer(data, count)
                for extra, rest in self._lines:
                    if rest.strip():
                        raise PortableFileError(f"line {extra}: data after the trailer")
                return
            self._digest.update(line)
            if "data_key" in data:
                if not isinstance(data["data_key"], dict):
                    raise PortableFileError(f"line {number}: data_key is not a JSON object")
                self.data_keys.append(data["data_key"])
                continue
            yield _import_row(number, data)
            xid, position = data.get("transaction_id"), data.get("position")  # the source's, informative
            if isinstance(xid, int) and isinstance(position, int):
                self.last_position = LogPosition(xid, position)
            count += 1
        raise PortableFileError(f"the file ends after {count} events without its trailer: it is truncated")

    def _check_trailer(self, trailer: dict[str, Any], count: int) -> None:
        if trailer.get("events") != count:
            raise PortableFileError(
                f"the trailer counts {trailer.get('events')} events, the file holds {count}"
            )
        if trailer.get("data_keys", 0) != len(self.data_keys):
            raise PortableFileError(
                f"the trailer counts {trailer.get('data_keys')} data keys, "
                f"the file holds {len(self.data_keys)}"
            )
        if trailer.get("sha256") != self._digest.hexdigest():
            raise PortableFileError("the event lines do not match the trailer's SHA-256: the file is damaged")

    @staticmethod
    def _numbered(source: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
        number = 0
        try:
            for number, line in enumerate(source, start=1):
                yield number, line
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise PortableFileError(
                f"after line {number}: compressed data truncated or damaged ({exc})"
            ) from None

    @staticmethod
    def _parse(number: int, line: bytes) -> dict[str, Any]:
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise PortableFileError(f"line {number} is not JSON: the file is truncated or damaged") from None
        if not isinstance(data, dict):
            raise PortableFileError(f"line {number} is not a JSON object")
        return data


def _import_row(number: int, data: dict[str, Any]) -> ImportRow:
    try:
        if "payload" in data:
            if not isinstance(data["payload"], dict):
                raise ValueError("payload is not a JSON object")
            payload = orjson.dumps(data["payload"])
        else:
            payload = base64.b64decode(data["payload_base64"], validate=True)
        metadata = data["metadata"]
        if not isinstance(metadata, dict):
            raise ValueError("metadata is not a JSON object")
        for key in ("stream_type", "event_type", "recorded_at"):
            if not isinstance(data[key], str):
                raise ValueError(f"{key} is not a string")
        event = NewEvent(
            UUID(data["event_id"]),
            data["event_type"],
            payload,
            int(data["schema_version"]),
            EventMetadata.from_dict(metadata) if metadata else NO_METADATA,
        )
        recorded_at = datetime.fromisoformat(data["recorded_at"])
        return UUID(data["stream_id"]), data["stream_type"], int(data["stream_version"]), event, recorded_at
    except KeyError as exc:
        raise PortableFileError(f"line {number}: the event has no {exc.args[0]!r}") from None
    except (TypeError, ValueError, binascii.Error) as exc:
        raise PortableFileError(f"line {number}: not a valid event: {exc}") from None


# -- files -----------------------------------------------------------------------------------------


@contextmanager
def open_export(path: str) -> Iterator[Sink]:
    """A file to export into: ``-`` is stdout, ``*.gz`` is gzip-compressed.

    The export is written beside ``path`` and renamed onto it only when complete, so a failed export
    never replaces an earlier one.
    """
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    partial = f"{path}.partial"
    try:
        with open(partial, "wb") as raw:
            if path.endswith(".gz"):
                # Level 6 as gzip(1): level 9 costs several times the CPU for a few percent. The
                # header names the final file, not the partial one.
                name = os.path.basename(path)
                with gzip.GzipFile(filename=name, mode="wb", compresslevel=6, fileobj=raw) as packed:
                    yield packed
            else:
                yield raw
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


@contextmanager
def open_import(path: str) -> Iterator[Iterable[bytes]]:
    """The lines of a file to import: ``-`` is stdin; gzip-compressed input is recognised by its content."""
    with ExitStack() as stack:
        raw: BinaryIO = sys.stdin.buffer if path == "-" else stack.enter_context(open(path, "rb"))
        if _is_gzip(raw):
            yield stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        else:
            yield raw


def _is_gzip(raw: BinaryIO) -> bool:
    peek = getattr(raw, "peek", None)  # buffered files and stdin have it; without it, assume plain
    return peek is not None and bytes(peek(2))[:2] == b"\x1f\x8b"


__all__ = [
    "BATCH_SIZE",
    "FORMAT",
    "FORMAT_VERSION",
    "PortableFileError",
    "Progress",
    "Sink",
    "StoreNotEmptyError",
    "TransferSummary",
    "export_log",
    "import_log",
    "open_export",
    "open_import",
]
