"""Every use of paramiko's private parts, here and in the packetizer it uses (``_packetizer.py``);
``ssh.py`` and ``sftp.py`` are the only importers.

They make output, uploads and logins fast; a paramiko release changing them would fail silently,
so paramiko is pinned below 6 and the tests also run with :data:`PUBLIC_API_ONLY`."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import paramiko
from paramiko.common import (
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_OPEN,
    MSG_CHANNEL_WINDOW_ADJUST,
    cMSG_CHANNEL_REQUEST,
)
from paramiko.sftp import CMD_HANDLE, CMD_STATUS

from ._packetizer import READ_AHEAD, Packetizer

# The variable is read at import, the flag at each connect (so tests can switch it per test).
PUBLIC_API_ONLY = os.environ.get("FLEXAI_SSH_PUBLIC_API_ONLY", "") not in ("", "0")

# AES-GCM: one AEAD call per packet, not AES-CTR and an HMAC (here and in sshd); others after.
_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")


# OpenSSH numbers a connection's channels from 0, in the order they are opened.
_FIRST_CHANNEL = 0


def new_transport(
    sock: socket.socket, first_command: str | None = None, **kwargs: Any
) -> paramiko.Transport:
    """A client transport preferring cheap ciphers: ours, or paramiko's if PUBLIC_API_ONLY.
    Ours sends ``first_command``'s exec behind the login (see :func:`exec_ahead`)."""
    if PUBLIC_API_ONLY:
        transport = paramiko.Transport(sock, **kwargs)
    else:
        transport = _SinkTransport(sock, **kwargs)
        transport.first_command = first_command
    options = transport.get_security_options()
    options.ciphers = _first(_CIPHERS, options.ciphers)
    options.digests = _first(_MACS, options.digests)
    return transport


def _first(preferred: tuple[str, ...], offered: tuple[str, ...]) -> tuple[str, ...]:
    return (*(p for p in preferred if p in offered), *(o for o in offered if o not in preferred))


def exec_ahead(
    transport: paramiko.Transport, command: str, timeout: float
) -> paramiko.Channel | None:
    """The session opened behind the login with ``command`` exec'd in it, once sshd has
    answered the exec; None unless ``command`` was the transport's ``first_command``."""
    if not isinstance(transport, _SinkTransport):
        return None
    return transport.take_first(command, timeout)


def session_started(transport: paramiko.Transport) -> None:
    """sshd has set TCP_NODELAY for a running session: stop acknowledging every read at once."""
    if isinstance(transport, _SinkTransport):
        transport.sock.quickack = False


def set_sink(chan: paramiko.Channel, sink: Callable[[bytes], None]) -> bool:
    """Hand ``chan``'s data (what came before first) to ``sink``, which must not block and must
    credit it with :func:`consumed`, in the transport's thread; False on paramiko's own."""
    if not isinstance(transport := chan.get_transport(), _SinkTransport):
        return False
    with transport.sink_lock:
        if early := chan.in_buffer.empty():  # not credited here: the sink credits it
            sink(early)
        chan.__dict__["flexai_sink"] = sink
    return True


def consumed(chan: paramiko.Channel, nbytes: int) -> int:
    """The window credit due for ``nbytes`` a sink passed on, to :func:`grant` from another
    thread (a send can wait for a key exchange, which the transport's thread runs)."""
    return chan._check_add_window(nbytes) if nbytes else 0


def send_data(chan: paramiko.Channel, data: bytes) -> int:
    """``chan.send(data)``, AES-GCM packets built and encrypted in one step where we can."""
    if isinstance(transport := chan.get_transport(), _SinkTransport):
        return transport.packetizer.send_data(transport, chan, data)  # type: ignore[attr-defined]
    return chan.send(data)


def grant(chan: paramiko.Channel, nbytes: int) -> None:
    """A window adjust: the remote side may send ``nbytes`` more (unless the link is gone)."""
    m = paramiko.Message(struct.pack(">BII", MSG_CHANNEL_WINDOW_ADJUST, chan.remote_chanid, nbytes))
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        chan.get_transport()._send_user_message(m)  # type: ignore[union-attr]


