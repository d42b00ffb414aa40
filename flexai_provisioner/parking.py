"""Warm starts: an instance kept between kernels (``keep_alive``) and adopted by the next.

When a kernel shuts down cleanly and ``keep_alive`` is set, its instance is *parked* instead of
deleted: the kernel is stopped, its files are copied back as at any shutdown, the platform's
lease on it is shortened to the keep-alive (so the platform deletes it even if no process of
ours is left to), and its ledger row records it as parked until then. Parked, it belongs to no
process: neither exit cleanup nor the reaper touch it until it expires.

The next kernel of the same GPU type and count, on the same API, started by this user on this
machine, in any process, *claims* the row (one conditional update under the ledger's write
lock, so two starts never adopt the same instance), restores the lease to ``instance_ttl``,
connects with the key the row names, clears the previous kernel's workspace and starts a fresh
kernel. A parked instance that is gone or unreachable is deleted, and a new one provisioned.
A frontend's restart (VS Code kills the old kernel's launcher and starts the new one at once)
is a hand-off: the old owner records first that it is parking (:func:`begin`, before it stops
the kernel), and a start that finds nothing parked but one of its kind being parked waits for
it (:data:`HANDOFF_WAIT` at most, polling the ledger) and claims it once parked. It stops
waiting if the parking fails, the row goes away or its owner dies (then the reaper deletes
its instance, as any dead owner's, in the background), and provisions.
A start cancelled while it adopts (before the workspace is cleared) parks the instance again
as it was, its lease cut back to the keep-alive left, unless too little is (then it deletes it).

The key: a per-kernel key is kept for the adopter in a 0600 file of Jupyter's runtime
directory, named in the row and removed with the instance (by its adopter once it has the
key, by ``gc`` once expired). A user's own key (``ssh_key_file``) is never copied: the row
keeps its fingerprint, and only a kernel configured with that same key adopts the instance.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from jupyter_core.paths import jupyter_runtime_dir

from . import executor
from .config import SessionSettings, limit_reached
from .errors import FlexAIError, ParkedInstanceError, PlatformError, SSHError
from .gpu_platform import Instance, InstanceState, Platform
from .kernel_key import KernelKey, write_key_file
from .ledger import Entry, Ledger
from .reaper import delete_entry, reap_and_report
from .rfc3339 import format_time
from .ssh import KeyPair, SSHConnection, fingerprint, load_private_key
from .workspace.transfer import REMOTE_ROOT

#: A parked instance this close to its expiry is not adopted: the platform may delete it
#: before the adopter has restored its lease.
ADOPT_MARGIN = 5.0

#: Seconds a start waits for an instance of its kind that another process is parking, and how
#: often it looks meanwhile (a read of the ledger).
HANDOFF_WAIT = 15.0
HANDOFF_POLL = 0.1
#: A parking under way for longer is stuck (its owner hung: it is still the owner, and parks or
#: deletes if it wakes, else the reaper deletes once it dies): starts no longer wait for it.
PARKING_STUCK = 120.0


@dataclass(frozen=True)
class Parked:
    """A parked instance claimed by this process, and the key that reaches it (None if it
    could not be read: ``problem`` says why)."""

    entry: Entry
    key: KeyPair | None
    problem: str = ""

    @property
    def instance_id(self) -> str:
        assert self.entry.instance_id is not None
        return self.entry.instance_id


def key_path(instance_id: str) -> Path:
    """Where a parked instance's per-kernel key waits for its adopter."""
    return Path(jupyter_runtime_dir()) / f"flexai-parked-{instance_id}.key"


