"""The experimental OpenSSH forwarder the bench compares the provisioner's tunnel with.

Not part of the package: the provisioner has no setting for it. ``bench --openssh`` swaps
it in for a session's :class:`~flexai_provisioner.tunnel.Tunnel` (see
:func:`bench.harness.use_openssh_when_labelled`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import paramiko


class OpenSSHTunnel:
    """The same fixed local ports as a Tunnel, forwarded by an OpenSSH client instead.

    One ``ssh`` ControlMaster per instance (its own connection, logged in with the kernel's
    key, the host key pinned to the one paramiko already verified against the platform)
    carries ``-L`` forwards that :meth:`retarget` replaces through the control socket. Bulk
    output then crosses a C process instead of this one: no Python, no GIL per message.
    The master runs a session (``cat`` on a pipe we hold) so that sshd sets TCP_NODELAY.

    Same interface as a Tunnel, plus :meth:`start` (spawn the master early, without
    waiting). Not the default: it needs the ``ssh`` binary and a private key file.
    """

    def __init__(
        self,
        names: list[str],
        ports: dict[str, int] | None = None,
        *,
        private_key: bytes,
        ssh_binary: str | None = None,
    ):
        self._ssh = ssh_binary or shutil.which("ssh") or "ssh"
        self._dir = tempfile.mkdtemp(prefix="flexai-ssh-")
        self._key_file = os.path.join(self._dir, "key")
        fd = os.open(self._key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_key)
        self._control = os.path.join(self._dir, "ctl")
        self._master: subprocess.Popen[bytes] | None = None
        self._destination: list[str] = []
        self._forwards: list[str] = []
        self._lock = threading.Lock()
        self.local_ports: dict[str, int] = {}
        # Held (bound, not listening, SO_REUSEADDR) until ssh listens on them itself, so
        # that nothing else takes them meanwhile; ssh's own bind uses SO_REUSEADDR too.
        self._held: list[socket.socket] = []
        for name in names:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", (ports or {}).get(name, 0)))
            except OSError:
                s.bind(("127.0.0.1", 0))
            self._held.append(s)
            self.local_ports[name] = s.getsockname()[1]

    def start(self, transport: paramiko.Transport) -> None:
        """Spawn the master for the instance ``transport`` reaches; returns at once."""
        with self._lock:
            if self._master is not None:
                return
            host, port = transport.getpeername()[:2]
            server_key = transport.get_remote_server_key()
            known_hosts = os.path.join(self._dir, "known_hosts")
            with open(known_hosts, "w") as f:
                f.write(f"[{host}]:{port} {server_key.get_name()} {server_key.get_base64()}\n")
            self._destination = [
                "-p",
                str(port),
                "-o",
                f"UserKnownHostsFile={known_hosts}",
                f"{transport.get_username()}@{host}",
            ]
            self._master = subprocess.Popen(
                [
                    *self._base(),
                    "-M",
                    "-o",
                    "ControlPersist=no",
                    "-o",
                    "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr",
                    "-o",
                    "ServerAliveInterval=5",
                    *self._destination,
                    "exec cat",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _base(self) -> list[str]:
        return [
            self._ssh,
            "-S",
            self._control,
            "-i",
            self._key_file,
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ]

    def _wait_master(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self._control):
            if self._master is None or self._master.poll() is not None:
                raise OSError("the OpenSSH master connection failed")
            if time.monotonic() > deadline:
                raise OSError("the OpenSSH master connection timed out")
            time.sleep(0.002)

    def _control_command(self, op: str, forwards: list[str]) -> None:
        if not forwards and op != "exit":
            return
        args = [a for spec in forwards for a in ("-L", spec)]
        subprocess.run(
            [*self._base(), "-O", op, *args, *self._destination],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=op == "forward",
            timeout=30,
        )

    def retarget(self, transport: paramiko.Transport, remote_ports: dict[str, int]) -> None:
        self.start(transport)
        with self._lock:
            self._wait_master()
            self._control_command("cancel", self._forwards)
            self._forwards = [
                f"127.0.0.1:{self.local_ports[name]}:127.0.0.1:{port}"
                for name, port in remote_ports.items()
                if name in self.local_ports
            ]
            self._control_command("forward", self._forwards)
            self._release()

    def _release(self) -> None:
        held, self._held = self._held, []
        for s in held:
            s.close()

    def preopen(self, transport: paramiko.Transport, remote_ports: dict[str, int]) -> None:
        """Nothing ahead: ssh's forwards open a channel per connection, as it comes."""

    def hold(self) -> None:
        """Nothing to do: ssh's forwards open a channel per connection whatever we do."""

    def disconnect(self) -> None:
        with self._lock:
            if self._master is not None:
                self._control_command("cancel", self._forwards)
            self._forwards = []

    def close(self) -> None:
        with self._lock:
            master, self._master = self._master, None
            self._forwards = []
            self._release()
        if master is not None:
            if os.path.exists(self._control):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    self._control_command("exit", [])
            with contextlib.suppress(OSError):
                master.kill()
            master.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
