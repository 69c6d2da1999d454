"""Per-subject data keys for crypto-shredding, each wrapped (AES-GCM) by a master key from the environment.

A row whose ``wrapped_key`` is NULL is a forgotten subject: its key was destroyed, and no new key is
ever made for it. ``master_key_id`` names the master key that wrapped the data key, so that a
rotation re-wraps exactly the rows of the old master key.
"""

STATEMENTS = [
    """
    CREATE TABLE {schema}.data_keys (
        subject        text PRIMARY KEY,
        master_key_id  text,
        wrapped_key    bytea,
        created_at     timestamptz NOT NULL DEFAULT now(),
        rotated_at     timestamptz,
        erased_at      timestamptz,
        CONSTRAINT data_keys_erased_has_no_key CHECK (
            (erased_at IS NULL AND wrapped_key IS NOT NULL AND master_key_id IS NOT NULL)
            OR (erased_at IS NOT NULL AND wrapped_key IS NULL AND master_key_id IS NULL)
        )
    )
    """,
    """
    CREATE INDEX data_keys_master_key_idx ON {schema}.data_keys (master_key_id)
        WHERE wrapped_key IS NOT NULL
    """,
]
