"""One kernel's instance: provisioned, reached over SSH, forwarded, kept alive, torn down.

:class:`InstanceSession` is the per-kernel host object the provisioner and the launcher
drive. It owns the instance (requested with the ledger knowing, leased by heartbeats,
deleted or its deletion owed), the kernel's key and workspace, and what another process
needs to take them over (provisioner info); how the kernel is reached over SSH, and kept
reachable, it has from :class:`~flexai_provisioner.kernel_link.KernelLink`. It is the
blocking half of the provisioner: every method may wait on the network and is called from a
worker thread. It outlives kernel restarts (the instance, SSH connection and local ports
are kept; only the remote kernel is replaced) and is torn down once, on shutdown or on any
failure during start. The process's supervisor thread ticks it for heartbeats and link
checks, whether or not anyone drives the Jupyter event loop.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import executor, exit_cleanup, parking, supervisor
from .config import SessionSettings
from .deletion import OwedDeletion
from .errors import (
    ConfigurationError,
    FlexAIError,
    ParkedInstanceError,
    PlatformError,
    ProvisioningError,
    SSHError,
    StartCancelledError,
    WorkspaceError,
)
from .gpu_platform import Instance, InstanceState, Platform, wait_running
from .kernel_key import KernelKey
from .kernel_link import PORT_NAMES, KernelLink, Phase
from .ledger import Ledger, Owner
from .reaper import LABEL_KERNEL, LABEL_REQUEST, owner_labels
from .tunnel import Tunnel
from .workspace import SyncReport, Workspace, state_path

# Environment the kernel inherits from the local side; the rest of the local
# environment (PATH, HOME, ...) belongs to this machine, not to the instance.
FORWARDED_ENV = ("JPY_SESSION_NAME",)


class InstanceSession(KernelLink):
    """The instance behind one kernel, from its request to its deletion."""

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
        super().__init__(platform, key, settings, log, on_lost)
        self.ledger = ledger
        self.api_url = api_url
        self.request_key = str(uuid.uuid4())
        self._launched = False  # a kernel ran here, so its workspace may hold results
        self.workspace: Workspace | None = None  # the kernel's folder, mirrored on the instance
        self._next_heartbeat = 0.0
        self._adopting: parking.Parked | None = None  # claimed, its adoption under way

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
        self._plan_workspace(folder, kernel_id)
        if not self.adopt(gpu_type, gpu_count, kernel_id, phase):
            self._provision(gpu_type, gpu_count, kernel_id, phase)
            self.connect(phase)
        ports = self.local_ports
        if keep_key or self.workspace is not None:
            with self._start_step:  # not after teardown, which removes the file
                self._check_cancelled()
                self._keep_key(kernel_id)
        self.upload_workspace(phase)
        phase("starting kernel")
        return ports

    def cancel(self) -> None:
        """Make a start step or reconnect under way return promptly; a start stops after it."""
        self._cancelled.set()

    def _provision(self, gpu_type: str, gpu_count: int, kernel_id: str, phase: Phase) -> None:
        """Create the instance and wait until it runs. The ledger knows it before the POST."""
        with self._start_step:
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
        there is none (nor one being parked), or the one claimed is gone or unreachable (then
        it is deleted, and this session provisions as if none had been found). Each step runs
        under the start-step lock, so a teardown meanwhile (which parks it again, and cancels
        the wait for one being parked) never meets a step half done."""
        own = self.key.pair if self.key.own else None
        wanted = parking.Wanted(
            self.api_url, gpu_type, gpu_count, self.settings.labels, own, kernel_id
        )
        with self._start_step:  # a claim after a teardown would be nobody's
            self._check_cancelled()
            parked = parking.claim(self.platform, self.ledger, wanted, self._cancelled, self.log)
            if parked is None:
                return False
            self._adopting = parked
            fresh, self.request_key = self.key, parked.entry.request_key
            exit_cleanup.register(self)
        try:
            with self._start_step:
                self._check_cancelled()
                self.instance = parking.revive(self.platform, parked, self.settings)
                if not fresh.own and parked.key is not None:
                    self.key = KernelKey(parked.key)
                supervisor.watch(self)
            self.connect(lambda name, _="": phase(name, f"parked instance {parked.instance_id}"))
            with self._start_step:
                self._check_cancelled()
                assert self.conn is not None
                parking.clear_workspace(self.conn, self.settings.ssh_connect_timeout)
                self._adopting = None  # this kernel's now
        except (ParkedInstanceError, SSHError) as e:
            with self._start_step:
                if self._adopting is None:  # a teardown took it over meanwhile
                    raise StartCancelledError("kernel start cancelled") from None
                self._adopting = None
            self.log.warning(
                "FlexAI parked instance %s cannot be adopted (%s): deleting it and "
                "provisioning a new one",
                parked.instance_id,
                e,
            )
            self._drop_instance()
            parking.release_key(parked)
            self.key, self.request_key = fresh, str(uuid.uuid4())
            return False
        parking.release_key(parked)  # held in memory now
        return True

    def _drop_instance(self) -> None:
        """Forget an instance that could not be adopted, deleting it (if it still exists)."""
        supervisor.unwatch(self)
        self._drop_standby()
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self._delete_instance()
        self.instance = None

    def _keep_key(self, kernel_id: str) -> None:
        """Keep a fresh key in its runtime file, for other processes that need to reach the
        instance. The ledger knows the file, so ``jupyter flexai gc`` removes it if this
        process dies; teardown removes it otherwise."""
        kept = self.key.keep(kernel_id)
        if kept is not None:
            self.ledger.record_key_file(self.request_key, kept)

    def _plan_workspace(self, local_dir: str | None, kernel_id: str) -> None:
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
        local ports at it (see :meth:`_launch`)."""
        self._launch(
            argv, connection_info, env, self.workspace.remote_dir if self.workspace else None
        )
        self._launched = True
        self._check_cancelled()

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
        try:
            self.conn = self._connect()
            self.tunnel = Tunnel(PORT_NAMES, local_ports)
            self._attach(kernel["pid"], kernel["ports"], kernel["workdir"])
            self.ledger.adopt(request_key)
        except BaseException:
            self._let_go()
            raise
        self._prepare_standby()
        self._launched = True

    def _let_go(self) -> None:
        """A reattach failed: close what it opened; the instance stays the ledger's owner's."""
        self._closed = True
        supervisor.unwatch(self)
        exit_cleanup.unregister(self)
        self._close_link()

    # -- running -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Supervisor work: reconnect a dead link, send a due heartbeat. Must not block."""
        if self._closed or self.instance is None or self.lost_reason is not None:
            return  # a lost kernel's lease is left to expire: nothing will use it again
        ttl = self.settings.instance_ttl
        if ttl and now >= self._next_heartbeat:
            self._next_heartbeat = now + max(1.0, ttl / 3)
            executor.submit(self._heartbeat)
        self._watch_link(now)

    def _heartbeat(self) -> None:
        assert self.instance is not None
        try:
            self.platform.heartbeat(self.instance.id)
        except PlatformError as e:
            self.log.warning("heartbeat for instance %s failed: %s", self.instance.id, e)

    # -- stop ----------------------------------------------------------------------------

    def teardown(self, keep_alive: int = 0) -> int:
        """Delete the instance and release everything local. Safe to call more than once.

        If the platform fails to delete it, the deletion is owed: recorded in the ledger and
        retried by the supervisor until it succeeds (and by ``jupyter flexai gc``). With
        ``keep_alive`` (a clean shutdown), a healthy instance is parked for that many seconds
        instead (:mod:`.parking`), its kernel stopped; one that cannot be parked is deleted.
        A parked instance whose adoption was under way is parked again for what it had left.
        The seconds it is parked for (0: deleted).
        """
        self._cancelled.set()
        with self._start_step:
            if self._closed:
                return 0
            self._closed = True
            adopting, self._adopting = self._adopting, None
        park = keep_alive > 0 and self._launched and self.lost_reason is None and self.connected
        parked = 0
        try:
            supervisor.unwatch(self)
            if park:
                parking.begin(self.ledger, self.request_key, self.instance, self.key, self.settings)
                self.stop_kernel()  # no process of this kernel's may meet the next one
            self._save_results()
            self._close_link()
            if adopting is not None:  # a start cancelled while adopting: park it again
                revived = self.instance is not None
                parked = parking.give_back(self.platform, self.ledger, adopting, revived, self.log)
            elif park and self.instance is not None:
                args = (self.request_key, self.instance, keep_alive, self.key, self.settings.labels)
                parked = parking.park(self.platform, self.ledger, *args, self.log)
            if not parked:
                self._delete_instance()
                if adopting is not None:
                    parking.release_key(adopting)
        finally:
            self.key.remove()  # the instance is gone, parked or its deletion owed
            exit_cleanup.unregister(self)
        return parked

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

    def _delete_instance(self) -> None:
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
