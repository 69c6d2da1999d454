"""Where each relay has published up to: advanced only once Kafka acknowledged everything before it."""

STATEMENTS = [
    """
    CREATE TABLE {schema}.relay_checkpoints (
        relay_name      text PRIMARY KEY,
        transaction_id  xid8 NOT NULL,
        position        bigint NOT NULL,
        published       bigint NOT NULL DEFAULT 0,
        updated_at      timestamptz NOT NULL DEFAULT now()
    )
    """,
]
