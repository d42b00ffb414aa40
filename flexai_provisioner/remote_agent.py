"""The agent that runs on the instance, sent as source over SSH (``python3 -c``).

It needs nothing but the instance's Python (3.8 or later). Two modes, both reading one JSON
line on stdin:

``launch``  ``{"argv": [...], "env": {...}, "connection": {...}}``: pick five free loopback
            ports, write a 0600 connection file, start the kernel in its own session (so it
            survives the SSH connection dropping), print ``{"pid", "ports", "connection_file"}``.
``attach``  ``{"pid": N}``: print ``{"pid": N}`` if that kernel still runs, else its exit.
``preload`` as ``launch``, but started ahead of need (a standby for the next start or
            restart), with ``remote_fork.py``'s source sent ahead of this one: it listens on
            five ports and prints ``{"ports"}`` at once, imports ipykernel (``preload PID``:
            once the kernel PID, just launched, has settled; it leaves if its input ends
            meanwhile), reads its spec,
            then forks the kernel from itself, the fork's ZeroMQ sockets taking the
            listening ones over; a kernel it cannot fork it starts as ``launch`` does.

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

# remote_fork.py's source comes ahead of this one in preload mode; imported (tests, linters)
# or run without it (launch, attach: not needed then), its names come from the module if any.
# (No contextlib.suppress: importing contextlib costs this agent's start-up a few ms.)
if "fork_kernel" not in globals():
    try:  # noqa: SIM105
        from flexai_provisioner.remote_fork import (
            fork_kernel,
            forkable,
            preload,
            preload_startup,
            wait_bound,
            wait_settled,
        )
    except ImportError:
        pass

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

    def at_end(self):
        """Read what has come (call only when select() says stdin is readable): whether it
        is the end of input."""
        chunk = os.read(0, 65536)
        self.buf += chunk
        return not chunk


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
        if early and preloaded and forkable(argv, env, find_executable):
            bound, bound_w = os.pipe()
            try:
                proc = Child(fork_kernel(argv, env, cwd, log_path, held, bound_w))
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
        if len(sys.argv) > 2:
            wait_settled(int(sys.argv[2]))
            if select.select([0], [], [], 0)[0] and lines.at_end():
                return  # closed while it waited (shutdown, parking): nothing to import for
        preloaded = preload()
        if preloaded and not lines.pending() and not select.select([0], [], [], 0)[0]:
            preload_startup()  # not asked for yet
        spec = lines.read()
        if spec is not None:  # None: the standby was closed before it was needed
            launch(spec, lines, preloaded, held)
        return
    spec = lines.read()
    {"launch": launch, "attach": attach}[mode](spec, lines)


if __name__ == "__main__":
    main()
