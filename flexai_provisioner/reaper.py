"""Delete what dead owners left and deletions still owed (``jupyter flexai gc``, each start).

Two sources, so that losing either one still loses nothing: the local ledger, and the
owner labels every instance carries on the platform. Only this ledger's own rows and
instances labelled with its owner id are considered: whatever another ledger (another
machine, container or user of the same API key) created is never touched.
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
    return f"deletion owed: {entry.delete_owed}" if entry.delete_owed else "ledger, owner died"


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


def reap_orphans(
    platform: Platform,
    ledger: Ledger,
    api_url: str,
    *,
    dry_run: bool = False,
    timeout: float = 60.0,
) -> list[Reaped]:
    """Delete (or, with ``dry_run``, list) this ledger's orphaned instances and owed deletions.

    A row is an orphan if its deletion is owed (whoever its owner) or its owner died
    (:meth:`Owner.died`); an instance the ledger lost (it was moved aside as corrupt) is
    found by this ledger's owner id in its labels. Each deletion waits up to ``timeout`` for
    the platform to confirm it; a failure is logged and left for the next run.
    """
    live = ledger.live(api_url)
    orphans = [e for e in live if e.delete_owed or e.owner.died()]
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
        try:
            instance_id = delete_request(platform, entry.request_key, entry.instance_id, timeout)
        except PlatformError as e:
            log.warning("could not delete orphaned instance %s: %s", entry.instance_id, e)
            continue
        ledger.mark_deleted(entry.request_key)
        if entry.key_file and entry.owner.died():
            Path(entry.key_file).unlink(missing_ok=True)
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
                "deleted FlexAI instance %s of a kernel whose process died (%s)",
                item.instance_id,
                item.reason,
            )
    except FlexAIError as e:
        report.warning("could not check for orphaned FlexAI instances: %s", e)
