"""compose.yaml serves Docker users with the same servers, ports and credentials as the defaults."""

from __future__ import annotations

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


def test_compose_matches_the_default_settings() -> None:
    spec: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
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
