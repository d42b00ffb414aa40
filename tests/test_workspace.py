"""The notebook's folder on the instance: relative paths work there, results come back, and
nothing local is lost. Real sshd (the emulator's instances), real ipykernel, real nbclient,
a real ``jupyter server`` for the sync endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client import BlockingKernelClient
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from test_launch import Frontend, installed_argv  # noqa: F401 - a fixture
from test_launch import run as run_blocking
from test_lifecycle import (
    connected_client,
    reattach_after_owner_crash,
    run,
    ssh_connection_processes,
)

from flexai_provisioner import _paramiko, progress
from flexai_provisioner.errors import WorkspaceTooLargeError
from flexai_provisioner.workspace import MB, state_path

JUPYTER_FLEXAI = str(Path(sys.executable).with_name("jupyter-flexai"))


def make_project(root: Path) -> Path:
    """``root/proj/sub`` with ``data/input.txt``, a hidden folder and a cache not to copy."""
    sub = root / "proj" / "sub"
    (sub / "data").mkdir(parents=True)
    (sub / "data" / "input.txt").write_text("forty-two\n")
    (sub / "notes.txt").write_text("v1\n")
    (sub / ".git").mkdir()
    (sub / ".git" / "config").write_text("[core]\n")
    (sub / "__pycache__").mkdir()
    (sub / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (root / "proj" / "outside.txt").write_text("not in the notebook's folder\n")
    return sub


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path)


def notebook(*sources: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])


def outputs(nb: nbformat.NotebookNode) -> list[str]:
    return ["".join(o.get("text", "") for o in cell.outputs).strip() for cell in nb.cells]


@pytest.mark.parametrize("public", [False, True], ids=["internals", "public-api"])
async def test_notebook_reads_relative_paths_and_its_output_comes_back(
    emulator, kernelspecs, project, monkeypatch, public
):
    monkeypatch.setattr(_paramiko, "PUBLIC_API_ONLY", public)  # SSH and SFTP alike
    script = project / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    os.utime(script, (1_700_000_000, 1_700_000_000))
    nb = notebook(
        "import os; print(os.getcwd())",
        "print(open('data/input.txt').read())",
        "print(sorted(os.listdir('.')))",
        "open('results.csv', 'w').write('a,b\\n1,2\\n')",
        "st = os.stat('run.sh'); print(oct(st.st_mode & 0o777), int(st.st_mtime))",
    )
    before = set(progress.registry.kernel_ids())
    client = NotebookClient(
        nb, kernel_name="flexai-a100", resources={"metadata": {"path": str(project)}}
    )
    await client.async_execute()  # and shuts the kernel down
    (kernel_id,) = set(progress.registry.kernel_ids()) - before
    cwd, text, listing, _, script_stat = outputs(nb)
    assert cwd.endswith("/flexai-workspace/sub")
    assert Path(cwd) != project  # the instance's own directory, not the local folder
    assert text == "forty-two"
    assert listing == str(["data", "notes.txt", "run.sh"])  # no .git, no __pycache__
    assert script_stat == "0o755 1700000000"  # its mode and time came along
    assert (project / "results.csv").read_text() == "a,b\n1,2\n"
    assert not list(project.rglob("*.flexai-part"))  # no temporary file left behind
    phases = progress.history(kernel_id)
    upload = next(p for p in phases if p.phase == "uploading files")
    assert upload.message == "0.0 MB in 3 files"
    assert not state_path(kernel_id).exists()  # the manifest went with the kernel


def test_jupyter_execute_runs_in_the_notebooks_folder(emulator, kernelspecs, project, tmp_path):
    """``jupyter execute`` started elsewhere: the notebook still reads and writes beside
    itself."""
    nb = notebook(
        "print(open('data/input.txt').read())", "_ = open('summary.txt', 'w').write('done')"
    )
    nbformat.write(nb, project / "analysis.ipynb")
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("jupyter")),
            "execute",
            "--kernel_name=flexai-a100",
            "--inplace",
            str(project / "analysis.ipynb"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "uploading files" in done.stderr
    assert outputs(nbformat.read(project / "analysis.ipynb", as_version=4))[0] == "forty-two"
    assert (project / "summary.txt").read_text() == "done"


async def sync_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [JUPYTER_FLEXAI, "sync", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_local_edits_are_kept_across_sync_restart_and_shutdown(
    emulator, kernelspecs, project, caplog
):
    caplog.set_level(logging.INFO)
    km = AsyncKernelManager(kernel_name="flexai-a100")
    await km.start_kernel(cwd=str(project))
    try:
        instance = km.provisioner.instance_id
        saved = project / f"notes.flexai-{instance}.txt"
        async with connected_client(km) as kc:
            await run(
                kc,
                "import os\n"
                "open('notes.txt', 'w').write('kernel v2\\n')\n"
                "open('out.txt', 'w').write('1')\n"
                "os.remove('data/input.txt')",
            )
            (project / "notes.txt").write_text("local v2\n")  # edited here meanwhile

            done = await sync_cli(km.kernel_id)
            assert done.returncode == 0, done.stderr
            assert (project / "out.txt").read_text() == "1"
            assert (project / "notes.txt").read_text() == "local v2\n"
            assert saved.read_text() == "kernel v2\n"
            assert (project / "data" / "input.txt").exists()  # deletions are not propagated
            assert [line for line in done.stderr.splitlines() if "notes" in line] == [
                f"{_log_prefix(done.stderr)}{project / 'notes.txt'} was changed here while the "
                f"kernel ran, so it is kept; the version from instance {instance} is saved as "
                f"{saved}"
            ]
            assert f"copied 1 file (0.0 MB) from instance {instance}" in done.stdout

            again = await sync_cli()  # nothing changed since: nothing copied
            assert again.returncode == 0 and "copied 0 files" in again.stdout, again

            # A restart keeps the workspace; the local edit and a new file go over.
            (project / "added.txt").write_text("new")
            caplog.clear()
            await km.restart_kernel()
            # Only what changed here: the new file, the local edit, the file deleted there.
            copied = [m for m in caplog.messages if m.startswith("copied ")]
            assert len(copied) == 1, caplog.messages
            assert copied[0].startswith(f"copied 3 files (0.0 MB) to instance {instance}:")
            await kc.wait_for_ready(timeout=60)
            _, out = await run(
                kc,
                "import os; print(open('out.txt').read(), open('added.txt').read(), "
                f"open('notes.txt').read().strip(), os.path.exists({saved.name!r}))",
            )
            assert out.split() == ["1", "new", "local", "v2", "False"]
            await run(kc, "open('notes.txt', 'w').write('kernel v3\\n')\nopen('final.txt', 'w')")
            caplog.clear()
            (project / "notes.txt").write_text("local v3\n")
        await km.shutdown_kernel()
    finally:
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    assert (project / "notes.txt").read_text() == "local v3\n"
    assert saved.read_text() == "kernel v3\n"
    assert (project / "final.txt").exists()
    assert any(f"saved as {saved}" in m for m in caplog.messages)
    assert not list(project.rglob("*.flexai-part"))


def _log_prefix(stderr: str) -> str:
    """The CLI's log format up to the message."""
    line = next(line for line in stderr.splitlines() if " WARNING " in line)
    return line[: line.index(": ") + 2]