def begin(
    ledger: Ledger,
    request_key: str,
    instance: Instance | None,
    key: KernelKey,
    settings: SessionSettings,
) -> None:
    """Record that ``instance`` is being parked, before its kernel is asked to stop, so a start
    of its kind meanwhile waits for it (:func:`claim`). Its owner may call it again. A ledger
    that fails only costs the hand-off: it is logged, and the parking goes on."""
    if instance is None:
        return
    fp, labels = fingerprint(key.pair.private_key), _labels(settings.labels)
    try:
        ledger.begin_parking(request_key, instance.gpu_count, fp, labels)
    except FlexAIError as e:
        msg = "cannot record that FlexAI instance %s is being parked: %s"
        logging.getLogger(__name__).warning(msg, instance.id, e)


def park(
    platform: Platform,
    ledger: Ledger,
    request_key: str,
    instance: Instance,
    keep_alive: int,
    key: KernelKey,
    labels: dict[str, str],
    log: logging.Logger,
) -> int:
    """Park ``instance``: the platform's lease first (so it expires without us), then the key
    file (not for the user's own key, which is never copied), then the ledger row. The
    seconds it is parked for; 0, with a warning, if a step fails (the caller deletes the
    instance instead; a key file written for it is removed)."""
    until = time.time() + keep_alive
    path = None
    try:
        platform.set_ttl(instance.id, keep_alive)
        path = None if key.own else _write_key(key.pair, instance.id)
        ledger.park(
            request_key,
            until,
            instance.gpu_count,
            None if path is None else str(path),
            fingerprint(key.pair.private_key),
            _labels(labels),
        )
    except FlexAIError as e:
        if path is not None:
            path.unlink(missing_ok=True)
        log.warning("could not park FlexAI instance %s (%s): deleting it", instance.id, e)
        with contextlib.suppress(FlexAIError):  # else its deletion closes the row
            ledger.end_parking(request_key)
        return 0
    log.info(
        "FlexAI instance %s parked for %d s (keep_alive): the next kernel of its kind on this "
        "machine adopts it, else the platform deletes it",
        instance.id,
        keep_alive,
    )
    return keep_alive


def give_back(
    platform: Platform, ledger: Ledger, parked: Parked, revived: bool, log: logging.Logger
) -> int:
    """Park again, as it was, an instance whose adoption was cancelled (the cancel was of a
    start, not of the instance): its lease cut back to the keep-alive left if ``revived``
    restored it, its kept key left in place, its row parked again last (from then on another
    start may take it). The seconds it is parked for; 0 if too little is left, its key was
    unreadable or a step failed (the caller, still its owner, deletes it then)."""
    entry, now = parked.entry, time.time()
    until = entry.parked_until or now
    left = int(until - now)
    if parked.key is None or left < ADOPT_MARGIN:
        return 0
    try:
        if revived:  # never later than the platform's expiry, as at any parking
            platform.set_ttl(parked.instance_id, left)
            until = now + left
        fp = entry.key_fingerprint or ""
        ledger.park(
            entry.request_key, until, entry.gpu_count or 1, entry.key_file, fp, entry.labels or "{}"
        )
    except FlexAIError as e:
        log.warning(
            "could not park FlexAI instance %s again (%s): deleting it", parked.instance_id, e
        )
        return 0
    log.info(
        "FlexAI parked instance %s: its adoption was cancelled, parked again for %d s",
        parked.instance_id,
        left,
    )
    return left


@dataclass(frozen=True)
class Wanted:
    """What a starting kernel may adopt: an instance of its API, GPU type and count, made
    with the same extra ``labels`` (a team's instance is not billed to another) and, for a
    kernel with its own key (``own_key``), with that key."""

    api_url: str
    gpu_type: str
    gpu_count: int
    labels: dict[str, str]
    own_key: KeyPair | None
    kernel_id: str

    def matches(self, entry: Entry) -> bool:
        """Whether ``entry``'s instance is of this kind (whatever its state)."""
        kind = (self.gpu_type, self.gpu_count, _labels(self.labels))
        if (entry.gpu_type, entry.gpu_count, entry.labels or "{}") != kind:
            return False
        if entry.delete_owed or entry.instance_id is None:
            return False
        if self.own_key is not None:
            return fingerprint(self.own_key.private_key) == entry.key_fingerprint
        return True


