"""Crypto-shredding on the real servers: personal fields sealed per customer, and ``forget`` erasing them.

A customer with distinctive personal data goes through the whole pipeline (store, relay, Kafka,
PostgreSQL and Redis read models); after ``datalayer forget`` none of it can be read anywhere, before
or after a rebuild, while their orders stay intact and other customers stay readable.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import redis
from eventsourcing.persistence import JSONTranscoder
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from psycopg import sql
from sqlalchemy import Engine, text

from datalayer.settings import Settings
from domain import ERASED, CommandHandlers, CustomerErased, OrdersApplication, PersonalData
from eventstore import EventStore
from eventstore.keys import (
    MASTER_KEY_ENV,
    PREVIOUS_MASTER_KEY_ENV,
    DataKeys,
    MasterKey,
    MasterKeyError,
    MasterKeys,
    master_key_from_env,
    new_master_key,
)
from eventstore.migrate_events import migrate_events
from eventstore.personal import SEALED_TAG, PersonalFields, SealedFieldError
from eventstore.portable import export_log, import_log, open_export, open_import
from eventstore.relay.envelope import encode_envelope
from projections.customers import CustomerCache, CustomerDirectory, customer_key
from projections.events import event_decoder, event_from_envelope, event_from_record
from projections.generations import REDIS_ALIASES
from projections.replay import replay
from projections.targets import PostgresTarget, RedisTarget
from tests.helpers import unique_name, wait_until
from tests.pipeline import Pipeline, pg_contents, pipeline, redis_contents

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("datalayer")

# Each contains a space or '@', which base64 (the sealed values) never does: no chance match.
NAME, EMAIL, ADDRESS, NEW_ADDRESS = (
    "Private Person",
    "private.person@example.com",
    "7 Secret Garden Way",
    "9 Hidden Mews Close",
)
PERSONAL = (NAME, EMAIL, ADDRESS, NEW_ADDRESS)
OTHER = ("Other Keeper", "other.keeper@example.com", "1 Plain Street")


def decoder_for(store: EventStore, **env: str) -> Any:
    """A decoder opening personal fields with the data keys of ``store`` (this test's schema)."""
    return event_decoder("Orders", {"DATALAYER_EVENTSTORE_SCHEMA": store.schema, **env})


def cli(store: EventStore, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DATALAYER_EVENTSTORE_SCHEMA": store.schema, **env}
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, timeout=120, env=environment, cwd=ROOT
    )


def leaks(text: str | bytes, secrets: tuple[str, ...] = PERSONAL) -> list[str]:
    """The personal values found in ``text``."""
    haystack = text.decode(errors="replace") if isinstance(text, bytes) else text
    return [s for s in secrets if s in haystack]


def schema_text(store: EventStore, schema: str) -> str:
    """Every row of every table of ``schema`` as text: what a copy of the database holds."""
    with store.pool.connection() as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s"
                " AND table_type = 'BASE TABLE'",
                (schema,),
            ).fetchall()
        ]
        rows = []
        for table in tables:
            query = sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(schema, table))
            rows += [r[0] for r in conn.execute(query).fetchall()]
    # bytea columns print as hex: decode them too, so raw payload bytes are searched as well.
    decoded = []
    for row in rows:
        for part in row.split("\\\\x")[1:]:
            hexdigits = part[: len(part) - len(part.lstrip("0123456789abcdef"))]
            decoded.append(bytes.fromhex(hexdigits[: len(hexdigits) // 2 * 2]).decode(errors="replace"))
    assert tables, f"no tables in {schema}"
    return "\n".join(rows + decoded)


def kafka_values(settings: Settings, prefix: str, timeout: float = 30.0) -> list[bytes]:
    """Every record value on every topic starting with ``prefix``, from the beginning."""
    admin = KafkaAdminClient(**settings.kafka_config())
    try:
        topics = [t for t in admin.list_topics() if t.startswith(prefix)]
    finally:
        admin.close()
    consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False)
    try:
        parts = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        values: list[bytes] = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp] for tp in parts):
            assert time.monotonic() < deadline, "timed out reading the topics back"
            for records in consumer.poll(timeout_ms=500).values():
                values += [r.value for r in records]
        return values
    finally:
        consumer.close()


