"""The GPU platform interface the provisioner talks to, its data types, and waits for states.

The provisioner depends only on :class:`Platform`; :mod:`flexai_provisioner.client`
implements it for the FlexAI REST API. Another GPU cloud (or a fixed host reached by
SSH with no provisioning at all) plugs in by implementing the same few methods.

:func:`wait_running` and :func:`wait_deleted` are functions over :class:`Platform` rather than
methods of it: polling for a state is the same for any platform, and keeping them out of the
interface keeps each platform down to its eight API calls.
"""

from __future__ import annotations

import abc
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .errors import (
    DeletionTimeoutError,
    NotFoundError,
    ProvisioningError,
    ProvisioningTimeoutError,
    StartCancelledError,
)

__all__ = [
    "GPUType",
    "Instance",
    "InstanceState",
    "Platform",
    "SSHEndpoint",
    "wait_deleted",
    "wait_running",
]


class InstanceState(str, enum.Enum):
    PENDING = "pending"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    DELETED = "deleted"

    @property
    def is_live(self) -> bool:
        """Whether the instance may still hold (and bill for) resources."""
        return self not in (InstanceState.STOPPED, InstanceState.FAILED, InstanceState.DELETED)


@dataclass(frozen=True)
class GPUType:
    name: str
    memory_gb: int
    price_per_hour: float
    available: int


@dataclass(frozen=True)
class SSHEndpoint:
    host: str
    port: int
    user: str
    host_key_fingerprint: str
    """OpenSSH SHA256 form, e.g. ``SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8``."""


@dataclass(frozen=True)
class Instance:
    id: str
    gpu_type: str
    gpu_count: int
    state: InstanceState
    price_per_hour: float
    created_at: datetime
    labels: dict[str, str] = field(default_factory=dict)
    ssh: SSHEndpoint | None = None
    ttl_seconds: int | None = None
    expires_at: datetime | None = None
    message: str = ""

    def uptime(self, now: datetime | None = None) -> float:
        """Seconds since the platform created the instance (``now`` defaults to now)."""
        now = now or datetime.now(timezone.utc)
        return max(0.0, (now - self.created_at).total_seconds())

    def cost(self, now: datetime | None = None) -> float:
        """Estimated US dollars spent so far: the hourly price over the whole uptime.

        An upper bound: the platform may not bill the time an instance spends queued.
        """
        return self.price_per_hour * self.uptime(now) / 3600


class Platform(abc.ABC):
    """What the provisioner needs from a GPU platform. Methods block; call them in a thread."""

    @abc.abstractmethod
    def list_gpu_types(self) -> list[GPUType]: ...

    @abc.abstractmethod
    def provision(
        self,
        gpu_type: str,
        *,
        ssh_public_key: str,
        gpu_count: int = 1,
        labels: dict[str, str] | None = None,
        ttl_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> Instance: ...

    @abc.abstractmethod
    def get_instance(self, instance_id: str) -> Instance: ...

    @abc.abstractmethod
    def list_instances(self, labels: dict[str, str] | None = None) -> list[Instance]:
        """Instances that are not deleted, optionally only those carrying all ``labels``."""

    @abc.abstractmethod
    def stop_instance(self, instance_id: str) -> Instance: ...

    @abc.abstractmethod
    def delete_instance(self, instance_id: str) -> Instance: ...

    @abc.abstractmethod
    def heartbeat(self, instance_id: str) -> Instance:
        """Tell the platform the client is alive, pushing back the instance's expiry."""

    @abc.abstractmethod
    def set_ttl(self, instance_id: str, ttl_seconds: int | None) -> Instance:
        """Expire the instance ``ttl_seconds`` from now unless heartbeats push it back, each
        by that much (None: never)."""


# -- waiting for a state ------------------------------------------------------------------------

#: :func:`wait_running`'s poll interval until so many seconds into the wait. An instance that
#: boots in tens of ms (the emulator's in ~25) is seen running within 5 ms of it, not 20; a
#: platform that takes longer is asked ~15 more times in all than with 20 ms throughout.
FAST_POLLS = ((0.1, 0.005), (1.0, 0.02))


def wait_running(
    platform: Platform,
    instance_id: str,
    timeout: float,
    *,
    on_state: Callable[[Instance], None] | None = None,
    cancel: threading.Event | None = None,
) -> Instance:
    """Poll until the instance is running with an SSH endpoint, and return it.

    Polls as :data:`FAST_POLLS` says (a fast platform is fast: a 100 ms poll would add up to
    that to every start), then backs off, doubling up to 2 s.
    ``on_state`` sees the instance whenever its state changes (for progress messages).
    Setting ``cancel`` ends the wait between polls with ``StartCancelledError``; a request in
    flight finishes first (bounded by the client's timeout and retries).
    """
    stop = cancel or threading.Event()
    cancelled = f"cancelled while waiting for instance {instance_id} to start"
    started = time.monotonic()
    deadline = started + timeout
    interval, last = FAST_POLLS[0][1], None
    while True:
        if stop.is_set():
            raise StartCancelledError(cancelled)
        instance = platform.get_instance(instance_id)
        if instance.state != last:
            last = instance.state
            if on_state is not None:
                on_state(instance)
        if instance.state is InstanceState.RUNNING and instance.ssh is not None:
            return instance
        if instance.state is InstanceState.FAILED:
            raise ProvisioningError(
                f"instance {instance_id} failed to start: "
                f"{instance.message or 'the platform gave no reason'}"
            )
        if instance.state in (InstanceState.STOPPING, InstanceState.STOPPED, InstanceState.DELETED):
            raise ProvisioningError(
                f"instance {instance_id} became {instance.state.value} before it was running"
                f"{_note(instance)}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProvisioningTimeoutError(
                f"instance {instance_id} was still {instance.state.value} after {timeout:g} s"
                f"{_note(instance)}; raise c.FlexAIProvisioner.provision_timeout to wait longer"
            )
        if stop.wait(min(interval, remaining)):
            raise StartCancelledError(cancelled)
        elapsed = time.monotonic() - started
        interval = next((i for until, i in FAST_POLLS if elapsed < until), min(interval * 2, 2.0))


def wait_deleted(platform: Platform, instance_id: str, timeout: float, poll: float = 0.2) -> None:
    """Poll until the instance is ``deleted`` or gone (404), e.g. after a 202 from delete."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            instance = platform.get_instance(instance_id)
        except NotFoundError:
            return
        if instance.state is InstanceState.DELETED:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeletionTimeoutError(
                f"instance {instance_id} was still {instance.state.value} {timeout:g} s after "
                "its deletion was requested; it may still be billed: delete it again later"
            )
        time.sleep(min(poll, remaining))


def _note(instance: Instance) -> str:
    return f" ({instance.message})" if instance.message else ""
