"""The kernelspec's ``argv``, for frontends that launch kernels themselves.

VS Code's local kernels and emacs-jupyter ignore ``metadata.kernel_provisioner``: they write a
connection file, run ``argv`` and talk to the ports in the file. Run that way, this module
does what the provisioner does, on the same :class:`~flexai_provisioner.session.InstanceSession`
(ledger, time-to-live, pinned host key, phases logged on stderr): it listens on the file's
ports on 127.0.0.1 at once, provisions an instance, copies the directory it was started in
(the notebook's, as these frontends start kernels) to the instance, starts ipykernel there
with the file's key and signature scheme, and forwards the ports to it; at the end, the
kernel's results come back as they do for the provisioner. jupyter_client never runs it: its
provisioner replaces ``argv`` with ipykernel on the instance.

Towards the frontend it behaves like a local kernel process:

- SIGINT interrupts the kernel (``interrupt_mode: signal``);
- the kernel's exit ends this process with the kernel's status, after deleting the instance;
  a clean exit (status 0, as after a ``shutdown_request``) parks a healthy one instead if the
  kernelspec sets ``keep_alive``, exactly as the provisioner's shutdown does;
- SIGTERM, SIGHUP or the frontend's death (this process's parent changes) end this process
  (status 128 + the signal, or 1). They are how these frontends stop a kernel at a normal
  shutdown (VS Code kills the process it started, sending no ``shutdown_request``), so with
  ``keep_alive`` a kernel that runs on a healthy link is first asked to shut down, as
  jupyter_client asks it, and its instance parked; otherwise the instance is deleted: during
  the start (a parked one it is still adopting is parked again), after the kernel's crash, or
  with the link down. The parking is recorded in the ledger before the kernel is asked to
  stop, so the next launcher a restart starts at once waits to adopt the instance
  (:mod:`.parking`) rather than provision another.

A SIGKILL leaves the instance to ``jupyter flexai gc`` (the ledger names this process as its
owner) and to the platform's time-to-live.

The settings are the provisioner's: those of the kernelspec the connection file names
(``kernel_name``, which jupyter_client and VS Code write) in its provisioner config, checked
as the provisioner checks them, else the traits' defaults; the API, its key and the SSH key
among them, found as the provisioner finds them. ``--gpu``, ``--gpu-count``,
``--no-workspace`` and ``--workspace-max-mb`` in ``argv`` win.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import select
import signal
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from traitlets import TraitError

from . import executor, parking, progress
from .client import FlexAIClient
from .config import (
    AccessSettings,
    SessionSettings,
    check_gpu_count,
    check_positive,
    check_provisioner_config,
)
from .errors import ConfigurationError, FlexAIError
from .kernel_key import KernelKey
from .kernelspecs import LAUNCHER_MODULE, PROVISIONER_NAME, ipykernel_argv, kernel_name
from .ledger import Ledger
from .provisioner import FlexAIProvisioner
from .reaper import reap_and_report
from .session import FORWARDED_ENV, PORT_NAMES, InstanceSession
from .ssh import TRANSPORT_LOG

PROG = "python -m flexai_provisioner.launch"

log = logging.getLogger("flexai_provisioner.launch")

POLL_INTERVAL = 0.2  # how often the parent and the kernel are checked; the kernel's exit is
# already in the agent channel's buffer, so a check costs no round trip

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

SHUTDOWN_WAIT = 5.0  # seconds a kernel asked to shut down has to exit before it is killed, as
# the provisioner gives it (get_shutdown_wait_time)


def read_connection_file(path: str) -> dict[str, Any]:
    """The frontend's connection file, checked: tcp on loopback, five ports, a key."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"cannot read connection file {path}: {e}") from None
    if not isinstance(info, dict):
        raise ConfigurationError(f"connection file {path} holds no JSON object")
    if info.get("transport", "tcp") != "tcp":
        raise ConfigurationError(
            f"connection file {path}: transport {info['transport']!r} is not supported; use tcp"
        )
    if info.get("ip", "127.0.0.1") not in ("127.0.0.1", "localhost"):
        raise ConfigurationError(
            f"connection file {path}: ip {info['ip']!r}: FlexAI kernels listen on 127.0.0.1 only"
        )
    for name in PORT_NAMES:
        port = info.get(name)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigurationError(
                f"connection file {path}: {name} must be a port number from 1 to 65535, "
                f"not {port!r}"
            )
    if not isinstance(info.get("key", ""), str):
        raise ConfigurationError(f"connection file {path}: key must be a string")
    return info


