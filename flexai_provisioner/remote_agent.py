"""The agent that runs on the instance, sent as source over SSH (``python3 -c``).

It needs nothing but the instance's Python (3.8 or later). Two modes, both reading one JSON
line on stdin:

``launch``  ``{"argv": [...], "env": {...}, "connection": {...}}``: pick five free loopback
            ports, write a 0600 connection file, start the kernel in its own session (so it
            survives the SSH connection dropping), print ``{"pid", "ports", "connection_file"}``.
``attach``  ``{"pid": N}``: print ``{"pid": N}`` if that kernel still runs, else its exit.
``preload`` as ``launch``, but started ahead of need (a standby for the next start or
            restart): it listens on five ports and prints ``{"ports"}`` at once, imports
            ipykernel, reads its spec, then forks the kernel from itself (which costs its
            set-up, not its ~0.3 s of imports) and the fork's ZeroMQ sockets take over the
            listening ones (``ZMQ_USE_FD``), so connections made meanwhile wait in their
            backlog: the client's forwards open while ipykernel imports. It forks only what
            ``python -m ipykernel_launcher`` with this same Python and no PYTHON* variables
            would run, while it has a single thread; else it closes them, as ``launch``.

Then, in both modes, it stays as the kernel's watcher for as long as its channel is open:
each further stdin line ``{"signal": S}`` signals the kernel's process group, and when the
kernel exits it prints ``{"exit": status}`` (status ``null`` when unknown) and removes the
connection file. When stdin closes (the SSH connection dropped or was closed) it just
leaves, and the kernel keeps running.

In ``launch`` and ``attach`` its start-up is on the critical path, so it runs as
``python3 -I -S`` and imports only ``os``, ``sys``, ``time`` and C modules (~14 ms to its
first line of work, against ~31 ms with json, subprocess, socket, tempfile and shutil);
other Pythons than CPython fall back to the standard modules.
"""

import os
import select
import sys
import time

try:
    import _json
    import _signal as signal
    import _socket as socket
except ImportError:  # not CPython
    _json = None
    import signal
    import socket

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
PROBE_INTERVAL = 0.001  # a refused probe costs the starting kernel nothing


