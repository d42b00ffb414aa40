"""Run a notebook on a FlexAI GPU without a browser, and print what each cell printed.

    python examples/run_headless.py examples/where-am-i.ipynb --kernel flexai-a100 \
        --output where-am-i.out.ipynb

Needs the kernelspec installed (``jupyter flexai install``) and FLEXAI_API_URL /
FLEXAI_API_KEY set, exactly like a Jupyter server would.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def cell_text(cell: nbformat.NotebookNode) -> str:
    """The text a person would see under the cell: streams, plain results and errors."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", "") + "\n")
        elif output.output_type == "error":
            parts.append(f"{output.ename}: {output.evalue}\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path, help="the notebook to run")
    parser.add_argument("--kernel", default="flexai-a100", help="kernelspec name")
    parser.add_argument("--output", type=Path, help="write the executed notebook here")
    parser.add_argument(
        "--timeout", type=int, default=600, help="seconds each cell may run (default: 600)"
    )
    args = parser.parse_args(argv)

    nb = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=args.kernel,
        timeout=args.timeout,
        resources={"metadata": {"path": str(args.notebook.parent)}},
    )
    status = 0
    try:
        client.execute()
    except CellExecutionError as exc:
        print(f"a cell failed: {exc.ename}: {exc.evalue}", file=sys.stderr)
        status = 1
    finally:
        if args.output:
            nbformat.write(nb, args.output)

    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            print(f"--- cell {index} ---")
            print(cell_text(cell), end="")
    return status


if __name__ == "__main__":
    sys.exit(main())
