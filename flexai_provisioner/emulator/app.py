"""The :class:`Emulator`: one local FlexAI platform, for tests in-process and for the CLI."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from .api import ApiServer
from .catalog import DEFAULT_GPU_TYPES, GPUCatalogEntry
from .errors import EmulatorError
from .faults import FaultInjector, Faults
from .instances import Cloud
from .sshd import ensure_privsep_dir, find_sshd

log = logging.getLogger("flexai_provisioner.emulator")


class Emulator:
    """A FlexAI platform on 127.0.0.1 whose instances are real sshd processes.

    Each API key is one account. ``provision_delay``, when given, overrides the one in
    ``faults``. ``instance_python_dir`` leads the PATH of SSH sessions, so ``python3`` there
    is this Python (with ipykernel) by default. Raises :class:`EmulatorError` at once if sshd
    is not installed.
    """

    def __init__(
        self,
        port: int = 0,
        api_keys: Iterable[str] = ("key",),
        provision_delay: float | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        gpu_types: Iterable[GPUCatalogEntry] | None = None,
        faults: Faults | None = None,
        *,
        sshd_path: str | None = None,
        instance_python_dir: str | None = None,
        grace: float = 3.0,
    ):
        self.api_keys = (api_keys,) if isinstance(api_keys, str) else tuple(api_keys)
        if not self.api_keys or not all(isinstance(k, str) and k.strip() for k in self.api_keys):
            raise ValueError("api_keys must be one or more non-empty strings")
        self.port = port
        self.sshd_path = find_sshd(sshd_path)
        catalog = tuple(DEFAULT_GPU_TYPES if gpu_types is None else gpu_types)
        names = [entry.name for entry in catalog]
        if not names or len(set(names)) != len(names):
            raise ValueError("gpu_types must offer at least one GPU type, each name once")
        faults = (faults or Faults()).copy()
        if provision_delay is not None:
            faults.update(provision_delay=provision_delay)
        self._injector = FaultInjector(faults, names)
        self._own_state_dir = state_dir is None
        self.state_dir = Path(
            tempfile.mkdtemp(prefix="flexai-emulator-") if state_dir is None else state_dir
        ).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._cloud = Cloud(
            catalog=catalog,
            injector=self._injector,
            state_dir=self.state_dir,
            sshd_path=self.sshd_path,
            instance_python_dir=instance_python_dir or os.path.dirname(sys.executable),
            # The account sshd can log in as: the effective user, whatever $USER says.
            user=pwd.getpwuid(os.geteuid()).pw_name,
            grace=grace,
        )
        self._server: ApiServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    # --- running --------------------------------------------------------------------------

    def start(self) -> Emulator:
        """Serve in a daemon thread; returns self. EmulatorError if the port is taken."""
        with self._lock:
            if self._server is not None:
                return self
            if self._stopped:
                raise EmulatorError("this emulator was stopped; create a new one")
            ensure_privsep_dir()
            try:
                self._server = ApiServer(self.port, self._cloud, self._injector, self.api_keys)
            except OSError as exc:
                raise EmulatorError(f"cannot listen on 127.0.0.1:{self.port}: {exc}") from None
            self.port = self._server.server_address[1]
            self._cloud.start()
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},
                name="flexai-emulator-http",
                daemon=True,
            )
            self._thread.start()
        log.info("FlexAI emulator listening on %s (state in %s)", self.url, self.state_dir)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Delete every instance, then stop serving. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            server, self._server = self._server, None
        self._cloud.close()
        if server is not None:
            server.close()
        if self._thread is not None:
            self._thread.join()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        log.info("FlexAI emulator stopped")

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def serve_forever_until_signal(self) -> None:
        """Serve in the foreground until SIGINT or SIGTERM, then delete every instance.

        Call from the main thread (signal handlers can only be installed there).
        """
        received = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s, deleting every instance", signal.Signals(signum).name)
            received.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            while not received.wait(1.0):
                pass
        finally:
            try:
                self.stop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    # --- faults ---------------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        """The live faults: assigning an attribute takes effect at the next request."""
        return self._injector.faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._injector.faults = faults

    def update_faults(self, **changes: Any) -> Faults:
        """Change some faults at run time; ValueError (changing nothing) on a bad one."""
        return self._injector.update(**changes)

    def reset_faults(self) -> None:
        """Back to the faults the emulator was created with."""
        self._injector.reset()

    # --- inspection and cleanup -----------------------------------------------------------

    def live_instances(self) -> list[str]:
        """Ids of instances that may hold resources: not deleted, stopped or failed."""
        return self._cloud.live_ids()

    def processes(self) -> list[int]:
        """Pids of every live process of any instance of this emulator, sshd included."""
        return sorted(self._cloud.processes())

    def preempt(self, instance_id: str) -> None:
        """Reclaim an instance as the platform would: deleted, then unknown (404)."""
        self._cloud.preempt(instance_id)

    def delete_all(self) -> list[str]:
        """Delete every instance not yet deleted (whatever its account); return their ids."""
        return self._cloud.delete_all()
