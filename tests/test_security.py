"""Security on the real servers: verified TLS to all three, least-privilege roles, no leaked secrets.

The TLS tests use the stack's TLS endpoints: PostgreSQL on its usual port, Redis on
DATALAYER_REDIS_TLS_PORT (6380), Kafka on DATALAYER_KAFKA_TLS_PORT (9094), hosts taken from the
DATALAYER_* client settings, and the CA that `stack/stack.sh up` makes in
$DATALAYER_STATE_DIR/tls (or DATALAYER_DATABASE_TLS_CA_FILE when set). Without that CA the
servers are not the local stack's, and the TLS tests skip.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from psycopg import errors as pg_errors
from psycopg import sql
from sqlalchemy import Engine, text
from sqlalchemy.exc import ProgrammingError

from datalayer.clients import check_kafka_tls, postgres_connection, postgres_engine, redis_client
from datalayer.settings import Settings, load_settings
from eventstore import EventStore, NewEvent, privileges
from eventstore.keys import (
    MASTER_KEY_ENV,
    PREVIOUS_MASTER_KEY_ENV,
    DataKeys,
    MasterKey,
    MasterKeys,
    new_master_key,
)
from eventstore.migrations import available_migrations
from eventstore.privileges import create_store_roles, drop_store_roles, store_roles
from eventstore.relay import load_checkpoint
from projections.generations import REGISTRY_SCHEMA, PostgresGenerations
from projections.orders import OrderViews
from projections.privileges import create_projection_roles, projection_roles
from projections.targets import PostgresTarget
from tests.helpers import unique_name, wait_until

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("datalayer")
STATE = Path(os.environ.get("DATALAYER_STATE_DIR", ROOT / ".stack"))
REDIS_TLS_PORT = int(os.environ.get("DATALAYER_REDIS_TLS_PORT", "6380"))
KAFKA_TLS_PORT = int(os.environ.get("DATALAYER_KAFKA_TLS_PORT", "9094"))
# The local stack's superuser (stack/stack.sh gives it the stack's password).
SUPERUSER, SUPERUSER_PASSWORD = "postgres", "datalayer"


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_dir(settings: Settings) -> Path:
    ca = Path(settings.database_tls_ca_file or STATE / "tls" / "ca.crt")
    if not ca.is_file():
        pytest.skip(f"no CA at {ca}: these servers were not started by stack/stack.sh up (which makes it)")
    return ca.parent


@pytest.fixture(scope="module")
def ca_file(tls_dir: Path) -> Path:
    return tls_dir / "ca.crt"


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory, tls_dir: Path) -> Path:
    """A CA that signed nothing the servers present: trusting only it must fail every handshake.

    Only for the stack's servers (``tls_dir``): elsewhere the TLS ports may not even be open.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the stack's CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path_factory.mktemp("other-ca") / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def tls_settings(settings: Settings, ca: Path, **extra: Any) -> Settings:
    """Every client at the stack's TLS endpoints, verifying against ``ca``."""
    redis_host = urlsplit(settings.redis_url).hostname
    kafka_host = settings.kafka_bootstrap.split(",")[0].rpartition(":")[0]
    return load_settings(
        **{
            "database_url": settings.database_url,
            "database_sslmode": "verify-full",
            "database_tls_ca_file": ca,
            "kafka_bootstrap": f"{kafka_host}:{KAFKA_TLS_PORT}",
            "kafka_security_protocol": "SSL",
            "kafka_tls_ca_file": ca,
            "redis_url": f"rediss://{redis_host}:{REDIS_TLS_PORT}/0",
            "redis_tls_ca_file": ca,
            **extra,
        }
    )


def test_postgres_over_verified_tls(settings: Settings, ca_file: Path) -> None:
    with postgres_connection(tls_settings(settings, ca_file)) as conn:
        row = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row is not None
    assert row[0] is True
    assert row[1] in ("TLSv1.2", "TLSv1.3")


