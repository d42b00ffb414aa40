"""How one kernel on a running instance is reached, and kept reachable.

:class:`KernelLink` holds the SSH connection to the instance, the local ports relayed over
it, the remote kernel and the next kernel's standby agent. The supervisor's ticks watch the
link through the kernel's agent; a dead link is replaced, and the kernel re-adopted, while
the platform says the instance runs, until ``reconnect_timeout`` gives it up as lost. The
kernel's :class:`~flexai_provisioner.session.InstanceSession` adds what owns the instance
(provisioning, lease, workspace, persistence, deletion). Every method may block on the
network and runs in a worker thread.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Protocol

from . import executor, supervisor
from .config import SessionSettings
from .errors import FlexAIError, NotFoundError, StartCancelledError
from .gpu_platform import Instance, InstanceState, Platform
from .kernel_key import KernelKey
from .remote_kernel import RemoteKernel, Standby
from .ssh import SSHConnection, connect
from .tunnel import Tunnel

PORT_NAMES = ["shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"]


class Phase(Protocol):
    """Reports a start's phase by name, with an optional detail ("12.3 MB in 40 files")."""

    def __call__(self, name: str, message: str = "") -> None: ...


class KernelLink:
    """The SSH link to one instance and the kernel over it."""

    def __init__(
        self,
        platform: Platform,
        key: KernelKey,
        settings: SessionSettings,
        log: logging.Logger,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.platform = platform
        self.key = key
        self.settings = settings
        self.log = log
        self.on_lost = on_lost  # told why the instance cannot be reached again, once
        self.instance: Instance | None = None
        self.conn: SSHConnection | None = None
        self.tunnel: Tunnel | None = None
        self.kernel: RemoteKernel | None = None
        self._standby: Future[Standby] | None = None  # the next kernel's agent, preloading
        self._standby_lock = threading.Lock()  # launches and reconnects start it, teardown drops it
        self.lost_reason: str | None = None  # set when the instance cannot be reached again
        self._cancelled = threading.Event()  # set to abandon a start or a reconnect
        self._reconnecting = False
        self.reconnects = 0  # links replaced after a loss
        self._next_ping = 0.0
        self._closed = False  # set by the owner's teardown: nothing is reconnected after it
        # Held while a start step runs, so teardown waits for an in-flight POST or SSH
        # connect to land (and then deletes what it made) instead of racing it.
        self._start_step = threading.Lock()

    def listen(self, ports: dict[str, int] | None = None) -> dict[str, int]:
        """Open the local ports the kernel will be reached on; return them by name.

        Without ``ports``, free ones are picked. With them (a frontend that chose the ports
        itself), exactly those, or :class:`LocalPortError`. Connections that arrive before the
        kernel runs wait for it rather than being refused.
        """
        if self.tunnel is None:
            self.tunnel = Tunnel(PORT_NAMES, ports, exact=ports is not None)
        return self.local_ports

    def connect(self, phase: Phase) -> dict[str, int]:
        """Open the SSH connection, and the local ports unless :meth:`listen` did; return
        the ports by name."""
        phase("connecting")
        with self._start_step:
            self._check_cancelled()
            # The standby agent's exec goes with the login (_prepare_standby runs it next).
            first = Standby.command(self.settings.remote_python)
            self.conn = self._connect(first if self.settings.preload_kernel else None)
            self.listen()
        self._prepare_standby()
        self._check_cancelled()
        return self.local_ports

    def _check_cancelled(self) -> None:
        """Between start steps: stop if the start was cancelled (what exists is torn down)."""
        if self._cancelled.is_set():
            raise StartCancelledError("kernel start cancelled")

    def _connect(self, first_command: str | None = None) -> SSHConnection:
        assert self.instance is not None and self.instance.ssh is not None
        return connect(
            self.instance.ssh,
            self.key.pair,
            connect_timeout=self.settings.ssh_connect_timeout,
            keepalive_interval=self.settings.ssh_keepalive_interval,
            first_command=first_command,
        )

    def _launch(
        self,
        argv: list[str],
        connection_info: Mapping[str, Any],
        env: dict[str, str],
        cwd: str | None,
    ) -> None:
        """Start a kernel on the instance in ``cwd`` and point the local ports at it.

        Of ``connection_info`` the kernel gets the key, signature scheme and kernel name;
        the instance picks its own ports.
        """
        assert self.conn is not None and self.tunnel is not None
        key = connection_info.get("key", "")
        self._prepare_standby()  # unless there is one: a restart forks from one
        standby = self._take_standby()
        if standby is not None:  # its ports listen already: the forwards open meanwhile
            self.tunnel.preopen(self.conn.transport, standby.ports)
        self.kernel = RemoteKernel.launch(
            self.conn,
            python=self.settings.remote_python,
            argv=argv,
            connection={
                "key": key.decode() if isinstance(key, bytes) else key,
                "signature_scheme": connection_info.get("signature_scheme", "hmac-sha256"),
                "kernel_name": connection_info.get("kernel_name", ""),
            },
            env=env,
            timeout=self.settings.launch_timeout,
            cwd=cwd,
            standby=standby,
        )
        self.tunnel.retarget(self.conn.transport, self.kernel.ports)
        # For the next restart: it imports once this kernel has started (see Standby).
        self._prepare_standby(after=self.kernel.pid)

    def _prepare_standby(self, after: int | None = None) -> None:
        """Start the next kernel's agent in the background, preloading ipykernel once the
        process ``after`` (if any) has settled."""
        conn, python = self.conn, self.settings.remote_python
        with self._standby_lock:
            if not self.settings.preload_kernel or conn is None or self._standby is not None:
                return
            self._standby = executor.submit(lambda: Standby.open(conn, python, after=after))

    def _take_standby(self) -> Standby | None:
        """The standby, once it is open, if opening it worked (else a new agent does)."""
        with self._standby_lock:
            future, self._standby = self._standby, None
        if future is None:
            return None
        try:
            return future.result(self.settings.launch_timeout)
        except Exception as e:  # the launch through a new agent reports what is wrong
            self.log.debug("no standby kernel agent: %s", e)
            return None

    def _drop_standby(self) -> None:
        """Close the standby's channel, now or once it is open: its agent then leaves."""
        with self._standby_lock:
            future, self._standby = self._standby, None
        if future is not None:
            future.add_done_callback(_close_standby)

    def _close_link(self) -> None:
        """Let go of the kernel (without stopping it), its standby, local ports and SSH link."""
        if self.kernel is not None:
            self.kernel.detach()
            self.kernel = None
        self._drop_standby()
        if self.tunnel is not None:
            self.tunnel.close()
        if self.conn is not None:
            self.conn.close()

    def _attach(self, pid: int, ports: dict[str, int], workdir: str) -> None:
        assert self.conn is not None and self.tunnel is not None
        self.kernel = RemoteKernel.attach(
            self.conn,
            python=self.settings.remote_python,
            pid=pid,
            ports=ports,
            workdir=workdir,
            timeout=self.settings.launch_timeout,
        )
        self.tunnel.retarget(self.conn.transport, ports)

    # -- running -------------------------------------------------------------------------

    @property
    def instance_id(self) -> str | None:
        return self.instance.id if self.instance is not None else None

    @property
    def local_ports(self) -> dict[str, int]:
        """The five local ports by connection-file name (empty before :meth:`listen`)."""
        return dict(self.tunnel.local_ports) if self.tunnel is not None else {}

    @property
    def has_kernel(self) -> bool:
        return self.kernel is not None

    @property
    def remote_pid(self) -> int | None:
        """The kernel's process id on the instance."""
        return self.kernel.pid if self.kernel is not None else None

    def signal(self, signum: int) -> None:
        """Signal the kernel's process group on the instance (nothing if it is not watched, or
        the link is down: a lost kernel is gone with its instance)."""
        kernel = self.kernel
        if kernel is not None and kernel.watching and self.connected:
            kernel.signal(signum)

    def expect_kernel_exit(self) -> None:
        """The kernel was asked to shut down or killed: its ports are about to close."""
        if self.tunnel is not None:
            self.tunnel.hold()

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.is_active() and not self._reconnecting

    def kernel_status(self) -> int | None:
        """The kernel's exit status, or None while it runs (or while we reconnect to it)."""
        if self.lost_reason is not None:
            return 1
        if self.kernel is None:
            return 0
        return self.kernel.poll()

    def _watch_link(self, now: float) -> None:
        """Supervisor work: ping the agent when due; replace a dead link. Must not block."""
        self._check_link(now)
        if (
            self.conn is not None
            and not self.conn.is_active()
            and not self._reconnecting
            and self.lost_reason is None
        ):
            self._reconnecting = True
            if self.tunnel is not None:
                self.tunnel.disconnect()
            executor.submit(self._reconnect)

    def _check_link(self, now: float) -> None:
        """Ping the agent each keepalive interval; a link silent for three is dead.

        TCP keepalives only prove the peer's kernel acknowledges; an answer from the agent
        proves the whole path (a hung sshd, a stopped instance, a black-holed route).
        """
        kernel, conn = self.kernel, self.conn
        if kernel is None or conn is None or not conn.is_active() or self._reconnecting:
            return
        if kernel.poll() is not None or not kernel.watching:
            return  # the agent left with its kernel: nothing is there to answer
        interval = self.settings.ssh_keepalive_interval
        if now - kernel.last_heard > 3 * interval:
            self.log.warning(
                "no answer from instance %s for %.0f s: treating the SSH link as dead",
                self.instance.id if self.instance else "?",
                now - kernel.last_heard,
            )
            conn.close()  # the reconnect below takes over
        elif now >= self._next_ping:
            self._next_ping = now + interval
            executor.submit(kernel.ping)

    def _reconnect(self) -> None:
        """Reach the instance again and re-adopt the kernel, with backoff, until a deadline."""
        assert self.instance is not None
        kernel = self.kernel
        self.log.warning("SSH connection to instance %s lost; reconnecting", self.instance.id)
        deadline = time.monotonic() + self.settings.reconnect_timeout
        delay = 0.2
        last_error: Exception | None = None
        try:
            while not self._cancelled.is_set() and not self._closed:
                try:
                    try:
                        self.instance = self.platform.get_instance(self.instance.id)
                    except NotFoundError:
                        self.lost_reason = f"instance {self.instance.id} no longer exists"
                        break
                    if self.instance.state is not InstanceState.RUNNING:
                        self.lost_reason = (
                            f"instance {self.instance.id} is {self.instance.state.value}"
                            f"{': ' + self.instance.message if self.instance.message else ''}"
                        )
                        break
                    conn = self._connect()
                    old, self.conn = self.conn, conn
                    self._drop_standby()
                    if old is not None:
                        old.close()
                    if kernel is not None:
                        self._attach(kernel.pid, kernel.ports, kernel.workdir)
                    self._prepare_standby()
                    self.reconnects += 1
                    self.log.info("reconnected to instance %s", self.instance.id)
                    return
                except FlexAIError as e:  # the SSH layer maps all of paramiko's
                    last_error = e
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.lost_reason = (
                        f"instance {self.instance.id} unreachable for "
                        f"{self.settings.reconnect_timeout:g} s ({last_error}); raise "
                        "c.FlexAIProvisioner.reconnect_timeout to wait longer"
                    )
                    break
                self._cancelled.wait(min(remaining, delay * (1 + random.random())))
                delay = min(delay * 2, 5.0)
            if self.lost_reason:
                self.log.error("kernel on FlexAI is lost: %s", self.lost_reason)
                if self.on_lost is not None:
                    self.on_lost(self.lost_reason)
        finally:
            self._reconnecting = False

    def reusable(self) -> bool:
        """Whether a restart can keep this instance: it is not lost, once any reconnect that is
        due or under way has ended (bounded by ``reconnect_timeout``)."""
        deadline = time.monotonic() + self.settings.reconnect_timeout + 5 * supervisor.INTERVAL
        while (
            self.lost_reason is None
            and not self._closed
            and not self.connected
            and time.monotonic() < deadline
        ):
            time.sleep(supervisor.INTERVAL / 5)
        return self.lost_reason is None and self.connected

    def stop_kernel(self, timeout: float = 5.0) -> None:
        """Forget the current remote kernel after making sure it has exited."""
        kernel, self.kernel = self.kernel, None
        if kernel is None:
            return
        if kernel.poll() is None and kernel.watching and self.connected:
            kernel.signal(9)
            kernel.wait_exit(timeout)
        kernel.detach()


def _close_standby(future: Future[Standby]) -> None:
    if future.exception() is None:
        future.result().close()
