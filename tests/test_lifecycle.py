"""Every path of a remote kernel's life, with faults injected into real processes.

Restart and interrupt, a remote kernel that dies, an SSH link that drops, starts that are
cancelled or hit platform fault storms, an owner killed with SIGKILL, and a server that
reattaches from persisted provisioner info. The autouse ``no_leaks`` fixture checks after
each test that no instance and no instance process is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import until_async
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from traitlets.config import Config

from flexai_provisioner import exit_cleanup
from flexai_provisioner.client import FlexAIClient
from flexai_provisioner.errors import SSHError, StartCancelledError
from flexai_provisioner.provisioner import starting
from flexai_provisioner.remote_kernel import Standby
from flexai_provisioner.session import PORT_NAMES
from flexai_provisioner.ssh import generate_keypair

JUPYTER_FLEXAI = str(Path(sys.executable).with_name("jupyter-flexai"))


async def run(kc, code: str, timeout: float = 30) -> tuple[dict, str]:
    """Execute ``code``; return the reply content and the stdout it printed."""
    out: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = await kc.execute_interactive(code, output_hook=hook, timeout=timeout)
    return reply["content"], "".join(out)


async def run_after_reconnect(kc, code: str, attempts: int = 10) -> str:
    """Run ``code`` with the same client after the link came back; return its stdout.

    The client's ZeroMQ sockets reconnect on their own, iopub last (a SUB socket must
    resubscribe), so a first attempt may miss its output, or all of its iopub messages:
    retry a few times.
    """
    for _attempt in range(attempts):
        try:
            _, out = await run(kc, code, timeout=3)
        except TimeoutError:
            continue
        if out:
            return out.strip()
    pytest.fail(f"no output from {code!r} after {attempts} attempts")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.asynccontextmanager
async def started(km: AsyncKernelManager) -> AsyncIterator[object]:
    """Start ``km``'s kernel and yield a ready client; shut everything down afterwards."""
    await km.start_kernel()
    try:
        async with connected_client(km) as kc:
            yield kc
    finally:
        await km.shutdown_kernel(now=True)


@contextlib.asynccontextmanager
async def connected_client(km: AsyncKernelManager) -> AsyncIterator[object]:
    """A ready client of ``km``'s running kernel, its channels stopped afterwards."""
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        yield kc
    finally:
        kc.stop_channels()


@pytest.fixture
async def kernel(kernelspecs) -> AsyncIterator[tuple[AsyncKernelManager, object]]:
    km = AsyncKernelManager(kernel_name="flexai-a100")
    async with started(km) as kc:
        yield km, kc


@pytest.mark.parametrize("now", [False, True], ids=["graceful", "now"])
async def test_restart_reuses_the_instance(emulator, kernel, now):
    km, kc = kernel
    instance_id, pid = km.provisioner.instance_id, km.provisioner.remote_pid
    await run(kc, "x = 41")
    restarted_at = time.monotonic()
    await km.restart_kernel(now=now)
    await kc.wait_for_ready(timeout=60)
    elapsed = time.monotonic() - restarted_at
    assert km.provisioner.instance_id == instance_id
    assert emulator.live_instances() == [instance_id]
    assert km.provisioner.remote_pid != pid
    assert not pid_alive(pid)
    reply, _ = await run(kc, "x")
    assert reply["status"] == "error" and reply["ename"] == "NameError"
    assert elapsed < 20, f"restart took {elapsed:.1f}s: it must not re-provision"


async def test_restarts_and_shutdown_open_no_channel_the_old_kernel_refuses(
    emulator, kernelspecs, caplog
):
    """Once a shutdown is asked, reconnecting clients wait for the new kernel (or the end)
    instead of each costing a channel open that the exiting kernel's closed port refuses."""
    caplog.set_level(logging.DEBUG, logger="flexai_provisioner.tunnel")
    km = AsyncKernelManager(kernel_name="flexai-a100")
    async with started(km) as kc:
        for now in (False, True):
            await km.restart_kernel(now=now)
            await kc.wait_for_ready(timeout=60)
        reply, _ = await run(kc, "1 + 1")
        assert reply["status"] == "ok"
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused == []


