"""An instance's SSH endpoint: a real OpenSSH sshd on loopback, or a silent stand-in.

sshd runs under a tiny subreaper init (``_subreaper.py``) in its own session, with a config
that authorises exactly one key and gives every session the instance's environment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import procs
from .errors import EmulatorError
from .sockets import accepted, close_now

SSHD_MISSING = "sshd not found: install OpenSSH server, e.g. `apt-get install openssh-server`"
_SUBREAPER = str(Path(__file__).with_name("_subreaper.py"))
_POLL = 0.001  # sshd is up ~30 ms after its start; waiting is reading one small file
_START_ATTEMPTS = 3


def find_sshd(path: str | None = None) -> str:
    """The absolute path of the sshd to run, or EmulatorError saying how to install it."""
    candidate = path or shutil.which("sshd") or "/usr/sbin/sshd"
    if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
        raise EmulatorError(f"{SSHD_MISSING} (looked for {candidate})")
    return os.path.abspath(candidate)  # sshd re-executes itself and insists on an absolute path


def ensure_privsep_dir() -> None:
    """As root, sshd needs its privilege separation directory, which only its service creates."""
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        os.chmod("/run/sshd", 0o755)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quote(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise EmulatorError(f"cannot put a line break into sshd_config: {value!r}")
    if not any(c.isspace() or c in "\"'\\#" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sshd_config(
    *,
    port: int,
    host_key: Path,
    authorized_keys: Path,
    pid_file: Path,
    user: str,
    session_env: dict[str, str],
) -> str:
    """A self-contained sshd_config: nothing from /etc/ssh, one key, one user, loopback only."""
    setenv = " ".join(_quote(f"{name}={value}") for name, value in session_env.items())
    lines = [
        "ListenAddress 127.0.0.1",
        f"Port {port}",
        f"HostKey {_quote(str(host_key))}",
        f"PidFile {_quote(str(pid_file))}",
        # "%" would be expanded as a token (%h, %u) in this keyword.
        f"AuthorizedKeysFile {_quote(str(authorized_keys).replace('%', '%%'))}",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        f"AllowUsers {user}",
        "AllowTcpForwarding yes",
        "X11Forwarding no",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        "Subsystem sftp internal-sftp",
        f"SetEnv {setenv}",
    ]
    return "\n".join(lines) + "\n"


class _PortTaken(Exception):
    """Another process bound the port between our probe and sshd's bind."""


class SSHDProcess:
    """A running sshd (under its init) serving one instance on ``127.0.0.1:port``."""

    def __init__(self, instance_id: str, init: subprocess.Popen[bytes], port: int):
        self.instance_id = instance_id
        self.init = init
        self.port = port

    def stop(self, grace: float = 3.0) -> None:
        """Stop sshd and everything started through it, detached processes included."""
        procs.terminate(self.instance_id, self.init, grace)


def start_sshd(
    *,
    sshd_path: str,
    instance_id: str,
    directory: Path,
    host_key: Path,
    authorized_keys: Path,
    user: str,
    session_env: dict[str, str],
    lifeline: int,
    timeout: float = 10.0,
) -> SSHDProcess:
    """Start sshd for an instance and return once it listens.

    ``lifeline`` is the read end of a pipe the caller keeps the write end of: when that
    closes (the emulator died), the instance's init kills everything beneath it.
    """
    sshd_path = find_sshd(sshd_path)
    ensure_privsep_dir()
    config, log, pid_file = (directory / name for name in ("sshd_config", "sshd.log", "sshd.pid"))
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        procs.ENV_VAR: instance_id,
    }
    for _ in range(_START_ATTEMPTS):
        port = free_port()
        config.write_text(
            sshd_config(
                port=port,
                host_key=host_key,
                authorized_keys=authorized_keys,
                pid_file=pid_file,
                user=user,
                session_env=session_env,
            )
        )
        pid_file.unlink(missing_ok=True)  # a failed attempt's must not look like success
        with open(log, "ab") as log_file:
            init = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    _SUBREAPER,
                    str(lifeline),
                    sshd_path,
                    "-D",
                    # Each connection is served by a fork, not a re-exec of sshd, which would
                    # load its ~25 libraries and config again (~8 ms of every SSH login here).
                    # OpenSSH 9.8+ (sshd-session) always execs and logs -r as deprecated.
                    "-r",
                    "-E",
                    str(log),
                    "-f",
                    str(config),
                ],
                env=env,
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
                pass_fds=(lifeline,),
            )
        server = SSHDProcess(instance_id, init, port)
        try:
            _wait_ready(init, pid_file, log, time.monotonic() + timeout)
        except _PortTaken:
            server.stop()
            continue
        except BaseException:
            server.stop()
            raise
        return server
    raise EmulatorError(f"sshd could not bind a free port in {_START_ATTEMPTS} attempts")


def _log_tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(init: subprocess.Popen[bytes], pid_file: Path, log: Path, deadline: float) -> None:
    """Until sshd writes its pid file, which it does once its listening socket is bound (so
    no probe connection, which would cost sshd a fork for nothing); fail fast if it exits."""
    while time.monotonic() < deadline:
        if init.poll() is not None:
            tail = _log_tail(log)
            if "Address already in use" in tail:
                raise _PortTaken
            raise EmulatorError(f"sshd exited with status {init.returncode}: {tail}")
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text()) > 0:  # ValueError while it is still being written
                return
        time.sleep(_POLL)
    raise EmulatorError(f"sshd did not start listening in time: {_log_tail(log)}")


class BannerHang:
    """Stand-in for sshd under the ``banner_hang`` fault: accepts TCP and never says a word."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="banner-hang", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        for conn in accepted(self._listener):
            with self._lock:
                if self._stopped:
                    conn.close()
                    return
                self._connections.append(conn)

    def stop(self, grace: float = 3.0) -> None:
        with self._lock:
            self._stopped = True
            connections, self._connections = self._connections, []
        for sock in [self._listener, *connections]:
            close_now(sock)
        self._thread.join(grace)
