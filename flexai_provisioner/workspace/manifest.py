"""A workspace's manifest: per file, the local file's stamp and the instance copy's when they
were last known equal, with what is needed to reach the instance.

It lives in a 0600 file in Jupyter's runtime directory and is read and written under a lock,
so that ``jupyter flexai sync`` in another process and the kernel's own shutdown agree on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir

from ..errors import WorkspaceError
from .folder import PART_SUFFIX, Stamp

Files = dict[str, dict[str, Stamp | None]]
"""By relative path: the "local" and the "remote" stamp when last in step."""


def state_path(kernel_id: str) -> Path:
    """Where the workspace of kernel ``kernel_id`` keeps its manifest."""
    return Path(jupyter_runtime_dir()) / f"flexai-{kernel_id}.workspace.json"


def running_workspaces() -> list[Path]:
    """The manifest files of this user's kernels that have a workspace."""
    return sorted(Path(jupyter_runtime_dir()).glob("flexai-*.workspace.json"))


class Manifest:
    """The manifest file ``path``; ``owner`` is false in a process other than the kernel's
    own (``jupyter flexai sync``), which must not bring back a file the kernel removed."""

    def __init__(self, path: Path, owner: bool = True):
        self.path = path
        self.owner = owner

    def read(self) -> dict[str, Any]:
        """What the file says, as saved (raises as ``json`` and the file system do)."""
        return json.loads(self.path.read_text())

    @contextlib.contextmanager
    def held(self, about: dict[str, Any]) -> Iterator[Files]:
        """The files' stamps, exclusively, for the block; saved afterwards with ``about`` (even
        after an error, so that what was copied before it is known)."""
        with self._locked():
            if not self.owner and not self.path.exists():
                # Waited for the kernel's last sync; writing now would resurrect the file.
                raise WorkspaceError(
                    f"the kernel has shut down meanwhile; its files were copied back to "
                    f"{about['local_dir']} then"
                )
            files = self._load_files()
            try:
                yield files
            finally:
                self._save(about, files)

    def forget(self) -> None:
        """Remove the manifest (the kernel and its instance are gone)."""
        with self._locked():
            self.path.unlink(missing_ok=True)
            self.path.with_suffix(".lock").unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _load_files(self) -> Files:
        try:
            saved = json.loads(self.path.read_text()).get("files", {})
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise WorkspaceError(f"cannot read the workspace manifest {self.path}: {e}") from None
        return {
            rel: {side: Stamp(*entry[side]) if entry.get(side) else None for side in entry}
            for rel, entry in saved.items()
        }

    def _save(self, about: dict[str, Any], files: Files) -> None:
        state = {
            **about,
            "files": {
                rel: {side: [s.size, s.mtime] if s else None for side, s in entry.items()}
                for rel, entry in files.items()
            },
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=PART_SUFFIX)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