def agent_args(pid: int) -> list[bytes]:
    """A process's command line; an agent's is ``python -c SOURCE MODE [PID]``."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]


def forked_from_a_standby(pid: int) -> bool:
    """A forked kernel keeps its parent's command line: the agent's, in ``preload`` mode."""
    return agent_args(pid)[3:4] == [b"preload"]


KERNEL_FACTS = "import os, sys; print(os.path.basename(sys.argv[0]), os.environ.get('MARK'))"


async def test_kernels_are_forked_from_a_preloaded_standby(emulator, kernelspecs):
    kernelspecs.add("flexai-marked", {}, env={"MARK": "kernelspec-env"})
    km = AsyncKernelManager(kernel_name="flexai-marked")
    async with started(km) as kc:
        for restart in (False, True):
            if restart:
                await km.restart_kernel()
                await kc.wait_for_ready(timeout=60)
            assert forked_from_a_standby(km.provisioner.remote_pid)
            reply, out = await run(kc, KERNEL_FACTS)
            assert reply["status"] == "ok"
            # What `python -m ipykernel_launcher` with the kernelspec's env would show.
            assert out.split() == ["ipykernel_launcher.py", "kernelspec-env"]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def agents_in_preload_mode(emulator) -> set[int]:
    """The instance's processes started as standbys: kernels forked from one and the agents
    that forked and watch them as well as a standby waiting for its kernel."""
    return {p for p in emulator.processes() if forked_from_a_standby(p)}


def maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def next_standbys(emulator, km) -> set[int]:
    """The standbys waiting for ``km``'s next kernel: neither its kernel nor that one's agent."""
    kernel = km.provisioner.remote_pid
    return agents_in_preload_mode(emulator) - {kernel, parent_of(kernel)}


async def test_the_next_standby_imports_once_the_new_kernel_has_settled(emulator, kernelspecs):
    """The next kernel's standby starts with the kernel's launch but imports ipykernel only
    once that kernel has done its start-up work (here 4 s of it, in exec_lines), so the two
    do not compete for the instance's CPU; then it is ready for a restart."""
    km = AsyncKernelManager(kernel_name="flexai-a100")
    busy = "import time\nt0 = time.time()\nwhile time.time() - t0 < 4: pass"
    await km.start_kernel(extra_arguments=[f"--IPKernelApp.exec_lines={busy}"])
    try:
        kernel = km.provisioner.remote_pid
        standby = await until_async(
            lambda: next(iter(next_standbys(emulator, km)), None), "the next kernel's standby"
        )
        assert agent_args(standby)[4] == str(kernel).encode()  # it waits for this kernel
        await asyncio.sleep(1)  # the kernel is still busy
        assert "libzmq" not in maps(standby) and "_zmq" not in maps(standby)
        async with connected_client(km) as kc:
            assert await a_fully_preloaded_standby(emulator, km) == standby
            await km.restart_kernel()
            await kc.wait_for_ready(timeout=60)
            assert parent_of(km.provisioner.remote_pid) == standby
    finally:
        await km.shutdown_kernel(now=True)


