"""Smoke test of the benchmark (``python -m bench``): it runs, cleans up and writes its JSON.

Benchmarks are not tests: no timing is asserted here, only that the tiny configuration runs
end to end and that the results file has the shape bench/README.md documents.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("start", "rtt", "throughput", "restart", "shutdown")
LINK_TIMES = ("start", "first_reply", "restart", "interrupt", "shutdown", "rtt")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        pytest.param(
            ["--openssh", "--no-local-scale", "--no-link", "--no-warm"],
            marks=pytest.mark.skipif(not shutil.which("ssh"), reason="no OpenSSH client"),
        ),
    ],
    ids=["default", "with-openssh-forwarder"],
)
def test_quick_bench_writes_results(tmp_path: Path, extra: list[str]) -> None:
    output = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())

    assert set(results["figures"]) == set(FIGURES)
    for name in FIGURES:
        figure = results["figures"][name]
        assert set(figure) == {"local", "flexai", "ratio"}, name
        assert all(_number(v) and v > 0 for v in figure.values()), (name, figure)

    scale = results["scale"]
    assert scale["kernels"] == 2
    assert _number(scale["threads_per_kernel"]) and scale["threads_per_kernel"] > 0
    # Resident memory can in principle shrink (freed arenas): only its type is checked.
    assert _number(scale["rss_mb_per_kernel"])
    _check_workspace(results["workspace"])
    cpu = results["details"]["cpu"]
    kinds = {"python3", "flexai-a100", *(["flexai-a100-openssh"] if "--openssh" in extra else [])}
    assert set(cpu) == kinds
    for kind in cpu.values():  # a tiny run may see no CPU tick at all: no zero is refused
        assert set(kind) == {"rtt_ms", "throughput_ms_per_mb", "throughput_cores_busy"}
        assert all(_number(v) and v >= 0 for v in kind.values()), kind
        assert kind["throughput_cores_busy"] <= os.cpu_count()
    assert "machine CPU:" in result.stdout
    assert "start" in result.stdout and "ratio" in result.stdout
    assert "workspace:" in result.stdout
    if "--no-link" in extra:
        assert "link" not in results
    else:
        _check_link(results["link"])
    if "--no-warm" in extra:
        assert "warm" not in results
    else:
        _check_warm(results["warm"])
        assert "warm start" in result.stdout
    if "--openssh" in extra:
        openssh = results["details"]["openssh"]
        assert set(openssh) == set(FIGURES)
        assert all(_number(v) and v > 0 for fig in openssh.values() for v in fig.values())
        assert results["details"]["scale_openssh"]["kernels"] == 2


def _check_workspace(workspace: dict) -> None:
    """The 2 MiB folder's upload against cp -r of it."""
    assert workspace["files"] > 1 and 1.5 < workspace["megabytes"] <= 2.1
    assert all(_number(workspace[k]) and workspace[k] > 0 for k in ("upload_mb_s", "cp_mb_s"))
    assert workspace["ratio"] == pytest.approx(
        workspace["upload_mb_s"] / workspace["cp_mb_s"], 0.01
    )


def _check_link(link: dict) -> None:
    """The link run's section: every figure of both the provisioner and the peer tunnel."""
    _check_workspace(link["workspace"])
    assert link["one_way_ms"] == 25
    # The relay holds each chunk 25 ms each way: a round trip can only be longer than 50 ms.
    assert _number(link["rtt_ms"]) and link["rtt_ms"] >= 50
    for section, label in ((link["figures"], "flexai"), (link["peer"], "peer")):
        assert set(section) == {*LINK_TIMES, "throughput"}
        for name in LINK_TIMES:
            figure = section[name]
            assert _number(figure["local"]) and figure["local"] > 0, (label, name)
            assert _number(figure[label]) and figure[label] > 0, (label, name)
            assert _number(figure["excess_rtts"]), (label, name)
        # Over the link every execute pays at least one of its round trips.
        assert section["rtt"][label] >= link["rtt_ms"] / 1000
        assert _number(section["rtt"]["p95"]["excess_rtts"])
        assert all(_number(v) and v > 0 for v in section["throughput"].values()), label


def _check_warm(warm: dict) -> None:
    """The warm-start run: the second `jupyter execute` adopted the first one's instance."""
    assert warm["adopted"] is True and len(warm["parked_deleted"]) == 1
    figures = warm["first_reply"]
    assert all(_number(figures[k]) and figures[k] > 0 for k in ("local", "cold", "warm"))
    assert figures["ratio"] == pytest.approx(figures["warm"] / figures["local"], 0.01)
    # The cold start waited for the emulator's boot delay; the warm one did not.
    assert figures["cold"] >= warm["provision_delay_s"]
    assert warm["kernel_ready"]["cold"] >= warm["provision_delay_s"]
    assert _number(warm["kernel_ready"]["warm"])