def _on_channel_data(chan: paramiko.Channel, m: paramiko.Message) -> None:
    """MSG_CHANNEL_DATA off the fast path: held for the channel's sink, else paramiko's."""
    transport: _SinkTransport = chan.transport  # type: ignore[assignment]
    if "flexai_sink" not in chan.__dict__:
        with transport.sink_lock:
            if "flexai_sink" not in chan.__dict__:
                paramiko.Channel._feed(chan, m)
                return
    transport.held.setdefault(chan, []).append(m.get_binary())


class _SinkTransport(paramiko.Transport):
    """paramiko's, handing a sink's data (:func:`set_sink`) over in this thread, in one piece per
    socket read: under bulk output one local ``send()`` and wake-up per 256 KiB, not per packet."""

    _channel_handler_table = {  # held data first: no EOF, close or exit status overtakes it
        **{
            t: lambda c, m, h=h: (c.transport.flush(c), h(c, m))
            for t, h in paramiko.Transport._channel_handler_table.items()
        },
        MSG_CHANNEL_DATA: _on_channel_data,
    }
    _ahead: Future[paramiko.Channel] | None = None  # the session opened behind the login
    first_command: str | None = None  # exec'd in it if sshd is OpenSSH (else None), until taken
    _behind_open: paramiko.Message | None = None  # to send right behind the next open
    _first_channel: paramiko.Channel | None = None  # the open it went behind

    def __init__(self, sock: socket.socket, **kwargs: Any):
        self.sock: _Socket
        super().__init__(_Socket(sock), packetizer_class=Packetizer, **kwargs)
        self.sock.before_wait = self.flush
        self.packetizer.transport = weakref.ref(self)  # type: ignore[attr-defined]
        self.sink_lock = threading.Lock()
        self.held: dict[paramiko.Channel, list[bytes | memoryview]] = {}  # this thread's only

    def flush(self, chan: paramiko.Channel | None = None) -> None:
        """Hand ``chan``'s (or all) held data on; a connection ending abruptly drops it."""
        for c in list(self.held) if chan is None else [chan]:
            if held := self.held.pop(c, None):
                c.__dict__["flexai_sink"](b"".join(held))

    def auth_publickey(self, username: str, key: paramiko.PKey, event: None = None) -> list:
        """paramiko's login, with the service request, userauth request and a session's open in
        one flight (RFC 4252: sshd handles each in order): two round trips saved. With
        OpenSSH, ``first_command``'s exec goes behind the open, to the channel number sshd
        will give it: one more round trip saved, and sshd's Nagle wait on the confirmation
        (it sets TCP_NODELAY at a session's first exec, which flushes what it held)."""
        done, self._ahead = threading.Event(), Future()
        if not self.remote_version.startswith("SSH-2.0-OpenSSH_"):
            self.first_command = None
        if self.first_command is not None:
            self._behind_open = _exec_request(_FIRST_CHANNEL, self.first_command)
        auth = self.auth_handler = paramiko.AuthHandler(self)
        auth._parse_service_accept = lambda _m: None  # type: ignore[method-assign] # see below
        auth.auth_publickey(username, key, done)  # sends the service request
        accept = paramiko.Message(struct.pack(">I", 12) + b"ssh-userauth")  # taken for granted:
        paramiko.AuthHandler._parse_service_accept(auth, accept)  # sends the userauth request
        threading.Thread(target=self._open_ahead, args=(self._ahead,), daemon=True).start()
        return auth.wait_for_response(done)

    def _open_ahead(self, ahead: Future[paramiko.Channel]) -> None:
        try:
            ahead.set_result(super().open_session(timeout=self.auth_timeout))
        except BaseException as e:
            # A command exec'd behind the open may have ended, and paramiko forgotten its
            # channel, before this thread looked for it: that channel is the result.
            if (chan := self._first_channel) is not None and chan.active:
                ahead.set_result(chan)
            else:  # the login failed, and the open with it
                ahead.set_exception(e)

    def _send_user_message(self, data: paramiko.Message) -> None:
        super()._send_user_message(data)
        if self._behind_open is not None and (raw := data.asbytes())[0] == MSG_CHANNEL_OPEN:
            behind, self._behind_open = self._behind_open, None
            super()._send_user_message(behind)
            opened = paramiko.Message(raw[1:])
            opened.get_string()  # the channel type
            self._first_channel = self._channels.get(opened.get_int())

    def take_first(self, command: str, timeout: float) -> paramiko.Channel | None:
        """See :func:`exec_ahead`."""
        with self.lock:
            if self.first_command != command or self._ahead is None:
                return None
            ahead, self._ahead, self.first_command = self._ahead, None, None
        chan = ahead.result(timeout)
        try:
            if chan.remote_chanid != _FIRST_CHANNEL:
                raise paramiko.SSHException(
                    f"sshd numbered the first channel {chan.remote_chanid}, not "
                    f"{_FIRST_CHANNEL} as OpenSSH does; set FLEXAI_SSH_PUBLIC_API_ONLY=1"
                )
            if not chan.event.wait(timeout):
                raise TimeoutError(f"no answer to the exec within {timeout:g} s")
            if not chan.event_ready:  # refused, or the connection ended
                raise self.get_exception() or paramiko.SSHException("Channel closed.")
        except BaseException:
            chan.close()
            raise
        return chan

    def open_session(self, *args: Any, **kwargs: Any) -> paramiko.Channel:
        """The session opened behind the login (unless a command was exec'd in it), else a new
        one (ssh.py's are all alike)."""
        with self.lock:
            ahead = None
            if self.first_command is None:
                ahead, self._ahead = self._ahead, None
        if ahead is not None:
            try:
                return ahead.result(kwargs.get("timeout"))
            except Exception:  # a channel opened now tells why; the late one is closed
                ahead.add_done_callback(lambda f: f.exception() or f.result().close())
        return super().open_session(*args, **kwargs)


