"""The init of one emulated instance: runs sshd and reaps every orphan beneath it.

Run as a script (``python _subreaper.py LIFELINE_FD COMMAND...``), not imported. A real
machine's init reaps the orphans of detached kernels; this one does the same for its
instance, so a killed daemon does not linger as a zombie of a PID 1 that may never reap (as
in some containers). LIFELINE_FD is the read end of a pipe whose write end only the emulator
holds: end of file means the emulator died without deleting the instance, and then everything
beneath is killed, as when a cloud destroys a VM. It exits once nothing is left beneath it.

It starts the command before importing anything else (``ctypes``, ``signal`` and ``threading``
take ~10 ms here, and an instance is up only once its sshd listens). Becoming the subreaper
after the spawn is still in time: sshd starts no process of its own before a client logs in.
"""

import os
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def _children() -> list[int]:
    me, children = os.getpid(), []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[1]) == me and fields[0] != b"Z":
                children.append(int(name))
        except (OSError, IndexError, ValueError):
            pass
    return children


def _kill_everything_when_orphaned(lifeline: int) -> None:
    import contextlib
    import signal

    while os.read(lifeline, 4096):
        pass
    # Killed children's own children are reparented to us, so repeat until none is left.
    while children := _children():
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def main(lifeline: int, command: list[str]) -> int:
    os.set_inheritable(lifeline, False)
    child = os.posix_spawn(command[0], command, os.environ)
    import ctypes
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
    threading.Thread(target=_kill_everything_when_orphaned, args=(lifeline,), daemon=True).start()
    status = 0
    while True:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            return status
        if pid == child:
            status = os.waitstatus_to_exitcode(wait_status)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2:]))
