"""One SSH connection to an instance: pinned host key, per-kernel key, tuned transport.

Everything here blocks; the provisioner calls it from worker threads, never from the
Jupyter event loop.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ._paramiko import (
    consumed,
    exec_ahead,
    grant,
    new_transport,
    send_data,
    session_started,
    set_sink,
)
from .errors import (
    FlexAIError,
    HostKeyMismatchError,
    SSHAuthenticationError,
    SSHChannelRefusedError,
    SSHError,
    SSHTimeoutError,
)
from .gpu_platform import SSHEndpoint

SFTPClient = paramiko.SFTPClient  # what open_sftp returns: its users need not import paramiko

__all__ = [
    "MAX_PACKET_SIZE",
    "TRANSPORT_LOG",
    "WINDOW_SIZE",
    "KeyPair",
    "SFTPClient",
    "SSHConnection",
    "close_quietly",
    "connect",
    "consumed",
    "errors_mapped",
    "fingerprint",
    "generate_keypair",
    "grant",
    "load_private_key",
    "open_forward",
    "send_data",
    "set_sink",
]

log = logging.getLogger(__name__)

# Large windows and packets keep bulk output (plots, dataframes) from stalling on
# window adjustments; sshd accepts packets up to 256 KiB.
WINDOW_SIZE = 8 * 1024 * 1024
MAX_PACKET_SIZE = 128 * 1024
TRANSPORT_LOG = "flexai_provisioner.ssh.transport"  # paramiko's messages about our transports


class _RefusedForwardsAreExpected(logging.Filter):
    """paramiko logs a refused ``direct-tcpip`` open as an ERROR. While a kernel restarts its
    ports refuse connections, and the tunnel parks them until the new kernel listens: that
    is routine, so it is logged at DEBUG instead of alarming the server log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "open FAILED" in str(record.msg):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger(TRANSPORT_LOG).addFilter(_RefusedForwardsAreExpected())


# The one mapping of paramiko's and the socket layer's failures onto errors.py; any other
# SSHException, OSError or EOFError (paramiko's word for "the connection closed") is an
# SSHError. A socket timeout is an OSError too: it comes first.
_FAMILIES: tuple[tuple[type[BaseException], type[SSHError]], ...] = (
    (TimeoutError, SSHTimeoutError),
    (paramiko.BadHostKeyException, HostKeyMismatchError),
    (paramiko.AuthenticationException, SSHAuthenticationError),
    (paramiko.ChannelException, SSHChannelRefusedError),
)


@contextlib.contextmanager
def errors_mapped(what: str, timeout: float | None = None) -> Iterator[None]:
    """The SSH layer's error boundary: paramiko's and the socket's failures in the block
    leave as the ``SSHError`` family, the message starting with ``what`` was being done."""
    try:
        yield
    except FlexAIError:
        raise
    except (paramiko.SSHException, EOFError, OSError) as e:
        family = next((family for cls, family in _FAMILIES if isinstance(e, cls)), SSHError)
        if family is SSHTimeoutError and timeout is not None:
            reason = f"no answer within {timeout:g} s"
        else:
            reason = str(e) or type(e).__name__
        raise family(f"{what}: {reason}") from e


@dataclass(frozen=True)
class KeyPair:
    """A private key (for paramiko) and its OpenSSH public line (for the platform)."""

    private_key: paramiko.PKey
    public_openssh: str
    private_openssh: bytes
    """OpenSSH PEM form, for a 0600 file that lets a restarted server reattach."""


