"""Kernelspecs that run a kernel on a FlexAI GPU: one per GPU type, named ``flexai-<type>``.

A kernelspec is how a Jupyter frontend learns that a kernel exists, so each GPU type the
platform offers becomes one entry in the launcher. The ``kernel_provisioner`` metadata tells
jupyter_client to hand the launch to :class:`~flexai_provisioner.provisioner.FlexAIProvisioner`
with the GPU type and count as its config. Frontends that run ``argv`` themselves and ignore
provisioners (VS Code, emacs-jupyter) run :mod:`flexai_provisioner.launch`, which starts the
same kernel on the same kind of instance; jupyter_client never runs that ``argv`` locally,
the provisioner runs ipykernel on the instance instead (:func:`remote_argv`).

Installation mirrors ``ipykernel install``: stage the directory in a temporary location,
then let :class:`~jupyter_client.kernelspec.KernelSpecManager` copy it to the user, prefix
or system location.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

from .config import check_gpu_count
from .errors import ConfigurationError

__all__ = [
    "KERNEL_NAME_PREFIX",
    "LAUNCHER_MODULE",
    "PROVISIONER_NAME",
    "install_kernelspecs",
    "ipykernel_argv",
    "kernel_name",
    "kernelspec_dict",
    "launcher_argv",
    "remote_argv",
    "write_kernelspec",
]

PROVISIONER_NAME = "flexai-provisioner"
"""The entry point name under ``jupyter_client.kernel_provisioners``."""

KERNEL_NAME_PREFIX = "flexai-"

LAUNCHER_MODULE = "flexai_provisioner.launch"
"""Run by frontends without provisioner support. Its name must not contain "ipykernel":
VS Code rewrites such an argv to run its own chosen interpreter."""

log = logging.getLogger(__name__)

# KernelSpecManager warns about a destination outside the Jupyter path *before* copying, so
# a failed install would print it too; install_kernelspecs says it after success instead.
_manager_log = logging.getLogger(f"{__name__}.manager")
_manager_log.setLevel(logging.ERROR)

_GPU_TYPE_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


def _check_gpu_type(gpu_type: str) -> str:
    """Reject GPU type names that cannot become a kernel name (and so a directory name)."""
    if not isinstance(gpu_type, str) or not _GPU_TYPE_PATTERN.fullmatch(gpu_type):
        raise ConfigurationError(
            f"invalid GPU type {gpu_type!r}: use only letters, digits, '_' and '-' (e.g. A100)"
        )
    return gpu_type


def kernel_name(gpu_type: str) -> str:
    """The kernelspec name for ``gpu_type``: ``flexai-`` plus the type in lower case."""
    return KERNEL_NAME_PREFIX + _check_gpu_type(gpu_type).lower()


def launcher_argv(gpu_type: str, gpu_count: int = 1, python: str | None = None) -> list[str]:
    """The kernelspec ``argv``: :data:`LAUNCHER_MODULE` run by ``python`` (default: this
    interpreter, by absolute path, so a frontend runs the Python that has this package)."""
    gpu = ["--gpu", _check_gpu_type(gpu_type)]
    if check_gpu_count(gpu_count) != 1:
        gpu += ["--gpu-count", str(gpu_count)]
    return [python or sys.executable, "-m", LAUNCHER_MODULE, *gpu, "-f", "{connection_file}"]


def ipykernel_argv(python: str) -> list[str]:
    """ipykernel run by ``python``, as the agent on the instance starts it."""
    return [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def remote_argv(argv: list[str], python: str) -> list[str]:
    """What runs on the instance for a kernelspec's ``argv``.

    The launcher's argv (which only a frontend without provisioners runs, locally) becomes
    ipykernel run by the instance's ``python``; any other argv, such as that of kernelspecs
    written before the launcher existed, runs on the instance as it is.
    """
    if list(argv[1:3]) != ["-m", LAUNCHER_MODULE]:
        return list(argv)
    return ipykernel_argv(python)


def kernelspec_dict(
    gpu_type: str, gpu_count: int = 1, *, python: str | None = None
) -> dict[str, Any]:
    """The ``kernel.json`` content for a kernel on ``gpu_count`` GPUs of ``gpu_type``;
    ``python`` is the launcher's interpreter (see :func:`launcher_argv`)."""
    argv = launcher_argv(gpu_type, gpu_count, python)
    display = f"FlexAI {gpu_type}" if gpu_count == 1 else f"FlexAI {gpu_count}x {gpu_type}"
    return {
        "argv": argv,
        "display_name": display,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": PROVISIONER_NAME,
                "config": {"gpu_type": gpu_type, "gpu_count": gpu_count},
            }
        },
    }


