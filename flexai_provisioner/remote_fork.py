"""The fork server half of the kernel agent, sent ahead of ``remote_agent.py``'s source in its
``preload`` mode (and only then: ``launch`` and ``attach`` start faster without it).

A standby agent imports ipykernel before its kernel is asked for (:func:`preload`), and while
it still waits, what the kernel imports as it starts (:func:`preload_startup`); one started
beside a kernel that is just starting first waits for it to settle (:func:`wait_settled`),
so as not to slow that start down. Then it forks the kernel from itself (:func:`fork_kernel`),
which costs the kernel its set-up and not its ~0.4 s of imports. It forks only what ``python
-m ipykernel_launcher`` with the same Python would run: the kernel's env may differ in no
PYTHON* variable and in none that Python code read while importing, and the agent must have
a single thread (:func:`forkable`). The fork's ZeroMQ sockets take over the agent's listening
sockets (:func:`hand_over`), so connections made to the kernel's ports before it runs wait in
their backlog instead of being refused.

Like the agent, it needs nothing but the instance's Python (3.8 or later) and ipykernel.
"""

import os
import select
import signal
import sys
import time
from collections.abc import MutableMapping
from contextlib import contextmanager, suppress

PRELOADED = "ipykernel_launcher"
# What IPKernelApp.initialize imports, past what ipykernel_launcher does: debugpy's ~0.1 s
# for the debugger above all. Absent or broken ones are left for the kernel to meet itself.
STARTUP_IMPORTS = (
    "ipykernel.debugger",
    "IPython.core.debugger",
    "IPython.core.completerlib",
    "IPython.extensions.storemagic",
    "sqlite3",
    "psutil",
)

_read = set()  # environment variables read while importing: the imports may keep their values


def wait_settled(pid, quiet=0.05, most=5.0):
    """Until process ``pid`` has slept, using no CPU, for ``quiet`` seconds (a kernel that has
    started and waits for requests) or has exited, for ``most`` seconds at most, or until a
    kernel is asked for on stdin."""
    deadline = time.monotonic() + most
    used, since = None, time.monotonic()
    while not select.select([0], [], [], 0.01)[0]:
        now = time.monotonic()
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return
        if fields[0] == b"Z":
            return
        total = int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
        if fields[0] != b"S" or total != used:  # runnable (maybe preempted), or it ran
            used, since = total, now
        if now - since >= quiet or now >= deadline:
            return


def preload():
    """Import what ``python -m ipykernel_launcher`` imports; whether the import worked (and
    whether forking can hand it sockets over)."""
    if sys.implementation.name != "cpython":  # forking an interpreter is only known safe there
        return False
    try:
        with _noting_reads():
            import ipykernel.kernelapp  # noqa: F401 - imported to be inherited by forks
            import zmq
    except Exception:
        return False
    return hasattr(zmq, "USE_FD")


def preload_startup():
    """Import what the kernel imports as it starts (for a standby with time to spare: a
    kernel that is waited for does the same imports itself, no later)."""
    for name in STARTUP_IMPORTS:
        with suppress(Exception), _noting_reads():
            __import__(name)


class _NotingEnviron(MutableMapping):
    """``os.environ``'s stand-in while importing: each variable read goes into ``_read``."""

    def __init__(self, real):
        self.real = real

    def __getitem__(self, name):
        if isinstance(name, str):
            _read.add(name)
        return self.real[name]

    def __setitem__(self, name, value):
        self.real[name] = value

    def __delitem__(self, name):
        del self.real[name]

    def __iter__(self):
        return iter(self.real)

    def __len__(self):
        return len(self.real)

    def copy(self):
        return self.real.copy()


@contextmanager
def _noting_reads():
    real = os.environ
    # Rebinding, not clearing, is the point: os.getenv reads the name too.
    os.environ = _NotingEnviron(real)  # noqa: B003
    try:
        yield
    finally:
        os.environ = real  # noqa: B003


def forkable(argv, env, find_executable):
    """Whether a fork of this process runs what ``argv`` would, in ``env``."""
    if len(argv) < 3 or argv[1:3] != ["-m", PRELOADED]:
        return False
    if any(
        name.startswith("PYTHON") and os.environ.get(name) != value for name, value in env.items()
    ):
        return False  # they act at interpreter start-up, which a fork skips
    if any(env.get(name) != os.environ.get(name) for name in _read):
        return False  # the preloaded modules may hold the agent's value
    try:
        executable = find_executable(argv[0], env)
    except OSError:
        return False
    if os.path.realpath(executable) != os.path.realpath(sys.executable):
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1  # a fork keeps only its own thread
    except OSError:
        return False


def fork_kernel(argv, env, cwd, log_path, held, bound):
    """The kernel's pid: a fork of this (preloaded) process whose sockets bind to ``held``'s
    listening ones, and which writes to ``bound`` once all are. The child never returns."""
    os.chdir(cwd)  # here, so that a missing folder is an error the agent can report
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(out)
        return pid
    code = 1
    try:
        os.setsid()
        hand_over(held, bound)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python's own, which the agent undid
        sys.argv = [argv[0], *argv[3:]]  # run_module puts the module's path first
        code = run_kernel_module(argv[2])
    finally:
        # Never unwind into the agent's frames: this process is the kernel now.
        os._exit(code)


def hand_over(held, bound):
    """Bind the kernel's ZeroMQ sockets to ``held``'s listening sockets, by port, as systemd's
    socket activation does (``ZMQ_USE_FD``); write to ``bound`` once all are bound."""
    import threading

    import zmq

    fds = {s.getsockname()[1]: s.detach() for s in held}
    lock = threading.Lock()  # the heartbeat binds from a thread of its own
    bind = zmq.Socket.bind

    def bind_held(self, addr):
        port = addr.rpartition(":")[2] if str(addr).startswith("tcp://") else ""
        with lock:
            fd = fds.pop(int(port), None) if port.isdigit() else None
        if fd is None:
            return bind(self, addr)
        self.setsockopt(zmq.USE_FD, fd)
        try:
            return bind(self, addr)
        finally:
            self.setsockopt(zmq.USE_FD, -1)
            with lock:
                if not fds:
                    os.write(bound, b"1")

    zmq.Socket.bind = bind_held


def wait_bound(proc, bound, timeout):
    """Until the forked kernel has bound its sockets (it writes to ``bound``), or exits, or
    ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([bound], [], [], 0.05)[0]:
                return os.read(bound, 1) == b"1"
        return False
    finally:
        os.close(bound)


def run_kernel_module(name):
    """Run ``name`` as ``python -m`` would and end as the interpreter would; its status."""
    import atexit
    import runpy
    import traceback

    try:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what a normal exit runs; os._exit then skips nothing else
    sys.stdout.flush()
    sys.stderr.flush()
    if code is None or isinstance(code, int):
        return code or 0
    sys.stderr.write("%s\n" % (code,))
    return 1
