"""Finding and ending an instance's processes through ``/proc``.

A kernel started over SSH is deliberately detached (setsid, double fork) so it survives SSH
drops, so an instance's processes are not all in one process tree or group. Every process
started through an instance's sshd carries ``FLEXAI_INSTANCE_ID=<id>`` in its environment
(sshd's SetEnv); sshd itself overwrites its environment block with its process title, so
sshd processes are found as descendants (or group members) of the instance's init instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

ENV_VAR = "FLEXAI_INSTANCE_ID"
_POLL = 0.02


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgid: int
    zombie: bool


def _read_stat(pid: int) -> _Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; the fields after the last ")" don't.
    fields = data[data.rfind(b")") + 2 :].split()
    return _Proc(pid, int(fields[1]), int(fields[2]), zombie=fields[0] in (b"Z", b"X"))


def _environ(pid: int) -> set[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return set(f.read().split(b"\0"))
    except OSError:
        return set()


def _all_processes() -> dict[int, _Proc]:
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (proc := _read_stat(int(name))) is not None:
            procs[proc.pid] = proc
    return procs


def _own_lineage(procs: dict[int, _Proc]) -> set[int]:
    """This process and its ancestors: never to be signalled, whatever their environment."""
    lineage, pid = set(), os.getpid()
    while pid > 0 and pid not in lineage:
        lineage.add(pid)
        pid = procs[pid].ppid if pid in procs else 0
    return lineage


def find(instance_ids: Iterable[str], roots: Iterable[int] = ()) -> set[int]:
    """Live pids belonging to ``instance_ids``: tagged by environment, or under ``roots``.

    "Under a root" means the root itself, its descendants, and its process group's members.
    Zombies are not live: they hold no resources but a pid, and are their parent's to reap.
    """
    markers = {f"{ENV_VAR}={i}".encode() for i in instance_ids}
    roots = set(roots)
    procs = _all_processes()
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found = {p.pid for p in procs.values() if p.pid in roots or p.pgid in roots}
    stack = list(found | roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    if markers:
        found |= {pid for pid in procs if pid not in found and markers & _environ(pid)}
    live = {pid for pid in found if pid in procs and not procs[pid].zombie}
    return live - _own_lineage(procs)


def _signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)
            if signum == signal.SIGTERM:
                os.kill(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM once continued


def _wait_until_gone(lookup: Callable[[], set[int]], deadline: float) -> set[int]:
    while (pids := lookup()) and time.monotonic() < deadline:
        time.sleep(_POLL)
    return pids


def terminate(
    instance_id: str, init: subprocess.Popen[bytes] | None, grace: float = 3.0
) -> set[int]:
    """End every process of ``instance_id``: SIGTERM, ``grace`` seconds, then SIGKILL.

    ``init`` (the instance's subreaper, parent of its sshd) goes last, so that it reaps the
    others as they die instead of leaving zombies; it is then reaped here. Returns the pids
    that survived even SIGKILL (normally none).
    """
    roots = [init.pid] if init is not None and init.poll() is None else []

    def lookup() -> set[int]:
        return find([instance_id], roots) - set(roots)

    _signal_all(lookup(), signal.SIGTERM)
    survivors = _wait_until_gone(lookup, time.monotonic() + grace)
    deadline = time.monotonic() + grace
    while survivors and time.monotonic() < deadline:
        _signal_all(survivors, signal.SIGKILL)
        survivors = _wait_until_gone(lookup, min(deadline, time.monotonic() + 0.2))
    if init is not None:
        _stop_child(init, grace)
    # Anything that outlived init was reparented out of its tree; its environment still tells.
    strays = find([instance_id])
    _signal_all(strays, signal.SIGKILL)
    return _wait_until_gone(lambda: find([instance_id]), time.monotonic() + grace)


def _stop_child(child: subprocess.Popen[bytes], grace: float) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
