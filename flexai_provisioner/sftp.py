"""Copying many files over one SFTP session: requests sent without waiting for each answer.

paramiko's SFTPClient waits for the answer to every request but file data: copying a file
costs five round trips (open, close, two setstats, rename). :class:`SFTPBatch` sends them
all ahead, so a folder costs about one, as files are opened ahead of their data: over a
25 ms link that was most of a folder of small files' time. It needs paramiko's internals
(:class:`~flexai_provisioner._paramiko.SFTPRequests`); with
:data:`~flexai_provisioner._paramiko.PUBLIC_API_ONLY`, :func:`batch` gives a
:class:`PlainBatch` of the same shape that waits, through paramiko's public API.
"""

from __future__ import annotations

from typing import Protocol

import paramiko
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_EXTENDED,
    CMD_OPEN,
    CMD_SETSTAT,
    CMD_WRITE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
    int64,
)

from . import _paramiko

__all__ = ["Batch", "PlainBatch", "SFTPBatch", "batch"]


class Batch(Protocol):
    """Writes of whole files, each as: create, handle, write..., close, set_attributes,
    rename. A failure is raised as ``OSError`` by the call that meets it, at the latest by
    :meth:`finish`. Use one from one thread, with nothing else on its client."""

    def create(self, path: str) -> int:
        """Ask to create or truncate ``path`` for writing; a ticket for :meth:`handle`."""

    def handle(self, ticket: int) -> bytes:
        """The open file :meth:`create` asked for."""

    def write(self, handle: bytes, offset: int, data: bytes) -> None: ...

    def close(self, handle: bytes) -> None: ...

    def set_attributes(self, path: str, mtime: int, mode: int | None = None) -> None:
        """Set ``path``'s access and modification times, and its mode if given."""

    def rename(self, old: str, new: str) -> None:
        """Rename ``old`` over ``new`` (OpenSSH's posix-rename, atomic)."""

    def finish(self) -> None:
        """Wait for every answer; raise the first failure."""


def batch(sftp: paramiko.SFTPClient) -> Batch:
    """The pipelined batch, or the plain one on paramiko's public API only."""
    return PlainBatch(sftp) if _paramiko.PUBLIC_API_ONLY else SFTPBatch(sftp)


class SFTPBatch:
    """A :class:`Batch` whose requests do not wait: answers are checked as they arrive."""

    #: SFTP (version 3) servers need only accept writes of up to ~32 KiB.
    MAX_WRITE = 32 * 1024

    def __init__(self, sftp: paramiko.SFTPClient):
        self._chan = sftp.get_channel()
        self._requests = _paramiko.SFTPRequests(sftp)

    def _send(self, t: int, *args: object) -> int:
        num = self._requests.send(t, *args)
        # Read what came back now and then, so answers never fill the channel's window.
        while len(self._requests.pending) > 256 and self._chan.recv_ready():
            self._requests.read_answer()
        return num

    def create(self, path: str) -> int:
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC
        return self._send(CMD_OPEN, path, flags, paramiko.SFTPAttributes())

    def handle(self, ticket: int) -> bytes:
        while ticket not in self._requests.handles:  # one round trip at most
            if ticket not in self._requests.pending:  # answered with an error
                self.finish()
                raise OSError("the SFTP server answered an open with neither handle nor error")
            self._requests.read_answer()
        return self._requests.handles.pop(ticket)

    def write(self, handle: bytes, offset: int, data: bytes) -> None:
        # One request per channel packet: paramiko keeps 64 bytes of each for its headers,
        # a write request needs 25 and the handle.
        size = min(self.MAX_WRITE, self._chan.out_max_packet_size - 89 - len(handle))
        for start in range(0, len(data), size):
            self._send(CMD_WRITE, handle, int64(offset + start), data[start : start + size])

    def close(self, handle: bytes) -> None:
        self._send(CMD_CLOSE, handle)

    def set_attributes(self, path: str, mtime: int, mode: int | None = None) -> None:
        attrs = paramiko.SFTPAttributes()
        attrs.st_atime = attrs.st_mtime = mtime
        if mode is not None:
            attrs.st_mode = mode
        self._send(CMD_SETSTAT, path, attrs)

    def rename(self, old: str, new: str) -> None:
        self._send(CMD_EXTENDED, "posix-rename@openssh.com", old, new)

    def finish(self) -> None:
        requests = self._requests
        while requests.pending:
            requests.read_answer()
        failure, requests.failure = requests.failure, None
        if failure is not None:
            raise failure


class PlainBatch:
    """A :class:`Batch` through SFTPClient's public API: each request but file data waits for
    its answer (five round trips a file), and fails where it is made."""

    def __init__(self, sftp: paramiko.SFTPClient):
        self._sftp = sftp
        self._files: dict[bytes, paramiko.SFTPFile] = {}
        self._opened = 0

    def create(self, path: str) -> int:
        f = self._sftp.open(path, "wb")
        f.set_pipelined(True)  # writes wait only at close
        self._opened += 1
        self._files[self.handle(self._opened)] = f
        return self._opened

    def handle(self, ticket: int) -> bytes:
        return str(ticket).encode()

    def write(self, handle: bytes, offset: int, data: bytes) -> None:
        f = self._files[handle]
        f.seek(offset)
        f.write(data)

    def close(self, handle: bytes) -> None:
        self._files.pop(handle).close()

    def set_attributes(self, path: str, mtime: int, mode: int | None = None) -> None:
        self._sftp.utime(path, (mtime, mtime))
        if mode is not None:
            self._sftp.chmod(path, mode)

    def rename(self, old: str, new: str) -> None:
        self._sftp.posix_rename(old, new)

    def finish(self) -> None:
        files, self._files = self._files, {}
        for f in files.values():  # left open by a copy that stopped half-way
            f.close()
