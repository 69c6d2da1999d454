"""``stack/stack.sh up`` against servers it did not start: what it uses and what it refuses."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from datalayer.settings import Settings
from tests.helpers import wait_until

STACK = Path(__file__).resolve().parents[1] / "stack" / "stack.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.ConnectionError:
        return False


def test_up_refuses_a_server_left_running_by_a_deleted_checkout(settings: Settings, tmp_path: Path) -> None:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("no redis-server on this machine")
    gone, port = tmp_path / "removed-checkout", _free_port()
    gone.mkdir()
    orphan = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=gone,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _answers(port), what="the orphan Redis to answer")
        shutil.rmtree(gone)
        # A stack of its own, on the suite's PostgreSQL (used as found), and the orphan's Redis port.
        env = dict(
            os.environ,
            DATALAYER_STATE_DIR=str(tmp_path / "state"),
            DATALAYER_PG_PORT=str(urlsplit(settings.database_url).port),
            DATALAYER_REDIS_PORT=str(port),
            DATALAYER_REDIS_TLS_PORT=str(_free_port()),
        )
        result = subprocess.run([str(STACK), "up"], capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode != 0
        assert (
            f"redis: port {port} is served by pid {orphan.pid}, which runs from {gone}, deleted since"
            in result.stdout + result.stderr
        ), result.stdout + result.stderr
        assert _answers(port)  # refused, not stopped: it is not this stack's to stop
    finally:
        orphan.kill()
        orphan.wait(timeout=30)
