"""Connection settings for every datalayer process, read once from the environment.

All variables start with ``DATALAYER_``; the defaults point at the local stack that ``make up``
starts. Secrets (passwords inside URLs) never appear in ``repr`` or in :meth:`Settings.describe`.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, FilePath, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from eventstore.store import libpq_tls_kwargs, validate_schema_name

ENV_PREFIX = "DATALAYER_"

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]

_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class SettingsError(ValueError):
    """A variable of the environment is malformed; the message names it and what was expected."""


class Settings(BaseSettings):
    """Where the three servers are and how to reach them securely."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    database_url: str = Field(
        "postgresql://datalayer:datalayer@127.0.0.1:5432/datalayer",
        repr=False,
        description="a postgresql:// URL (user, password, host, port, database)",
    )
    database_sslmode: SslMode | None = Field(None, description="a libpq sslmode, e.g. verify-full")
    database_tls_ca_file: FilePath | None = Field(None, description="an existing CA certificate file")
    database_tls_cert_file: FilePath | None = Field(None, description="an existing client certificate file")
    database_tls_key_file: FilePath | None = Field(None, description="an existing client key file")

    eventstore_schema: str = Field(
        "datalayer",
        pattern=r"^[a-z_][a-z0-9_]{0,47}$",
        description="the event store's PostgreSQL schema: lower-case letters, digits and _",
    )

    kafka_bootstrap: str = Field(
        "127.0.0.1:9092", description="comma-separated host:port pairs, e.g. 127.0.0.1:9092"
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL"] = Field("PLAINTEXT", description="PLAINTEXT or SSL")
    kafka_tls_ca_file: FilePath | None = Field(None, description="an existing CA certificate file")
    kafka_tls_cert_file: FilePath | None = Field(None, description="an existing client certificate file")
    kafka_tls_key_file: FilePath | None = Field(None, description="an existing client key file")

    topic_prefix: str = Field(
        "datalayer.events.",
        pattern=r"^[A-Za-z0-9._-]{0,200}$",
        description="letters, digits, '.', '_' and '-' (the relay appends the stream type)",
    )
    dead_letter_topic_prefix: str = Field(
        "datalayer.dlq.",
        pattern=r"^[A-Za-z0-9._-]{0,200}$",
        description="letters, digits, '.', '_' and '-' (consumers append the projection name)",
    )
    topic_partitions: int = Field(6, ge=1, le=10_000, description="a whole number of partitions >= 1")
    topic_replication_factor: int = Field(1, ge=1, le=32, description="a replication factor >= 1")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        repr=False,
        description="a redis:// or rediss:// URL, e.g. redis://127.0.0.1:6379/0",
    )
    redis_tls_ca_file: FilePath | None = Field(None, description="an existing CA certificate file")
    redis_tls_cert_file: FilePath | None = Field(None, description="an existing client certificate file")
    redis_tls_key_file: FilePath | None = Field(None, description="an existing client key file")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres", "postgresql+psycopg") or not parts.hostname:
            raise ValueError("not a postgresql://user:password@host:port/database URL")
        _ = parts.port  # raises ValueError on a port that is not a number in range
        return value

    @field_validator("eventstore_schema")
    @classmethod
    def _check_schema(cls, value: str) -> str:
        return validate_schema_name(value)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _check_kafka_bootstrap(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("no host:port given")
        for server in servers:
            match = _HOST_PORT.match(server)
            if match is None or not 0 < int(match.group(2)) < 65536:
                raise ValueError(f"{server!r} is not host:port")
        return ",".join(servers)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise ValueError("not a redis://host:port/db or rediss:// URL")
        _ = parts.port
        return value

    # -- what the clients take ------------------------------------------------------------------

    def postgres_connect_kwargs(self) -> dict[str, str]:
        """libpq connection parameters beyond the URL (TLS), for psycopg and SQLAlchemy alike."""
        return libpq_tls_kwargs(
            self.database_sslmode,
            str(self.database_tls_ca_file) if self.database_tls_ca_file else None,
            str(self.database_tls_cert_file) if self.database_tls_cert_file else None,
            str(self.database_tls_key_file) if self.database_tls_key_file else None,
        )

    def eventsourcing_env(self, schema: str | None = None) -> dict[str, str]:
        """The environment an ``eventsourcing`` application needs to persist in this event store."""
        env = {
            "PERSISTENCE_MODULE": "eventstore.persistence",
            "DATALAYER_DATABASE_URL": self.psycopg_url(),
            "DATALAYER_EVENTSTORE_SCHEMA": schema or self.eventstore_schema,
        }
        for key, value in (
            ("SSLMODE", self.database_sslmode),
            ("TLS_CA_FILE", self.database_tls_ca_file),
            ("TLS_CERT_FILE", self.database_tls_cert_file),
            ("TLS_KEY_FILE", self.database_tls_key_file),
        ):
            if value:
                env[f"DATALAYER_DATABASE_{key}"] = str(value)
        return env

    def psycopg_url(self) -> str:
        """The database URL as psycopg takes it (no SQLAlchemy driver suffix)."""
        return self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)

    def sqlalchemy_url(self) -> str:
        """The database URL with SQLAlchemy's psycopg 3 driver named."""
        parts = urlsplit(self.psycopg_url())
        return urlunsplit(parts._replace(scheme="postgresql+psycopg"))

    def kafka_config(self) -> dict[str, Any]:
        """Keyword arguments shared by kafka-python's producer, consumer and admin client."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap.split(","),
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol == "SSL":
            config["ssl_check_hostname"] = True
            for key, path in (
                ("ssl_cafile", self.kafka_tls_ca_file),
                ("ssl_certfile", self.kafka_tls_cert_file),
                ("ssl_keyfile", self.kafka_tls_key_file),
            ):
                if path is not None:
                    config[key] = str(path)
        return config

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis.from_url`` beyond the URL (TLS files).

        ``rediss://`` verifies the server's certificate and its name (redis-py before 6 did not
        check the name unless asked).
        """
        kwargs: dict[str, Any] = {}
        if urlsplit(self.redis_url).scheme == "rediss":
            kwargs["ssl_check_hostname"] = True
            for key, path in (
                ("ssl_ca_certs", self.redis_tls_ca_file),
                ("ssl_certfile", self.redis_tls_cert_file),
                ("ssl_keyfile", self.redis_tls_key_file),
            ):
                if path is not None:
                    kwargs[key] = str(path)
        return kwargs

    def describe(self) -> dict[str, str]:
        """Every setting by its variable name, passwords masked, for logs and ``datalayer settings``."""
        shown: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            text = str(value)
            if name.endswith("_url"):
                text = _mask_password(text)
            shown[ENV_PREFIX + name.upper()] = text
        return shown


def _mask_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment, or raise :class:`SettingsError` naming what is wrong."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "?"
        field = Settings.model_fields.get(name)
        expected = field.description if field is not None and field.description else error["msg"]
        given = error.get("input")
        if name.endswith("_url") and isinstance(given, str):
            given = _mask_password(given)
        reason = error["msg"].removeprefix("Value error, ")
        problems.append(f"{ENV_PREFIX}{name.upper()}={given!r}: {reason}; expected {expected}")
    return "invalid settings: " + " | ".join(problems)


__all__ = ["ENV_PREFIX", "Settings", "SettingsError", "load_settings"]
