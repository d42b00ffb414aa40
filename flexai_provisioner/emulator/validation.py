"""Checking request bodies and queries: every bad input becomes a 400, never a traceback."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import ApiError, invalid
from .keys import check_public_key

MAX_GPUS = 8
MAX_LABELS = 32
MAX_LABEL_VALUE = 256
MAX_TTL = 10**9
_LABEL_KEY = re.compile(r"[A-Za-z0-9._/-]{1,63}")


@dataclass(frozen=True)
class ProvisionRequest:
    gpu_type: str
    gpu_count: int
    ssh_public_key: str
    labels: dict[str, str]
    ttl_seconds: int | None


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise invalid(f"the body is not valid JSON: {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_labels(labels: Any) -> dict[str, str]:
    if not isinstance(labels, dict):
        raise invalid("labels must be an object of string keys to string values")
    if len(labels) > MAX_LABELS:
        raise invalid(f"at most {MAX_LABELS} labels are allowed, got {len(labels)}")
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise invalid(f"label key {key[:80]!r} must match [A-Za-z0-9._/-]{{1,63}}")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE:
            raise invalid(f"label {key!r} must be a string of at most {MAX_LABEL_VALUE} characters")
    return dict(labels)


def parse_provision(body: Any, gpu_types: list[str]) -> ProvisionRequest:
    """Validate a provision body; absent or null optional fields take their defaults."""
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    gpu_type = body.get("gpu_type")
    if not isinstance(gpu_type, str):
        raise invalid('gpu_type is required and must be a string, e.g. "A100"')
    gpu_count = body.get("gpu_count")
    gpu_count = 1 if gpu_count is None else gpu_count
    if not _is_int(gpu_count) or not 1 <= gpu_count <= MAX_GPUS:
        raise invalid(f"gpu_count must be an integer in 1..{MAX_GPUS}")
    key = body.get("ssh_public_key")
    if not isinstance(key, str):
        raise invalid("ssh_public_key is required: the OpenSSH public key to authorise")
    try:
        key = check_public_key(key)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    labels = check_labels({} if body.get("labels") is None else body["labels"])
    ttl = _ttl(body.get("ttl_seconds"))
    if gpu_type not in gpu_types:
        raise ApiError(
            400,
            "unknown_gpu_type",
            f"GPU type {gpu_type[:40]!r} is not offered; choose one of {', '.join(gpu_types)}",
            extra={"gpu_types": gpu_types},
        )
    return ProvisionRequest(gpu_type, gpu_count, key, labels, ttl)


def _ttl(ttl: Any) -> int | None:
    if ttl is not None and (not _is_int(ttl) or not 1 <= ttl <= MAX_TTL):
        raise invalid(f"ttl_seconds must be null or an integer in 1..{MAX_TTL}")
    return ttl


def parse_update(body: Any) -> int | None:
    """Validate an instance update (``PATCH``): its new ``ttl_seconds``, the one field that
    may change."""
    if not isinstance(body, dict) or "ttl_seconds" not in body:
        raise invalid('the body must be a JSON object with "ttl_seconds" (an integer or null)')
    other = sorted(set(body) - {"ttl_seconds"})
    if other:
        raise invalid(f"only ttl_seconds can be changed, not {other[0][:40]!r}")
    return _ttl(body["ttl_seconds"])


def parse_label_filter(values: list[str]) -> dict[str, str]:
    """``label=<key>=<value>`` query parameters as a dict."""
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise invalid(f"label filter {item[:80]!r} must look like label=<key>=<value>")
        labels[key] = value
    return labels
