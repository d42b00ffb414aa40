"""Every use of paramiko's private parts, in one place (``ssh.py`` is the only importer).

paramiko buffers channel data for another thread to ``recv``, waits for each SFTP answer and
login step before the next, and reads each packet in several small ``recv`` calls and copies.
Bypassing that (through ``Channel._feed``, ``_check_add_window``, ``in_buffer``, Transport's
``_send_user_message``/``_channel_handler_table``, the Packetizer's inbound cipher state,
AuthHandler's ``_parse_service_accept``, SFTPClient's ``_async_request``/``_read_response``)
makes output, uploads and logins fast. A paramiko release that changed them would fail
silently, so paramiko is pinned below 6 and the tests run both ways: with :data:`PUBLIC_API_ONLY`
(``FLEXAI_SSH_PUBLIC_API_ONLY=1``) connections are paramiko's own, read with ``recv()``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import paramiko
from paramiko.common import MSG_CHANNEL_DATA, MSG_CHANNEL_WINDOW_ADJUST
from paramiko.sftp import CMD_HANDLE, CMD_STATUS

PUBLIC_API_ONLY = os.environ.get("FLEXAI_SSH_PUBLIC_API_ONLY", "") not in ("", "0")
"""Build plain paramiko transports (no sink, read-ahead, packetizer change or pipelined login);
read at each connect, so tests can switch it per test."""

READ_AHEAD = 256 * 1024  # one recv() serves several packets of bulk output

# AES-GCM authenticates as it decrypts (one AEAD call per packet instead of AES-CTR plus a
# separate HMAC, here and in sshd); the rest stay on offer, after it, for other servers.
_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")

DataSink = Callable[[bytes], None]

# The Packetizer state the fast path reads and writes: paramiko's name-mangled attributes.
_SOCK, _AEAD, _ENGINE, _IV, _SEQ, _BYTES, _PACKETS, _MAC, _CLOSED, _REKEY, _ZIP, _DUMP = (
    sys.intern(f"_Packetizer__{name}")
    for name in (
        *("socket", "aead_in", "block_engine_in", "iv_in", "sequence_number_in"),
        *("received_bytes", "received_packets", "mac_size_in", "closed", "need_rekey"),
        *("compress_engine_in", "dump_packets"),
    )
)


def new_transport(sock: socket.socket, **kwargs: Any) -> paramiko.Transport:
    """A client transport on ``sock`` preferring cheap ciphers: a :class:`_SinkTransport`, or
    paramiko's own if :data:`PUBLIC_API_ONLY`."""
    transport = (
        paramiko.Transport(sock, **kwargs) if PUBLIC_API_ONLY else _SinkTransport(sock, **kwargs)
    )
    options = transport.get_security_options()
    options.ciphers = _first(_CIPHERS, options.ciphers)
    options.digests = _first(_MACS, options.digests)
    return transport


def _first(preferred: tuple[str, ...], offered: tuple[str, ...]) -> tuple[str, ...]:
    return (*(p for p in preferred if p in offered), *(o for o in offered if o not in preferred))


def session_started(transport: paramiko.Transport) -> None:
    """sshd has set TCP_NODELAY for a running session: stop acknowledging every read at once."""
    if isinstance(transport, _SinkTransport):
        transport.sock.quickack = False


def set_sink(chan: paramiko.Channel, sink: DataSink) -> bool:
    """Deliver ``chan``'s incoming data (what came before first) to ``sink`` from now on, in
    the transport's thread. The sink must not block, and must credit what it passed on with
    :func:`consumed`. False, and nothing changed, if the transport is paramiko's own."""
    transport = chan.get_transport()
    if not isinstance(transport, _SinkTransport):
        return False
    with transport.sink_lock:
        # No window credit here: the sink credits these bytes as it passes them on.
        if early := chan.in_buffer.empty():
            sink(early)
        chan.__dict__["flexai_sink"] = sink
    return True


def consumed(chan: paramiko.Channel, nbytes: int) -> int:
    """Note ``nbytes`` of a sink's data as passed on; return the window credit now due, to
    send with :func:`grant` from another thread (sending can wait for a key exchange the
    transport's thread runs)."""
    return chan._check_add_window(nbytes) if nbytes else 0


def grant(chan: paramiko.Channel, nbytes: int) -> None:
    """A window adjust: the remote side may send ``nbytes`` more (unless the link is gone)."""
    m = paramiko.Message(struct.pack(">BII", MSG_CHANNEL_WINDOW_ADJUST, chan.remote_chanid, nbytes))
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        chan.get_transport()._send_user_message(m)  # type: ignore[union-attr]


