"""What the compute API does with this server's FlexAI kernels: start, stop, sync, limits.

Truth about an instance comes from the platform; a kernel's provisioner is only asked which
instance it runs on. Every platform call blocks, so each runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from jupyter_core.utils import ensure_async

from .. import __version__, progress
from ..client import FlexAIClient
from ..config import limit_reached
from ..errors import ConfigurationError, FlexAIError, NotFoundError
from ..gpu_platform import GPUType, Instance
from ..kernelspecs import KERNEL_NAME_PREFIX, PROVISIONER_NAME
from ..ledger import Ledger
from ..parking import discard, parked_models
from ..provisioner import FlexAIProvisioner, starting
from .models import (
    ComputeError,
    http_error,
    instance_model,
    progress_model,
    sync_model,
)


class ComputeManager:
    """The FlexAI kernels of one Jupyter server, their instances and the platform clients."""

    def __init__(
        self,
        serverapp: Any,
        log: logging.Logger | logging.LoggerAdapter[Any],
        *,
        platform_timeout: float,
        health_timeout: float,
    ):
        self.serverapp = serverapp
        self.log = log
        self._platform_timeout = platform_timeout
        self._health_timeout = health_timeout
        self._clients: dict[tuple[str, str, bool], FlexAIClient] = {}
        self._instances: dict[str, Instance] = {}  # immutable facts: price, creation time
        self._stopping: set[str] = set()

    @property
    def root_dir(self) -> str:
        """The server's root, which the API's notebook paths are relative to."""
        return str(self.serverapp.root_dir)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    # -- platform --------------------------------------------------------------------------

    def client(
        self, api_url: str | None = None, api_key: str | None = None, *, health: bool = False
    ) -> FlexAIClient:
        """A client for these settings; by default the server's ``FlexAIProvisioner`` config,
        the one every kernel's provisioner starts from, read without building a provisioner
        (:class:`FlexAIClient` falls back on the environment and the credentials file)."""
        if api_url is None or api_key is None:
            configured = self.serverapp.config.get(FlexAIProvisioner.__name__, {})
            api_url, api_key = configured.get("api_url", ""), configured.get("api_key", "")
        key = (api_url, api_key, health)
        if key not in self._clients:
            try:
                self._clients[key] = FlexAIClient(
                    api_url or None,
                    api_key or None,
                    timeout=self._health_timeout if health else self._platform_timeout,
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

    async def instance_models(self) -> list[dict[str, Any]]:
        """Models of the kernels' instances, states from one platform listing per account."""
        kernels = self.flexai_kernels()
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

    async def parked_models(self) -> list[dict[str, Any]]:
        """This user's instances parked between kernels (``keep_alive``) on the server's
        platform; none if they cannot be listed (the kernels' instances matter more)."""
        try:
            client = self.client()
            return await asyncio.to_thread(parked_models, client, Ledger(), client.api_url)
        except (FlexAIError, ComputeError) as e:
            self.log.warning("cannot list the parked FlexAI instances: %s", e)
            return []

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
        """The kernel's instance model, with what is remembered of an instance the platform
        did not describe this time."""
        if instance is not None:
            self._instances[instance.id] = instance
        known = instance or self._instances.get(kernel.provisioner.instance_id or "")
        return instance_model(kernel_id, kernel, instance, known, state, error, self.root_dir)

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
                session_id, kernel_id = await self._start_session(path, kernel_name)
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
            "phases": progress_model(kernel_id, self.root_dir)["phases"],
        }

    async def _start_session(self, path: str, kernel_name: str) -> tuple[str, str]:
        """A new notebook session for ``path`` on ``kernel_name``: its id and its kernel's."""
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
            path=path, name=path.rsplit("/", 1)[-1], type="notebook", kernel_name=kernel_name
        )
        return session["id"], session["kernel"]["id"]

    async def stop(
        self, instance_id: str, reason: str = "stopped through the compute API"
    ) -> dict[str, Any]:
        """Shut the kernel on ``instance_id`` down, or cancel its start, or if it is parked
        (``keep_alive``) delete it; each deletes the instance."""
        client = self.client()
        try:
            args = (client, Ledger(), client.api_url, instance_id, self._platform_timeout)
            if await asyncio.to_thread(discard, *args):
                return {
                    "kernel_id": None,
                    "instance_id": instance_id,
                    "state": "deleted",
                    "cost_usd": None,
                }
        except FlexAIError as e:
            raise http_error(e) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while True:
            # jupyter_server has no kernel to shut down while a start request waits for its
            # instance, so the start itself is abandoned.
            starts = [k for k, p in starting().items() if p.instance_id == instance_id]
            if starts and await self.cancel_start(starts[0], reason):
                kernel_id = starts[0]
                try:  # a start cancelled while adopting parks the instance again: delete it
                    await asyncio.to_thread(discard, *args)
                except FlexAIError as e:
                    raise http_error(e) from None
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

    async def cancel_start(self, kernel_id: str, reason: str, timeout: float = 300.0) -> bool:
        """Cancel the kernel's first start if one is under way, and wait until it has deleted
        its instance (its ``shut down`` phase); False if none was."""
        provisioner = starting().get(kernel_id)
        if provisioner is None or not provisioner.cancel_start(reason):
            return False
        self.log.info("cancelling the start of FlexAI kernel %s: %s", kernel_id, reason)
        deadline = asyncio.get_running_loop().time() + timeout
        while kernel_id in starting():
            if asyncio.get_running_loop().time() > deadline:
                raise ComputeError(
                    504, f"the cancelled start of kernel {kernel_id} did not end in {timeout:g} s"
                )
            await asyncio.sleep(0.05)
        return True

    @staticmethod
    def just_started(instance_id: str) -> bool:
        """Whether a kernel's start got ``instance_id`` and reached ``ready`` as its last phase."""
        for kernel_id in progress.registry.kernel_ids():
            phases = progress.history(kernel_id)
            if phases and phases[-1].phase == "ready" and phases[-1].instance_id == instance_id:
                return True
        return False

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
        return sync_model(kernel_id, provisioner.instance_id, report, self.root_dir)

    async def shutdown(self, kernel_id: str, reason: str) -> None:
        if kernel_id in self._stopping:
            return
        self._stopping.add(kernel_id)
        self.log.info("shutting FlexAI kernel %s down: %s", kernel_id, reason)
        kernel = self.serverapp.kernel_manager.get_kernel(kernel_id)
        kernel.provisioner.keep_alive = 0  # stopped, or past a limit: deleted, not parked
        try:
            await ensure_async(self.serverapp.kernel_manager.shutdown_kernel(kernel_id))
        finally:
            self._stopping.discard(kernel_id)

    # -- limits ----------------------------------------------------------------------------

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
            reason = limit_reached(provisioner.max_hours, provisioner.max_cost, instance)
            if reason is None or kernel_id in self._stopping:
                continue
            progress.report_instance(self.log, kernel_id, "limit reached", instance, reason)
            await self.shutdown(kernel_id, reason)
        live = {k.provisioner.instance_id for k in self.flexai_kernels().values()}
        for instance_id in set(self._instances) - live:
            del self._instances[instance_id]
