"""A process that sends one batch's deferred commit to PostgreSQL and waits to be killed before confirming it.

``python -m tests.deferred_commit_process SCHEMA STAGING_MIN_ROWS STREAM...``: applies ``placed`` and
``Paid`` of each stream into the ``tests.test_postgres_target`` projection's target in ``SCHEMA``
(``STAGING_MIN_ROWS``: the target's, ``none`` for array parameters only) with checkpoint ``log`` =
``2``, prints ``sent`` once the commit is on its way, then blocks reading stdin.
"""

from __future__ import annotations

import sys

from datalayer.clients import postgres_engine
from datalayer.settings import load_settings
from projections.runner import apply_batch
from projections.targets import PostgresTarget
from tests.test_postgres_deferred import batch_of
from tests.test_postgres_target import Orders, Sink, StubDecoder


def main(argv: list[str]) -> int:
    schema, staging, *streams = argv
    engine = postgres_engine(load_settings())
    min_rows = None if staging == "none" else int(staging)
    target = PostgresTarget(engine, Orders(decoder=StubDecoder()), schema=schema, staging_min_rows=min_rows)
    target.defer_commits(True)
    apply_batch(target.projection, target, batch_of(streams), {"log": "2"}, Sink())
    print("sent", flush=True)
    sys.stdin.read()  # killed here, before confirm_commit()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
