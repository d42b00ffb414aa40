"""Kernelspec generation and installation, and the ready-made ``kernelspecs/`` directories."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpec

from flexai_provisioner.emulator.catalog import DEFAULT_GPU_TYPES
from flexai_provisioner.errors import ConfigurationError
from flexai_provisioner.kernelspecs import (
    install_kernelspecs,
    kernel_name,
    kernelspec_dict,
    remote_argv,
    write_kernelspec,
)

REPO = Path(__file__).resolve().parent.parent
READY_MADE = REPO / "kernelspecs"
REGENERATE = "python -m flexai_provisioner.kernelspecs kernelspecs " + " ".join(
    t.name for t in DEFAULT_GPU_TYPES
)


def png_size_and_pixels(data: bytes) -> tuple[tuple[int, int], bytes]:
    """Width/height and raw scanlines of a PNG, comparable across zlib builds."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, size, idat = 8, (0, 0), b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return size, zlib.decompress(idat)


def jupyter_env(tmp_path: Path, jupyter_path: Path) -> dict[str, str]:
    """An environment whose Jupyter sees ``jupyter_path`` and none of the user's own dirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    env.update(
        JUPYTER_PATH=str(jupyter_path),
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
    )
    return env


def kernelspec_list(env: dict[str, str]) -> dict[str, dict]:
    """``jupyter kernelspec list --json``, which hides specs whose provisioner is not installed."""
    provisioners = entry_points(group="jupyter_client.kernel_provisioners")
    assert "flexai-provisioner" in provisioners.names, (
        "the flexai-provisioner entry point is not installed: pip install -e '.[test]'"
    )
    result = subprocess.run(
        [sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)["kernelspecs"]


# -- names and kernel.json ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu_type", "name"),
    [
        ("A100", "flexai-a100"),
        ("L40S", "flexai-l40s"),
        ("h100", "flexai-h100"),
        ("x_1-b", "flexai-x_1-b"),
    ],
)
def test_kernel_name_is_prefixed_lower_case(gpu_type: str, name: str) -> None:
    assert kernel_name(gpu_type) == name


@pytest.mark.parametrize("gpu_type", ["", "A 100", "a/b", "../etc", "a.b", "A100\n", "ä100"])
def test_kernel_name_rejects_names_unfit_for_a_directory(gpu_type: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid GPU type"):
        kernel_name(gpu_type)


def test_kernelspec_dict_runs_the_launcher_with_this_python() -> None:
    argv = [sys.executable, "-m", "flexai_provisioner.launch", "--gpu", "A100"]
    assert kernelspec_dict("A100") == {
        "argv": [*argv, "-f", "{connection_file}"],
        "display_name": "FlexAI A100",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": "flexai-provisioner",
                "config": {"gpu_type": "A100", "gpu_count": 1},
            }
        },
    }


def test_kernelspec_dict_with_several_gpus() -> None:
    spec = kernelspec_dict("H100", gpu_count=4)
    assert spec["display_name"] == "FlexAI 4x H100"
    assert spec["metadata"]["kernel_provisioner"]["config"] == {"gpu_type": "H100", "gpu_count": 4}
    assert spec["argv"][3:7] == ["--gpu", "H100", "--gpu-count", "4"]


def test_launcher_argv_suits_frontends_that_run_argv_themselves() -> None:
    """VS Code rewrites an argv that mentions ipykernel to run its own interpreter, and
    runs argv[0] as it is: it must be this package's Python, by absolute path."""
    argv = kernelspec_dict("A100")["argv"]
    assert Path(argv[0]).is_absolute() and argv[0] == sys.executable
    assert not any("ipykernel" in arg for arg in argv)
    assert argv[-2:] == ["-f", "{connection_file}"]


OLD_ARGV = ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
"""What kernelspecs written before the launcher existed run."""


@pytest.mark.parametrize(
    ("argv", "remote"),
    [
        (kernelspec_dict("A100")["argv"], ["py3", *OLD_ARGV[1:]]),
        (kernelspec_dict("A100", python="python3")["argv"], ["py3", *OLD_ARGV[1:]]),
        (OLD_ARGV, OLD_ARGV),  # runs on the instance as it is
        (["/opt/py", "-m", "mykernel", "-f", "{c}"], ["/opt/py", "-m", "mykernel", "-f", "{c}"]),
    ],
    ids=["launcher", "launcher-on-path", "old-kernelspec", "custom"],
)  # fmt: skip
def test_the_provisioner_runs_ipykernel_on_the_instance_instead_of_the_launcher(
    argv: list[str], remote: list[str]
) -> None:
    assert remote_argv(argv, "py3") == remote


@pytest.mark.parametrize("gpu_count", [0, 9, -1, True, "2", 1.0])
def test_kernelspec_dict_rejects_bad_gpu_counts(gpu_count: object) -> None:
    with pytest.raises(ConfigurationError, match="invalid GPU count"):
        kernelspec_dict("A100", gpu_count)  # type: ignore[arg-type]


