"""The master key of envelope encryption: read from the environment only, never stored or printed.

It wraps (AES-256-GCM) the per-subject data keys of :mod:`eventstore.keys`; its id, a fingerprint,
is what the ``data_keys`` table records and what errors show.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventstore.errors import EventStoreError

MASTER_KEY_ENV = "DATALAYER_MASTER_KEY"
PREVIOUS_MASTER_KEY_ENV = "DATALAYER_PREVIOUS_MASTER_KEY"
_KEY_BYTES = 32
_NONCE_BYTES = 12


class MasterKeyError(EventStoreError):
    """The master key is missing, malformed or not the one that wrapped a data key; names the variable."""


@dataclass(frozen=True)
class MasterKey:
    """A 256-bit master key and its id (a fingerprint, safe to store and log); the secret never prints."""

    secret: bytes = field(repr=False)
    source: str

    @property
    def key_id(self) -> str:
        return hashlib.sha256(b"datalayer master key id\x00" + self.secret).hexdigest()[:16]

    def wrap(self, subject: str, data_key: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + AESGCM(self.secret).encrypt(nonce, data_key, _wrap_aad(subject))

    def unwrap(self, subject: str, wrapped: bytes) -> bytes:
        try:
            return AESGCM(self.secret).decrypt(
                wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], _wrap_aad(subject)
            )
        except InvalidTag:
            raise MasterKeyError(
                f"the data key of subject {subject} does not open with the key in {self.source} "
                f"(id {self.key_id}) although it is recorded under that id: the row was altered"
            ) from None


def _wrap_aad(subject: str) -> bytes:
    # Binds a wrapped key to its subject: a row's key copied onto another subject does not open.
    return b"datalayer data key\x00" + subject.encode()


def new_master_key() -> str:
    """A fresh random master key, in the base64 form ``DATALAYER_MASTER_KEY`` takes."""
    return base64.b64encode(os.urandom(_KEY_BYTES)).decode()


def master_key_from_env(env: Mapping[str, str], name: str = MASTER_KEY_ENV) -> MasterKey | None:
    """The key in ``name`` or in the file ``name_FILE`` (base64 of 32 bytes); None when neither is set."""
    value = env.get(name) or None
    path = env.get(f"{name}_FILE") or None
    if value and path:
        raise MasterKeyError(f"set {name} or {name}_FILE, not both")
    source = name
    if path:
        source = f"{name}_FILE ({path})"
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise MasterKeyError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    if not value:
        return None
    try:
        altchars = b"-_" if ("-" in value or "_" in value) else None  # the URL-safe alphabet too
        secret = base64.b64decode(value.strip(), altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        secret = b""
    if len(secret) != _KEY_BYTES:
        # Never the value itself: it is a secret, even when malformed.
        raise MasterKeyError(
            f"{source} must hold {_KEY_BYTES} random bytes in base64 (44 characters; make one with "
            f"'datalayer keys new-master'), got {len(value.strip())} characters"
        )
    return MasterKey(secret, source)


@dataclass(frozen=True)
class MasterKeys:
    """The master key new data keys are wrapped with, and the previous one during a rotation."""

    current: MasterKey | None
    previous: MasterKey | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MasterKeys:
        """``DATALAYER_MASTER_KEY[_FILE]`` and ``DATALAYER_PREVIOUS_MASTER_KEY[_FILE]`` of ``env``."""
        source = os.environ if env is None else env
        return cls(master_key_from_env(source), master_key_from_env(source, PREVIOUS_MASTER_KEY_ENV))

    def require_current(self) -> MasterKey:
        if self.current is None:
            raise MasterKeyError(
                f"{MASTER_KEY_ENV} (or {MASTER_KEY_ENV}_FILE) is not set: personal fields can be neither "
                "encrypted nor read without the master key (see docs/security.md)"
            )
        return self.current

    def for_id(self, key_id: str, subject: str) -> MasterKey:
        for key in (self.current, self.previous):
            if key is not None and key.key_id == key_id:
                return key
        have = ", ".join(f"{k.source} is {k.key_id}" for k in (self.current, self.previous) if k) or (
            f"{MASTER_KEY_ENV} is not set"
        )
        raise MasterKeyError(
            f"the data key of subject {subject} is wrapped by master key {key_id}, but {have}: set "
            f"{MASTER_KEY_ENV} to that key (or {PREVIOUS_MASTER_KEY_ENV} during a rotation)"
        )
