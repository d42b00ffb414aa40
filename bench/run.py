"""The measurements, the table and the JSON file.

Each figure is measured for a local ``python3`` kernel (jupyter_client's LocalProvisioner,
this venv's ipykernel) and for ``flexai-a100`` on the emulator (same ipykernel, reached over
SSH through the provisioner), interleaved where it is cheap so that a noisy machine hurts
both alike. Medians throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from .harness import (
    FLEXAI,
    LOCAL,
    OPENSSH,
    EmulatorProcess,
    Environment,
    Kernels,
    process_stats,
    use_openssh_when_labelled,
)
from .link import LinkConfig, run_link
from .link import table as link_table
from .ops import (
    MachineCPU,
    last_samples,
    restart,
    rtts,
    settle,
    shutdown,
    start_ready,
    throughput,
)
from .warm import WarmConfig, run_warm
from .warm import table as warm_table
from .workspace import measure_workspace, workspace_line

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.json"

TARGETS = {  # ratio flexai/local issue 15 asks for on loopback
    "start": ("<=", 1.15),
    "rtt": ("<=", 1.10),
    "throughput": (">=", 0.85),
    "restart": ("<=", 1.0),
    "shutdown": (None, None),
}
SCALE_TARGETS = {"rss_mb_per_kernel": 30.0, "threads_per_kernel": 4.0}


@dataclass
class Config:
    starts: int = 7  # start/shutdown samples per kind
    warmup: bool = True  # one untimed start+shutdown of each kind first
    rtts: int = 300
    rtt_warmup: int = 30
    megabytes: int = 50
    throughput_runs: int = 9  # short runs on a noisy machine: many, interleaved
    restarts: int = 9  # bimodal: jupyter_client polls for the old kernel's exit every 100 ms
    scale: int = 16
    scale_rtts: int = 50
    local_scale: bool = True  # the same scale run with local kernels, for reference
    openssh: bool = False  # also measure the experimental OpenSSH forwarder
    workspace_mb: int = 50  # the notebook folder copied to the instance at each start
    workspace_runs: int = 3
    link: LinkConfig | None = field(default_factory=LinkConfig)  # None: no link run
    link_only: bool = False  # skip the loopback figures
    warm: WarmConfig | None = field(default_factory=WarmConfig)  # None: no warm-start run

    @classmethod
    def quick(cls) -> Config:
        return cls(
            starts=1,
            warmup=False,
            rtts=20,
            rtt_warmup=2,
            megabytes=2,
            throughput_runs=1,
            restarts=1,
            scale=2,
            scale_rtts=5,
            workspace_mb=2,
            workspace_runs=1,
            link=LinkConfig.quick(),
            warm=WarmConfig.quick(),
        )


# -- phases ------------------------------------------------------------------------------


def _ms(values: list[float]) -> list[float]:
    return [round(v * 1000, 3) for v in values]


async def measure_kinds(cfg: Config, kernels: Kernels, log: Any) -> dict[str, dict[str, Any]]:
    """start/rtt/throughput/restart/shutdown for each kind; raw samples per kind."""
    kinds = (LOCAL, FLEXAI, OPENSSH) if cfg.openssh else (LOCAL, FLEXAI)
    raw: dict[str, dict[str, Any]] = {k: {"start": [], "shutdown": []} for k in kinds}
    if cfg.warmup:
        for kind in kinds:
            km, kc, _ = await start_ready(kernels, kind)
            await shutdown(km, kc)
        log("warm-up done")
    live: dict[str, tuple[AsyncKernelManager, Any]] = {}
    for i in range(cfg.starts):  # interleaved: local, flexai, local, flexai, ...
        for kind in kinds:
            km, kc, elapsed = await start_ready(kernels, kind)
            raw[kind]["start"].append(elapsed)
            if i < cfg.starts - 1:
                raw[kind]["shutdown"].append(await shutdown(km, kc))
            else:
                live[kind] = (km, kc)
        log(f"start {i + 1}/{cfg.starts}: " + last_samples(raw, "start"))
    cpu = {kind: {"rtt": MachineCPU(), "throughput": MachineCPU()} for kind in kinds}
    await settle()
    for kind in kinds:
        raw[kind]["rtt"] = []
        await rtts(live[kind][1], 0, cfg.rtt_warmup)
    block = max(1, min(25, cfg.rtts // 4))
    while len(raw[LOCAL]["rtt"]) < cfg.rtts:  # interleaved blocks, so drift hurts both alike
        for kind in kinds:
            with cpu[kind]["rtt"].measure():
                raw[kind]["rtt"] += await rtts(live[kind][1], block, 0)
    log("rtt ms: " + ", ".join(f"{k} {statistics.median(raw[k]['rtt']) * 1000:.3f}" for k in kinds))
    for kind in kinds:
        raw[kind]["throughput"] = []
    for _ in range(cfg.throughput_runs):
        for kind in kinds:
            with cpu[kind]["throughput"].measure():
                raw[kind]["throughput"].append(await throughput(live[kind][1], cfg.megabytes))
        log("throughput MB/s: " + last_samples(raw, "throughput", scale=1))
    for kind in kinds:
        raw[kind]["restart"] = []
    for _ in range(cfg.restarts):
        for kind in kinds:
            raw[kind]["restart"].append(await restart(*live[kind]))
        log("restart: " + last_samples(raw, "restart"))
    for kind in kinds:
        km, kc = live.pop(kind)
        instance_id = getattr(km.provisioner, "instance_id", None)
        raw[kind]["shutdown"].append(await shutdown(km, kc))
        if instance_id is not None and not _instance_deleted(instance_id):
            raise RuntimeError(f"instance {instance_id} outlived its kernel's shutdown")
    log("shutdown: " + last_samples(raw, "shutdown"))
    megabytes = cfg.megabytes * 1.048576 * cfg.throughput_runs  # MiB per run, in MB
    for kind in kinds:
        raw[kind]["cpu"] = {
            "rtt_ms": round(cpu[kind]["rtt"].busy / len(raw[kind]["rtt"]) * 1000, 3),
            "throughput_ms_per_mb": round(cpu[kind]["throughput"].busy / megabytes * 1000, 3),
            "throughput_cores_busy": round(cpu[kind]["throughput"].cores_busy, 2),
        }
    return raw


def _instance_deleted(instance_id: str) -> bool:
    from flexai_provisioner.client import FlexAIClient
    from flexai_provisioner.errors import NotFoundError
    from flexai_provisioner.gpu_platform import InstanceState

    try:
        return FlexAIClient().get_instance(instance_id).state is InstanceState.DELETED
    except NotFoundError:
        return True


async def measure_scale(cfg: Config, kernels: Kernels, kind: str, log: Any) -> dict[str, Any]:
    """``cfg.scale`` kernels started at once; what they add to this process; rtt under load."""
    n = cfg.scale
    rss0, threads0 = process_stats()
    t0 = time.perf_counter()
    started = await asyncio.gather(*(start_ready(kernels, kind) for _ in range(n)))
    total = time.perf_counter() - t0
    await asyncio.sleep(0.5)  # let transient threads (pools) settle into what stays
    rss1, threads1 = process_stats()
    series = await asyncio.gather(
        *(rtts(kc, cfg.scale_rtts, min(cfg.rtt_warmup, 5)) for _, kc, _ in started)
    )
    medians = [statistics.median(s) for s in series]
    t1 = time.perf_counter()
    await asyncio.gather(*(shutdown(km, kc) for km, kc, _ in started))
    result = {
        "kernels": n,
        "rss_mb_per_kernel": round((rss1 - rss0) / n, 3),
        "threads_per_kernel": round((threads1 - threads0) / n, 3),
        "start_total_s": round(total, 3),
        "start_each_s": [round(e, 3) for _, _, e in started],
        "rtt_ms_median": round(statistics.median(medians) * 1000, 3),
        "rtt_ms_max_of_medians": round(max(medians) * 1000, 3),
        "shutdown_total_s": round(time.perf_counter() - t1, 3),
        "rss_mb": [round(rss0, 1), round(rss1, 1)],
        "threads": [threads0, threads1],
    }
    log(f"scale {kind} x{n}: {json.dumps(result)}")
    return result


# -- report ------------------------------------------------------------------------------


def summarise(
    raw: dict[str, dict[str, Any]], kind: str = FLEXAI
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The figures of ``kind`` against the local kernel, and min/median/max of each."""
    figures: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for name in ("start", "rtt", "throughput", "restart", "shutdown"):
        local = statistics.median(raw[LOCAL][name])
        flexai = statistics.median(raw[kind][name])
        figures[name] = {
            "local": round(local, 6),
            "flexai": round(flexai, 6),
            "ratio": round(flexai / local, 3),
        }
        details[name] = {
            k: {
                "n": len(raw[k][name]),
                "min": round(min(raw[k][name]), 6),
                "median": round(statistics.median(raw[k][name]), 6),
                "max": round(max(raw[k][name]), 6),
            }
            for k in (LOCAL, kind)
        }
    return figures, details


