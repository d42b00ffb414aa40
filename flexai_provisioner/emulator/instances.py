"""Instances and their life cycle: the emulated platform without its HTTP layer.

```
pending ──► provisioning ──► running ──► stopping ──► stopped
   │              │              │
   └──────────────┴──► failed    └──────────► deleted (from any state)
```
A worker thread per instance walks it from ``pending`` to ``running`` (or ``failed``); stop
and delete run in the caller's thread and return once the instance's processes are gone.
Capacity is global; instances, idempotency keys and lookups are per account.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import procs
from .catalog import GPUCatalogEntry
from .errors import ApiError, EmulatorError, invalid, not_found
from .faults import FaultInjector
from .keys import fingerprint
from .machine import Machines
from .records import Instance
from .sshd import SSHDProcess
from .validation import ProvisionRequest, parse_provision

log = logging.getLogger("flexai_provisioner.emulator")

LIVE_STATES = frozenset({"pending", "provisioning", "running", "stopping"})


class Cloud:
    """Accounts' instances, GPU capacity, idempotency and the TTL reaper."""

    def __init__(
        self,
        *,
        catalog: tuple[GPUCatalogEntry, ...],
        injector: FaultInjector,
        state_dir: Path,
        sshd_path: str,
        instance_python_dir: str,
        user: str,
        grace: float = 3.0,
    ):
        self.catalog = {entry.name: entry for entry in catalog}
        self.injector = injector
        self.state_dir = state_dir
        self.grace = grace
        self.lock = threading.RLock()
        self._instances: dict[str, Instance] = {}
        self._idempotency: dict[tuple[str, str], tuple[str, str]] = {}
        self._closing = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="flexai-emulator-ttl", daemon=True)
        # Instance inits watch the read end; only this process holds the write end.
        self._lifeline_read, self._lifeline_write = os.pipe()
        self.machines = Machines(
            injector=injector,
            sshd_path=sshd_path,
            instance_python_dir=instance_python_dir,
            user=user,
            grace=grace,
            lifeline=self._lifeline_read,
        )

    # --- capacity -------------------------------------------------------------------------

    def _available(self) -> dict[str, int]:
        capacity = self.injector.faults.capacity
        held = dict.fromkeys(self.catalog, 0)
        for inst in self._instances.values():
            if inst.state in LIVE_STATES:
                held[inst.request.gpu_type] += inst.request.gpu_count
        return {
            name: max(0, capacity.get(name, entry.capacity) - held[name])
            for name, entry in self.catalog.items()
        }

    def gpu_types(self) -> list[dict[str, Any]]:
        with self.lock:
            available = self._available()
        return [
            {
                "name": e.name,
                "memory_gb": e.memory_gb,
                "price_per_hour": e.price_per_hour,
                "available": available[e.name],
            }
            for e in self.catalog.values()
        ]

    # --- API operations (raise ApiError) --------------------------------------------------

    def provision(self, account: str, body: Any, idempotency_key: str | None) -> tuple[int, dict]:
        """Create an instance: (201, instance), or (200, the same instance) on a replay."""
        try:
            canonical = json.dumps(body, sort_keys=True)
        except RecursionError:
            raise invalid("the body is nested too deeply") from None
        with self.lock:
            if self._closing.is_set():
                raise ApiError(503, "unavailable", "the emulator is shutting down")
            if idempotency_key is not None and (account, idempotency_key) in self._idempotency:
                first_body, instance_id = self._idempotency[(account, idempotency_key)]
                if first_body != canonical:
                    raise ApiError(
                        409,
                        "idempotency_conflict",
                        "this Idempotency-Key was used with a different body; use a new key",
                    )
                return 200, self._instances[instance_id].to_json()
            request = parse_provision(body, list(self.catalog))
            available = self._available()
            if available[request.gpu_type] < request.gpu_count:
                free = [name for name, n in available.items() if n > 0]
                raise ApiError(
                    409,
                    "no_capacity",
                    f"only {available[request.gpu_type]} {request.gpu_type} GPUs are free, "
                    f"{request.gpu_count} requested; try later or another type",
                    extra={"available": free},
                )
            inst = self._create(account, request)
            if idempotency_key is not None:
                self._idempotency[(account, idempotency_key)] = (canonical, inst.id)
            snapshot = inst.to_json()
        log.info(
            "instance %s: created for %s (%d x %s, key %s)",
            inst.id,
            account,
            request.gpu_count,
            request.gpu_type,
            fingerprint(request.ssh_public_key),
        )
        threading.Thread(
            target=self._provision, args=(inst,), name=f"provision-{inst.id}", daemon=True
        ).start()
        if self.injector.take_error_after_create():
            raise ApiError(500, "internal", "injected fault: the instance was created, then 500")
        return 201, snapshot

    def get(self, account: str, instance_id: str) -> dict[str, Any]:
        with self.lock:
            return self._find(account, instance_id).to_json()

    def list_instances(self, account: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        with self.lock:
            return [
                inst.to_json()
                for inst in self._instances.values()
                if inst.account == account
                and inst.state != "deleted"
                and all(inst.request.labels.get(k) == v for k, v in labels.items())
            ]

    def heartbeat(self, account: str, instance_id: str) -> dict[str, Any]:
        with self.lock:
            inst = self._find(account, instance_id)
            if inst.state != "deleted" and inst.ttl_seconds is not None:
                inst.expires_at = time.time() + inst.ttl_seconds
            return inst.to_json()

    def set_ttl(self, account: str, instance_id: str, ttl: int | None) -> dict[str, Any]:
        """Replace the lease: expiry ``ttl`` seconds from now (None: never), renewed by
        heartbeats by that much from then on. A deleted instance is answered unchanged."""
        with self.lock:
            inst = self._find(account, instance_id)
            if inst.state != "deleted":
                inst.ttl_seconds = ttl
                inst.expires_at = None if ttl is None else time.time() + ttl
            snapshot = inst.to_json()
        log.info("instance %s: ttl set to %s", instance_id, ttl)
        return snapshot

    def stop(self, account: str, instance_id: str) -> dict[str, Any]:
        with self.lock:
            inst = self._find(account, instance_id)
        self.stop_instance(inst)
        return self.get(account, instance_id)

    def delete(self, account: str, instance_id: str) -> dict[str, Any]:
        with self.lock:
            inst = self._find(account, instance_id)
        self.delete_instance(inst)
        return self.get(account, instance_id)

    def _find(self, account: str, instance_id: str) -> Instance:
        inst = self._instances.get(instance_id)
        if inst is None or inst.account != account:
            raise not_found(f"no instance {instance_id[:40]!r} in this account")
        return inst

    # --- life cycle -----------------------------------------------------------------------

    def _create(self, account: str, request: ProvisionRequest) -> Instance:
        instance_id = "inst-" + secrets.token_hex(6)
        directory = Path(tempfile.mkdtemp(prefix=f"{instance_id}-", dir=self.state_dir))
        (directory / "home").mkdir()
        (directory / "tmp").mkdir()
        now = time.time()
        ttl = request.ttl_seconds
        price = self.catalog[request.gpu_type].price_per_hour
        inst = Instance(
            id=instance_id,
            account=account,
            request=request,
            price_per_hour=round(price * request.gpu_count, 4),
            created_at=now,
            directory=directory,
            faults=self.injector.snapshot(),
            ttl_seconds=ttl,
            expires_at=None if ttl is None else now + ttl,
        )
        self._instances[instance_id] = inst
        return inst

    def _transition(self, inst: Instance, state: str, message: str = "", **changes: Any) -> None:
        with self.lock:
            previous = inst.state
            inst.state, inst.message = state, message
            for name, value in changes.items():
                setattr(inst, name, value)
        note = f" ({message})" if message else ""
        log.info("instance %s: %s -> %s%s", inst.id, previous, state, note)

    def _provision(self, inst: Instance) -> None:
        """The worker: pending -> provisioning -> running or failed, unless cancelled.

        Its transitions happen under ``inst.teardown`` after checking ``inst.cancel``, so a
        stop or delete that came first is never overwritten.
        """
        faults = inst.faults
        with inst.teardown:
            if inst.cancel.is_set():
                return
            self._transition(inst, "provisioning", "booting")
        if inst.cancel.wait(faults.provision_delay):
            return
        if faults.stuck:
            inst.cancel.wait()
            return
        with inst.teardown:
            if inst.cancel.is_set():
                return
            if faults.fail_provisioning:
                self._transition(inst, "failed", "injected fault: the instance failed to boot")
                return
            try:
                endpoint, host_fingerprint = self.machines.start_endpoint(inst)
            except EmulatorError as exc:
                self._transition(inst, "failed", str(exc))
                return
            except Exception as exc:
                log.exception("instance %s: could not start its SSH endpoint", inst.id)
                self._transition(inst, "failed", f"the emulator failed to start sshd: {exc}")
                return
            try:
                link = self.machines.start_link(inst, endpoint.port)
            except OSError as exc:
                endpoint.stop(self.grace)
                self._transition(inst, "failed", f"the emulator failed to start its link: {exc}")
                return
            ssh = {
                "host": "127.0.0.1",
                "port": endpoint.port if link is None else link.port,
                "user": self.machines.user,
                "host_key_fingerprint": host_fingerprint,
            }
            self._transition(inst, "running", "", endpoint=endpoint, link=link, ssh=ssh)

    def stop_instance(self, inst: Instance) -> None:
        """Stop ``inst``: its processes end, its capacity is freed; it stays listed."""
        inst.cancel.set()
        with inst.teardown:
            if inst.state not in LIVE_STATES:
                return
            self._transition(inst, "stopping", "stopping")
            self.machines.release(inst)
            self._transition(inst, "stopped", "stopped", ssh=None)

    def delete_instance(self, inst: Instance) -> None:
        """Delete ``inst``: returns once its processes and directory are gone. Idempotent."""
        inst.cancel.set()
        with inst.teardown:
            if inst.state == "deleted":
                return
            if inst.state in LIVE_STATES:
                self._transition(inst, "stopping", "deleting")
            self.machines.release(inst)
            shutil.rmtree(inst.directory, ignore_errors=True)
            self._transition(inst, "deleted", "deleted", ssh=None)

    def preempt(self, instance_id: str) -> None:
        """Delete an instance and forget it, as a cloud that reclaims a machine does: its
        owner's next request for it is answered 404."""
        with self.lock:
            inst = self._instances.pop(instance_id)  # unknown from now on, even while it ends
        self.delete_instance(inst)

    # --- whole-platform views and shutdown ------------------------------------------------

    def instances(self) -> list[Instance]:
        with self.lock:
            return list(self._instances.values())

    def live_ids(self) -> list[str]:
        return [inst.id for inst in self.instances() if inst.state in LIVE_STATES]

    def processes(self) -> set[int]:
        """Pids of every live process of any instance, found as :func:`procs.find` does."""
        instances = self.instances()
        roots = [
            inst.endpoint.init.pid
            for inst in instances
            if isinstance(inst.endpoint, SSHDProcess) and inst.endpoint.init.poll() is None
        ]
        return procs.find([inst.id for inst in instances], roots)

    def delete_all(self) -> list[str]:
        """Delete every instance not yet deleted, in parallel; return their ids."""
        pending = [inst for inst in self.instances() if inst.state != "deleted"]
        threads = [
            threading.Thread(target=self.delete_instance, args=(inst,), daemon=True)
            for inst in pending
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [inst.id for inst in pending]

    def start(self) -> None:
        self._reaper.start()

    def close(self) -> None:
        """Refuse new instances, stop the reaper, delete everything."""
        self._closing.set()
        if self._reaper.is_alive():
            self._reaper.join()
        self.delete_all()
        os.close(self._lifeline_read)
        os.close(self._lifeline_write)

    def _reap(self) -> None:
        """Delete expired instances, checking a few times a second until closing."""
        while not self._closing.wait(0.2):
            now = time.time()
            expired = [
                inst
                for inst in self.instances()
                if inst.state != "deleted"
                and inst.expires_at is not None
                and inst.expires_at <= now
            ]
            for inst in expired:
                log.info("instance %s: TTL expired", inst.id)
                self.delete_instance(inst)
