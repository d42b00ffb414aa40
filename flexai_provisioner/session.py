"""One kernel's instance: provisioned, reached over SSH, forwarded, kept alive, torn down.

:class:`InstanceSession` is the per-kernel host object the provisioner and the launcher
drive: it owns the instance, its SSH connection and local ports, the remote kernel, the
workspace and the key, and what another process needs to take them over (provisioner info).
It is the blocking half of the provisioner: every method may wait on the network and is
called from a worker thread. It outlives kernel restarts (the instance, SSH connection and
local ports are kept; only the remote kernel is replaced) and is torn down once, on
shutdown or on any failure during start.

A single supervisor thread per process serves every session: it notices dead SSH links
(reconnecting with backoff, the kernel keeps running on the instance) and sends the
platform heartbeats that keep an instance's time-to-live from expiring. It runs whether or
not anyone drives the Jupyter event loop (``jupyter execute`` only runs it inside calls).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from . import executor, exit_cleanup, parking, supervisor
from .config import SessionSettings
from .deletion import OwedDeletion
from .errors import (
    ConfigurationError,
    FlexAIError,
    NotFoundError,
    ParkedInstanceError,
    PlatformError,
    ProvisioningError,
    SSHError,
    StartCancelledError,
    WorkspaceError,
)
from .gpu_platform import Instance, InstanceState, Platform, wait_running
from .kernel_key import KernelKey
from .ledger import Ledger, Owner
from .reaper import LABEL_KERNEL, LABEL_REQUEST, owner_labels
from .remote_kernel import RemoteKernel, Standby
from .ssh import SSHConnection, connect
from .tunnel import Tunnel
from .workspace import SyncReport, Workspace, state_path

PORT_NAMES = ["shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"]

# Environment the kernel inherits from the local side; the rest of the local
# environment (PATH, HOME, ...) belongs to this machine, not to the instance.
FORWARDED_ENV = ("JPY_SESSION_NAME",)


class Phase(Protocol):
    """Reports a start's phase by name, with an optional detail ("12.3 MB in 40 files")."""

    def __call__(self, name: str, message: str = "") -> None: ...


