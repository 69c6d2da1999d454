"""The CLI's crypto-shredding commands: ``forget`` and ``keys`` (new-master, rotate-master, status).

Thin layers over :mod:`eventstore.keys` and the orders domain; :func:`add_commands` registers them.
The master key comes from ``DATALAYER_MASTER_KEY`` (or ``DATALAYER_MASTER_KEY_FILE``) only, and no
command prints it, except ``keys new-master``, whose whole job is to make one.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import os
from uuid import UUID

from datalayer.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _uuid_arg(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a customer id (a UUID): {value!r}") from None


def _default_actor() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):
        return "operator"


def cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    """Destroy the customer's data key, then record ``Customer.Erased``; a rerun finishes a half-done one."""
    from datalayer.wiring import event_store
    from domain import CommandHandlers, OrdersApplication
    from eventstore.keys import DataKeys, MasterKeys

    customer_id: UUID = args.subject
    store = event_store(settings)
    try:
        store.require_schema()
        first = store.read_stream(customer_id, limit=1)
        if not first or first[0].stream_type != "Customer":
            print(
                f"datalayer forget: no customer {customer_id} in schema {store.schema}: nothing to forget "
                "(a subject is a customer id)",
                flush=True,
            )
            return EXIT_FAILED
        keys = DataKeys(store, MasterKeys.from_env())
        # The key first: once it is gone, no copy of the data anywhere can be read, even if the
        # erasure event below fails to be written (rerunning forget then records it).
        forgotten = keys.forget(str(customer_id))
        app = OrdersApplication(env=settings.eventsourcing_env())
        try:
            if app.get_customer(customer_id).erased:
                print(f"customer {customer_id} was already forgotten at {forgotten.erased_at.isoformat()}")
                return EXIT_OK
            result = CommandHandlers(app).erase_customer(
                {"customer_id": customer_id, "reason": args.reason, "actor": args.actor or _default_actor()}
            )
        finally:
            app.close()
    finally:
        store.close()
    what = {
        "destroyed": "data key destroyed",
        "tombstone": "no data key existed; none will ever be made",
        "already": "data key already destroyed",
    }[forgotten.outcome]
    print(
        f"forgot customer {customer_id}: {what}; erasure recorded as Customer.Erased "
        f"(stream version {result.version}); their personal fields now read as '[erased]' everywhere"
    )
    _warn_about_retired_generations(settings)
    return EXIT_OK


def _warn_about_retired_generations(settings: Settings) -> None:
    """Name the retired generations of customer read models: frozen copies the erasure does not reach."""
    from datalayer.wiring import KNOWN_PROJECTIONS, load_projection, read_model_store
    from projections.generations import RETIRED

    retired: list[str] = []
    try:
        for name in sorted(KNOWN_PROJECTIONS):
            projection = load_projection(name)
            if "Customer" not in projection.stream_types:
                continue
            models = read_model_store(projection, settings)
            try:
                generations = models.registry.generations(projection.name)
            finally:
                models.close()
            retired += [f"{projection.name}: {g.name}" for g in generations if g.status == RETIRED]
    except Exception as exc:  # the erasure is done; this is advice only
        print(f"warning: could not list retired read-model generations ({type(exc).__name__}: {exc})")
        return
    for generation in retired:
        print(
            f"warning: retired generation {generation} is a frozen copy the erasure does not reach: "
            "drop it (datalayer generations PROJECTION --drop GENERATION)"
        )


def cmd_keys_new_master(args: argparse.Namespace, settings: Settings) -> int:
    from eventstore.keys import MasterKey, new_master_key

    key = new_master_key()
    if args.file:
        # Never overwrite a key; readable by its owner only.
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(key + "\n")
        key_id = MasterKey(base64.b64decode(key), "new").key_id
        print(f"wrote a new master key (id {key_id}) to {args.file}: point DATALAYER_MASTER_KEY_FILE at it")
    else:
        print(key)
    return EXIT_OK


def cmd_keys_rotate_master(args: argparse.Namespace, settings: Settings) -> int:
    from datalayer.wiring import event_store
    from eventstore.keys import PREVIOUS_MASTER_KEY_ENV, DataKeys, MasterKeyError, MasterKeys

    master = MasterKeys.from_env()
    current = master.require_current()
    if master.previous is None:
        raise MasterKeyError(
            f"{PREVIOUS_MASTER_KEY_ENV} (or {PREVIOUS_MASTER_KEY_ENV}_FILE) is not set: give the old master "
            "key there and the new one in DATALAYER_MASTER_KEY"
        )
    with event_store(settings) as store:
        store.require_schema()
        count = DataKeys(store, master).rotate_master(args.batch_size)
    print(
        f"re-wrapped {count} data key(s) from master key {master.previous.key_id} to {current.key_id}; "
        f"once every process runs with the new key, drop {PREVIOUS_MASTER_KEY_ENV} and destroy the old key"
    )
    return EXIT_OK


