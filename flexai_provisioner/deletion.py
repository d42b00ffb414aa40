"""Deletions owed: an instance the platform failed to delete is retried, not forgotten."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

from . import exit_cleanup, supervisor
from .errors import FlexAIError, LedgerError, PlatformError
from .gpu_platform import Platform
from .ledger import Ledger
from .reaper import delete_request


@dataclass(eq=False)  # compared by identity, as the supervisor and exit_cleanup hold it
class OwedDeletion:
    """The deletion of one request's instance, tried until the platform confirms it.

    The first failure is recorded in the ledger (so ``gc`` retries it, whoever the owner)
    and handed to the supervisor, which retries with capped backoff while the process runs
    and once more as the process exits.
    """

    FIRST_DELAY = 1.0
    MAX_DELAY = 20.0

    platform: Platform
    ledger: Ledger
    request_key: str
    instance_id: str | None  # None until known: the POST may never have answered
    timeout: float  # how long one attempt waits for the platform to confirm
    log: logging.Logger
    delay: float = field(default=FIRST_DELAY, init=False)  # until the next retry, doubling
    due: float = field(default=0.0, init=False)  # when that is, on the monotonic clock
    running: bool = field(default=False, init=False)  # a retry is under way
    done: bool = field(default=False, init=False)  # the platform confirmed

    def attempt(self) -> None:
        """Delete (finding the instance by its request label if the POST never answered) and
        close the ledger row; raises :class:`PlatformError` if the platform failed."""
        self.instance_id = delete_request(
            self.platform, self.request_key, self.instance_id, self.timeout
        )
        if self.instance_id is not None:
            self.log.info("FlexAI instance %s deleted", self.instance_id)
        self.done = True
        try:
            self.ledger.mark_deleted(self.request_key)
        except LedgerError as e:  # the instance is gone: a later gc finds the row and agrees
            self.log.warning("%s", e)

    def owe(self, error: PlatformError) -> None:
        what = f"instance {self.instance_id}" if self.instance_id else (
            f"the instance of request {self.request_key} (if it was created)"
        )  # fmt: skip
        try:
            self.ledger.mark_owed(self.request_key, str(error).splitlines()[0][:200])
            later = "`jupyter flexai gc` retries it after that"
        except LedgerError as e:
            later = f"but the ledger failed ({e})"
        self.log.warning(
            "could not delete FlexAI %s, which may still be billed (%s): this process keeps "
            "retrying while it runs; %s",
            what,
            error,
            later,
        )
        exit_cleanup.register(self)
        self.due = time.monotonic() + self.delay
        supervisor.owe(self)

    def retry(self) -> None:
        """One supervisor retry; on failure the next is scheduled, twice as late (capped)."""
        try:
            self.attempt()
        except FlexAIError as e:
            self.delay = min(self.delay * 2, self.MAX_DELAY)
            self.due = time.monotonic() + self.delay * (0.5 + random.random() / 2)
            self.log.debug("owed deletion of %s failed again: %s", self.instance_id, e)
        else:
            exit_cleanup.unregister(self)
        finally:
            self.running = False

    def teardown(self) -> None:
        """At exit: one last try (the ledger row keeps it owed if this fails too)."""
        if not self.done:
            with contextlib.suppress(FlexAIError):
                self.attempt()