def test_postgres_mutual_tls_shows_the_client_certificate(
    settings: Settings, tls_dir: Path, ca_file: Path
) -> None:
    client = tls_settings(
        settings,
        ca_file,
        database_tls_cert_file=tls_dir / "client.crt",
        database_tls_key_file=tls_dir / "client.key",
    )
    with postgres_connection(client) as conn:
        row = conn.execute("SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row is not None and row[0] is True
    assert "CN=datalayer-client" in row[1]


def test_postgres_refuses_a_server_the_ca_did_not_sign(settings: Settings, other_ca: Path) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        postgres_connection(tls_settings(settings, other_ca), connect_timeout=10).close()
    assert "certificate verify failed" in str(info.value)


def test_kafka_produce_and_consume_over_verified_tls(settings: Settings, ca_file: Path) -> None:
    tls = tls_settings(settings, ca_file)
    check_kafka_tls(tls)  # the handshake alone passes
    config = tls.kafka_config()
    topic = unique_name("tls")
    admin = KafkaAdminClient(**config)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])
        producer = KafkaProducer(**config)
        try:
            producer.send(topic, key=b"k", value=b"over tls").get(timeout=30)
        finally:
            producer.close()
        consumer = KafkaConsumer(**config, enable_auto_commit=False)
        try:
            partition = TopicPartition(topic, 0)
            consumer.assign([partition])
            consumer.seek_to_beginning(partition)
            got: list[bytes] = []

            def received() -> bool:
                for records in consumer.poll(timeout_ms=500).values():
                    got.extend(r.value for r in records)
                return bool(got)

            wait_until(received, timeout=30, what="the record to come back over TLS")
        finally:
            consumer.close()
        assert got == [b"over tls"]
    finally:
        admin.delete_topics([topic])
        admin.close()


def test_kafka_refuses_a_server_the_ca_did_not_sign(settings: Settings, other_ca: Path) -> None:
    with pytest.raises(ConnectionError) as info:
        check_kafka_tls(tls_settings(settings, other_ca))
    message = str(info.value)
    assert f":{KAFKA_TLS_PORT}" in message and "not trusted" in message
    assert "certificate verify failed" in message and str(other_ca) in message


