"""``jupyter flexai``: install kernelspecs, inspect GPU types and instances, sync a kernel's
files, run the emulator.

The API is found through ``--api-url`` / ``--api-key`` or, when those are not given, the
``FLEXAI_API_URL`` / ``FLEXAI_API_KEY`` environment variables. The global options may be
given before or after the subcommand (``jupyter flexai --api-url URL gpus`` and
``jupyter flexai gpus --api-url URL`` are the same), except for ``emulator``, whose own
options (such as its ``--api-key``) take those places; give them before it.

Every :class:`~flexai_provisioner.errors.FlexAIError` ends the command with exit status 1
and one line on stderr, ``jupyter flexai: error: <message>``; usage errors exit with 2.
Adding a subcommand means writing a ``_register_<name>`` and a ``_run_<name>`` function
and one entry in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .client import FlexAIClient
from .emulator import command as emulator_command
from .errors import (
    FlexAIError,
    LedgerError,
    PlatformUnreachableError,
    UnknownGPUTypeError,
    WorkspaceError,
)
from .gpu_platform import Instance, InstanceState
from .kernelspecs import install_kernelspecs, kernel_name, kernelspec_dict
from .ledger import Entry, Ledger
from .parking import parked_model
from .reaper import reap_orphans
from .rfc3339 import format_time
from .workspace import files, megabytes, running_workspaces, state_path, sync_elsewhere

PROG = "jupyter flexai"

log = logging.getLogger("flexai_provisioner.cli")

# A person waits at the terminal: fail within seconds when the API is down rather than
# retrying as patiently as a kernel launch does.
CLI_TIMEOUT = 10.0
CLI_MAX_RETRIES = 2

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

Subparsers = Any  # argparse's private _SubParsersAction


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: how to add its parser, and what runs it (returning the exit status)."""

    register: Callable[[Subparsers, list[argparse.ArgumentParser]], object]
    run: Callable[[argparse.Namespace], int]


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Add the options every subcommand shares.

    On the subcommand parsers their defaults are suppressed, so a value given before the
    subcommand is not overwritten by the subcommand parser's default.
    """
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--api-url",
        dest="flexai_api_url",
        metavar="URL",
        default=default,
        help="FlexAI API base URL (default: $FLEXAI_API_URL)",
    )
    parser.add_argument(
        "--api-key",
        dest="flexai_api_key",
        metavar="KEY",
        default=default,
        help="FlexAI API key (default: $FLEXAI_API_KEY)",
    )
    parser.add_argument(
        "--log-level",
        dest="flexai_log_level",
        type=str.upper,
        choices=_LOG_LEVELS,
        default=argparse.SUPPRESS if suppress else "WARNING",
        help="logging threshold on stderr (default: WARNING)",
    )


def _client(args: argparse.Namespace) -> FlexAIClient:
    return FlexAIClient(
        args.flexai_api_url,
        args.flexai_api_key,
        timeout=CLI_TIMEOUT,
        max_retries=CLI_MAX_RETRIES,
    )


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print left-aligned columns two spaces apart, without trailing blanks."""
    cells = [[str(c) for c in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# -- install ---------------------------------------------------------------------------


def _register_install(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "install",
        parents=parents,
        help="install one kernelspec per GPU type",
        description=(
            "Install a kernelspec 'flexai-<type>' for each GPU type. Without --gpu, one per "
            "type the API offers. With --gpu, exactly those types; no API is needed, but when "
            "one is configured, types it does not offer are rejected."
        ),
    )
    parser.add_argument(
        "--gpu",
        action="append",
        metavar="TYPE",
        help="GPU type to install a kernelspec for (repeatable), e.g. --gpu A100",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument(
        "--sys-prefix",
        dest="prefix",
        action="store_const",
        const=sys.prefix,
        help=f"install into this Python's prefix ({sys.prefix}), for virtual environments",
    )
    where.add_argument(
        "--prefix",
        metavar="DIR",
        help="install into DIR/share/jupyter/kernels",
    )


def _offered_names(args: argparse.Namespace, requested: list[str]) -> list[str]:
    """The requested types, spelled as the API spells them when an API is configured."""
    for gpu_type in requested:
        kernel_name(gpu_type)  # reject malformed names before any network traffic
    if not (args.flexai_api_url or os.environ.get("FLEXAI_API_URL")):
        return requested
    try:
        with _client(args) as client:
            offered = [t.name for t in client.list_gpu_types()]
    except PlatformUnreachableError as exc:
        log.warning("installing unchecked: cannot list the API's GPU types: %s", exc)
        return requested
    by_lower = {name.lower(): name for name in offered}
    unknown = [t for t in requested if t.lower() not in by_lower]
    if unknown:
        raise UnknownGPUTypeError(
            f"GPU type {', '.join(unknown)} is not offered by the FlexAI API; "
            f"offered GPU types: {', '.join(offered) or 'none'}",
            known=offered,
        )
    return [by_lower[t.lower()] for t in requested]


def _run_install(args: argparse.Namespace) -> int:
    if args.gpu:
        gpu_types = _offered_names(args, args.gpu)
    else:
        with _client(args) as client:
            gpu_types = [t.name for t in client.list_gpu_types()]
    display: dict[str, str] = {}
    for gpu_type in gpu_types:  # the first spelling wins, as in install_kernelspecs
        display.setdefault(kernel_name(gpu_type), kernelspec_dict(gpu_type)["display_name"])
    installed = install_kernelspecs(gpu_types, user=args.user, prefix=args.prefix)
    rows = [(name, display[name], path) for name, path in installed]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for name, shown, path in rows:
        print(f"{name.ljust(widths[0])}  {shown.ljust(widths[1])}  {path}")
    return 0


# -- gpus ------------------------------------------------------------------------------


def _register_gpus(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    subparsers.add_parser(
        "gpus",
        parents=parents,
        help="list the GPU types the platform offers",
        description="List the GPU types the platform offers, their price and free GPUs.",
    )


def _run_gpus(args: argparse.Namespace) -> int:
    with _client(args) as client:
        gpu_types = client.list_gpu_types()
    rows = [
        (t.name, f"{t.memory_gb} GB", f"${t.price_per_hour:.2f}", t.available) for t in gpu_types
    ]
    _print_table(("NAME", "MEMORY", "PRICE/H", "AVAILABLE"), rows)
    return 0


# -- instances -------------------------------------------------------------------------


def _register_instances(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "instances",
        parents=parents,
        help="list this account's instances",
        description="List the instances of this API key's account that are not deleted.",
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list of instance objects instead"
    )


def _instance_json(instance: Instance, parked: Entry | None, now: float) -> dict[str, Any]:
    """The instance as the API writes it (same field names, RFC 3339 times), and ``parked``:
    null, or what it is parked for (``keep_alive``)."""
    data = dataclasses.asdict(instance)
    data["state"] = instance.state.value
    data["created_at"] = format_time(instance.created_at)
    data["expires_at"] = None if instance.expires_at is None else format_time(instance.expires_at)
    data["parked"] = None if parked is None else parked_model(parked, instance, now)
    return data


def _parked_here(api_url: str) -> dict[str, Entry]:
    """This user's parked instances on that API, by id (none if the ledger is unreadable)."""
    try:
        return {e.instance_id: e for e in Ledger().parked(api_url) if e.instance_id}
    except LedgerError as e:
        log.warning("cannot tell which instances are parked: %s", e)
        return {}


def _left(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _run_instances(args: argparse.Namespace) -> int:
    with _client(args) as client:
        listed = client.list_instances()
        parked = _parked_here(client.api_url)
    instances = [i for i in listed if i.state is not InstanceState.DELETED]
    now = time.time()
    if args.json:
        print(json.dumps([_instance_json(i, parked.get(i.id), now) for i in instances], indent=2))
        return 0
    rows = []
    for i in instances:
        until = parked[i.id].parked_until if i.id in parked else None
        rows.append(
            (
                i.id,
                i.state.value if until is None else "parked",
                i.gpu_type,
                i.gpu_count,
                format_time(i.created_at),
                f"{i.ssh.user}@{i.ssh.host}:{i.ssh.port}" if i.ssh else "-",
                f"${i.price_per_hour:.2f}",
                f"${i.cost():.4f}",
                "-" if until is None else _left(max(0.0, until - now)),
            )
        )
    headers = ("ID", "STATE", "GPU", "COUNT", "CREATED", "SSH", "PRICE/H", "COST", "PARKED")
    _print_table(headers, rows)
    return 0


# -- gc --------------------------------------------------------------------------------


def _register_gc(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "gc",
        parents=parents,
        help="delete instances whose kernel's process died",
        description="Delete this user's instances on this host whose owning process (a "
        "Jupyter server, `jupyter execute`, a script) is gone, found through the local "
        "ledger and the platform's owner labels, and parked instances (keep_alive) whose "
        "keep-alive is over.",
    )
    parser.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    parser.add_argument(
        "--parked",
        action="store_true",
        help="also delete the parked instances still waiting for a kernel to adopt them",
    )


def _run_gc(args: argparse.Namespace) -> int:
    ledger = Ledger()
    with _client(args) as client:
        reaped = reap_orphans(
            client, ledger, client.api_url, dry_run=args.dry_run, parked=args.parked
        )
        live = ledger.live(client.api_url)
    unseen = [
        e for e in live if not (e.owner.visible() or e.delete_owed or e.parked_until is not None)
    ]
    waiting = [e for e in live if e.parked_until is not None and not e.expired()]
    verb = "would delete" if args.dry_run else "deleted"
    for item in reaped:
        print(f"{verb} {item.instance_id} (kernel {item.kernel_id or '?'}, from {item.reason})")
    if not reaped:
        print("no orphaned instances")
    if unseen:
        print(
            f"left {len(unseen)} instance(s) whose owner this machine cannot see (another "
            "host, boot or PID namespace sharing this ledger): their owner deletes them, or "
            "their lease expires"
        )
    if waiting and not args.parked:
        print(
            f"left {len(waiting)} parked instance(s) waiting for a kernel (keep_alive): "
            "`jupyter flexai gc --parked` deletes them"
        )
    return 0


# -- sync ------------------------------------------------------------------------------


def _register_sync(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "sync",
        parents=parents,
        help="copy back the files running kernels made on their instances",
        description="Copy the files that running FlexAI kernels of this user (on this host) "
        "created or changed in their workspaces back beside their notebooks, as happens at "
        "their shutdown. A local file changed since it was copied is kept; the instance's "
        "version is saved beside it as NAME.flexai-<instance>.EXT.",
    )
    parser.add_argument(
        "kernel_ids",
        nargs="*",
        metavar="KERNEL_ID",
        help="the kernels to sync (default: every running kernel with a workspace)",
    )


def _run_sync(args: argparse.Namespace) -> int:
    paths = [state_path(k) for k in args.kernel_ids] or running_workspaces()
    for kernel_id, path in zip(args.kernel_ids, paths, strict=False):
        if not path.exists():
            raise WorkspaceError(
                f"no running FlexAI kernel {kernel_id} with a workspace on this host "
                f"(no {path}); `jupyter flexai sync` with no id syncs every one there is"
            )
    if not paths:
        print("no running FlexAI kernel has a workspace")
    for path in paths:
        kernel_id = path.name.removeprefix("flexai-").removesuffix(".workspace.json")
        workspace, report = sync_elsewhere(path, CLI_TIMEOUT)
        copied = f"copied {files(len(report.copied))} ({megabytes(report.nbytes)})"
        source = f"instance {workspace.label}"
        print(f"kernel {kernel_id}: {copied} from {source} to {workspace.local_dir}")
        for kept, saved_as in report.conflicts:
            print(f"  {kept} was changed here: kept; the instance's version is in {saved_as}")
        for rel, why in report.failed:
            print(f"  {rel} could not be written here: {why}")
    return 0


# -- emulator --------------------------------------------------------------------------


def _register_emulator(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    """The emulator's own options (its ``--api-key``, ``--log-level``) replace the shared ones."""
    emulator_command.register(subparsers)


def _run_emulator(args: argparse.Namespace) -> int:
    """Serve the emulator; ``jupyter flexai --api-key KEY emulator`` makes KEY its key."""
    if not args.api_keys and args.flexai_api_key:
        args.api_keys = [args.flexai_api_key]
    return emulator_command.run(args)


# -- dispatch --------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "install": Command(_register_install, _run_install),
    "gpus": Command(_register_gpus, _run_gpus),
    "instances": Command(_register_instances, _run_instances),
    "gc": Command(_register_gc, _run_gc),
    "sync": Command(_register_sync, _run_sync),
    "emulator": Command(_register_emulator, _run_emulator),
}
"""Subcommands in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``jupyter flexai`` argument parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run Jupyter kernels on FlexAI cloud GPUs: kernelspecs, GPUs, instances.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, suppress=False)
    shared = argparse.ArgumentParser(add_help=False)
    _global_options(shared, suppress=True)
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, title="commands"
    )
    for command in COMMANDS.values():
        command.register(subparsers, [shared])
    return parser


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jupyter flexai`` with ``argv`` (default: the process arguments); return the status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.flexai_log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return COMMANDS[args.command].run(args)
    except FlexAIError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