def test_a_standby_closed_while_its_kernel_settles_leaves_without_importing():
    """Shutting down or parking a kernel that is still busy closes its waiting standby, which
    then leaves at once instead of importing ipykernel first for nothing."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}  # every import, on stderr
    standby = subprocess.Popen(
        ["sh", "-c", "exec " + Standby.command(sys.executable, after=busy.pid)],  # one pid
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert set(json.loads(standby.stdout.readline())["ports"]) == set(PORT_NAMES)
        standby.stdin.close()
        assert standby.wait(timeout=30) == 0
        imports = standby.stderr.read().decode()
        assert "import time:" in imports
        assert "ipykernel" not in imports and "zmq" not in imports
    finally:
        for process in (standby, busy):
            process.kill()
            process.wait()


async def a_fully_preloaded_standby(emulator, km) -> int:
    """The pid of the next kernel's standby once it has also imported what a kernel imports
    as it starts (psutil comes last; its C extension shows in the process's memory map)."""

    def preloaded() -> int | None:
        for pid in next_standbys(emulator, km):
            with contextlib.suppress(OSError):
                if "_psutil_linux" in maps(pid):
                    return pid
        return None

    return await until_async(preloaded, "a standby with the kernel's start-up imports")


async def debug(kc, command: str, arguments: dict | None = None) -> dict:
    """Send a Debug Adapter Protocol request on the control channel; its response."""
    msg = kc.session.msg(
        "debug_request",
        {"type": "request", "seq": 1, "command": command, "arguments": arguments or {}},
    )
    kc.control_channel.send(msg)
    while True:
        reply = await kc.control_channel.get_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            return reply["content"]


async def stops_at_a_breakpoint(kc) -> int:
    """What JupyterLab's debugger does for a breakpoint in a cell; the line it stopped at."""
    initialized = await debug(kc, "initialize", {"clientID": "test", "adapterID": ""})
    assert initialized["success"], initialized
    assert (await debug(kc, "attach"))["success"]
    code = "def f(a, b):\n    c = a + b\n    return c\n\nf(2, 3)\n"
    source = (await debug(kc, "dumpCell", {"code": code}))["body"]["sourcePath"]
    breakpoints = {"breakpoints": [{"line": 2}], "source": {"path": source}}
    assert (await debug(kc, "setBreakpoints", breakpoints))["success"]
    assert (await debug(kc, "configurationDone"))["success"]
    kc.execute(code)
    while True:
        msg = await kc.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "debug_event" and msg["content"]["event"] == "stopped":
            break
    thread = msg["content"]["body"]["threadId"]
    frames = (await debug(kc, "stackTrace", {"threadId": thread}))["body"]["stackFrames"]
    assert (await debug(kc, "continue", {"threadId": thread}))["success"]
    assert (await debug(kc, "disconnect", {"terminateDebuggee": True}))["success"]
    return frames[0]["line"]


async def test_the_debugger_works_in_kernels_forked_from_a_standby(emulator, kernelspecs):
    """A waiting standby has debugpy imported too (the kernel's start-up imports), and a
    kernel forked from it, or from the first start's standby, debugs as a new process does."""
    km = AsyncKernelManager(kernel_name="flexai-a100")
    async with started(km) as kc:
        assert forked_from_a_standby(km.provisioner.remote_pid)
        assert await stops_at_a_breakpoint(kc) == 2
        standby = await a_fully_preloaded_standby(emulator, km)
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        kernel = km.provisioner.remote_pid
        assert forked_from_a_standby(kernel)
        assert parent_of(kernel) == standby
        assert await stops_at_a_breakpoint(kc) == 2


async def test_a_kernel_whose_env_differs_in_what_the_standbys_imports_read_is_a_new_process(
    emulator, kernelspecs
):
    """debugpy reads PYDEVD_* variables as it is imported, in a standby with time to spare:
    a kernelspec that sets one gets a new process, which imports with its value."""
    kernelspecs.add("flexai-pydevd", {}, env={"PYDEVD_CONTAINER_BUCKET_SIZE": "7"})
    km = AsyncKernelManager(kernel_name="flexai-pydevd")
    async with started(km) as kc:
        await a_fully_preloaded_standby(emulator, km)
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        assert not forked_from_a_standby(km.provisioner.remote_pid)
        reply, out = await run(
            kc,
            "from _pydevd_bundle import pydevd_constants\n"
            "print(pydevd_constants.PYDEVD_CONTAINER_BUCKET_SIZE)",
        )
        assert reply["status"] == "ok"
        assert out.strip() == "7"


@pytest.mark.parametrize("public", [False, True], ids=["internals", "public-api"])
async def test_forwards_open_ahead_of_the_kernel_and_none_is_refused(
    emulator, kernelspecs, monkeypatch, caplog, public
):
    """A standby listens on its kernel's ports before the kernel runs, so the tunnel opens
    a channel to each while ipykernel starts; the clients' connections use them, and no
    channel open fails in a whole lifecycle (start, restart, shutdown), on either of
    ``_paramiko``'s paths."""
    from flexai_provisioner import _paramiko, tunnel

    monkeypatch.setattr(_paramiko, "PUBLIC_API_ONLY", public)

    opened: list[tuple[int, int]] = []  # (remote port, local peer's port: 0 if ahead)
    open_forward = tunnel.open_forward

    def recording(transport, port, peer, timeout):
        chan = open_forward(transport, port, peer, timeout)
        opened.append((port, peer[1]))
        return chan

    monkeypatch.setattr(tunnel, "open_forward", recording)
    caplog.set_level(logging.DEBUG, logger="flexai_provisioner.ssh.transport")
    km = AsyncKernelManager(kernel_name="flexai-a100")
    async with started(km) as kc:
        # One for each of the five ports, opened before the kernel was reported.
        assert len({port for port, peer in opened if peer == 0}) == 5
        reply, _ = await run(kc, "1")
        assert reply["status"] == "ok"
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        reply, _ = await run(kc, "2")
        assert reply["status"] == "ok"
    assert not [r for r in caplog.records if "open FAILED" in r.getMessage()]


async def test_the_first_kernels_agent_is_started_with_the_login(
    emulator, kernelspecs, monkeypatch
):
    """The standby agent the first kernel forks from is exec'd behind the SSH login (on
    paramiko's internals path), not a round trip after it."""
    from flexai_provisioner import _paramiko
    from flexai_provisioner.remote_kernel import Standby

    taken: list[tuple[str, bool]] = []  # (command, whether its exec went with the login)
    take_first = _paramiko._SinkTransport.take_first

    def recording(self, command, timeout):
        chan = take_first(self, command, timeout)
        taken.append((command, chan is not None))
        return chan

    monkeypatch.setattr(_paramiko._SinkTransport, "take_first", recording)
    km = AsyncKernelManager(kernel_name="flexai-a100")
    async with started(km) as kc:
        assert forked_from_a_standby(km.provisioner.remote_pid)
        reply, _ = await run(kc, "1")
        assert reply["status"] == "ok"
    assert taken[0] == (Standby.command(km.provisioner.remote_python), True)


@pytest.mark.parametrize(
    ("config", "env"),
    [({"preload_kernel": False}, {}), ({}, {"PYTHONSAFEPATH": "1"})],
    ids=["preload-off", "python-variable"],
)
async def test_kernels_are_new_processes_without_preloading_or_when_a_fork_differs(
    emulator, kernelspecs, config, env
):
    kernelspecs.add("flexai-spawned", config, env=env)
    km = AsyncKernelManager(kernel_name="flexai-spawned")
    async with started(km) as kc:
        pid = km.provisioner.remote_pid
        assert not forked_from_a_standby(pid)
        assert b"ipykernel_launcher" in Path(f"/proc/{pid}/cmdline").read_bytes()
        reply, _ = await run(kc, "1")
        assert reply["status"] == "ok"


@pytest.mark.parametrize("mode", ["signal", "message"])
async def test_interrupt_stops_a_long_cell_and_keeps_state(emulator, kernelspecs, mode):
    kernelspecs.add(f"flexai-int-{mode}", {}, interrupt_mode=mode)
    km = AsyncKernelManager(kernel_name=f"flexai-int-{mode}")
    async with started(km) as kc:
        await run(kc, "y = 7")
        msg_id = kc.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(600)")

        async def iopub_until(kind: str, **content: object) -> None:
            while True:
                msg = await kc.get_iopub_msg(timeout=30)
                if (
                    msg["parent_header"].get("msg_id") == msg_id
                    and msg["msg_type"] == kind
                    and all(msg["content"].get(k) == v for k, v in content.items())
                ):
                    return

        await iopub_until("stream", text="sleeping\n")  # interrupt once it really sleeps
        interrupted_at = time.monotonic()
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - interrupted_at < 10
        # ipykernel drops requests that arrive while it still aborts the interrupted cell.
        await iopub_until("status", execution_state="idle")
        _, out = await run(kc, "print(y)")
        assert out.strip() == "7"


async def test_dead_remote_kernel_is_restarted_on_the_same_instance(emulator, kernelspecs):
    config = Config({"KernelRestarter": {"time_to_dead": 0.5}})
    km = AsyncIOLoopKernelManager(kernel_name="flexai-a100", config=config)
    await km.start_kernel()
    restarted = asyncio.Event()
    km.add_restart_callback(restarted.set, "restart")  # only possible once started
    try:
        instance_id, pid = km.provisioner.instance_id, km.provisioner.remote_pid
        os.kill(pid, signal.SIGKILL)  # the "instance" is this machine: an OOM kill, say
        await asyncio.wait_for(restarted.wait(), 60)
        await until_async(lambda: km.provisioner.remote_pid not in (None, pid), "a new kernel", 60)
        assert km.provisioner.instance_id == instance_id
        async with connected_client(km) as kc:
            _, out = await run(kc, "print('back')")
        assert out.strip() == "back"
    finally:
        await km.shutdown_kernel(now=True)


def ssh_connection_processes(emulator) -> list[int]:
    """sshd's per-connection processes (``sshd: user@notty``) of the emulator's instances."""
    found = []
    for pid in emulator.processes():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"sshd: ") and b"@" in cmdline:
            found.append(pid)
    return found


