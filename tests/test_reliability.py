"""No instance is lost, leaked or deleted from under its owner, whatever fails.

Owners that this machine cannot see (another PID namespace with the same hostname), an API
outage during a shutdown, a corrupt or locked ledger, an API that never answers, owners
killed with SIGKILL that leave key files, and processes that end without shutting down.
Faults come from outside, as an operator would cause them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import until, until_async
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.manager import AsyncKernelManager
from test_lifecycle import JUPYTER_FLEXAI, OWNER, connected_client, kill, run, start_owner
from traitlets.config import Config

from flexai_provisioner import progress
from flexai_provisioner.client import FlexAIClient
from flexai_provisioner.errors import LedgerError, PlatformError
from flexai_provisioner.ledger import Ledger


def ledger_path(env: dict[str, str]) -> Path:
    return Path(env["JUPYTER_DATA_DIR"], "flexai", "ledger.sqlite3")


def ledger_rows(env: dict[str, str]) -> list[dict[str, object]]:
    with contextlib.closing(sqlite3.connect(ledger_path(env))) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM instances")]


def gc(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [JUPYTER_FLEXAI, "gc", *args], capture_output=True, text=True, timeout=timeout
    )


# -- owners this machine cannot see --------------------------------------------------------


@contextlib.contextmanager
def owner_in_own_pid_namespace(env: dict[str, str]) -> Iterator[str]:
    """A kernel owner in a new PID namespace (same hostname, as a container with host
    networking); yields its instance id, kills it at the end."""
    owner = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
         sys.executable, "-c", OWNER, "flexai-a100"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip
    try:
        line = owner.stdout.readline()
        if not line:
            pytest.fail("the owner in its own PID namespace failed to start its kernel")
        yield json.loads(line)["instance"]
    finally:
        kill(owner)


@pytest.mark.parametrize("shared_ledger", [True, False], ids=["shared-ledger", "own-ledger"])
async def test_an_owner_in_another_pid_namespace_is_never_reaped(
    emulator, kernelspecs, flexai_env, api_key, tmp_path, shared_ledger
):
    owner_env = {} if shared_ledger else {"JUPYTER_DATA_DIR": str(tmp_path / "other-data")}
    with owner_in_own_pid_namespace(owner_env) as foreign:
        try:
            dead, orphan = start_owner("flexai-a100")  # a real orphan: proves the reap ran
            kill(dead)
            km = AsyncKernelManager(kernel_name="flexai-a100")
            await km.start_kernel()
            try:
                await until_async(lambda: orphan not in emulator.live_instances(), "the reap", 30)
                done = gc()
                assert done.returncode == 0, done.stderr
                assert foreign not in done.stdout
                unseen = "left 1 instance(s) whose owner this machine cannot see" in done.stdout
                assert unseen is shared_ledger  # only a shared ledger holds the foreign row
                assert foreign in emulator.live_instances()
            finally:
                await km.shutdown_kernel(now=True)
        finally:
            # Its owner cannot be seen from here, so its operator deletes it.
            FlexAIClient(emulator.url, api_key).delete_instance(foreign)


# -- deletions that survive outages ----------------------------------------------------------


async def test_a_deletion_during_an_outage_is_retried_until_it_succeeds(
    emulator, kernelspecs, flexai_env, caplog
):
    caplog.set_level(logging.INFO)
    km = AsyncKernelManager(kernel_name="flexai-a100")
    await km.start_kernel()
    instance_id = km.provisioner.instance_id
    emulator.update_faults(fail_for=15)
    outage_ends = time.monotonic() + 15
    await km.shutdown_kernel(now=True)
    assert time.monotonic() < outage_ends, "the shutdown waited out the outage"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    owed = [m for m in warnings if instance_id in m and "could not delete" in m]
    assert len(owed) == 1, warnings
    assert "retrying" in owed[0] and "jupyter flexai gc" in owed[0]
    assert emulator.live_instances() == [instance_id]
    assert [r["delete_owed"] is not None for r in ledger_rows(flexai_env)] == [True]
    await until_async(lambda: not emulator.live_instances(), "the owed deletion to be retried", 60)
    assert time.monotonic() >= outage_ends
    await until_async(lambda: ledger_rows(flexai_env)[0]["deleted_at"], "the ledger to agree", 10)


async def test_a_start_that_fails_in_an_outage_leaves_its_deletion_owed_not_lost(
    emulator, kernelspecs, flexai_env
):
    emulator.update_faults(provision_delay=3)
    km = AsyncKernelManager(kernel_name="flexai-a100")
    start = asyncio.ensure_future(km.start_kernel())
    try:
        await until_async(lambda: emulator.live_instances(), "the instance to be created", 30)
        emulator.update_faults(fail_for=15)  # the wait for it to boot fails, then its delete
        with pytest.raises(PlatformError, match="503"):
            await start
        [instance_id] = emulator.live_instances()
        [row] = ledger_rows(flexai_env)
        assert row["instance_id"] == instance_id and row["delete_owed"]
        await until_async(lambda: not emulator.live_instances(), "the owed deletion", 60)
    finally:
        if not start.done():
            start.cancel()


OUTAGE_OWNER = textwrap.dedent(
    """
    import json, sys, time
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name="flexai-a100")
    km.start_kernel()
    print(json.dumps({"instance": km.provisioner.instance_id}), flush=True)
    sys.stdin.readline()
    km.shutdown_kernel(now=True)
    print("shut down", flush=True)
    time.sleep(3600)
    """
)


async def test_gc_retries_an_owed_deletion_of_a_live_owner(emulator, kernelspecs):
    owner = subprocess.Popen(
        [sys.executable, "-c", OUTAGE_OWNER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        instance_id = json.loads(owner.stdout.readline())["instance"]
        emulator.update_faults(fail_for=600)
        owner.stdin.write("\n")
        owner.stdin.flush()
        assert owner.stdout.readline().strip() == "shut down"
        owner.send_signal(signal.SIGSTOP)  # alive, but its own retries are frozen
        emulator.update_faults(fail_for=0)
        assert emulator.live_instances() == [instance_id]
        done = gc()
        assert done.returncode == 0, done.stderr
        assert instance_id in done.stdout and "owed" in done.stdout
        assert emulator.live_instances() == []
    finally:
        owner.kill()
        owner.communicate()


# -- the ledger's faults ---------------------------------------------------------------------


async def test_a_corrupt_ledger_is_moved_aside_and_a_fresh_one_started(
    emulator, kernelspecs, flexai_env, caplog
):
    path = ledger_path(flexai_env)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not an SQLite database\n" * 100)
    caplog.set_level(logging.WARNING)
    km = AsyncKernelManager(kernel_name="flexai-a100")
    await km.start_kernel()
    try:
        [aside] = path.parent.glob("ledger.sqlite3.corrupt-*")
        assert aside.read_bytes().startswith(b"this is not an SQLite database")
        moved = [r.getMessage() for r in caplog.records if str(aside) in r.getMessage()]
        assert len(moved) == 1 and str(path) in moved[0]
        assert [r["instance_id"] for r in ledger_rows(flexai_env)] == [km.provisioner.instance_id]
    finally:
        await km.shutdown_kernel(now=True)
    path.write_bytes(b"\0garbage")
    done = gc()
    assert done.returncode == 0 and "no orphaned instances" in done.stdout
    assert len(done.stderr.strip().splitlines()) == 1 and "moved it to" in done.stderr


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Another process's write lock on the ledger, held for the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None);"
         "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()",
         str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.communicate("")


async def test_a_locked_ledger_fails_within_seconds_naming_the_file(
    emulator, kernelspecs, flexai_env
):
    path = ledger_path(flexai_env)
    km = AsyncKernelManager(kernel_name="flexai-a100")
    await km.start_kernel()
    key_file = Path(flexai_env["JUPYTER_RUNTIME_DIR"], f"flexai-{km.kernel_id}.key")
    assert key_file.exists()
    with locked(path):
        started = time.monotonic()
        done = gc(timeout=60)
        assert time.monotonic() - started < 15
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and str(path) in done.stderr, done.stderr
        assert "locked" in done.stderr
        started = time.monotonic()
        second = AsyncKernelManager(kernel_name="flexai-a100")
        with pytest.raises(LedgerError, match="locked") as info:
            await second.start_kernel()
        assert str(path) in str(info.value) and time.monotonic() - started < 15
        # Its shutdown deletes the instance even though the ledger cannot say so.
        await km.shutdown_kernel(now=True)
    assert emulator.live_instances() == []
    assert not key_file.exists()


# -- bounded waits ---------------------------------------------------------------------------


HANGING_START = textwrap.dedent(
    """
    import sys, time
    from jupyter_client.manager import KernelManager
    started = time.monotonic()
    try:
        KernelManager(kernel_name="flexai-a100").start_kernel()
    except Exception as e:
        print(f"{time.monotonic() - started:.1f} {type(e).__name__}: {e}", flush=True)
    """
)


async def test_a_start_against_an_api_that_never_answers_fails_within_a_minute(
    kernelspecs, flexai_env, silent_api
):
    owner = subprocess.run(
        [sys.executable, "-c", HANGING_START],
        capture_output=True, text=True, timeout=150,
        env={**os.environ, "FLEXAI_API_URL": silent_api},
    )  # fmt: skip
    elapsed, error = owner.stdout.strip().split(" ", 1)
    assert float(elapsed) <= 60, owner.stdout
    assert error.startswith("PlatformUnreachableError") and silent_api in error
    assert "no answer within" in error


# -- key files of dead owners ----------------------------------------------------------------


async def test_gc_removes_the_key_files_of_dead_owners(emulator, kernelspecs, flexai_env):
    owner, instance_id = start_owner("flexai-a100")
    kill(owner)
    keys = list(Path(flexai_env["JUPYTER_RUNTIME_DIR"]).glob("flexai-*.key"))
    assert len(keys) == 1
    done = gc()
    assert instance_id in done.stdout
    assert not keys[0].exists()


# -- no instance outlives its owner process --------------------------------------------------


EXITING_OWNER = textwrap.dedent(
    """
    import json, sys
    from jupyter_client.manager import KernelManager
    kms = [KernelManager(kernel_name="flexai-a100") for _ in range(int(sys.argv[1]))]
    for km in kms:
        km.start_kernel()
    print(json.dumps([km.provisioner.instance_id for km in kms]), flush=True)
    if sys.argv[2] == "hang":
        sys.stdin.read()
    """
)


async def test_interpreter_exit_deletes_the_instances_it_did_not_shut_down(emulator, kernelspecs):
    owner = subprocess.run(
        [sys.executable, "-c", EXITING_OWNER, "3", "exit"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert owner.returncode == 0, owner.stderr
    assert len(json.loads(owner.stdout)) == 3
    assert emulator.live_instances() == [] and emulator.processes() == []
    assert "3 FlexAI instance(s) not shut down: deleting them" in owner.stderr


async def test_sighup_deletes_the_instances_then_ends_the_process(emulator, kernelspecs):
    owner = subprocess.Popen(
        [sys.executable, "-c", EXITING_OWNER, "2", "hang"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        instances = json.loads(owner.stdout.readline())
        assert sorted(emulator.live_instances()) == sorted(instances)
        owner.send_signal(signal.SIGHUP)
        assert owner.wait(60) == -signal.SIGHUP  # it still dies of the hang-up
        assert emulator.live_instances() == []
    finally:
        owner.kill()
        owner.communicate()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_server_stopped_by_a_signal_deletes_its_instances(jupyter_server, emulator, signum):
    server = jupyter_server()
    kernel = server.post("api/kernels", json={"name": "flexai-a100"})
    assert kernel.status_code == 201, kernel.text
    assert len(emulator.live_instances()) == 1
    server.proc.send_signal(signum)
    server.proc.wait(60)
    assert emulator.live_instances() == [], server.log()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_server_stopped_during_a_start_deletes_the_booting_instance(
    jupyter_server, emulator, signum
):
    emulator.update_faults(provision_delay=120)  # far longer than the test may take
    server = jupyter_server()
    with in_background(lambda: server.post("api/kernels", json={"name": "flexai-a100"})):
        booting_kernel_id(server)
        assert len(emulator.live_instances()) == 1
        server.proc.send_signal(signum)
        server.proc.wait(60)
    assert emulator.live_instances() == [], server.log()


def booting_kernel_id(server) -> str:
    """The id of the first kernel seen waiting for its instance to boot."""

    def booting() -> list[str]:
        kernels = server.get("api/compute/progress").json()["kernels"]
        return [k["kernel_id"] for k in kernels if k["phase"] == "booting"]

    return until(booting, "a kernel in its booting phase", 60)[0]


@contextlib.contextmanager
def in_background(call) -> Iterator[dict]:
    """Run ``call`` (a blocking HTTP request) in a thread; its response (or ``error``) is in
    the dict after."""
    result: dict = {}

    def target() -> None:
        try:
            result["response"] = call()
        except requests.RequestException as e:  # the server went away
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        thread.join(60)
    assert not thread.is_alive(), "the request did not end"


@pytest.mark.parametrize(
    ("how", "pending"),
    [("kernel", False), ("kernel", True), ("session", True)],
    ids=["kernel-delete", "kernel-delete-pending-kernels", "session-delete-pending-kernels"],
)
def test_shutting_a_starting_kernel_down_deletes_its_instance_at_once(
    jupyter_server, emulator, how, pending
):
    emulator.update_faults(provision_delay=120)  # far longer than the test may take
    server = jupyter_server(f"--MappingKernelManager.use_pending_kernels={pending}")
    model = {"path": "gpu.ipynb", "type": "notebook", "kernel": {"name": "flexai-a100"}}
    with in_background(lambda: server.post("api/sessions", json=model)) as result:
        kernel_id = booting_kernel_id(server)
        assert len(emulator.live_instances()) == 1
        started = time.monotonic()
        if how == "kernel":
            gone = server.delete(f"api/kernels/{kernel_id}")
        else:
            [session] = [s for s in server.get("api/sessions").json()]
            gone = server.delete(f"api/sessions/{session['id']}")
        assert gone.status_code == 204, gone.text
        assert time.monotonic() - started < 30
        assert emulator.live_instances() == []
    assert result["response"].status_code in (201, 500)
    assert kernel_id not in [k["id"] for k in server.get("api/kernels").json()]


# -- recovery after a lost instance ----------------------------------------------------------


def auto_restarting(kernel_name: str = "flexai-a100") -> AsyncIOLoopKernelManager:
    """A kernel manager whose restarter checks every half second, as a server's does."""
    config = Config({"KernelRestarter": {"time_to_dead": 0.5}})
    return AsyncIOLoopKernelManager(kernel_name=kernel_name, config=config)


