"""``jupyter flexai emulator``: run the local FlexAI platform in the foreground.

The CLI calls :func:`register` on its subparsers and dispatches to :func:`run`;
``python -m flexai_provisioner.emulator`` takes the same arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .errors import EmulatorError
from .faults import Faults

DEFAULT_PORT = 8642
DESCRIPTION = (
    "Run a local FlexAI platform on 127.0.0.1 whose instances are real sshd processes, "
    "until SIGINT or SIGTERM; then every instance is deleted."
)
EPILOG = (
    "Faults can also be read and changed at run time with GET/PUT /_emulator/faults\n"
    "(same bearer token), whose JSON body is any subset of:\n" + Faults.describe()
)


def _capacity(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    try:
        if not (sep and name) or int(count) < 0:
            raise ValueError
        return name, int(count)
    except ValueError:
        message = f"expected TYPE=COUNT, e.g. A100=2, not {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The emulator's options, shared by ``jupyter flexai emulator`` and ``python -m``."""
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port on 127.0.0.1 (0 picks a free one; default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="accepted API key, one account each; repeatable (default: $FLEXAI_API_KEY)",
    )
    parser.add_argument(
        "--provision-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long instances take to boot (default 0)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where instance directories go (default: a fresh temporary one)",
    )
    parser.add_argument(
        "--error-rate",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of API requests answered 500",
    )
    parser.add_argument(
        "--rate-limit-rate",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of API requests answered 429",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds added to every API request",
    )
    parser.add_argument(
        "--capacity",
        type=_capacity,
        action="append",
        default=[],
        metavar="TYPE=COUNT",
        help="override a GPU type's capacity; repeatable",
    )
    parser.add_argument(
        "--link-latency-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="milliseconds added each way to every SSH connection to an instance (default 0)",
    )
    parser.add_argument(
        "--link-bandwidth-mbps",
        type=float,
        default=0.0,
        metavar="MBPS",
        help="bandwidth each way of those connections in megabits/s (default 0: no cap)",
    )
    parser.add_argument("--seed", type=int, help="seed for the random faults")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="DEBUG logs every request (default INFO)",
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``emulator`` subcommand to an argparse ``subparsers`` object."""
    parser = subparsers.add_parser(
        "emulator",
        help="run a local FlexAI platform emulator",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean shutdown, 2 on unusable settings."""
    from .app import Emulator  # here, so that `jupyter flexai --help` stays light

    api_keys = args.api_keys or (
        [os.environ["FLEXAI_API_KEY"]] if os.environ.get("FLEXAI_API_KEY") else []
    )
    if not api_keys:
        print("error: no API key: set FLEXAI_API_KEY or pass --api-key KEY", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("flexai_provisioner.emulator").setLevel(args.log_level)
    try:
        faults = Faults(
            error_rate=args.error_rate,
            rate_limit_rate=args.rate_limit_rate,
            latency=args.latency,
            seed=args.seed,
            capacity=dict(args.capacity),
            provision_delay=args.provision_delay,
            link_latency_ms=args.link_latency_ms,
            link_bandwidth_mbps=args.link_bandwidth_mbps,
        )
        emulator = Emulator(
            port=args.port, api_keys=api_keys, state_dir=args.state_dir, faults=faults
        ).start()
    except (EmulatorError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"FlexAI emulator listening on {emulator.url}", flush=True)
    emulator.serve_forever_until_signal()
    return 0
