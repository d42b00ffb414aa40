"""The JupyterLab extension as installed: built by ``pip install``, listed enabled, and its
pure logic's unit tests (jest, as in JupyterLab's extension template) passing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_jupyter_lists_the_extension_enabled():
    listed = subprocess.run(
        [str(BIN / "jupyter"), "labextension", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    text = re.sub(r"\x1b\[[0-9;]*m", "", listed.stdout + listed.stderr)
    (line,) = [x for x in text.splitlines() if "flexai-provisioner v" in x]
    assert "enabled" in line and "OK" in line, text


def test_the_frontend_logic_passes_its_unit_tests():
    if not (ROOT / "node_modules").is_dir():
        pytest.fail("node_modules is missing: `pip install -e .` builds the extension with jlpm")
    run = subprocess.run(
        [str(BIN / "jlpm"), "test"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    # jest's summary, e.g. "Tests:       7 passed, 7 total": every test ran and passed.
    summary = re.search(r"^Tests:\s+(\d+) passed, (\d+) total$", output, re.M)
    assert summary and summary.group(1) == summary.group(2), output
    assert int(summary.group(1)) >= 5, output
