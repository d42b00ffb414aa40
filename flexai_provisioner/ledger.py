"""A local record of every instance this user asked for, so none outlives its owner.

A row is written *before* the provision request is sent (keyed by the request's
idempotency key), gets the instance id once the platform answers, and is closed only when
the platform confirms the deletion. If the owning process dies first (a ``kill -9`` of the
server or of ``jupyter execute``), ``jupyter flexai gc`` (and every new provisioner) finds
the row and deletes the instance. A deletion that failed (an API outage) leaves the row
marked *owed*; owed deletions are retried whoever the owner is.

Each ledger has an owner id, random and kept beside it (``owner-id``), which every
instance it creates carries as a label: what carries another id belongs to someone else
(another machine, container or user sharing the API key) and is never reaped from here.
Whether an owner died is decided only from what this machine can see: a row's owner
died if it ran on this host, in this boot and this PID namespace, and no process with its
pid and start time is left. Anything else (a container with the same hostname, a cloned
VM, a /proc we cannot read) counts as alive.

A live row is in one of three states, changed only by the methods named here: *owned* by its
process; *being parked* (:meth:`begin_parking`, ``parking_since`` set: still owned, so exit
cleanup and the reaper treat it as owned, and an orphan once its owner died; its kind written
for the next kernel to wait on); *parked* (:meth:`park`, ``parked_until`` set: owned by no
process). Owned becomes being parked, parked (an adoption given back), or is deleted; being
parked becomes parked, or owned again (:meth:`end_parking`, :meth:`mark_owed`) and is deleted;
parked becomes owned again by one claimant (:meth:`claim`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir

from .errors import LedgerError

log = logging.getLogger(__name__)

#: Seconds a call waits for another process's lock on the ledger before giving up.
LOCK_TIMEOUT = 5.0

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
#: Columns added since the first schema, added to older ledgers when they are opened.
ADDED_COLUMNS = {
    "owner_boot": "TEXT",
    "owner_pidns": "TEXT",
    "key_file": "TEXT",
    "delete_owed": "TEXT",  # why the last deletion failed; set while one is owed
    "gpu_count": "INTEGER",
    "parked_until": "REAL",  # while parked (keep_alive): when the platform deletes it
    "key_fingerprint": "TEXT",  # of the key authorised on the instance, while parked
    "labels": "TEXT",  # the extra platform labels (JSON) it was made with, while parked
    "parking_since": "REAL",  # while being parked: when its owner began to park it
}
COLUMNS = (
    "request_key, instance_id, api_url, kernel_id, gpu_type, owner_host, owner_boot,"
    " owner_pidns, owner_pid, owner_started, created_at, key_file, delete_owed, gpu_count,"
    " parked_until, key_fingerprint, labels, parking_since"
)
_OWNER_IS_THIS_PROCESS = (
    "owner_host = ?, owner_boot = ?, owner_pidns = ?, owner_pid = ?, owner_started = ?"
)


def process_start_time(pid: int) -> float | None:
    """When ``pid`` started (clock ticks since boot), so a reused pid is not taken for its owner.

    None if no such process exists; :class:`PermissionError` if /proc hides it.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return float(stat.rsplit(")", 1)[1].split()[19])


