"""The figures over a distant link, as round trips in excess of a local kernel's.

A second emulator puts its delay relay (``--link-latency-ms``) in front of every instance's
sshd, so each SSH exchange crosses ``one_way_ms`` each way, as with a real GPU instance some
way off. Three kinds are measured in the same run, samples interleaved:

- ``local``: a local ``python3`` kernel (no link at all: the physical limit is local + n RTTs);
- ``flexai``: ``flexai-a100`` through the provisioner over the delayed link;
- ``peer``: the same local kernel reached through jupyter_client's own paramiko tunnel
  (``jupyter_client.ssh.tunnel.paramiko_tunnel`` for each of the five ports, as
  ``tunnel_to_kernel`` opens them) through the same relay and an instance's sshd.

Times are reported in seconds and as ``excess_rtts``: (kind - local) / the round trip time
calibrated on the link itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.ssh import tunnel

from flexai_provisioner.client import FlexAIClient
from flexai_provisioner.gpu_platform import InstanceState

from .harness import FLEXAI, LOCAL, EmulatorProcess, Environment, Kernels
from .ops import (
    TIMEOUT,
    drain_iopub,
    interrupt,
    last_samples,
    restart,
    rtts,
    settle,
    shutdown,
    start_phases,
    throughput,
    wait_ready,
)
from .workspace import measure_workspace

PEER = "peer"
KINDS = (LOCAL, FLEXAI, PEER)
PORTS = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
TIMES = ("start", "first_reply", "restart", "interrupt", "shutdown")


@dataclass
class LinkConfig:
    one_way_ms: float = 25.0
    samples: int = 5  # starts, restarts, interrupts and shutdowns per kind
    rtts: int = 100
    rtt_warmup: int = 10
    megabytes: int = 20
    throughput_runs: int = 3
    calibrations: int = 30
    workspace_mb: int = 50
    workspace_runs: int = 1

    @classmethod
    def quick(cls) -> LinkConfig:
        return cls(
            samples=1,
            rtts=5,
            rtt_warmup=1,
            megabytes=1,
            throughput_runs=1,
            calibrations=5,
            workspace_mb=2,
        )


class PeerTunnel:
    """jupyter_client's paramiko tunnel to local kernels, through one emulator instance.

    The instance is provisioned once, with a key of the bench's own; each kernel gets five
    tunnel processes, as ``tunnel_to_kernel`` would start them.
    """

    def __init__(self, root: Path) -> None:
        key = Ed25519PrivateKey.generate()
        self.key_file = root / "peer_ed25519"
        self.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
        self.key_file.chmod(0o600)
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        self.client = FlexAIClient()
        self.instance_id = self.client.provision("A100", ssh_public_key=public.decode()).id
        deadline = time.monotonic() + TIMEOUT
        while (inst := self.client.get_instance(self.instance_id)).state is not (
            InstanceState.RUNNING
        ):
            if time.monotonic() > deadline or inst.state is InstanceState.FAILED:
                raise RuntimeError(f"peer instance {self.instance_id}: {inst.state} {inst.message}")
            time.sleep(0.05)
        assert inst.ssh is not None
        self.ssh = inst.ssh
        self.server = f"{inst.ssh.user}@{inst.ssh.host}:{inst.ssh.port}"
        self._processes: dict[int, list[multiprocessing.Process]] = {}

    def calibrate(self, count: int) -> list[float]:
        """Round trips of an SSH global request that sshd answers at once, in seconds."""
        transport = paramiko.Transport(socket.create_connection((self.ssh.host, self.ssh.port)))
        try:
            transport.start_client(timeout=TIMEOUT)
            transport.auth_publickey(
                self.ssh.user, paramiko.Ed25519Key.from_private_key_file(str(self.key_file))
            )
            samples = []
            for _ in range(count):
                t0 = time.perf_counter()
                transport.global_request("keepalive@openssh.com", wait=True)
                samples.append(time.perf_counter() - t0)
            return samples
        finally:
            transport.close()

    async def start(
        self, kernels: Kernels
    ) -> tuple[AsyncKernelManager, AsyncKernelClient, float, float]:
        """A local kernel and its tunnels → returned, then → first kernel_info reply."""
        km = kernels.new(LOCAL)
        t0 = time.perf_counter()
        out = kernels.kernel_log
        await asyncio.wait_for(km.start_kernel(stdout=out, stderr=out), TIMEOUT)
        info = km.get_connection_info()
        local_ports = tunnel.select_random_ports(len(PORTS))
        loop = asyncio.get_running_loop()
        # paramiko_tunnel blocks: a trial login, then a process per port.
        self._processes[id(km)] = [
            await loop.run_in_executor(
                None,
                lambda lp=lp, name=name: tunnel.paramiko_tunnel(
                    lp, info[name], self.server, "127.0.0.1", str(self.key_file)
                ),
            )
            for lp, name in zip(local_ports, PORTS, strict=True)
        ]
        started = time.perf_counter() - t0
        kc = AsyncKernelClient(context=kernels.context)
        kc.load_connection_info({**info, **dict(zip(PORTS, local_ports, strict=True))})
        kc.start_channels(hb=False)
        await wait_ready(km, kc, "the peer (a local kernel through its paramiko tunnel)")
        ready = time.perf_counter() - t0
        await drain_iopub(kc)
        return km, kc, started, ready

    async def shutdown(self, km: AsyncKernelManager, kc: AsyncKernelClient) -> float:
        elapsed = await shutdown(km, kc)
        self._stop_tunnels(km)
        return elapsed

    def _stop_tunnels(self, km: AsyncKernelManager) -> None:
        # SIGKILL: a forked tunnel inherits the bench's SIGTERM handler, which only wakes an
        # event loop the child does not run; and the tunnel has nothing to clean up.
        for process in self._processes.pop(id(km), []):
            process.kill()
            process.join()

    def close(self) -> None:
        for km_id in list(self._processes):
            for process in self._processes.pop(km_id):
                process.kill()
                process.join()
        with contextlib.suppress(Exception):
            self.client.delete_instance(self.instance_id)
        self.client.close()


async def _start(kind: str, kernels: Kernels, peer: PeerTunnel) -> tuple[Any, Any, float, float]:
    return await (peer.start(kernels) if kind == PEER else start_phases(kernels, kind))


async def _shutdown(kind: str, km: Any, kc: Any, peer: PeerTunnel) -> float:
    return await (peer.shutdown(km, kc) if kind == PEER else shutdown(km, kc))


async def measure(cfg: LinkConfig, kernels: Kernels, peer: PeerTunnel, log: Any) -> dict:
    """Raw samples per kind: seconds for the times, per-execute seconds, MB/s."""
    raw: dict[str, dict[str, list[float]]] = {
        k: {name: [] for name in (*TIMES, "rtt", "throughput")} for k in KINDS
    }
    live: dict[str, tuple[Any, Any]] = {}
    for i in range(cfg.samples):
        for kind in KINDS:
            km, kc, started, ready = await _start(kind, kernels, peer)
            raw[kind]["start"].append(started)
            raw[kind]["first_reply"].append(ready)
            if i < cfg.samples - 1:
                raw[kind]["shutdown"].append(await _shutdown(kind, km, kc, peer))
            else:
                live[kind] = (km, kc)
        log(f"link start {i + 1}/{cfg.samples}: " + last_samples(raw, "first_reply"))
    await settle()
    for kind in KINDS:
        await rtts(live[kind][1], 0, cfg.rtt_warmup)
    block = max(1, min(25, cfg.rtts // 4))
    while len(raw[LOCAL]["rtt"]) < cfg.rtts:
        for kind in KINDS:
            raw[kind]["rtt"] += await rtts(live[kind][1], block, 0)
    log("link rtt: " + last_samples(raw, "rtt"))
    for _ in range(cfg.throughput_runs):
        for kind in KINDS:
            raw[kind]["throughput"].append(await throughput(live[kind][1], cfg.megabytes))
    log("link throughput MB/s: " + last_samples(raw, "throughput", scale=1))
    for _ in range(cfg.samples):
        for kind in KINDS:
            raw[kind]["interrupt"].append(await interrupt(*live[kind]))
            raw[kind]["restart"].append(await restart(*live[kind]))
    log(f"link interrupt: {last_samples(raw, 'interrupt')}")
    log(f"link restart: {last_samples(raw, 'restart')}")
    for kind in KINDS:
        raw[kind]["shutdown"].append(await _shutdown(kind, *live.pop(kind), peer))
    log("link shutdown: " + last_samples(raw, "shutdown"))
    return raw


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def summarise(
    raw: dict[str, dict[str, list[float]]], rtt: float, kind: str, label: str
) -> dict[str, Any]:
    """``kind``'s figures (under ``label``) against the local kernel's: medians, excess RTTs."""

    def excess(local: float, other: float) -> dict[str, float]:
        return {
            "local": round(local, 6),
            label: round(other, 6),
            "excess_rtts": round((other - local) / rtt, 2),
        }

    figures: dict[str, Any] = {
        name: excess(statistics.median(raw[LOCAL][name]), statistics.median(raw[kind][name]))
        for name in (*TIMES, "rtt")
    }
    figures["rtt"]["p95"] = excess(_p95(raw[LOCAL]["rtt"]), _p95(raw[kind]["rtt"]))
    local_mb, other_mb = (statistics.median(raw[k]["throughput"]) for k in (LOCAL, kind))
    figures["throughput"] = {
        "local": round(local_mb, 3),
        label: round(other_mb, 3),
        "ratio": round(other_mb / local_mb, 3),
    }
    return figures


def table(results: dict[str, Any]) -> str:
    rows = [
        f"link: {results['one_way_ms']:g} ms each way, calibrated round trip "
        f"{results['rtt_ms']:.1f} ms; excess round trips over a local kernel",
        f"{'figure':<22}{'local':>10}{'flexai':>10}{'excess':>9}{'peer':>10}{'excess':>9}",
    ]
    flexai, peer = results["figures"], results["peer"]
    rows_of = [(name, name) for name in (*TIMES, "rtt")] + [("rtt p95", "p95")]
    for label, name in rows_of:
        f = flexai["rtt"]["p95"] if name == "p95" else flexai[name]
        p = peer["rtt"]["p95"] if name == "p95" else peer[name]
        rows.append(
            f"{label + ' (s)':<22}{f['local']:>10.4f}{f['flexai']:>10.4f}"
            f"{f['excess_rtts']:>+8.2f}R{p['peer']:>10.4f}{p['excess_rtts']:>+8.2f}R"
        )
    f, p = flexai["throughput"], peer["throughput"]
    rows.append(
        f"{'throughput (MB/s)':<22}{f['local']:>10.1f}{f['flexai']:>10.1f}{f['ratio']:>8.2f}x"
        f"{p['peer']:>10.1f}{p['ratio']:>8.2f}x"
    )
    return "\n".join(rows)


async def run_link(cfg: LinkConfig, env: Environment, kernels: Kernels, log: Any) -> dict:
    """Start the delayed emulator, measure the three kinds, stop it; the results section."""
    emulator = EmulatorProcess(env, link_latency_ms=cfg.one_way_ms)
    peer: PeerTunnel | None = None
    try:
        loop = asyncio.get_running_loop()
        peer = await loop.run_in_executor(None, PeerTunnel, Path(tempfile.mkdtemp(dir=env.root)))
        calibration = await loop.run_in_executor(None, peer.calibrate, cfg.calibrations)
        rtt = statistics.median(calibration)
        log(f"link: {cfg.one_way_ms:g} ms each way, round trip {rtt * 1000:.1f} ms")
        raw = await measure(cfg, kernels, peer, log)
        workspace = await measure_workspace(
            cfg.workspace_mb, cfg.workspace_runs, kernels, env.root, log
        )
        return {
            "one_way_ms": cfg.one_way_ms,
            "rtt_ms": round(rtt * 1000, 3),
            "figures": summarise(raw, rtt, FLEXAI, "flexai"),
            "peer": summarise(raw, rtt, PEER, "peer"),
            "workspace": workspace,
            "samples_ms": {
                kind: {name: [round(v * 1000, 3) for v in raw[kind][name]] for name in TIMES}
                for kind in KINDS
            },
        }
    finally:
        await kernels.shutdown_all(keep_context=True)
        if peer is not None:
            peer.close()
        emulator.stop()