class Shredding:
    """A pipeline with the customer read models of this test's store, live and rebuilt."""

    def __init__(self, pl: Pipeline, engine: Engine, client: redis.Redis) -> None:
        self.pl = pl
        self.engine = engine
        self.redis = client
        self.directory = PostgresTarget(
            engine, CustomerDirectory(decoder_for(pl.store)), schema=unique_name("cdir")
        )
        self.cache = RedisTarget(
            client, CustomerCache(decoder_for(pl.store)), prefix=f"dl:{{{unique_name('ccache')}}}:"
        )
        self.targets: list[PostgresTarget | RedisTarget] = [self.directory, self.cache]

    def rebuilt(self, target: PostgresTarget | RedisTarget) -> PostgresTarget | RedisTarget:
        """The same read model replayed from the store into a new schema or prefix."""
        fresh: PostgresTarget | RedisTarget
        projection = type(target.projection)(decoder_for(self.pl.store))
        if isinstance(target, PostgresTarget):
            fresh = PostgresTarget(self.engine, projection, schema=unique_name("cfresh"))
        else:
            fresh = RedisTarget(self.redis, projection, prefix=f"dl:{{{unique_name('cfresh')}}}:")
        self.targets.append(fresh)
        fresh.setup()
        replay(fresh.projection, fresh, self.pl.store)
        return fresh

    def contents(self, target: PostgresTarget | RedisTarget) -> dict[str, Any]:
        if isinstance(target, PostgresTarget):
            return pg_contents(self.engine, target)
        return redis_contents(self.redis, target.prefix)

    def close(self) -> None:
        for target in self.targets:
            target.drop()


@pytest.fixture
def shredding(
    settings: Settings, store: EventStore, engine: Engine, redis_conn: redis.Redis
) -> Iterator[Shredding]:
    with pipeline(settings, store, engine, redis_conn) as pl:
        s = Shredding(pl, engine, redis_conn)
        try:
            yield s
        finally:
            s.close()


def register(commands: CommandHandlers, name: str, email: str, address: str) -> UUID:
    return commands.register_customer({"name": name, "email": email, "address": address}).stream_id