class InstanceSession:
    """The instance behind one kernel, and everything that reaches it."""

    def __init__(
        self,
        platform: Platform,
        ledger: Ledger,
        api_url: str,
        key: KernelKey,
        settings: SessionSettings,
        log: logging.Logger,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.platform = platform
        self.ledger = ledger
        self.api_url = api_url
        self.key = key
        self.settings = settings
        self.log = log
        self.on_lost = on_lost  # told why the instance cannot be reached again, once
        self.request_key = str(uuid.uuid4())
        self.instance: Instance | None = None
        self.conn: SSHConnection | None = None
        self.tunnel: Tunnel | None = None
        self.kernel: RemoteKernel | None = None
        self._standby: Future[Standby] | None = None  # the next kernel's agent, preloading
        self._launched = False  # a kernel ran here, so its workspace may hold results
        self.workspace: Workspace | None = None  # the kernel's folder, mirrored on the instance
        self.lost_reason: str | None = None  # set when the instance cannot be reached again
        self._cancelled = threading.Event()  # set to abandon a start or a reconnect
        self._reconnecting = False
        self.reconnects = 0  # links replaced after a loss
        self._next_heartbeat = 0.0
        self._next_ping = 0.0
        self._closed = False
        # Held while a start step runs, so teardown waits for an in-flight POST or SSH
        # connect to land (and then deletes what it made) instead of racing it.
        self._start_step = threading.Lock()

    @classmethod
    def from_provisioner_info(
        cls,
        saved: dict[str, Any] | None,
        platform_for: Callable[[str], Platform],
        key_for: Callable[[str], KernelKey],
        settings: SessionSettings,
        log: logging.Logger,
        *,
        kernel_id: str,
        connection_info: Mapping[str, Any],
        on_lost: Callable[[str], None] | None = None,
    ) -> InstanceSession:
        """Take over a kernel another process started (a server restarted with persisted
        info): ``saved`` is what :meth:`to_provisioner_info` gave there; ``platform_for`` and
        ``key_for`` make the client of its API URL and the key of its key file. The ports
        of ``connection_info`` are reused if free; the ledger entry becomes this process's."""
        if not saved or not saved.get("kernel") or not saved.get("key_file"):
            raise ConfigurationError("provisioner info holds no FlexAI kernel to reattach to")
        key = key_for(saved["key_file"])
        platform = platform_for(saved["api_url"])
        session = cls(platform, Ledger(), saved["api_url"], key, settings, log, on_lost)
        ports = {name: connection_info[name] for name in PORT_NAMES}
        session._reattach(saved["request_key"], saved["instance_id"], saved["kernel"], ports)
        session._resume_workspace(kernel_id)
        return session

    def to_provisioner_info(self) -> dict[str, Any] | None:
        """What :meth:`from_provisioner_info` needs, as plain JSON data (None before an
        instance was requested)."""
        if self.instance_id is None:
            return None
        k = self.kernel
        return {
            "instance_id": self.instance_id,
            "api_url": self.api_url,
            "request_key": self.request_key,
            "key_file": self.key.file or "",
            "kernel": k and {"pid": k.pid, "ports": k.ports, "workdir": k.workdir},
        }

    # -- start ---------------------------------------------------------------------------

    def start(
        self,
        folder: str | None,
        gpu_type: str,
        gpu_count: int,
        kernel_id: str,
        phase: Phase,
        keep_key: bool = True,
    ) -> dict[str, int]:
        """A kernel's first start up to launching it: check its folder, provision, connect,
        keep the key (if ``keep_key``, or for a workspace's ``jupyter flexai sync``), copy
        the folder. Returns the local ports. The caller tears down after a failure. A parked
        instance of this kind (``keep_alive``) is adopted instead of provisioning one."""
        self.plan_workspace(folder, kernel_id)
        if not self.adopt(gpu_type, gpu_count, kernel_id, phase):
            self.provision(gpu_type, gpu_count, kernel_id, phase)
            self.connect(phase)
        ports = self.local_ports
        if keep_key or self.workspace is not None:
            with self._start_step:  # not after teardown, which removes the file
                self._check_cancelled()
                self.keep_key(kernel_id)
        self.upload_workspace(phase)
        phase("starting kernel")
        return ports

    def cancel(self) -> None:
        """Make a start step or reconnect under way return promptly; a start stops after it."""
        self._cancelled.set()

    def provision(self, gpu_type: str, gpu_count: int, kernel_id: str, phase: Phase) -> None:
        """Create the instance and wait until it runs. The ledger knows it before the POST."""
        with self._start_step:
            self._provision(gpu_type, gpu_count, kernel_id, phase)

    def _check_cancelled(self) -> None:
        """Between start steps: stop if the start was cancelled (what exists is torn down)."""
        if self._cancelled.is_set():
            raise StartCancelledError("kernel start cancelled")

    def _provision(self, gpu_type: str, gpu_count: int, kernel_id: str, phase: Phase) -> None:
        self._check_cancelled()
        phase("requesting")
        self.ledger.record_request(self.request_key, self.api_url, kernel_id, gpu_type)
        exit_cleanup.register(self)
        labels = {
            **self.settings.labels,
            LABEL_KERNEL: kernel_id,
            LABEL_REQUEST: self.request_key,
            **owner_labels(self.ledger.owner_id, Owner.this_process()),
        }
        self.instance = self.platform.provision(
            gpu_type,
            gpu_count=gpu_count,
            ssh_public_key=self.key.pair.public_openssh,
            labels=labels,
            ttl_seconds=self.settings.instance_ttl or None,
            idempotency_key=self.request_key,
        )
        self.ledger.record_instance(self.request_key, self.instance.id)
        self.log.info(
            "FlexAI instance %s requested (%s x%d)", self.instance.id, gpu_type, gpu_count
        )
        supervisor.watch(self)

        def on_state(inst: Instance) -> None:
            if inst.state is InstanceState.PENDING:
                phase("queued")
            elif inst.state is InstanceState.PROVISIONING:
                phase("booting")

        self.instance = wait_running(
            self.platform,
            self.instance.id,
            self.settings.provision_timeout,
            on_state=on_state,
            cancel=self._cancelled,
        )

    def adopt(self, gpu_type: str, gpu_count: int, kernel_id: str, phase: Phase) -> bool:
        """Take over a parked instance of this kind (:mod:`.parking`) instead of provisioning:
        restore its lease, connect with its key, clear the previous kernel's files. False if
        there is none, or the one claimed is gone or unreachable (then it is deleted, and this
        session provisions as if none had been found)."""
        own = self.key.pair if self.key.own else None
        parked = parking.claim(self.ledger, self.api_url, gpu_type, gpu_count, kernel_id, own)
        if parked is None:
            return False
        fresh, self.request_key = self.key, parked.entry.request_key
        exit_cleanup.register(self)
        try:
            with self._start_step:
                self._check_cancelled()
                ttl = self.settings.instance_ttl or None
                self.instance = parking.revive(self.platform, parked, ttl)
                if not fresh.own and parked.key is not None:
                    self.key = KernelKey(parked.key)
                supervisor.watch(self)
            self.connect(lambda name, _="": phase(name, f"parked instance {parked.instance_id}"))
            assert self.conn is not None
            parking.clear_workspace(self.conn, self.settings.ssh_connect_timeout)
        except (ParkedInstanceError, SSHError) as e:
            self.log.warning(
                "FlexAI parked instance %s cannot be adopted (%s): deleting it and "
                "provisioning a new one",
                parked.instance_id,
                e,
            )
            self._drop_instance()
            self.key, self.request_key = fresh, str(uuid.uuid4())
            return False
        finally:
            parking.release_key(parked)  # held in memory now, or of no use
        return True

    def _drop_instance(self) -> None:
        """Forget an instance that could not be adopted, deleting it (if it still exists)."""
        supervisor.unwatch(self)
        self._drop_standby()
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.delete_instance()
        self.instance = None

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
            self.conn = self._connect()
            self.listen()
        self._prepare_standby()
        self._check_cancelled()
        return self.local_ports

    def _connect(self) -> SSHConnection:
        assert self.instance is not None and self.instance.ssh is not None
        return connect(
            self.instance.ssh,
            self.key.pair,
            connect_timeout=self.settings.ssh_connect_timeout,
            keepalive_interval=self.settings.ssh_keepalive_interval,
        )

    def keep_key(self, kernel_id: str) -> None:
        """Keep a fresh key in its runtime file, for other processes that need to reach the
        instance. The ledger knows the file, so ``jupyter flexai gc`` removes it if this
        process dies; teardown removes it otherwise."""
        kept = self.key.keep(kernel_id)
        if kept is not None:
            self.ledger.record_key_file(self.request_key, kept)

    def plan_workspace(self, local_dir: str | None, kernel_id: str) -> None:
        """Choose the folder to mirror on the instance (the frontend's ``cwd`` for the
        kernel, normally the notebook's folder) and check its size, before anything is
        provisioned. No folder given, or ``workspace`` off: the kernel starts in the
        instance's home directory."""
        if not self.settings.workspace or not local_dir:
            return
        max_mb = self.settings.workspace_max_mb
        workspace = Workspace(
            Path(local_dir), state_path(kernel_id), max_mb, self.log, self.settings.remote_python
        )
        workspace.scan()
        self.workspace = workspace

    def upload_workspace(self, phase: Phase | None = None) -> None:
        """Copy the folder's new and changed files over this connection (every start)."""
        workspace = self.workspace
        if workspace is None:
            return
        assert self.conn is not None and self.instance is not None
        assert self.instance.ssh is not None
        workspace.label = self.instance.id
        workspace.reach = {"ssh": asdict(self.instance.ssh), "key_file": self.key.file}
        announce = None if phase is None else lambda detail: phase("uploading files", detail)
        self._check_cancelled()
        workspace.upload(self.conn, self.settings.ssh_connect_timeout, announce, self._cancelled)
        self._check_cancelled()

    def sync_workspace(self) -> SyncReport:
        """Bring back what the running kernel created or changed in its folder."""
        workspace, conn = self.workspace, self.conn
        if workspace is None or workspace.remote_dir is None:
            raise WorkspaceError(
                "this kernel has no workspace (workspace = False, or its frontend named no "
                "folder to start it in)"
            )
        if conn is None or not self.connected:
            raise SSHError(
                f"the SSH link to instance {workspace.label} is down; sync again once it "
                "has reconnected"
            )
        return workspace.download(conn, self.settings.ssh_connect_timeout)

    def _resume_workspace(self, kernel_id: str) -> None:
        """Take over the workspace of a kernel reattached to, if it had one."""
        if self.settings.workspace and state_path(kernel_id).exists():
            self.workspace = Workspace.resume(state_path(kernel_id), self.log)

    def launch_kernel(
        self, argv: list[str], connection_info: Mapping[str, Any], env: dict[str, str]
    ) -> None:
        """Start a kernel on the instance, in its workspace if it has one, and point the
        local ports at it.

        Of ``connection_info`` the kernel gets the key, signature scheme and kernel name;
        the instance picks its own ports.
        """
        assert self.conn is not None and self.tunnel is not None
        key = connection_info.get("key", "")
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
            cwd=self.workspace.remote_dir if self.workspace else None,
            standby=standby,
        )
        self._launched = True
        self.tunnel.retarget(self.conn.transport, self.kernel.ports)
        self._prepare_standby()  # for the next restart, while this kernel runs
        self._check_cancelled()

    def _prepare_standby(self) -> None:
        """Start the next kernel's agent in the background, preloading ipykernel."""
        conn = self.conn
        if not self.settings.preload_kernel or conn is None or self._standby is not None:
            return
        self._standby = executor.submit(lambda: Standby.open(conn, self.settings.remote_python))

    def _take_standby(self) -> Standby | None:
        """The standby, once it is open, if opening it worked (else a new agent does)."""
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
        future, self._standby = self._standby, None
        if future is not None:
            future.add_done_callback(_close_standby)

    def _reattach(
        self,
        request_key: str,
        instance_id: str,
        kernel: dict[str, Any],
        local_ports: dict[str, int],
    ) -> None:
        self.request_key = request_key
        self.instance = self.platform.get_instance(instance_id)
        if self.instance.state is not InstanceState.RUNNING or self.instance.ssh is None:
            raise ProvisioningError(
                f"instance {instance_id} is {self.instance.state.value}, not running"
            )
        exit_cleanup.register(self)
        supervisor.watch(self)
        self.conn = self._connect()
        self.tunnel = Tunnel(PORT_NAMES, local_ports)
        self._attach(kernel["pid"], kernel["ports"], kernel["workdir"])
        self._prepare_standby()
        self._launched = True
        self.ledger.adopt(request_key)

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

    def tick(self, now: float) -> None:
        """Supervisor work: reconnect a dead link, send a due heartbeat. Must not block."""
        if self._closed or self.instance is None or self.lost_reason is not None:
            return  # a lost kernel's lease is left to expire: nothing will use it again
        ttl = self.settings.instance_ttl
        if ttl and now >= self._next_heartbeat:
            self._next_heartbeat = now + max(1.0, ttl / 3)
            executor.submit(self._heartbeat)
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

    def _heartbeat(self) -> None:
        assert self.instance is not None
        try:
            self.platform.heartbeat(self.instance.id)
        except PlatformError as e:
            self.log.warning("heartbeat for instance %s failed: %s", self.instance.id, e)

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

    # -- stop ----------------------------------------------------------------------------

    def stop_kernel(self, timeout: float = 5.0) -> None:
        """Forget the current remote kernel after making sure it has exited."""
        kernel, self.kernel = self.kernel, None
        if kernel is None:
            return
        if kernel.poll() is None and kernel.watching and self.connected:
            kernel.signal(9)
            kernel.wait_exit(timeout)
        kernel.detach()

    def teardown(self, keep_alive: int = 0) -> None:
        """Delete the instance and release everything local. Safe to call more than once.

        If the platform fails to delete it, the deletion is owed: recorded in the ledger and
        retried by the supervisor until it succeeds (and by ``jupyter flexai gc``). With
        ``keep_alive`` (a clean shutdown), a healthy instance is parked for that many seconds
        instead (:mod:`.parking`), its kernel stopped; one that cannot be parked is deleted.
        """
        self._cancelled.set()
        with self._start_step:
            if self._closed:
                return
            self._closed = True
        park = keep_alive > 0 and self._launched and self.lost_reason is None and self.connected
        try:
            supervisor.unwatch(self)
            if park:
                self.stop_kernel()  # no process of this kernel's may meet the next one
            if self.kernel is not None:
                self.kernel.detach()
                self.kernel = None
            self._drop_standby()
            if self.tunnel is not None:
                self.tunnel.close()
            self._save_results()
            if self.conn is not None:
                self.conn.close()
            if not (park and self._park(keep_alive)):
                self.delete_instance()
        finally:
            self.key.remove()  # the instance is gone or its deletion owed
            exit_cleanup.unregister(self)

    def _save_results(self) -> None:
        """Before the instance goes: copy back what the kernel made. A link that is down or
        fails meanwhile (dropped, or silent) gets one fresh connection: the files are lost
        with the instance otherwise."""
        workspace = self.workspace
        if workspace is None:
            return
        fresh = None
        try:
            if not self._launched or self.lost_reason is not None:
                return  # no kernel ever ran there, or the instance is gone
            timeout = self.settings.ssh_connect_timeout
            try:
                if self.conn is None or not self.conn.is_active():
                    raise SSHError("the SSH link is down")
                workspace.download(self.conn, timeout)
            except (SSHError, WorkspaceError) as e:
                self.log.warning("copying the kernel's files back: %s; trying a new link", e)
                fresh = self._connect()
                workspace.download(fresh, timeout)
        except FlexAIError as e:
            self.log.error(
                "could not copy the kernel's files back from instance %s before deleting it: %s",
                workspace.label,
                e,
            )
        finally:
            if fresh is not None:
                fresh.close()
            workspace.forget()

    def _park(self, keep_alive: int) -> bool:
        assert self.instance is not None
        try:
            parking.park(
                self.platform, self.ledger, self.request_key, self.instance, keep_alive, self.key
            )
        except FlexAIError as e:
            self.log.warning(
                "could not park FlexAI instance %s (%s): deleting it", self.instance.id, e
            )
            return False
        self.log.info(
            "FlexAI instance %s parked for %d s (keep_alive): the next kernel of its kind on "
            "this machine adopts it, else the platform deletes it",
            self.instance.id,
            keep_alive,
        )
        return True

    def delete_instance(self) -> None:
        owed = OwedDeletion(
            self.platform,
            self.ledger,
            self.request_key,
            self.instance.id if self.instance else None,
            self.settings.delete_timeout,
            self.log,
        )
        try:
            owed.attempt()
        except PlatformError as e:
            owed.owe(e)


def _close_standby(future: Future[Standby]) -> None:
    if future.exception() is None:
        future.result().close()