def generate_keypair(comment: str = "flexai-kernel") -> KeyPair:
    """A fresh ed25519 key pair (paramiko cannot generate ed25519 keys itself)."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))
    return KeyPair(pkey, f"{public.decode()} {comment}", pem)


def load_private_key(path: str, passphrase: str | None = None) -> KeyPair:
    """Load a user-configured private key (any type paramiko reads).

    An encrypted key given no passphrase is used through ssh-agent instead, found there by
    its public half (``<path>.pub``), so its passphrase need not be configured anywhere.
    """
    password = passphrase.encode() if passphrase else None
    try:
        pem = Path(path).expanduser().read_bytes()
        # Positional: paramiko 5 renamed the argument (passphrase -> password).
        pkey = paramiko.PKey.from_path(path, password)
    except TypeError:  # cryptography: a passphrase missing, or given for a plain key
        if password is None:
            return _agent_key(path)
        raise SSHError(
            f"SSH key {path} is not encrypted: unset c.FlexAIProvisioner.ssh_key_passphrase"
        ) from None
    except (OSError, paramiko.SSHException, ValueError) as e:
        reason = "wrong c.FlexAIProvisioner.ssh_key_passphrase?" if password else str(e)
        raise SSHError(f"cannot read SSH key {path}: {reason}") from None
    return KeyPair(pkey, f"{pkey.get_name()} {pkey.get_base64()} flexai-user-key", pem)


def _agent_key(path: str) -> KeyPair:
    """The key ssh-agent holds for the encrypted key file ``path``, matched by its .pub."""
    public = Path(path + ".pub").expanduser()
    try:
        blob = public.read_text().split()[1]
    except (OSError, IndexError):
        blob = None
    for key in paramiko.Agent().get_keys() if blob else ():
        if key.get_base64() == blob:
            return KeyPair(key, f"{key.get_name()} {blob} flexai-user-key", b"")
    raise SSHError(
        f"SSH key {path} is encrypted: set c.FlexAIProvisioner.ssh_key_passphrase, or add the "
        f"key to ssh-agent (`ssh-add {path}`) and keep its public half at {public}"
    )


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint form (what `ssh-keygen -lf` prints)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _tune_socket(sock: socket.socket, keepalive_interval: float) -> None:
    """No Nagle delay for small kernel messages; let the OS drop a silently dead link."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    interval = max(1, int(keepalive_interval))
    probes = (("TCP_KEEPIDLE", interval), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", 3))
    for name, value in probes:
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        # Unacknowledged data (our keepalives) for this long aborts the connection, so a
        # dead network is noticed within a few keepalive intervals instead of ~15 minutes.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, interval * 3 * 1000)


class SSHConnection:
    """A paramiko transport to one instance, authenticated with one key.

    The host key is checked against the fingerprint the platform reported before any
    credential is sent; there is no known_hosts file and no trust on first use. Every
    method raises the :class:`~flexai_provisioner.errors.SSHError` family, never paramiko's.
    ``first_command``, the first :meth:`exec` expected, may be sent with the login.
    """

    def __init__(
        self,
        endpoint: SSHEndpoint,
        key: KeyPair,
        *,
        connect_timeout: float = 30.0,
        keepalive_interval: float = 5.0,
        first_command: str | None = None,
    ):
        self.endpoint = endpoint
        self._key = key
        self._first_command = first_command
        self._connect_timeout = connect_timeout
        self._keepalive_interval = keepalive_interval
        self._transport: paramiko.Transport | None = None
        self._where = f"{endpoint.user}@{endpoint.host}:{endpoint.port}"

    @property
    def transport(self) -> paramiko.Transport:
        if self._transport is None:
            raise SSHError("not connected")
        return self._transport

    def is_active(self) -> bool:
        return self._transport is not None and self._transport.is_active()

    def connect(self) -> None:
        """Open, verify and authenticate the transport."""
        ep, timeout = self.endpoint, self._connect_timeout
        with errors_mapped(f"cannot reach the instance's SSH server at {self._where}", timeout):
            sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
        with errors_mapped(f"SSH handshake with the instance at {ep.host}:{ep.port} failed"):
            try:
                _tune_socket(sock, self._keepalive_interval)
                transport = new_transport(
                    sock,
                    self._first_command,
                    default_window_size=WINDOW_SIZE,
                    default_max_packet_size=MAX_PACKET_SIZE,
                )
            except BaseException:
                sock.close()
                raise
            transport.set_log_channel(TRANSPORT_LOG)
            transport.banner_timeout = transport.auth_timeout = timeout
            try:
                self._handshake(transport)
                self._verify_host_key(transport)
                self._authenticate(transport)
            except BaseException:
                transport.close()
                raise
        # Blocking reads: no wake-up every 0.1 s per idle transport. That also silences
        # paramiko's own keepalives (sent from read timeouts); a dead link is found by TCP
        # keepalives with TCP_USER_TIMEOUT (_tune_socket) and by the session's agent pings.
        try:
            # The fd first: CPython's settimeout marks the socket blocking before the fd is,
            # and a read by the transport's thread in between fails with EAGAIN, ending it.
            os.set_blocking(sock.fileno(), True)
            sock.settimeout(None)
        except OSError as e:  # the transport's thread closed it: the link died meanwhile
            transport.close()
            raise SSHError(f"the SSH link to {self._where} closed right after the login") from e
        self._transport = transport

    def _handshake(self, transport: paramiko.Transport) -> None:
        """Key exchange, with a hung server reported as such (paramiko either raises at its
        banner timeout or returns quietly at its own, depending on which comes first)."""
        try:
            transport.start_client(timeout=self._connect_timeout)
        except (paramiko.SSHException, EOFError) as e:
            if "banner" not in str(e):
                raise
        if not transport.initial_kex_done:
            raise SSHTimeoutError(
                f"the SSH server at {self._where} did not complete the handshake within "
                f"{self._connect_timeout:g} s (no banner or key exchange); raise "
                "c.FlexAIProvisioner.ssh_connect_timeout if the instance is only slow"
            )

    def _verify_host_key(self, transport: paramiko.Transport) -> None:
        actual = fingerprint(transport.get_remote_server_key())
        expected = self.endpoint.host_key_fingerprint
        if not hmac.compare_digest(actual.encode(), expected.encode()):
            raise HostKeyMismatchError(
                f"host key of {self._where} is {actual} but the platform reported {expected}: "
                "refusing to connect (a man in the middle or a recycled address); "
                "the instance will be deleted"
            )

    def _authenticate(self, transport: paramiko.Transport) -> None:
        try:
            transport.auth_publickey(self.endpoint.user, self._key.private_key)
        except paramiko.AuthenticationException as e:
            if "timeout" in str(e):
                raise SSHTimeoutError(
                    f"the SSH server at {self._where} did not answer our login within "
                    f"{self._connect_timeout:g} s"
                ) from e
            if not transport.is_active():  # paramiko says "failed" for a link lost mid-login too
                raise SSHError(f"the SSH link to {self._where} closed during the login") from e
            raise SSHAuthenticationError(
                f"the instance at {self._where} refused our SSH key: the platform did not "
                "authorise the key it was given"
            ) from None

    def _open_session(self, timeout: float) -> paramiko.Channel:
        return self.transport.open_session(
            window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE, timeout=timeout
        )

    def exec(self, command: str) -> paramiko.Channel:
        """Start ``command`` on a new session channel and return the channel."""
        timeout = self._connect_timeout
        with errors_mapped(f"cannot start a command on {self._where}", timeout):
            chan = exec_ahead(self.transport, command, timeout)
            if chan is None:
                chan = self._open_session(timeout)
                try:
                    chan.exec_command(command)
                except BaseException:
                    chan.close()
                    raise
        session_started(self.transport)
        return chan

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, bytes]:
        """Run a short command to completion; return its exit status and combined output."""
        chan = self.exec(command)
        try:
            with errors_mapped(f"the command on {self._where} did not finish", timeout):
                chan.settimeout(timeout)
                chan.set_combine_stderr(True)
                chan.shutdown_write()
                out = bytearray()
                while data := chan.recv(65536):
                    out += data
                return chan.recv_exit_status(), bytes(out)
        finally:
            chan.close()

    def open_sftp(self, timeout: float = 30.0) -> paramiko.SFTPClient:
        """An SFTP session on this connection's transport (a channel, not a second login);
        each of its requests fails with ``TimeoutError`` after ``timeout`` seconds."""
        with errors_mapped("no SFTP session on the instance", timeout):
            chan = self._open_session(timeout)
            try:
                chan.settimeout(timeout)
                chan.invoke_subsystem("sftp")
                return paramiko.SFTPClient(chan)
            except BaseException:
                chan.close()
                raise

    def close(self) -> None:
        if self._transport is not None:
            # Closing a socket does not wake a thread blocked reading it (nor send a FIN
            # while that read holds it); shutting it down does both, so the transport's
            # thread ends now instead of when the peer next sends or TCP gives up.
            with contextlib.suppress(OSError):
                self._transport.sock.shutdown(socket.SHUT_RDWR)
            self._transport.close()


def open_forward(
    transport: paramiko.Transport, port: int, peer: tuple[str, int], timeout: float
) -> paramiko.Channel:
    """A ``direct-tcpip`` channel to ``port`` on the instance for a local client at ``peer``;
    :class:`~flexai_provisioner.errors.SSHChannelRefusedError` if nothing listens there."""
    with errors_mapped(f"cannot open a channel to port {port} on the instance", timeout):
        return transport.open_channel("direct-tcpip", ("127.0.0.1", port), peer, timeout=timeout)


def close_quietly(chan: paramiko.Channel) -> None:
    """Close ``chan``; closing fails only if its connection is gone, with nothing to tell."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        chan.close()


def connect(endpoint: SSHEndpoint, key: KeyPair, **kwargs: Any) -> SSHConnection:
    """A connected :class:`SSHConnection` (``kwargs`` as its constructor's)."""
    conn = SSHConnection(endpoint, key, **kwargs)
    conn.connect()
    return conn
