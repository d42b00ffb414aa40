"""Delete instances whose owning process is gone (``jupyter flexai gc``, provisioner start-up).

Two sources, so that losing either one still loses nothing: the local ledger, and the
owner labels every instance carries on the platform.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from .errors import NotFoundError, PlatformError
from .ledger import Ledger, owner_alive
from .platform import InstanceState, Platform

log = logging.getLogger(__name__)

LABEL_KERNEL = "flexai.kernel_id"
LABEL_REQUEST = "flexai.request"
LABEL_HOST = "flexai.owner_host"
LABEL_PID = "flexai.owner_pid"
LABEL_STARTED = "flexai.owner_started"


@dataclass(frozen=True)
class Reaped:
    instance_id: str
    kernel_id: str | None
    reason: str


def owner_labels(host: str, pid: int, started: float) -> dict[str, str]:
    return {LABEL_HOST: host, LABEL_PID: str(pid), LABEL_STARTED: repr(started)}


def _labelled_owner_gone(labels: dict[str, str]) -> bool:
    try:
        host, pid, started = labels[LABEL_HOST], int(labels[LABEL_PID]), labels[LABEL_STARTED]
        return not owner_alive(host, pid, float(started))
    except (KeyError, ValueError):
        return False  # not ours, or written by something else: leave it alone


def reap_orphans(
    platform: Platform, ledger: Ledger, api_url: str, *, dry_run: bool = False
) -> list[Reaped]:
    """Delete (or, with ``dry_run``, list) the orphaned instances of this user on this host."""
    reaped: dict[str, Reaped] = {}
    orphans = ledger.orphans(api_url)
    for entry in orphans:
        if entry.instance_id:
            reaped[entry.instance_id] = Reaped(entry.instance_id, entry.kernel_id, "ledger")
        else:  # the POST may have succeeded without our hearing back
            for inst in platform.list_instances({LABEL_REQUEST: entry.request_key}):
                reaped[inst.id] = Reaped(inst.id, entry.kernel_id, "ledger (unconfirmed request)")
    for inst in platform.list_instances({LABEL_HOST: socket.gethostname()}):
        if inst.id not in reaped and _labelled_owner_gone(inst.labels):
            reaped[inst.id] = Reaped(inst.id, inst.labels.get(LABEL_KERNEL), "owner labels")
    if dry_run:
        return list(reaped.values())
    done = []
    for item in reaped.values():
        try:
            if platform.delete_instance(item.instance_id).state is not InstanceState.DELETED:
                continue  # accepted, not yet confirmed: the next gc confirms it
        except NotFoundError:
            pass
        except PlatformError as e:
            log.warning("could not delete orphaned instance %s: %s", item.instance_id, e)
            continue
        done.append(item)
    gone = {item.instance_id for item in done}
    for entry in orphans:
        if entry.instance_id in gone or (
            not entry.instance_id
            and not platform.list_instances({LABEL_REQUEST: entry.request_key})
        ):
            ledger.mark_deleted(entry.request_key)
    return done