def cmd_keys_status(args: argparse.Namespace, settings: Settings) -> int:
    from datalayer.wiring import event_store
    from eventstore.keys import DataKeys, MasterKeys

    master = MasterKeys.from_env()
    with event_store(settings) as store:
        store.require_schema()
        counts = DataKeys(store, master).counts()
    roles: dict[str, str] = {}
    if master.current is not None:
        roles[master.current.key_id] = " (DATALAYER_MASTER_KEY)"
    if master.previous is not None:
        roles[master.previous.key_id] = " (DATALAYER_PREVIOUS_MASTER_KEY)"
    if master.current is None:
        print("DATALAYER_MASTER_KEY is not set")
    for key_id, count in sorted(counts.items()):
        label = "forgotten subjects" if key_id == "forgotten" else f"data keys under master key {key_id}"
        print(f"{count:>10}  {label}{roles.get(key_id, '')}")
    if not counts:
        print("no data keys yet")
    return EXIT_OK


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``forget`` and ``keys`` on the CLI's subcommands."""
    forget = commands.add_parser(
        "forget",
        help="erase a customer's personal data (crypto-shredding): destroy their data key",
        description="Destroy the customer's data key in the event store's data_keys table and record the "
        "erasure as a Customer.Erased event (who, when, why). Events stay as they are (append-only), but "
        "their personal fields (name, email, address) can no longer be decrypted: the store, Kafka, every "
        "rebuild and the read models (which purge them on the erasure event) show '[erased]' instead. "
        "Irreversible. Idempotent: rerunning finishes an interrupted erasure. An id that is not a customer "
        "is an error (exit 1). Needs DATALAYER_MASTER_KEY and UPDATE on data_keys (the store's owner).",
        epilog='example: datalayer forget 5f0c...e1 --reason "GDPR request #1234" --actor privacy-office\n'
        "         the reason and actor are stored in the event: never put personal data in them",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    forget.add_argument("subject", metavar="CUSTOMER_ID", type=_uuid_arg, help="the customer's id")
    forget.add_argument("--reason", required=True, help="why (e.g. a ticket number); no personal data")
    forget.add_argument("--actor", help="who asked or ran it (default: operator:$USER)")
    forget.set_defaults(handler=cmd_forget)

    keys = commands.add_parser(
        "keys",
        help="the master key that wraps the per-customer data keys",
        description="Manage envelope encryption: data keys (one per customer, in data_keys) are wrapped by "
        "the master key in DATALAYER_MASTER_KEY (or DATALAYER_MASTER_KEY_FILE).",
    )
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    new = keys_commands.add_parser(
        "new-master",
        help="print (or write to a new file) a fresh random master key",
        description="Make a random 256-bit master key, base64: print it, or with --file write it to a new "
        "file (never overwritten) for DATALAYER_MASTER_KEY_FILE. Keep it in your secret store.",
        epilog="example: datalayer keys new-master --file /run/secrets/datalayer-master-key",
    )
    new.add_argument("--file", help="write to this new file instead of printing")
    new.set_defaults(handler=cmd_keys_new_master)
    rotate = keys_commands.add_parser(
        "rotate-master",
        help="re-wrap every data key under a new master key",
        description="Re-wrap every data key under DATALAYER_MASTER_KEY (the new key), opening those wrapped "
        "by DATALAYER_PREVIOUS_MASTER_KEY (the old one). Resumable: each batch is one transaction. Run all "
        "processes with both variables set first, then rotate, then drop the previous key and destroy it.",
        epilog="example: DATALAYER_MASTER_KEY_FILE=new.key DATALAYER_PREVIOUS_MASTER_KEY_FILE=old.key "
        "datalayer keys rotate-master",
    )
    rotate.add_argument("--batch-size", type=int, default=500, help="keys per transaction (default 500)")
    rotate.set_defaults(handler=cmd_keys_rotate_master)
    status = keys_commands.add_parser(
        "status",
        help="count data keys per master key id, and forgotten subjects",
        description="Count the data keys under each master key id (which one DATALAYER_MASTER_KEY is) and "
        "the forgotten subjects. Prints key ids only, never keys.",
        epilog="example: datalayer keys status",
    )
    status.set_defaults(handler=cmd_keys_status)


__all__ = ["add_commands"]
