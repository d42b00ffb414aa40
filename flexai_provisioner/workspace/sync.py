"""One kernel's workspace: which files go which way, and when the manifest says so."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WorkspaceError
from ..gpu_platform import SSHEndpoint
from ..ssh import SFTPClient, SSHConnection, connect, load_private_key
from .folder import Stamp, files, local_stamp, megabytes, same_file, saved_version, scan, stamp_of
from .manifest import Files, Manifest
from .transfer import fetch, send, sftp_session, survey

log = logging.getLogger(__name__)


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
        self.manifest = Manifest(state_file)
        self.max_mb = max_mb
        self.remote_dir: str | None = None
        self.label = ""  # the instance id, in the names of saved conflicting versions
        self.reach: dict[str, Any] = {}  # how another process reaches the instance
        if not self.local_dir.is_dir():
            raise WorkspaceError(f"the kernel's folder {self.local_dir} is not a directory")

    @classmethod
    def resume(
        cls, state_file: Path, log: logging.Logger | logging.LoggerAdapter[Any] = log
    ) -> Workspace:
        """The workspace a manifest file describes (``jupyter flexai sync``, a reattach)."""
        try:
            state = Manifest(state_file).read()
            ws = cls(Path(state["local_dir"]), state_file, log=log)
            ws.remote_dir, ws.label, ws.reach = state["remote_dir"], state["label"], state["reach"]
            ws.remote_python = state["remote_python"]
            ws.manifest.owner = False
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WorkspaceError(f"cannot read the workspace manifest {state_file}: {e}") from None
        return ws

    def scan(self) -> dict[str, os.stat_result]:
        """The files to mirror by relative path; raise if they exceed ``max_mb``."""
        return scan(self.local_dir, self.max_mb, self.label)

    def forget(self) -> None:
        """Remove the manifest (the kernel and its instance are gone)."""
        self.manifest.forget()

    def _about(self) -> dict[str, Any]:
        """What the manifest keeps besides the files: how to reach the instance's copy."""
        return {
            "local_dir": str(self.local_dir),
            "remote_dir": self.remote_dir,
            "label": self.label,
            "reach": self.reach,
            "remote_python": self.remote_python,
        }

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
        remote_dir, remote, dirs = survey(conn, self.remote_python, self.local_dir, timeout)
        self.remote_dir = remote_dir
        with self.manifest.held(self._about()) as stamps:
            todo = []
            for rel, st in local.items():
                here, there = local_stamp(st), remote.get(rel)
                if same_file(here, there):
                    stamps[rel] = {"local": here, "remote": there}
                    continue
                known = stamps.get(rel)
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
            what = f"copying the kernel's files to instance {self.label} failed"
            with sftp_session(conn, timeout, what) as sftp:
                copied = send(sftp, self.local_dir, remote_dir, dirs, todo, cancel)
            stamps.update(copied)  # only once the instance confirmed every step
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
        self.remote_dir, remote, _ = survey(conn, self.remote_python, self.local_dir, timeout)
        with self.manifest.held(self._about()) as stamps:
            todo = []
            for rel, there in sorted(remote.items()):
                known = stamps.get(rel, {})
                if there == known.get("remote"):
                    continue  # unchanged on the instance since it was last in step
                here = stamp_of(self.local_dir / rel)
                if same_file(here, there):
                    stamps[rel] = {"local": here, "remote": there}
                else:
                    todo.append((rel, there, known.get("local")))
            if todo:
                what = f"copying the kernel's files from instance {self.label} failed"
                with sftp_session(conn, timeout, what) as sftp:
                    for rel, there, base in todo:
                        try:
                            self._bring_back(sftp, rel, there, base, stamps, report)
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
        sftp: SFTPClient,
        rel: str,
        there: Stamp,
        base: Stamp | None,
        stamps: Files,
        report: SyncReport,
    ) -> None:
        """Copy one changed file back, beside the local one if that changed too."""
        target = self.local_dir / rel
        here = stamp_of(target)
        saved_as = fetch(
            sftp,
            f"{self.remote_dir}/{rel}",
            target,
            there,
            here if here == base else None,
            saved_version(target, self.label),
        )
        if saved_as == target:
            report.copied.append(rel)
            stamps[rel] = {"local": stamp_of(target), "remote": there}
        else:
            report.conflicts.append((rel, saved_as.relative_to(self.local_dir).as_posix()))
            stamps[rel] = {"local": base, "remote": there}
            self.log.warning(
                "%s was changed here while the kernel ran, so it is kept; the version "
                "from instance %s is saved as %s",
                target,
                self.label,
                saved_as,
            )
        report.nbytes += there.size


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
