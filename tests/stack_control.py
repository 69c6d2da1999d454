"""Breaking and mending the local stack's servers from tests: kill the broker, restart PostgreSQL.

Only for the stack that ``make up`` runs (its pid files live in .stack/); tests skip otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("DATALAYER_STATE_DIR", ROOT / ".stack"))


def managed() -> bool:
    """True when the servers are the local stack's, so a test may stop and start them."""
    return (STATE / "pids" / "kafka.pid").exists() and (STATE / "pids" / "postgresql.started").exists()


def kill_kafka() -> None:
    """SIGKILL the broker, as a crash would."""
    pid = int((STATE / "pids" / "kafka.pid").read_text())
    os.kill(pid, signal.SIGKILL)


def start_stack() -> None:
    """Start whatever is not running and wait until every server answers."""
    subprocess.run([str(ROOT / "stack" / "stack.sh"), "up"], check=True, capture_output=True, timeout=300)


def restart_postgres() -> None:
    """A fast restart: every client connection is cut, as in a failover."""
    pg_ctl = next(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    log = STATE / "logs" / "postgresql.log"
    command = [str(pg_ctl), "-D", str(STATE / "pg" / "data"), "-l", str(log), "-m", "fast", "-w", "restart"]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
