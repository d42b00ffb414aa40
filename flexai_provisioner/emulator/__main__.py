"""``python -m flexai_provisioner.emulator``: ``jupyter flexai emulator`` without the CLI."""

from __future__ import annotations

import argparse
import sys

from .command import DESCRIPTION, EPILOG, add_arguments, run

parser = argparse.ArgumentParser(
    prog="python -m flexai_provisioner.emulator",
    description=DESCRIPTION,
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
)
add_arguments(parser)
sys.exit(run(parser.parse_args()))
