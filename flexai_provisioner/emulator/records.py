"""One instance's record as the platform keeps it, and its JSON form in the API."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .faults import Faults
from .link import DelayedLink
from .sshd import BannerHang, SSHDProcess
from .validation import ProvisionRequest


def rfc3339(timestamp: float | None) -> str | None:
    """The API's time format, written here again on purpose rather than imported from
    ``flexai_provisioner.rfc3339``: the emulator stands in for another party's server."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(int(timestamp), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(eq=False)
class Instance:
    """One instance. Mutable fields change under the lock of the ``Cloud`` holding it."""

    id: str
    account: str
    request: ProvisionRequest
    price_per_hour: float
    created_at: float
    directory: Path
    faults: Faults
    """The faults in force when it was created: later changes do not alter its fate."""
    ttl_seconds: int | None = None
    """The lease a heartbeat renews: the request's, until changed (``PATCH``)."""
    expires_at: float | None = None
    state: str = "pending"
    message: str = "queued"
    ssh: dict[str, Any] | None = None
    endpoint: SSHDProcess | BannerHang | None = None
    link: DelayedLink | None = None
    """The relay clients reach ``endpoint`` through, under the link faults."""
    cancel: threading.Event = field(default_factory=threading.Event)
    """Set by stop/delete: the provisioning worker gives up at its next step."""
    teardown: threading.Lock = field(default_factory=threading.Lock)
    """Held while starting or ending the endpoint, so the two never interleave."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "gpu_type": self.request.gpu_type,
            "gpu_count": self.request.gpu_count,
            "state": self.state,
            "price_per_hour": self.price_per_hour,
            "labels": dict(self.request.labels),
            "created_at": rfc3339(self.created_at),
            "ttl_seconds": self.ttl_seconds,
            "expires_at": rfc3339(self.expires_at),
            "ssh": dict(self.ssh) if self.ssh else None,
            "message": self.message,
        }