def test_forget_erases_a_customer_from_the_store_kafka_and_every_read_model(
    settings: Settings, shredding: Shredding
) -> None:
    pl = shredding.pl
    _, products = pl.seed_catalog(products=3)
    customer = register(pl.commands, NAME, EMAIL, ADDRESS)
    pl.commands.change_customer_address({"customer_id": customer, "address": NEW_ADDRESS})
    other = register(pl.commands, *OTHER)
    pl.order_flow(customer, products, 6)
    pl.order_flow(other, products, 2)

    # Sealed from the first write: no copy of the database holds them in clear, even before forget.
    assert leaks(schema_text(pl.store, pl.store.schema)) == []
    payload = pl.store.read_stream(customer)[0].payload
    assert SEALED_TAG.encode() in payload and b'"subject":"' + str(customer).encode() in payload

    pl.start_relay()
    for target in (*shredding.targets, pl.views):
        target.setup()
        pl.start_consumer(target)
    for target in (*shredding.targets, pl.views):
        pl.wait_caught_up(target)
    # The read models hold the data (opened by the decoder): what there is to erase.
    rows = {r["customer_id"]: r for r in shredding.contents(shredding.directory)["customers"]}
    assert (rows[customer]["name"], rows[customer]["address"]) == (NAME, NEW_ADDRESS)
    assert redis_contents(shredding.redis, shredding.cache.prefix)[customer_key(customer)][b"email"] == (
        EMAIL.encode()
    )
    orders_before = pl.read_model(pl.views)
    customer_orders = [r for r in orders_before["order_summaries"] if r["customer_id"] == customer]
    assert len(customer_orders) == 6
    # Kafka carries the sealed fields only: its retention never holds the data in clear.
    values = kafka_values(settings, pl.topic_prefix)
    assert any(str(customer).encode() in v and SEALED_TAG.encode() in v for v in values)
    assert [leaks(v) for v in values if leaks(v)] == []

    forgotten = cli(pl.store, "forget", str(customer), "--reason", "ticket 4711", "--actor", "dpo")
    assert forgotten.returncode == 0, forgotten.stderr
    assert f"forgot customer {customer}: data key destroyed" in forgotten.stdout

    # The erasure event: who and why, no personal data, last in the customer's stream.
    erasure = pl.store.read_stream(customer)[-1]
    assert erasure.event_type == "domain.customer:Customer.Erased"
    assert b'"reason":"ticket 4711"' in erasure.payload and b'"actor":"dpo"' in erasure.payload
    assert leaks(erasure.payload) == []

    # The store: the aggregate loads with the marker; the raw rows never held the data.
    loaded = OrdersApplication(env=settings.eventsourcing_env(pl.store.schema)).get_customer(customer)
    assert (loaded.name, loaded.email, loaded.address, loaded.erased) == (ERASED, ERASED, ERASED, True)
    assert pl.app.get_customer(other).name == OTHER[0]
    with pl.store.pool.connection() as conn:
        row = conn.execute(
            sql.SQL("SELECT wrapped_key, erased_at FROM {} WHERE subject = %s").format(
                sql.Identifier(pl.store.schema, "data_keys")
            ),
            (str(customer),),
        ).fetchone()
    assert row is not None and row[0] is None and row[1] is not None
    assert leaks(schema_text(pl.store, pl.store.schema)) == []

    # The live read models purged the customer on the erasure event; the others are untouched.
    for target in (*shredding.targets, pl.views):
        pl.wait_caught_up(target)
    rows = {r["customer_id"]: r for r in shredding.contents(shredding.directory)["customers"]}
    assert (rows[customer]["name"], rows[customer]["email"], rows[customer]["address"]) == (None, None, None)
    assert rows[customer]["erased_at"] is not None
    assert (rows[other]["name"], rows[other]["email"], rows[other]["address"]) == OTHER
    cached = redis_contents(shredding.redis, shredding.cache.prefix)
    assert customer_key(customer) not in cached
    assert cached[customer_key(other)][b"name"] == OTHER[0].encode()
    assert leaks(schema_text(pl.store, shredding.directory.schema)) == []
    assert leaks(repr(cached)) == []
    # Their orders (amounts, products) are intact in the order read models.
    assert pl.read_model(pl.views) == orders_before

    # Rebuilds after the erasure never bring the data back, and equal the live, purged read models.
    for live in shredding.targets[:2]:
        fresh = shredding.rebuilt(live)
        assert shredding.contents(fresh) == shredding.contents(live)
        assert leaks(repr(shredding.contents(fresh))) == []
    # Every event the decoder reads back for the customer shows the marker instead of the data.
    decoder = decoder_for(pl.store)
    opened = []
    for recorded in pl.store.read_stream(customer):
        event = event_from_record(recorded)
        decoder.bind(event)
        marker = getattr(type(event.data), "personal_data", None)
        opened += [getattr(event.data, field) for field in (marker.fields if marker else ())]
    assert opened == [ERASED] * 4  # name, email, address of Registered; address of AddressChanged

    # Kafka, after the erasure event went through: still nothing in clear.
    assert [leaks(v) for v in kafka_values(settings, pl.topic_prefix) if leaks(v)] == []

    # A customer is never snapshotted: a snapshot would hold the personal fields outside the sealing.
    with pytest.raises(ValueError, match="holds personal data: its snapshots are refused"):
        pl.app.take_snapshot(other)

    # Nothing more can be recorded for the customer; forgetting again is a no-op that says so.
    with pytest.raises(CustomerErased):
        CommandHandlers(
            OrdersApplication(env=settings.eventsourcing_env(pl.store.schema))
        ).change_customer_address({"customer_id": customer, "address": "1 New Road"})
    again = cli(pl.store, "forget", str(customer), "--reason", "ticket 4711")
    assert again.returncode == 0, again.stderr
    assert "already forgotten" in again.stdout
    assert [e.event_type.rsplit(".", 1)[-1] for e in pl.store.read_stream(customer)].count("Erased") == 1


def test_forget_of_an_unknown_customer_is_an_error(store: EventStore) -> None:
    store.migrate()
    unknown = uuid.uuid4()
    result = cli(store, "forget", str(unknown), "--reason", "ticket 1")
    assert result.returncode == 1
    assert f"no customer {unknown}" in result.stdout + result.stderr
    bad = cli(store, "forget", "not-a-uuid", "--reason", "ticket 1")
    assert bad.returncode == 2
    assert "not a customer id" in bad.stderr


