"""The JupyterLab extension as installed: built by ``pip install``, listed enabled, and its
pure logic's unit tests (node's test runner over the compiled TypeScript) passing."""

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
    assert run.returncode == 0, run.stdout + run.stderr
    passed = re.search(r"^# pass (\d+)$", run.stdout, re.M)
    assert passed and int(passed.group(1)) >= 5, run.stdout
    assert re.search(r"^# fail 0$", run.stdout, re.M), run.stdout