def write_kernelspec(
    directory: str | Path, gpu_type: str, *, gpu_count: int = 1, python: str | None = None
) -> Path:
    """Write the kernelspec for ``gpu_type`` into ``directory/<kernel name>`` and return it.

    The result holds ``kernel.json`` and two small generated logos, ready for
    ``jupyter kernelspec install``. An existing ``kernel.json`` there is overwritten.
    """
    spec = kernelspec_dict(gpu_type, gpu_count, python=python)
    target = Path(directory) / kernel_name(gpu_type)
    target.mkdir(parents=True, exist_ok=True)
    (target / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    for size in (32, 64):
        (target / f"logo-{size}x{size}.png").write_bytes(_logo_png(size))
    return target


def install_kernelspecs(
    gpu_types: Iterable[str], *, user: bool = False, prefix: str | os.PathLike[str] | None = None
) -> list[tuple[str, str]]:
    """Install one kernelspec per GPU type; return ``(kernel name, installed path)`` pairs.

    ``user`` installs into the per-user Jupyter data directory, ``prefix`` into
    ``PREFIX/share/jupyter/kernels`` (``sys.prefix`` for a virtual environment), neither
    into the system-wide directory. Types that differ only in case install once. A
    kernelspec of the same name already there (such as one written by an older version)
    is replaced.
    """
    if user and prefix:
        raise ConfigurationError("choose one of user and prefix, not both")
    prefix = os.fspath(prefix) if prefix else None
    unique: dict[str, str] = {}
    for gpu_type in gpu_types:
        unique.setdefault(kernel_name(gpu_type), gpu_type)
    if not unique:
        raise ConfigurationError("no GPU types to install kernelspecs for")
    manager = KernelSpecManager(log=_manager_log)
    installed: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="flexai-kernelspecs-") as staging:
        for name, gpu_type in unique.items():
            source = write_kernelspec(staging, gpu_type)
            try:
                path = manager.install_kernel_spec(str(source), name, user=user, prefix=prefix)
            except OSError as exc:
                hint = "" if user or prefix else "; try --user or --sys-prefix"
                raise ConfigurationError(
                    f"cannot install kernelspec {name}: {exc.strerror or exc}"
                    f" ({exc.filename or 'destination'}){hint}"
                ) from exc
            installed.append((name, path))
    kernels_dir = os.path.dirname(installed[0][1])
    if kernels_dir not in manager.kernel_dirs:
        log.warning(
            "Jupyter does not look in %s: add %s to JUPYTER_PATH to use these kernelspecs",
            kernels_dir,
            os.path.dirname(kernels_dir),
        )
    return installed


def _logo_png(size: int) -> bytes:
    """A ``size`` x ``size`` RGBA PNG of a GPU chip on a rounded tile, drawn without Pillow."""
    background, chip, pin = (79, 70, 229, 255), (224, 231, 255, 255), (165, 180, 252, 255)
    radius = size / 6
    rows = []
    for y in range(size):
        row = bytearray(b"\x00")  # PNG filter type "None" for each scanline
        for x in range(size):
            u, v = (x + 0.5) / size, (y + 0.5) / size
            du = max(radius / size - u, u - 1 + radius / size, 0)
            dv = max(radius / size - v, v - 1 + radius / size, 0)
            if (du * du + dv * dv) ** 0.5 * size > radius:
                row += bytes(4)
            elif 0.3 <= u <= 0.7 and 0.3 <= v <= 0.7:
                row += bytes(chip)
            elif (0.2 <= u <= 0.8 and 0.3 <= v <= 0.7 and int(v * 10) % 2) or (
                0.2 <= v <= 0.8 and 0.3 <= u <= 0.7 and int(u * 10) % 2
            ):
                row += bytes(pin)
            else:
                row += bytes(background)
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
        + chunk(b"IEND", b"")
    )


def _main(argv: list[str]) -> int:
    """Regenerate ready-made kernelspec directories: ``DIRECTORY GPU_TYPE...``.

    Their launcher runs the ``python3`` on PATH: a shipped file cannot know where this
    package is installed (``jupyter flexai install`` writes the absolute path).
    """
    if len(argv) < 2:
        usage = "usage: python -m flexai_provisioner.kernelspecs DIRECTORY GPU_TYPE..."
        print(usage, file=sys.stderr)
        return 2
    for gpu_type in argv[1:]:
        print(write_kernelspec(argv[0], gpu_type, python="python3"))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