class Launcher:
    """One kernel on a FlexAI instance, owned by this process for a frontend."""

    def __init__(
        self,
        gpu_type: str,
        gpu_count: int,
        connection: dict[str, Any],
        settings: SessionSettings | None = None,
        access: AccessSettings | None = None,
    ):
        self.gpu_type = gpu_type
        self.gpu_count = gpu_count
        self.connection = connection
        self.kernel_id = str(uuid.uuid4())
        self.settings = settings or SessionSettings.defaults(FlexAIProvisioner)
        self.access = access or AccessSettings.defaults(FlexAIProvisioner)
        self._signals: list[int] = []  # appended by handlers, consumed by the main loop
        self._wake_r, self._wake_w = os.pipe()
        self._started = threading.Event()  # the remote kernel runs
        self._start_error: BaseException | None = None
        self._start_done = threading.Event()
        self.session: InstanceSession | None = None

    def run(self) -> int:
        """Start the kernel, serve it until it or the frontend ends; return the exit status."""
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGINT, *STOP_SIGNALS):
            signal.signal(signum, lambda signum, _frame: self._signals.append(signum))
        parent = os.getppid()
        access = self.access
        platform = FlexAIClient(
            access.api_url or None, access.api_key or None, deadline=access.api_timeout
        )
        ledger = Ledger()
        if access.reap_orphans_at_start:
            executor.submit(lambda: reap_and_report(platform, ledger, platform.api_url, log))
        key = KernelKey.for_kernel(self.kernel_id, access.ssh_key_file, access.ssh_key_passphrase)
        session = InstanceSession(platform, ledger, platform.api_url, key, self.settings, log)
        self.session = session
        keep_alive = 0  # parked only after a clean shutdown: every other end deletes
        try:
            # At once, before minutes of provisioning: the frontend may check that the
            # kernel listens, and no other process can take the ports meanwhile.
            session.listen({name: self.connection[name] for name in PORT_NAMES})
            worker = threading.Thread(target=self._start, name="flexai-launch", daemon=True)
            worker.start()
            status, clean = self._serve(parent)
            if clean:
                keep_alive = self.settings.keep_alive
        finally:
            parked = session.teardown(keep_alive)
            note = f"parked for {parked} s for the next kernel (keep_alive)" if parked else ""
            progress.report_shutdown(log, self.kernel_id, session.instance, note)
        return status

    def _start(self) -> None:
        assert self.session is not None
        phase = progress.reporter(log, self.kernel_id, time.monotonic(), self._instance_id)
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        try:
            # No provisioner info to reattach with: the key is kept only for a workspace's
            # `jupyter flexai sync`.
            self.session.start(
                os.getcwd(), self.gpu_type, self.gpu_count, self.kernel_id, phase, keep_key=False
            )
            argv = ipykernel_argv(self.settings.remote_python)
            self.session.launch_kernel(argv, self.connection, env)
            self._started.set()
            phase("ready")
        except BaseException as e:
            self._start_error = e
        finally:
            self._start_done.set()
            os.write(self._wake_w, b"\0")

    def _instance_id(self) -> str | None:
        return self.session.instance_id if self.session is not None else None

    def _serve(self, parent: int) -> tuple[int, bool]:
        """Wait for signals, the start, the kernel's exit or the parent's; return the exit
        status, and whether the kernel was shut down cleanly (its instance may be parked)."""
        assert self.session is not None
        while True:
            select.select([self._wake_r], [], [], POLL_INTERVAL)
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
            # The kernel's own end first: a crash that a stop signal follows is still a crash.
            status = self.session.kernel_status() if self._started.is_set() else None
            if status is not None:
                self._say(f"the kernel exited with status {status}")
                return (status if status >= 0 else 128 - status), status == 0
            signals, self._signals = self._signals, []
            for signum in signals:
                if signum in STOP_SIGNALS:
                    return 128 + signum, self._stop(signal.Signals(signum).name)
                if self._started.is_set():
                    self.session.signal(signal.SIGINT)
                else:
                    self._say("interrupt ignored: the kernel is not running yet")
            if os.getppid() != parent:
                return 1, self._stop("the frontend that started it is gone")
            if self._start_done.is_set() and self._start_error is not None:
                if isinstance(self._start_error, FlexAIError):
                    print(f"{PROG}: error: {self._start_error}", file=sys.stderr, flush=True)
                    return 1, False
                raise self._start_error

    def _stop(self, why: str) -> bool:
        """The frontend's stop: with ``keep_alive``, ask a kernel that runs on a healthy link to
        shut down (as jupyter_client does); whether it may be parked."""
        assert self.session is not None
        if not (self.settings.keep_alive and self._started.is_set() and self.session.connected):
            self._say(f"{why}: deleting the instance")
            return False
        s = self.session  # a restart's new launcher waits for the instance from here on
        parking.begin(s.ledger, s.request_key, s.instance, s.key, s.settings)
        self._say(f"{why}: shutting the kernel down")
        client = BlockingKernelClient()
        client.load_connection_info(self.connection)
        channel = client.control_channel  # to this process's own port, as a frontend's
        deadline = time.monotonic() + SHUTDOWN_WAIT
        try:
            request = client.shutdown()
            # Its reply says the request is through: only then may the tunnel hold new
            # connections (this one's among them) while the kernel's ports close.
            with contextlib.suppress(queue.Empty):
                while _parent_id(channel.get_msg(timeout=_left(deadline))) != request:
                    pass
            self.session.expect_kernel_exit()
            while self.session.kernel_status() is None and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL / 4)
        finally:
            channel.close()
            client.context.destroy(linger=0)
        return True

    def _say(self, text: str) -> None:
        log.info("FlexAI kernel %s: %s", self.kernel_id, text)


