"""Warm starts across processes: two consecutive ``jupyter execute`` runs on ``keep_alive``.

An emulator of its own boots each instance for ``provision_delay`` seconds (as a real cloud
takes 30-120 s). A small notebook is run by ``jupyter execute``, each run a process of its
own, as a pipeline's steps would be:

- ``local``: on the local ``python3`` kernel (the baseline), before and after the others;
- ``cold``: on ``flexai-a100`` with a keep-alive: provisions, boots, parks the instance;
- ``warm``: the same again, which adopts the parked instance.

Each run's figure is its *time to first reply*: from the moment its process is spawned to
the moment the notebook's first cell runs (the cell prints ``time.time()``; the instance's
clock is this machine's on the emulator). The interpreter's own start and imports are in
every figure alike. The result is ``warm`` over ``local`` (target <= 1.5).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

from flexai_provisioner.kernelspecs import kernelspec_dict

from .harness import LOCAL, EmulatorProcess, Environment

WARM_KERNEL = "flexai-a100-keep-alive"
TARGET = 1.5
FIRST_CELL = "import time\nprint(repr(time.time()))"
CELLS = (FIRST_CELL, "import os\nsum(range(10**6)), os.getpid()")


@dataclass
class WarmConfig:
    provision_delay: float = 30.0
    keep_alive: int = 600
    local_runs: int = 2  # before and after the FlexAI runs: the machine's drift hurts both

    @classmethod
    def quick(cls) -> WarmConfig:
        return cls(provision_delay=2.0, local_runs=1)


def _notebook(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    path = folder / "pipeline-step.ipynb"
    nbformat.write(nb, path)
    return path


def _install_kernelspec(env: Environment, keep_alive: int) -> None:
    spec = kernelspec_dict("A100")
    spec["metadata"]["kernel_provisioner"]["config"]["keep_alive"] = keep_alive
    directory = env.root / "jupyter-path" / "kernels" / WARM_KERNEL
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kernel.json").write_text(json.dumps(spec))


def execute(notebook: Path, kernel: str, name: str) -> dict[str, Any]:
    """``jupyter execute`` the notebook on ``kernel``: its time to first reply and in all."""
    output = f"{notebook.stem}-{name}"
    spawned = time.time()
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("jupyter")),
            "execute",
            f"--kernel_name={kernel}",
            f"--output={output}",
            str(notebook),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    total = time.time() - spawned
    if done.returncode != 0:
        raise RuntimeError(f"jupyter execute ({name}) failed: {done.stderr[-2000:]}")
    executed = nbformat.read(notebook.with_name(output + ".ipynb"), as_version=4)
    replied = float(executed.cells[0].outputs[0]["text"])
    return {
        "first_reply": round(replied - spawned, 4),
        "total": round(total, 4),
        "log": done.stderr,
    }


def _ready(log: str) -> tuple[str | None, float | None]:
    """The instance a run's kernel ran on and the seconds its start took, from its ``ready``
    phase line (``...: ready (1.4s) on instance inst-...``)."""
    for line in log.splitlines():
        if ": ready (" in line and "on instance " in line:
            seconds = line.split(": ready (", 1)[1].split("s)", 1)[0]
            return line.rsplit("on instance ", 1)[1].split()[0], float(seconds)
    return None, None


def _delete_parked() -> list[str]:
    from flexai_provisioner.client import FlexAIClient
    from flexai_provisioner.ledger import Ledger
    from flexai_provisioner.reaper import reap_orphans

    with FlexAIClient() as client:
        return [r.instance_id for r in reap_orphans(client, Ledger(), client.api_url, parked=True)]


def measure(cfg: WarmConfig, env: Environment, log: Any) -> dict[str, Any]:
    """The runs, in a fixed order: local, cold, warm, local."""
    _install_kernelspec(env, cfg.keep_alive)
    notebook = _notebook(env.root / "warm-notebooks")
    emulator = EmulatorProcess(env, provision_delay=cfg.provision_delay)
    try:
        log(f"warm: emulator at {emulator.url}, {cfg.provision_delay:g} s to boot an instance")
        local = [execute(notebook, LOCAL, "local-0")]
        cold = execute(notebook, WARM_KERNEL, "cold")
        log(f"warm: cold start's first reply after {cold['first_reply']:.2f} s")
        warm = execute(notebook, WARM_KERNEL, "warm")
        log(f"warm: warm start's first reply after {warm['first_reply']:.2f} s")
        local += [execute(notebook, LOCAL, f"local-{i}") for i in range(1, cfg.local_runs)]
        deleted = _delete_parked()
    finally:
        emulator.stop()
    baseline = statistics.median(r["first_reply"] for r in local)
    cold_instance, cold_ready = _ready(cold["log"])
    warm_instance, warm_ready = _ready(warm["log"])
    return {
        "provision_delay_s": cfg.provision_delay,
        "keep_alive_s": cfg.keep_alive,
        "first_reply": {
            "local": round(baseline, 4),
            "cold": cold["first_reply"],
            "warm": warm["first_reply"],
            "ratio": round(warm["first_reply"] / baseline, 3),
            "target": TARGET,
        },
        "total": {
            "local": round(statistics.median(r["total"] for r in local), 4),
            "cold": cold["total"],
            "warm": warm["total"],
        },
        # The provisioner's own start (its phases, from the request to ready), in each run.
        "kernel_ready": {"cold": cold_ready, "warm": warm_ready},
        "adopted": cold_instance is not None and cold_instance == warm_instance,
        "parked_deleted": deleted,
        "local_samples": [r["first_reply"] for r in local],
    }


async def run_warm(cfg: WarmConfig, env: Environment, log: Any) -> dict[str, Any]:
    return await asyncio.to_thread(measure, cfg, env, log)


def table(results: dict[str, Any]) -> str:
    f, t = results["first_reply"], results["total"]
    mark = "ok" if f["ratio"] <= f["target"] else "MISS"
    return "\n".join(
        [
            f"warm start: two `jupyter execute` runs, {results['provision_delay_s']:g} s to boot, "
            f"keep_alive {results['keep_alive_s']} s"
            + ("" if results["adopted"] else " (the second run did NOT adopt the instance)"),
            f"{'':<22}{'local':>10}{'cold':>10}{'warm':>10}{'warm/local':>12}  target",
            f"{'first reply (s)':<22}{f['local']:>10.3f}{f['cold']:>10.3f}{f['warm']:>10.3f}"
            f"{f['ratio']:>11.2f}x  <= {f['target']:g}x {mark}",
            f"{'whole run (s)':<22}{t['local']:>10.3f}{t['cold']:>10.3f}{t['warm']:>10.3f}",
            f"{'FlexAI start (s)':<22}{'':>10}{_s(results['kernel_ready']['cold'])}"
            f"{_s(results['kernel_ready']['warm'])}   (its phases, request to ready)",
        ]
    )


def _s(seconds: float | None) -> str:
    return f"{'?':>10}" if seconds is None else f"{seconds:>10.3f}"
