"""The Jupyter server extension: what outlives a request, and its hooks into the server.

:class:`FlexAIExtension` holds the settings, the :class:`~.manager.ComputeManager` that the
handlers (:mod:`.handlers`) call, the subscription that turns provisioner progress into
jupyter_events, the periodic check of each kernel's ``max_hours``/``max_cost``, and the one
change it makes to jupyter_server's own objects: a shutdown of a starting kernel cancels
its start (:meth:`FlexAIExtension._cancel_starts_on_shutdown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from pathlib import Path
from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.extension.application import ExtensionApp
from traitlets import Float

from .. import exit_cleanup, progress
from ..provisioner import starting
from .handlers import handlers
from .manager import ComputeManager
from .models import event_data

SCHEMA_ID = "https://flex.ai/schemas/jupyter/compute/v1"
SCHEMA_FILE = Path(__file__).parent / "events" / "compute.yaml"


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
        self.compute = ComputeManager(
            self.serverapp,
            self.log,
            platform_timeout=self.platform_timeout,
            health_timeout=self.health_timeout,
        )
        self._unsubscribe: Any = None
        self._limits_task: asyncio.Task[None] | None = None
        self.serverapp.event_logger.register_event_schema(SCHEMA_FILE)

    def initialize_handlers(self) -> None:
        self.handlers.extend((path, cls, {"compute": self.compute}) for path, cls in handlers)

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

        The method is replaced on the server's kernel manager instance, the only such change
        the extension makes: a subclass would take ``kernel_manager_class`` away from the
        user's config (pending kernels, JupyterHub's managers).
        """
        shutdown_kernel = kernel_manager.shutdown_kernel

        async def cancelling_shutdown(kernel_id: str, *args: Any, **kwargs: Any) -> None:
            cancelled = await self.compute.cancel_start(kernel_id, "shut down while starting")
            if not cancelled or kernel_id in kernel_manager:
                await ensure_async(shutdown_kernel(kernel_id, *args, **kwargs))

        kernel_manager.shutdown_kernel = cancelling_shutdown

    async def stop_extension(self) -> None:
        # Before the server shuts its kernels down, which would wait for each start to end.
        reason = "the server is stopping"
        await asyncio.gather(*(self.compute.cancel_start(k, reason) for k in starting()))
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._limits_task is not None:
            self._limits_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._limits_task
        self.compute.close()

    async def _watch_limits(self) -> None:
        while True:
            await asyncio.sleep(self.limit_check_interval)
            try:
                await self.compute.enforce_limits()
            except Exception:
                self.log.exception("checking FlexAI kernel limits failed")

    def _emit(self, event: progress.PhaseEvent) -> None:
        data = event_data(event, self.compute.root_dir)
        try:
            self.serverapp.event_logger.emit(schema_id=SCHEMA_ID, data=data)
        except Exception:
            self.log.exception("could not emit the FlexAI progress event %s", data)