def test_rotating_the_master_key_keeps_data_readable_and_forgotten_data_erased(
    settings: Settings, store: EventStore
) -> None:
    old = os.environ[MASTER_KEY_ENV]
    new = new_master_key()
    app = OrdersApplication(env=settings.eventsourcing_env(store.schema))
    commands = CommandHandlers(app)
    kept = register(commands, *OTHER)
    gone = register(commands, NAME, EMAIL, ADDRESS)
    assert cli(store, "forget", str(gone), "--reason", "ticket 9").returncode == 0

    # The new key alone cannot open data keys wrapped by the old one: the error names the variables.
    with_new_only = {**settings.eventsourcing_env(store.schema), MASTER_KEY_ENV: new}
    with pytest.raises(MasterKeyError, match=f"{MASTER_KEY_ENV}.*{PREVIOUS_MASTER_KEY_ENV}"):
        OrdersApplication(env=with_new_only).get_customer(kept)

    missing = cli(store, "keys", "rotate-master", **{MASTER_KEY_ENV: new})
    assert missing.returncode == 1 and PREVIOUS_MASTER_KEY_ENV in missing.stderr
    rotated = cli(store, "keys", "rotate-master", **{MASTER_KEY_ENV: new, PREVIOUS_MASTER_KEY_ENV: old})
    assert rotated.returncode == 0, rotated.stderr
    assert "re-wrapped 1 data key(s)" in rotated.stdout
    # Resumable and idempotent: nothing left to do.
    assert (
        "re-wrapped 0"
        in cli(store, "keys", "rotate-master", **{MASTER_KEY_ENV: new, PREVIOUS_MASTER_KEY_ENV: old}).stdout
    )
    status = cli(store, "keys", "status", **{MASTER_KEY_ENV: new})
    assert status.returncode == 0 and "1  forgotten subjects" in status.stdout
    assert new not in status.stdout + rotated.stdout + rotated.stderr
    assert old not in status.stdout + rotated.stdout + rotated.stderr

    # Under the new key alone, the kept customer reads as before (store and decoder alike)...
    customer = OrdersApplication(env=with_new_only).get_customer(kept)
    assert (customer.name, customer.email, customer.address) == OTHER
    # ...the forgotten one stays erased, and the old key no longer opens anything.
    assert OrdersApplication(env=with_new_only).get_customer(gone).name == ERASED
    with pytest.raises(MasterKeyError, match=MASTER_KEY_ENV):
        OrdersApplication(env=settings.eventsourcing_env(store.schema)).get_customer(kept)
    # New customers get keys under the new master key.
    register(CommandHandlers(OrdersApplication(env=with_new_only)), "New Comer", "new@example.com", "2 Road")
    assert cli(store, "keys", "status", **{MASTER_KEY_ENV: new}).stdout.count("data keys under") == 1


def test_a_missing_or_malformed_master_key_is_a_clear_error(settings: Settings, store: EventStore) -> None:
    app = OrdersApplication(env=settings.eventsourcing_env(store.schema))
    customer = register(CommandHandlers(app), *OTHER)
    no_key = {**settings.eventsourcing_env(store.schema), MASTER_KEY_ENV: ""}
    with pytest.raises(MasterKeyError, match=f"{MASTER_KEY_ENV} \\(or {MASTER_KEY_ENV}_FILE\\) is not set"):
        register(CommandHandlers(OrdersApplication(env=no_key)), *OTHER)
    with pytest.raises(MasterKeyError, match="is not set"):
        OrdersApplication(env=no_key).get_customer(customer)
    # Events without personal data need no master key.
    CommandHandlers(OrdersApplication(env=no_key)).create_product(
        {"sku": "S-1", "name": "Thing", "price": Decimal("1.00")}
    )
    # A malformed key: named, and its value never shown.
    malformed = "not-a-key-" + uuid.uuid4().hex
    with pytest.raises(MasterKeyError) as info:
        OrdersApplication(env={**no_key, MASTER_KEY_ENV: malformed}).get_customer(customer)
    assert MASTER_KEY_ENV in str(info.value) and malformed not in str(info.value)
    # A consumer's decoder without the key fails the same way (it is not dead-lettered as malformed).
    event = event_from_record(store.read_stream(customer)[0])
    decoder = decoder_for(store, **{MASTER_KEY_ENV: ""})
    decoder.bind(event)
    with pytest.raises(MasterKeyError, match=MASTER_KEY_ENV):
        _ = event.data


