"""The installed kernelspec run as VS Code and emacs-jupyter run it: without a provisioner.

Each test installs ``flexai-a100`` with ``jupyter flexai install``, writes a connection file
with ports of its own choosing, substitutes ``{connection_file}`` in ``argv``, runs it with
``subprocess`` and talks to those ports with a plain ``BlockingKernelClient`` (or attaches
``jupyter console --existing``). The autouse
``no_leaks`` fixture checks that no instance and no instance process is left.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import until
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import AsyncKernelManager

from flexai_provisioner.session import PORT_NAMES

JUPYTER_FLEXAI = str(Path(sys.executable).with_name("jupyter-flexai"))


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports, as a frontend picks them."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (reaped here if it became our child, as orphans may)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


class Frontend:
    """What a raw-kernel frontend does with a kernelspec: connection file, argv, a client."""

    def __init__(self, argv: list[str], directory: Path):
        self.directory = directory
        self.connection_file = directory / "kernel-v2-test.json"
        ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        info = {
            **ports,
            "ip": "127.0.0.1",
            "transport": "tcp",
            "key": secrets.token_hex(16),
            "signature_scheme": "hmac-sha256",
            "kernel_name": "flexai-a100",
        }
        self.connection_file.write_text(json.dumps(info))
        self.ports = ports
        self.argv = [arg.replace("{connection_file}", str(self.connection_file)) for arg in argv]
        self.stderr_path = directory / "launcher.stderr"
        self.clients: list[BlockingKernelClient] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Run argv in ``cwd`` (default: this test's directory), as a frontend runs it in the
        notebook's folder."""
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, cwd=cwd or self.directory, stdin=subprocess.DEVNULL, stderr=err
            )
        return self.proc

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def client(self, timeout: float = 120) -> BlockingKernelClient:
        """A ready client attached by connection file, as ``jupyter console --existing`` does.

        A client not made by a KernelManager calls the kernel dead once a heartbeat goes
        unanswered for a second, which it is while the instance boots; like a frontend
        waiting for a kernel to start, ask again until the launcher gives up or exits.
        """
        kc = BlockingKernelClient(connection_file=str(self.connection_file))
        kc.load_connection_file()
        kc.start_channels()
        self.clients.append(kc)
        deadline = time.monotonic() + timeout
        while True:
            try:
                kc.wait_for_ready(timeout=max(1.0, deadline - time.monotonic()))
                return kc
            except RuntimeError as e:
                exited = self.proc is not None and self.proc.poll() is not None
                if exited or time.monotonic() > deadline:
                    pytest.fail(f"{e}; launcher stderr:\n{self.stderr()}")

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not exit within {timeout:g}s:\n{self.stderr()}")

    def stop(self) -> None:
        for kc in self.clients:
            kc.stop_channels()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # it deletes its instance, then exits
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run(kc: BlockingKernelClient, code: str, timeout: float = 60) -> tuple[dict, str]:
    out: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, output_hook=hook, timeout=timeout)
    return reply["content"], "".join(out)