@pytest.mark.parametrize(
    "signum",
    [signal.SIGKILL, signal.SIGSTOP],
    ids=["dropped", "silent"],  # a reset link; a hung sshd whose TCP still acknowledges
)
async def test_lost_ssh_link_is_replaced_and_the_kernel_carries_on(emulator, kernelspecs, signum):
    kernelspecs.add("flexai-keepalive", {"ssh_keepalive_interval": 1.0})
    km = AsyncKernelManager(kernel_name="flexai-keepalive")
    async with started(km) as kc:
        await run(kc, "z = 99")
        pid = km.provisioner.remote_pid
        conns = ssh_connection_processes(emulator)
        assert conns, "no sshd connection process found"
        for conn_pid in conns:
            os.kill(conn_pid, signum)
        try:
            # A count, not `connected`: a reconnect can begin and end between two polls.
            await until_async(lambda: km.provisioner.reconnects >= 1, "the reconnection", 30)
            await until_async(lambda: km.provisioner.connected, "the new link to be up", 30)
        finally:
            for conn_pid in conns:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(conn_pid, signal.SIGKILL)
        assert await run_after_reconnect(kc, "print(z)") == "99"
        assert km.provisioner.remote_pid == pid
        assert await km.is_alive()


async def test_unreachable_instance_is_reported_dead(emulator, kernelspecs):
    kernelspecs.add("flexai-short", {"reconnect_timeout": 1.0, "ssh_keepalive_interval": 1.0})
    km = AsyncKernelManager(kernel_name="flexai-short")
    await km.start_kernel()
    try:
        victims = [
            pid
            for pid in emulator.processes()
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sshd")
        ]
        for pid in victims:  # listener and connection: the instance's network is gone
            os.kill(pid, signal.SIGKILL)
        await until_async(lambda: km.provisioner.lost_reason, "the kernel to be given up", 30)
        assert not await km.is_alive()
        assert "unreachable" in km.provisioner.lost_reason
        assert "reconnect_timeout" in km.provisioner.lost_reason
    finally:
        await km.shutdown_kernel(now=True)