def test_write_kernelspec_makes_a_directory_jupyter_client_loads(tmp_path: Path) -> None:
    path = write_kernelspec(tmp_path, "L4")
    assert path == tmp_path / "flexai-l4"
    assert json.loads((path / "kernel.json").read_text()) == kernelspec_dict("L4")
    for size in (32, 64):
        (width, height), pixels = png_size_and_pixels(
            (path / f"logo-{size}x{size}.png").read_bytes()
        )
        assert (width, height) == (size, size)
        assert len(pixels) == size * (1 + 4 * size)  # a filter byte + RGBA per row

    spec = KernelSpec.from_resource_dir(str(path))
    assert spec.display_name == "FlexAI L4"
    assert spec.interrupt_mode == "signal"
    assert spec.metadata["kernel_provisioner"]["provisioner_name"] == "flexai-provisioner"


# -- installing ----------------------------------------------------------------------------


def test_install_into_a_prefix_is_listed_by_jupyter_kernelspec(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    installed = install_kernelspecs(["A100", "a100", "L4"], prefix=str(prefix))

    kernels = prefix / "share" / "jupyter" / "kernels"
    assert installed == [
        ("flexai-a100", str(kernels / "flexai-a100")),
        ("flexai-l4", str(kernels / "flexai-l4")),
    ]
    listed = kernelspec_list(jupyter_env(tmp_path, prefix / "share" / "jupyter"))
    assert listed["flexai-a100"]["spec"]["display_name"] == "FlexAI A100"
    assert listed["flexai-a100"]["resource_dir"] == str(kernels / "flexai-a100")
    assert listed["flexai-l4"]["spec"].items() >= kernelspec_dict("L4").items()


def test_install_replaces_an_older_installation(tmp_path: Path) -> None:
    install_kernelspecs(["A100"], prefix=str(tmp_path))
    old = tmp_path / "share" / "jupyter" / "kernels" / "flexai-a100"
    (old / "stale.txt").write_text("from an older version")
    old_spec = {**kernelspec_dict("A100"), "argv": OLD_ARGV}
    (old / "kernel.json").write_text(json.dumps(old_spec))
    ((_, path),) = install_kernelspecs(["A100"], prefix=str(tmp_path))
    assert not (old / "stale.txt").exists()
    assert json.loads((Path(path) / "kernel.json").read_text()) == kernelspec_dict("A100")


def test_install_refuses_user_and_prefix_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        install_kernelspecs(["A100"], user=True, prefix=str(tmp_path))


def test_install_refuses_an_empty_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no GPU types"):
        install_kernelspecs([], prefix=str(tmp_path))


def test_install_into_an_unwritable_place_is_a_configuration_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(ConfigurationError, match="cannot install kernelspec flexai-a100"):
        install_kernelspecs(["A100"], prefix=str(not_a_directory))


# -- the ready-made directories --------------------------------------------------------------


def test_ready_made_kernelspecs_cover_the_emulator_catalog() -> None:
    assert sorted(p.name for p in READY_MADE.iterdir()) == sorted(
        kernel_name(t.name) for t in DEFAULT_GPU_TYPES
    ), f"regenerate with: {REGENERATE}"


@pytest.mark.parametrize("gpu_type", [t.name for t in DEFAULT_GPU_TYPES])
def test_ready_made_kernelspec_equals_the_generated_one(gpu_type: str, tmp_path: Path) -> None:
    """Except that their launcher runs the python3 on PATH: a shipped file cannot know
    where the package is installed."""
    ready = READY_MADE / kernel_name(gpu_type)
    fresh = write_kernelspec(tmp_path, gpu_type, python="python3")
    assert sorted(p.name for p in ready.iterdir()) == sorted(p.name for p in fresh.iterdir())
    expected = kernelspec_dict(gpu_type, python="python3")
    assert json.loads((ready / "kernel.json").read_text()) == expected, (
        f"kernelspecs/ drifted from kernelspec_dict; regenerate with: {REGENERATE}"
    )
    for logo in ("logo-32x32.png", "logo-64x64.png"):
        assert png_size_and_pixels((ready / logo).read_bytes()) == png_size_and_pixels(
            (fresh / logo).read_bytes()
        ), f"regenerate with: {REGENERATE}"


def test_ready_made_directory_installs_with_jupyter_kernelspec(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    subprocess.run(
        [sys.executable, "-m", "jupyter", "kernelspec", "install",
         str(READY_MADE / "flexai-h100"), "--prefix", str(prefix)],
        env=jupyter_env(tmp_path, prefix / "share" / "jupyter"),
        capture_output=True,
        timeout=60,
        check=True,
    )  # fmt: skip
    listed = kernelspec_list(jupyter_env(tmp_path, prefix / "share" / "jupyter"))
    expected = kernelspec_dict("H100", python="python3")
    assert listed["flexai-h100"]["spec"].items() >= expected.items()
