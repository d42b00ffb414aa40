"""What the benchmark does to a kernel, each step timed: start, execute, restart, interrupt,
stream output, shut down. Shared by the loopback run and the link run."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from .harness import Empty, Kernels

TIMEOUT = 120.0  # for any single step; a hang fails the run instead of stalling it
SETTLE = 1.0  # the standby waits 50 ms for quiet, then imports for ~0.3 s


class MachineCPU:
    """CPU seconds this whole machine spent in measured steps, added up: busy (not idle or
    waiting for I/O, whatever process) and in all (wall time times CPUs). Whatever the tunnel
    costs (sshd, encryption, the relay) shows here, wherever it runs."""

    def __init__(self) -> None:
        self.busy = self.total = 0.0

    @contextmanager
    def measure(self) -> Iterator[None]:
        busy, total = _cpu_seconds()
        try:
            yield
        finally:
            now_busy, now_total = _cpu_seconds()
            self.busy += now_busy - busy
            self.total += now_total - total

    @property
    def cores_busy(self) -> float:
        return self.busy / self.total * (os.cpu_count() or 1) if self.total else 0.0


def _cpu_seconds() -> tuple[float, float]:
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz


async def settle() -> None:
    """Between the starts and the round trips: a FlexAI launch's next standby imports once its
    kernel is up (~0.3-0.4 s of CPU, once per launch, on the cores both kinds share), a cost of
    the start that no round trip of either kind should carry."""
    await asyncio.sleep(SETTLE)


def _parent(msg: dict[str, Any]) -> str | None:
    return msg.get("parent_header", {}).get("msg_id")


async def wait_ready(km: AsyncKernelManager, kc: AsyncKernelClient, what: str = "") -> None:
    """Until the first kernel_info reply (re-asked every 2 s in case a request was lost);
    a kernel that dies first fails the run at once, saying so."""
    name = what or km.kernel_name
    deadline = time.monotonic() + TIMEOUT
    asked: set[str] = set()
    while time.monotonic() < deadline:
        asked.add(kc.kernel_info())
        try:
            while True:
                msg = await kc.get_shell_msg(timeout=2)
                if msg["msg_type"] == "kernel_info_reply" and _parent(msg) in asked:
                    return
        except Empty:
            if not await km.is_alive():
                raise RuntimeError(f"{name} died before its first kernel_info reply") from None
    raise TimeoutError(f"no kernel_info reply from {name} in {TIMEOUT:g} s")


async def drain_iopub(kc: AsyncKernelClient, quiet: float = 0.05) -> None:
    while True:
        try:
            await kc.get_iopub_msg(timeout=quiet)
        except Empty:
            return


async def start_phases(
    kernels: Kernels, name: str
) -> tuple[AsyncKernelManager, AsyncKernelClient, float, float]:
    """start_kernel → returned, then → first kernel_info reply through a fresh client;
    returns the manager, its client and the seconds to each, both from the call."""
    km = kernels.new(name)
    t0 = time.perf_counter()
    # The local kernel's own output goes to a log file (the FlexAI one's stays remote).
    out = kernels.kernel_log
    await asyncio.wait_for(km.start_kernel(stdout=out, stderr=out), TIMEOUT)
    started = time.perf_counter() - t0
    # As jupyter_server's websocket bridge: the manager's shared context, no heartbeat thread.
    kc = km.client(context=kernels.context)
    kc.start_channels(hb=False)
    await wait_ready(km, kc)
    ready = time.perf_counter() - t0
    await drain_iopub(kc)
    return km, kc, started, ready


async def start_ready(kernels: Kernels, name: str) -> tuple[AsyncKernelManager, Any, float]:
    """start_kernel → first kernel_info reply; returns the manager, its client and seconds."""
    km, kc, _, ready = await start_phases(kernels, name)
    return km, kc, ready


async def shutdown(km: AsyncKernelManager, kc: Any) -> float:
    """shutdown_kernel → returned (for FlexAI that includes the instance's deletion)."""
    kc.stop_channels()
    t0 = time.perf_counter()
    await asyncio.wait_for(km.shutdown_kernel(), TIMEOUT)
    return time.perf_counter() - t0


async def restart(km: AsyncKernelManager, kc: Any) -> float:
    """restart_kernel → the new kernel's first kernel_info reply, through the same client."""
    t0 = time.perf_counter()
    await asyncio.wait_for(km.restart_kernel(), TIMEOUT)
    await wait_ready(km, kc)
    elapsed = time.perf_counter() - t0
    await drain_iopub(kc)
    return elapsed


async def execute(kc: Any, code: str) -> float:
    """Seconds from execute_request to its execute_reply; then waits for idle (untimed)."""
    t0 = time.perf_counter()
    msg_id = kc.execute(code, store_history=False)
    while _parent(await kc.get_shell_msg(timeout=TIMEOUT)) != msg_id:
        pass
    elapsed = time.perf_counter() - t0
    while True:
        msg = await kc.get_iopub_msg(timeout=TIMEOUT)
        if (
            _parent(msg) == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            return elapsed


async def rtts(kc: Any, count: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await execute(kc, "pass")
    return [await execute(kc, "pass") for _ in range(count)]


async def interrupt(km: AsyncKernelManager, kc: Any) -> float:
    """interrupt_kernel() while a cell sleeps → that cell's execute_reply (KeyboardInterrupt)."""
    msg_id = kc.execute("import time; time.sleep(60)", store_history=False)
    while not (
        (msg := await kc.get_iopub_msg(timeout=TIMEOUT))["msg_type"] == "execute_input"
        and _parent(msg) == msg_id
    ):
        pass
    await asyncio.sleep(0.05)  # untimed: let the cell reach its sleep
    t0 = time.perf_counter()
    await asyncio.wait_for(km.interrupt_kernel(), TIMEOUT)
    while _parent(reply := await kc.get_shell_msg(timeout=TIMEOUT)) != msg_id:
        pass
    elapsed = time.perf_counter() - t0
    if reply["content"].get("ename") != "KeyboardInterrupt":
        raise RuntimeError(f"the interrupted cell ended with {reply['content']}")
    await drain_iopub(kc)
    return elapsed


THROUGHPUT_CODE = """\
import sys
_chunk = "x" * (1024 * 1024 - 1) + "\\n"
for _ in range({n}):
    sys.stdout.write(_chunk)
    sys.stdout.flush()
del _chunk
"""


async def throughput(kc: Any, megabytes: int) -> float:
    """MB/s of stdout received over iopub: execute_request → the last byte and idle."""
    t0 = time.perf_counter()
    msg_id = kc.execute(THROUGHPUT_CODE.format(n=megabytes), store_history=False)
    received = 0
    while True:
        msg = await kc.get_iopub_msg(timeout=TIMEOUT)
        if _parent(msg) != msg_id:
            continue
        if msg["msg_type"] == "stream":
            received += len(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            raise RuntimeError(f"throughput code failed: {msg['content']}")
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    elapsed = time.perf_counter() - t0
    while _parent(await kc.get_shell_msg(timeout=TIMEOUT)) != msg_id:
        pass
    if received < megabytes * 1024 * 1024:
        raise RuntimeError(f"received {received} bytes of {megabytes} MiB")
    return received / 1e6 / elapsed


def last_samples(raw: dict[str, dict[str, Any]], key: str, scale: float = 1000) -> str:
    """The latest sample of ``key`` for each kind, for progress lines (ms unless ``scale``)."""
    unit = "ms" if scale == 1000 else ""
    return ", ".join(f"{k} {v[key][-1] * scale:.1f}{unit}" for k, v in raw.items())