def _on_channel_data(chan: paramiko.Channel, m: paramiko.Message) -> None:
    """MSG_CHANNEL_DATA off the fast path (:meth:`_Packetizer.read_message`): held for the
    channel's sink if it has one, else buffered by paramiko for ``recv``."""
    transport: _SinkTransport = chan.transport  # type: ignore[assignment]
    if "flexai_sink" not in chan.__dict__:
        with transport.sink_lock:
            if "flexai_sink" not in chan.__dict__:
                paramiko.Channel._feed(chan, m)
                return
    transport.held.setdefault(chan, []).append(m.get_binary())


def _flushing_first(handler: Callable[[paramiko.Channel, paramiko.Message], None]) -> Any:
    """``handler``, once the channel's held data has reached its sink (an EOF, a close or
    an exit status must not overtake the data sent before it)."""

    def handle(chan: paramiko.Channel, m: paramiko.Message) -> None:
        chan.transport.flush_held(chan)  # type: ignore[union-attr]
        handler(chan, m)

    return handle


class _Packetizer(paramiko.Packetizer):
    """paramiko's packetizer, with a fast path for AES-GCM packets once the connection is up:
    each is decrypted out of the read-ahead buffer and a sink's data held at once, with no
    Message, dispatch or five copies (under bulk output ~30 % less CPU in this thread). Other
    ciphers, key exchanges, packet dumps and read timeouts (the handshake) are paramiko's.
    The handshake timer is cancelled once, not after every packet (a lock and a notify)."""

    transport: Callable[[], _SinkTransport | None] = staticmethod(lambda: None)  # a weakref
    _handshake_completed = False

    def complete_handshake(self) -> None:
        if not self._handshake_completed:
            self._handshake_completed = True
            super().complete_handshake()

    def read_message(self) -> tuple[int, paramiko.Message]:
        return self._read_fast() or super().read_message()

    def _read_fast(self) -> tuple[int, paramiko.Message] | None:
        d = self.__dict__
        sock: _Socket = d[_SOCK]
        while (transport := self.transport()) and not transport.in_kex and d[_AEAD]:
            if d[_REKEY] or d[_ZIP] or d[_DUMP]:
                return None
            buf, pos = sock.buf, sock.pos
            size = int.from_bytes(buf[pos : pos + 4], "big") if len(buf) - pos >= 4 else -1
            end = pos + 4 + size + d[_MAC]
            if size < 0 or end > len(buf):
                if sock.gettimeout() is not None or end - pos > 2 * READ_AHEAD:
                    return None  # read_all handles timeouts; a bogus length is its to refuse
                sock.fill(lambda: d[_CLOSED])
                continue
            if d[_BYTES] + end - pos >= self.REKEY_BYTES or d[_PACKETS] + 1 >= self.REKEY_PACKETS:
                return None
            view, iv = memoryview(buf), d[_IV]
            plain = d[_ENGINE].decrypt(iv, view[pos + 4 : end], view[pos : pos + 4])
            sock.pos, d[_IV] = end, self._inc_iv_counter(iv)
            seqno, d[_SEQ] = d[_SEQ], (d[_SEQ] + 1) & 0xFFFFFFFF
            d[_BYTES] += end - pos
            d[_PACKETS] += 1
            if plain[1] == MSG_CHANNEL_DATA:  # padding length, type, channel, data length
                chan = transport._channels.get(int.from_bytes(plain[2:6], "big"))
                if chan is not None and "flexai_sink" in chan.__dict__:
                    n = int.from_bytes(plain[6:10], "big")
                    transport.held.setdefault(chan, []).append(memoryview(plain)[10 : 10 + n])
                    continue
            m = paramiko.Message(plain[2 : size - plain[0]])
            m.seqno = seqno
            return plain[1], m
        return None


