"""What runs behind an emulated instance: its own sshd with a fresh host key and only the
requested public key authorised (or, under ``banner_hang``, a listener that never says a
word), reached through a delay relay under the link faults; and its end, with every process
started through it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from . import procs
from .faults import FaultInjector
from .keys import fingerprint, new_private_key, public_line, write_private_key
from .link import DelayedLink
from .records import Instance
from .sshd import BannerHang, SSHDProcess, start_sshd

log = logging.getLogger("flexai_provisioner.emulator")

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Machines:
    """Starts and ends the endpoints of one platform's instances."""

    injector: FaultInjector
    sshd_path: str
    instance_python_dir: str
    """First on the PATH of SSH sessions: its ``python3`` has ipykernel."""
    user: str
    grace: float
    lifeline: int
    """The read end of a pipe only the emulator's process can write: instance inits watch
    it, so they end with the emulator even when it is killed."""

    def start_link(self, inst: Instance, port: int) -> DelayedLink | None:
        """A relay in front of ``port``, if the instance's link faults ask for one."""
        if not (inst.faults.link_latency_ms or inst.faults.link_bandwidth_mbps):
            return None

        def shape() -> tuple[float, float]:
            live = self.injector.faults  # not the instance's snapshot: a link can degrade
            return live.link_latency_ms / 1000, live.link_bandwidth_mbps * 1e6 / 8

        return DelayedLink(port, shape)

    def session_env(self, inst: Instance) -> dict[str, str]:
        """The environment sshd gives every session of ``inst`` (its SetEnv)."""
        return {
            procs.ENV_VAR: inst.id,
            "FLEXAI_GPU_TYPE": inst.request.gpu_type,
            "FLEXAI_GPU_COUNT": str(inst.request.gpu_count),
            "PATH": f"{self.instance_python_dir}{os.pathsep}{SYSTEM_PATH}",
            "HOME": str(inst.directory / "home"),
            "TMPDIR": str(inst.directory / "tmp"),
        }

    def start_endpoint(self, inst: Instance) -> tuple[SSHDProcess | BannerHang, str]:
        """The instance's SSH server and the host key fingerprint the platform reports for
        it (another key's under ``wrong_host_key``)."""
        host_key = new_private_key()
        host_key_path = inst.directory / "ssh_host_ed25519_key"
        write_private_key(host_key, host_key_path)
        host_public = public_line(host_key, inst.id)
        host_key_path.with_suffix(".pub").write_text(host_public + "\n")
        reported = public_line(new_private_key()) if inst.faults.wrong_host_key else host_public
        authorized = (
            public_line(new_private_key(), "unrelated-key")
            if inst.faults.wrong_authorized_key
            else inst.request.ssh_public_key
        )
        authorized_keys = inst.directory / "authorized_keys"
        fd = os.open(authorized_keys, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(authorized + "\n")
        if inst.faults.banner_hang:
            return BannerHang(), fingerprint(reported)
        server = start_sshd(
            sshd_path=self.sshd_path,
            instance_id=inst.id,
            directory=inst.directory,
            host_key=host_key_path,
            authorized_keys=authorized_keys,
            user=self.user,
            session_env=self.session_env(inst),
            lifeline=self.lifeline,
        )
        return server, fingerprint(reported)

    def release(self, inst: Instance) -> None:
        """End the endpoint and every process of ``inst``. Caller holds ``inst.teardown``."""
        link, inst.link = inst.link, None
        if link is not None:
            link.stop(self.grace)
        endpoint, inst.endpoint = inst.endpoint, None
        if endpoint is not None:
            endpoint.stop(self.grace)
        survivors = procs.terminate(inst.id, None, self.grace)
        if survivors:
            log.warning("instance %s: processes survived SIGKILL: %s", inst.id, sorted(survivors))
