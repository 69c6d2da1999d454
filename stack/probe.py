"""Readiness probe of the local stack: one real client round trip to a server.

Used by stack/stack.sh (`up` waits on it, `status` prints it). Exit 0 and one line when the server
answers, non-zero otherwise. The ``-tls`` probes take the CA file as a third argument and verify
the server's certificate and name (127.0.0.1) as a production client would.

    probe.py postgres|redis|kafka PORT
    probe.py postgres-tls|redis-tls|kafka-tls PORT CA_FILE
"""

from __future__ import annotations

import sys


def probe_postgres(port: int, ca_file: str | None = None) -> str:
    import psycopg
    from psycopg.conninfo import make_conninfo

    tls = {"sslmode": "verify-full", "sslrootcert": ca_file} if ca_file else {}
    conninfo = make_conninfo(
        "", host="127.0.0.1", port=port, user="datalayer", password="datalayer", dbname="datalayer", **tls
    )
    with psycopg.connect(conninfo, connect_timeout=3) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), s.ssl, s.version"
            " FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()"
        ).fetchone()
    assert row is not None
    if ca_file and not row[1]:
        raise RuntimeError("the connection is not encrypted")
    return f"PostgreSQL {row[0]}" + (f" over {row[2]}, certificate verified" if ca_file else "")


def probe_redis(port: int, ca_file: str | None = None) -> str:
    import redis

    if ca_file:
        client = redis.Redis(
            host="127.0.0.1",
            port=port,
            socket_timeout=3,
            ssl=True,
            ssl_ca_certs=ca_file,
            ssl_check_hostname=True,
        )
    else:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=3)
    try:
        if not client.ping():
            raise RuntimeError("no PONG")
        version = client.info("server")["redis_version"]
    finally:
        client.close()
    return f"Redis {version}" + (" over TLS, certificate verified" if ca_file else "")


def probe_kafka(port: int, ca_file: str | None = None) -> str:
    from kafka import KafkaAdminClient

    tls = {"security_protocol": "SSL", "ssl_cafile": ca_file, "ssl_check_hostname": True} if ca_file else {}
    admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=5000, **tls)
    try:
        admin.list_topics()  # a metadata round trip answered by the broker, not just an open port
        cluster = admin.describe_cluster()
        broker = cluster["brokers"][0]["broker_id"]
        version = admin.get_broker_version_data(broker).broker_version_str
    finally:
        admin.close()
    suffix = " over SSL, certificate verified" if ca_file else ""
    return f"Kafka broker {version} (cluster {cluster['cluster_id']}){suffix}"


def main() -> int:
    name, port = sys.argv[1], int(sys.argv[2])
    ca_file = sys.argv[3] if name.endswith("-tls") else None
    probes = {"postgres": probe_postgres, "redis": probe_redis, "kafka": probe_kafka}
    answer = probes[name.removesuffix("-tls")](port, ca_file)
    print(f"{name:<14} up   127.0.0.1:{port}  {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
