"""Clients of the three servers, built from :class:`~datalayer.settings.Settings`.

Library packages take these clients (or plain parameters) as arguments and never read the
environment themselves, so that tests and services can point them anywhere.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import psycopg
import redis
from psycopg.conninfo import make_conninfo
from sqlalchemy import Engine, create_engine, event

from datalayer.settings import Settings
from eventstore.privileges import warn_if_superuser


def postgres_connection(settings: Settings, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg connection with the configured TLS parameters."""
    conninfo = make_conninfo(settings.psycopg_url(), **settings.postgres_connect_kwargs())
    conn = psycopg.connect(conninfo, **kwargs)
    warn_if_superuser(conn)
    return conn


def postgres_engine(settings: Settings, **kwargs: Any) -> Engine:
    """A SQLAlchemy engine on psycopg 3 with the configured TLS parameters."""
    engine = create_engine(
        settings.sqlalchemy_url(), connect_args=settings.postgres_connect_kwargs(), **kwargs
    )
    event.listen(engine, "connect", _check_connection)
    return engine


def _check_connection(dbapi_connection: Any, _record: Any) -> None:
    if isinstance(dbapi_connection, psycopg.Connection):
        warn_if_superuser(dbapi_connection)


def check_kafka_tls(settings: Settings, timeout: float = 5.0) -> None:
    """With ``DATALAYER_KAFKA_SECURITY_PROTOCOL=SSL``: fail now, and clearly, if a broker is not trusted.

    kafka-python only logs a failed handshake and retries until it gives up with "Unable to
    bootstrap", tens of seconds later. This makes one TLS handshake with each bootstrap server that
    answers, verified as the Kafka client verifies (CA, host name, client certificate), and raises
    :class:`ConnectionError` naming the server and the reason. Servers that do not answer are left
    to the client's own retries.
    """
    if settings.kafka_security_protocol != "SSL":
        return
    config = settings.kafka_config()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = bool(config.get("ssl_check_hostname", True))
    if "ssl_cafile" in config:
        context.load_verify_locations(config["ssl_cafile"])
    else:
        context.load_default_certs()
    if "ssl_certfile" in config:
        context.load_cert_chain(config["ssl_certfile"], config.get("ssl_keyfile"))
    for server in config["bootstrap_servers"]:
        host, _, port = server.rpartition(":")
        host = host.strip("[]")
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout)
        except OSError:
            continue  # not answering (yet): the client retries that on its own
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as exc:
            ca = config.get("ssl_cafile", "the system's CAs")
            raise ConnectionError(
                f"Kafka at {server}: the broker's TLS certificate is not trusted (certificate verify failed: "
                f"{exc.verify_message}; "
                f"checked against {ca}: DATALAYER_KAFKA_TLS_CA_FILE must name the CA that signed it)"
            ) from None
        except (ssl.SSLError, OSError) as exc:
            raise ConnectionError(f"Kafka at {server}: TLS handshake failed: {exc}") from None
        finally:
            sock.close()


def redis_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A Redis client with the configured TLS files."""
    return redis.Redis.from_url(settings.redis_url, **settings.redis_kwargs(), **kwargs)
