"""The workspace figure: a notebook folder's upload at a kernel's start, against ``cp -r`` of
the same files on this machine. Shared by the loopback run and the link run."""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from flexai_provisioner import progress

from .harness import FLEXAI, Kernels
from .ops import TIMEOUT


def make_folder(root: Path, megabytes: int) -> tuple[Path, int]:
    """A notebook folder of ``megabytes`` MiB of random bytes, shaped like a project: four
    fifths in 4 MiB data files, the rest in 64 KiB files. Returns it and its file count."""
    folder = root / "notebook-folder"
    (folder / "data").mkdir(parents=True)
    (folder / "src").mkdir()
    total = megabytes * 1024 * 1024
    big, small = 4 * 1024 * 1024, 64 * 1024
    count = 0
    for i in range(total * 4 // 5 // big):
        (folder / "data" / f"part-{i:03}.bin").write_bytes(os.urandom(big))
        count += 1
    while sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) + small <= total:
        (folder / "src" / f"module_{count:04}.py").write_bytes(os.urandom(small))
        count += 1
    return folder, count


async def measure_workspace(
    megabytes: int, runs: int, kernels: Kernels, root: Path, log: Any
) -> dict[str, Any]:
    """The upload of a notebook folder at a kernel's start (its ``uploading files`` phase, to
    ``starting kernel``) against ``cp -r`` of the same files on this machine, interleaved."""
    folder, count = make_folder(Path(tempfile.mkdtemp(dir=root)), megabytes)
    nbytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    uploads: list[float] = []
    copies: list[float] = []
    restarts: list[float] = []
    for _ in range(runs):
        dest = folder.with_name("cp-copy")
        t0 = time.perf_counter()
        await asyncio.to_thread(subprocess.run, ["cp", "-r", str(folder), str(dest)], check=True)
        copies.append(time.perf_counter() - t0)
        shutil.rmtree(dest)
        km = kernels.new(FLEXAI)
        await asyncio.wait_for(km.start_kernel(cwd=str(folder)), TIMEOUT)
        phases = {e.phase: e.elapsed for e in progress.history(km.kernel_id)}
        uploads.append(phases["starting kernel"] - phases["uploading files"])
        t0 = time.perf_counter()  # nothing changed: the restart's upload only compares
        await asyncio.wait_for(km.restart_kernel(), TIMEOUT)
        restarts.append(time.perf_counter() - t0)
        await asyncio.wait_for(km.shutdown_kernel(now=True), TIMEOUT)
        log(f"workspace: upload {uploads[-1]:.3f} s, cp {copies[-1]:.3f} s")
    upload_mb_s = nbytes / 1e6 / statistics.median(uploads)
    cp_mb_s = nbytes / 1e6 / statistics.median(copies)
    return {
        "megabytes": round(nbytes / 1e6, 3),
        "files": count,
        "upload_mb_s": round(upload_mb_s, 3),
        "cp_mb_s": round(cp_mb_s, 3),
        "ratio": round(upload_mb_s / cp_mb_s, 4),
        "restart_unchanged_s": round(statistics.median(restarts), 3),
        "upload_s": [round(u, 3) for u in uploads],
        "cp_s": [round(c, 3) for c in copies],
    }


def workspace_line(figure: dict[str, Any]) -> str:
    return (
        f"workspace: {figure['megabytes']:.1f} MB in {figure['files']} files uploaded at "
        f"{figure['upload_mb_s']:.1f} MB/s, cp -r {figure['cp_mb_s']:.1f} MB/s: ratio "
        f"{figure['ratio']:.3f}; restart with it unchanged {figure['restart_unchanged_s']:.2f} s"
    )