async def test_results_come_back_over_a_new_link_when_the_old_one_hangs(
    emulator, kernelspecs, project, caplog
):
    """A hung sshd (its TCP still acknowledging) at shutdown: the copy back times out on the
    old link and succeeds over a fresh one, before the instance is deleted."""
    kernelspecs.add("flexai-hang", {"ssh_connect_timeout": 3.0})
    km = AsyncKernelManager(kernel_name="flexai-hang")
    await km.start_kernel(cwd=str(project))
    stopped: list[int] = []
    try:
        async with connected_client(km) as kc:
            await run(kc, "open('trained.txt', 'w').write('weights')")
        stopped = ssh_connection_processes(emulator)
        assert stopped, "no sshd connection process found"
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        await km.shutdown_kernel(now=True)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    assert (project / "trained.txt").read_text() == "weights"
    assert any("trying a new link" in m for m in caplog.messages)
    assert emulator.live_instances() == []


async def test_a_file_that_cannot_be_written_here_does_not_cost_the_others(
    emulator, kernelspecs, project, caplog
):
    km = AsyncKernelManager(kernel_name="flexai-a100")
    await km.start_kernel(cwd=str(project))
    try:
        async with connected_client(km) as kc:
            # On the instance notes.txt becomes a folder; here it is still a file.
            await run(
                kc,
                "import os; os.remove('notes.txt'); os.mkdir('notes.txt')\n"
                "_ = open('notes.txt/inner.txt', 'w').write('x'), open('other.txt', 'w')",
            )
    finally:
        await km.shutdown_kernel(now=True)
    assert (project / "notes.txt").read_text() == "v1\n"
    assert (project / "other.txt").exists()
    assert any("could not copy notes.txt/inner.txt back" in m for m in caplog.messages)


async def test_a_reattached_kernel_brings_its_results_back(emulator, kernelspecs, project):
    """A server that crashed and reattached (persisted provisioner info) still knows the
    workspace: the results come back at shutdown, local edits kept."""
    km = await reattach_after_owner_crash(
        "_ = [open(name, 'w').write(text) for name, text in "
        "[('made.txt', '1'), ('notes.txt', 'kernel'), ('data/input.txt', 'changed')]]",
        str(project),
    )
    instance = km.provisioner.instance_id
    try:
        (project / "notes.txt").write_text("local")
    finally:
        await km.shutdown_kernel(now=True)
    assert (project / "made.txt").read_text() == "1"
    # Unchanged here since it was copied (the manifest says so): replaced.
    assert (project / "data" / "input.txt").read_text() == "changed"
    assert (project / "notes.txt").read_text() == "local"
    assert (project / f"notes.flexai-{instance}.txt").read_text() == "kernel"