@pytest.fixture
def installed_argv(flexai_env: dict[str, str], tmp_path: Path) -> list[str]:
    """``argv`` of the kernelspec ``jupyter flexai install`` wrote."""
    prefix = tmp_path / "prefix"
    subprocess.run(
        [JUPYTER_FLEXAI, "install", "--gpu", "A100", "--prefix", str(prefix)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    spec = prefix / "share" / "jupyter" / "kernels" / "flexai-a100" / "kernel.json"
    return json.loads(spec.read_text())["argv"]


@pytest.fixture
def frontend(installed_argv: list[str], tmp_path: Path) -> Iterator[Frontend]:
    fe = Frontend(installed_argv, tmp_path)
    try:
        yield fe
    finally:
        fe.stop()


def test_the_kernel_runs_on_an_instance_and_shutdown_deletes_it(emulator, frontend):
    proc = frontend.start()
    kc = frontend.client()
    content, out = run(kc, "import os, sys; print(os.environ['FLEXAI_INSTANCE_ID'], sys.argv[0])")
    assert content["status"] == "ok"
    instance_id, program = out.split()
    assert emulator.live_instances() == [instance_id]
    assert program.endswith("ipykernel_launcher.py")  # ipykernel itself, under the instance's sshd
    assert "requesting" in frontend.stderr() and "ready" in frontend.stderr()

    # A second client by connection file, as `jupyter console --existing` attaches.
    content, out = run(frontend.client(), "print(os.environ['FLEXAI_INSTANCE_ID'])")
    assert out.strip() == instance_id

    kc.shutdown()
    assert frontend.wait() == 0, frontend.stderr()
    assert emulator.live_instances() == []
    assert proc.poll() == 0


def test_jupyter_console_existing_attaches_and_shuts_down(emulator, frontend, tmp_path):
    proc = frontend.start()
    # Attached while the instance boots, the console would call the kernel dead until a
    # heartbeat is answered, which can be a second after kernel_info is (each unanswered ping
    # costs jupyter_client a 1 s cycle), and drop the cells read meanwhile unrun: under load,
    # kernel_info came at 1.1-2.4 s and the heartbeat from 2.0-3.1 s. Attach to a kernel that
    # answers, as --existing means.
    frontend.client()
    # Output published before the console's iopub subscription has crossed the tunnel is
    # lost (ZeroMQ's late joiner), as in any frontend: later cells must show it.
    code = (
        "import os\n"
        + "print('instance:', os.environ['FLEXAI_INSTANCE_ID'])\n" * 3
        + "quit(keep_kernel=False)\n"
    )
    console = subprocess.run(
        [
            str(Path(sys.executable).with_name("jupyter")),
            "console",
            "--existing",
            str(frontend.connection_file),
            "--simple-prompt",
            "--ZMQTerminalInteractiveShell.kernel_timeout=120",
        ],
        input=code,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "IPYTHONDIR": str(tmp_path / "ipython")},
    )
    assert console.returncode == 0, console.stderr
    lines = console.stdout.splitlines()
    printed = {line.split()[-1] for line in lines if "instance: " in line}
    assert len(printed) == 1, console.stdout
    (instance_id,) = printed
    assert instance_id.startswith("inst-")
    assert frontend.wait() == 0, frontend.stderr()  # quit(keep_kernel=False) shut it down
    assert proc.returncode == 0
    assert emulator.live_instances() == []


def test_sigint_interrupts_the_remote_kernel(emulator, frontend):
    proc = frontend.start()
    kc = frontend.client()
    # Not stop_on_error: after the error reply ipykernel aborts execute requests until a
    # message of its own has passed its queue, which under load the next cell can overtake.
    msg_id = kc.execute("import time; time.sleep(60)", stop_on_error=False)

    def cell_started() -> bool:
        try:
            msg = kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            return False
        return msg["msg_type"] == "execute_input" and msg["parent_header"]["msg_id"] == msg_id

    until(cell_started, "the cell to start", 30)
    interrupted = time.monotonic()
    proc.send_signal(signal.SIGINT)
    reply = kc.get_shell_msg(timeout=30)
    while reply["parent_header"]["msg_id"] != msg_id:  # kernel_info replies of the wait
        reply = kc.get_shell_msg(timeout=30)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - interrupted < 30
    assert run(kc, "x = 1")[0]["status"] == "ok"  # the kernel lives on
    assert proc.poll() is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_deletes_the_instance_then_exits(emulator, frontend, signum):
    proc = frontend.start()
    run(frontend.client(), "x = 1")
    assert len(emulator.live_instances()) == 1
    proc.send_signal(signum)
    assert frontend.wait() == 128 + signum
    assert emulator.live_instances() == []
    assert emulator.processes() == []


def test_sigterm_while_the_instance_boots_deletes_it(emulator, frontend):
    emulator.update_faults(provision_delay=30)
    proc = frontend.start()
    until(lambda: emulator.live_instances(), "the instance to be requested", 30)
    proc.send_signal(signal.SIGTERM)
    assert frontend.wait(timeout=30) == 128 + signal.SIGTERM
    assert emulator.live_instances() == []


def test_the_remote_kernels_exit_ends_the_launcher_with_its_status(emulator, frontend):
    frontend.start()
    kc = frontend.client()
    kc.execute("import os; os._exit(3)")
    assert frontend.wait() == 3, frontend.stderr()
    assert emulator.live_instances() == []


def test_the_frontends_death_deletes_the_instance(emulator, installed_argv, tmp_path):
    fe = Frontend(installed_argv, tmp_path)
    spawn = "import subprocess, sys, time; print(subprocess.Popen(sys.argv[1:]).pid, flush=True); time.sleep(600)"  # noqa: E501
    parent = subprocess.Popen(
        [sys.executable, "-c", spawn, *fe.argv], stdout=subprocess.PIPE, cwd=tmp_path
    )
    launcher = int(parent.stdout.readline())  # type: ignore[union-attr]
    try:
        run(fe.client(), "x = 1")
        assert len(emulator.live_instances()) == 1
        parent.kill()
        parent.wait()
        until(lambda: gone(launcher), "the orphaned launcher to exit", 60)
        assert emulator.live_instances() == []
    finally:
        for kc in fe.clients:
            kc.stop_channels()
        parent.kill()
        parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]
        if not gone(launcher):
            os.kill(launcher, signal.SIGKILL)
            until(lambda: gone(launcher), "the launcher to be killed", 10)


def test_ports_taken_by_another_process_are_a_clear_error(emulator, frontend):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", frontend.ports["iopub_port"]))
        squatter.listen()
        frontend.start()
        assert frontend.wait() == 1
    err = frontend.stderr()
    assert f"cannot listen on 127.0.0.1:{frontend.ports['iopub_port']} (iopub_port)" in err
    assert "Traceback" not in err
    assert emulator.live_instances() == []


def test_an_unusable_connection_file_is_a_clear_error(frontend):
    frontend.connection_file.write_text(json.dumps({"transport": "ipc", "shell_port": 1}))
    frontend.start()
    assert frontend.wait() == 1
    assert "transport 'ipc' is not supported" in frontend.stderr()


@pytest.mark.parametrize(
    "argv",
    [None, ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]],
    ids=["launcher-argv", "old-argv"],
)
async def test_with_jupyter_client_the_provisioner_runs_ipykernel_on_the_instance(
    emulator, kernelspecs, argv
):
    """The launcher in argv is never run locally; kernelspecs from before it still work."""
    kernelspecs.add("flexai-argv", {}, **({"argv": argv} if argv else {}))
    km = AsyncKernelManager(kernel_name="flexai-argv")
    await km.start_kernel()
    kc = km.client()
    try:
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        out: list[str] = []
        await kc.execute_interactive(
            "import os, sys; print(os.environ['FLEXAI_INSTANCE_ID'], sys.argv[0])",
            output_hook=lambda m: out.append(m["content"].get("text", "")),
            timeout=60,
        )
        instance_id, program = "".join(out).split()
        assert instance_id == km.provisioner.instance_id
        assert program.endswith("ipykernel_launcher.py")
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


def test_without_an_api_the_launcher_says_how_to_configure_one(frontend, monkeypatch):
    monkeypatch.delenv("FLEXAI_API_URL")
    monkeypatch.delenv("FLEXAI_API_KEY")
    frontend.start()
    assert frontend.wait() == 1
    lines = frontend.stderr().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m flexai_provisioner.launch: error:")
    assert "FLEXAI_API_URL" in lines[0]
