"""Settings come from DATALAYER_* variables; a malformed one fails with a message naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from datalayer.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"DATALAYER_{name.upper()}", raising=False)


def test_defaults_point_at_the_local_stack() -> None:
    s = load_settings()
    assert s.sqlalchemy_url() == "postgresql+psycopg://datalayer:datalayer@127.0.0.1:5432/datalayer"
    assert s.kafka_config() == {"bootstrap_servers": ["127.0.0.1:9092"], "security_protocol": "PLAINTEXT"}
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.postgres_connect_kwargs() == {}


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATALAYER_DATABASE_URL", "postgresql+psycopg://app:pw@db.internal:6543/orders")
    monkeypatch.setenv("DATALAYER_KAFKA_BOOTSTRAP", "k1:9092, k2:9093")
    s = load_settings()
    assert s.psycopg_url() == "postgresql://app:pw@db.internal:6543/orders"
    assert s.kafka_config()["bootstrap_servers"] == ["k1:9092", "k2:9093"]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DATALAYER_DATABASE_URL", "mysql://x@y/z", "postgresql://"),
        ("DATALAYER_DATABASE_URL", "postgresql://u:p@h:notaport/d", "postgresql://"),
        ("DATALAYER_KAFKA_BOOTSTRAP", "localhost", "host:port"),
        ("DATALAYER_KAFKA_BOOTSTRAP", "localhost:99999", "host:port"),
        ("DATALAYER_REDIS_URL", "http://127.0.0.1:6379", "redis://"),
        ("DATALAYER_DATABASE_SSLMODE", "strict", "sslmode"),
        ("DATALAYER_KAFKA_SECURITY_PROTOCOL", "SASL", "PLAINTEXT or SSL"),
        ("DATALAYER_REDIS_TLS_CA_FILE", "/nonexistent/ca.pem", "existing CA certificate file"),
    ],
)
def test_malformed_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert variable in message
    assert expected in message
    assert "\n" not in message


def test_password_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATALAYER_DATABASE_URL", "postgresql://app:s3cret-pw@db:5432/orders")
    monkeypatch.setenv("DATALAYER_REDIS_URL", "rediss://:r3dis-pw@cache:6380/0")
    s = load_settings()
    assert "s3cret-pw" not in repr(s)
    assert "r3dis-pw" not in repr(s)
    shown = " ".join(s.describe().values())
    assert "s3cret-pw" not in shown and "r3dis-pw" not in shown
    assert "postgresql://app:***@db:5432/orders" in shown
    monkeypatch.setenv("DATALAYER_DATABASE_URL", "mysql://app:s3cret-pw@db/orders")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "s3cret-pw" not in str(info.value)


def test_tls_options_reach_every_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "client.pem", "client.key"))
    for f in (ca, cert, key):
        f.write_text("x")
    monkeypatch.setenv("DATALAYER_DATABASE_SSLMODE", "verify-full")
    monkeypatch.setenv("DATALAYER_DATABASE_TLS_CA_FILE", str(ca))
    monkeypatch.setenv("DATALAYER_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("DATALAYER_KAFKA_TLS_CA_FILE", str(ca))
    monkeypatch.setenv("DATALAYER_KAFKA_TLS_CERT_FILE", str(cert))
    monkeypatch.setenv("DATALAYER_KAFKA_TLS_KEY_FILE", str(key))
    monkeypatch.setenv("DATALAYER_REDIS_URL", "rediss://127.0.0.1:6380/0")
    monkeypatch.setenv("DATALAYER_REDIS_TLS_CA_FILE", str(ca))
    s = load_settings()
    assert s.postgres_connect_kwargs() == {"sslmode": "verify-full", "sslrootcert": str(ca)}
    kafka = s.kafka_config()
    assert kafka["security_protocol"] == "SSL"
    assert kafka["ssl_cafile"] == str(ca) and kafka["ssl_certfile"] == str(cert)
    assert kafka["ssl_keyfile"] == str(key) and kafka["ssl_check_hostname"] is True
    assert s.redis_kwargs() == {"ssl_check_hostname": True, "ssl_ca_certs": str(ca)}


def test_cli_fails_at_start_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATALAYER_KAFKA_BOOTSTRAP", "nope")
    result = subprocess.run(
        [sys.executable, "-m", "datalayer.cli", "settings"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DATALAYER_KAFKA_BOOTSTRAP" in lines[0] and "host:port" in lines[0]
    assert "Traceback" not in result.stderr