@functools.cache
def _machine() -> tuple[str, str, str]:
    """This host's name, boot id and PID namespace ("" where they cannot be read)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return socket.gethostname(), boot, pidns


@dataclass(frozen=True)
class Owner:
    """A process that owns instances: where it runs and which process it is."""

    host: str
    boot: str
    pidns: str
    pid: int
    started: float

    @classmethod
    def this_process(cls) -> Owner:
        pid = os.getpid()
        host, boot, pidns = _machine()
        return cls(host, boot, pidns, pid, process_start_time(pid) or 0.0)

    def visible(self) -> bool:
        """Whether this machine can see the owner's process table: same host, boot and PID
        namespace (both known)."""
        host, boot, pidns = _machine()
        return bool(boot and pidns) and (self.host, self.boot, self.pidns) == (host, boot, pidns)

    def died(self) -> bool:
        """True only if this machine can see that the owner is gone (see the module doc)."""
        if not self.visible():
            return False  # another machine, boot or PID namespace: we cannot know
        try:
            return process_start_time(self.pid) != self.started
        except OSError:
            return False  # hidden from us (hidepid): presume alive


@dataclass(frozen=True)
class Entry:
    request_key: str
    instance_id: str | None
    api_url: str
    kernel_id: str | None
    gpu_type: str | None
    owner: Owner
    created_at: float
    key_file: str | None
    delete_owed: str | None  # why the last deletion failed, while one is owed
    gpu_count: int | None = None
    parked_until: float | None = None  # set while parked: no process owns it then
    key_fingerprint: str | None = None
    labels: str | None = None  # JSON, sorted keys
    parking_since: float | None = None  # set while its owner parks it

    def expired(self, now: float | None = None) -> bool:
        """Whether it was parked and its keep-alive is over (the platform deletes it)."""
        return self.parked_until is not None and self.parked_until <= (now or time.time())


def default_path() -> Path:
    return Path(jupyter_data_dir()) / "flexai" / "ledger.sqlite3"


class Ledger:
    """The SQLite ledger; each call opens its own connection, so any thread may use it.

    Every failure is a :class:`LedgerError` naming the file. A file that is not a database
    is moved aside (``<name>.corrupt-<time>``) and a fresh ledger started, so a damaged
    ledger never blocks a start; a lock held by another process is waited for at most
    :data:`LOCK_TIMEOUT` seconds.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise LedgerError(f"cannot create the FlexAI ledger's directory: {e}") from None
        self.owner_id = self._owner_id()
        try:
            try:
                self._create()
            except sqlite3.DatabaseError as e:
                if not _corrupt(e):
                    raise
                self._move_aside()
                self._create()
        except sqlite3.Error as e:
            raise self._error(e) from None

    def _owner_id(self) -> str:
        """This ledger's random owner id, created with the ledger and kept beside it (so a
        ledger moved aside as corrupt keeps its id and its instances stay recognisable)."""
        path = self.path.with_name("owner-id")
        with contextlib.suppress(FileNotFoundError):
            if owner_id := path.read_text().strip():
                return owner_id
            raise LedgerError(f"the FlexAI ledger's owner id {path} is empty: delete it")
        new = path.with_name(f".owner-id.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            new.write_text(secrets.token_hex(16) + "\n")
            os.chmod(new, 0o600)
            with contextlib.suppress(FileExistsError):  # a concurrent first open won
                os.link(new, path)
            return path.read_text().strip()
        except OSError as e:
            raise LedgerError(f"cannot write the FlexAI ledger's owner id {path}: {e}") from None
        finally:
            new.unlink(missing_ok=True)

    def _create(self) -> None:
        with self._db() as db:
            db.execute(SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(instances)")}
            for name, kind in ADDED_COLUMNS.items():
                if name not in have:
                    db.execute(f"ALTER TABLE instances ADD COLUMN {name} {kind}")

    def _move_aside(self) -> None:
        try:
            with self._db() as db:  # another process may have replaced it meanwhile
                db.execute("PRAGMA schema_version")
            return
        except sqlite3.DatabaseError as e:
            if not _corrupt(e):
                raise
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            os.replace(self.path, aside)
        except OSError as e:
            raise LedgerError(
                f"the FlexAI ledger {self.path} is corrupt and cannot be moved aside "
                f"({e.strerror}): move or delete it"
            ) from None
        for suffix in ("-journal", "-wal", "-shm"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
        log.warning(
            "the FlexAI ledger %s was not a readable database: moved it to %s and started a "
            "new one (instances recorded only there are still found by their owner labels)",
            self.path,
            aside,
        )

    def _error(self, e: sqlite3.Error) -> LedgerError:
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            return LedgerError(
                f"the FlexAI ledger {self.path} stayed locked by another process for "
                f"{LOCK_TIMEOUT:g} s; retry, or find the process holding it (`fuser {self.path}`)"
            )
        return LedgerError(f"the FlexAI ledger {self.path} failed: {e}")

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection in a transaction; sqlite3 errors are the caller's to map."""
        db = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT)
        try:
            with db:
                yield db
        finally:
            db.close()
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    def _write(self, query: str, args: tuple[object, ...]) -> None:
        try:
            with self._db() as db:
                db.execute(query, args)
        except sqlite3.Error as e:
            raise self._error(e) from None

    def record_request(self, request_key: str, api_url: str, kernel_id: str, gpu_type: str) -> None:
        o = Owner.this_process()
        self._write(
            "INSERT INTO instances (request_key, api_url, kernel_id, gpu_type, owner_host,"
            " owner_boot, owner_pidns, owner_pid, owner_started, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (request_key, api_url, kernel_id, gpu_type, o.host, o.boot, o.pidns, o.pid,
             o.started, time.time()),
        )  # fmt: skip

    def record_instance(self, request_key: str, instance_id: str) -> None:
        self._write(
            "UPDATE instances SET instance_id = ? WHERE request_key = ?", (instance_id, request_key)
        )

    def record_key_file(self, request_key: str, key_file: str) -> None:
        """The per-kernel private key's file, removed by ``gc`` if its owner dies."""
        self._write(
            "UPDATE instances SET key_file = ? WHERE request_key = ?", (key_file, request_key)
        )

    def adopt(self, request_key: str) -> None:
        """Make this process the owner (a server that reattached to a persisted kernel)."""
        self._write(
            f"UPDATE instances SET {_OWNER_IS_THIS_PROCESS} WHERE request_key = ?",
            (*_this_process(), request_key),
        )

    def begin_parking(
        self, request_key: str, gpu_count: int, key_fingerprint: str, labels: str
    ) -> None:
        """Record that the owner is parking the request's instance (before it stops the
        kernel), with the kind :meth:`park` will record, so that a kernel of that kind starting
        meanwhile waits for it rather than provisioning another. The row stays this process's
        until :meth:`park` or :meth:`end_parking`."""
        self._write(
            "UPDATE instances SET parking_since = ?, gpu_count = ?, key_fingerprint = ?,"
            " labels = ? WHERE request_key = ? AND parked_until IS NULL AND deleted_at IS NULL",
            (time.time(), gpu_count, key_fingerprint, labels, request_key),
        )

    def end_parking(self, request_key: str) -> None:
        """The parking failed: the row is its owner's alone again (who deletes the instance)."""
        self._write(
            "UPDATE instances SET parking_since = NULL WHERE request_key = ?", (request_key,)
        )

    def park(
        self,
        request_key: str,
        until: float,
        gpu_count: int,
        key_file: str | None,
        key_fingerprint: str,
        labels: str,
    ) -> None:
        """Record the request's instance as parked until ``until`` (epoch seconds): owned by
        no process, it waits for the next kernel of its kind here (:meth:`claim_parked`), and
        is an orphan once expired. ``key_file`` is the private key kept for that kernel (None:
        the user's own key, which is never copied), removed with the instance."""
        self._write(
            "UPDATE instances SET parked_until = ?, parking_since = NULL, gpu_count = ?,"
            " key_file = ?, key_fingerprint = ?, labels = ? WHERE request_key = ?",
            (until, gpu_count, key_file, key_fingerprint, labels, request_key),
        )

    def parked(self, api_url: str | None = None) -> list[Entry]:
        """The rows of parked instances, the freshest first."""
        rows = [e for e in self.live(api_url) if e.parked_until is not None]
        return sorted(rows, key=lambda e: -(e.parked_until or 0))

    def claim(self, request_key: str, kernel_id: str | None = None, lasting: float = 0.0) -> bool:
        """Take a parked row for this process (to adopt or delete its instance): False if it
        is not parked any more, or (``lasting``, epoch seconds) its keep-alive ends sooner. One
        conditional update, which SQLite's write lock makes atomic: of processes claiming the
        same row at once, exactly one gets it. The expiry is checked in the same update, as
        the lock may have been waited for since the row was read."""
        query = (
            f"UPDATE instances SET parked_until = NULL, {_OWNER_IS_THIS_PROCESS},"
            " kernel_id = COALESCE(?, kernel_id) WHERE request_key = ?"
            " AND parked_until >= ? AND deleted_at IS NULL"
        )
        try:
            with self._db() as db:
                cursor = db.execute(query, (*_this_process(), kernel_id, request_key, lasting))
                return cursor.rowcount == 1
        except sqlite3.Error as e:
            raise self._error(e) from None

    def mark_owed(self, request_key: str, reason: str) -> None:
        """Record that deleting this request's instance failed, so anyone may retry it (a
        parking under way ends: the instance is being deleted)."""
        self._write(
            "UPDATE instances SET delete_owed = ?, parking_since = NULL WHERE request_key = ?",
            (reason, request_key),
        )

    def mark_deleted(self, request_key: str) -> None:
        self._write(
            "UPDATE instances SET deleted_at = ? WHERE request_key = ?", (time.time(), request_key)
        )

    def live(self, api_url: str | None = None) -> list[Entry]:
        """Rows whose instance has not been confirmed deleted."""
        query = f"SELECT {COLUMNS} FROM instances WHERE deleted_at IS NULL"
        args: tuple[str, ...] = ()
        if api_url is not None:
            query += " AND api_url = ?"
            args = (api_url,)
        try:
            with self._db() as db:
                rows = list(db.execute(query, args))
        except sqlite3.Error as e:
            raise self._error(e) from None
        return [_entry(row) for row in rows]


def _this_process() -> tuple[object, ...]:
    o = Owner.this_process()
    return (o.host, o.boot, o.pidns, o.pid, o.started)


def _entry(row: tuple[object, ...]) -> Entry:
    (request_key, instance_id, api_url, kernel_id, gpu_type, host, boot, pidns, pid, started,
     created_at, key_file, owed, gpu_count, parked_until, key_fp, labels,
     parking) = row  # fmt: skip
    owner = Owner(str(host), str(boot or ""), str(pidns or ""), int(pid), float(started))
    return Entry(
        str(request_key),
        instance_id and str(instance_id),
        str(api_url),
        kernel_id and str(kernel_id),
        gpu_type and str(gpu_type),
        owner,
        float(created_at),
        key_file and str(key_file),
        owed and str(owed),
        None if gpu_count is None else int(gpu_count),  # type: ignore[call-overload]
        None if parked_until is None else float(parked_until),  # type: ignore[arg-type]
        key_fp and str(key_fp),
        labels and str(labels),
        None if parking is None else float(parking),  # type: ignore[arg-type]
    )


def _corrupt(e: sqlite3.DatabaseError) -> bool:
    """Whether the file is not (or no longer) an SQLite database, as opposed to busy or full."""
    return not isinstance(e, sqlite3.OperationalError)