def test_a_command_with_the_wrong_kafka_ca_stops_at_once_with_one_line(
    settings: Settings, other_ca: Path
) -> None:
    wrong = tls_settings(settings, other_ca)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATALAYER_")}
    env.update(
        DATALAYER_DATABASE_URL=settings.database_url,
        DATALAYER_KAFKA_BOOTSTRAP=wrong.kafka_bootstrap,
        DATALAYER_KAFKA_SECURITY_PROTOCOL="SSL",
        DATALAYER_KAFKA_TLS_CA_FILE=str(other_ca),
    )
    result = subprocess.run([str(BIN), "demo"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "not trusted" in lines[0] and "certificate verify failed" in lines[0]


def test_redis_ping_over_verified_tls(settings: Settings, tls_dir: Path, ca_file: Path) -> None:
    for extra in (
        {},
        {"redis_tls_cert_file": tls_dir / "client.crt", "redis_tls_key_file": tls_dir / "client.key"},
    ):
        client = redis_client(tls_settings(settings, ca_file, **extra))
        try:
            assert client.ping() is True
            assert client.connection_pool.connection_class is redis.SSLConnection
        finally:
            client.close()


def test_redis_refuses_a_server_the_ca_did_not_sign(settings: Settings, other_ca: Path) -> None:
    client = redis_client(tls_settings(settings, other_ca), socket_timeout=10)
    try:
        with pytest.raises(redis.ConnectionError) as info:
            client.ping()
    finally:
        client.close()
    assert "certificate verify failed" in str(info.value)


# -- least privilege ------------------------------------------------------------------------------


def url_as(settings: Settings, user: str, password: str) -> str:
    parts = urlsplit(settings.psycopg_url())
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port or 5432}"))


class RoleSandbox:
    """Event store schemas with their group roles, and login members of them, all dropped afterwards."""

    def __init__(self, settings: Settings, admin: psycopg.Connection[Any]) -> None:
        self.settings = settings
        self.admin = admin
        self.schemas: list[str] = []
        self.projections: list[str] = []
        self.logins: list[str] = []

    def store(self, *, migrate_first: bool = True) -> str:
        schema = unique_name("sec")
        self.schemas.append(schema)
        if migrate_first:
            with self.connect(self.settings.psycopg_url(), schema) as es:
                es.migrate()
        create_store_roles(self.admin, schema)
        return schema

    def login(self, group: str, password: str | None = None) -> tuple[str, str]:
        """A new login role, member of ``group``: (user, password)."""
        name = unique_name("login")
        password = password or uuid.uuid4().hex
        self.admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(name), sql.Literal(password), sql.Identifier(group)
            )
        )
        self.logins.append(name)
        return name, password

    def connect(self, url: str, schema: str) -> EventStore:
        return EventStore.connect(
            url, schema, max_size=2, connect_kwargs=self.settings.postgres_connect_kwargs()
        )

    def projection(self, name: str) -> None:
        """Drop the read model ``name`` (its generations, alias and registry rows) and its roles after."""
        self.projections.append(name)

    def close(self) -> None:
        for schema in self.schemas:
            self.admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            drop_store_roles(self.admin, schema)
        for name in self.projections:
            rows = self.admin.execute(
                sql.SQL("SELECT generation FROM {} WHERE projection = %s").format(
                    sql.Identifier(REGISTRY_SCHEMA, "generations")
                ),
                (name,),
            ).fetchall()
            for schema in [r[0] for r in rows] + [name]:
                self.admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            self.admin.execute(
                sql.SQL("DELETE FROM {} WHERE projection = %s").format(
                    sql.Identifier(REGISTRY_SCHEMA, "generations")
                ),
                (name,),
            )
            for role in projection_roles(name):
                self.admin.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role)))
                self.admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                self.admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        for name in self.logins:
            self.admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def sandbox(settings: Settings) -> Iterator[RoleSandbox]:
    with postgres_connection(settings, autocommit=True) as admin:
        row = admin.execute(
            "SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        if not (row and row[0]):
            pytest.skip("the configured database user may not create roles (CREATEROLE)")
        box = RoleSandbox(settings, admin)
        try:
            yield box
        finally:
            box.close()


def test_roles_are_nologin_groups_and_own_the_schema(settings: Settings, sandbox: RoleSandbox) -> None:
    schema = sandbox.store()
    roles = store_roles(schema)
    rows = sandbox.admin.execute(
        "SELECT rolname, rolcanlogin, rolsuper FROM pg_roles WHERE rolname = ANY(%s)", (list(roles.all()),)
    ).fetchall()
    assert {r[0] for r in rows} == set(roles.all())
    assert not any(r[1] or r[2] for r in rows)
    owners = sandbox.admin.execute(
        "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c"
        " WHERE c.relnamespace = %s::regnamespace AND c.relkind = 'r'",
        (schema,),
    ).fetchall()
    assert owners == [(roles.owner,)]
    # Idempotent: a second run creates nothing and changes nothing.
    assert create_store_roles(sandbox.admin, schema) == []


def test_the_app_role_appends_but_the_database_refuses_rewrites(
    settings: Settings, sandbox: RoleSandbox
) -> None:
    schema = sandbox.store()
    user, password = sandbox.login(store_roles(schema).app)
    url = url_as(settings, user, password)
    stream = uuid.uuid4()
    with sandbox.connect(url, schema) as es:
        assert es.migrate() == []  # at the newest version: start-up only reads, needs no DDL right
        es.append(stream, "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}")], 0)
        assert [e.stream_version for e in es.read_stream(stream)] == [1]
    with psycopg.connect(url, autocommit=True, **settings.postgres_connect_kwargs()) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (stream_id, stream_version, snapshot_type, payload) VALUES (%s, 1, 'S', '')"
            ).format(sql.Identifier(schema, "snapshots")),
            (stream,),
        )
        for statement in (
            "UPDATE {}.events SET event_type = 'Rewritten'",
            "DELETE FROM {}.events",
            "TRUNCATE {}.events",
            "UPDATE {}.snapshots SET payload = ''",
            "DELETE FROM {}.snapshots",
            # Destroying or re-wrapping data keys is the owner's (forget, keys rotate-master).
            "UPDATE {}.data_keys SET wrapped_key = NULL",
            "DELETE FROM {}.data_keys",
            "SELECT * FROM {}.relay_checkpoints",
        ):
            with pytest.raises(pg_errors.InsufficientPrivilege) as info:
                conn.execute(sql.SQL(statement).format(sql.Identifier(schema)))
            # The privilege check refused it (42501), before the append-only trigger (DL002) could.
            assert info.value.sqlstate == "42501"
            assert "permission denied" in str(info.value)
    with sandbox.connect(settings.psycopg_url(), schema) as es:
        assert [e.event_type for e in es.read_stream(stream)] == ["Placed"]