def _exec_request(remote_chanid: int, command: str) -> paramiko.Message:
    """An ``exec`` channel request asking for an answer, as ``Channel.exec_command`` sends."""
    m = paramiko.Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(remote_chanid)
    m.add_string("exec")
    m.add_boolean(True)
    m.add_string(command)
    return m


class _Socket:
    """The TCP socket, read 256 KiB at a time into ``buf`` (handled up to ``pos``) and, until sshd
    sets TCP_NODELAY for the first session, acked at once (its reply waited ~40 ms for our ACK)."""

    def __init__(self, sock: socket.socket):
        self._sock, self.send, self.gettimeout = sock, sock.send, sock.gettimeout
        self.buf, self.pos, self.quickack = b"", 0, hasattr(socket, "TCP_QUICKACK")
        self.before_wait: Callable[[], None] = lambda: None

    def recv(self, n: int) -> bytes:
        if self.pos >= len(self.buf):
            self.buf, self.pos = self._read(), 0
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def fill(self, closed: Callable[[], bool]) -> None:
        """Read more; the end, or an error once closed, is an EOFError (as in ``read_all``)."""
        try:
            if not (data := self._read()):
                raise EOFError()
        except OSError:
            if closed():
                raise EOFError() from None
            raise
        self.buf, self.pos = self.buf[self.pos :] + data, 0

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
    """SFTPClient's requests sent without waiting (it waits for each answer but file data's)."""

    def __init__(self, sftp: paramiko.SFTPClient):
        self._sftp, self.read_answer = sftp, sftp._read_response
        self.handles: dict[int, bytes] = {}  # answers to opens, by request number
        self.pending: set[int] = set()
        self.failure: OSError | None = None

    def send(self, t: int, *args: object) -> int:
        self.pending.add(num := self._sftp._async_request(self, t, *args))
        return num

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        self.pending.discard(num)
        if t == CMD_HANDLE:
            self.handles[num] = msg.get_binary()
        elif t == CMD_STATUS:
            try:
                self._sftp._convert_status(msg)
            except OSError as e:  # EOFError is one; a status of EOF is not expected here
                self.failure = self.failure or e
