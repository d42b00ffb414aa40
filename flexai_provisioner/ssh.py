"""One SSH connection to an instance: pinned host key, per-kernel key, tuned transport.

Everything here blocks; the provisioner calls it from worker threads, never from the
Jupyter event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .errors import HostKeyMismatchError, SSHAuthenticationError, SSHError
from .platform import SSHEndpoint

log = logging.getLogger(__name__)

# Large windows and packets keep bulk output (plots, dataframes) from stalling on
# window adjustments; sshd accepts packets up to 256 KiB.
WINDOW_SIZE = 8 * 1024 * 1024
MAX_PACKET_SIZE = 128 * 1024


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
    """Load a user-configured private key (any type paramiko reads)."""
    try:
        pem = Path(path).expanduser().read_bytes()
        pkey = paramiko.PKey.from_path(path, password=passphrase)
    except paramiko.PasswordRequiredException as e:
        raise SSHError(
            f"SSH key {path} is encrypted: set c.FlexAIProvisioner.ssh_key_passphrase "
            "or load it into ssh-agent and leave ssh_key_file unset"
        ) from e
    except (OSError, paramiko.SSHException, ValueError) as e:
        raise SSHError(f"cannot read SSH key {path}: {e}") from e
    return KeyPair(pkey, f"{pkey.get_name()} {pkey.get_base64()} flexai-user-key", pem)


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
    credential is sent; there is no known_hosts file and no trust on first use.
    """

    def __init__(
        self,
        endpoint: SSHEndpoint,
        key: KeyPair | None,
        *,
        connect_timeout: float = 30.0,
        keepalive_interval: float = 5.0,
        use_agent: bool = True,
    ):
        self.endpoint = endpoint
        self._key = key
        self._connect_timeout = connect_timeout
        self._keepalive_interval = keepalive_interval
        self._use_agent = use_agent
        self._transport: paramiko.Transport | None = None

    @property
    def transport(self) -> paramiko.Transport:
        if self._transport is None:
            raise SSHError("not connected")
        return self._transport

    def is_active(self) -> bool:
        return self._transport is not None and self._transport.is_active()

    def connect(self) -> None:
        """Open, verify and authenticate the transport; raise a typed SSHError otherwise."""
        ep = self.endpoint
        where = f"{ep.user}@{ep.host}:{ep.port}"
        try:
            sock = socket.create_connection((ep.host, ep.port), timeout=self._connect_timeout)
        except OSError as e:
            raise SSHError(f"cannot reach the instance's SSH server at {where}: {e}") from e
        _tune_socket(sock, self._keepalive_interval)
        transport = paramiko.Transport(
            sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
        )
        transport.banner_timeout = self._connect_timeout
        transport.auth_timeout = self._connect_timeout
        try:
            transport.start_client(timeout=self._connect_timeout)
            self._verify_host_key(transport, where)
            self._authenticate(transport, where)
        except BaseException:
            transport.close()
            raise
        sock.settimeout(None)
        transport.set_keepalive(max(1, int(self._keepalive_interval)))
        self._transport = transport

    def _verify_host_key(self, transport: paramiko.Transport, where: str) -> None:
        actual = fingerprint(transport.get_remote_server_key())
        expected = self.endpoint.host_key_fingerprint
        if not hmac.compare_digest(actual.encode(), expected.encode()):
            raise HostKeyMismatchError(
                f"host key of {where} is {actual} but the platform reported {expected}: "
                "refusing to connect (a man in the middle or a recycled address); "
                "the instance will be deleted"
            )

    def _authenticate(self, transport: paramiko.Transport, where: str) -> None:
        keys: list[paramiko.PKey] = [self._key.private_key] if self._key else []
        if self._use_agent and not keys:
            keys = list(paramiko.Agent().get_keys())
        if not keys:
            raise SSHAuthenticationError(f"no SSH key to log in to {where} with")
        for pkey in keys:
            try:
                transport.auth_publickey(self.endpoint.user, pkey)
                return
            except paramiko.AuthenticationException:
                continue
        raise SSHAuthenticationError(
            f"the instance at {where} refused our SSH key: the platform did not authorise "
            "the key it was given"
        )

    def exec(self, command: str) -> paramiko.Channel:
        """Start ``command`` on a new session channel and return the channel."""
        chan = self.transport.open_session(
            window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE, timeout=self._connect_timeout
        )
        chan.exec_command(command)
        return chan

    def run(self, command: str, stdin: bytes = b"", timeout: float = 30.0) -> tuple[int, bytes]:
        """Run a short command to completion; return its exit status and combined output."""
        chan = self.exec(command)
        try:
            chan.settimeout(timeout)
            chan.set_combine_stderr(True)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out = bytearray()
            while data := chan.recv(65536):
                out += data
            return chan.recv_exit_status(), bytes(out)
        except TimeoutError as e:
            raise SSHError(f"command on the instance did not finish within {timeout:g}s") from e
        finally:
            chan.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def connect(endpoint: SSHEndpoint, key: KeyPair | None, **kwargs: object) -> SSHConnection:
    """Connect, mapping paramiko's and the socket layer's failures onto :class:`SSHError`."""
    conn = SSHConnection(endpoint, key, **kwargs)  # type: ignore[arg-type]
    try:
        conn.connect()
    except SSHError:
        raise
    except (paramiko.SSHException, OSError, EOFError) as e:
        where = f"{endpoint.host}:{endpoint.port}"
        reason = str(e) or type(e).__name__
        raise SSHError(f"SSH handshake with the instance at {where} failed: {reason}") from e
    return conn
