"""Warm starts (``keep_alive``): a kernel's instance parked at shutdown, adopted by the next.

Real emulator, real sshd, real kernels, each kernel in a process of its own as ``jupyter
execute`` runs would be. Every test ends by deleting what it parked (``gc --parked``), so
the suite's leak check still proves that nothing else is left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests
from conftest import until, until_async
from test_launch import Frontend
from test_launch import run as run_code
from test_lifecycle import JUPYTER_FLEXAI

from flexai_provisioner.client import FlexAIClient
from flexai_provisioner.gpu_platform import InstanceState
from flexai_provisioner.ledger import Ledger

WARM = "flexai-warm"
KEEP_ALIVE = 120

# Starts a kernel in a folder, runs code, prints what the test checks, shuts down cleanly;
# logs on stderr, as under a Jupyter app. argv: kernel name, folder, code. With a 4th
# argument, waits for a line on stdin first (so that several start their kernels at once).
RUN = textwrap.dedent(
    """
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from jupyter_client.manager import KernelManager
    from pathlib import Path
    from jupyter_core.paths import jupyter_runtime_dir
    from flexai_provisioner.client import FlexAIClient
    if len(sys.argv) > 4:
        sys.stdin.readline()
    km = KernelManager(kernel_name=sys.argv[1])
    km.start_kernel(cwd=sys.argv[2])
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    out = []
    def keep(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
    reply = kc.execute_interactive(sys.argv[3], timeout=60, output_hook=keep)
    instance = FlexAIClient().get_instance(km.provisioner.instance_id)
    parked_keys = sorted(p.name for p in Path(jupyter_runtime_dir()).glob("flexai-parked-*"))
    print(json.dumps({"instance": instance.id, "ttl": instance.ttl_seconds,
                      "parked_keys": parked_keys, "status": reply["content"]["status"],
                      "out": "".join(out)}), flush=True)
    kc.stop_channels()
    km.shutdown_kernel()
    """
)
# What the kernel sees: its process, its folder and the workspace root around it.
LOOK = (
    "import json, os; print(json.dumps({'pid': os.getpid(), 'here': sorted(os.listdir('.')),"
    " 'around': sorted(os.listdir('..'))}))"
)


@pytest.fixture
def warm(kernelspecs):
    """A kernelspec with a keep-alive, and ``gc --parked`` at the end whatever happened."""
    kernelspecs.add(WARM, {"keep_alive": KEEP_ALIVE})
    yield kernelspecs
    gc("--parked")


def gc(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [JUPYTER_FLEXAI, "gc", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


def run(folder: Path, code: str = LOOK, kernel: str = WARM) -> tuple[dict, str]:
    """One kernel's life in a process of its own: what it printed, and its log."""
    folder.mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", RUN, kernel, str(folder), code],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["status"] == "ok", result
    return result, done.stderr


def looked(result: dict) -> dict:
    return json.loads(result["out"].splitlines()[-1])


def parked_rows(api_url: str) -> dict[str, object]:
    return {e.instance_id: e for e in Ledger().parked(api_url)}


def client() -> FlexAIClient:
    return FlexAIClient()


# -- park, then adopt --------------------------------------------------------------------


def test_a_second_process_adopts_the_parked_instance_with_a_fresh_kernel(emulator, warm, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    (first / "input.txt").write_text("data")
    made = "open('made.txt', 'w').write('result'); " + LOOK
    one, said = run(first, made)
    instance_id = one["instance"]
    assert f"instance {instance_id} ran" in said and f"parked for {KEEP_ALIVE} s" in said

    # Shut down, yet running: parked with a lease of keep_alive, its key kept 0600.
    assert emulator.live_instances() == [instance_id]
    assert (first / "made.txt").read_text() == "result", "results came back as at shutdown"
    row = parked_rows(emulator.url)[instance_id]
    assert row.gpu_type == "A100" and row.gpu_count == 1
    assert row.parked_until == pytest.approx(time.time() + KEEP_ALIVE, abs=30)
    key = Path(row.key_file)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with client() as c:
        assert c.get_instance(instance_id).ttl_seconds == KEEP_ALIVE

    second = tmp_path / "second"
    second.mkdir()
    (second / "other.txt").write_text("x")
    two, log = run(second)
    assert two["instance"] == instance_id, log
    assert re.search(rf"connecting \([\d.]+s\): parked instance {instance_id}", log), log
    seen = looked(two)
    assert seen["pid"] != looked(one)["pid"], "a fresh kernel"
    assert seen["here"] == ["other.txt"], "none of the first kernel's files"
    assert seen["around"] == ["second"], "the first kernel's folder was cleared"
    assert two["ttl"] == 900, "the lease was back to instance_ttl while the kernel ran"
    assert two["parked_keys"] == [], "the adopter removed the parked copy of the key"

    # Parked again after the second kernel; gc --parked deletes it and its key.
    assert emulator.live_instances() == [instance_id]
    row = parked_rows(emulator.url)[instance_id]
    done = gc("--parked")
    assert instance_id in done.stdout and "parked" in done.stdout
    assert emulator.live_instances() == []
    assert not Path(row.key_file).exists()
    assert parked_rows(emulator.url) == {}


def test_instances_shows_a_parked_instance_and_gc_leaves_it_until_asked(emulator, warm, tmp_path):
    one, _ = run(tmp_path / "nb")
    instance_id = one["instance"]
    table = subprocess.run(
        [JUPYTER_FLEXAI, "instances"], capture_output=True, text=True, timeout=60
    )
    (row,) = [line.split() for line in table.stdout.splitlines() if line.startswith(instance_id)]
    assert row[1] == "parked" and row[6] == "$1.89"
    assert row[7].startswith("$") and float(row[7][1:]) > 0
    minutes, seconds = row[8].rstrip("s").split("m")
    assert 0 < int(minutes) * 60 + int(seconds) <= KEEP_ALIVE
    listed = subprocess.run(
        [JUPYTER_FLEXAI, "instances", "--json"], capture_output=True, text=True, timeout=60
    )
    (model,) = [i for i in json.loads(listed.stdout) if i["id"] == instance_id]
    assert model["state"] == "running"
    assert model["parked"]["state"] == "parked"
    assert 0 < model["parked"]["seconds_left"] <= KEEP_ALIVE
    assert model["parked"]["price_per_hour"] == pytest.approx(1.89)

    kept = gc()
    assert instance_id not in kept.stdout and "1 parked instance(s)" in kept.stdout
    assert emulator.live_instances() == [instance_id]
    dry = gc("--parked", "--dry-run")
    assert instance_id in dry.stdout and emulator.live_instances() == [instance_id]
    gc("--parked")
    assert emulator.live_instances() == []


def test_an_unadopted_instance_expires_on_the_platform_and_gc_closes_its_row(
    emulator, warm, tmp_path
):
    warm.add("flexai-brief", {"keep_alive": 3})
    one, _ = run(tmp_path / "nb", kernel="flexai-brief")
    instance_id = one["instance"]
    key = Path(parked_rows(emulator.url)[instance_id].key_file)
    assert key.exists()
    # No process of ours is left: the platform deletes it once the keep-alive is over.
    until(lambda: instance_id not in emulator.live_instances(), "the platform to expire it")
    done = gc()
    assert instance_id in done.stdout and "keep-alive over" in done.stdout
    assert parked_rows(emulator.url) == {} and not key.exists()


def test_exit_cleanup_deletes_what_runs_but_not_what_is_parked(emulator, warm):
    """A process parks one kernel's instance, then ends with another kernel still running."""
    script = textwrap.dedent(
        """
        import json, sys
        from jupyter_client.manager import KernelManager
        kms = [KernelManager(kernel_name=sys.argv[1]) for _ in range(2)]
        for km in kms:
            km.start_kernel()
            km.client().wait_for_ready(timeout=60)
        print(json.dumps([km.provisioner.instance_id for km in kms]), flush=True)
        kms[0].shutdown_kernel()  # parked; kms[1] is left running as the process ends
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, WARM], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parked, running = json.loads(done.stdout.splitlines()[-1])
    assert emulator.live_instances() == [parked]
    with client() as c:
        assert c.get_instance(running).state is InstanceState.DELETED
    assert set(parked_rows(emulator.url)) == {parked}


# -- what is not parked ------------------------------------------------------------------


def test_without_keep_alive_the_instance_is_deleted_at_shutdown(emulator, kernelspecs, tmp_path):
    one, said = run(tmp_path / "nb", kernel="flexai-a100")
    assert "parked" not in said
    assert emulator.live_instances() == []
    with client() as c:
        assert c.get_instance(one["instance"]).state is InstanceState.DELETED
    assert parked_rows(emulator.url) == {}
    assert list(Path(os.environ["JUPYTER_RUNTIME_DIR"]).glob("flexai-*.key")) == []


async def test_a_failed_start_deletes_even_with_keep_alive(emulator, warm):
    from jupyter_client.manager import AsyncKernelManager

    from flexai_provisioner.errors import KernelLaunchError

    warm.add("flexai-broken-warm", {"keep_alive": KEEP_ALIVE, "remote_python": "/no/python"})
    km = AsyncKernelManager(kernel_name="flexai-broken-warm")
    with pytest.raises(KernelLaunchError):
        await km.start_kernel()
    await until_async(lambda: not emulator.live_instances(), "the failed start's deletion")
    assert parked_rows(emulator.url) == {}


async def test_a_negative_keep_alive_is_refused_before_any_request(emulator, kernelspecs):
    from jupyter_client.manager import AsyncKernelManager

    from flexai_provisioner.errors import ConfigurationError

    kernelspecs.add("flexai-negative", {"keep_alive": -1})
    km = AsyncKernelManager(kernel_name="flexai-negative")
    with pytest.raises(ConfigurationError, match=r"keep_alive must be >= 0 seconds \(0: off\)"):
        await km.start_kernel()
    assert emulator.live_instances() == []


# -- adoption that cannot happen ---------------------------------------------------------


@pytest.mark.parametrize("fate", ["deleted", "preempted", "stopped"])
def test_a_parked_instance_gone_meanwhile_is_replaced_by_a_new_one(emulator, warm, tmp_path, fate):
    one, _ = run(tmp_path / "nb")
    gone = one["instance"]
    with client() as c:
        if fate == "deleted":
            c.delete_instance(gone)
        elif fate == "stopped":
            c.stop_instance(gone)
    if fate == "preempted":
        emulator.preempt(gone)
    two, log = run(tmp_path / "nb")
    assert two["instance"] != gone
    said = [line for line in log.splitlines() if "cannot be adopted" in line]
    assert len(said) == 1 and gone in said[0], log
    assert two["parked_keys"] == [], "the key of the instance given up went with it"
    assert gone not in emulator.live_instances()
    assert set(parked_rows(emulator.url)) == {two["instance"]}


def test_an_instance_past_the_kernels_max_hours_is_not_adopted(emulator, warm, tmp_path):
    """Its hours count from its creation, as its bill does: a kernel adopting it would be shut
    down at the server's next limit check."""
    warm.add("flexai-warm-brief", {"keep_alive": KEEP_ALIVE, "max_hours": 0.0001})  # 0.36 s
    one, _ = run(tmp_path / "nb", kernel="flexai-warm-brief")
    two, log = run(tmp_path / "nb", kernel="flexai-warm-brief")
    assert two["instance"] != one["instance"]
    (said,) = [line for line in log.splitlines() if "cannot be adopted" in line]
    assert one["instance"] in said and "reaching the kernel's max_hours of 0.0001 h" in said
    assert emulator.live_instances() == [two["instance"]]


def test_a_kernel_with_other_labels_does_not_adopt(emulator, warm, tmp_path):
    warm.add("flexai-team-b", {"keep_alive": KEEP_ALIVE, "labels": {"team": "b"}})
    one, _ = run(tmp_path / "nb")
    two, _ = run(tmp_path / "nb", kernel="flexai-team-b")
    assert two["instance"] != one["instance"], "a team's instance is not billed to another"
    three, _ = run(tmp_path / "nb", kernel="flexai-team-b")
    assert three["instance"] == two["instance"]
    assert set(parked_rows(emulator.url)) == {one["instance"], two["instance"]}


def test_two_processes_starting_at_once_adopt_one_instance_at_most(emulator, warm, tmp_path):
    one, _ = run(tmp_path / "nb")
    parked = one["instance"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RUN, WARM, str(tmp_path / "nb"), LOOK, "wait"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:  # both read the line at once: their claims race
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    ids = [json.loads(out.splitlines()[-1])["instance"] for out, _ in outputs]
    assert ids.count(parked) == 1 and len(set(ids)) == 2, ids
    assert set(parked_rows(emulator.url)) == set(ids)


def test_the_ledger_gives_a_parked_row_to_one_claimant_only(flexai_env, tmp_path):
    """The claim itself, raced by eight processes released at the same moment."""
    ledger = Ledger()
    ledger.record_request("req-1", "http://api", "kernel-1", "A100")
    ledger.record_instance("req-1", "inst-1")
    ledger.park("req-1", time.time() + 60, 1, None, "SHA256:x", "{}")
    claim = textwrap.dedent(
        """
        import sys
        from flexai_provisioner.ledger import Ledger
        ledger = Ledger()
        sys.stdin.readline()
        print(ledger.claim("req-1", "kernel-" + sys.argv[1]))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", claim, str(i)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    for proc in procs:  # released together once all are waiting
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert sorted(outputs) == ["False"] * 7 + ["True"]
    (row,) = ledger.live("http://api")
    assert row.parked_until is None
    assert row.kernel_id == f"kernel-{outputs.index('True')}"


@pytest.mark.parametrize("stage", ["restoring its lease", "connecting"])
async def test_a_start_cancelled_while_adopting_parks_the_instance_again(
    emulator, warm, tmp_path, stage
):
    """The cancel was of that start, not of the healthy instance it was taking over."""
    from jupyter_client.manager import AsyncKernelManager

    from flexai_provisioner.errors import StartCancelledError

    if stage == "connecting":
        emulator.update_faults(link_latency_ms=1)  # reached through the emulator's relay
    one, _ = run(tmp_path / "nb")
    instance_id = one["instance"]
    before = parked_rows(emulator.url)[instance_id]
    if stage == "connecting":
        emulator.update_faults(link_latency_ms=300)  # the SSH login takes seconds
    else:
        emulator.update_faults(latency=1.0)  # so does the PATCH restoring the lease
    km = AsyncKernelManager(kernel_name=WARM)
    task = asyncio.ensure_future(km.start_kernel(cwd=str(tmp_path / "nb")))
    try:
        await until_async(lambda: not parked_rows(emulator.url), "the claim", 60)
        assert km.provisioner.cancel_start("the user changed their mind")
        with pytest.raises(StartCancelledError, match=r"changed their mind.*parked again"):
            await task
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    emulator.update_faults(latency=0.0, link_latency_ms=0.0)
    assert emulator.live_instances() == [instance_id]
    after = parked_rows(emulator.url)[instance_id]
    assert before.parked_until - 2 < after.parked_until <= before.parked_until, (
        "parked again for what it had left"
    )
    assert Path(after.key_file).exists(), "its key kept for the next adopter"
    with client() as c:
        assert c.get_instance(instance_id).ttl_seconds <= KEEP_ALIVE, "no lease of 900 s left"
    two, log = run(tmp_path / "nb")
    assert two["instance"] == instance_id, log


# -- the argv launcher (VS Code, emacs-jupyter) ------------------------------------------


def launcher(kernelspecs, name: str, directory: Path) -> Frontend:
    """What a raw-kernel frontend runs for kernelspec ``name``: its argv, a connection file
    naming it (as jupyter_client and VS Code write ``kernel_name``)."""
    directory.mkdir()
    spec = json.loads((kernelspecs.root / "kernels" / name / "kernel.json").read_text())
    fe = Frontend(spec["argv"], directory)
    info = json.loads(fe.connection_file.read_text())
    fe.connection_file.write_text(json.dumps({**info, "kernel_name": name}))
    return fe


def test_the_argv_launcher_parks_at_a_stop_signal_and_the_next_one_adopts(emulator, warm, tmp_path):
    """SIGTERM is how VS Code stops a raw kernel at a normal shutdown (it sends no
    shutdown_request): the kernel is asked to shut down, so it ends as after one (its exit
    handlers run, their files come back), and its instance is parked."""
    one = launcher(warm, WARM, tmp_path / "one")
    try:
        proc = one.start()
        bye = "import atexit; atexit.register(lambda: open('bye.txt', 'w').write('clean'))"
        _, out = run_code(
            one.client(), f"{bye}; import os; print(os.environ['FLEXAI_INSTANCE_ID'])"
        )
        instance_id = out.strip()
        proc.send_signal(signal.SIGTERM)
        assert one.wait() == 128 + signal.SIGTERM, one.stderr()
    finally:
        one.stop()
    assert f"parked for {KEEP_ALIVE} s" in one.stderr()
    assert (tmp_path / "one" / "bye.txt").read_text() == "clean"
    assert emulator.live_instances() == [instance_id]
    assert set(parked_rows(emulator.url)) == {instance_id}
    with client() as c:
        assert c.get_instance(instance_id).ttl_seconds == KEEP_ALIVE

    # The next launcher of that kernelspec adopts it; a clean exit parks it again.
    two = launcher(warm, WARM, tmp_path / "two")
    try:
        two.start()
        _, out = run_code(two.client(), "import os; print(os.environ['FLEXAI_INSTANCE_ID'])")
        assert out.strip() == instance_id
        assert f"parked instance {instance_id}" in two.stderr()
        two.clients[0].shutdown()
        assert two.wait() == 0, two.stderr()
    finally:
        two.stop()
    assert f"parked for {KEEP_ALIVE} s" in two.stderr()
    assert emulator.live_instances() == [instance_id]
    assert set(parked_rows(emulator.url)) == {instance_id}


# The frontend, as the launcher's parent: it runs argv and waits, until it is killed.
PARENT = "import subprocess, sys; subprocess.Popen(sys.argv[1:]).wait()"


def test_the_argv_launcher_parks_when_its_frontend_dies_with_a_busy_kernel(
    emulator, warm, tmp_path
):
    """The frontend gone (VS Code quit or crashed) is an end like its SIGTERM. A kernel busy in
    a cell does not exit at a shutdown request before the cell ends: it is killed after the
    wait, as jupyter_client's shutdown kills it, and its instance parked all the same."""
    directory = tmp_path / "nb"
    fe = launcher(warm, WARM, directory)
    fe.argv = [sys.executable, "-c", PARENT, *fe.argv]
    try:
        parent = fe.start()
        kc = fe.client()
        _, out = run_code(kc, "import os; print(os.environ['FLEXAI_INSTANCE_ID'])")
        instance_id = out.strip()
        kc.execute("import time; time.sleep(600)")
        parent.kill()
        parent.wait(10)
        until(lambda: "shut down; instance" in fe.stderr(), "the launcher's shutdown", 60)
    finally:
        fe.stop()
    assert "the frontend that started it is gone: shutting the kernel down" in fe.stderr()
    assert f"parked for {KEEP_ALIVE} s" in fe.stderr()
    assert emulator.live_instances() == [instance_id]
    assert set(parked_rows(emulator.url)) == {instance_id}


def test_a_stop_signal_to_the_argv_launcher_during_its_start_deletes_the_instance(
    emulator, warm, tmp_path
):
    emulator.update_faults(stuck=True)  # the instance is created and never runs
    fe = launcher(warm, WARM, tmp_path / "nb")
    try:
        proc = fe.start()
        until(emulator.live_instances, "the instance's creation", 60)
        proc.send_signal(signal.SIGTERM)
        assert fe.wait() == 128 + signal.SIGTERM, fe.stderr()
    finally:
        fe.stop()
    assert "SIGTERM: deleting the instance" in fe.stderr() and "parked" not in fe.stderr()
    assert emulator.live_instances() == [] and parked_rows(emulator.url) == {}


def test_a_stop_signal_to_the_argv_launcher_while_it_adopts_parks_the_instance_again(
    emulator, warm, tmp_path
):
    """The signal's teardown runs beside the start's thread, which is mid-adoption."""
    emulator.update_faults(link_latency_ms=1)  # reached through the emulator's relay
    one, _ = run(tmp_path / "nb")
    instance_id = one["instance"]
    emulator.update_faults(link_latency_ms=300)  # the adopter's SSH login takes seconds
    fe = launcher(warm, WARM, tmp_path / "two")
    try:
        proc = fe.start()
        until(lambda: not parked_rows(emulator.url), "the claim", 60)
        proc.send_signal(signal.SIGTERM)
        assert fe.wait() == 128 + signal.SIGTERM, fe.stderr()
    finally:
        fe.stop()
    assert "parked again" in fe.stderr()
    assert emulator.live_instances() == [instance_id]
    assert set(parked_rows(emulator.url)) == {instance_id}


def test_the_argv_launcher_deletes_after_a_crash_even_with_keep_alive(emulator, warm, tmp_path):
    fe = launcher(warm, WARM, tmp_path / "nb")
    try:
        fe.start()
        fe.client().execute("import os; os._exit(3)")
        assert fe.wait() == 3, fe.stderr()
    finally:
        fe.stop()
    assert "parked" not in fe.stderr()
    assert emulator.live_instances() == [] and parked_rows(emulator.url) == {}


def test_the_argv_launcher_refuses_a_bad_keep_alive_in_its_kernelspec(emulator, warm, tmp_path):
    warm.add("flexai-bad-warm", {"keep_alive": "long"})
    fe = launcher(warm, "flexai-bad-warm", tmp_path / "nb")
    fe.start()
    assert fe.wait() == 1
    assert "kernelspec 'FlexAI A100'" in fe.stderr() and "keep_alive" in fe.stderr()
    assert emulator.live_instances() == []


# -- a restart's hand-off: the old launcher parks while the new one starts ---------------

# The kernel's exit handlers outlast the launcher's shutdown wait (5 s, then the kernel is
# killed and its instance parked), so the next launcher surely looks while it parks.
SLOW_EXIT = "import atexit, time; atexit.register(time.sleep, 60)"
INSTANCE_ID = "import os; print(os.environ['FLEXAI_INSTANCE_ID'])"


def being_parked(api_url: str) -> set[str | None]:
    return {e.instance_id for e in Ledger().live(api_url) if e.parking_since is not None}


def requests_made(api_url: str) -> int:
    """Instances ever requested from ``api_url`` (a ledger row is written before each)."""
    with contextlib.closing(sqlite3.connect(Ledger().path)) as db:
        query = "SELECT COUNT(*) FROM instances WHERE api_url = ?"
        return db.execute(query, (api_url,)).fetchone()[0]


def test_a_restart_of_the_argv_launcher_hands_its_instance_to_the_next_one(
    emulator, warm, tmp_path
):
    """VS Code restarts a raw kernel with a SIGTERM to its launcher and, at once, a new
    launcher: that one finds nothing parked yet, waits for the instance being parked and
    adopts it. Only one instance is ever requested (the old code requested a second)."""
    one = launcher(warm, WARM, tmp_path / "one")
    two = launcher(warm, WARM, tmp_path / "two")
    try:
        proc = one.start()
        _, out = run_code(one.client(), f"{SLOW_EXIT}; {INSTANCE_ID}")
        instance_id = out.strip()
        proc.send_signal(signal.SIGTERM)
        two.start()
        _, out = run_code(two.client(), INSTANCE_ID)
        assert out.strip() == instance_id, two.stderr()
        assert one.wait() == 128 + signal.SIGTERM, one.stderr()
        two.clients[0].shutdown()
        assert two.wait() == 0, two.stderr()
    finally:
        two.stop()
        one.stop()
    assert "waiting for the instance another kernel is parking" in two.stderr()
    assert f"parked instance {instance_id}" in two.stderr()
    assert requests_made(emulator.url) == 1
    assert emulator.live_instances() == [instance_id]
    assert set(parked_rows(emulator.url)) == {instance_id}


def stop_mid_park(proc: subprocess.Popen, frontend, emulator) -> str:
    """SIGTERM the launcher ``proc`` (its kernel slow to exit) and stop it (SIGSTOP) once its
    parking is recorded: asked to exit, not yet parked. Its instance's id."""
    _, out = run_code(frontend.client(), f"{SLOW_EXIT}; {INSTANCE_ID}")
    first = out.strip()
    proc.send_signal(signal.SIGTERM)
    until(lambda: being_parked(emulator.url) == {first}, "the parking's record", 30)
    proc.send_signal(signal.SIGSTOP)
    return first


def test_a_launcher_killed_while_it_parks_is_not_waited_for_and_its_instance_is_deleted(
    emulator, warm, tmp_path
):
    """The parker stopped mid-park (SIGSTOP, after its parking is recorded) and then killed
    (SIGKILL): the next launcher, waiting for it, sees its owner die, stops waiting and
    provisions; the dead parker's instance is deleted by the reaper that the waiter starts
    (its owner died, as any orphan's), not left to the platform's time-to-live."""
    one = launcher(warm, WARM, tmp_path / "one")
    two = launcher(warm, WARM, tmp_path / "two")
    proc = None
    try:
        proc = one.start()
        first = stop_mid_park(proc, one, emulator)
        two.start()
        waiting = "waiting for the instance another kernel is parking"
        until(lambda: waiting in two.stderr(), "the new launcher's wait", 60)
        proc.kill()
        assert proc.wait(30) == -signal.SIGKILL
        _, out = run_code(two.client(), INSTANCE_ID)
        second = out.strip()
        until(lambda: first not in emulator.live_instances(), "the dead parker's deletion", 60)
        two.clients[0].shutdown()
        assert two.wait() == 0, two.stderr()
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        two.stop()
        one.stop()
    assert second != first
    log = two.stderr()
    assert "the process parking an instance died; provisioning instead" in log
    assert f"deleted FlexAI instance {first} left by an earlier kernel (ledger, owner died)" in log
    assert requests_made(emulator.url) == 2
    assert emulator.live_instances() == [second]
    assert set(parked_rows(emulator.url)) == {second}
    assert being_parked(emulator.url) == set()


def test_a_start_waits_for_a_stalled_parker_only_up_to_the_bound(emulator, warm, tmp_path):
    """The parker stalled mid-park (SIGSTOP) but alive: the next launcher waits for it up to
    the bound, then provisions. Still alive, the parker keeps its instance (no one deletes it
    from under it); once killed, the reaper (`gc` here) deletes it, its owner having died."""
    one = launcher(warm, WARM, tmp_path / "one")
    two = launcher(warm, WARM, tmp_path / "two")
    proc = None
    try:
        proc = one.start()
        first = stop_mid_park(proc, one, emulator)
        two.start()
        _, out = run_code(two.client(), INSTANCE_ID)
        second = out.strip()
        assert sorted(emulator.live_instances()) == sorted([first, second])
        proc.kill()
        assert proc.wait(30) == -signal.SIGKILL
        done = gc()
        assert first in done.stdout and "owner died" in done.stdout, done.stdout
        two.clients[0].shutdown()
        assert two.wait() == 0, two.stderr()
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        two.stop()
        one.stop()
    assert second != first
    assert "no instance was parked within 15 s; provisioning instead" in two.stderr()
    assert emulator.live_instances() == [second]
    assert being_parked(emulator.url) == set()


# -- the server extension ----------------------------------------------------------------


def test_the_server_lists_parked_instances_and_stop_deletes_them(
    emulator, warm, jupyter_server, tmp_path
):
    server = jupyter_server()

    def start() -> tuple[str, str]:
        answer = server.post("api/kernels", json={"name": WARM})
        assert answer.status_code == 201, answer.text
        kernel_id = answer.json()["id"]
        (model,) = server.get("api/compute/instances").json()["instances"]
        return kernel_id, model["instance_id"]

    # A kernel shut down as Jupyter does (its notebook closed) parks its instance...
    kernel_id, instance_id = start()
    assert server.delete(f"api/kernels/{kernel_id}").status_code == 204
    listed = server.get("api/compute/instances").json()
    assert listed["instances"] == []
    (parked,) = listed["parked"]
    assert parked["instance_id"] == instance_id and parked["state"] == "parked"
    assert (parked["gpu_type"], parked["gpu_count"], parked["price_per_hour"]) == ("A100", 1, 1.89)
    assert parked["cost_usd"] > 0 and 0 < parked["seconds_left"] <= KEEP_ALIVE
    assert parked["uptime_seconds"] > 0 and parked["created_at"].endswith("Z")

    # ...which the next kernel adopts; Stop on that kernel deletes it rather than park it.
    kernel_id, adopted = start()
    assert adopted == instance_id
    stopped = server.post(f"api/compute/instance/{adopted}/stop")
    assert stopped.status_code == 200 and stopped.json()["state"] == "deleted"
    assert emulator.live_instances() == [] and parked_rows(emulator.url) == {}

    # Stop on a parked instance deletes it too.
    kernel_id, instance_id = start()
    assert server.delete(f"api/kernels/{kernel_id}").status_code == 204
    stopped = server.post(f"api/compute/instance/{instance_id}/stop")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json() == {
        "kernel_id": None, "instance_id": instance_id, "state": "deleted", "cost_usd": None
    }  # fmt: skip
    assert emulator.live_instances() == [] and server.get("api/compute/instances").json() == {
        "instances": [],
        "parked": [],
    }


def test_a_cancelled_adoption_with_too_little_keep_alive_left_is_not_parked_again(
    emulator, warm, tmp_path
):
    """Nobody could adopt it before the platform deletes it: its owner deletes it instead."""
    from flexai_provisioner.parking import Parked, give_back
    from flexai_provisioner.ssh import load_private_key

    one, _ = run(tmp_path / "nb")
    row = parked_rows(emulator.url)[one["instance"]]
    ledger = Ledger()
    assert ledger.claim(row.request_key, "cancelled-kernel")
    key = load_private_key(row.key_file)
    short = dataclasses.replace(row, parked_until=time.time() + 3)
    log = logging.getLogger("test")
    with client() as c:
        assert give_back(c, ledger, Parked(short, key), True, log) == 0
        assert c.get_instance(one["instance"]).ttl_seconds == KEEP_ALIVE, "lease untouched"
        assert parked_rows(emulator.url) == {}, "still claimed, for its owner to delete"
        assert give_back(c, ledger, Parked(row, key), False, log) > KEEP_ALIVE - 30
    assert set(parked_rows(emulator.url)) == {one["instance"]}, "with time left: parked again"


def test_a_claim_checks_the_keep_alive_left_in_the_same_update(flexai_env):
    """A start that read the row while it had time left and claims it after waiting for the
    ledger's lock must not get an instance the platform is deleting meanwhile."""
    ledger = Ledger()
    ledger.record_request("req-1", "http://api", "kernel-1", "A100")
    ledger.record_instance("req-1", "inst-1")
    ledger.park("req-1", time.time() + 3, 1, None, "SHA256:x", "{}")
    assert not ledger.claim("req-1", "kernel-2", time.time() + 5)
    (row,) = ledger.parked("http://api")
    assert row.kernel_id == "kernel-1", "still parked, untouched"
    assert ledger.claim("req-1", "kernel-2", time.time())
    assert ledger.parked("http://api") == []


def test_the_servers_stop_on_an_instance_being_adopted_deletes_it(
    emulator, warm, jupyter_server, tmp_path
):
    """A Stop is of the instance: unlike a shutdown of the starting kernel, it does not park
    the instance again."""
    emulator.update_faults(link_latency_ms=1)  # reached through the emulator's relay
    one, _ = run(tmp_path / "nb")
    instance_id = one["instance"]
    emulator.update_faults(link_latency_ms=300)  # the adopter's SSH login takes seconds
    server = jupyter_server()

    def stop() -> requests.Response | None:  # a 404 until the start names its instance
        answer = server.post(f"api/compute/instance/{instance_id}/stop")
        return None if answer.status_code == 404 else answer

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = pool.submit(server.post, "api/kernels", json={"name": WARM})
        until(lambda: not parked_rows(emulator.url), "the claim", 60)
        stopped = until(stop, "the adopter to name the instance")
        assert stopped.status_code == 200 and stopped.json()["state"] == "deleted", stopped.text
        assert started.result().status_code >= 400
    assert emulator.live_instances() == [] and parked_rows(emulator.url) == {}