async def test_a_kernel_whose_instance_is_reclaimed_restarts_on_a_new_one(emulator, kernelspecs):
    km = auto_restarting()
    await km.start_kernel()
    restarted = asyncio.Event()
    km.add_restart_callback(restarted.set, "restart")
    try:
        old = km.provisioner.instance_id
        reclaimed = time.monotonic()
        emulator.preempt(old)  # deleted and forgotten: the platform answers 404 for it
        await asyncio.wait_for(restarted.wait(), 30)  # 404 ends reconnecting at once
        assert time.monotonic() - reclaimed < 30, "the reconnect waited out reconnect_timeout"
        await until_async(
            lambda: km.provisioner.instance_id not in (None, old) and km.provisioner.remote_pid,
            "the kernel on a new instance",
            90,
        )
        new = km.provisioner.instance_id
        assert emulator.live_instances() == [new]
        async with connected_client(km) as kc:
            _, out = await run(kc, "print('recovered')")
        assert out.strip() == "recovered"
        phases = [(e.phase, e.message) for e in progress.history(km.kernel_id)]
        lost = phases.index(next(p for p in phases if p[0] == "lost"))
        assert "no longer exists" in phases[lost][1]
        after = [p for p, _ in phases[lost:]]
        assert after[:2] == ["lost", "shut down"] and after[-1] == "ready"
        assert {"requesting", "connecting", "starting kernel"} <= set(after)
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_kernel_that_cannot_be_recovered_is_reported_dead(emulator, kernelspecs):
    km = auto_restarting()
    await km.start_kernel()
    dead = asyncio.Event()
    km.add_restart_callback(dead.set, "dead")
    try:
        emulator.update_faults(capacity={"A100": 0})  # no new instance to be had
        emulator.preempt(km.provisioner.instance_id)
        await asyncio.wait_for(dead.wait(), 60)
        assert not await km.is_alive()
        lost = [e for e in progress.history(km.kernel_id) if e.phase == "lost"]
        assert len(lost) == 1 and "no longer exists" in lost[0].message
        assert emulator.live_instances() == []
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_lost_kernel_stops_renewing_its_lease(emulator, kernelspecs):
    kernelspecs.add(
        "flexai-lease",
        {"reconnect_timeout": 1.0, "ssh_keepalive_interval": 1.0, "instance_ttl": 3},
    )
    km = AsyncKernelManager(kernel_name="flexai-lease")  # no restarter: it stays dead
    await km.start_kernel()
    try:
        instance_id = km.provisioner.instance_id
        for pid in emulator.processes():  # the instance's network is gone; it still runs
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sshd"):
                os.kill(pid, signal.SIGKILL)
        await until_async(lambda: km.provisioner.lost_reason, "the kernel to be given up", 30)
        assert instance_id in emulator.live_instances()
        # Heartbeats (every second) would keep it; without them its 3 s lease runs out.
        await until_async(lambda: instance_id not in emulator.live_instances(), "the expiry", 20)
    finally:
        await km.shutdown_kernel(now=True)


