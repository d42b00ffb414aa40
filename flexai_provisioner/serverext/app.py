"""The server side of the compute API: which FlexAI kernels run here, what they cost, limits.

:class:`FlexAIExtension` owns what outlives a request: platform clients, the subscription
that turns provisioner progress into jupyter_events, and the periodic check of each
kernel's ``max_hours``/``max_cost``. Handlers (:mod:`.handlers`) stay thin and call it.

Truth about an instance comes from the platform; the provisioner is only asked which
instance a kernel runs on. Every platform call blocks, so each runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.extension.application import ExtensionApp
from tornado import web
from traitlets import Float

from .. import __version__, exit_cleanup, progress
from ..client import FlexAIClient
from ..errors import (
    ConfigurationError,
    FlexAIError,
    FlexAITimeoutError,
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    PlatformUnreachableError,
    StartCancelledError,
    UnknownGPUTypeError,
    WorkspaceError,
)
from ..gpu_platform import GPUType, Instance
from ..kernelspecs import KERNEL_NAME_PREFIX, PROVISIONER_NAME
from ..provisioner import FlexAIProvisioner, starting

SCHEMA_ID = "https://flex.ai/schemas/jupyter/compute/v1"
SCHEMA_FILE = Path(__file__).parent / "events" / "compute.yaml"


class ComputeError(web.HTTPError):
    """An API error whose JSON body carries ``message`` (and any extra fields)."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(status)  # no log_message: tornado would %-format ours
        self.message = message
        self.extra = extra

    def __str__(self) -> str:
        return self.message


def http_error(error: FlexAIError) -> ComputeError:
    """The status that says whose fault a FlexAI error is, with its message."""
    if isinstance(error, UnknownGPUTypeError):
        return ComputeError(400, str(error), gpu_types=error.known)
    if isinstance(error, InvalidRequestError):
        return ComputeError(400, str(error))
    if isinstance(error, (StartCancelledError, WorkspaceError)):
        return ComputeError(409, str(error))
    if isinstance(error, NoCapacityError):
        return ComputeError(409, str(error), available=error.available)
    if isinstance(error, (ConfigurationError, PlatformUnreachableError)):
        return ComputeError(503, str(error))
    if isinstance(error, FlexAITimeoutError):  # the platform or the instance too slow
        return ComputeError(504, str(error))
    return ComputeError(502, str(error))