async def test_cancelled_start_deletes_the_instance(emulator, kernelspecs):
    emulator.update_faults(provision_delay=30)
    km = AsyncKernelManager(kernel_name="flexai-a100")
    task = asyncio.ensure_future(km.start_kernel())
    await until_async(emulator.live_instances, "the instance to be requested", 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert emulator.live_instances() == []


async def test_a_start_cancelled_while_provisioning_deletes_the_instance_at_once(
    emulator, kernelspecs
):
    emulator.update_faults(provision_delay=30)
    km = AsyncKernelManager(kernel_name="flexai-a100")
    task = asyncio.ensure_future(km.start_kernel())
    await until_async(emulator.live_instances, "the instance to be requested", 30)
    try:
        assert km.provisioner.kernel_id in starting()
        began = time.monotonic()
        assert km.provisioner.cancel_start("the user changed their mind")
        with pytest.raises(StartCancelledError, match="the user changed their mind"):
            await task
        assert time.monotonic() - began < 10, "the start went on waiting for its instance"
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    assert emulator.live_instances() == []
    assert starting() == {}
    assert not km.provisioner.cancel_start("again"), "nothing is left to cancel"


@pytest.mark.parametrize(
    "fault",
    [
        {"fail_next": 3, "fail_status": 503},
        {"fail_next": 3, "fail_status": 429},
        {"fail_next": 2, "fail_status": 500},
        {"error_after_create": 1},
    ],
    ids=["503-storm", "429-storm", "500-storm", "500-after-create"],
)
async def test_platform_faults_are_retried_into_one_instance(emulator, kernelspecs, api_key, fault):
    emulator.update_faults(**fault)
    km = AsyncKernelManager(kernel_name="flexai-a100")
    await km.start_kernel()
    try:
        client = FlexAIClient(emulator.url, api_key)
        instances = client.list_instances({"flexai.kernel_id": km.kernel_id})
        assert [i.id for i in instances] == [km.provisioner.instance_id]
        assert emulator.live_instances() == [km.provisioner.instance_id]
    finally:
        await km.shutdown_kernel(now=True)


OWNER = textwrap.dedent(
    """
    import json, sys, time
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name=sys.argv[1])
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    kc.execute_interactive("w = 123", timeout=30)
    print(json.dumps({"instance": km.provisioner.instance_id}), flush=True)
    time.sleep(3600)
    """
)


def start_owner(kernel_name: str) -> tuple[subprocess.Popen[str], str]:
    """A process that starts a FlexAI kernel and then hangs, waiting to be killed."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, kernel_name], stdout=subprocess.PIPE, text=True
    )
    line = owner.stdout.readline()
    if not line:
        owner.wait()
        pytest.fail("the owner process failed to start its kernel")
    return owner, json.loads(line)["instance"]


def kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    proc.stdout.close()


async def test_gc_deletes_the_instance_of_a_killed_owner(emulator, kernelspecs):
    owner, instance_id = start_owner("flexai-a100")
    kill(owner)
    assert emulator.live_instances() == [instance_id]
    dry = subprocess.run(
        [JUPYTER_FLEXAI, "gc", "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    assert instance_id in dry.stdout
    assert emulator.live_instances() == [instance_id]
    done = subprocess.run([JUPYTER_FLEXAI, "gc"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert instance_id in done.stdout
    assert emulator.live_instances() == []


async def test_new_kernel_reaps_the_instance_of_a_killed_owner(emulator, kernelspecs):
    owner, orphan = start_owner("flexai-a100")
    kill(owner)
    km = AsyncKernelManager(kernel_name="flexai-a100")
    await km.start_kernel()
    try:
        await until_async(
            lambda: orphan not in emulator.live_instances(), "the orphan's deletion", 30
        )
        assert emulator.live_instances() == [km.provisioner.instance_id]
    finally:
        await km.shutdown_kernel(now=True)


async def test_platform_expires_the_instance_of_a_killed_owner(emulator, kernelspecs):
    kernelspecs.add("flexai-ttl", {"instance_ttl": 3, "reap_orphans_at_start": False})
    owner, instance_id = start_owner("flexai-ttl")
    try:
        alive_until = time.monotonic() + 5  # heartbeats (every 1 s) outlast the 3 s TTL
        await until_async(lambda: time.monotonic() > alive_until, "two TTLs to pass", 10)
        assert emulator.live_instances() == [instance_id]
    finally:
        kill(owner)
    await until_async(lambda: not emulator.live_instances(), "the platform to expire it", 15)


REATTACH_OWNER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from jupyter_client.manager import AsyncKernelManager

    async def main():  # argv: [code to run, [the kernel's folder]]
        km = AsyncKernelManager(kernel_name="flexai-a100")
        await km.start_kernel(cwd=sys.argv[2] if len(sys.argv) > 2 else None)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        await kc.execute_interactive(sys.argv[1], timeout=30)
        info = await km.provisioner.get_provisioner_info()
        info["connection_info"]["key"] = info["connection_info"]["key"].decode()
        print(json.dumps(info), flush=True)
        os._exit(0)  # die like a server that crashed: no shutdown, no cleanup

    asyncio.run(main())
    """
)