def claim(
    platform: Platform,
    ledger: Ledger,
    wanted: Wanted,
    cancelled: threading.Event,
    log: logging.Logger,
) -> Parked | None:
    """Claim a parked instance this kernel may adopt (:func:`claim_parked`); if there is none
    but one of its kind is being parked, wait for it (the hand-off) and claim then. None if
    there is nothing to adopt, or ``cancelled`` is set while waiting."""
    if (parked := claim_parked(ledger, wanted)) is not None:
        return parked
    if not _await_handoff(platform, ledger, wanted, cancelled, log):
        return None
    return claim_parked(ledger, wanted)


def _await_handoff(
    platform: Platform,
    ledger: Ledger,
    wanted: Wanted,
    cancelled: threading.Event,
    log: logging.Logger,
) -> bool:
    """Wait while a live owner on this machine parks an instance ``wanted`` matches, at most
    :data:`HANDOFF_WAIT` seconds; True once one of those is parked. False at once if none is
    being parked, or once none is any more (the parking failed, the row went away, or its
    owner died: then the reaper deletes its instance)."""
    api_url = wanted.api_url
    deadline = time.monotonic() + HANDOFF_WAIT
    waited: set[str] = set()
    while True:
        rows = {e.request_key: e for e in ledger.live(api_url)}
        if any(k in rows and rows[k].parked_until is not None for k in waited):
            return True
        if any(k in rows and rows[k].owner.died() for k in waited):
            log.warning("FlexAI: the process parking an instance died; provisioning instead")
            executor.submit(lambda: reap_and_report(platform, ledger, api_url, log))
            return False
        was, waited = waited, {k for k, e in rows.items() if _handing_off(e, wanted)}
        if not waited:
            return False
        if not was:
            log.info("FlexAI: waiting for the instance another kernel is parking, to adopt it")
        if time.monotonic() >= deadline:
            log.warning(
                "FlexAI: no instance was parked within %g s; provisioning instead", HANDOFF_WAIT
            )
            return False
        if cancelled.wait(HANDOFF_POLL):
            return False


def _handing_off(entry: Entry, wanted: Wanted) -> bool:
    """Whether ``entry`` is being parked by a live owner on this machine, and ``wanted``."""
    if entry.parking_since is None or entry.parking_since < time.time() - PARKING_STUCK:
        return False
    return wanted.matches(entry) and entry.owner.visible() and not entry.owner.died()


def claim_parked(ledger: Ledger, wanted: Wanted) -> Parked | None:
    """Claim the freshest parked instance this kernel may adopt, or None.

    It must be ``wanted``'s kind, parked on this machine (the owner that parked it visible
    from here), not about to expire, and reachable with a key this kernel may use: its kept
    key, or for a kernel with its own key that same key.
    """
    now, own_key = time.time(), wanted.own_key
    for entry in ledger.parked(wanted.api_url):
        if not wanted.matches(entry) or (entry.parked_until or 0) < now + ADOPT_MARGIN:
            continue
        if not entry.owner.visible() or (own_key is None and entry.key_file is None):
            continue
        if not ledger.claim(entry.request_key, wanted.kernel_id, time.time() + ADOPT_MARGIN):
            continue  # another start or `gc` took it first, or it is about to expire
        if own_key is not None:
            return Parked(entry, own_key)
        assert entry.key_file is not None
        try:
            return Parked(entry, load_private_key(entry.key_file))
        except SSHError as e:  # claimed, so ours to delete, as any that cannot be reached
            return Parked(entry, None, f"its kept key is unreadable ({e})")
    return None


