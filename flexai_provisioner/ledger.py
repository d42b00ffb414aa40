"""A local record of every instance this user asked for, so none outlives its owner.

A row is written *before* the provision request is sent (keyed by the request's
idempotency key), gets the instance id once the platform answers, and is closed only when
the platform confirms the deletion. If the owning process dies first (a ``kill -9`` of the
server or of ``jupyter execute``), ``jupyter flexai gc`` (and every new provisioner) finds
the row and deletes the instance.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    request_key   TEXT PRIMARY KEY,
    instance_id   TEXT,
    api_url       TEXT NOT NULL,
    kernel_id     TEXT,
    gpu_type      TEXT,
    owner_host    TEXT NOT NULL,
    owner_pid     INTEGER NOT NULL,
    owner_started REAL NOT NULL,
    created_at    REAL NOT NULL,
    deleted_at    REAL
)
"""


def process_start_time(pid: int) -> float | None:
    """When ``pid`` started (clock ticks since boot), so a reused pid is not taken for its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return float(stat.rsplit(")", 1)[1].split()[19])


def owner_identity() -> tuple[str, int, float]:
    """This process as an owner: host, pid, start time."""
    pid = os.getpid()
    return socket.gethostname(), pid, process_start_time(pid) or 0.0


def owner_alive(host: str, pid: int, started: float) -> bool:
    """Whether the owner still runs. Owners on other hosts are presumed alive."""
    if host != socket.gethostname():
        return True
    return process_start_time(pid) == started


@dataclass(frozen=True)
class Entry:
    request_key: str
    instance_id: str | None
    api_url: str
    kernel_id: str | None
    gpu_type: str | None
    owner_host: str
    owner_pid: int
    owner_started: float
    created_at: float


def default_path() -> Path:
    return Path(jupyter_data_dir()) / "flexai" / "ledger.sqlite3"


class Ledger:
    """The SQLite ledger; each call opens its own connection, so any thread may use it."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._db() as db:
            db.execute(SCHEMA)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    def record_request(self, request_key: str, api_url: str, kernel_id: str, gpu_type: str) -> None:
        host, pid, started = owner_identity()
        with self._db() as db:
            db.execute(
                "INSERT INTO instances (request_key, api_url, kernel_id, gpu_type, owner_host,"
                " owner_pid, owner_started, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (request_key, api_url, kernel_id, gpu_type, host, pid, started, time.time()),
            )

    def record_instance(self, request_key: str, instance_id: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE instances SET instance_id = ? WHERE request_key = ?",
                (instance_id, request_key),
            )

    def adopt(self, request_key: str) -> None:
        """Make this process the owner (a server that reattached to a persisted kernel)."""
        host, pid, started = owner_identity()
        with self._db() as db:
            db.execute(
                "UPDATE instances SET owner_host = ?, owner_pid = ?, owner_started = ?"
                " WHERE request_key = ?",
                (host, pid, started, request_key),
            )

    def mark_deleted(self, request_key: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE instances SET deleted_at = ? WHERE request_key = ?",
                (time.time(), request_key),
            )

    def live(self, api_url: str | None = None) -> list[Entry]:
        """Rows whose instance has not been confirmed deleted."""
        query = (
            "SELECT request_key, instance_id, api_url, kernel_id, gpu_type, owner_host,"
            " owner_pid, owner_started, created_at FROM instances WHERE deleted_at IS NULL"
        )
        args: tuple[str, ...] = ()
        if api_url is not None:
            query += " AND api_url = ?"
            args = (api_url,)
        with self._db() as db:
            return [Entry(*row) for row in db.execute(query, args)]

    def orphans(self, api_url: str | None = None) -> list[Entry]:
        """Live rows whose owning process is gone."""
        return [
            e
            for e in self.live(api_url)
            if not owner_alive(e.owner_host, e.owner_pid, e.owner_started)
        ]