def iso(moment: datetime | float) -> str:
    """RFC 3339 in UTC, as the FlexAI API writes times."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, timezone.utc)
    text = moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def notebook_path(event: progress.PhaseEvent, root: str) -> str | None:
    """The event's notebook as an API path (relative to the server's root, ``/``-separated);
    None if it has none or it lies outside the root."""
    if not event.path:
        return None
    relative = os.path.relpath(event.path, root)
    if relative == os.curdir or relative.split(os.sep, 1)[0] == os.pardir:
        return None
    return relative.replace(os.sep, "/")


def phase_model(event: progress.PhaseEvent, root: str) -> dict[str, Any]:
    model: dict[str, Any] = {
        "phase": event.phase,
        "elapsed_seconds": round(event.elapsed, 3),
        "time": iso(event.time),
        "instance_id": event.instance_id,
    }
    if event.cost_usd is not None:
        model["cost_usd"] = round(event.cost_usd, 6)
    if event.message:
        model["message"] = event.message
    path = notebook_path(event, root)
    if path:
        model["path"] = path
    return model


def progress_model(kernel_id: str, root: str) -> dict[str, Any]:
    phases = progress.history(kernel_id)
    return {
        "kernel_id": kernel_id,
        "phase": phases[-1].phase if phases else None,
        "phases": [phase_model(e, root) for e in phases],
    }


class FlexAIExtension(ExtensionApp):
    """Jupyter server extension: the ``/api/compute`` endpoints, progress events, limits."""

    name = "flexai_provisioner"
    load_other_extensions = True

    limit_check_interval = Float(
        30.0,
        help="Seconds between checks of each FlexAI kernel's max_hours and max_cost.",
    ).tag(config=True)
    platform_timeout = Float(
        10.0, help="Seconds allowed for one platform request made for an API call."
    ).tag(config=True)
    health_timeout = Float(
        3.0, help="Seconds /api/compute/health waits for the platform (no retries)."
    ).tag(config=True)

    def initialize_settings(self) -> None:
        self._clients: dict[tuple[str, str, bool], FlexAIClient] = {}
        self._instances: dict[str, Instance] = {}  # immutable facts: price, creation time
        self._stopping: set[str] = set()
        self._unsubscribe: Any = None
        self._limits_task: asyncio.Task[None] | None = None
        self.serverapp.event_logger.register_event_schema(SCHEMA_FILE)

    def initialize_handlers(self) -> None:
        from .handlers import handlers

        self.handlers.extend(handlers)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        loop = asyncio.get_running_loop()

        def on_event(event: progress.PhaseEvent) -> None:
            # Published from worker threads too; jupyter_events wants the loop's thread.
            with contextlib.suppress(RuntimeError):  # loop closed: the server is gone
                loop.call_soon_threadsafe(self._emit, event)

        self._unsubscribe = progress.subscribe(on_event)
        self._limits_task = asyncio.create_task(self._watch_limits())
        # Without a terminal, jupyter_server leaves SIGINT to Python, whose KeyboardInterrupt
        # ends the server without shutting its kernels down (and waits for a booting start
        # first): stop as for SIGTERM instead, as JupyterHub configures it. SIGHUP is left
        # to exit_cleanup, which deletes the instances on the way out.
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            signal.signal(signal.SIGINT, serverapp._signal_stop)
        exit_cleanup.install_signal_handler()
        self._cancel_starts_on_shutdown(serverapp.kernel_manager)

    def _cancel_starts_on_shutdown(self, kernel_manager: Any) -> None:
        """Make a shutdown of a kernel still starting cancel its start.

        jupyter_client waits for a starting kernel to be ready before shutting it down, and
        jupyter_server answers 404 for one it does not list yet: either way the instance
        would boot on and run, billed, attached to nothing. Every shutdown (DELETE of the
        kernel or its session, a kernel switch, culling) goes through this method.
        """
        shutdown_kernel = kernel_manager.shutdown_kernel

        async def cancelling_shutdown(kernel_id: str, *args: Any, **kwargs: Any) -> None:
            provisioner = starting().get(kernel_id)
            if provisioner is not None and provisioner.cancel_start("shut down while starting"):
                self.log.info("FlexAI kernel %s shut down while starting: cancelled", kernel_id)
                await self.start_ended(kernel_id)
                if kernel_id not in kernel_manager:
                    return
            await ensure_async(shutdown_kernel(kernel_id, *args, **kwargs))

        kernel_manager.shutdown_kernel = cancelling_shutdown

    async def stop_extension(self) -> None:
        # Before the server shuts its kernels down, which would wait for each start to end.
        cancelled = [
            kernel_id
            for kernel_id, provisioner in starting().items()
            if provisioner.cancel_start("the server is stopping")
        ]
        await asyncio.gather(*(self.start_ended(kernel_id) for kernel_id in cancelled))
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._limits_task is not None:
            self._limits_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._limits_task
        for client in self._clients.values():
            client.close()

    # -- platform --------------------------------------------------------------------------

    def client(
        self, api_url: str | None = None, api_key: str | None = None, *, health: bool = False
    ) -> FlexAIClient:
        """A client for these settings (the server's FlexAIProvisioner config by default)."""
        if api_url is None or api_key is None:
            defaults = FlexAIProvisioner(config=self.serverapp.config)
            api_url, api_key = defaults.api_url, defaults.api_key
        key = (api_url, api_key, health)
        if key not in self._clients:
            try:
                self._clients[key] = FlexAIClient(
                    api_url or None,
                    api_key or None,
                    timeout=self.health_timeout if health else self.platform_timeout,
                    max_retries=0 if health else 2,
                )
            except ConfigurationError as e:
                raise ComputeError(503, f"this server cannot reach FlexAI: {e}") from None
        return self._clients[key]

    def kernel_client(self, provisioner: FlexAIProvisioner) -> FlexAIClient:
        """The client for the platform the kernel's own provisioner uses."""
        return self.client(provisioner.api_url, provisioner.api_key)

    async def gpu_types(self) -> list[GPUType]:
        try:
            return await asyncio.to_thread(self.client().list_gpu_types)
        except FlexAIError as e:
            raise http_error(e) from None

    async def health(self) -> dict[str, Any]:
        platform: dict[str, Any] = {"ok": False}
        try:
            client = self.client(health=True)
            platform["api_url"] = client.api_url
            types = await asyncio.to_thread(client.list_gpu_types)
        except (FlexAIError, ComputeError) as e:
            platform["message"] = str(e)
        else:
            platform.update(ok=True, gpu_types=len(types))
        return {
            "ok": platform["ok"],
            "extension": {"ok": True, "version": __version__},
            "platform": platform,
        }

    # -- kernels ---------------------------------------------------------------------------

    def flexai_kernels(self) -> dict[str, Any]:
        """This server's running kernels whose provisioner is FlexAI's, by kernel id."""
        km = self.serverapp.kernel_manager
        found = {}
        for kernel_id in list(km.list_kernel_ids()):
            try:
                kernel = km.get_kernel(kernel_id)
            except KeyError:
                continue
            if isinstance(getattr(kernel, "provisioner", None), FlexAIProvisioner):
                found[kernel_id] = kernel
        return found

    def kernel_on(self, instance_id: str) -> tuple[str, Any]:
        for kernel_id, kernel in self.flexai_kernels().items():
            if kernel.provisioner.instance_id == instance_id:
                return kernel_id, kernel
        raise ComputeError(404, f"no kernel of this server runs on FlexAI instance {instance_id}")

    async def flexai_kernelspecs(self) -> dict[str, str]:
        """Kernel name for each GPU type (lower case) with an installed FlexAI kernelspec."""
        specs = await ensure_async(self.serverapp.kernel_spec_manager.get_all_specs())
        found: dict[str, str] = {}
        for name, entry in sorted(specs.items()):
            provisioner = entry.get("spec", {}).get("metadata", {}).get("kernel_provisioner", {})
            gpu_type = provisioner.get("config", {}).get("gpu_type")
            if provisioner.get("provisioner_name") != PROVISIONER_NAME or not gpu_type:
                continue
            # Prefer the kernelspec `jupyter flexai install` names after the type.
            if name == KERNEL_NAME_PREFIX + gpu_type.lower() or gpu_type.lower() not in found:
                found[gpu_type.lower()] = name
        return found

    async def instance_models(self, kernels: dict[str, Any]) -> list[dict[str, Any]]:
        """Models of the kernels' instances, states from one platform listing per account."""
        by_client: dict[FlexAIClient, list[str]] = {}
        errors: dict[str, str] = {}
        for kernel_id, kernel in kernels.items():
            try:
                client = self.kernel_client(kernel.provisioner)
            except ComputeError as e:
                errors[kernel_id] = e.message
                continue
            by_client.setdefault(client, []).append(kernel_id)
        live: dict[str, Instance] = {}
        for client, kernel_ids in by_client.items():
            try:
                listed = await asyncio.to_thread(client.list_instances)
            except FlexAIError as e:
                errors.update(dict.fromkeys(kernel_ids, str(e)))
                continue
            live.update((i.id, i) for i in listed)
        models = []
        for kernel_id, kernel in kernels.items():
            instance_id = kernel.provisioner.instance_id
            error = errors.get(kernel_id)
            state = "unknown" if error else None
            instance = live.get(instance_id) if instance_id else None
            if instance is None and not error and instance_id:
                state = "deleted"  # the listing leaves out only deleted instances
            models.append(self.instance_model(kernel_id, kernel, instance, state, error))
        return models

    async def instance_status(self, instance_id: str) -> dict[str, Any]:
        kernel_id, kernel = self.kernel_on(instance_id)
        instance, state, error = None, None, None
        try:
            client = self.kernel_client(kernel.provisioner)
            instance = await asyncio.to_thread(client.get_instance, instance_id)
        except NotFoundError:
            state = "deleted"
        except (FlexAIError, ComputeError) as e:
            state, error = "unknown", str(e)
        return self.instance_model(kernel_id, kernel, instance, state, error)

    def instance_model(
        self,
        kernel_id: str,
        kernel: Any,
        instance: Instance | None,
        state: str | None,
        error: str | None,
    ) -> dict[str, Any]:
        """One kernel's instance: platform state (or ``state``), uptime and cost so far."""
        provisioner: FlexAIProvisioner = kernel.provisioner
        if instance is not None:
            self._instances[instance.id] = instance
        known = instance or self._instances.get(provisioner.instance_id or "")
        now = datetime.now(timezone.utc)
        model: dict[str, Any] = {
            "kernel_id": kernel_id,
            "kernel_name": kernel.kernel_name,
            "kernel_state": getattr(kernel, "execution_state", None),
            "instance_id": provisioner.instance_id,
            "state": instance.state.value if instance is not None else state or "unknown",
            "connected": provisioner.connected,
            "reconnects": provisioner.reconnects,
            "lost_reason": provisioner.lost_reason,
            "gpu_type": known.gpu_type if known else provisioner.gpu_type,
            "gpu_count": known.gpu_count if known else provisioner.gpu_count,
            "created_at": iso(known.created_at) if known else None,
            "uptime_seconds": round(known.uptime(now), 1) if known else None,
            "price_per_hour": known.price_per_hour if known else None,
            "cost_usd": round(known.cost(now), 6) if known else None,
            "limits": {
                "max_hours": provisioner.max_hours or None,
                "max_cost": provisioner.max_cost or None,
            },
            "phases": progress_model(kernel_id, self.serverapp.root_dir)["phases"],
        }
        if error:
            model["platform_error"] = error
        return model

    async def select(self, gpu_type: str, path: str | None) -> dict[str, Any]:
        """Start a kernel on ``gpu_type`` (in a new session for ``path``); wait until ready."""
        specs = await self.flexai_kernelspecs()
        kernel_name = specs.get(gpu_type.lower())
        if kernel_name is None:
            installed = ", ".join(sorted(specs)) or "none"
            raise ComputeError(
                400,
                f"no FlexAI kernelspec for GPU type {gpu_type!r} on this server (installed: "
                f"{installed}); add one with `jupyter flexai install`",
                gpu_types=sorted(specs),
            )
        session_id = None
        try:
            if path is None:
                kernel_id = await ensure_async(
                    self.serverapp.kernel_manager.start_kernel(kernel_name=kernel_name)
                )
            else:
                sm = self.serverapp.session_manager
                if await ensure_async(sm.session_exists(path=path)):
                    existing = await ensure_async(sm.get_session(path=path))
                    raise ComputeError(
                        409,
                        f"{path} already has a session (kernel {existing['kernel']['id']}): "
                        f"change its kernel with PATCH /api/sessions/{existing['id']}, or "
                        "shut it down first",
                    )
                session = await sm.create_session(
                    path=path,
                    name=path.rsplit("/", 1)[-1],
                    type="notebook",
                    kernel_name=kernel_name,
                )
                session_id, kernel_id = session["id"], session["kernel"]["id"]
        except FlexAIError as e:
            raise http_error(e) from None
        except ComputeError:
            raise
        except Exception as e:
            self.log.error("FlexAI kernel on %s failed to start", gpu_type, exc_info=True)
            raise ComputeError(502, f"the kernel on {gpu_type} failed to start: {e}") from None
        kernel = self.serverapp.kernel_manager.get_kernel(kernel_id)
        return {
            "kernel_id": kernel_id,
            "kernel_name": kernel_name,
            "instance_id": kernel.provisioner.instance_id,
            "gpu_type": kernel.provisioner.gpu_type,
            "session_id": session_id,
            "path": path,
            "phases": progress_model(kernel_id, self.serverapp.root_dir)["phases"],
        }

    async def stop(
        self, instance_id: str, reason: str = "stopped through the compute API"
    ) -> dict[str, Any]:
        """Shut the kernel on ``instance_id`` down, or cancel its start; either deletes the
        instance."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while True:
            cancelled = self.cancel_start_on(instance_id, reason)
            if cancelled is not None:
                kernel_id = cancelled
                await self.start_ended(kernel_id)
                break
            try:
                kernel_id, _ = self.kernel_on(instance_id)
            except ComputeError:
                # A start that has just ended is briefly neither starting nor listed by
                # jupyter_server; any other unknown instance is a 404 at once.
                if not self.just_started(instance_id) or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.02)
                continue
            await self.shutdown(kernel_id, reason)
            break
        last = progress.history(kernel_id)[-1:]
        cost = last[0].cost_usd if last and last[0].phase == "shut down" else None
        return {
            "kernel_id": kernel_id,
            "instance_id": instance_id,
            "state": "deleted",
            "cost_usd": None if cost is None else round(cost, 6),
        }

    def cancel_start_on(self, instance_id: str, reason: str) -> str | None:
        """Cancel the start that got ``instance_id``, if one is under way; its kernel id.

        jupyter_server has no kernel to shut down while a start request waits for its
        instance, so the start itself is abandoned.
        """
        for kernel_id, provisioner in starting().items():
            if provisioner.instance_id == instance_id and provisioner.cancel_start(reason):
                self.log.info("cancelling the start of FlexAI kernel %s: %s", kernel_id, reason)
                return kernel_id
        return None

    @staticmethod
    def just_started(instance_id: str) -> bool:
        """Whether a kernel's start got ``instance_id`` and reached ``ready`` as its last phase."""
        for kernel_id in progress.registry.kernel_ids():
            phases = progress.history(kernel_id)
            if phases and phases[-1].phase == "ready" and phases[-1].instance_id == instance_id:
                return True
        return False

    async def start_ended(self, kernel_id: str, timeout: float = 300.0) -> None:
        """Until a cancelled start has deleted its instance (its ``shut down`` phase)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while kernel_id in starting():
            if asyncio.get_running_loop().time() > deadline:
                raise ComputeError(
                    504, f"the cancelled start of kernel {kernel_id} did not end in {timeout:g} s"
                )
            await asyncio.sleep(0.05)

    async def sync(self, kernel_id: str) -> dict[str, Any]:
        """Copy back what the kernel made in its workspace, over the kernel's own connection."""
        kernel = self.flexai_kernels().get(kernel_id)
        if kernel is None:
            raise ComputeError(404, f"no FlexAI kernel {kernel_id} runs on this server")
        provisioner: FlexAIProvisioner = kernel.provisioner
        try:
            report = await provisioner.sync_workspace()
        except FlexAIError as e:
            raise http_error(e) from None
        root = Path(self.serverapp.root_dir).resolve()
        inside = report.directory.is_relative_to(root)
        directory = report.directory.relative_to(root).as_posix() if inside else None
        return {
            "kernel_id": kernel_id,
            "instance_id": provisioner.instance_id,
            "directory": "" if directory == "." else directory,
            "copied": report.copied,
            "conflicts": [{"path": kept, "saved_as": saved} for kept, saved in report.conflicts],
            "failed": [{"path": rel, "message": why} for rel, why in report.failed],
            "bytes": report.nbytes,
        }

    async def shutdown(self, kernel_id: str, reason: str) -> None:
        if kernel_id in self._stopping:
            return
        self._stopping.add(kernel_id)
        self.log.info("shutting FlexAI kernel %s down: %s", kernel_id, reason)
        try:
            await ensure_async(self.serverapp.kernel_manager.shutdown_kernel(kernel_id))
        finally:
            self._stopping.discard(kernel_id)

    # -- limits ----------------------------------------------------------------------------

    async def _watch_limits(self) -> None:
        while True:
            await asyncio.sleep(self.limit_check_interval)
            try:
                await self.enforce_limits()
            except Exception:
                self.log.exception("checking FlexAI kernel limits failed")

    async def enforce_limits(self) -> None:
        """Shut down each kernel whose instance ran past its max_hours or max_cost."""
        for kernel_id, kernel in self.flexai_kernels().items():
            provisioner: FlexAIProvisioner = kernel.provisioner
            instance_id = provisioner.instance_id
            if not (provisioner.max_hours or provisioner.max_cost) or instance_id is None:
                continue
            instance = self._instances.get(instance_id)
            if instance is None:
                try:
                    client = self.kernel_client(provisioner)
                    instance = await asyncio.to_thread(client.get_instance, instance_id)
                except (FlexAIError, ComputeError) as e:
                    self.log.warning(
                        "cannot check the limits of FlexAI kernel %s: %s", kernel_id, e
                    )
                    continue
                self._instances[instance_id] = instance
            reason = limit_reached(provisioner, instance)
            if reason is None or kernel_id in self._stopping:
                continue
            self.log.warning("FlexAI kernel %s: %s; shutting it down", kernel_id, reason)
            progress.publish(
                kernel_id,
                "limit reached",
                instance.uptime(),
                instance_id=instance_id,
                message=reason,
            )
            await self.shutdown(kernel_id, reason)
        live = {k.provisioner.instance_id for k in self.flexai_kernels().values()}
        for instance_id in set(self._instances) - live:
            del self._instances[instance_id]

    # -- events ----------------------------------------------------------------------------

    def _emit(self, event: progress.PhaseEvent) -> None:
        data: dict[str, Any] = {
            "kernel_id": event.kernel_id,
            "phase": event.phase,
            "elapsed_seconds": round(event.elapsed, 3),
        }
        if event.instance_id:
            data["instance_id"] = event.instance_id
        if event.cost_usd is not None:
            data["cost_usd"] = round(event.cost_usd, 6)
        if event.message:
            data["message"] = event.message
        path = notebook_path(event, self.serverapp.root_dir)
        if path:
            data["path"] = path
        try:
            self.serverapp.event_logger.emit(schema_id=SCHEMA_ID, data=data)
        except Exception:
            self.log.exception("could not emit the FlexAI progress event %s", data)


def limit_reached(provisioner: FlexAIProvisioner, instance: Instance) -> str | None:
    """Why the kernel must stop, or None while it is within its limits."""
    cost, hours = instance.cost(), instance.uptime() / 3600
    if provisioner.max_cost and cost >= provisioner.max_cost:
        return (
            f"instance {instance.id} has cost ${cost:.4f} at ${instance.price_per_hour:g}/h, "
            f"reaching the kernel's max_cost of ${provisioner.max_cost:g}"
        )
    if provisioner.max_hours and hours >= provisioner.max_hours:
        return (
            f"instance {instance.id} has run {hours:.4f} h, reaching the kernel's max_hours of "
            f"{provisioner.max_hours:g} h"
        )
    return None
