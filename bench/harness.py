"""What the benchmark runs on: private Jupyter dirs, kernelspecs, an emulator, a kernel registry.

Everything started here is ended here, by handle or pid, even when the run is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq.asyncio
from jupyter_client.manager import AsyncKernelManager

from flexai_provisioner.kernelspecs import kernelspec_dict

LOCAL = "python3"
FLEXAI = "flexai-a100"
OPENSSH = "flexai-a100-openssh"  # optional: the experimental OpenSSH forwarder
_FORWARDER_LABEL = "bench-forwarder"


class Environment:
    """Private JUPYTER_* and IPYTHONDIR dirs with a ``python3`` and a ``flexai-a100`` kernelspec."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="flexai-bench-"))
        self.api_key = "bench-" + secrets.token_hex(8)
        kernels = self.root / "jupyter-path" / "kernels"
        local = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (local)",
            "language": "python",
            "interrupt_mode": "signal",
            "metadata": {"debugger": True},
        }
        openssh = kernelspec_dict("A100")
        openssh["metadata"]["kernel_provisioner"]["config"]["labels"] = {
            _FORWARDER_LABEL: "openssh"
        }
        for name, spec in ((LOCAL, local), (FLEXAI, kernelspec_dict("A100")), (OPENSSH, openssh)):
            (kernels / name).mkdir(parents=True)
            (kernels / name / "kernel.json").write_text(json.dumps(spec))
        self.env = {
            "JUPYTER_PATH": str(self.root / "jupyter-path"),
            "JUPYTER_RUNTIME_DIR": str(self.root / "runtime"),
            "JUPYTER_DATA_DIR": str(self.root / "data"),
            "JUPYTER_CONFIG_DIR": str(self.root / "config"),
            "IPYTHONDIR": str(self.root / "ipython"),
            "FLEXAI_API_KEY": self.api_key,
        }
        self._saved = {name: os.environ.get(name) for name in [*self.env, "FLEXAI_API_URL"]}
        os.environ.update(self.env)

    def restore(self) -> None:
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(self.root, ignore_errors=True)


def use_openssh_when_labelled() -> None:
    """Give sessions of the OPENSSH kernelspec an OpenSSHTunnel instead of the default.

    The provisioner has no setting for it (it is an experiment), so the bench swaps the
    tunnel right after the session connects; the master starts while the kernel launches.
    """
    from bench.openssh import OpenSSHTunnel
    from flexai_provisioner import session

    connect = session.InstanceSession.connect

    def connect_then_swap(self: session.InstanceSession, phase: Any) -> dict[str, int]:
        ports = connect(self, phase)
        if self.settings.labels.get(_FORWARDER_LABEL) == "openssh":
            assert self.tunnel is not None and self.conn is not None
            self.tunnel.close()
            tunnel = OpenSSHTunnel(session.PORT_NAMES, private_key=self.key.pair.private_openssh)
            tunnel.start(self.conn.transport)
            self.tunnel = tunnel  # type: ignore[assignment]
            ports = self.local_ports
        return ports

    session.InstanceSession.connect = connect_then_swap  # type: ignore[method-assign]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmulatorProcess:
    """``python -m flexai_provisioner.emulator`` in a subprocess, so it shares no GIL with us.

    Instances boot in ``provision_delay`` seconds (none by default); ``link_latency_ms`` each
    way on SSH connections to instances. Stopped with SIGTERM (it then deletes every
    instance); it also gets SIGTERM if this process dies without cleaning up.
    """

    def __init__(
        self, env: Environment, link_latency_ms: float = 0.0, provision_delay: float = 0.0
    ):
        name = f"emulator-link-{link_latency_ms:g}" if link_latency_ms else "emulator"
        if provision_delay:
            name += f"-boot-{provision_delay:g}"
        self.log_path = env.root / f"{name}.log"
        out_path = env.root / f"{name}.out"
        with open(self.log_path, "wb") as log, open(out_path, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flexai_provisioner.emulator",
                    "--port=0",
                    f"--api-key={env.api_key}",
                    f"--state-dir={env.root / name}",
                    f"--provision-delay={provision_delay}",
                    f"--link-latency-ms={link_latency_ms}",
                    "--capacity=A100=64",  # the catalog has 8; the scale run needs more
                    "--log-level=WARNING",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = out_path.read_text()
            if "listening on " in text:
                self.url = text.split("listening on ", 1)[1].split()[0]
                os.environ["FLEXAI_API_URL"] = self.url
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the emulator did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Kernels:
    """Every kernel manager the run started, so that all are shut down whatever happens.

    Like jupyter_server's MultiKernelManager, all managers share one ZeroMQ context (two
    native threads in all, not two per kernel).
    """

    def __init__(self, log_path: Path) -> None:
        self.managers: list[AsyncKernelManager] = []
        self.context = zmq.asyncio.Context()
        self.kernel_log = open(log_path, "ab")  # noqa: SIM115 - closed in shutdown_all

    def new(self, kernel_name: str) -> AsyncKernelManager:
        km = AsyncKernelManager(kernel_name=kernel_name, context=self.context)
        self.managers.append(km)
        return km

    async def shutdown_all(self, keep_context: bool = False) -> None:
        async def down(km: AsyncKernelManager) -> None:
            with contextlib.suppress(Exception):
                if km.has_kernel or getattr(km.provisioner, "instance_id", None):
                    await asyncio.wait_for(km.shutdown_kernel(now=True), 60)

        managers, self.managers = self.managers, []
        await asyncio.gather(*(down(km) for km in managers))
        if not keep_context:
            self.kernel_log.close()
            self.context.destroy(linger=0)


def process_stats() -> tuple[float, int]:
    """This process's resident memory (MB) and thread count (native threads included)."""
    rss_kb = threads = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss_kb / 1024, threads


Empty = queue.Empty
