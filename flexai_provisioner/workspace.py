"""The notebook's folder, mirrored in a directory on the instance that is the kernel's cwd.

Before the kernel starts, the folder's files are copied to the instance over SFTP on the
kernel's own SSH connection. Files the kernel creates or changes come back beside the
notebook when it shuts down, and on demand (``jupyter flexai sync``, the server's
``POST /api/compute/sync/{kernel_id}``). Deletions are not propagated either way.

A manifest remembers, per file, the local file's (size, mtime) and the instance copy's when
they were last known equal. That makes a restart's upload incremental, and is how a sync
tells "the kernel changed this" from "someone changed it here": a local file changed since
is never overwritten, the instance's version is saved beside it as
``name.flexai-<instance>.ext``. A file whose size and mtime match on both sides (copies
set the mtime) counts as the same file, so an interrupted copy is simply resumed.

The manifest lives in a 0600 file in Jupyter's runtime directory with what is needed to
reach the instance, and is read and written under a lock, so that ``jupyter flexai sync``
in another process and the kernel's own shutdown agree on it.

Everything here blocks; it runs in worker threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
import pathspec
from jupyter_core.paths import jupyter_runtime_dir

from .errors import SSHError, WorkspaceError, WorkspaceTooLargeError
from .gpu_platform import SSHEndpoint
from .ssh import SFTPBatch, SSHConnection, connect, errors_mapped, load_private_key

IGNORE_FILE = ".flexaiignore"
# Never worth copying: hidden folders (.git, .venv, .cache), Jupyter's and Python's caches.
ALWAYS_SKIPPED = (".*/", ".ipynb_checkpoints/", "__pycache__/")
PART_SUFFIX = ".flexai-part"  # a copy in progress, renamed over its target when complete
REMOTE_ROOT = "flexai-workspace"  # under the instance's $HOME

# Run by the instance's Python (as the kernel agent is) with REMOTE_ROOT and the folder's
# name: makes $HOME/REMOTE_ROOT/name if need be and prints it and what it holds, as JSON.
# $HOME, not SFTP's start directory: a session's HOME is the instance's own even where its
# login directory is shared (the emulator's). Hidden folders and caches are not listed.
_SURVEY = """
import json, os, stat, sys
top = os.path.join(os.path.expanduser("~"), sys.argv[1], sys.argv[2])
os.makedirs(top, 0o700, exist_ok=True)
top = os.path.realpath(top)
files, dirs = [], []
for here, subdirs, names in os.walk(top):
    prefix = os.path.relpath(here, top) + "/" if here != top else ""
    subdirs[:] = [d for d in subdirs if not d.startswith(".") and d != "__pycache__"]
    dirs += [prefix + d for d in subdirs]
    for name in names:
        try:
            st = os.lstat(os.path.join(here, name))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            files.append([prefix + name, st.st_size, int(st.st_mtime)])
print(json.dumps({"dir": top, "files": files, "dirs": dirs}))
"""
CHUNK = 1024 * 1024
OPEN_AHEAD = 16  # files asked open before the first of them is written: no wait per file
MB = 1024 * 1024

# The umask, for the mode of files created by a sync (read once: setting it is process-wide).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

log = logging.getLogger(__name__)


def state_path(kernel_id: str) -> Path:
    """Where the workspace of kernel ``kernel_id`` keeps its manifest."""
    return Path(jupyter_runtime_dir()) / f"flexai-{kernel_id}.workspace.json"


def running_workspaces() -> list[Path]:
    """The manifest files of this user's kernels that have a workspace."""
    return sorted(Path(jupyter_runtime_dir()).glob("flexai-*.workspace.json"))


def megabytes(nbytes: int) -> str:
    return f"{nbytes / MB:.1f} MB"


def files(count: int) -> str:
    return f"{count} file{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class Stamp:
    """A file's size and modification time (nanoseconds here; whole seconds on the
    instance, all SFTP carries)."""

    size: int
    mtime: int


def _local_stamp(st: os.stat_result) -> Stamp:
    return Stamp(st.st_size, st.st_mtime_ns)


