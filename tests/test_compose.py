"""compose.yaml serves Docker users with the same servers, ports and credentials as the defaults."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from datalayer.settings import Settings

COMPOSE = Path(__file__).resolve().parents[1] / "compose.yaml"


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_validates() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose client on this machine")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_compose_matches_the_default_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    spec: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    # The defaults, not this run's: the suite may point at a second stack on other ports.
    for name in [name for name in os.environ if name.startswith("DATALAYER_")]:
        monkeypatch.delenv(name)
    defaults = Settings()
    db = urlsplit(defaults.database_url)
    pg = services["postgres"]
    assert pg["image"].split(":")[1] in ("16", "17")
    assert pg["environment"] == {
        "POSTGRES_USER": db.username,
        "POSTGRES_PASSWORD": db.password,
        "POSTGRES_DB": db.path.lstrip("/"),
    }
    assert f"127.0.0.1:{db.port}:5432" in pg["ports"]
    redis_port = urlsplit(defaults.redis_url).port
    assert f"127.0.0.1:{redis_port}:6379" in services["redis"]["ports"]
    assert services["redis"]["image"].startswith("redis:7")
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    assert "broker,controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    host, port = defaults.kafka_bootstrap.split(":")
    assert f"127.0.0.1:{port}:9092" in kafka["ports"]
    assert kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{host}:{port}"
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"


COMPOSE_TLS = COMPOSE.with_name("compose.tls.yaml")
STACK = COMPOSE.parent / "stack"


def test_compose_tls_config_validates_with_the_base_file() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose client on this machine")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "-f", str(COMPOSE_TLS), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_compose_tls_offers_what_the_stack_script_offers() -> None:
    """The same TLS ports and broker settings as stack/stack.sh, from the files `stack.sh certs` makes."""
    services: dict[str, Any] = yaml.safe_load(COMPOSE_TLS.read_text())["services"]
    script = (STACK / "stack.sh").read_text()
    broker = (STACK / "kafka" / "server.properties").read_text()
    # The stack's default TLS ports, published on loopback as the plaintext ones are.
    assert "REDIS_TLS_PORT=${DATALAYER_REDIS_TLS_PORT:-6380}" in script
    assert "KAFKA_TLS_PORT=${DATALAYER_KAFKA_TLS_PORT:-9094}" in script
    assert "127.0.0.1:6380:6380" in services["redis"]["ports"]
    assert "127.0.0.1:9094:9094" in services["kafka"]["ports"]
    redis_args = services["redis"]["command"]
    assert redis_args[redis_args.index("--tls-port") + 1] == "6380"
    assert redis_args[redis_args.index("--tls-auth-clients") + 1] == "optional"
    assert "tls-auth-clients optional" in script
    pg_args = services["postgres"]["command"]
    assert "ssl=on" in pg_args
    kafka = services["kafka"]["environment"]
    assert "SSL://127.0.0.1:9094" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    assert "PLAINTEXT://127.0.0.1:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    assert kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"] == "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL"
    for key in ("client.auth", "enabled.protocols", "keystore.type"):
        value = kafka["KAFKA_LISTENER_NAME_SSL_SSL_" + key.replace(".", "_").upper()]
        assert f"listener.name.ssl.ssl.{key}={value}" in broker
    # Every file the services read is one the stack's certificate step makes.
    made = {"ca.crt", "server.crt", "server.key", "kafka.keystore.p12", "store.pass"}
    text = COMPOSE_TLS.read_text()
    for name in made:
        assert f"/tls/{name}" in text
        assert name in script
    for service in services.values():
        assert "./.stack/tls:/tls:ro" in service["volumes"]
