"""The process's one pool of worker threads, and the one way to make a process-wide thing.

The pool runs blocking work whose caller must not wait on it: the relay thread opens SSH
channels here (a round trip each, which must not stall the relay); the supervisor thread
sends heartbeats and pings, reconnects dead links and retries owed deletions here (its tick
must not block); sessions open standby agents, and starts reap orphans, in the background.
Threads are made on demand, up to :data:`MAX_WORKERS`, then kept for the process's life.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

#: The pool's size: what the relay's and the supervisor's own pools of four were together,
#: so that a few long jobs (a reconnect waits up to ``reconnect_timeout``) leave room for
#: the short ones.
MAX_WORKERS = 8


def one_per_process(factory: Callable[[], T]) -> Callable[[], T]:
    """A getter of ``factory()``'s one result in this process, made on its first call
    (whichever thread comes first): nothing starts a thread at import."""
    lock = threading.Lock()
    made: list[T] = []

    def get() -> T:
        with lock:
            if not made:
                made.append(factory())
            return made[0]

    return get


_pool = one_per_process(
    lambda: ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="flexai-worker")
)


def submit(fn: Callable[[], T]) -> Future[T]:
    """Run ``fn`` in the pool; raises :class:`RuntimeError` once the interpreter is exiting."""
    return _pool().submit(fn)