async def test_size_limit_and_flexaiignore(emulator, kernelspecs, project):
    kernelspecs.add("flexai-small", {"workspace_max_mb": 1})
    (project / "data" / "big.bin").write_bytes(os.urandom(2 * MB))
    km = AsyncKernelManager(kernel_name="flexai-small")
    with pytest.raises(WorkspaceTooLargeError) as raised:
        await km.start_kernel(cwd=str(project))
    message = str(raised.value)
    assert "\n" not in message
    assert f"{project} holds 2.0 MB" in message and "(largest: data/ 2.0 MB" in message
    assert "workspace_max_mb" in message and str(project / ".flexaiignore") in message
    assert "requesting" not in [p.phase for p in progress.history(km.kernel_id)]

    (project / ".flexaiignore").write_text("# inputs too big to copy\n*.bin\n!keep.bin\nscratch/\n")
    (project / "keep.bin").write_bytes(b"k")
    (project / "scratch").mkdir()
    (project / "scratch" / "tmp.txt").write_text("x")
    km = AsyncKernelManager(kernel_name="flexai-small")
    await km.start_kernel(cwd=str(project))
    try:
        async with connected_client(km) as kc:
            _, out = await run(kc, "import os; print(sorted(os.listdir('.')))")
            assert out.strip() == str([".flexaiignore", "data", "keep.bin", "notes.txt"])
            _, out = await run(kc, "print(os.listdir('data'))")
            assert out.strip() == str(["input.txt"])
            await run(kc, "os.mkdir('scratch'); open('scratch/made.txt', 'w'); open('w.bin', 'w')")
    finally:
        await km.shutdown_kernel(now=True)
    assert not (project / "scratch" / "made.txt").exists()  # ignored on the way back too
    assert not (project / "w.bin").exists()


async def test_workspace_off_starts_in_the_instance_home(emulator, kernelspecs, project):
    kernelspecs.add("flexai-nows", {"workspace": False})
    km = AsyncKernelManager(kernel_name="flexai-nows")
    await km.start_kernel(cwd=str(project))
    try:
        async with connected_client(km) as kc:
            _, out = await run(kc, "import os; print(os.getcwd() == os.path.expanduser('~'))")
            assert out.strip() == "True"
            await run(kc, "open('left.txt', 'w')")
    finally:
        await km.shutdown_kernel(now=True)
    assert not (project / "left.txt").exists()
    done = await sync_cli(km.kernel_id)
    assert done.returncode == 1
    assert done.stderr.startswith(f"jupyter flexai: error: no running FlexAI kernel {km.kernel_id}")


def test_sync_endpoint(emulator, jupyter_server):
    server = jupyter_server()
    sub = make_project(server.root)
    created = server.post(
        "api/sessions",
        json={"path": "proj/sub/nb.ipynb", "type": "notebook", "kernel": {"name": "flexai-a100"}},
    )
    assert created.status_code == 201, created.text
    kernel_id = created.json()["kernel"]["id"]
    connection = Path(os.environ["JUPYTER_RUNTIME_DIR"]) / f"kernel-{kernel_id}.json"
    kc = BlockingKernelClient(connection_file=str(connection))
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        reply = kc.execute_interactive("open('model.txt', 'w').write('trained')", timeout=30)
        assert reply["content"]["status"] == "ok"
        synced = server.post(f"api/compute/sync/{kernel_id}")
        assert synced.status_code == 200, synced.text
        body = synced.json()
        assert body["directory"] == "proj/sub" and body["copied"] == ["model.txt"]
        assert body["conflicts"] == [] and body["kernel_id"] == kernel_id
        assert (sub / "model.txt").read_text() == "trained"
        kc.execute_interactive("open('late.txt', 'w')", timeout=30)
    finally:
        kc.stop_channels()
    missing = server.post("api/compute/sync/no-such-kernel")
    assert missing.status_code == 404 and "no-such-kernel" in missing.json()["message"]
    assert server.delete(f"api/sessions/{created.json()['id']}").status_code == 204
    assert (sub / "late.txt").exists()  # copied back at shutdown


def test_the_launcher_has_the_same_workspace(emulator, installed_argv, tmp_path, project):  # noqa: F811
    """A frontend that runs the kernelspec's argv itself (VS Code) runs it in the notebook's
    folder: the launcher mirrors that folder as the provisioner does."""
    frontend = Frontend(installed_argv, tmp_path)
    try:
        frontend.start(cwd=project)
        kc = frontend.client()
        _, out = run_blocking(kc, "print(open('data/input.txt').read().strip())")
        assert out.strip() == "forty-two"
        run_blocking(kc, "open('during.txt', 'w').write('1'); open('after.txt', 'w')")
        done = subprocess.run([JUPYTER_FLEXAI, "sync"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert (project / "during.txt").read_text() == "1"
        kc.shutdown()
        assert frontend.wait() == 0, frontend.stderr()
    finally:
        frontend.stop()
    assert (project / "after.txt").exists()
    assert "uploading files" in frontend.stderr()
    assert not list(Path(os.environ["JUPYTER_RUNTIME_DIR"]).glob("flexai-*"))  # key, manifest
