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
- ``private_jupyter_config`` (autouse): JUPYTER_CONFIG_DIR in a tmp dir.
- ``flexai_env``: points FlexAI clients at the emulator (``FLEXAI_API_URL``,
  ``FLEXAI_API_KEY``) and Jupyter at tmp dirs; returns the variables set.
- ``kernelspecs``: a private JUPYTER_PATH (on top of ``flexai_env``) holding ``flexai-a100``;
  ``kernelspecs.add(name, config)`` adds a FlexAI kernelspec with provisioner config changes.
- ``jupyter_server``: starts ``jupyter server``/``jupyter lab`` subprocesses (on top of
  ``kernelspecs``), each on a free port with a token; all stopped at the end of the test.

Helpers, imported by the tests (``from conftest import until``): ``until`` / ``until_async``,
the one way a test waits for something; ``serving``, a stand-in HTTP server in a thread;
``running_instance``, a fresh instance to reach over SSH without a kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from flexai_provisioner.client import FlexAIClient
from flexai_provisioner.emulator import Emulator
from flexai_provisioner.gpu_platform import SSHEndpoint, wait_deleted, wait_running
from flexai_provisioner.kernelspecs import kernelspec_dict

LEAK_WAIT = 15.0
POLL = 0.05  # between two tries of a wait: short beside any deadline, light on a loaded machine

T = TypeVar("T")


def until(predicate: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Wait until ``predicate()`` is truthy and return that value; fail the test after
    ``timeout`` seconds, saying it waited for ``what``."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        _fail_after(deadline, what, timeout)
        time.sleep(POLL)
    return result


async def until_async(predicate: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """:func:`until` in a coroutine: the event loop (the provisioner's) runs between tries."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        _fail_after(deadline, what, timeout)
        await asyncio.sleep(POLL)
    return result


def _fail_after(deadline: float, what: str, timeout: float) -> None:
    if time.monotonic() > deadline:
        pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


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


@pytest.fixture(autouse=True)
def private_jupyter_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own ``~/.jupyter`` (and its FlexAI credentials file) never leaks in."""
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "jupyter-config"))


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


class JupyterServer:
    """A ``jupyter server`` (or ``jupyter lab``) subprocess on a free loopback port.

    It serves under ``BASE_URL`` with a random token, its config and root in a private
    directory, and the environment of the test (so the emulator and the kernelspecs).
    """

    BASE_URL = "/jp/"

    def __init__(self, app: str, directory: Path, args: tuple[str, ...], env: dict[str, str]):
        self.directory = directory
        self.root = directory / "root"
        self.root.mkdir(parents=True)
        self.token = secrets.token_hex(16)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}{self.BASE_URL}"
        self.log_path = directory / "server.log"
        cmd = [
            str(Path(sys.executable).with_name("jupyter")),
            app,
            "--allow-root",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.base_url={self.BASE_URL}",
            f"--ServerApp.root_dir={self.root}",
            f"--IdentityProvider.token={self.token}",
            *args,
        ]
        env = {**env, "JUPYTER_CONFIG_DIR": str(directory / "config")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(  # no terminal: SIGINT stops it without asking
                cmd,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"jupyter exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("api/status", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        pytest.fail(f"jupyter did not answer within {timeout:g} s:\n{self.log()}")

    def request(
        self, method: str, path: str, *, token: bool = True, **kwargs: Any
    ) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token:
            headers.setdefault("Authorization", f"token {self.token}")
        kwargs.setdefault("timeout", 120)
        return requests.request(method, self.base + path, headers=headers, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down through the API (which shuts its kernels down); kill if it hangs."""
        if self.proc.poll() is None:
            with contextlib.suppress(requests.RequestException):
                self.post("api/shutdown", timeout=10)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def jupyter_server(
    kernelspecs: Kernelspecs, tmp_path: Path
) -> Iterator[Callable[..., JupyterServer]]:
    """Start a Jupyter server subprocess: ``jupyter_server(*args, app="server", env={})``.

    Every server started is stopped at the end of the test (its kernels shut down first).
    """
    servers: list[JupyterServer] = []

    def start(*args: str, app: str = "server", env: dict[str, str] | None = None) -> JupyterServer:
        server = JupyterServer(
            app, tmp_path / f"jupyter-{len(servers)}", args, {**os.environ, **(env or {})}
        )
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@contextlib.contextmanager
def running_instance(emulator: Emulator, api_key: str, public_key: str) -> Iterator[SSHEndpoint]:
    """A new running instance that accepts ``public_key``: its SSH endpoint; deleted, and
    the deletion confirmed, afterwards."""
    with FlexAIClient(emulator.url, api_key) as client:
        instance = client.provision("A100", ssh_public_key=public_key)
        try:
            instance = wait_running(client, instance.id, timeout=30)
            assert instance.ssh is not None
            yield instance.ssh
        finally:
            client.delete_instance(instance.id)
            wait_deleted(client, instance.id, timeout=30)


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[socketserver.BaseServer]:
    """Serve a stand-in HTTP server in a thread for the block; stop and close it after."""
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def silent_api() -> Iterator[str]:
    """The URL of an "API" that accepts TCP connections and never answers (a hung server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes the handshakes; nobody ever reads
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