def table(figures: dict[str, Any], scale: dict[str, Any], details: dict[str, Any]) -> str:
    units = {
        "start": ("s", 1),
        "rtt": ("ms", 1000),
        "throughput": ("MB/s", 1),
        "restart": ("s", 1),
        "shutdown": ("s", 1),
    }
    rows = [f"{'figure':<18}{'local':>10}{'flexai':>10}{'ratio':>9}  target", "-" * 58]
    for name, fig in figures.items():
        unit, k = units[name]
        op, target = TARGETS[name]
        goal = f"{op} {target}x" if op else "-"
        mark = ""
        if op == "<=":
            mark = " ok" if fig["ratio"] <= target else " MISS"
        elif op == ">=":
            mark = " ok" if fig["ratio"] >= target else " MISS"
        rows.append(
            f"{name + ' (' + unit + ')':<18}{fig['local'] * k:>10.3f}{fig['flexai'] * k:>10.3f}"
            f"{fig['ratio']:>8.2f}x  {goal}{mark}"
        )
    start_min = details["start"]
    rows.append(
        f"{'start min (s)':<18}{start_min[LOCAL]['min']:>10.3f}{start_min[FLEXAI]['min']:>10.3f}"
        f"{start_min[FLEXAI]['min'] / start_min[LOCAL]['min']:>8.2f}x"
    )
    rows.append("")
    n = scale["kernels"]
    rows.append(f"scale: {n} flexai kernels started at once in {scale['start_total_s']:.2f} s")
    for key, target in SCALE_TARGETS.items():
        mark = "ok" if scale[key] <= target else "MISS"
        rows.append(f"  {key:<22}{scale[key]:>8.2f}   <= {target:g}  {mark}")
    rows.append(
        f"  rtt under load        {scale['rtt_ms_median']:>8.3f} ms median "
        f"(worst kernel {scale['rtt_ms_max_of_medians']:.3f} ms)"
    )
    return "\n".join(rows)