def test_exports_and_migrations_carry_the_data_keys_and_keep_forgotten_subjects_forgotten(
    settings: Settings, store: EventStore, empty_store: EventStore, tmp_path: Path
) -> None:
    commands = CommandHandlers(OrdersApplication(env=settings.eventsourcing_env(store.schema)))
    kept = register(commands, *OTHER)
    gone = register(commands, NAME, EMAIL, ADDRESS)
    assert cli(store, "forget", str(gone), "--reason", "ticket 7").returncode == 0

    path = str(tmp_path / "log.jsonl.gz")
    with open_export(path) as out:
        summary = export_log(store, out)
    assert summary.events == 3  # two Registered, one Erased
    exported = gzip.decompress(Path(path).read_bytes())
    assert leaks(exported, (*PERSONAL, *OTHER)) == []  # wrapped keys and sealed fields only
    assert b'"data_keys":2' in exported.splitlines()[-1]
    with open_import(path) as source:
        import_log(empty_store, source)
    restored = OrdersApplication(env=settings.eventsourcing_env(empty_store.schema))
    customer = restored.get_customer(kept)
    assert (customer.name, customer.email, customer.address) == OTHER
    assert restored.get_customer(gone).name == ERASED

    migrated_schema = unique_name("shredmig")
    target = EventStore.connect(
        settings.psycopg_url(), migrated_schema, max_size=2, connect_kwargs=settings.postgres_connect_kwargs()
    )
    try:
        assert migrate_events(store, target).ok
        moved = OrdersApplication(env=settings.eventsourcing_env(migrated_schema))
        assert moved.get_customer(kept).address == OTHER[2]
        assert moved.get_customer(gone).address == ERASED
    finally:
        with target.pool.connection() as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(migrated_schema)))
        target.close()


def aof_files(client: redis.Redis) -> list[Path]:
    """The server's append-only files, when they are on this machine (the local stack's are)."""
    folder = Path(str(client.config_get("dir")["dir"])) / str(
        client.config_get("appenddirname")["appenddirname"]
    )
    if client.config_get("appendonly")["appendonly"] != "yes" or not folder.is_dir():
        pytest.skip(f"no append-only files of this Redis server at {folder}")
    return sorted(folder.iterdir())


def rewrite_aof(client: redis.Redis) -> None:
    """BGREWRITEAOF, waited for: afterwards the files hold the data set as it is, not its history."""
    before = client.info("persistence")["aof_rewrites"]
    wait_until(
        lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0, what="no AOF rewrite running"
    )
    client.bgrewriteaof()

    def done() -> bool:
        info = client.info("persistence")
        return info["aof_rewrites"] > before and not info["aof_rewrite_in_progress"]

    wait_until(done, timeout=60, what="the AOF rewrite")


def test_a_redis_dump_loses_the_data_once_the_purge_is_rewritten(
    settings: Settings, store: EventStore, redis_conn: redis.Redis
) -> None:
    files = aof_files(redis_conn)
    app = OrdersApplication(env=settings.eventsourcing_env(store.schema))
    customer = register(CommandHandlers(app), NAME, EMAIL, ADDRESS)
    target = RedisTarget(
        redis_conn, CustomerCache(decoder_for(store)), prefix=f"dl:{{{unique_name('aof')}}}:"
    )
    try:
        target.setup()
        replay(target.projection, target, store)
        assert redis_conn.hget(target.key(customer_key(customer)), "name") == NAME.encode()
        rewrite_aof(redis_conn)
        # The dump holds the name while the read model does: the check below can see it.
        assert NAME.encode() in b"".join(f.read_bytes() for f in aof_files(redis_conn))

        assert cli(store, "forget", str(customer), "--reason", "ticket 3").returncode == 0
        replay(target.projection, target, store)  # on from its checkpoint: the erasure purges
        assert not redis_conn.exists(target.key(customer_key(customer)))
        rewrite_aof(redis_conn)
        assert leaks(b"".join(f.read_bytes() for f in aof_files(redis_conn))) == []
    finally:
        target.drop()
    assert files  # the server kept its files throughout


def test_keys_new_master_makes_a_usable_key_and_never_overwrites_a_file(
    store: EventStore, tmp_path: Path
) -> None:
    printed = cli(store, "keys", "new-master")
    assert printed.returncode == 0, printed.stderr
    key = printed.stdout.strip()
    assert master_key_from_env({MASTER_KEY_ENV: key}) is not None
    assert cli(store, "keys", "new-master").stdout.strip() != key  # random each time
    path = tmp_path / "master.key"
    written = cli(store, "keys", "new-master", "--file", str(path))
    assert written.returncode == 0, written.stderr
    assert "point DATALAYER_MASTER_KEY_FILE at it" in written.stdout
    content = path.read_text()
    assert content.strip() not in written.stdout
    assert master_key_from_env({f"{MASTER_KEY_ENV}_FILE": str(path)}) is not None
    again = cli(store, "keys", "new-master", "--file", str(path))
    assert again.returncode == 1 and "File exists" in again.stderr
    assert path.read_text() == content


