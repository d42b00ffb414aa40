"""The kernel provisioner: a Jupyter kernel on a FlexAI GPU instance, reached over SSH.

Traits and the ``KernelProvisionerBase`` lifecycle only: each kernel's instance is an
:class:`~flexai_provisioner.session.InstanceSession`, whose blocking work runs in threads the
event loop awaits. A first start provisions, connects and copies the kernel's folder; a
restart keeps the instance; ``cleanup()`` copies results back and deletes the instance. A
failed or cancelled first start deletes what it made before the error propagates. The
kernelspec's ``argv`` (the launcher, for frontends without provisioners) becomes ipykernel
on the instance (:func:`~flexai_provisioner.kernelspecs.remote_argv`).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Dict, Float, Integer, Unicode

from . import executor, exit_cleanup, progress
from .client import FlexAIClient
from .config import SessionSettings, check_provisioner_config
from .errors import StartCancelledError, WorkspaceError
from .kernel_key import KernelKey
from .kernelspecs import remote_argv
from .ledger import Ledger
from .reaper import reap_and_report
from .session import FORWARDED_ENV, InstanceSession
from .workspace import SyncReport


def starting() -> dict[str, FlexAIProvisioner]:
    """The provisioners of this process whose kernel's first start is under way, by kernel id
    (for :meth:`FlexAIProvisioner.cancel_start`)."""
    return dict(_first_starts)


_first_starts: dict[str, FlexAIProvisioner] = {}


class FlexAIProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Runs the kernel on a FlexAI GPU instance of the kernelspec's GPU type."""

    gpu_type = Unicode(help="GPU type to provision, e.g. 'A100' (set by the kernelspec).").tag(
        config=True
    )
    gpu_count = Integer(1, help="GPUs per instance (1..8).").tag(config=True)
    api_url = Unicode(
        help="FlexAI API base URL. Defaults to the FLEXAI_API_URL environment variable."
    ).tag(config=True)
    api_key = Unicode(
        help="FlexAI API key. Prefer the FLEXAI_API_KEY environment variable: "
        "config files are easy to leak."
    ).tag(config=True)
    provision_timeout = Float(600.0, help="Seconds to wait for a new instance to be running.").tag(
        config=True
    )
    launch_timeout = Float(
        60.0, help="Seconds to wait for ipykernel to start on the instance."
    ).tag(config=True)
    ssh_connect_timeout = Float(
        30.0, help="Seconds allowed for the TCP connect, SSH handshake and login."
    ).tag(config=True)
    ssh_keepalive_interval = Float(
        5.0,
        help="Seconds between checks that the SSH link is alive (TCP keepalives, pings of "
        "the kernel's agent); a link silent for 3 of them is dead.",
    ).tag(config=True)
    reconnect_timeout = Float(
        120.0,
        help="Seconds to keep trying to reach an instance after its SSH connection dropped, "
        "before the kernel is reported dead.",
    ).tag(config=True)
    delete_timeout = Float(
        60.0, help="Seconds to wait for the platform to confirm an instance's deletion."
    ).tag(config=True)
    api_timeout = Float(
        25.0,
        help="Seconds one FlexAI API call may take, retries included, before it fails "
        "(each request also gives up after 5 s connecting or 20 s without an answer). A "
        "start against an API that never answers fails within twice this (the request, "
        "then the check that it created nothing).",
    ).tag(config=True)
    instance_ttl = Integer(
        900,
        help="Seconds the platform keeps an instance whose client stopped sending heartbeats "
        "(0: no expiry). Heartbeats are sent every third of it.",
    ).tag(config=True)
    keep_alive = Integer(
        0,
        help="Seconds to keep a kernel's instance after the kernel shuts down (0: delete it at "
        "once). The next kernel of the same GPU type, count and labels started by this user "
        "on this machine, in any process, adopts it instead of waiting for a new one: a fresh "
        "kernel in a cleared workspace. Unadopted, the platform deletes it after that long; "
        "`jupyter flexai gc --parked` deletes it sooner.",
    ).tag(config=True)
    ssh_key_file = Unicode(
        "",
        help="Use this private key instead of a fresh per-kernel key "
        "(its public half must be at <file>.pub or derivable).",
    ).tag(config=True)
    ssh_key_passphrase = Unicode("", help="Passphrase of ssh_key_file, if encrypted.").tag(
        config=True
    )
    remote_python = Unicode(
        "python3",
        help="Python on the instance that runs the small kernel agent, and ipykernel for "
        "kernelspecs written by `jupyter flexai install`.",
    ).tag(config=True)
    labels = Dict(
        value_trait=Unicode(), help="Extra platform labels for each instance (team, project)."
    ).tag(config=True)
    reap_orphans_at_start = Bool(
        True,
        help="At each new kernel's start, delete this user's instances whose owning "
        "process died (what `jupyter flexai gc` does).",
    ).tag(config=True)
    max_hours = Float(
        0.0,
        min=0.0,
        help="Shut the kernel down, deleting its instance, once the instance has run this "
        "many hours (0: no limit). Enforced by the Jupyter server extension.",
    ).tag(config=True)
    max_cost = Float(
        0.0,
        min=0.0,
        help="Shut the kernel down, deleting its instance, once the instance has cost this "
        "many US dollars at its hourly price (0: no limit). Enforced by the Jupyter server "
        "extension.",
    ).tag(config=True)
    workspace = Bool(
        True,
        help="Mirror the kernel's folder (the notebook's) on the instance and start the kernel "
        "there: its files are copied over before the kernel starts, and files the kernel "
        "creates or changes come back beside the notebook at shutdown (and on `jupyter "
        "flexai sync`). False: the kernel starts in the instance's home directory.",
    ).tag(config=True)
    workspace_max_mb = Float(
        100.0,
        help="Refuse to start a kernel whose folder holds more than this many MB to copy "
        "(after .flexaiignore); the check runs before an instance is requested.",
    ).tag(config=True)
    preload_kernel = Bool(
        True,
        help="Keep a Python with ipykernel and a kernel's other start-up imports (debugpy, "
        "given time) imported on the instance, and fork the next kernel (start or restart) "
        "from it: two round trips and up to ~0.4 s of imports saved. Only for `python -m "
        "ipykernel_launcher` with that same Python, whose env changes nothing those imports "
        "read. False: every kernel is a new process.",
    ).tag(config=True)

    _session: InstanceSession | None = None
    _start_phase: Callable[..., None] | None = None  # reports the start in progress
    _cancel_reason: str | None = None
    _restarting = False  # from cleanup(restart=True) until the restart's kernel is launched
    _notebook: str | None = None  # the path of the session's notebook, for progress events

    # -- start ---------------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Bring the instance up (first start) or copy the folder again (restart), and write
        the connection file for its local ports."""
        kwargs = await super().pre_launch(**kwargs)
        session_name = kwargs["env"].get("JPY_SESSION_NAME", "")
        self._notebook = session_name or None
        await self._keep_or_bring_up(kwargs.get("cwd"))
        # Guarded: nobody would clean up after a failure here, jupyter_client won't.
        await self._or_abandon(self._write_connection_file(session_name))
        argv = remote_argv(self.kernel_spec.argv, self.remote_python)
        kwargs["cmd"] = argv + kwargs.pop("extra_arguments", [])
        return kwargs

    async def _keep_or_bring_up(self, cwd: str | None) -> None:
        """Keep the instance of the last start if it is still reachable, else start anew."""
        if self._session is not None and not await asyncio.to_thread(self._session.reusable):
            # Deleted by the platform or unreachable: a restart starts over on a new instance.
            self.log.warning(
                "FlexAI kernel %s: instance %s is lost (%s); provisioning a new one",
                self.kernel_id,
                self.instance_id,
                self.lost_reason,
            )
            await self._teardown()
        if self._session is not None:  # a restart: the folder may have changed meanwhile
            await self._or_abandon(asyncio.to_thread(self._session.upload_workspace))
            return
        try:
            await self._bring_up(cwd)
        except Exception:
            if self._restarting:
                self._report_dead()
            raise

    async def _write_connection_file(self, session_name: str) -> None:
        assert self._session is not None
        km = self.parent
        km.transport, km.ip = "tcp", "127.0.0.1"
        for name, port in self._session.local_ports.items():
            setattr(km, name, port)
        km.write_connection_file(jupyter_session=session_name)
        self.connection_info = km.get_connection_info()

    async def _bring_up(self, cwd: str | None) -> None:
        """Check the config, make the kernel's host object and start it; on any failure or
        cancellation delete what exists."""
        check_provisioner_config(self)
        exit_cleanup.install_signal_handler()
        platform = self._client(self.api_url or None)
        ledger = Ledger()
        if self.reap_orphans_at_start:
            # In the background: an orphan's deletion must not delay this kernel's start.
            executor.submit(lambda: reap_and_report(platform, ledger, platform.api_url, self.log))
        key = await asyncio.to_thread(
            KernelKey.for_kernel, self.kernel_id, self.ssh_key_file, self.ssh_key_passphrase
        )
        self._session = session = InstanceSession(
            platform, ledger, platform.api_url, key, SessionSettings.of(self), self.log,
            self._report_lost,
        )  # fmt: skip
        self._cancel_reason = None
        _first_starts[self.kernel_id] = self
        phase = self._phase(time.monotonic())
        await self._or_abandon(
            asyncio.to_thread(
                session.start, cwd, self.gpu_type, self.gpu_count, self.kernel_id, phase
            )
        )

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start ipykernel on the instance and point the local ports at it."""
        assert self._session is not None
        launched = time.monotonic()
        env = kwargs.get("env", {})
        remote_env = {k: env[k] for k in (*self.kernel_spec.env, *FORWARDED_ENV) if k in env}
        # No kernel, so nothing is worth the instance's price: a later start provisions anew.
        await self._or_abandon(
            asyncio.to_thread(self._session.launch_kernel, cmd, self.connection_info, remote_env)
        )
        self._not_starting()
        self._restarting = False
        # A first start is timed from its request, a restart from its launch.
        report = self._start_phase or self._phase(launched)
        self._start_phase = None
        report("ready")
        return self.connection_info

    def cancel_start(self, reason: str) -> bool:
        """Abandon this kernel's first start if it is under way: whatever it made is deleted,
        and ``start_kernel`` raises :class:`StartCancelledError` giving ``reason``.

        A start waiting for its instance (minutes on a real platform) stops at once; one
        past that stops after its current step. False if no first start is under way.
        Call it from the event loop the kernel manager runs on.
        """
        if _first_starts.get(self.kernel_id) is not self or self._session is None:
            return False
        self._cancel_reason = reason
        self._session.cancel()
        return True

    async def _or_abandon(self, step: Awaitable[Any]) -> None:
        """Await a start step; if it fails or is cancelled, delete what the start made."""
        try:
            await step
        except BaseException as e:
            await self._abandon_start(e)
            raise

    async def _abandon_start(self, error: BaseException) -> None:
        """Delete what a failed or cancelled first start made; say why it failed, and if it
        was cancelled, raise that instead."""
        reason, self._cancel_reason = self._cancel_reason, None
        cancelled = reason is not None and isinstance(error, Exception)
        if cancelled:
            error = StartCancelledError(
                f"the start of kernel {self.kernel_id} was cancelled ({reason})"
            )
        if self._start_phase is not None and isinstance(error, Exception):
            # The error reaches the frontend that asked for the kernel only as the HTTP error
            # of its session request; the event names the notebook it was for.
            self._start_phase("failed", str(error))
            self._start_phase = None
        parked = await self._teardown()
        if cancelled:
            fate = "its instance is parked again" if parked else "its instance is deleted"
            raise StartCancelledError(f"{error}; {fate}") from None

    # -- running -------------------------------------------------------------------------

    @property
    def instance_id(self) -> str | None:
        """The FlexAI instance the kernel runs on."""
        return self._session.instance_id if self._session is not None else None

    @property
    def connected(self) -> bool:
        """Whether the SSH link to the instance is up (False while reconnecting)."""
        return self._session is not None and self._session.connected

    @property
    def reconnects(self) -> int:
        """How many times a lost SSH link to the instance was replaced."""
        return self._session.reconnects if self._session is not None else 0

    @property
    def lost_reason(self) -> str | None:
        """Why the instance could not be reached again, once the provisioner gave up."""
        return self._session.lost_reason if self._session is not None else None

    @property
    def remote_pid(self) -> int | None:
        """The kernel's process id on the instance."""
        return self._session.remote_pid if self._session is not None else None

    async def sync_workspace(self) -> SyncReport:
        """Copy back what the running kernel created or changed in its workspace (files
        changed here meanwhile are kept; the instance's versions are saved beside them)."""
        if self._session is None:
            raise WorkspaceError(f"kernel {self.kernel_id} is not running on FlexAI")
        return await asyncio.to_thread(self._session.sync_workspace)

    @property
    def has_process(self) -> bool:
        """Whether a remote kernel is running (or starting) on the instance."""
        return self._session is not None and self._session.has_kernel

    async def poll(self) -> int | None:
        """The remote kernel's exit status, or None while it runs."""
        return 0 if self._session is None else self._session.kernel_status()

    async def wait(self) -> int | None:
        """Wait for the remote kernel to exit; its status."""
        while (status := await self.poll()) is None:
            await asyncio.sleep(0.05)
        return status

    async def send_signal(self, signum: int) -> None:
        """Signal the remote kernel's process group, through its agent."""
        if self._session is not None:
            await asyncio.to_thread(self._session.signal, signum)

    async def shutdown_requested(self, restart: bool = False) -> None:
        """The kernel was asked to shut down: hold its ports while they close."""
        if self._session is not None:
            self._session.expect_kernel_exit()

    async def kill(self, restart: bool = False) -> None:
        """Kill the remote kernel."""
        if self._session is not None:
            self._session.expect_kernel_exit()
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        """Terminate the remote kernel."""
        await self.send_signal(signal.SIGTERM)

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        """At least 5 s: the kernel's exit is learnt over the network."""
        return max(recommended, 5.0)

    # -- stop ----------------------------------------------------------------------------

    async def cleanup(self, restart: bool = False) -> None:
        """Forget the old kernel but keep the instance (restart), or copy the kernel's
        results back and delete the instance."""
        if self._session is None:
            return
        if restart:
            self._restarting = True
            await asyncio.to_thread(self._session.stop_kernel)
        else:
            await self._teardown(self.keep_alive)

    async def _teardown(self, keep_alive: int = 0) -> int:
        """Delete the instance (with ``keep_alive``, a clean shutdown: park it); seconds parked."""
        session, self._session = self._session, None
        if session is None:
            self._not_starting()
            return 0
        session.cancel()  # let a blocked wait or reconnect return promptly
        deleted = asyncio.ensure_future(asyncio.to_thread(session.teardown, keep_alive))
        # A start is over once its instance is deleted, even if our caller stops waiting.
        deleted.add_done_callback(lambda _: self._not_starting())
        # Shielded: a second cancellation must not abandon a half-deleted instance.
        parked = await asyncio.shield(deleted)
        note = f"parked for {parked} s for the next kernel (keep_alive)" if parked else ""
        progress.report_shutdown(self.log, self.kernel_id, session.instance, note)
        return parked

    def _not_starting(self) -> None:
        if _first_starts.get(self.kernel_id) is self:
            del _first_starts[self.kernel_id]

    # -- persistence ---------------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        """The base info, and what another process needs to take the kernel over."""
        info = await super().get_provisioner_info()
        if self._session is not None and (saved := self._session.to_provisioner_info()):
            info["flexai"] = saved
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """Take over the kernel another process started (a restarted server)."""
        await super().load_provisioner_info(provisioner_info)
        self._session = await asyncio.to_thread(
            InstanceSession.from_provisioner_info,
            provisioner_info.get("flexai"),
            self._client,
            lambda file: KernelKey.reload(file, self.ssh_key_file, self.ssh_key_passphrase),
            SessionSettings.of(self),
            self.log,
            kernel_id=self.kernel_id,
            connection_info=self.connection_info,
            on_lost=self._report_lost,
        )
        self.connection_info = {**self.connection_info, **self._session.local_ports}

    def _client(self, api_url: str | None) -> FlexAIClient:
        return FlexAIClient(api_url, self.api_key or None, deadline=self.api_timeout)

    def _phase(self, start: float) -> Callable[..., None]:
        self._start_phase = progress.reporter(
            self.log, self.kernel_id, start, lambda: self.instance_id, self._notebook
        )
        return self._start_phase

    def _report_lost(self, reason: str) -> None:
        """The session gave the instance up (in the supervisor's thread): a ``lost`` phase."""
        instance = self._session.instance if self._session is not None else None
        progress.report_instance(self.log, self.kernel_id, "lost", instance, reason)

    def _report_dead(self) -> None:
        """Tell jupyter_client's auto-restarter that this kernel is dead for good.

        It declares a kernel dead only after restarts that *return*; a restart that raises
        (no new instance could be had) leaves it restarting for ever, asking for a new
        instance every few seconds. Its ``dead`` callbacks are what make jupyter_server show
        the kernel as dead and drop it, so they are fired here, and it is stopped.
        """
        self._restarting = False
        restarter = getattr(self.parent, "_restarter", None)
        if restarter is not None:
            restarter.stop()
            restarter._fire_callbacks("dead")