def test_the_server_reports_a_lost_kernel_and_restarts_it(jupyter_server, emulator):
    server = jupyter_server()
    kernel = server.post("api/kernels", json={"name": "flexai-a100"}).json()
    [model] = server.get("api/compute/instances").json()["instances"]
    old = model["instance_id"]
    emulator.preempt(old)

    def phases() -> list[dict]:
        return server.get(f"api/compute/progress/{kernel['id']}").json()["phases"]

    def recovered() -> bool:
        seen = phases()
        return any(p["phase"] == "lost" for p in seen) and seen[-1]["phase"] == "ready"

    until(recovered, "the kernel to be lost and ready again", 90)
    [lost] = [p for p in phases() if p["phase"] == "lost"]
    assert lost["instance_id"] == old and "no longer exists" in lost["message"]
    [model] = server.get("api/compute/instances").json()["instances"]
    assert model["instance_id"] != old and model["lost_reason"] is None
    assert emulator.live_instances() == [model["instance_id"]]
    assert server.delete(f"api/kernels/{kernel['id']}").status_code == 204


def test_a_ledger_from_before_owner_ids_is_upgraded_and_its_rows_kept(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "CREATE TABLE instances (request_key TEXT PRIMARY KEY, instance_id TEXT, api_url TEXT"
            " NOT NULL, kernel_id TEXT, gpu_type TEXT, owner_host TEXT NOT NULL, owner_pid"
            " INTEGER NOT NULL, owner_started REAL NOT NULL, created_at REAL NOT NULL,"
            " deleted_at REAL)"
        )
        db.execute(
            "INSERT INTO instances VALUES ('r1', 'inst-1', 'http://x', 'k1', 'A100', 'h', 1, 2.0,"
            " 3.0, NULL)"
        )
    ledger = Ledger(path)
    [entry] = ledger.live()
    assert (entry.instance_id, entry.owner.pid, entry.delete_owed) == ("inst-1", 1, None)
    assert not entry.owner.died(), "an owner recorded without boot and PID namespace is unknown"
    ledger.mark_owed("r1", "HTTP 503")
    assert ledger.live()[0].delete_owed == "HTTP 503"
    assert len(Path(tmp_path, "owner-id").read_text().strip()) == 32
    assert Ledger(path).owner_id == ledger.owner_id
