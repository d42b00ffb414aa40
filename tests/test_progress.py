"""Start progress: the registry, and the phases a headless run shows on stderr."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat

from flexai_provisioner.progress import PHASES, ProgressRegistry, log_event

JUPYTER = str(Path(sys.executable).with_name("jupyter"))
START_PHASES = ["requesting", "connecting", "starting kernel", "ready"]


def test_history_is_bounded_per_kernel_and_in_kernels():
    registry = ProgressRegistry(max_kernels=2, max_phases=3)
    for i in range(5):
        registry.publish("k1", f"p{i}", float(i))
    assert [e.phase for e in registry.history("k1")] == ["p2", "p3", "p4"]
    registry.publish("k2", "requesting", 0.0)
    registry.publish("k1", "ready", 5.0)  # k1 is now the most recently active
    registry.publish("k3", "requesting", 0.0)
    assert registry.kernel_ids() == ["k1", "k3"]
    assert registry.history("k2") == []


def test_subscribers_see_events_and_a_failing_one_breaks_nothing(caplog):
    registry = ProgressRegistry()
    seen = []

    def broken(event):
        raise RuntimeError("boom")

    registry.subscribe(broken)
    unsubscribe = registry.subscribe(seen.append)
    event = registry.publish("k", "booting", 1.5, instance_id="inst-1")
    assert seen == [event] and event.instance_id == "inst-1"
    assert "subscriber" in caplog.text
    unsubscribe()
    registry.publish("k", "ready", 2.0)
    assert seen == [event]


def test_log_lines_go_to_stderr_only_when_logging_would_drop_them(capsys):
    event = ProgressRegistry().publish("k", "connecting", 3.25)
    quiet = logging.getLogger("flexai-test-unconfigured")
    quiet.propagate = False
    log_event(quiet, event)
    assert capsys.readouterr().err == "FlexAI kernel k: connecting (3.2s)\n"

    configured = logging.getLogger("flexai-test-configured")
    configured.propagate = False
    configured.addHandler(logging.NullHandler())
    configured.addHandler(logging.StreamHandler(sys.stdout))
    configured.setLevel(logging.WARNING)  # an app that chose not to show INFO is obeyed
    log_event(configured, event)
    assert capsys.readouterr() == ("", "")


def kernel_lines(stderr: str) -> list[str]:
    """The phase lines' ``<phase text>`` parts, for the one kernel the run started."""
    lines = [line.split(": ", 1)[1] for line in stderr.splitlines() if "FlexAI kernel " in line]
    assert lines, stderr
    return lines


def assert_phases_once(stderr: str) -> None:
    lines = kernel_lines(stderr)
    phases = [line.split(" (", 1)[0].split(";", 1)[0] for line in lines]
    assert [p for p in phases if p in START_PHASES] == START_PHASES, stderr
    assert phases == sorted(phases, key=PHASES.index), stderr
    assert phases[-1] == "shut down" and "cost $" in lines[-1], stderr


def test_nbclient_in_a_script_shows_the_phases_on_stderr(emulator, kernelspecs, tmp_path):
    script = textwrap.dedent(
        """
        import nbformat
        from nbclient import NotebookClient

        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1 + 1)")])
        NotebookClient(nb, kernel_name="flexai-a100", timeout=60).execute()
        print(nb.cells[0].outputs[0]["text"], end="")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "2\n"
    assert_phases_once(result.stderr)


def test_jupyter_execute_shows_the_phases_once(emulator, kernelspecs, tmp_path):
    path = tmp_path / "two.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")]), path)
    result = subprocess.run(
        [JUPYTER, "execute", "--kernel_name=flexai-a100", str(path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert_phases_once(result.stderr)  # through the app's log handler, not also the fallback
