"""The instance side of a workspace: its copy of the folder listed by one command, files
copied there in one SFTP pipeline and back one at a time, on the kernel's own SSH connection.

Nothing is ever half-written: a copy goes to a temporary file renamed over its target once
complete, on the instance as here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import stat
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from .. import sftp as sftp_batch
from ..errors import SSHError, WorkspaceError
from ..ssh import SFTPClient, SSHConnection, errors_mapped
from .folder import PART_SUFFIX, Rules, Stamp, local_stamp, stamp_of

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

# The umask, for the mode of files created by a sync (read once: setting it is process-wide).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def survey(
    conn: SSHConnection, python: str, local_dir: Path, timeout: float
) -> tuple[str, dict[str, Stamp], set[str]]:
    """Create the instance's copy of ``local_dir`` if need be; its path, the regular files in
    it (not skipped by the folder's rules) and its folders. One command on the instance
    instead of an SFTP listing per folder (three round trips each)."""
    name = local_dir.name or "workspace"
    command = (
        f"{shlex.quote(python)} -I -S -c {shlex.quote(_SURVEY)} {REMOTE_ROOT} {shlex.quote(name)}"
    )
    try:
        status, out = conn.run(command, timeout=timeout)
    except SSHError as e:
        reason = e or type(e).__name__
        raise WorkspaceError(f"cannot list the kernel's folder on the instance: {reason}") from e
    text = out.decode(errors="replace").strip()
    try:
        if status != 0:
            raise ValueError(text[-500:])
        found = json.loads(text.rsplit("\n", 1)[-1])  # after any warning on stderr
        remote_dir = found["dir"]
        rules = Rules(local_dir)
        remote = {
            rel: Stamp(size, mtime)
            for rel, size, mtime in found["files"]
            if not rules.skips_file(rel)
        }
        return remote_dir, remote, {"", *found["dirs"]}
    except (ValueError, KeyError, TypeError) as e:
        raise WorkspaceError(
            f"cannot list the kernel's folder on the instance (status {status}): {e}"
        ) from None


@contextlib.contextmanager
def sftp_session(conn: SSHConnection, timeout: float, what: str) -> Iterator[SFTPClient]:
    """An SFTP session for the block; its failures as one WorkspaceError saying ``what``
    failed."""
    sftp = conn.open_sftp(timeout)
    try:
        with errors_mapped(what, timeout):
            yield sftp
    except SSHError as e:
        raise WorkspaceError(str(e)) from e
    finally:
        sftp.close()


def send(
    sftp: SFTPClient,
    local_dir: Path,
    remote_dir: str,
    dirs: set[str],
    todo: list[str],
    cancel: threading.Event | None = None,
) -> dict[str, dict[str, Stamp]]:
    """Copy the files ``todo`` of ``local_dir`` into ``remote_dir`` (whose folders ``dirs``
    are); return the stamps, both sides', of those the instance confirmed. Once ``cancel`` is
    set, no further file is started."""
    batch, copied = sftp_batch.batch(sftp), {}
    opened: deque[tuple[str, int]] = deque()  # files asked open, not yet written
    for rel in todo:
        if cancel is not None and cancel.is_set():
            break
        opened.append((rel, _create(sftp, batch, remote_dir, rel, dirs)))
        if len(opened) > OPEN_AHEAD:
            copied.update(_put(batch, local_dir, remote_dir, *opened.popleft()))
    while opened and not (cancel is not None and cancel.is_set()):
        copied.update(_put(batch, local_dir, remote_dir, *opened.popleft()))
    batch.finish()
    return copied


def _create(
    sftp: SFTPClient, batch: sftp_batch.Batch, remote_dir: str, rel: str, dirs: set[str]
) -> int:
    """Ask the instance to create ``rel``'s temporary copy (and its folders)."""
    parent = rel.rpartition("/")[0]
    if parent not in dirs:
        path = ""
        for part in parent.split("/"):
            path = f"{path}/{part}" if path else part
            if path not in dirs:
                with contextlib.suppress(OSError):  # made meanwhile, by the kernel
                    sftp.mkdir(f"{remote_dir}/{path}", 0o755)
                dirs.add(path)
    return batch.create(_part(remote_dir, rel))


def _put(
    batch: sftp_batch.Batch, local_dir: Path, remote_dir: str, rel: str, ticket: int
) -> dict[str, dict[str, Stamp]]:
    """Write one file's copy, then rename it into place (confirmed by ``batch.finish()``)."""
    handle = batch.handle(ticket)
    with open(local_dir / rel, "rb") as src:
        st = os.fstat(src.fileno())
        offset = 0
        while chunk := src.read(CHUNK):
            batch.write(handle, offset, chunk)
            offset += len(chunk)
    batch.close(handle)
    mtime = int(st.st_mtime)
    part = _part(remote_dir, rel)
    batch.set_attributes(part, mtime, stat.S_IMODE(st.st_mode) if st.st_mode & 0o111 else None)
    batch.rename(part, f"{remote_dir}/{rel}")
    return {rel: {"local": local_stamp(st), "remote": Stamp(offset, mtime)}}


def _part(remote_dir: str, rel: str) -> str:
    parent, sep, name = rel.rpartition("/")
    return f"{remote_dir}/{parent}{sep}.{name}{PART_SUFFIX}"


def fetch(
    sftp: SFTPClient,
    source: str,
    target: Path,
    there: Stamp,
    replaceable: Stamp | None,
    beside: Path,
) -> Path:
    """Copy the instance's file ``source`` (stamped ``there``) to ``target``; return where it
    was saved.

    Over ``target`` only if it is missing or still ``replaceable`` (as it was when last in
    step with the instance), checked again just before the rename; otherwise to ``beside``.
    """
    here = stamp_of(target)
    dest = target if here is None or here == replaceable else beside
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=PART_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as out, sftp.open(source, "rb") as src:
            src.prefetch(there.size)
            while chunk := src.read(CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
            mode = os.stat(dest).st_mode if dest.exists() else 0o666 & ~_UMASK
            os.fchmod(out.fileno(), stat.S_IMODE(mode))
        os.utime(tmp, (there.mtime, there.mtime))
        if dest == target and stamp_of(target) != here:
            dest = beside  # saved here while we copied
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