def test_the_reader_role_only_reads(settings: Settings, sandbox: RoleSandbox) -> None:
    schema = sandbox.store()
    user, password = sandbox.login(store_roles(schema).reader)
    with psycopg.connect(url_as(settings, user, password), autocommit=True) as conn:
        for table in ("events", "snapshots", "relay_checkpoints", "schema_migrations"):
            conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table)))
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute(
                sql.SQL("INSERT INTO {} (relay_name, transaction_id, position) VALUES ('x', '1', 1)").format(
                    sql.Identifier(schema, "relay_checkpoints")
                )
            )


def test_roles_made_before_the_first_migration_cover_its_tables(
    settings: Settings, sandbox: RoleSandbox
) -> None:
    schema = sandbox.store(migrate_first=False)
    roles = store_roles(schema)
    with sandbox.connect(settings.psycopg_url(), schema) as es:
        # Run as the owner role, then granted.
        assert [m.version for m in es.migrate()] == [m.version for m in available_migrations()]
    owner = sandbox.admin.execute(
        "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s::regclass", (f"{schema}.events",)
    ).fetchone()
    assert owner == (roles.owner,)
    user, password = sandbox.login(roles.app)
    with sandbox.connect(url_as(settings, user, password), schema) as es:
        es.append(uuid.uuid4(), "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}")], 0)
        # The app role makes a new subject's data key and reads it back (INSERT, SELECT on data_keys).
        master = MasterKeys(MasterKey(os.urandom(32), MASTER_KEY_ENV))
        made = DataKeys(es, master).for_write("subject-1")
        assert DataKeys(es, master).for_read("subject-1") == made


@pytest.fixture
def own_engine(settings: Settings) -> Iterator[Engine]:
    """An engine of this test's own (the session's may hold connections a server restart cut)."""
    engine = postgres_engine(settings)
    yield engine
    engine.dispose()