def crashed_owner_info(*owner_args: str) -> dict:
    """Start a kernel in a process that runs ``owner_args`` (code that prints nothing, [the
    kernel's folder]) in it and dies; return the provisioner info it printed."""
    owner = subprocess.run(
        [sys.executable, "-c", REATTACH_OWNER, *owner_args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert owner.returncode == 0, owner.stderr
    info = json.loads(owner.stdout)
    info["connection_info"]["key"] = info["connection_info"]["key"].encode()
    return info


async def reattach_after_owner_crash(*owner_args: str) -> AsyncKernelManager:
    """A manager reattached to the kernel of :func:`crashed_owner_info`."""
    return await reattach(crashed_owner_info(*owner_args))


async def reattach(info: dict) -> AsyncKernelManager:
    km = AsyncKernelManager(kernel_name="flexai-a100", kernel_id=info["kernel_id"])
    km.load_connection_info(info["connection_info"])
    km.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        info["kernel_id"], km.kernel_spec, parent=km
    )
    await km.provisioner.load_provisioner_info(info)
    return km


async def test_a_failed_reattach_leaves_the_instance_to_its_owner(emulator, kernelspecs, api_key):
    info = crashed_owner_info("pass")
    instance_id, key_file = info["flexai"]["instance_id"], Path(info["flexai"]["key_file"])
    key_file.write_bytes(generate_keypair().private_openssh)  # a key the instance refuses
    try:
        with pytest.raises(SSHError):
            await reattach(info)
        # Nothing of this process may delete it at exit, nor renew its lease meanwhile.
        assert not [o for o in exit_cleanup.owned() if getattr(o, "instance_id", None)]
        assert emulator.live_instances() == [instance_id]
        assert key_file.exists()
    finally:
        with FlexAIClient(emulator.url, api_key) as api:
            api.delete_instance(instance_id)
        key_file.unlink(missing_ok=True)
    await until_async(lambda: not emulator.live_instances(), "the instance's deletion", 30)


async def test_reattach_from_provisioner_info_runs_in_the_same_kernel(emulator, kernelspecs):
    km = await reattach_after_owner_crash("w = 123")
    try:
        async with connected_client(km) as kc:
            _, out = await run(kc, "print(w)")
        assert out.strip() == "123"
    finally:
        await km.shutdown_kernel(now=True)
    assert emulator.live_instances() == []
