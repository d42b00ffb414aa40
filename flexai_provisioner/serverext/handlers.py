"""The ``/api/compute`` handlers: parse, authorise, call the extension, answer JSON.

Authentication and XSRF are jupyter_server's own (``APIHandler`` with ``@web.authenticated``
and ``@authorized``); every error answers JSON with a ``message``.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from .. import progress
from .manager import ComputeManager
from .models import ComputeError, progress_model

_ID = r"(?P<{}>[^/]+)"


class ComputeHandler(ExtensionHandlerMixin, APIHandler):
    """Base of the compute handlers: kernel actions need the ``kernels`` permission."""

    auth_resource = "kernels"

    def initialize(self, name: str, compute: ComputeManager) -> None:
        super().initialize(name)
        self.compute = compute

    def reply(self, model: dict[str, Any], status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(model))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(error, ComputeError):
            super().write_error(status_code, **kwargs)
            return
        self.log.warning("%s %s: %d %s", self.request.method, self.request.path, status_code, error)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": error.message, "reason": self._reason, **error.extra}))


class AvailableHandler(ComputeHandler):
    auth_resource = "kernelspecs"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        types = await self.compute.gpu_types()
        specs = await self.compute.flexai_kernelspecs()
        self.reply(
            {
                "gpu_types": [
                    {
                        "name": t.name,
                        "memory_gb": t.memory_gb,
                        "price_per_hour": t.price_per_hour,
                        "available": t.available,
                        "kernel_name": specs.get(t.name.lower()),
                    }
                    for t in types
                ]
            }
        )


class SelectHandler(ComputeHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError as e:
            raise ComputeError(400, f"the body is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise ComputeError(400, 'the body must be a JSON object such as {"gpu_type": "A100"}')
        unknown = sorted(set(body) - {"gpu_type", "path"})
        if unknown:
            raise ComputeError(400, f"unknown fields {unknown}: only gpu_type and path are read")
        gpu_type, path = body.get("gpu_type"), body.get("path")
        if not isinstance(gpu_type, str) or not gpu_type.strip():
            raise ComputeError(400, "gpu_type must be a GPU type name such as 'A100'")
        if path is not None and (not isinstance(path, str) or not path.strip("/")):
            raise ComputeError(400, "path must be a notebook path such as 'work/train.ipynb'")
        model = await self.compute.select(gpu_type.strip(), path and path.strip("/"))
        self.reply(model, 201)


class InstancesHandler(ComputeHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        models = await self.compute.instance_models()
        self.reply({"instances": models, "parked": await self.compute.parked_models()})


class InstanceHandler(ComputeHandler):
    @web.authenticated
    @authorized
    async def get(self, instance_id: str) -> None:
        self.reply(await self.compute.instance_status(instance_id))


class StopHandler(ComputeHandler):
    @web.authenticated
    @authorized
    async def post(self, instance_id: str) -> None:
        self.reply(await self.compute.stop(instance_id))


class SyncHandler(ComputeHandler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        self.reply(await self.compute.sync(kernel_id))


class ProgressHandler(ComputeHandler):
    @web.authenticated
    @authorized
    async def get(self, kernel_id: str | None = None) -> None:
        root = self.compute.root_dir
        if kernel_id is None:
            kernels = progress.registry.kernel_ids()
            self.reply({"kernels": [progress_model(k, root) for k in kernels]})
            return
        if not progress.history(kernel_id):
            raise ComputeError(404, f"no FlexAI kernel {kernel_id} has started on this server")
        self.reply(progress_model(kernel_id, root))


class HealthHandler(ComputeHandler):
    auth_resource = "api"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(await self.compute.health())


handlers: list[tuple[str, type[ComputeHandler]]] = [
    (r"/api/compute/available", AvailableHandler),
    (r"/api/compute/select", SelectHandler),
    (r"/api/compute/instances", InstancesHandler),
    (r"/api/compute/instance/" + _ID.format("instance_id"), InstanceHandler),
    (r"/api/compute/instance/" + _ID.format("instance_id") + "/stop", StopHandler),
    (r"/api/compute/sync/" + _ID.format("kernel_id"), SyncHandler),
    (r"/api/compute/progress", ProgressHandler),
    (r"/api/compute/progress/" + _ID.format("kernel_id"), ProgressHandler),
    (r"/api/compute/health", HealthHandler),
]