class _Decoder:
    """The settings ``_json.make_scanner`` reads (json.JSONDecoder's defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float


def loads(text):
    if _json is None:
        import json

        return json.loads(text)
    return _json.make_scanner(_Decoder())(text.strip(), 0)[0]


def dumps(obj):
    if _json is None:
        import json

        return json.dumps(obj)
    if obj is None or obj is True or obj is False:
        return {None: "null", True: "true", False: "false"}[obj]
    if isinstance(obj, str):
        return _json.encode_basestring_ascii(obj)
    if isinstance(obj, int):
        return str(int(obj))
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, dict):
        items = ("%s: %s" % (dumps(str(k)), dumps(v)) for k, v in obj.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(dumps(v) for v in obj) + "]"
    raise TypeError("cannot encode %r" % (obj,))


def rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class Lines:
    """Lines from raw stdin: select() must see every byte, so no buffered reader."""

    def __init__(self):
        self.buf = b""

    def read(self):
        """The next line, or None at end of input; blocks only if no full line is buffered."""
        while b"\n" not in self.buf:
            chunk = os.read(0, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return loads(line.decode())

    def pending(self):
        return b"\n" in self.buf


def emit(obj):
    sys.stdout.write(dumps(obj) + "\n")
    sys.stdout.flush()


def reserve_ports(n, backlog=None):
    """Sockets holding ``n`` free loopback ports until the kernel listens on them.

    Bound with SO_REUSEADDR, so the kernel's own bind (ZeroMQ sets it too) succeeds while
    nothing else can take the port meanwhile (closing them at once left it up for grabs
    during the kernel's ~0.2 s start, with 16 kernels starting together on one host); and
    listening if ``backlog``, for a forked kernel to take over (:func:`hand_over`).
    """
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        if backlog:
            s.listen(backlog)
        socks.append(s)
    return socks


def port_map(socks):
    return dict(zip(PORT_NAMES, [s.getsockname()[1] for s in socks]))


def release(socks):
    for s in socks:
        s.close()


def make_workdir():
    base = os.environ.get("TMPDIR") or "/tmp"
    while True:
        path = os.path.join(base, "flexai-kernel-" + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def find_executable(path, env):
    """``path`` looked up on the kernel's PATH, as ``Popen(env=...)`` does."""
    if os.sep in path:
        return path
    for directory in os.get_exec_path(env):
        candidate = os.path.join(directory, path)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("%s not found on PATH" % path)


class Child:
    """The kernel process, started like ``subprocess.Popen`` with ``start_new_session``."""

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None

    @classmethod
    def spawn(cls, argv, env, cwd, log_path):
        path = find_executable(argv[0], env)
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.chdir(cwd)  # posix_spawn cannot change directory; ours does not matter
            pid = os.posix_spawn(
                path,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out, 1),
                    (os.POSIX_SPAWN_DUP2, out, 2),
                ],
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        finally:
            os.close(out)
        return cls(pid)

    @classmethod
    def fork(cls, argv, env, cwd, log_path, held, bound):
        """The kernel as a fork of this (preloaded) process, its sockets bound to ``held``'s
        listening ones (it writes to ``bound`` once all are); the child never returns."""
        os.chdir(cwd)  # here, so that a missing folder is an error the agent can report
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            os.close(out)
            return cls(pid)
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
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python's own, which main() undid
            sys.argv = [argv[0], *argv[3:]]  # run_module puts the module's path first
            code = run_kernel_module(argv[2])
        finally:
            # Never unwind into the agent's frames: this process is the kernel now.
            os._exit(code)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = exit_code(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.returncode = exit_code(os.waitpid(self.pid, 0)[1])
        return self.returncode


def hand_over(held, bound):
    """Bind the kernel's ZeroMQ sockets to ``held``'s listening sockets, by port, as systemd's
    socket activation does; write to ``bound`` once all are bound."""
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


PRELOADED = "ipykernel_launcher"


def preload():
    """Import what ``python -m ipykernel_launcher`` imports; whether the import worked."""
    if _json is None:  # not CPython: forking an interpreter is only known safe there
        return False
    try:
        import ipykernel.kernelapp  # noqa: F401 - imported to be inherited by forks
    except Exception:
        return False
    return True


def forkable(argv, env):
    """Whether a fork of this process runs what ``argv`` would, in ``env``."""
    if len(argv) < 3 or argv[1:3] != ["-m", PRELOADED]:
        return False
    if any(
        name.startswith("PYTHON") and os.environ.get(name) != value for name, value in env.items()
    ):
        return False  # they act at interpreter start-up, which a fork skips
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


def exit_code(status):
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def listening(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0
    finally:
        s.close()


def launch(spec, lines, preloaded=False, held=None):
    """Start the kernel on ``held``'s ports (listening ones, from a standby) or fresh ones."""
    workdir = make_workdir()
    early = held is not None  # listening already
    held = held or reserve_ports(len(PORT_NAMES))
    ports = port_map(held)
    connection = dict(spec["connection"], ip="127.0.0.1", transport="tcp", **ports)
    connection_file = os.path.join(workdir, "kernel.json")
    fd = os.open(connection_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(dumps(connection))
    argv = [arg.replace("{connection_file}", connection_file) for arg in spec["argv"]]
    env = dict(os.environ, **spec.get("env", {}))
    log_path = os.path.join(workdir, "kernel.log")
    cwd = spec.get("cwd") or os.path.expanduser("~")
    timeout = spec.get("timeout", 60)
    bound = None
    try:
        if early and preloaded and forkable(argv, env) and hasattr(sys.modules["zmq"], "USE_FD"):
            bound, bound_w = os.pipe()
            try:
                proc = Child.fork(argv, env, cwd, log_path, held, bound_w)
            finally:
                os.close(bound_w)
                release(held)  # the kernel's now: if it dies, connections see them close
        else:
            if early:
                release(held)  # the kernel binds them itself, which it cannot while they listen
            proc = Child.spawn(argv, env, cwd, log_path)
    except OSError as e:
        release(held)
        if bound is not None:
            os.close(bound)
        rmtree(workdir)
        emit({"error": "cannot start %r: %s" % (argv[0], e)})
        return
    if bound is not None:
        ready = wait_bound(proc, bound, timeout)
    else:
        ready = wait_listening(proc, list(ports.values()), timeout)
        release(held)
    if not ready:
        with open(log_path, "rb") as log:
            tail = log.read()[-2000:].decode(errors="replace")
        status = proc.poll()
        if status is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        rmtree(workdir)
        emit({"error": "kernel exited with status %s before listening:\n%s" % (status, tail)})
        return
    emit({"pid": proc.pid, "ports": ports, "connection_file": connection_file})
    watch(proc.pid, proc, workdir, lines)


def wait_listening(proc, ports, timeout):
    """Report the kernel only once it accepts connections, so nobody is refused."""
    deadline = time.monotonic() + timeout
    waiting = list(ports)
    while waiting:
        if listening(waiting[0]):
            waiting.pop(0)
        elif proc.poll() is not None or time.monotonic() >= deadline:
            return False
        else:
            time.sleep(PROBE_INTERVAL)
    return True


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


def attach(spec, lines):
    pid = spec["pid"]
    if exited(pid, None):
        emit({"exit": None})
        return
    emit({"pid": pid})
    watch(pid, None, spec.get("workdir"), lines)


def exited(pid, proc):
    if proc is not None:
        return proc.poll() is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def watch(pid, proc, workdir, lines):
    # A pidfd wakes us the moment the kernel exits; without one (old kernels), poll.
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    waitables = [0] + ([pidfd] if pidfd is not None else [])
    while True:
        if not lines.pending():
            readable, _, _ = select.select(waitables, [], [], None if pidfd is not None else 0.5)
        else:
            readable = [0]
        if exited(pid, proc):
            emit({"exit": proc.wait() if proc is not None else None})
            if workdir:
                rmtree(workdir)
            return
        if 0 in readable:
            command = lines.read()
            if command is None:
                return
            if "ping" in command:  # the client checks that the link still carries answers
                emit({"pong": command["ping"]})
            signum = command.get("signal")
            if signum:
                for target in (-pid, pid):  # its process group, else the process alone
                    try:
                        os.kill(target, signum)
                        break
                    except OSError:
                        continue


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    lines = Lines()
    mode = sys.argv[1]
    if mode == "preload":
        held = reserve_ports(len(PORT_NAMES), backlog=64)
        emit({"ports": port_map(held)})
        preloaded = preload()
        spec = lines.read()
        if spec is not None:  # None: the standby was closed before it was needed
            launch(spec, lines, preloaded, held)
        return
    spec = lines.read()
    {"launch": launch, "attach": attach}[mode](spec, lines)


if __name__ == "__main__":
    main()
