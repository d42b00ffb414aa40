"""The kernel process on the instance, as seen through its agent's SSH channel.

The agent (:mod:`flexai_provisioner.remote_agent`) starts or adopts the kernel and stays on
a session channel, so liveness costs no round trip: the agent's exit report arrives in the
channel's buffer, and :meth:`RemoteKernel.poll` only looks there. Signals travel as a line
on the same channel. Keeping a session channel open also makes sshd set TCP_NODELAY on its
side, which removes ~40 ms stalls from the forwarded kernel messages.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from importlib import resources

import paramiko

from .errors import KernelLaunchError
from .ssh import SSHConnection, errors_mapped

UNKNOWN_EXIT = -1  # the kernel died while we were not watching; its status is lost


def _agent_command(python: str, mode: str) -> str:
    files = ("remote_fork.py", "remote_agent.py") if mode == "preload" else ("remote_agent.py",)
    source = "\n".join(resources.files(__package__).joinpath(f).read_text() for f in files)
    # -I -S: no site-packages, no home directory on sys.path (faster, and unshadowable);
    # except to preload ipykernel, which must import as a kernel would.
    isolate = "" if mode == "preload" else " -I -S"
    return f"{shlex.quote(python)}{isolate} -c {shlex.quote(source)} {mode}"


class Standby:
    """An agent started ahead of need: it listens on the next kernel's ports (:attr:`ports`)
    and imports ipykernel, then waits for the kernel's spec and forks it from itself. A
    start or restart that finds one saves the channel open, the exec and the kernel's
    imports (two round trips and ~0.3 s), and its forwards can open while it imports."""

    def __init__(self, chan: paramiko.Channel, ports: dict[str, int], buf: bytes = b""):
        self._chan: paramiko.Channel | None = chan
        self.ports = ports
        self._buf = buf

    @staticmethod
    def command(python: str, after: int | None = None) -> str:
        """What :meth:`open` execs (for :class:`SSHConnection`'s ``first_command``)."""
        return _agent_command(python, "preload") + ("" if after is None else f" {after:d}")

    @classmethod
    def open(
        cls, conn: SSHConnection, python: str, after: int | None = None, timeout: float = 30.0
    ) -> Standby:
        """Start one, and read the ports it listens on. With ``after`` (a kernel that was just
        launched), it imports only once that process has settled, so as not to compete with
        its start for the instance's CPU, or at once if its kernel is asked for first."""
        chan = conn.exec(cls.command(python, after))
        try:
            with errors_mapped("the standby kernel agent's channel failed"):
                line, rest = _read_line(chan, timeout)
            if line is None:
                raise KernelLaunchError(f"the standby kernel agent exited: {_drain_stderr(chan)}")
            return cls(chan, json.loads(line)["ports"], rest)
        except BaseException:
            chan.close()
            raise

    def take(self) -> tuple[paramiko.Channel, bytes] | None:
        """Its channel and what it read past the ports, once, if the agent is still there
        to read a spec."""
        chan, self._chan = self._chan, None
        if chan is None or chan.closed or chan.eof_received or chan.exit_status_ready():
            return None
        return chan, self._buf

    def close(self) -> None:
        """Unused: its agent reads the end of its input and leaves."""
        chan, self._chan = self._chan, None
        if chan is not None:
            chan.close()


class RemoteKernel:
    """A kernel process on the instance and the agent channel watching it."""

    def __init__(
        self, chan: paramiko.Channel, pid: int, ports: dict[str, int], workdir: str, buf: bytes
    ):
        self.pid = pid
        self.ports = ports
        self.workdir = workdir
        self._chan = chan
        self._buf = buf
        self.exit_status: int | None = None
        self.last_heard = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def launch(
        cls,
        conn: SSHConnection,
        *,
        python: str,
        argv: list[str],
        connection: dict[str, object],
        env: dict[str, str],
        timeout: float,
        cwd: str | None = None,
        standby: Standby | None = None,
    ) -> RemoteKernel:
        """Start ``argv`` on the instance with a connection file holding ``connection``, in
        ``cwd`` (default: the instance's home directory), through ``standby`` if it is still
        usable, else through a new agent.

        The HMAC key travels on the channel's stdin, never on a command line.
        """
        spec = {"argv": argv, "env": env, "connection": connection, "timeout": timeout}
        if cwd:
            spec["cwd"] = cwd
        chan, buf = (standby.take() if standby is not None else None) or (None, b"")
        chan, first, rest = cls._start_agent(conn, python, "launch", spec, timeout, chan, buf)
        if "error" in first:
            chan.close()
            raise KernelLaunchError(f"the instance could not start the kernel: {first['error']}")
        workdir = first["connection_file"].rsplit("/", 1)[0]
        return cls(chan, first["pid"], first["ports"], workdir, rest)

    @classmethod
    def attach(
        cls,
        conn: SSHConnection,
        *,
        python: str,
        pid: int,
        ports: dict[str, int],
        workdir: str,
        timeout: float,
    ) -> RemoteKernel:
        """Watch an already running kernel again (after a reconnect or a server restart)."""
        spec = {"pid": pid, "workdir": workdir}
        chan, first, rest = cls._start_agent(conn, python, "attach", spec, timeout)
        kernel = cls(chan, pid, ports, workdir, rest)
        if "exit" in first:
            kernel.exit_status = UNKNOWN_EXIT
        return kernel

    @staticmethod
    def _start_agent(
        conn: SSHConnection,
        python: str,
        mode: str,
        spec: dict[str, object],
        timeout: float,
        chan: paramiko.Channel | None = None,
        buf: bytes = b"",
    ) -> tuple[paramiko.Channel, dict, bytes]:
        """Give ``spec`` to a new agent in ``mode`` (or to the one already on ``chan``, which
        sent ``buf`` so far) and read its first report."""
        if chan is None:
            chan = conn.exec(_agent_command(python, mode))
        try:
            with errors_mapped("the kernel agent's channel failed"):
                chan.sendall(json.dumps(spec).encode() + b"\n")
                line, rest = _read_line(chan, timeout, buf)
            if line is None:
                err = _drain_stderr(chan)
                status = chan.recv_exit_status() if chan.exit_status_ready() else None
                raise KernelLaunchError(
                    f"the kernel agent on the instance exited (status {status}) before "
                    f"reporting: {err or 'no output'}; check that {python!r} exists there"
                )
            return chan, json.loads(line), rest
        except BaseException:
            chan.close()
            raise

    def poll(self) -> int | None:
        """The kernel's exit status if the agent has reported one, without a round trip."""
        with self._lock:  # the event loop polls while the supervisor thread pings
            if self.exit_status is None:
                while self._chan.recv_ready():
                    self._buf += self._chan.recv(65536)
                self._parse()
            return self.exit_status

    def ping(self) -> None:
        """Ask the agent for an answer; :attr:`last_heard` moves when it (or anything) comes."""
        with errors_mapped("cannot ping the kernel agent"):
            self._chan.sendall(b'{"ping": 1}\n')

    def _parse(self) -> None:
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self.last_heard = time.monotonic()
            msg = json.loads(line)
            if "exit" in msg:
                status = msg["exit"]
                self.exit_status = UNKNOWN_EXIT if status is None else status

    @property
    def watching(self) -> bool:
        """Whether the agent channel is still open (False after the connection dropped)."""
        return not self._chan.closed and not self._chan.eof_received

    def signal(self, signum: int) -> None:
        """Signal the kernel's process group on the instance."""
        with errors_mapped(f"cannot send signal {signum} to the kernel"):
            self._chan.sendall(json.dumps({"signal": int(signum)}).encode() + b"\n")

    def wait_exit(self, timeout: float) -> int | None:
        """Block until the agent reports the kernel's exit, the channel closes, or ``timeout``.

        Reads only through :meth:`poll`, so that lines never interleave with the other
        threads reading the channel; the exit report takes milliseconds, so a short
        polling interval costs nothing.
        """
        deadline = time.monotonic() + timeout
        while self.poll() is None and self.watching and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.poll()

    def detach(self) -> None:
        """Close the agent channel; the kernel itself keeps running."""
        self._chan.close()


def _read_line(
    chan: paramiko.Channel, timeout: float, buf: bytes = b""
) -> tuple[bytes | None, bytes]:
    chan.settimeout(timeout)
    try:
        while b"\n" not in buf:
            data = chan.recv(65536)
            if not data:
                return None, b""
            buf += data
    except TimeoutError as e:
        raise KernelLaunchError(
            f"the kernel agent on the instance did not answer within {timeout:g}s"
        ) from e
    finally:
        chan.settimeout(None)
    line, rest = buf.split(b"\n", 1)
    return line, rest


def _drain_stderr(chan: paramiko.Channel) -> str:
    out = b""
    while chan.recv_stderr_ready():
        out += chan.recv_stderr(65536)
    return out.decode(errors="replace").strip()[-500:]
