"""ZeroMQ's ZMTP 3 greeting, sent to a kernel ahead of its client so its handshake is local.

Over a distant link a ZeroMQ connection pays two serial round trips before its first message:
the greetings (each side sends its signature, its version once it has the other's, the rest
once it has the other's version), then the READY commands. Answering the client locally and
sending its handshake and first messages on together would not do: libzmq's NULL mechanism
drops a connection whose messages arrive behind the peer's READY before it has sent its own
("unexpected command"), and a starting kernel reads everything that waited at once.

So the greeting goes ahead instead. A channel opened ahead to a kernel's port
(:meth:`.Tunnel.preopen`) is sent at once the greeting a Jupyter client's libzmq sends
(:data:`GREETING`: ZMTP 3.1, NULL); the kernel answers it with its greeting and READY while
it starts, and they wait in the channel. A client given that channel reads the kernel's own
answer at once and completes its handshake locally; its greeting, once checked to be the one
that went ahead (:func:`check_greeting`), is dropped, and its READY and first messages go out
in one flight behind it. Everything else in both directions is relayed verbatim, so the
kernel and the client check each other as ZeroMQ always does (RFC 23, RFC 37).
"""

from __future__ import annotations

SIGNATURE = b"\xff" + (1).to_bytes(8, "big") + b"\x7f"  # libzmq's, for an empty routing id
NULL = b"NULL".ljust(20, b"\0")
GREETING = SIGNATURE + bytes([3, 1]) + NULL + bytes(32)  # version 3.1, NULL, as-server 0
GREETING_SIZE = len(GREETING)  # 64


class Mismatch(ValueError):
    """A client greeting unlike the one sent ahead: that connection cannot be relayed."""


def check_greeting(data: bytes | bytearray) -> bool:
    """Whether ``data`` holds a whole greeting (True) or only the start of one (False) that
    libzmq would handle as :data:`GREETING`: a :class:`Mismatch` at the first byte that says
    otherwise. libzmq ignores the signature's length field, as-server and the filler."""
    n = len(data)
    if (n >= 1 and data[0] != 0xFF) or (n >= 10 and not data[9] & 0x01):
        raise Mismatch("not a ZMTP 3 greeting")
    if n >= 12 and data[10:12] != GREETING[10:12]:
        raise Mismatch(f"ZMTP {data[10]}.{data[11]}, not 3.1")
    if n >= 32 and data[12:32] != NULL:
        mechanism = bytes(data[12:32]).rstrip(b"\0").decode("ascii", "replace")
        raise Mismatch(f"mechanism {mechanism}, not NULL")
    return n >= GREETING_SIZE
