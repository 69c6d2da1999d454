"""eventsourcing features on the datalayer store: cipher, compression, upcasting, time travel."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, event
from psycopg import sql

from datalayer.clients import postgres_connection
from datalayer.settings import Settings
from eventstore import EventStore
from eventstore.timetravel import get_as_of
from tests.helpers import wait_until


class Patient(Aggregate):
    @event("Admitted")
    def __init__(self, name: str, ward: str) -> None:
        self.name = name
        self.ward = ward

    @event("Moved")
    def move(self, ward: str) -> None:
        self.ward = ward


class Clinic(Application):
    pass


@pytest.fixture
def clinic_env(es_env: dict[str, str]) -> dict[str, str]:
    return dict(es_env)


def raw_payloads(settings: Settings, store: EventStore) -> list[bytes]:
    with postgres_connection(settings) as conn:
        rows = conn.execute(sql.SQL("SELECT payload FROM {}").format(sql.Identifier(store.schema, "events")))
        return [bytes(r[0]) for r in rows]


@pytest.mark.parametrize("compress", [False, True])
def test_payloads_are_not_plaintext_with_the_cipher_on(
    clinic_env: dict[str, str], settings: Settings, store: EventStore, compress: bool
) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    env = {**clinic_env, "CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher", "CIPHER_KEY": key}
    if compress:
        env["COMPRESSOR_TOPIC"] = "eventsourcing.compressor:ZlibCompressor"
    app = Clinic(env=env)
    patient = Patient("Ada Lovelace", "Ward 7")
    patient.move("Ward 9")
    app.save(patient)
    payloads = raw_payloads(settings, store)
    assert len(payloads) == 2
    for payload in payloads:
        assert b"Ada Lovelace" not in payload and b"Ward" not in payload
    assert app.repository.get(patient.id).ward == "Ward 9"
    app.close()
    wrong = Clinic(env={**env, "CIPHER_KEY": base64.b64encode(os.urandom(32)).decode()})
    with pytest.raises(ValueError):
        wrong.repository.get(patient.id)
    wrong.close()


@contextmanager
def moved_at_schema_version_2() -> Iterator[None]:
    """Patient.Moved at schema version 2, where wards are stored upper-case; v1 events upcast on read."""
    moved: Any = Patient.Moved

    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["ward"] = state["ward"].upper()

    moved.class_version = 2
    moved.upcast_v1_v2 = staticmethod(upcast_v1_v2)
    try:
        yield
    finally:
        del moved.class_version, moved.upcast_v1_v2


def test_events_stored_under_an_old_schema_are_upcast(clinic_env: dict[str, str], store: EventStore) -> None:
    app = Clinic(env=clinic_env)
    patient = Patient("Grace", "Ward 7")
    patient.move("ward 3")
    app.save(patient)
    app.close()
    assert [e.schema_version for e in store.read_stream(patient.id)] == [1, 1]

    with moved_at_schema_version_2():
        app = Clinic(env=clinic_env)
        loaded = app.repository.get(patient.id)
        assert loaded.ward == "WARD 3"  # the v1 event, upcast on read
        loaded.move("WARD 5")
        app.save(loaded)
        assert [e.schema_version for e in store.read_stream(patient.id)] == [1, 1, 2]
        assert app.repository.get(patient.id).ward == "WARD 5"
        app.close()
    assert Clinic(env=clinic_env).repository.get(patient.id, version=2).ward == "ward 3"


def test_time_travel_by_version_and_timestamp(clinic_env: dict[str, str], store: EventStore) -> None:
    app = Clinic(env=clinic_env)
    patient = Patient("Alan", "Ward 1")
    app.save(patient)
    before_moves = wait_until(
        lambda: (now := datetime.now(UTC)) > store.read_stream(patient.id)[0].recorded_at and now
    )
    for ward in ("Ward 2", "Ward 3"):
        patient.move(ward)
        app.save(patient)
    assert app.repository.get(patient.id, version=2).ward == "Ward 2"
    assert get_as_of(app, patient.id, before_moves).ward == "Ward 1"
    assert get_as_of(app, patient.id, datetime.now(UTC)).ward == "Ward 3"
    with pytest.raises(AggregateNotFoundError):
        get_as_of(app, patient.id, before_moves.replace(year=2001))
    app.close()
