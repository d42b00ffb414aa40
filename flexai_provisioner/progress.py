"""What each FlexAI kernel's start is doing, for whoever wants to show it.

Provisioning takes minutes on a real platform, so the provisioner publishes each phase of a
start here (``requesting``, ``queued``, ``booting``, ``connecting``, ``uploading files``,
``starting kernel``, ``ready``, or ``failed`` with the error) and a last ``shut down`` note
with the instance's cost. The registry keeps a short history per kernel id, so a frontend
that asks late still sees the whole start, and calls subscribers, which is how the Jupyter
server extension turns phases into jupyter_events.

Phases are published from worker threads as well as from the event loop: subscribers must
be quick and thread-safe (the server extension hops onto its loop). The registry is
process-wide because a provisioner has no handle on the server that runs it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .gpu_platform import Instance

__all__ = [
    "PHASES",
    "PhaseEvent",
    "ProgressRegistry",
    "history",
    "log_event",
    "publish",
    "registry",
    "report_instance",
    "report_shutdown",
    "reporter",
    "subscribe",
]

#: Start phases in the order a first start goes through them (``queued`` and ``booting`` only
#: when the platform reports those states), then ``failed`` (a start that did not reach
#: ``ready``; its message is the error) and the notes that may follow ``ready``: ``lost`` (the
#: instance is gone or unreachable; its message says why), ``limit reached``, ``shut down``.
PHASES = (
    "requesting",
    "queued",
    "booting",
    "connecting",
    "uploading files",
    "starting kernel",
    "ready",
    "failed",
    "lost",
    "limit reached",
    "shut down",
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhaseEvent:
    """One step of a kernel's life on FlexAI."""

    kernel_id: str
    phase: str
    elapsed: float
    """Seconds since this start began; for ``limit reached`` and ``shut down``, seconds since
    the instance was created."""
    time: float
    """When it happened (seconds since the epoch)."""
    instance_id: str | None = None
    cost_usd: float | None = None
    """The instance's estimated total cost (``shut down`` only)."""
    message: str = ""
    """The error of a ``failed`` start, the limit of ``limit reached``, how much
    ``uploading files`` copies."""
    path: str | None = None
    """The notebook whose session starts the kernel (jupyter_server's ``JPY_SESSION_NAME``),
    so a frontend can tell which notebook a start belongs to before it learns the kernel id."""

    def describe(self) -> str:
        """The log line's text after ``FlexAI kernel <id>: ``."""
        if self.phase == "shut down":
            if not self.instance_id:
                return "shut down before an instance was created"
            cost = (
                ""
                if self.cost_usd is None
                else f", cost ${self.cost_usd:.{2 if self.cost_usd >= 0.01 else 4}f}"
            )
            note = f"; {self.message}" if self.message else ""
            return (
                f"shut down; instance {self.instance_id} ran "
                f"{timedelta(seconds=round(self.elapsed))}{cost}{note}"
            )
        if self.phase == "limit reached":
            return f"{self.message}; shutting it down"
        text = f"{self.phase} ({self.elapsed:.1f}s)"
        if self.phase == "ready" and self.instance_id:
            text += f" on instance {self.instance_id}"
        return f"{text}: {self.message}" if self.message else text


Subscriber = Callable[[PhaseEvent], None]


