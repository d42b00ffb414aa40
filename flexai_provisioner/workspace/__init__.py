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

The modules: ``folder`` (the local side: what is mirrored, the size limit, stamps),
``manifest`` (the state file, under a lock), ``transfer`` (the instance side: listing and
SFTP copies), ``sync`` (:class:`Workspace`: what goes which way). Everything here blocks;
it runs in worker threads.
"""

from __future__ import annotations

from .folder import MB, files, megabytes
from .manifest import running_workspaces, state_path
from .sync import SyncReport, Workspace, sync_elsewhere

__all__ = [
    "MB",
    "SyncReport",
    "Workspace",
    "files",
    "megabytes",
    "running_workspaces",
    "state_path",
    "sync_elsewhere",
]
