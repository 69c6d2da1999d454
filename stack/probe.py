"""Readiness probe of the local stack: one real client round trip to a server.

Used by stack/stack.sh (`up` waits on it, `status` prints it). Exit 0 and one line when the server
answers, non-zero otherwise.
"""

from __future__ import annotations

import sys


def probe_postgres(port: int) -> str:
    import psycopg

    with psycopg.connect(
        host="127.0.0.1",
        port=port,
        user="datalayer",
        password="datalayer",
        dbname="datalayer",
        connect_timeout=3,
    ) as conn:
        row = conn.execute("SELECT current_setting('server_version')").fetchone()
    assert row is not None
    return f"PostgreSQL {row[0]}"


def probe_redis(port: int) -> str:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=3)
    if not client.ping():
        raise RuntimeError("no PONG")
    return f"Redis {client.info('server')['redis_version']}"


def probe_kafka(port: int) -> str:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=5000)
    try:
        admin.list_topics()  # a metadata round trip answered by the broker, not just an open port
        cluster = admin.describe_cluster()
        broker = cluster["brokers"][0]["broker_id"]
        version = admin.get_broker_version_data(broker).broker_version_str
    finally:
        admin.close()
    return f"Kafka broker {version} (cluster {cluster['cluster_id']})"


def main() -> int:
    name, port = sys.argv[1], int(sys.argv[2])
    answer = {"postgres": probe_postgres, "redis": probe_redis, "kafka": probe_kafka}[name](port)
    print(f"{name:<10} up   127.0.0.1:{port}  {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