def cpu_line(cpu: dict[str, dict[str, float]]) -> str:
    """The machine's CPU per round trip and per MB of output: what the tunnel adds to a kernel's
    own cost, wherever it runs (ratios flexai/local)."""
    local, flexai = cpu[LOCAL], cpu[FLEXAI]

    def ratio(name: str) -> str:  # a tiny run can measure no CPU tick at all
        return f"{flexai[name] / local[name]:.2f}x" if local[name] else "-"

    return (
        f"machine CPU: {local['rtt_ms']:.2f} / {flexai['rtt_ms']:.2f} ms per round trip "
        f"({ratio('rtt_ms')}), {local['throughput_ms_per_mb']:.2f} / "
        f"{flexai['throughput_ms_per_mb']:.2f} ms per MB of output "
        f"({ratio('throughput_ms_per_mb')}) with "
        f"{local['throughput_cores_busy']:.2f} / {flexai['throughput_cores_busy']:.2f} of "
        f"{os.cpu_count()} CPUs busy (local / flexai)"
    )


def openssh_table(figures: dict[str, Any]) -> str:
    rows = [f"{'figure':<18}{'local':>10}{'openssh':>10}{'ratio':>9}"]
    for name, fig in figures.items():
        k = 1000 if name == "rtt" else 1
        rows.append(
            f"{name:<18}{fig['local'] * k:>10.3f}{fig['flexai'] * k:>10.3f}{fig['ratio']:>8.2f}x"
        )
    return "\n".join(rows)