def _same_file(local: Stamp | None, remote: Stamp | None) -> bool:
    """Whether a local and a remote file have the same size and mtime (to the second)."""
    return (
        local is not None
        and remote is not None
        and local.size == remote.size
        and local.mtime // 1_000_000_000 == remote.mtime
    )


@dataclass
class SyncReport:
    """What a sync brought back: paths relative to the notebook's folder, ``directory``."""

    directory: Path
    copied: list[str] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    """(file kept here, name the instance's version was saved under)"""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(file, why it could not be written here): the others are copied all the same"""
    nbytes: int = 0


class Rules:
    """What is not mirrored: the fixed skips plus the folder's ``.flexaiignore`` (gitignore
    syntax, relative to the notebook's folder)."""

    def __init__(self, root: Path):
        lines = list(ALWAYS_SKIPPED)
        path = root / IGNORE_FILE
        try:
            lines += path.read_text().splitlines()
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as e:
            raise WorkspaceError(f"cannot read {path}: {e}") from None
        self._spec = pathspec.GitIgnoreSpec.from_lines(lines)

    def skips_dir(self, rel: str) -> bool:
        return self._spec.match_file(rel + "/")

    def skips_file(self, rel: str) -> bool:
        return rel.endswith(PART_SUFFIX) or self._spec.match_file(rel)