class _SinkTransport(paramiko.Transport):
    """paramiko's transport, reading ahead and handing a sink's data (:func:`set_sink`) over
    in this thread, not buffered for another's ``recv`` (no pipe write, wake-up, lock or copy
    per message), in one piece per read of the socket, just before the next: under bulk
    output one ``send()`` and wake-up of the local reader per 256 KiB instead of per packet."""

    _channel_handler_table = {
        **{
            ptype: _flushing_first(handler)
            for ptype, handler in paramiko.Transport._channel_handler_table.items()
        },
        MSG_CHANNEL_DATA: _on_channel_data,
    }

    def __init__(self, sock: socket.socket, **kwargs: Any):
        self.sock: _Socket
        super().__init__(_Socket(sock), packetizer_class=_Packetizer, **kwargs)
        self.sock.before_wait = self.flush_all
        self.packetizer.transport = weakref.ref(self)  # type: ignore[attr-defined]
        self.sink_lock = threading.Lock()
        self.held: dict[paramiko.Channel, list[bytes | memoryview]] = {}  # this thread's only

    def flush_held(self, chan: paramiko.Channel) -> None:
        """Hand ``chan``'s held data to its sink (transport thread only)."""
        held = self.held.pop(chan, None)
        if held:
            chan.__dict__["flexai_sink"](b"".join(held))

    def flush_all(self) -> None:
        """Hand all held data on (a connection ending abruptly drops it, as its channels)."""
        while self.held:
            self.flush_held(next(iter(self.held)))

    _ahead: Future[paramiko.Channel] | None = None  # the session opened behind the login

    def auth_publickey(self, username: str, key: paramiko.PKey, event: None = None) -> list:
        """paramiko's login, but the service request, the userauth request and a session
        channel's open go in one flight (RFC 4252 passes what follows the request that
        succeeds to the service; sshd handles each in order): two round trips saved."""
        done, accept, self._ahead = threading.Event(), paramiko.Message(), Future()
        auth = self.auth_handler = paramiko.AuthHandler(self)
        auth._parse_service_accept = lambda _m: None  # type: ignore[method-assign] # see below
        auth.auth_publickey(username, key, done)  # sends the service request
        accept.add_string("ssh-userauth")
        accept.rewind()  # the acceptance, taken for granted: sends the userauth request
        paramiko.AuthHandler._parse_service_accept(auth, accept)
        opener = threading.Thread(target=self._open_ahead, args=(self._ahead,), daemon=True)
        opener.start()
        return auth.wait_for_response(done)

    def _open_ahead(self, ahead: Future[paramiko.Channel]) -> None:
        try:
            ahead.set_result(super().open_session(timeout=self.auth_timeout))
        except BaseException as e:  # the login failed, and the open with it
            ahead.set_exception(e)

    def open_session(self, *args: Any, **kwargs: Any) -> paramiko.Channel:
        """The session opened behind the login while it is unused, else a new one (ssh.py
        opens every session at the transport's default sizes)."""
        with self.lock:
            ahead, self._ahead = self._ahead, None
        if ahead is not None:
            with contextlib.suppress(Exception):  # else a channel opened now tells why
                return ahead.result(kwargs.get("timeout"))
        return super().open_session(*args, **kwargs)


class _Socket:
    """The transport's TCP socket, read 256 KiB at a time (several packets) and, until sshd
    sets TCP_NODELAY when the first session runs, acknowledged at once (``TCP_QUICKACK``):
    its reply to our first request waited ~40 ms for our delayed ACK."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.buf = b""  # what was read; handled up to ``pos``
        self.pos = 0
        self.quickack = hasattr(socket, "TCP_QUICKACK")
        self.send, self.gettimeout = sock.send, sock.gettimeout
        self.before_wait: Callable[[], None] = lambda: None

    def recv(self, n: int) -> bytes:
        buf, pos = self.buf, self.pos
        if pos >= len(buf):
            buf, pos = self.buf, self.pos = self._read(), 0
        self.pos = pos + n
        return buf[pos : pos + n]

    def fill(self, closed: Callable[[], bool]) -> None:
        """Read more, keeping what is not handled yet; the end, or an error once closed, is an
        EOFError (as in paramiko's ``read_all``)."""
        try:
            data = self._read()
        except OSError:
            if closed():
                raise EOFError() from None
            raise
        if not data:
            raise EOFError()
        rest = self.buf[self.pos :]
        self.buf, self.pos = (rest + data if rest else data), 0

    def _read(self) -> bytes:
        self.before_wait()  # all that was read is handled: pass it on before waiting
        data = self._sock.recv(READ_AHEAD)
        if self.quickack:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data

    def __getattr__(self, name: str) -> object:  # settimeout, close, getpeername, _closed...
        return getattr(self._sock, name)


class SFTPRequests:
    """paramiko's SFTPClient seen as a pipeline: requests sent without waiting, each answer
    handed to :meth:`answered` (SFTPClient waits for each answer but to file data)."""

    def __init__(self, sftp: paramiko.SFTPClient):
        self._sftp = sftp
        self.handles: dict[int, bytes] = {}  # answers to opens, by request number
        self.pending: set[int] = set()
        self.failure: OSError | None = None

    def send(self, t: int, *args: object) -> int:
        num = self._sftp._async_request(self, t, *args)
        self.pending.add(num)
        return num

    def read_answer(self) -> None:
        """Wait for the next answer (it arrives through :meth:`_async_response`)."""
        self._sftp._read_response()

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        self.pending.discard(num)
        if t == CMD_HANDLE:
            self.handles[num] = msg.get_binary()
        elif t == CMD_STATUS:
            try:
                self._sftp._convert_status(msg)
            except OSError as e:  # EOFError is one; a status of EOF is not expected here
                self.failure = self.failure or e