def test_projection_roles_write_and_read_what_they_should(
    settings: Settings, own_engine: Engine, sandbox: RoleSandbox
) -> None:
    engine = own_engine
    projection = type("OrderViews", (OrderViews,), {"name": unique_name("pv")})()
    sandbox.projection(projection.name)
    writer, reader = projection_roles(projection.name)
    registry = PostgresGenerations(engine)
    registry.setup()
    with engine.begin() as conn:
        create_projection_roles(conn, projection.name)  # before the first generation: it is granted as made
    generation = registry.create(projection, first=True)
    assert generation is not None
    PostgresTarget(engine, projection, schema=generation.name).setup()
    registry.activate(projection, generation.name)

    def engine_as(role: str) -> Engine:
        user, password = sandbox.login(role)
        return postgres_engine(
            load_settings(**{**settings.model_dump(), "database_url": url_as(settings, user, password)})
        )

    writes, reads = engine_as(writer), engine_as(reader)
    gen = f'"{generation.name}"'
    try:
        # A live consumer's start-up: set up (nothing to create), find the active generation, write.
        PostgresTarget(writes, projection, schema=generation.name).setup()
        active = PostgresGenerations(writes).active(projection.name)
        assert active is not None and active.name == generation.name
        with writes.begin() as conn:
            conn.execute(
                text(f"INSERT INTO {gen}.projection_stream_versions (stream_id, version) VALUES (:s, 1)"),
                {"s": uuid.uuid4()},
            )
        for statement in (
            f"CREATE TABLE {gen}.extra (x int)",
            f"DROP TABLE {gen}.projection_stream_versions",
        ):
            with (
                pytest.raises(ProgrammingError, match=r"permission denied|must be owner"),
                writes.begin() as conn,
            ):
                conn.execute(text(statement))
        # A query service: the alias views and the generation, read-only.
        with reads.connect() as conn:
            assert (
                conn.execute(text(f'SELECT count(*) FROM "{projection.name}".order_summaries')).scalar() == 0
            )
            assert conn.execute(text(f"SELECT count(*) FROM {gen}.projection_stream_versions")).scalar() == 1
        with pytest.raises(ProgrammingError, match="permission denied"), reads.begin() as conn:
            conn.execute(text(f"DELETE FROM {gen}.projection_stream_versions"))
    finally:
        writes.dispose()
        reads.dispose()


