"""The platform interface the provisioner talks to, and its data types.

The provisioner depends only on :class:`Platform`; :mod:`flexai_provisioner.client`
implements it for the FlexAI REST API. Another GPU cloud (or a fixed host reached by
SSH with no provisioning at all) plugs in by implementing the same few methods.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone


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
