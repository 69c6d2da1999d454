"""The event log: events, snapshots, append-only and per-stream-order guards."""

# Applied migrations are never edited: the runner compares checksums and refuses a changed one.
STATEMENTS = [
    """
    CREATE TABLE {schema}.events (
        position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        transaction_id  xid8 NOT NULL DEFAULT pg_current_xact_id(),
        stream_id       uuid NOT NULL,
        stream_type     text NOT NULL,
        stream_version  bigint NOT NULL CHECK (stream_version >= 0),
        event_id        uuid NOT NULL,
        event_type      text NOT NULL,
        schema_version  integer NOT NULL DEFAULT 1 CHECK (schema_version >= 1),
        payload         bytea NOT NULL,
        metadata        jsonb NOT NULL DEFAULT '{{}}',
        recorded_at     timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
        CONSTRAINT events_event_id_key UNIQUE (event_id)
    )
    """,
    # read_all: rows below the horizon in (transaction id, position) order.
    "CREATE INDEX events_log_order_idx ON {schema}.events (transaction_id, position)",
    # The stream type's own log, for consumers of one aggregate type.
    "CREATE INDEX events_stream_type_idx ON {schema}.events (stream_type, transaction_id, position)",
    """
    CREATE TABLE {schema}.snapshots (
        stream_id       uuid NOT NULL,
        stream_version  bigint NOT NULL,
        snapshot_type   text NOT NULL,
        payload         bytea NOT NULL,
        recorded_at     timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (stream_id, stream_version)
    )
    """,
    """
    CREATE TABLE {schema}.tracking (
        application_name text PRIMARY KEY,
        notification_id  bigint NOT NULL
    )
    """,
    # History is append-only in the database, whoever connects. Administrative rewrites (a later
    # migration's concern) must set datalayer.allow_history_rewrite for their own transaction.
    """
    CREATE FUNCTION {schema}.events_reject_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF coalesce(current_setting('datalayer.allow_history_rewrite', true), '') = 'on' THEN
            RETURN NULL;
        END IF;
        RAISE EXCEPTION 'events are append-only: % on %.% is not allowed',
            TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = 'DL002';
    END $$
    """,
    """
    CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON {schema}.events
        FOR EACH ROW EXECUTE FUNCTION {schema}.events_reject_rewrite()
    """,
    """
    CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON {schema}.events
        FOR EACH STATEMENT EXECUTE FUNCTION {schema}.events_reject_rewrite()
    """,
    # Every version after the first needs its predecessor, written by an earlier (or the same)
    # transaction: no gaps in a stream, and a transaction-ordered reader sees each stream in
    # version order. One query per INSERT statement, over that statement's rows only.
    """
    CREATE FUNCTION {schema}.events_check_stream_order() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        bad record;
    BEGIN
        SELECT n.stream_id, n.stream_version, p.transaction_id AS previous_xid
          INTO bad
          FROM new_rows n
          LEFT JOIN {schema}.events p
            ON p.stream_id = n.stream_id AND p.stream_version = n.stream_version - 1
         WHERE n.stream_version > 1
           AND (p.stream_id IS NULL OR p.transaction_id > n.transaction_id)
         LIMIT 1;
        IF FOUND THEN
            IF bad.previous_xid IS NULL THEN
                RAISE EXCEPTION 'stream % has no version % to follow with version %',
                    bad.stream_id, bad.stream_version - 1, bad.stream_version
                    USING ERRCODE = 'DL001';
            END IF;
            RAISE EXCEPTION 'stream % version % was written by a later transaction than version %',
                bad.stream_id, bad.stream_version - 1, bad.stream_version
                USING ERRCODE = '40001';
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER events_stream_order AFTER INSERT ON {schema}.events
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION {schema}.events_check_stream_order()
    """,
]
