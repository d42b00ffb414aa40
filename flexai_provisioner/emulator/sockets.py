"""The loopback sockets of the emulator's stand-ins for a network and for a hung sshd: a
listener's connections until it is shut down, and closing that wakes whoever waits."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


def accepted(listener: socket.socket) -> Iterator[socket.socket]:
    """The connections ``listener`` accepts, until it is shut down (:func:`close_now`)."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        yield conn


def close_now(sock: socket.socket) -> None:
    """Close ``sock``, waking a thread blocked on it."""
    # Closing a socket does not wake a thread blocked in recv() or accept() on it; shutting it
    # down does.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
