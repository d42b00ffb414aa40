"""What this process still owns on the platform, deleted when the process ends.

A local kernel dies with its parent; an instance would not, and would be billed attached to
nothing. So whatever owns an instance (a kernel's :class:`~.session.InstanceSession`,
whether a provisioner or the launcher drives it, and a deletion still owed) registers here
while it does, and unregisters once the instance is gone. When the process ends without
shutting down (the interpreter exits, or SIGHUP arrives because its terminal closed), every
registered teardown runs in parallel, best effort, for at most :data:`EXIT_TIMEOUT`
seconds. SIGKILL cannot be caught: the instance's TTL and ``jupyter flexai gc`` cover it.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Protocol

log = logging.getLogger(__name__)

#: Seconds the process may spend at exit deleting what it still owns.
EXIT_TIMEOUT = 20.0


class Owned(Protocol):
    def teardown(self) -> None:
        """Delete the instance and release what is local; safe to call more than once."""


_owned: dict[int, Owned] = {}
_lock = threading.Lock()
_atexit_installed = False


def register(owned: Owned) -> None:
    """Delete ``owned``'s instance if this process ends before :func:`unregister`."""
    global _atexit_installed
    with _lock:
        _owned[id(owned)] = owned
        if not _atexit_installed:
            atexit.register(teardown_all)
            _atexit_installed = True


def unregister(owned: Owned) -> None:
    with _lock:
        _owned.pop(id(owned), None)


def owned() -> list[Owned]:
    with _lock:
        return list(_owned.values())


def install_signal_handler() -> None:
    """Also tear down on SIGHUP, then die of it as before. Only from the main thread, and
    only if SIGHUP still has its default action (an application's own handler wins)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, _on_sighup)


def _on_sighup(signum: int, frame: FrameType | None) -> None:
    teardown_all()
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGHUP)


def teardown_all(timeout: float = EXIT_TIMEOUT) -> int:
    """Tear down everything registered, in parallel, waiting at most ``timeout`` seconds;
    return how many teardowns had not finished by then."""
    pending = owned()
    if not pending:
        return 0
    log.warning(
        "this process is ending with %d FlexAI instance(s) not shut down: deleting them",
        len(pending),
    )

    def run(item: Owned) -> None:
        try:
            item.teardown()
        except Exception:
            log.exception("deleting a FlexAI instance at exit failed")
        finally:
            unregister(item)

    # Plain daemon threads: executors refuse work once the interpreter is shutting down.
    threads = [threading.Thread(target=run, args=(item,), daemon=True) for item in pending]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = sum(thread.is_alive() for thread in threads)
    if left:
        log.error(
            "%d FlexAI instance(s) were not confirmed deleted within %g s of exit: "
            "run `jupyter flexai gc`",
            left,
            timeout,
        )
    return left
