"""The SSH key a kernel's instance trusts, and the file other processes reach it with."""

from __future__ import annotations

import os
from pathlib import Path

from jupyter_core.paths import jupyter_runtime_dir

from .ssh import KeyPair, generate_keypair, load_private_key


class KernelKey:
    """A fresh per-kernel key, or the user's own (``ssh_key_file``).

    A fresh key is kept in a 0600 runtime file while its instance exists, for the processes
    that need to reach it too (a restarted server reattaching, ``jupyter flexai sync``); the
    file is removed with the instance (or by ``jupyter flexai gc`` if its owner died). A user's
    own key is never copied nor removed: reattaching reads it again.
    """

    def __init__(self, pair: KeyPair, file: str | None = None, *, kept: bool = False):
        self.pair = pair
        self.file = file  # where another process finds the key, if anywhere
        self._kept = kept  # file is a runtime copy of a per-kernel key, removed with it

    @classmethod
    def for_kernel(cls, kernel_id: str, own_file: str = "", passphrase: str = "") -> KernelKey:
        """The user's own key if ``own_file`` is set, else a fresh one named for the kernel."""
        if own_file:
            return cls(load_private_key(own_file, passphrase or None), own_file)
        return cls(generate_keypair(f"flexai-kernel-{kernel_id}"))

    @classmethod
    def reload(cls, file: str, own_file: str = "", passphrase: str = "") -> KernelKey:
        """The key another process used, from its file: the user's own (``own_file``, read with
        ``passphrase``) or a kept per-kernel key, which this process now removes."""
        own = file == own_file
        return cls(load_private_key(file, passphrase if own else None), file, kept=not own)

    @property
    def own(self) -> bool:
        """Whether this is the user's own key (``ssh_key_file``), which is never copied."""
        return self.file is not None and not self._kept

    def keep(self, kernel_id: str) -> str | None:
        """Write a fresh key to its runtime file and return the file; None for the user's own
        key, which already has one."""
        if self.file is not None:
            return None
        path = Path(jupyter_runtime_dir()) / f"flexai-{kernel_id}.key"
        write_key_file(path, self.pair)
        self.file, self._kept = str(path), True
        return self.file

    def remove(self) -> None:
        """Remove the kept file: the instance is gone or its deletion owed, so it is no use."""
        if self._kept and self.file is not None:
            Path(self.file).unlink(missing_ok=True)
            self.file, self._kept = None, False


def write_key_file(path: Path, pair: KeyPair) -> None:
    """Write ``pair``'s private half to ``path``, created anew with mode 0600 (a file left
    there could have a wider mode); a half-written file is removed. Raises ``OSError``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pair.private_openssh)
    except OSError:
        path.unlink(missing_ok=True)
        raise