class ProgressRegistry:
    """Phase histories keyed by kernel id, bounded in kernels and in phases per kernel."""

    def __init__(self, max_kernels: int = 256, max_phases: int = 64):
        self._max_kernels = max_kernels
        self._max_phases = max_phases
        self._histories: OrderedDict[str, deque[PhaseEvent]] = OrderedDict()
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def publish(
        self,
        kernel_id: str,
        phase: str,
        elapsed: float,
        *,
        instance_id: str | None = None,
        cost_usd: float | None = None,
        message: str = "",
        path: str | None = None,
    ) -> PhaseEvent:
        """Record a phase and tell every subscriber; a failing subscriber is only logged."""
        event = PhaseEvent(
            kernel_id, phase, elapsed, time.time(), instance_id, cost_usd, message, path
        )
        with self._lock:
            entries = self._histories.pop(kernel_id, None)
            if entries is None:
                entries = deque(maxlen=self._max_phases)
            entries.append(event)
            self._histories[kernel_id] = entries  # most recently active last
            while len(self._histories) > self._max_kernels:
                self._histories.popitem(last=False)
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            try:
                subscriber(event)
            except Exception:
                log.exception("FlexAI progress subscriber %r failed", subscriber)
        return event

    def history(self, kernel_id: str) -> list[PhaseEvent]:
        """The kernel's phases, oldest first (empty if unknown or forgotten)."""
        with self._lock:
            return list(self._histories.get(kernel_id, ()))

    def kernel_ids(self) -> list[str]:
        """Kernels with a history, least recently active first."""
        with self._lock:
            return list(self._histories)

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber`` with every future event; returns the function that unsubscribes."""
        with self._lock:
            self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with self._lock:
                if subscriber in self._subscribers:
                    self._subscribers.remove(subscriber)

        return unsubscribe


registry = ProgressRegistry()
publish = registry.publish
history = registry.history
subscribe = registry.subscribe


def log_event(log: logging.Logger | logging.LoggerAdapter[Any], event: PhaseEvent) -> None:
    """Log the event at INFO (a limit's shutdown at WARNING); print it to stderr too if
    logging would drop it.

    Under a Jupyter app (server, ``jupyter execute``) the app's log handler shows the line.
    A script driving nbclient usually configured no logging at all, and a start that takes
    minutes must not look hung, so then the line goes to stderr directly.
    """
    text = f"FlexAI kernel {event.kernel_id}: {event.describe()}"
    log.log(logging.WARNING if event.phase == "limit reached" else logging.INFO, "%s", text)
    if not _has_handler(log):
        print(text, file=sys.stderr, flush=True)


def reporter(
    log: logging.Logger | logging.LoggerAdapter[Any],
    kernel_id: str,
    start: float,
    instance_id: Callable[[], str | None],
    path: str | None = None,
) -> Callable[..., None]:
    """A start's phase callback: publish and log each phase, timed from ``start``
    (``time.monotonic()``), with the instance id known at that moment, an optional detail
    (``message``) and the notebook the start is for (``path``)."""

    def report(phase: str, message: str = "") -> None:
        elapsed = time.monotonic() - start
        _note(log, kernel_id, phase, elapsed, instance_id=instance_id(), message=message, path=path)

    return report


def report_instance(
    log: logging.Logger | logging.LoggerAdapter[Any],
    kernel_id: str,
    phase: str,
    instance: Instance | None,
    message: str = "",
) -> PhaseEvent:
    """Publish and log a note about a kernel's instance (``lost``, ``limit reached``, ``shut
    down``), timed from the instance's creation; ``shut down`` carries what it cost."""
    return _note(
        log,
        kernel_id,
        phase,
        instance.uptime() if instance else 0.0,
        instance_id=instance.id if instance else None,
        cost_usd=instance.cost() if instance and phase == "shut down" else None,
        message=message,
    )


def _note(
    log: logging.Logger | logging.LoggerAdapter[Any],
    kernel_id: str,
    phase: str,
    elapsed: float,
    **fields: Any,
) -> PhaseEvent:
    """Publish one phase event and log it: every phase goes both ways."""
    event = registry.publish(kernel_id, phase, elapsed, **fields)
    log_event(log, event)
    return event


def report_shutdown(
    log: logging.Logger | logging.LoggerAdapter[Any],
    kernel_id: str,
    instance: Instance | None,
    message: str = "",
) -> PhaseEvent:
    """Publish and log a kernel's last note: how long its instance ran and what it cost, and
    ``message`` (``parked ...`` when the instance was kept for the next kernel)."""
    return report_instance(log, kernel_id, "shut down", instance, message)


def _has_handler(log: logging.Logger | logging.LoggerAdapter[Any]) -> bool:
    """Whether a record from ``log`` reaches a handler that can show it."""
    logger: logging.Logger | None = log.logger if isinstance(log, logging.LoggerAdapter) else log
    while logger is not None:
        if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False
