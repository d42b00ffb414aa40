"""Fault injection: the knobs that make the emulated platform misbehave on purpose.

One :class:`Faults` object is live inside a running emulator; tests change it in-process
(``emulator.update_faults(...)``) or over HTTP (``PUT /_emulator/faults``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass
class Faults:
    """Every fault the emulator can inject; the defaults inject none."""

    latency: float = field(default=0.0, metadata=_doc("seconds added to every API request"))
    error_rate: float = field(
        default=0.0, metadata=_doc("fraction of API requests answered 500 before any effect")
    )
    rate_limit_rate: float = field(
        default=0.0,
        metadata=_doc("fraction of API requests answered 429 (Retry-After 0 or 1)"),
    )
    seed: int | None = field(
        default=None, metadata=_doc("seed of the random draws of error_rate/rate_limit_rate")
    )
    fail_next: int = field(
        default=0, metadata=_doc("answer the next N API requests with fail_status")
    )
    fail_status: int = field(default=503, metadata=_doc("status used by fail_next and fail_for"))
    fail_for: float = field(
        default=0.0,
        metadata=_doc("answer every API request with fail_status for this many seconds from "
                      "when it is set (an outage)"),
    )  # fmt: skip
    error_after_create: int = field(
        default=0,
        metadata=_doc("the next N successful creates make the instance, then answer 500"),
    )
    provision_delay: float = field(
        default=0.0, metadata=_doc("seconds an instance spends provisioning before sshd starts")
    )
    stuck: bool = field(default=False, metadata=_doc("provisioning never completes"))
    fail_provisioning: bool = field(
        default=False, metadata=_doc("instances go to failed instead of running")
    )
    wrong_host_key: bool = field(
        default=False, metadata=_doc("report the fingerprint of a key the sshd does not use")
    )
    wrong_authorized_key: bool = field(
        default=False, metadata=_doc("authorise an unrelated key instead of the requested one")
    )
    banner_hang: bool = field(
        default=False,
        metadata=_doc("the SSH endpoint accepts TCP connections and never sends a banner"),
    )
    capacity: dict[str, int] = field(
        default_factory=dict, metadata=_doc("GPU type -> capacity, overriding the catalog")
    )
    link_latency_ms: float = field(
        default=0.0,
        metadata=_doc(
            "milliseconds added each way to SSH connections to instances, by a relay in front "
            "of their sshd; instances created while this and link_bandwidth_mbps are 0 are "
            "reached directly, the others follow changes at once"
        ),
    )
    link_bandwidth_mbps: float = field(
        default=0.0, metadata=_doc("megabits per second each way through that relay (0: no cap)")
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(f.name, getattr(self, f.name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def copy(self) -> Faults:
        return dataclasses.replace(self, capacity=dict(self.capacity))

    def update(self, **changes: Any) -> None:
        """Apply ``changes`` after validating all of them, so a bad one changes nothing."""
        for name, value in changes.items():
            _check(name, value)
        for name, value in changes.items():
            setattr(self, name, dict(value) if name == "capacity" else value)

    @classmethod
    def describe(cls) -> str:
        """One line per field, for ``--help`` and error messages."""
        return "\n".join(
            f"  {f.name} ({f.type}, default {json.dumps(_default(f))}): {f.metadata['doc']}"
            for f in dataclasses.fields(cls)
        )


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_capacity(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _is_int(v) and v >= 0 for k, v in value.items()
    )


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "latency": (lambda v: _is_number(v) and v >= 0, "a number of seconds >= 0"),
    "error_rate": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in 0..1"),
    "rate_limit_rate": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in 0..1"),
    "seed": (lambda v: v is None or _is_int(v), "an integer or null"),
    "fail_next": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "fail_status": (lambda v: _is_int(v) and 400 <= v <= 599, "an HTTP status in 400..599"),
    "fail_for": (lambda v: _is_number(v) and v >= 0, "a number of seconds >= 0"),
    "error_after_create": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "provision_delay": (lambda v: _is_number(v) and v >= 0, "a number of seconds >= 0"),
    "stuck": (lambda v: isinstance(v, bool), "true or false"),
    "fail_provisioning": (lambda v: isinstance(v, bool), "true or false"),
    "wrong_host_key": (lambda v: isinstance(v, bool), "true or false"),
    "wrong_authorized_key": (lambda v: isinstance(v, bool), "true or false"),
    "banner_hang": (lambda v: isinstance(v, bool), "true or false"),
    "capacity": (_is_capacity, "an object mapping GPU type names to integers >= 0"),
    "link_latency_ms": (lambda v: _is_number(v) and 0 <= v <= 10_000, "a number in 0..10000"),
    "link_bandwidth_mbps": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
}


def _check(name: str, value: Any) -> None:
    """Raise ValueError, with a message fit for an API client, if ``value`` cannot be ``name``."""
    if name not in _CHECKS:
        raise ValueError(f"unknown fault {name!r}; known faults: {', '.join(_CHECKS)}")
    accepts, expected = _CHECKS[name]
    if not accepts(value):
        raise ValueError(f"fault {name!r} must be {expected}, not {value!r}")


_STATUS_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    429: "rate_limited",
    500: "internal",
    502: "unavailable",
    503: "unavailable",
    504: "unavailable",
}


def _injected(status: int, retry_after: int | None = None) -> ApiError:
    code = _STATUS_CODES.get(status, "internal" if status >= 500 else "invalid_request")
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    return ApiError(status, code, f"injected fault: {status} {code}", headers=headers)


class FaultInjector:
    """The live :class:`Faults` of one emulator and the draws made from them, thread-safe."""

    def __init__(self, faults: Faults, gpu_types: Collection[str]):
        self._gpu_types = set(gpu_types)
        self._check_capacity(faults.capacity)
        self._initial = faults.copy()
        self._faults = faults.copy()
        self._lock = threading.Lock()
        self._rng: random.Random | None = None
        self._rng_seed: int | None = None
        self._fail_until = time.monotonic() + faults.fail_for  # fail_for counts from now

    @property
    def faults(self) -> Faults:
        """The live object: setting its attributes takes effect at once."""
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._check_capacity(faults.capacity)
        with self._lock:
            self._faults = faults
            self._rng = None
            self._fail_until = time.monotonic() + faults.fail_for

    def update(self, **changes: Any) -> Faults:
        """Change some faults; ValueError (changing nothing) if any is unknown or ill-typed."""
        if "capacity" in changes:
            _check("capacity", changes["capacity"])
            self._check_capacity(changes["capacity"])
        with self._lock:
            self._faults.update(**changes)
            if "seed" in changes:
                self._rng = None
            if "fail_for" in changes:
                self._fail_until = time.monotonic() + changes["fail_for"]
            return self._faults.copy()

    def reset(self) -> None:
        """Back to the faults the emulator was created with."""
        self.faults = self._initial.copy()

    def snapshot(self) -> Faults:
        with self._lock:
            return self._faults.copy()

    def _check_capacity(self, capacity: dict[str, int]) -> None:
        unknown = sorted(set(capacity) - self._gpu_types)
        if unknown:
            raise ValueError(f"capacity names unknown GPU types {unknown}")

    def _random(self) -> float:
        if self._rng is None or self._rng_seed != self._faults.seed:
            self._rng_seed = self._faults.seed
            self._rng = random.Random(self._rng_seed)
        return self._rng.random()

    def request_fault(self) -> ApiError | None:
        """The error to answer an API request with instead of serving it, if any."""
        with self._lock:
            f = self._faults
            retry = 0 if f.fail_status in (429, 503) else None
            if time.monotonic() < self._fail_until:
                return _injected(f.fail_status, retry)
            if f.fail_next > 0:
                f.fail_next -= 1
                return _injected(f.fail_status, retry)
            if not (f.error_rate or f.rate_limit_rate):
                return None
            draw = self._random()
            if draw < f.error_rate:
                return _injected(500)
            if draw < f.error_rate + f.rate_limit_rate:
                return _injected(429, retry_after=int(self._random() < 0.5))
            return None

    def take_error_after_create(self) -> bool:
        """Whether this successful create must answer 500 (consuming one ``error_after_create``)."""
        with self._lock:
            if self._faults.error_after_create > 0:
                self._faults.error_after_create -= 1
                return True
            return False
