"""The FlexAI API's JSON (see ``docs/api.md``), read into the :mod:`~.gpu_platform` data classes.

Every way an answer can differ from the documented shape raises :class:`BadShape`, which the
client reports as a PlatformError naming the call.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .gpu_platform import GPUType, Instance, InstanceState, SSHEndpoint
from .rfc3339 import parse_time

__all__ = ["BadShape", "field", "gpu_types", "instance", "instances", "strings"]


class BadShape(Exception):
    """The JSON is not what the API documents."""


def field(obj: object, key: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
    """``obj[key]``, checked to be a ``kind``; None if absent and not ``required``."""
    if not isinstance(obj, dict):
        raise BadShape(f"expected an object holding {key!r}, got {_kind(obj)}")
    value = obj.get(key)
    if value is None:
        if required:
            raise BadShape(f"missing {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, kind):  # no API field is a boolean
        raise BadShape(f"{key!r} is {_kind(value)}")
    return value


def gpu_types(body: object) -> list[GPUType]:
    """The answer of ``GET /v1/gpu-types``."""
    return [_gpu_type(g) for g in field(body, "gpu_types", list)]


def instances(body: object) -> list[Instance]:
    """The answer of ``GET /v1/instances``."""
    return [instance(i) for i in field(body, "instances", list)]


def instance(obj: object) -> Instance:
    """An instance object, as most calls answer."""
    state_name = field(obj, "state", str)
    try:
        state = InstanceState(state_name)
    except ValueError:
        raise BadShape(f"unknown state {state_name!r}") from None
    labels = field(obj, "labels", dict, required=False) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise BadShape("'labels' holds non-string values")
    ssh = field(obj, "ssh", dict, required=False)
    expires_at = field(obj, "expires_at", str, required=False)
    return Instance(
        id=field(obj, "id", str),
        gpu_type=field(obj, "gpu_type", str),
        gpu_count=field(obj, "gpu_count", int),
        state=state,
        price_per_hour=float(field(obj, "price_per_hour", (int, float))),
        created_at=_time(field(obj, "created_at", str)),
        labels=dict(labels),
        ssh=None if ssh is None else _ssh(ssh),
        ttl_seconds=field(obj, "ttl_seconds", int, required=False),
        expires_at=None if expires_at is None else _time(expires_at),
        message=field(obj, "message", str, required=False) or "",
    )


def strings(value: object) -> list[str]:
    """The strings of a list (an error's list of GPU types), ignoring anything else."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _gpu_type(obj: object) -> GPUType:
    return GPUType(
        name=field(obj, "name", str),
        memory_gb=field(obj, "memory_gb", int),
        price_per_hour=float(field(obj, "price_per_hour", (int, float))),
        available=field(obj, "available", int),
    )


def _ssh(obj: dict[str, Any]) -> SSHEndpoint:
    return SSHEndpoint(
        host=field(obj, "host", str),
        port=field(obj, "port", int),
        user=field(obj, "user", str),
        host_key_fingerprint=field(obj, "host_key_fingerprint", str),
    )


def _time(value: str) -> datetime:
    try:
        return parse_time(value)
    except ValueError as exc:
        raise BadShape(str(exc)) from None


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)