def _parent_id(message: dict[str, Any]) -> object:
    return message["parent_header"].get("msg_id")


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def kernelspec_settings(name: object, gpu_type: str) -> tuple[SessionSettings, AccessSettings]:
    """The settings in the provisioner config of kernelspec ``name`` (the connection file's
    ``kernel_name``), checked as the provisioner checks them; the traits' defaults if it names
    no kernelspec that runs this launcher, so the platform, the key, a warm start
    (``keep_alive``), its ``labels`` and its time-to-live are the same whichever frontend runs
    the kernel."""
    try:
        spec = KernelSpecManager().get_kernel_spec(name) if isinstance(name, str) else None
    except NoSuchKernel:
        spec = None
    provisioner = (spec.metadata if spec else {}).get("kernel_provisioner", {})
    if (
        spec is None
        or provisioner.get("provisioner_name") != PROVISIONER_NAME
        or list(spec.argv[1:3]) != ["-m", LAUNCHER_MODULE]
    ):
        return (
            SessionSettings.defaults(FlexAIProvisioner),
            AccessSettings.defaults(FlexAIProvisioner),
        )
    config = {"gpu_type": gpu_type, **provisioner.get("config", {})}
    try:
        configured = FlexAIProvisioner(kernel_id="", kernel_spec=spec, parent=None, **config)
    except TraitError as e:
        raise ConfigurationError(f"kernelspec {spec.display_name!r}: {e}") from None
    check_provisioner_config(configured)
    return SessionSettings.of(configured), AccessSettings.of(configured)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a Jupyter kernel on a FlexAI GPU instance for a frontend that starts "
        "kernelspecs itself (VS Code, emacs-jupyter). The API is found as the provisioner "
        "finds it: the kernelspec's api_url, FLEXAI_API_URL / FLEXAI_API_KEY, then the "
        "credentials file.",
    )
    parser.add_argument("--gpu", required=True, metavar="TYPE", help="GPU type, e.g. A100")
    parser.add_argument("--gpu-count", type=int, default=1, metavar="N", help="GPUs (1..8)")
    parser.add_argument(
        "-f",
        "--f",
        "--connection-file",
        dest="connection_file",
        required=True,
        metavar="FILE",
        help="the connection file the frontend wrote (its ports, key, signature scheme)",
    )
    parser.add_argument(
        "--no-workspace",
        dest="workspace",
        action="store_false",
        default=None,
        help="start the kernel in the instance's home directory instead of a copy of this "
        "one (the provisioner's workspace = False)",
    )
    parser.add_argument(
        "--workspace-max-mb",
        type=float,
        metavar="MB",
        help="refuse to copy a directory holding more (default: the kernelspec's "
        f"workspace_max_mb, else {FlexAIProvisioner.workspace_max_mb.default_value:g})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
    package_log = logging.getLogger("flexai_provisioner")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    logging.getLogger(TRANSPORT_LOG).setLevel(logging.WARNING)  # paramiko's chatter
    try:
        kernel_name(args.gpu)
        check_gpu_count(args.gpu_count)
        connection = read_connection_file(args.connection_file)
        flags = {"workspace": args.workspace, "workspace_max_mb": args.workspace_max_mb}
        if args.workspace_max_mb is not None:
            check_positive("--workspace-max-mb", args.workspace_max_mb, "MB")
        settings, access = kernelspec_settings(connection.get("kernel_name"), args.gpu)
        settings = replace(settings, **{k: v for k, v in flags.items() if v is not None})
        launcher = Launcher(args.gpu, args.gpu_count, connection, settings, access)
        return launcher.run()
    except FlexAIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
