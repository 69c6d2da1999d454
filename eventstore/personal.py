"""Field-level encryption of personal data in events, per subject, for crypto-shredding.

An event class lists its personal fields in a ``personal_data`` class attribute (``fields``, and
``subject``: the attribute naming whose data it is; see ``domain.personal.PersonalData``). Each of
those fields is stored as a sealed value, a JSON object::

    {"_personal_": 1, "subject": "<subject id>", "sealed": "<base64: nonce + AES-256-GCM ciphertext>"}

encrypted with the subject's data key (:class:`eventstore.keys.DataKeys`). The rest of the payload
stays plain JSON, so the relay, Kafka and upcasters see it as before, minus the personal data. On
read, a sealed value opens with the subject's key, or yields the class's redaction marker once the
subject was forgotten. Nothing here touches the domain: the marker is read off the class.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Protocol, TypeVar
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent, Transcoder
from eventsourcing.utils import resolve_topic

from eventstore.errors import EventStoreError
from eventstore.keys import DataKeys, MasterKeys, store_from_env

SEALED_TAG = "_personal_"
REDACTED = "[erased]"  # when a class's marker names none
_NONCE_BYTES = 12

E = TypeVar("E")


class PersonalMarker(Protocol):
    """The shape of an event class's ``personal_data`` attribute."""

    fields: tuple[str, ...]
    subject: str


class SealedFieldError(EventStoreError):
    """A sealed field that does not open with its subject's data key: the stored value was altered."""


@lru_cache(maxsize=1024)
def personal_marker(cls: type) -> PersonalMarker | None:
    """The event class's ``personal_data`` marker, or None when its events hold no personal data."""
    marker = getattr(cls, "personal_data", None)
    return marker if marker is not None and hasattr(marker, "fields") else None


@lru_cache(maxsize=256)
def _holds_personal_data(aggregate_topic: str) -> bool:
    """Whether the aggregate class at ``aggregate_topic`` has an event class with personal data."""
    try:
        cls = resolve_topic(aggregate_topic)
    except Exception:
        return False
    return any(isinstance(v, type) and personal_marker(v) is not None for v in vars(cls).values())


def is_sealed(value: object) -> bool:
    """Whether a decoded field value is a sealed personal value."""
    return type(value) is dict and value.get(SEALED_TAG) == 1 and "sealed" in value


class PersonalFields:
    """Seals and opens the personal fields of events with per-subject data keys.

    ``keys`` None means no master key is configured: sealing and opening then raise
    :class:`MasterKeyError` naming the variable, while events without personal data pass untouched.
    """

    def __init__(self, keys: DataKeys | None, transcoder: Transcoder) -> None:
        self.keys = keys
        self.transcoder = transcoder

    def _keys(self) -> DataKeys:
        if self.keys is None or self.keys.master.current is None:
            MasterKeys(None).require_current()  # raises, naming the variable
        assert self.keys is not None
        return self.keys

    def seal_state(self, marker: PersonalMarker, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of an event's state with each personal field sealed under its subject's key."""
        subject = str(state[marker.subject])
        key = self._keys().for_write(subject)
        sealed = dict(state)
        for name in marker.fields:
            if name in state and not is_sealed(state[name]):
                nonce = os.urandom(_NONCE_BYTES)
                plain = self.transcoder.encode({"v": state[name]})
                ciphertext = AESGCM(key).encrypt(nonce, plain, _field_aad(subject))
                sealed[name] = {
                    SEALED_TAG: 1,
                    "subject": subject,
                    "sealed": base64.b64encode(nonce + ciphertext).decode("ascii"),
                }
        return sealed

    def open_state(self, marker: PersonalMarker, state: dict[str, Any]) -> None:
        """Replace, in place, each sealed field of ``state`` by its value, or by the redaction marker."""
        redacted = getattr(marker, "redacted", REDACTED)
        for name in marker.fields:
            value: Any = state.get(name)
            if not is_sealed(value):
                continue  # written before encryption existed, or already open
            subject = str(value["subject"])
            key = self._keys().for_read(subject)
            if key is None:
                state[name] = redacted
                continue
            blob = base64.b64decode(value["sealed"])
            try:
                plain = AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _field_aad(subject))
            except InvalidTag:
                raise SealedFieldError(
                    f"field {name!r} of subject {subject} does not open with the subject's data key: "
                    "the stored value was altered"
                ) from None
            state[name] = self.transcoder.decode(plain)["v"]

    def reveal(self, event: E) -> E:
        """Open the personal fields of a decoded domain event in place (a no-op for other events)."""
        marker = personal_marker(type(event))  # type: ignore[arg-type]
        if marker is not None:
            self.open_state(marker, vars(event))
        return event


def _field_aad(subject: str) -> bytes:
    # A sealed value moved onto another subject's event does not open.
    return b"datalayer personal field\x00" + subject.encode()


class PersonalDataMapper(Mapper[UUID]):
    """eventsourcing's mapper, sealing personal fields on the way in and opening them on the way out.

    It wraps any cipher and compressor of the base mapper: those apply to the whole payload after
    the personal fields were sealed.
    """

    def __init__(
        self,
        transcoder: Transcoder,
        compressor: Any = None,
        cipher: Any = None,
        *,
        personal: PersonalFields | None = None,
    ) -> None:
        super().__init__(transcoder, compressor=compressor, cipher=cipher)
        self.personal = personal if personal is not None else PersonalFields(None, transcoder)

    def to_stored_event(self, domain_event: DomainEventProtocol[UUID]) -> StoredEvent:
        marker = personal_marker(type(domain_event))
        if marker is None:
            snapshot_of = getattr(domain_event, "topic", None)
            if isinstance(snapshot_of, str) and _holds_personal_data(snapshot_of):
                # A snapshot is the aggregate's whole state in one payload: its personal fields would
                # escape the per-subject keys, so such aggregates are never snapshotted.
                raise ValueError(f"{snapshot_of} holds personal data: its snapshots are refused")
            return super().to_stored_event(domain_event)
        # A stand-in of the same class carrying the sealed state, so the base class encodes it as usual.
        stand_in = object.__new__(type(domain_event))
        object.__setattr__(stand_in, "__dict__", self.personal.seal_state(marker, dict(vars(domain_event))))
        return super().to_stored_event(stand_in)

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[UUID]:
        return self.personal.reveal(super().to_domain_event(stored_event))


def personal_data_mapper(base: Mapper[Any], keys: DataKeys | None) -> PersonalDataMapper:
    """``base``'s transcoder, compressor and cipher, with personal fields sealed under ``keys``."""
    return PersonalDataMapper(
        base.transcoder,
        compressor=base.compressor,
        cipher=base.cipher,
        personal=PersonalFields(keys, base.transcoder),
    )


def personal_fields_from_env(transcoder: Transcoder, env: Mapping[str, str]) -> PersonalFields:
    """Personal fields opened with the data keys of the store ``env``'s ``DATALAYER_*`` variables name.

    It connects on the first sealed field it meets; without a master key in ``env`` that field
    fails, naming ``DATALAYER_MASTER_KEY``.
    """
    master = MasterKeys.from_env(env)
    if master.current is None and master.previous is None:
        return PersonalFields(None, transcoder)
    return PersonalFields(DataKeys(lambda: store_from_env(env), master), transcoder)