# -- entry point -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results JSON")
    parser.add_argument("--starts", type=int, help="start/shutdown samples per kind")
    parser.add_argument("--rtts", type=int, help="execute('pass') round trips per kind")
    parser.add_argument("--megabytes", type=int, help="MiB of stdout per throughput run")
    parser.add_argument("--restarts", type=int, help="restart samples per kind")
    parser.add_argument("--scale", type=int, help="flexai kernels started at once")
    parser.add_argument("--no-local-scale", action="store_true", help="skip local scale run")
    parser.add_argument(
        "--openssh", action="store_true", help="also measure the experimental OpenSSH forwarder"
    )
    parser.add_argument("--workspace-mb", type=int, help="MiB of the uploaded notebook folder")
    parser.add_argument(
        "--link-ms",
        type=float,
        default=LinkConfig.one_way_ms,
        metavar="MS",
        help=f"one-way delay of the link run (default {LinkConfig.one_way_ms:g})",
    )
    link = parser.add_mutually_exclusive_group()
    link.add_argument("--no-link", action="store_true", help="skip the run over a delayed link")
    link.add_argument("--link-only", action="store_true", help="only the run over the link")
    parser.add_argument(
        "--no-warm",
        action="store_true",
        help="skip the warm-start run (two `jupyter execute` runs with keep_alive)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="provisioner logs")
    args = parser.parse_args(argv)
    cfg = Config.quick() if args.quick else Config()
    for name in ("starts", "rtts", "megabytes", "restarts", "scale", "workspace_mb"):
        if getattr(args, name) is not None:
            setattr(cfg, name, max(1, getattr(args, name)))
    if args.no_local_scale:
        cfg.local_scale = False
    cfg.openssh = args.openssh
    if args.no_link:
        cfg.link = None
    else:
        assert cfg.link is not None
        cfg.link.one_way_ms = args.link_ms
    cfg.link_only = args.link_only
    if args.no_warm or args.link_only:
        cfg.warm = None
    return cfg, args


async def run_loopback(cfg: Config, env: Environment, kernels: Kernels, log: Any) -> dict:
    """The figures on loopback (zero delay): printed, and returned as the results' top level."""
    emulator = EmulatorProcess(env)
    try:
        log(f"emulator at {emulator.url}; {asdict(cfg)}")
        if cfg.openssh:
            use_openssh_when_labelled()
        raw = await measure_kinds(cfg, kernels, log)
        scale = await measure_scale(cfg, kernels, FLEXAI, log)

        async def reference_scale(kind: str) -> dict[str, Any] | None:
            """A scale run for comparison only: its failure must not cost the figures above
            (once, one of 16 local kernels started at once never answered)."""
            try:
                return await measure_scale(cfg, kernels, kind, log)
            except Exception as e:
                log(f"scale {kind} failed: {e!r}")
                await kernels.shutdown_all(keep_context=True)
                return None

        local_scale = await reference_scale(LOCAL) if cfg.local_scale else None
        openssh_scale = await reference_scale(OPENSSH) if cfg.openssh else None
        workspace = await measure_workspace(
            cfg.workspace_mb, cfg.workspace_runs, kernels, env.root, log
        )
    finally:
        await kernels.shutdown_all(keep_context=True)
        emulator.stop()
    figures, details = summarise(raw)
    details["scale_local"] = local_scale
    details["samples_ms"] = {
        kind: {k: _ms(v) for k, v in raw[kind].items() if k not in ("rtt", "throughput", "cpu")}
        for kind in raw
    }
    details["cpu"] = {kind: raw[kind]["cpu"] for kind in raw}
    details["throughput_mb_s"] = {kind: raw[kind]["throughput"] for kind in raw}
    if cfg.openssh:
        details["openssh"] = summarise(raw, OPENSSH)[0]
        details["scale_openssh"] = openssh_scale
    print(table(figures, scale, details))
    print("\n" + cpu_line(details["cpu"]))
    print(workspace_line(workspace))
    if cfg.openssh:
        print("\nexperimental OpenSSH forwarder (ssh -L via a ControlMaster), same run:")
        print(openssh_table(details["openssh"]))
        if openssh_scale is None:
            print("scale: failed (see the log above)")
        else:
            print(
                f"scale: {openssh_scale['kernels']} kernels in "
                f"{openssh_scale['start_total_s']:.2f} s, "
                f"{openssh_scale['rss_mb_per_kernel']:.2f} MB and "
                f"{openssh_scale['threads_per_kernel']:.2f} threads per kernel, rtt under load "
                f"{openssh_scale['rtt_ms_median']:.3f} ms"
            )
    return {"figures": figures, "scale": scale, "workspace": workspace, "details": details}


async def run(cfg: Config, output: Path) -> int:
    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    env = Environment()
    kernels = Kernels(env.root / "kernels.log")
    results: dict[str, Any] = {}
    try:
        if not cfg.link_only:
            results = await run_loopback(cfg, env, kernels, log)
        if cfg.link is not None:
            results["link"] = await run_link(cfg.link, env, kernels, log)
            print("\n" + link_table(results["link"]))
            print(workspace_line(results["link"]["workspace"]))
        if cfg.warm is not None:
            results["warm"] = await run_warm(cfg.warm, env, log)
            print("\n" + warm_table(results["warm"]))
        results.setdefault("details", {})["config"] = asdict(cfg)
        results["details"]["machine"] = {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        }
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwritten to {output}")
        return 0
    finally:
        await asyncio.shield(kernels.shutdown_all())
        env.restore()


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    try:
        return asyncio.run(run(cfg, args.output))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
