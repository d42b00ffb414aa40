"""Shared pytest fixtures.

Emulator (a local FlexAI platform whose instances are real sshd processes on 127.0.0.1):

- ``api_key`` (session): the API key of the test account, a random ``test-key-…``.
- ``other_api_key`` (session): a second account on the same emulator, for isolation tests.
- ``emulator`` (session): a started in-process
  :class:`~flexai_provisioner.emulator.Emulator` accepting both keys, its state in a tmp
  dir; stopped at the end of the session, which deletes every instance.
- ``no_leaks`` (autouse): after each test that used ``emulator`` (directly or through another
  fixture), waits up to ``LEAK_WAIT`` seconds until no instance is live and no instance
  process runs, then resets the faults. Leftovers are force-deleted, so later tests start
  clean, and the test fails listing them.
- ``flexai_env``: points FlexAI clients at the emulator (``FLEXAI_API_URL``,
  ``FLEXAI_API_KEY``) and Jupyter at tmp dirs; returns the variables set.
- ``kernelspecs``: a private JUPYTER_PATH (on top of ``flexai_env``) holding ``flexai-a100``;
  ``kernelspecs.add(name, config)`` adds a FlexAI kernelspec with provisioner config changes.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexai_provisioner.emulator import Emulator
from flexai_provisioner.kernelspecs import kernelspec_dict

LEAK_WAIT = 15.0


@pytest.fixture(scope="session")
def api_key() -> str:
    return "test-key-" + secrets.token_hex(8)


@pytest.fixture(scope="session")
def other_api_key() -> str:
    return "test-key-other-" + secrets.token_hex(8)


@pytest.fixture(scope="session")
def emulator(
    api_key: str, other_api_key: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Emulator]:
    emu = Emulator(
        api_keys=(api_key, other_api_key), state_dir=tmp_path_factory.mktemp("emulator")
    ).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "emulator" not in request.fixturenames:
        return
    emu: Emulator = request.getfixturevalue("emulator")
    deadline = time.monotonic() + LEAK_WAIT
    while (emu.live_instances() or emu.processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    live, pids = emu.live_instances(), emu.processes()
    emu.reset_faults()
    if live or pids:
        emu.delete_all()
        pytest.fail(
            f"the test left live instances {live} and instance processes {pids} "
            f"{LEAK_WAIT:.0f} s after it ended (now force-deleted)"
        )


@pytest.fixture
def flexai_env(
    emulator: Emulator, api_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    env = {
        "FLEXAI_API_URL": emulator.url,
        "FLEXAI_API_KEY": api_key,
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
        "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


class Kernelspecs:
    """A private kernelspec directory (on JUPYTER_PATH) holding FlexAI kernelspecs."""

    def __init__(self, root: Path):
        self.root = root
        self.add("flexai-a100", {})

    def add(
        self, name: str, config: dict[str, object], gpu_type: str = "A100", **fields: object
    ) -> None:
        """Write kernelspec ``name``: provisioner ``config`` and top-level ``fields`` changed."""
        spec = kernelspec_dict(gpu_type)
        spec["metadata"]["kernel_provisioner"]["config"].update(config)
        spec.update(fields)
        directory = self.root / "kernels" / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "kernel.json").write_text(json.dumps(spec))


@pytest.fixture
def kernelspecs(
    flexai_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Kernelspecs:
    root = tmp_path / "jupyter-path"
    monkeypatch.setenv("JUPYTER_PATH", str(root))
    return Kernelspecs(root)
