"""What the compute API answers: its JSON models, and its errors with their HTTP statuses.

Plain functions of the provisioner's and the platform's objects, so that the handlers, the
manager and the event stream all show a phase, an instance or an error the same way.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tornado import web

from .. import progress
from ..errors import (
    ConfigurationError,
    FlexAIError,
    FlexAITimeoutError,
    InvalidRequestError,
    NoCapacityError,
    PlatformUnreachableError,
    StartCancelledError,
    UnknownGPUTypeError,
    WorkspaceError,
)
from ..gpu_platform import Instance
from ..provisioner import FlexAIProvisioner
from ..rfc3339 import format_time
from ..workspace import SyncReport


class ComputeError(web.HTTPError):
    """An API error whose JSON body carries ``message`` (and any extra fields)."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(status)  # no log_message: tornado would %-format ours
        self.message = message
        self.extra = extra

    def __str__(self) -> str:
        return self.message


def http_error(error: FlexAIError) -> ComputeError:
    """The status that says whose fault a FlexAI error is, with its message."""
    if isinstance(error, UnknownGPUTypeError):
        return ComputeError(400, str(error), gpu_types=error.known)
    if isinstance(error, InvalidRequestError):
        return ComputeError(400, str(error))
    if isinstance(error, (StartCancelledError, WorkspaceError)):
        return ComputeError(409, str(error))
    if isinstance(error, NoCapacityError):
        return ComputeError(409, str(error), available=error.available)
    if isinstance(error, (ConfigurationError, PlatformUnreachableError)):
        return ComputeError(503, str(error))
    if isinstance(error, FlexAITimeoutError):  # the platform or the instance too slow
        return ComputeError(504, str(error))
    return ComputeError(502, str(error))


def _time(moment: datetime | float) -> str:
    """RFC 3339 in UTC to the millisecond: phases can be less than a second apart."""
    return format_time(moment, timespec="milliseconds")


def notebook_path(event: progress.PhaseEvent, root: str) -> str | None:
    """The event's notebook as an API path (relative to the server's root, ``/``-separated);
    None if it has none or it lies outside the root."""
    if not event.path:
        return None
    relative = os.path.relpath(event.path, root)
    if relative == os.curdir or relative.split(os.sep, 1)[0] == os.pardir:
        return None
    return relative.replace(os.sep, "/")


def phase_model(event: progress.PhaseEvent, root: str) -> dict[str, Any]:
    """One phase as the REST API shows it (``instance_id`` null until the platform answered)."""
    model: dict[str, Any] = {
        "phase": event.phase,
        "elapsed_seconds": round(event.elapsed, 3),
        "time": _time(event.time),
        "instance_id": event.instance_id,
    }
    if event.cost_usd is not None:
        model["cost_usd"] = round(event.cost_usd, 6)
    if event.message:
        model["message"] = event.message
    path = notebook_path(event, root)
    if path:
        model["path"] = path
    return model


def event_data(event: progress.PhaseEvent, root: str) -> dict[str, Any]:
    """The same phase as a jupyter_events record (``events/compute.yaml``): with its kernel id,
    without ``time`` (jupyter_events stamps each record) and without a null instance id."""
    data = {"kernel_id": event.kernel_id, **phase_model(event, root)}
    del data["time"]
    if data["instance_id"] is None:
        del data["instance_id"]
    return data


def progress_model(kernel_id: str, root: str) -> dict[str, Any]:
    """A kernel's phases so far and the latest one (null for a kernel never started here)."""
    phases = progress.history(kernel_id)
    return {
        "kernel_id": kernel_id,
        "phase": phases[-1].phase if phases else None,
        "phases": [phase_model(e, root) for e in phases],
    }


def instance_model(
    kernel_id: str,
    kernel: Any,
    instance: Instance | None,
    known: Instance | None,
    state: str | None,
    error: str | None,
    root: str,
) -> dict[str, Any]:
    """One kernel's instance: the platform's state (``instance``; else ``state``), and from
    what is ``known`` of it (the facts that never change) its uptime and cost so far."""
    provisioner: FlexAIProvisioner = kernel.provisioner
    now = datetime.now(timezone.utc)
    model: dict[str, Any] = {
        "kernel_id": kernel_id,
        "kernel_name": kernel.kernel_name,
        "kernel_state": getattr(kernel, "execution_state", None),
        "instance_id": provisioner.instance_id,
        "state": instance.state.value if instance is not None else state or "unknown",
        "connected": provisioner.connected,
        "reconnects": provisioner.reconnects,
        "lost_reason": provisioner.lost_reason,
        "gpu_type": known.gpu_type if known else provisioner.gpu_type,
        "gpu_count": known.gpu_count if known else provisioner.gpu_count,
        "created_at": _time(known.created_at) if known else None,
        "uptime_seconds": round(known.uptime(now), 1) if known else None,
        "price_per_hour": known.price_per_hour if known else None,
        "cost_usd": round(known.cost(now), 6) if known else None,
        "limits": {
            "max_hours": provisioner.max_hours or None,
            "max_cost": provisioner.max_cost or None,
        },
        "phases": progress_model(kernel_id, root)["phases"],
    }
    if error:
        model["platform_error"] = error
    return model


def sync_model(
    kernel_id: str, instance_id: str | None, report: SyncReport, root: str
) -> dict[str, Any]:
    """What a sync copied back, its folder relative to the server's root (null outside it)."""
    root_dir = Path(root).resolve()
    inside = report.directory.is_relative_to(root_dir)
    directory = report.directory.relative_to(root_dir).as_posix() if inside else None
    return {
        "kernel_id": kernel_id,
        "instance_id": instance_id,
        "directory": "" if directory == "." else directory,
        "copied": report.copied,
        "conflicts": [{"path": kept, "saved_as": saved} for kept, saved in report.conflicts],
        "failed": [{"path": rel, "message": why} for rel, why in report.failed],
        "bytes": report.nbytes,
    }
