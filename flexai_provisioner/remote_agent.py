"""The agent that runs on the instance, sent as source over SSH (``python3 -c``).

It needs nothing but the instance's Python. Two modes, both reading one JSON line on stdin:

``launch``  ``{"argv": [...], "env": {...}, "connection": {...}}``: pick five free loopback
            ports, write a 0600 connection file, start the kernel in its own session (so it
            survives the SSH connection dropping), print ``{"pid", "ports", "connection_file"}``.
``attach``  ``{"pid": N}``: print ``{"pid": N}`` if that kernel still runs, else its exit.

Then, in both modes, it stays as the kernel's watcher for as long as its channel is open:
each further stdin line ``{"signal": S}`` signals the kernel's process group, and when the
kernel exits it prints ``{"exit": status}`` (status ``null`` when unknown) and removes the
connection file. When stdin closes (the SSH connection dropped or was closed) it just
leaves, and the kernel keeps running.
"""

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


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
        return json.loads(line)

    def pending(self):
        return b"\n" in self.buf


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch(spec, lines):
    workdir = tempfile.mkdtemp(prefix="flexai-kernel-")
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
    connection = dict(spec["connection"], ip="127.0.0.1", transport="tcp", **ports)
    connection_file = os.path.join(workdir, "kernel.json")
    fd = os.open(connection_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(connection, f)
    argv = [arg.replace("{connection_file}", connection_file) for arg in spec["argv"]]
    env = dict(os.environ, **spec.get("env", {}))
    with open(os.path.join(workdir, "kernel.log"), "ab") as out:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=spec.get("cwd") or os.path.expanduser("~"),
                start_new_session=True,
            )
        except OSError as e:
            shutil.rmtree(workdir, ignore_errors=True)
            emit({"error": "cannot start %r: %s" % (argv[0], e)})
            return
    if not wait_listening(proc, list(ports.values()), spec.get("timeout", 60)):
        with open(os.path.join(workdir, "kernel.log"), "rb") as log:
            tail = log.read()[-2000:].decode(errors="replace")
        status = proc.poll()
        if status is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        emit({"error": "kernel exited with status %s before listening:\n%s" % (status, tail)})
        return
    emit({"pid": proc.pid, "ports": ports, "connection_file": connection_file})
    watch(proc.pid, proc, workdir, lines)


def wait_listening(proc, ports, timeout):
    """Report the kernel only once it accepts connections, so nobody is refused."""
    deadline = time.monotonic() + timeout
    waiting = list(ports)
    while waiting and proc.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", waiting[0]), timeout=1).close()
            waiting.pop(0)
        except OSError:
            time.sleep(0.01)
    return not waiting


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
                shutil.rmtree(workdir, ignore_errors=True)
            return
        if 0 in readable:
            command = lines.read()
            if command is None:
                return
            signum = command.get("signal")
            if signum:
                try:
                    os.killpg(pid, signum)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signum)


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    lines = Lines()
    spec = lines.read()
    {"launch": launch, "attach": attach}[sys.argv[1]](spec, lines)


if __name__ == "__main__":
    main()
