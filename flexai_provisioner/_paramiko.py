"""Every use of paramiko's private parts, in one place (``ssh.py`` is the only importer).

paramiko buffers channel data for another thread to ``recv``, waits for each SFTP answer and
login step before the next, and reads each packet in two or three small ``recv`` calls.
Bypassing that (through ``Channel._feed``, ``_check_add_window``, ``in_buffer``, Transport's
``_send_user_message``/``_channel_handler_table``, AuthHandler's ``_parse_service_accept``,
SFTPClient's ``_async_request``/``_read_response``) makes output, uploads and logins fast. A
paramiko release that changed them would fail silently, so paramiko is pinned below 6 and
the tests run both ways: with :data:`PUBLIC_API_ONLY` (``FLEXAI_SSH_PUBLIC_API_ONLY=1``)
connections are paramiko's own transports, read with ``fileno()`` and ``recv()`` (slower).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import paramiko
from paramiko.common import MSG_CHANNEL_DATA, cMSG_CHANNEL_WINDOW_ADJUST
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
    """Deliver ``chan``'s incoming data to ``sink`` from now on, in the transport's thread.

    Data that arrived before goes to ``sink`` first, so nothing is reordered. The sink
    must not block, and must credit what it has passed on with :func:`consumed` (the
    remote side stops sending once a window's worth is uncredited). Returns False, and
    changes nothing, if the channel's transport is paramiko's own.
    """
    transport = chan.get_transport()
    if not isinstance(transport, _SinkTransport):
        return False
    with transport.sink_lock:
        # No window credit here: the sink credits these bytes as it passes them on.
        early = chan.in_buffer.empty()
        if early:
            sink(early)
        chan.__dict__["flexai_sink"] = sink
    return True


def consumed(chan: paramiko.Channel, nbytes: int) -> int:
    """Note ``nbytes`` of a sink's data as passed on; return the window credit now due.

    Safe in any thread; send a non-zero result with :func:`grant` from a thread other than
    the transport's (sending can wait for a key exchange the transport's thread runs).
    """
    return chan._check_add_window(nbytes) if nbytes else 0


def grant(chan: paramiko.Channel, nbytes: int) -> None:
    """Tell the remote side it may send ``nbytes`` more on ``chan`` (a window adjust); a
    connection already gone has nothing to be told."""
    m = paramiko.Message()
    m.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
    m.add_int(chan.remote_chanid)
    m.add_int(nbytes)
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        chan.get_transport()._send_user_message(m)  # type: ignore[union-attr]


def _on_channel_data(chan: paramiko.Channel, m: paramiko.Message) -> None:
    """MSG_CHANNEL_DATA, in the transport's thread: held for the channel's sink if it has one.

    Held until the transport has handled everything one read of its socket brought, then
    passed on in one piece before it reads again: under bulk output that is one ``send()``
    and one wake-up of the local reader per 256 KiB read instead of per 32 KiB packet,
    and a lone small message is passed on as soon as it is handled.
    """
    transport: _SinkTransport = chan.transport  # type: ignore[assignment]
    if "flexai_sink" not in chan.__dict__:
        with transport.sink_lock:
            if "flexai_sink" not in chan.__dict__:
                paramiko.Channel._feed(chan, m)
                return
    held = transport.held.get(chan)
    if held is None:
        transport.held[chan] = [m.get_binary()]
    else:
        held.append(m.get_binary())


def _flushing_first(handler: Callable[[paramiko.Channel, paramiko.Message], None]) -> Any:
    """``handler``, once the channel's held data has reached its sink (an EOF, a close or
    an exit status must not overtake the data sent before it)."""

    def handle(chan: paramiko.Channel, m: paramiko.Message) -> None:
        chan.transport.flush_held(chan)  # type: ignore[union-attr]
        handler(chan, m)

    return handle


class _Packetizer(paramiko.Packetizer):
    """paramiko's packetizer, minus a timer cancel (a lock and a notify) after every packet:
    the handshake timer needs cancelling once, when the first packet is handled."""

    _handshake_completed = False

    def complete_handshake(self) -> None:
        if not self._handshake_completed:
            self._handshake_completed = True
            super().complete_handshake()


class _SinkTransport(paramiko.Transport):
    """paramiko's transport, reading ahead and able to hand channel data over directly.

    A channel given a sink (:func:`set_sink`) has its incoming data passed to the sink in
    this transport's own thread, instead of being buffered for another thread to ``recv``
    (a pipe write, a wake-up, a lock and a copy per message saved), and in one piece for
    all the messages one read of the socket brought.
    """

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
        self.sink_lock = threading.Lock()
        self.held: dict[paramiko.Channel, list[bytes]] = {}  # this thread's only

    def flush_held(self, chan: paramiko.Channel) -> None:
        """Hand ``chan``'s held data to its sink (transport thread only)."""
        held = self.held.pop(chan, None)
        if held:
            chan.__dict__["flexai_sink"](held[0] if len(held) == 1 else b"".join(held))

    def flush_all(self) -> None:
        """Hand every channel's held data to its sink. (A connection that ends abruptly, by a
        disconnect or a corrupt packet, drops what it still held, as it drops its channels.)"""
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
    """The transport's TCP socket, read ahead in large chunks and acknowledged at once.

    paramiko reads each packet in two or three small ``recv`` calls (header, body, MAC);
    serving them from one large read saves most system calls under bulk output.
    Until sshd sets TCP_NODELAY on its side (when the first session channel runs), its
    reply to our first request waited ~40 ms for our delayed ACK; acknowledging every read
    at once (``TCP_QUICKACK``) until then avoids that (:func:`session_started` ends it).
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buf = b""
        self._pos = 0
        self.quickack = hasattr(socket, "TCP_QUICKACK")
        self.send = sock.send
        self.before_wait: Callable[[], None] = lambda: None

    def recv(self, n: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos < len(buf):
            end = pos + n
            self._pos = end
            return buf[pos:end]
        self.before_wait()  # all that was read is handled: pass it on before waiting
        data = self._sock.recv(max(n, READ_AHEAD))
        if self.quickack:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        if len(data) <= n:
            return data
        self._buf, self._pos = data, n
        return data[:n]

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