def test_connecting_as_a_superuser_warns_once(
    settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    superuser = load_settings(
        database_url=url_as(settings, SUPERUSER, SUPERUSER_PASSWORD),
        **{
            k: v
            for k, v in settings.model_dump().items()
            if k.startswith("database_tls") or k.endswith("sslmode")
        },
    )
    try:
        postgres_connection(superuser, connect_timeout=10).close()
    except psycopg.OperationalError:
        pytest.skip(f"no superuser login {SUPERUSER!r} with the stack's password on this server")
    caplog.set_level(logging.WARNING, logger="datalayer.security")

    monkeypatch.setattr(privileges, "_warned", False)
    caplog.clear()
    with postgres_connection(settings) as conn:
        ordinary = conn.info.parameter_status("is_superuser") != "on"
    if ordinary:
        assert not [r for r in caplog.records if r.name == "datalayer.security"]

    monkeypatch.setattr(privileges, "_warned", False)
    caplog.clear()
    for _ in range(2):
        postgres_connection(superuser).close()
    engine = postgres_engine(superuser)
    with engine.connect():
        pass
    engine.dispose()
    with EventStore.connect(
        superuser.psycopg_url(), max_size=1, connect_kwargs=superuser.postgres_connect_kwargs()
    ) as es:
        es.pool.wait(timeout=30)
    warnings = [r for r in caplog.records if r.name == "datalayer.security"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    message = warnings[0].getMessage()
    assert "superuser" in message and repr(SUPERUSER) in message
    assert "@" not in message  # names the user, never the URL


# -- secrets ----------------------------------------------------------------------------------------


class ProcessOutput:
    """A process whose stdout and stderr are collected as it runs."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        return code


def test_passwords_never_appear_in_output_or_logs(settings: Settings, sandbox: RoleSandbox) -> None:
    schema = sandbox.store()
    secret = f"S3cret-{uuid.uuid4().hex}"
    user, _ = sandbox.login(store_roles(schema).relay, password=secret)
    prefix = unique_name("sectest") + "."
    redis_url = urlsplit(settings.redis_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATALAYER_")}
    env.update(
        {k: str(v) for k, v in settings.describe().items() if "_URL" not in k},
        DATALAYER_DATABASE_URL=url_as(settings, user, secret),
        DATALAYER_REDIS_URL=urlunsplit(redis_url._replace(netloc=f":{secret}@{redis_url.netloc}")),
        DATALAYER_EVENTSTORE_SCHEMA=schema,
        DATALAYER_TOPIC_PREFIX=prefix,
        DATALAYER_TOPIC_PARTITIONS="1",
    )
    outputs = []
    for args in (["settings"], ["settings", "--json"]):
        shown = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=60, env=env)
        assert shown.returncode == 0, shown.stderr
        assert f"{user}:***@" in shown.stdout
        outputs.append(shown.stdout + shown.stderr)

    # The relay, logged in with that password as a member of the relay role, publishes an event.
    relay = ProcessOutput([str(BIN), "relay"], env)
    try:
        wait_until(lambda: "relay default: active" in relay.text, timeout=60, what="the relay to start")
        with sandbox.connect(settings.psycopg_url(), schema) as es:
            es.append(uuid.uuid4(), "Order", [NewEvent(uuid.uuid4(), "Placed", b"{}")], 0)

            def published() -> bool:
                with es.pool.connection() as conn:
                    return load_checkpoint(conn, schema, "default").published >= 1

            wait_until(published, timeout=60, what="the relay to publish and checkpoint")
        assert relay.stop() == 0
    finally:
        relay.proc.kill()
        admin = KafkaAdminClient(**settings.kafka_config())
        try:
            mine = [t for t in admin.list_topics() if t.startswith(prefix)]
            if mine:
                admin.delete_topics(mine)
        finally:
            admin.close()
    outputs.append(relay.text)

    # A wrong password: the failure is reported, the password is not.
    wrong = f"Wr0ng-{uuid.uuid4().hex}"
    env_wrong = dict(env, DATALAYER_DATABASE_URL=url_as(settings, user, wrong))
    failed = subprocess.run(
        [str(BIN), "db", "status"], capture_output=True, text=True, timeout=60, env=env_wrong
    )
    assert failed.returncode == 1
    assert "password authentication failed" in failed.stderr
    outputs.append(failed.stdout + failed.stderr)
    assert wrong not in outputs[-1]

    for output in outputs:
        assert secret not in output


def test_the_master_key_never_appears_in_output_or_logs(store: EventStore, tmp_path: Path) -> None:
    store.migrate()
    master, previous = new_master_key(), new_master_key()
    env = {**os.environ, "DATALAYER_EVENTSTORE_SCHEMA": store.schema, MASTER_KEY_ENV: master}
    outputs = []
    for args, extra in (
        (["settings"], {}),
        (["keys", "status"], {}),
        (["forget", str(uuid.uuid4()), "--reason", "test"], {}),
        (["keys", "rotate-master"], {PREVIOUS_MASTER_KEY_ENV: previous}),
        (["keys", "rotate-master"], {}),
        # Malformed: the error names the variable, not the value.
        (["keys", "rotate-master"], {MASTER_KEY_ENV: master[:20], PREVIOUS_MASTER_KEY_ENV: previous}),
    ):
        done = subprocess.run(
            [str(BIN), *args], capture_output=True, text=True, timeout=60, env={**env, **extra}
        )
        outputs.append(done.stdout + done.stderr)
    assert "re-wrapped 0 data key(s)" in outputs[3]
    assert f"{PREVIOUS_MASTER_KEY_ENV} (or" in outputs[4]
    assert f"{MASTER_KEY_ENV} must hold 32 random bytes" in outputs[5]
    # A key file: the same, and its content is never shown either.
    key_file = tmp_path / "master.key"
    key_file.write_text(master + "\n")
    file_env = {k: v for k, v in env.items() if k != MASTER_KEY_ENV}
    done = subprocess.run(
        [str(BIN), "keys", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**file_env, f"{MASTER_KEY_ENV}_FILE": str(key_file)},
    )
    assert done.returncode == 0, done.stderr
    outputs.append(done.stdout + done.stderr)
    for output in outputs:
        assert master not in output and previous not in output and master[:20] not in output
