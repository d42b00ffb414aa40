"""The process's one supervisor thread: it keeps every session's link and lease alive.

Every :data:`INTERVAL` seconds it ticks each session it watches (a tick notices a dead SSH
link or a due heartbeat and hands the work to the :mod:`~flexai_provisioner.executor`
pool) and hands the pool the owed deletions that are due for another try. Being a thread of
its own, it runs whether or not anyone drives the Jupyter event loop (``jupyter execute``
only runs it inside calls).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from . import executor

#: Seconds between two ticks of every watched session.
INTERVAL = 0.5


class Supervised(Protocol):
    """What the supervisor calls on a session."""

    log: logging.Logger

    def tick(self, now: float) -> None:
        """Start whatever is due (a reconnect, a heartbeat, a ping); must not block."""


class Owed(Protocol):
    """What the supervisor needs of a deletion it retries."""

    done: bool  # confirmed: forget it
    running: bool  # a retry is under way
    due: float  # when to try again, on the monotonic clock

    def retry(self) -> None:
        """Try once more; reschedule (``due``) on failure, and clear ``running`` either way."""


def watch(session: Supervised) -> None:
    """Tick ``session`` from now on, until :func:`unwatch`."""
    _supervisor().add(session)


def unwatch(session: Supervised) -> None:
    _supervisor().remove(session)


def owe(deletion: Owed) -> None:
    """Retry ``deletion`` whenever it is due, until it is done."""
    _supervisor().owe(deletion)


class Supervisor:
    """The thread behind :func:`watch` and :func:`owe`; there is one per process."""

    def __init__(self) -> None:
        self._sessions: set[Supervised] = set()
        self._owed: list[Owed] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="flexai-supervisor", daemon=True).start()

    def add(self, session: Supervised) -> None:
        with self._lock:
            self._sessions.add(session)

    def remove(self, session: Supervised) -> None:
        with self._lock:
            self._sessions.discard(session)

    def owe(self, deletion: Owed) -> None:
        with self._lock:
            self._owed.append(deletion)

    def _retry_owed(self, now: float) -> None:
        with self._lock:
            self._owed = [d for d in self._owed if not d.done]
            due = [d for d in self._owed if not d.running and now >= d.due]
            for deletion in due:
                deletion.running = True
        for deletion in due:
            try:
                executor.submit(deletion.retry)
            except RuntimeError:  # the interpreter is exiting: exit_cleanup makes the last try
                deletion.running = False
                return

    def _run(self) -> None:
        while True:
            time.sleep(INTERVAL)
            with self._lock:
                sessions = list(self._sessions)
            now = time.monotonic()
            self._retry_owed(now)
            for session in sessions:
                try:
                    session.tick(now)
                except Exception:
                    session.log.exception("FlexAI supervisor tick failed")


_supervisor = executor.one_per_process(Supervisor)