def test_sealed_values_and_wrapped_keys_are_bound_to_their_subject(store: EventStore) -> None:
    store.migrate()
    master = MasterKeys(MasterKey(os.urandom(32), MASTER_KEY_ENV))
    transcoder = JSONTranscoder()
    fields = PersonalFields(DataKeys(store, master), transcoder)
    marker = PersonalData(("name",), subject="owner")
    ann, bob = str(uuid.uuid4()), str(uuid.uuid4())
    sealed_ann = fields.seal_state(marker, {"owner": ann, "name": NAME})
    sealed_bob = fields.seal_state(marker, {"owner": bob, "name": OTHER[0]})
    assert NAME not in repr(sealed_ann)
    opened = dict(sealed_ann)
    fields.open_state(marker, opened)
    assert opened["name"] == NAME
    # Ann's sealed name passed off as Bob's (his subject, his key): it does not open.
    moved = dict(sealed_bob, name=dict(sealed_ann["name"], subject=bob))
    with pytest.raises(SealedFieldError, match=f"field 'name' of subject {bob}"):
        fields.open_state(marker, moved)
    # Ann's wrapped key copied onto Bob's row: it does not open either (a fresh reader, no cache).
    with store.pool.connection() as conn:
        conn.execute(
            sql.SQL(
                "UPDATE {0} SET wrapped_key = (SELECT wrapped_key FROM {0} WHERE subject = %s)"
                " WHERE subject = %s"
            ).format(sql.Identifier(store.schema, "data_keys")),
            (ann, bob),
        )
    with pytest.raises(MasterKeyError, match="the row was altered"):
        PersonalFields(DataKeys(store, master), transcoder).open_state(marker, dict(sealed_bob))


def test_rebuilds_and_verify_from_the_command_line_after_forget(
    settings: Settings, shredding: Shredding, engine: Engine
) -> None:
    pl = shredding.pl
    names = [unique_name("clicd"), unique_name("clicc")]
    env = {"DATALAYER_TOPIC_PREFIX": pl.topic_prefix, "DATALAYER_DEAD_LETTER_TOPIC_PREFIX": pl.dlq_prefix}
    directory, cache = (
        "tests.cli_projections:IsolatedDirectory",
        "tests.cli_projections:IsolatedCustomerCache",
    )
    try:
        pl.start_relay()
        customer = register(pl.commands, NAME, EMAIL, ADDRESS)
        other = register(pl.commands, *OTHER)
        for name, projection in zip(names, (directory, cache), strict=True):
            built = cli(
                pl.store, "rebuild", projection, "--handover-timeout", "0.5", TEST_PROJECTION_NAME=name, **env
            )
            assert built.returncode == 0, built.stderr
        with engine.connect() as conn:
            row = conn.execute(
                text(f'SELECT name FROM "{names[0]}".customers WHERE customer_id = :c'), {"c": customer}
            ).one()
        assert row.name == NAME

        assert cli(pl.store, "forget", str(customer), "--reason", "ticket 5").returncode == 0
        for name, projection in zip(names, (directory, cache), strict=True):
            # No live consumer applied the erasure to the first generation here: it is dropped (a
            # retired generation is a frozen copy, which erasure does not reach; see docs/security.md).
            again = cli(
                pl.store,
                "rebuild",
                projection,
                "--handover-timeout",
                "0.5",
                "--drop-old",
                TEST_PROJECTION_NAME=name,
                **env,
            )
            assert again.returncode == 0, again.stderr
            verified = cli(pl.store, "verify", projection, TEST_PROJECTION_NAME=name, **env)
            assert verified.returncode == 0, verified.stdout + verified.stderr
        with engine.connect() as conn:
            rows = {
                r.customer_id: r
                for r in conn.execute(text(f'SELECT * FROM "{names[0]}".customers')).all()  # the alias
            }
        assert (rows[customer].name, rows[customer].email, rows[customer].address) == (None, None, None)
        assert rows[other].name == OTHER[0]
        assert leaks(schema_text(pl.store, f"{names[0]}_v1_r1")) == []
        with engine.connect() as conn:
            schemas = conn.execute(
                text("SELECT nspname FROM pg_namespace WHERE nspname LIKE :p"), {"p": f"{names[0]}%"}
            ).scalars()
            assert sorted(schemas) == [names[0], f"{names[0]}_v1_r1"]  # the alias and the active one
        cached = {
            key: shredding.redis.hgetall(key)
            for key in shredding.redis.scan_iter(match=f"dl:{{{names[1]}*:customer:*")
        }
        assert list(cached) == [f"dl:{{{names[1]}_v1_r1}}:customer:{other}".encode()]
        assert OTHER[0].encode() in repr(cached).encode()
    finally:
        with engine.begin() as conn:
            for generation in conn.execute(
                text("SELECT generation FROM datalayer_read_models.generations WHERE projection = :p"),
                {"p": names[0]},
            ).scalars():
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{generation}" CASCADE')
            conn.execute(
                text("DELETE FROM datalayer_read_models.generations WHERE projection = :p"), {"p": names[0]}
            )
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{names[0]}" CASCADE')
        for key in shredding.redis.scan_iter(match=f"dl:{{{names[1]}*", count=1000):
            shredding.redis.delete(key)
        shredding.redis.delete(f"dl:generations:{names[1]}")
        shredding.redis.hdel(REDIS_ALIASES, names[1])


