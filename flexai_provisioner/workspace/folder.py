"""The notebook's folder, the local side of a workspace: which of its files are mirrored (the
fixed skips and ``.flexaiignore``), whether they fit ``workspace_max_mb``, and each file's
(size, mtime) stamp, by which a copy is known to be the same file."""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pathspec

from ..errors import WorkspaceError, WorkspaceTooLargeError

IGNORE_FILE = ".flexaiignore"
# Never worth copying: hidden folders (.git, .venv, .cache), Jupyter's and Python's caches.
ALWAYS_SKIPPED = (".*/", ".ipynb_checkpoints/", "__pycache__/")
PART_SUFFIX = ".flexai-part"  # a copy in progress, renamed over its target when complete
MB = 1024 * 1024


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


def local_stamp(st: os.stat_result) -> Stamp:
    return Stamp(st.st_size, st.st_mtime_ns)


def stamp_of(path: Path) -> Stamp | None:
    """The stamp of the local file ``path``, or None if there is none."""
    try:
        return local_stamp(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):  # missing, or a file where a folder was
        return None


def same_file(local: Stamp | None, remote: Stamp | None) -> bool:
    """Whether a local and a remote file have the same size and mtime (to the second)."""
    return (
        local is not None
        and remote is not None
        and local.size == remote.size
        and local.mtime // 1_000_000_000 == remote.mtime
    )


def saved_version(target: Path, label: str) -> Path:
    """Where the instance ``label``'s version of ``target`` is saved when ``target`` was
    changed here too: beside it, under a name that says where it comes from."""
    return target.with_name(f"{target.stem}.flexai-{label}{target.suffix}")


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


def scan(local_dir: Path, max_mb: float, label: str = "") -> dict[str, os.stat_result]:
    """The files of ``local_dir`` to mirror by relative path; raise if they exceed ``max_mb``.

    Versions saved from the instance ``label`` (:func:`saved_version`) are not mirrored.
    """
    rules = Rules(local_dir)
    found: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(local_dir):  # no directory symlinks
        base = Path(dirpath).relative_to(local_dir).as_posix()
        prefix = "" if base == "." else base + "/"
        dirnames[:] = sorted(d for d in dirnames if not rules.skips_dir(prefix + d))
        for name in sorted(filenames):
            rel = prefix + name
            if rules.skips_file(rel) or (label and f".flexai-{label}" in name):
                continue  # ignored, or a conflicting version this workspace saved
            with contextlib.suppress(OSError):  # vanished, or a dangling symlink
                st = os.stat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    found[rel] = st
    _check_size(local_dir, found, max_mb)
    return found


def _check_size(local_dir: Path, found: dict[str, os.stat_result], max_mb: float) -> None:
    total = sum(st.st_size for st in found.values())
    if total <= max_mb * MB:
        return
    by_entry: dict[str, int] = {}
    for rel, st in found.items():
        top, sep, _ = rel.partition("/")
        by_entry[top + sep] = by_entry.get(top + sep, 0) + st.st_size
    biggest = sorted(by_entry.items(), key=lambda item: -item[1])[:3]
    raise WorkspaceTooLargeError(
        f"the kernel's folder {local_dir} holds {megabytes(total)} to copy to the "
        f"instance, over workspace_max_mb = {max_mb:g} (largest: "
        + ", ".join(f"{name} {megabytes(size)}" for name, size in biggest)
        + f"); name what the kernel does not need in {local_dir / IGNORE_FILE} "
        "(gitignore syntax), raise c.FlexAIProvisioner.workspace_max_mb, or set "
        "workspace = False"
    )