def revive(platform: Platform, parked: Parked, settings: SessionSettings) -> Instance:
    """Check that the claimed instance still runs and restore its lease to ``instance_ttl``
    (heartbeats then keep it); the instance. :class:`ParkedInstanceError` if it is gone, not
    running, its key was unreadable, or it has reached the kernel's ``max_hours`` or
    ``max_cost`` (which count from its creation: a kernel on it would be shut down at once)."""
    if parked.key is None:
        raise ParkedInstanceError(parked.problem)
    try:
        instance = platform.set_ttl(parked.instance_id, settings.instance_ttl or None)
    except PlatformError as e:
        raise ParkedInstanceError(f"parked instance {parked.instance_id}: {e}") from None
    if instance.state is not InstanceState.RUNNING or instance.ssh is None:
        raise ParkedInstanceError(
            f"parked instance {parked.instance_id} is {instance.state.value}, not running"
        )
    if reason := limit_reached(settings.max_hours, settings.max_cost, instance):
        raise ParkedInstanceError(reason)
    return instance


def clear_workspace(conn: SSHConnection, timeout: float) -> None:
    """Remove the previous kernel's files from the instance, so none reach the new kernel's
    folder; :class:`ParkedInstanceError` if that fails."""
    command = f'rm -rf -- "$HOME"/{shlex.quote(REMOTE_ROOT)}'
    try:
        status, out = conn.run(command, timeout)
    except SSHError as e:
        raise ParkedInstanceError(f"cannot clear the parked instance's workspace: {e}") from None
    if status != 0:
        reason = out.decode(errors="replace").strip()[-300:]
        raise ParkedInstanceError(f"cannot clear the parked instance's workspace: {reason}")


def release_key(parked: Parked) -> None:
    """Remove the parked copy of the key: the adopter holds it in memory (and keeps it under
    its own kernel's name if it keeps keys), or the instance was deleted."""
    if parked.entry.key_file is not None:
        Path(parked.entry.key_file).unlink(missing_ok=True)


def parked_model(entry: Entry, instance: Instance, now: float) -> dict[str, object]:
    """What ``jupyter flexai instances`` and ``/api/compute/instances`` say of a parked
    instance (``instance``: its platform record): its kind, when it expires, what it has cost
    so far and costs per hour."""
    until = entry.parked_until or now
    at = datetime.fromtimestamp(now, timezone.utc)
    return {
        "instance_id": entry.instance_id,
        "state": "parked",
        "gpu_type": entry.gpu_type,
        "gpu_count": entry.gpu_count,
        "parked_until": format_time(until),
        "seconds_left": round(max(0.0, until - now), 1),
        "created_at": format_time(instance.created_at),
        "uptime_seconds": round(instance.uptime(at), 1),
        "price_per_hour": instance.price_per_hour,
        "cost_usd": round(instance.cost(at), 6),
    }


def parked_models(platform: Platform, ledger: Ledger, api_url: str) -> list[dict[str, object]]:
    """The models of this user's parked instances on ``platform`` (at ``api_url``) that it
    still lists."""
    rows = ledger.parked(api_url)
    listed = {i.id: i for i in platform.list_instances()} if rows else {}
    now = time.time()
    return [parked_model(e, listed[e.instance_id], now) for e in rows if e.instance_id in listed]


def discard(
    platform: Platform, ledger: Ledger, api_url: str, instance_id: str, timeout: float
) -> bool:
    """Delete a parked instance on request (a Stop in the server extension); False if it is
    not parked. Claimed first, so one a kernel adopted meanwhile is left to it."""
    rows = [e for e in ledger.parked(api_url) if e.instance_id == instance_id]
    if not rows or not ledger.claim(rows[0].request_key):
        return False
    delete_entry(platform, ledger, rows[0], timeout)
    return True


def _labels(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True)


def _write_key(key: KeyPair, instance_id: str) -> Path:
    path = key_path(instance_id)
    try:
        write_key_file(path, key)
    except OSError as e:
        raise SSHError(f"cannot keep the parked instance's key in {path}: {e}") from None
    return path
