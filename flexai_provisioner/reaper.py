"""Delete what dead owners left, parked instances whose keep-alive is over, and deletions
still owed (``jupyter flexai gc``, each start).

Two sources, so that losing either one still loses nothing: the local ledger, and the
owner labels every instance carries on the platform. Only this ledger's own rows and
instances labelled with its owner id are considered: whatever another ledger (another
machine, container or user of the same API key) created is never touched. A parked instance
(``keep_alive``) has no owner process: it is left alone until it expires, unless asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import FlexAIError, NotFoundError, PlatformError
from .gpu_platform import InstanceState, Platform, wait_deleted
from .ledger import Entry, Ledger, Owner

log = logging.getLogger(__name__)

LABEL_KERNEL = "flexai.kernel_id"
LABEL_REQUEST = "flexai.request"
LABEL_OWNER = "flexai.owner"  # the ledger's owner id
LABEL_HOST = "flexai.owner_host"
LABEL_BOOT = "flexai.owner_boot"
LABEL_PIDNS = "flexai.owner_pidns"
LABEL_PID = "flexai.owner_pid"
LABEL_STARTED = "flexai.owner_started"


@dataclass(frozen=True)
class Reaped:
    instance_id: str
    kernel_id: str | None
    reason: str


def owner_labels(owner_id: str, owner: Owner) -> dict[str, str]:
    return {
        LABEL_OWNER: owner_id,
        LABEL_HOST: owner.host,
        LABEL_BOOT: owner.boot,
        LABEL_PIDNS: owner.pidns,
        LABEL_PID: str(owner.pid),
        LABEL_STARTED: repr(owner.started),
    }


def labelled_owner(labels: dict[str, str]) -> Owner | None:
    """The owner an instance's labels name, or None if they name none."""
    try:
        return Owner(
            labels[LABEL_HOST],
            labels[LABEL_BOOT],
            labels[LABEL_PIDNS],
            int(labels[LABEL_PID]),
            float(labels[LABEL_STARTED]),
        )
    except (KeyError, ValueError):
        return None


def _reason(entry: Entry) -> str:
    if entry.delete_owed:
        return f"deletion owed: {entry.delete_owed}"
    if entry.parked_until is not None:
        return "parked, keep-alive over" if entry.expired() else "parked"
    return "ledger, owner died"


def _orphaned(entry: Entry, parked: bool) -> bool:
    if entry.delete_owed:
        return True
    if entry.parked_until is not None:
        return parked or entry.expired()
    return entry.owner.died()


def delete_request(
    platform: Platform, request_key: str, instance_id: str | None, timeout: float
) -> str | None:
    """Delete a request's instance and wait until the platform confirms; its id, or None if
    the request created none. An unknown ``instance_id`` (the POST never answered) is looked
    up by the request's label. Raises :class:`PlatformError` if the platform fails."""
    if instance_id is None:
        found = platform.list_instances({LABEL_REQUEST: request_key})
        if not found:
            return None
        instance_id = found[0].id
    try:
        if platform.delete_instance(instance_id).state is not InstanceState.DELETED:
            wait_deleted(platform, instance_id, timeout)
    except NotFoundError:
        pass
    return instance_id


def delete_entry(platform: Platform, ledger: Ledger, entry: Entry, timeout: float) -> str | None:
    """Delete a row's instance (an orphan's, or a parked one this process claimed), close the
    row and remove its key file; the instance's id, or None if the request made none.

    On :class:`PlatformError` a claimed parked row is marked owed (the claim made this process
    its owner, which may live on: anyone may retry it) and the error raised."""
    try:
        instance_id = delete_request(platform, entry.request_key, entry.instance_id, timeout)
    except PlatformError as e:
        if entry.parked_until is not None:
            ledger.mark_owed(entry.request_key, str(e).splitlines()[0][:200])
        raise
    ledger.mark_deleted(entry.request_key)
    if entry.key_file and (entry.parked_until is not None or entry.owner.died()):
        Path(entry.key_file).unlink(missing_ok=True)
    return instance_id


def reap_orphans(
    platform: Platform,
    ledger: Ledger,
    api_url: str,
    *,
    dry_run: bool = False,
    parked: bool = False,
    timeout: float = 60.0,
) -> list[Reaped]:
    """Delete (or, with ``dry_run``, list) this ledger's orphaned instances and owed deletions.

    A row is an orphan if its deletion is owed (whoever its owner), it was parked and its
    keep-alive is over (any parked one, with ``parked``), or its owner died
    (:meth:`Owner.died`); an instance the ledger lost (it was moved aside as corrupt) is
    found by this ledger's owner id in its labels. A parked row is claimed before its
    instance is deleted, so one a kernel adopts meanwhile is left to it. Each deletion waits
    up to ``timeout`` for the platform to confirm it; a failure is logged and left for the
    next run.
    """
    live = ledger.live(api_url)
    orphans = [e for e in live if _orphaned(e, parked)]
    recorded = {e.instance_id for e in live} | {e.request_key for e in live}
    unrecorded = []
    for inst in platform.list_instances({LABEL_OWNER: ledger.owner_id}):
        if {inst.id, inst.labels.get(LABEL_REQUEST)} & recorded:
            continue  # the ledger's row, not the labels, says who owns it now
        owner = labelled_owner(inst.labels)
        if owner is not None and owner.died():
            unrecorded.append(Reaped(inst.id, inst.labels.get(LABEL_KERNEL), "owner labels"))
    if dry_run:
        return [
            Reaped(e.instance_id or f"(request {e.request_key})", e.kernel_id, _reason(e))
            for e in orphans
        ] + unrecorded
    done = []
    for entry in orphans:
        if entry.parked_until is not None and not ledger.claim(entry.request_key):
            continue  # adopted, or claimed by another gc, since it was read
        try:
            instance_id = delete_entry(platform, ledger, entry, timeout)
        except PlatformError as e:
            log.warning("could not delete orphaned instance %s: %s", entry.instance_id, e)
            continue
        if instance_id is not None:
            done.append(Reaped(instance_id, entry.kernel_id, _reason(entry)))
    for item in unrecorded:
        try:
            delete_request(platform, "", item.instance_id, timeout)
        except PlatformError as e:
            log.warning("could not delete orphaned instance %s: %s", item.instance_id, e)
            continue
        done.append(item)
    return done


def reap_and_report(
    platform: Platform, ledger: Ledger, api_url: str, report: logging.Logger
) -> None:
    """Reap at a kernel's start (provisioner or launcher): say on ``report`` what was
    deleted; failing to check is only a warning."""
    try:
        for item in reap_orphans(platform, ledger, api_url):
            report.warning(
                "deleted FlexAI instance %s left by an earlier kernel (%s)",
                item.instance_id,
                item.reason,
            )
    except FlexAIError as e:
        report.warning("could not check for orphaned FlexAI instances: %s", e)