class Workspace:
    """One kernel's mirrored folder: ``local_dir`` here, ``remote_dir`` on the instance."""

    def __init__(
        self,
        local_dir: Path,
        state_file: Path,
        max_mb: float = 100.0,
        log: logging.Logger | logging.LoggerAdapter[Any] = log,
        remote_python: str = "python3",
    ):
        self.log = log
        self.remote_python = remote_python
        self.local_dir = local_dir.resolve()
        self.state_file = state_file
        self.max_mb = max_mb
        self.remote_dir: str | None = None
        self.label = ""  # the instance id, in the names of saved conflicting versions
        self.reach: dict[str, Any] = {}  # how another process reaches the instance
        self._owner = True  # the kernel's own process, not `jupyter flexai sync`
        if not self.local_dir.is_dir():
            raise WorkspaceError(f"the kernel's folder {self.local_dir} is not a directory")

    @classmethod
    def resume(
        cls, state_file: Path, log: logging.Logger | logging.LoggerAdapter[Any] = log
    ) -> Workspace:
        """The workspace a manifest file describes (``jupyter flexai sync``, a reattach)."""
        try:
            state = json.loads(state_file.read_text())
            ws = cls(Path(state["local_dir"]), state_file, log=log)
            ws.remote_dir, ws.label, ws.reach = state["remote_dir"], state["label"], state["reach"]
            ws.remote_python = state["remote_python"]
            ws._owner = False
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WorkspaceError(f"cannot read the workspace manifest {state_file}: {e}") from None
        return ws

    # -- local side ----------------------------------------------------------------------

    def scan(self) -> dict[str, os.stat_result]:
        """The files to mirror by relative path; raise if they exceed ``max_mb``."""
        rules = Rules(self.local_dir)
        found: dict[str, os.stat_result] = {}
        for dirpath, dirnames, filenames in os.walk(self.local_dir):  # no directory symlinks
            base = Path(dirpath).relative_to(self.local_dir).as_posix()
            prefix = "" if base == "." else base + "/"
            dirnames[:] = sorted(d for d in dirnames if not rules.skips_dir(prefix + d))
            for name in sorted(filenames):
                rel = prefix + name
                if rules.skips_file(rel) or (self.label and f".flexai-{self.label}" in name):
                    continue  # ignored, or a conflicting version this workspace saved
                with contextlib.suppress(OSError):  # vanished, or a dangling symlink
                    st = os.stat(os.path.join(dirpath, name))
                    if stat.S_ISREG(st.st_mode):
                        found[rel] = st
        self._check_size(found)
        return found

    def _check_size(self, files: dict[str, os.stat_result]) -> None:
        total = sum(st.st_size for st in files.values())
        if total <= self.max_mb * MB:
            return
        by_entry: dict[str, int] = {}
        for rel, st in files.items():
            top, sep, _ = rel.partition("/")
            by_entry[top + sep] = by_entry.get(top + sep, 0) + st.st_size
        biggest = sorted(by_entry.items(), key=lambda item: -item[1])[:3]
        raise WorkspaceTooLargeError(
            f"the kernel's folder {self.local_dir} holds {megabytes(total)} to copy to the "
            f"instance, over workspace_max_mb = {self.max_mb:g} (largest: "
            + ", ".join(f"{name} {megabytes(size)}" for name, size in biggest)
            + f"); name what the kernel does not need in {self.local_dir / IGNORE_FILE} "
            "(gitignore syntax), raise c.FlexAIProvisioner.workspace_max_mb, or set "
            "workspace = False"
        )

    # -- manifest ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _manifest(self) -> Iterator[dict[str, dict[str, Stamp | None]]]:
        """The manifest, exclusively, for the block; saved afterwards (even after an error,
        so that what was copied before it is known)."""
        with self._locked():
            if not self._owner and not self.state_file.exists():
                # Waited for the kernel's last sync; writing now would resurrect the file.
                raise WorkspaceError(
                    f"the kernel has shut down meanwhile; its files were copied back to "
                    f"{self.local_dir} then"
                )
            files = self._load_files()
            try:
                yield files
            finally:
                self._save(files)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.state_file.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _load_files(self) -> dict[str, dict[str, Stamp | None]]:
        try:
            saved = json.loads(self.state_file.read_text()).get("files", {})
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise WorkspaceError(
                f"cannot read the workspace manifest {self.state_file}: {e}"
            ) from None
        return {
            rel: {side: Stamp(*entry[side]) if entry.get(side) else None for side in entry}
            for rel, entry in saved.items()
        }

    def _save(self, files: dict[str, dict[str, Stamp | None]]) -> None:
        state = {
            "local_dir": str(self.local_dir),
            "remote_dir": self.remote_dir,
            "label": self.label,
            "reach": self.reach,
            "remote_python": self.remote_python,
            "files": {
                rel: {side: [s.size, s.mtime] if s else None for side, s in entry.items()}
                for rel, entry in files.items()
            },
        }
        fd, tmp = tempfile.mkstemp(dir=self.state_file.parent, suffix=PART_SUFFIX)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self.state_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def forget(self) -> None:
        """Remove the manifest (the kernel and its instance are gone)."""
        with self._locked():
            self.state_file.unlink(missing_ok=True)
            self.state_file.with_suffix(".lock").unlink(missing_ok=True)

    # -- instance side -------------------------------------------------------------------

    def upload(
        self,
        conn: SSHConnection,
        timeout: float,
        announce: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> int:
        """Copy what the instance lacks; return the bytes copied.

        A file the kernel changed on the instance since it was copied there is left alone
        (the next sync brings it back). ``announce`` gets "<MB> in <n> files" first; once
        ``cancel`` is set, no further file is started.
        """
        local = self.scan()
        remote, dirs = self._survey(conn, timeout)
        with self._manifest() as manifest:
            todo = []
            for rel, st in local.items():
                here, there = _local_stamp(st), remote.get(rel)
                if _same_file(here, there):
                    manifest[rel] = {"local": here, "remote": there}
                    continue
                known = manifest.get(rel)
                if known and there is not None and there != known.get("remote"):
                    continue  # the kernel's version: it comes back at the next sync
                todo.append(rel)
            nbytes = sum(local[rel].st_size for rel in todo)
            there_already = len(local) - len(todo)
            if announce is not None:
                announce(
                    f"{megabytes(nbytes)} in {files(len(todo))}"
                    + (f", {there_already} already there" if there_already else "")
                )
            if not todo:
                return 0
            started = time.monotonic()
            with self._session(conn, timeout, "to") as sftp:
                batch, copied = SFTPBatch(sftp), {}
                opened: deque[tuple[str, int]] = deque()  # files asked open, not yet written
                for rel in todo:
                    if cancel is not None and cancel.is_set():
                        break
                    opened.append((rel, self._create(sftp, batch, rel, dirs)))
                    if len(opened) > OPEN_AHEAD:
                        copied.update(self._put(batch, *opened.popleft()))
                while opened and not (cancel is not None and cancel.is_set()):
                    copied.update(self._put(batch, *opened.popleft()))
                batch.finish()
            manifest.update(copied)  # only once the instance confirmed every step
            if copied:
                seconds = time.monotonic() - started
                self.log.info(
                    "copied %s (%s) to instance %s:%s in %.1f s",
                    files(len(copied)),
                    megabytes(nbytes),
                    self.label,
                    self.remote_dir,
                    seconds,
                )
        return nbytes

    def download(self, conn: SSHConnection, timeout: float) -> SyncReport:
        """Bring back what the kernel created or changed, keeping every local change."""
        report = SyncReport(self.local_dir)
        remote, _ = self._survey(conn, timeout)
        with self._manifest() as manifest:
            todo = []
            for rel, there in sorted(remote.items()):
                known = manifest.get(rel, {})
                if there == known.get("remote"):
                    continue  # unchanged on the instance since it was last in step
                here = self._stamp_of(self.local_dir / rel)
                if _same_file(here, there):
                    manifest[rel] = {"local": here, "remote": there}
                else:
                    todo.append((rel, there, known.get("local")))
            if todo:
                with self._session(conn, timeout, "from") as sftp:
                    for rel, there, base in todo:
                        try:
                            self._bring_back(sftp, rel, there, base, manifest, report)
                        except OSError as e:
                            if sftp.get_channel().closed:
                                raise  # the link: nothing more will come
                            # One file in the way here (a file where its folder would go,
                            # permissions) must not cost the others.
                            report.failed.append((rel, str(e)))
                            self.log.warning(
                                "could not copy %s back from instance %s: %s",
                                rel,
                                self.label,
                                e,
                            )
        if report.copied:
            self.log.info(
                "copied %s (%s) back from instance %s to %s",
                files(len(report.copied)),
                megabytes(report.nbytes),
                self.label,
                self.local_dir,
            )
        return report

    def _bring_back(
        self,
        sftp: paramiko.SFTPClient,
        rel: str,
        there: Stamp,
        base: Stamp | None,
        manifest: dict[str, dict[str, Stamp | None]],
        report: SyncReport,
    ) -> None:
        """Copy one changed file back, beside the local one if that changed too."""
        target = self.local_dir / rel
        here = self._stamp_of(target)
        saved_as = self._fetch(sftp, rel, there, here if here == base else None)
        if saved_as == target:
            report.copied.append(rel)
            manifest[rel] = {"local": self._stamp_of(target), "remote": there}
        else:
            report.conflicts.append((rel, saved_as.relative_to(self.local_dir).as_posix()))
            manifest[rel] = {"local": base, "remote": there}
            self.log.warning(
                "%s was changed here while the kernel ran, so it is kept; the version "
                "from instance %s is saved as %s",
                target,
                self.label,
                saved_as,
            )
        report.nbytes += there.size

    @contextlib.contextmanager
    def _session(
        self, conn: SSHConnection, timeout: float, direction: str
    ) -> Iterator[paramiko.SFTPClient]:
        """An SFTP session for the block; its failures as one WorkspaceError."""
        where = f"instance {self.label}"
        sftp = conn.open_sftp(timeout)
        try:
            with errors_mapped(f"copying the kernel's files {direction} {where} failed", timeout):
                yield sftp
        except SSHError as e:
            raise WorkspaceError(str(e)) from e
        finally:
            sftp.close()

    def _survey(self, conn: SSHConnection, timeout: float) -> tuple[dict[str, Stamp], set[str]]:
        """Create the instance's copy of the folder if need be; the regular files in it (not
        skipped by the rules) and its folders. One command on the instance instead of an
        SFTP listing per folder (three round trips each)."""
        name = self.local_dir.name or "workspace"
        command = (
            f"{shlex.quote(self.remote_python)} -I -S -c {shlex.quote(_SURVEY)} "
            f"{REMOTE_ROOT} {shlex.quote(name)}"
        )
        try:
            status, out = conn.run(command, timeout=timeout)
        except SSHError as e:
            reason = e or type(e).__name__
            raise WorkspaceError(
                f"cannot list the kernel's folder on the instance: {reason}"
            ) from e
        text = out.decode(errors="replace").strip()
        try:
            if status != 0:
                raise ValueError(text[-500:])
            found = json.loads(text.rsplit("\n", 1)[-1])  # after any warning on stderr
            self.remote_dir = found["dir"]
            rules = Rules(self.local_dir)
            remote = {
                rel: Stamp(size, mtime)
                for rel, size, mtime in found["files"]
                if not rules.skips_file(rel)
            }
            return remote, {"", *found["dirs"]}
        except (ValueError, KeyError, TypeError) as e:
            raise WorkspaceError(
                f"cannot list the kernel's folder on the instance (status {status}): {e}"
            ) from None

    def _create(self, sftp: paramiko.SFTPClient, batch: SFTPBatch, rel: str, dirs: set[str]) -> int:
        """Ask the instance to create ``rel``'s temporary copy (and its folders)."""
        parent = rel.rpartition("/")[0]
        if parent not in dirs:
            path = ""
            for part in parent.split("/"):
                path = f"{path}/{part}" if path else part
                if path not in dirs:
                    with contextlib.suppress(OSError):  # made meanwhile, by the kernel
                        sftp.mkdir(f"{self.remote_dir}/{path}", 0o755)
                    dirs.add(path)
        return batch.create(self._part(rel))

    def _put(self, batch: SFTPBatch, rel: str, ticket: int) -> dict[str, dict[str, Stamp]]:
        """Write one file's copy, then rename it into place (confirmed by ``batch.finish()``)."""
        handle = batch.handle(ticket)
        with open(self.local_dir / rel, "rb") as src:
            st = os.fstat(src.fileno())
            offset = 0
            while chunk := src.read(CHUNK):
                batch.write(handle, offset, chunk)
                offset += len(chunk)
        batch.close(handle)
        mtime = int(st.st_mtime)
        part = self._part(rel)
        batch.set_attributes(part, mtime, stat.S_IMODE(st.st_mode) if st.st_mode & 0o111 else None)
        batch.rename(part, f"{self.remote_dir}/{rel}")
        return {rel: {"local": _local_stamp(st), "remote": Stamp(offset, mtime)}}

    def _part(self, rel: str) -> str:
        parent, sep, name = rel.rpartition("/")
        return f"{self.remote_dir}/{parent}{sep}.{name}{PART_SUFFIX}"

    def _fetch(
        self, sftp: paramiko.SFTPClient, rel: str, there: Stamp, replaceable: Stamp | None
    ) -> Path:
        """Copy one file back; return where it was saved.

        Over the local file only if it is missing or still ``replaceable`` (as it was when
        last in step with the instance), checked again just before the rename; otherwise
        beside it, under a name that says where it comes from. Written to a temporary file
        and renamed, so no file is ever half-written.
        """
        target = self.local_dir / rel
        here = self._stamp_of(target)
        dest = target if here is None or here == replaceable else self._conflict_name(target)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=PART_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as out, sftp.open(f"{self.remote_dir}/{rel}", "rb") as src:
                src.prefetch(there.size)
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
                mode = os.stat(dest).st_mode if dest.exists() else 0o666 & ~_UMASK
                os.fchmod(out.fileno(), stat.S_IMODE(mode))
            os.utime(tmp, (there.mtime, there.mtime))
            if dest == target and self._stamp_of(target) != here:
                dest = self._conflict_name(target)  # saved here while we copied
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def _conflict_name(self, target: Path) -> Path:
        return target.with_name(f"{target.stem}.flexai-{self.label}{target.suffix}")

    @staticmethod
    def _stamp_of(path: Path) -> Stamp | None:
        try:
            return _local_stamp(os.stat(path))
        except (FileNotFoundError, NotADirectoryError):  # missing, or a file where a folder was
            return None


def sync_elsewhere(state_file: Path, timeout: float = 30.0) -> tuple[Workspace, SyncReport]:
    """Sync a kernel's workspace from a process other than its owner's (``jupyter flexai
    sync``): log in to the instance with the kernel's key, as recorded in its manifest."""
    workspace = Workspace.resume(state_file)
    ssh, key_file = workspace.reach.get("ssh"), workspace.reach.get("key_file")
    if not ssh or not key_file:
        raise WorkspaceError(f"{state_file} does not say how to reach the kernel's instance")
    conn = connect(SSHEndpoint(**ssh), load_private_key(key_file), connect_timeout=timeout)
    try:
        return workspace, workspace.download(conn, timeout)
    finally:
        conn.close()
