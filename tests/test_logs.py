"""``datalayer --log-json``: a long-running command logs one JSON object per line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from datalayer.clients import postgres_connection
from datalayer.settings import Settings
from datalayer.status import relay_lock_holder
from eventstore import EventStore
from tests.helpers import unique_name, wait_until

BIN = Path(sys.executable).with_name("datalayer")


def test_the_relay_logs_json_lines(settings: Settings, store: EventStore) -> None:
    name = unique_name("jsonlog")
    env = dict(os.environ, DATALAYER_EVENTSTORE_SCHEMA=store.schema, DATALAYER_TOPIC_PREFIX=f"{name}.")
    relay = subprocess.Popen(
        [str(BIN), "--log-json", "relay", "--name", name], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        with postgres_connection(settings, autocommit=True) as conn:
            wait_until(lambda: relay_lock_holder(conn, store.schema, name), what="the relay to become active")
        relay.send_signal(signal.SIGTERM)
        _, stderr = relay.communicate(timeout=60)
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait(timeout=30)
    assert relay.returncode == 0, stderr
    entries = [json.loads(line) for line in stderr.splitlines()]  # every line is one JSON object
    active = [e for e in entries if e["message"] == f"relay {name}: active"]
    assert len(active) == 1
    assert active[0]["level"] == "INFO" and active[0]["logger"] == "datalayer.relay"
    assert set(active[0]) >= {"time", "level", "logger", "message", "process", "thread"}