def test_forget_names_the_retired_generations_it_cannot_reach(shredding: Shredding, engine: Engine) -> None:
    pl = shredding.pl
    env = {"DATALAYER_TOPIC_PREFIX": pl.topic_prefix, "DATALAYER_DEAD_LETTER_TOPIC_PREFIX": pl.dlq_prefix}
    name = CustomerDirectory.name  # the shipped name: forget looks at the known projections
    with engine.connect() as conn:
        registry = conn.execute(text("SELECT to_regclass('datalayer_read_models.generations')")).scalar()
        taken = (
            registry is not None
            and conn.execute(
                text("SELECT count(*) FROM datalayer_read_models.generations WHERE projection = :p"),
                {"p": name},
            ).scalar()
        )
    if taken:
        pytest.skip(f"this database already has {name} generations, which this test would drop")
    try:
        pl.start_relay()
        customer = register(pl.commands, NAME, EMAIL, ADDRESS)
        for _ in range(2):  # the second rebuild retires the first generation
            built = cli(pl.store, "rebuild", name, "--handover-timeout", "0.5", **env)
            assert built.returncode == 0, built.stderr
        forgotten = cli(pl.store, "forget", str(customer), "--reason", "ticket 6")
        assert forgotten.returncode == 0, forgotten.stderr
        assert f"warning: retired generation {name}: {name}_v1 is a frozen copy" in forgotten.stdout
        assert f"{name}_v1_r1 is a frozen copy" not in forgotten.stdout  # the active one purges itself
    finally:
        with engine.begin() as conn:
            for generation in conn.execute(
                text("SELECT generation FROM datalayer_read_models.generations WHERE projection = :p"),
                {"p": name},
            ).scalars():
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{generation}" CASCADE')
            conn.execute(
                text("DELETE FROM datalayer_read_models.generations WHERE projection = :p"), {"p": name}
            )
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def test_both_decoding_paths_open_personal_fields(settings: Settings, store: EventStore) -> None:
    """The Kafka envelope (JSON, the decoder's fast path) and the store's bytes (replay) alike."""
    app = OrdersApplication(env=settings.eventsourcing_env(store.schema))
    customer = register(CommandHandlers(app), NAME, EMAIL, ADDRESS)
    recorded = store.read_stream(customer)[0]
    decoder = decoder_for(store)
    for event in (event_from_envelope(encode_envelope(recorded)), event_from_record(recorded)):
        decoder.check(event)
        decoder.bind(event)
        assert (event.data.name, event.data.email, event.data.address) == (NAME, EMAIL, ADDRESS)
    assert cli(store, "forget", str(customer), "--reason", "ticket 8").returncode == 0
    decoder = decoder_for(store)  # a fresh process's decoder: no cached key
    for event in (event_from_envelope(encode_envelope(recorded)), event_from_record(recorded)):
        decoder.bind(event)
        assert (event.data.name, event.data.email, event.data.address) == (ERASED, ERASED, ERASED)
