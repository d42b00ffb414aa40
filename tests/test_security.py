"""Issue 6: nobody else reaches the kernel, no secret leaks, every bad input gets a clear error.

One section per item of the issue; docs/security.md maps each protection to the test that
proves it. Everything is real: the emulator's HTTP API, sshd instances, ipykernel, paramiko.
The emulator's own 401/404/400 answers are tested case by case in test_emulator.py; here its
published OpenAPI document drives a fuzzer.

Every test runs with a private ``HOME`` and ``JUPYTER_CONFIG_DIR``, so what they check about
``~/.ssh`` and the credentials file is about directories nothing else touches.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import http.server
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from conftest import serving, until
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, settings
from jupyter_client.manager import AsyncKernelManager
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from traitlets import TraitError

import flexai_provisioner.emulator as emulator_package
from flexai_provisioner import exit_cleanup
from flexai_provisioner.client import FlexAIClient
from flexai_provisioner.deletion import OwedDeletion
from flexai_provisioner.emulator import Emulator
from flexai_provisioner.emulator.api import ROUTES
from flexai_provisioner.errors import (
    ConfigurationError,
    HostKeyMismatchError,
    PlatformError,
    PlatformUnreachableError,
    SSHError,
    UnknownGPUTypeError,
)
from flexai_provisioner.gpu_platform import InstanceState

JUPYTER_FLEXAI = str(Path(sys.executable).with_name("jupyter-flexai"))
PASSPHRASE = "correct horse battery staple"


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME and Jupyter config dir: ~/.ssh and the credentials file start absent."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "jupyter-config"))
    return home


@contextlib.asynccontextmanager
async def kernel(name: str, **kwargs: Any) -> AsyncIterator[tuple[AsyncKernelManager, Any]]:
    """Start kernel ``name``, yield its manager and a ready client, shut both down."""
    km = AsyncKernelManager(kernel_name=name, **kwargs)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def run(kc: Any, code: str) -> str:
    """Execute ``code`` in the kernel and return what it printed."""
    out: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = await kc.execute_interactive(code, output_hook=hook, timeout=30)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(out)


def mode(path: str | os.PathLike[str]) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def public_line(private_pem: bytes, password: bytes | None = None) -> str:
    """``<type> <base64>`` of an OpenSSH private key's public half."""
    key = serialization.load_ssh_private_key(private_pem, password)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def authorized_keys(emulator: Emulator, instance_id: str) -> list[str]:
    """``<type> <base64>`` of each key the instance's sshd accepts (its AuthorizedKeysFile)."""
    (path,) = emulator.state_dir.glob(f"{instance_id}-*/authorized_keys")
    return [" ".join(line.split()[:2]) for line in path.read_text().splitlines() if line]


def write_encrypted_key(path: Path) -> bytes:
    """An ed25519 key encrypted with PASSPHRASE at ``path`` (0600), its public half at .pub."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.BestAvailableEncryption(PASSPHRASE.encode()),
    )
    path.touch(mode=0o600)
    path.write_bytes(pem)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.with_name(path.name + ".pub").write_bytes(public + b" user@laptop\n")
    return pem


def private_key_forms(pem: bytes) -> dict[str, str]:
    """Every form a leaked private key would likely take: its PEM lines, raw bytes in hex/base64."""
    forms = {
        f"PEM line {i}": line
        for i, line in enumerate(pem.decode().splitlines())
        if line and not line.startswith("-----")
    }
    raw = serialization.load_ssh_private_key(pem, None).private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return {**forms, "raw hex": raw.hex(), "raw base64": base64.b64encode(raw).decode()}


@contextlib.contextmanager
def debug_log(path: Path) -> Iterator[None]:
    """Every logger at DEBUG, written to ``path`` (those that do not propagate included)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    loggers = [root] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    levels = {lg: lg.level for lg in loggers}
    targets = [root] + [lg for lg in loggers if not lg.propagate]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    for lg in targets:
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg in targets:
            lg.removeHandler(handler)
        for lg, level in levels.items():
            lg.setLevel(level)
        handler.close()


def files_holding(root: Path, secret: str) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # a file removed meanwhile holds nothing
            if path.is_file() and secret.encode() in path.read_bytes():
                found.append(path)
    return found


def one_line_error(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


class Recorder(http.server.ThreadingHTTPServer):
    """A stand-in for the API on 127.0.0.1 that records each request and answers ``body``."""

    daemon_threads = True

    def __init__(self, body: bytes, content_type: str, port: int = 0):
        self.body, self.content_type = body, content_type
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", port), _RecorderHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RecorderHandler(http.server.BaseHTTPRequestHandler):
    server: Recorder

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(f"{self.command} {self.path}")
        self.send_response(200)
        self.send_header("Content-Type", self.server.content_type)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the requests are in ``server.requests``."""


@contextlib.contextmanager
def recorder(
    body: bytes, content_type: str = "application/json", port: int = 0
) -> Iterator[Recorder]:
    with serving(Recorder(body, content_type, port)) as server:
        yield server


def settle_owed_deletions(api: Recorder) -> None:
    """A start that ``api`` failed cannot know whether it created an instance, so its
    deletion is owed: retried while the process runs, and once more as it exits. Let ``api``
    answer that the request created none and wait for the retry to settle it, so that the
    test process does not end owing deletions to a stand-in long stopped."""

    def owed() -> list[OwedDeletion]:
        return [
            o
            for o in exit_cleanup.owned()
            if isinstance(o, OwedDeletion) and o.platform.api_url == api.url
        ]

    assert owed(), "the failed start's deletion is owed, not forgotten"
    api.body, api.content_type = b'{"instances": []}', "application/json"
    until(lambda: not owed(), "the owed deletion to be retried and settled", 30)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 1. host keys --------------------------------------------------------------------------------


async def test_host_key_mismatch_aborts_deletes_and_trusts_nothing(
    emulator, kernelspecs, flexai_env, api_key, private_home
):
    emulator.update_faults(wrong_host_key=True)
    km = AsyncKernelManager(kernel_name="flexai-a100")
    with pytest.raises(HostKeyMismatchError) as info:
        await km.start_kernel()
    message = one_line_error(info.value)
    assert re.search(r"host key of .* is SHA256:\S+ but the platform reported SHA256:\S+", message)
    # The instance did exist (it was running), and is now deleted, not merely forgotten.
    ledger = Path(flexai_env["JUPYTER_DATA_DIR"], "flexai", "ledger.sqlite3")
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        rows = db.execute("SELECT instance_id, deleted_at FROM instances").fetchall()
    assert len(rows) == 1 and rows[0][0] and rows[0][1], rows
    with FlexAIClient(emulator.url, api_key) as client:
        assert client.get_instance(rows[0][0]).state is InstanceState.DELETED
    assert not (private_home / ".ssh").exists(), "nothing may be written to ~/.ssh"


# -- 2. keys -------------------------------------------------------------------------------------


async def test_each_kernel_has_its_own_private_key_authorised_alone_and_removed(
    emulator, kernelspecs, flexai_env, private_home
):
    runtime = Path(flexai_env["JUPYTER_RUNTIME_DIR"])
    async with contextlib.AsyncExitStack() as stack:
        kernels = [await stack.enter_async_context(kernel("flexai-a100")) for _ in range(2)]
        key_files = [runtime / f"flexai-{km.kernel_id}.key" for km, _ in kernels]
        assert sorted(runtime.glob("flexai-*.key")) == sorted(key_files)
        publics = []
        for (km, _), key_file in zip(kernels, key_files, strict=True):
            assert mode(key_file) == 0o600
            pem = key_file.read_bytes()
            assert isinstance(
                serialization.load_ssh_private_key(pem, None), ed25519.Ed25519PrivateKey
            )
            publics.append(public_line(pem))
            assert authorized_keys(emulator, km.provisioner.instance_id) == [publics[-1]]
        assert publics[0] != publics[1], "every kernel gets a fresh key"
    assert not any(key_file.exists() for key_file in key_files), "removed at shutdown"
    assert not (private_home / ".ssh").exists(), "no known_hosts, no trust on first use"


async def test_a_runtime_dir_made_for_key_files_is_private(emulator, kernelspecs, flexai_env):
    """Headless (nbclient, jupyter execute), the provisioner may be first to make the dir."""
    runtime = Path(flexai_env["JUPYTER_RUNTIME_DIR"])
    assert not runtime.exists()
    async with kernel("flexai-a100"):
        assert mode(runtime) == 0o700


async def test_a_users_own_key_with_a_passphrase_is_used_and_never_copied(
    emulator, kernelspecs, flexai_env, tmp_path
):
    key_path = tmp_path / "id_ed25519"
    pem = write_encrypted_key(key_path)
    kernelspecs.add(
        "flexai-own-key", {"ssh_key_file": str(key_path), "ssh_key_passphrase": PASSPHRASE}
    )
    async with kernel("flexai-own-key") as (km, kc):
        assert await run(kc, "print(6 * 7)") == "42\n"
        expected = public_line(pem, PASSPHRASE.encode())
        assert authorized_keys(emulator, km.provisioner.instance_id) == [expected]
        assert not list(Path(flexai_env["JUPYTER_RUNTIME_DIR"]).glob("flexai-*.key"))
    assert key_path.read_bytes() == pem


@pytest.mark.parametrize(
    ("passphrase", "says"),
    [
        (None, r"is encrypted: set c\.FlexAIProvisioner\.ssh_key_passphrase"),
        ("wrong", "passphrase"),
    ],
    ids=["no-passphrase", "wrong-passphrase"],
)
async def test_an_encrypted_key_without_its_passphrase_is_a_clear_error(
    emulator, kernelspecs, tmp_path, monkeypatch, passphrase, says
):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # no agent to fall back on
    key_path = tmp_path / "id_ed25519"
    write_encrypted_key(key_path)
    config = {"ssh_key_file": str(key_path), "ssh_key_passphrase": passphrase or ""}
    kernelspecs.add("flexai-locked-key", config)
    started = time.monotonic()
    with pytest.raises(SSHError) as info:
        await AsyncKernelManager(kernel_name="flexai-locked-key").start_kernel()
    message = one_line_error(info.value)
    assert str(key_path) in message and re.search(says, message), message
    assert time.monotonic() - started < 10
    assert emulator.live_instances() == []


@pytest.fixture
def ssh_agent(tmp_path: Path) -> Iterator[str]:
    """A private ssh-agent; yields its socket path (also set as SSH_AUTH_SOCK by the test)."""
    if shutil.which("ssh-agent") is None:
        pytest.skip("ssh-agent is not installed (Debian: openssh-client)")
    sock = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
    try:
        until(lambda: os.path.exists(sock) or agent.poll() is not None, "ssh-agent to start", 10)
        assert agent.poll() is None, "ssh-agent exited"
        yield sock
    finally:
        agent.terminate()
        agent.wait(10)


async def test_an_encrypted_key_held_by_ssh_agent_needs_no_passphrase(
    emulator, kernelspecs, tmp_path, ssh_agent, monkeypatch
):
    key_path = tmp_path / "id_ed25519"
    pem = write_encrypted_key(key_path)
    # ssh-add would ask for the passphrase; adding a decrypted copy loads the same key.
    plain = tmp_path / "plain"
    plain.touch(mode=0o600)
    plain.write_bytes(
        serialization.load_ssh_private_key(pem, PASSPHRASE.encode()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    env = {**os.environ, "SSH_AUTH_SOCK": ssh_agent}
    subprocess.run(["ssh-add", "-q", str(plain)], env=env, check=True, timeout=10)
    plain.unlink()
    monkeypatch.setenv("SSH_AUTH_SOCK", ssh_agent)
    kernelspecs.add("flexai-agent-key", {"ssh_key_file": str(key_path)})
    async with kernel("flexai-agent-key") as (km, kc):
        assert await run(kc, "print(6 * 7)") == "42\n"
        expected = public_line(pem, PASSPHRASE.encode())
        assert authorized_keys(emulator, km.provisioner.instance_id) == [expected]


# -- 3. exposure ---------------------------------------------------------------------------------


def listening_sockets() -> Iterator[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """``(inode, address, port)`` of every listening TCP socket of this network namespace."""
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            if sys.byteorder == "little":  # /proc prints each 32-bit word in host order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            yield int(fields[9]), ipaddress.ip_address(raw), int(port, 16)


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


async def test_a_running_kernel_listens_on_loopback_only(emulator, kernelspecs, api_key):
    async with kernel("flexai-a100") as (km, _):
        info = (await km.provisioner.get_provisioner_info())["flexai"]
        with FlexAIClient(emulator.url, api_key) as client:
            ssh = client.get_instance(info["instance_id"]).ssh
        assert ssh is not None
        ours = {
            "the remote kernel's ports": set(info["kernel"]["ports"].values()),
            "the local forwards": {getattr(km, name) for name in info["kernel"]["ports"]},
            "the emulator's API": {emulator.port},
            "the instance's sshd": {ssh.port},
        }
        listening = list(listening_sockets())
        for what, ports in ours.items():
            for port in ports:
                addresses = {address for _, address, p in listening if p == port}
                assert addresses, f"{what}: nothing listens on {port}"
                assert all(a.is_loopback for a in addresses), f"{what}: {port} on {addresses}"
        # Not only the known ports: no socket of any process involved listens beyond loopback.
        pids = [os.getpid(), *emulator.processes()]
        assert info["kernel"]["pid"] in pids
        inodes = set().union(*(socket_inodes(pid) for pid in pids))
        exposed = [(a, p) for inode, a, p in listening if inode in inodes and not a.is_loopback]
        assert exposed == []
        assert len([i for i, _, _ in listening if i in inodes]) >= 12


# -- 4. secrets ----------------------------------------------------------------------------------


async def test_connection_files_are_private_here_and_on_the_instance(emulator, kernelspecs):
    async with kernel("flexai-a100") as (km, kc):
        assert mode(km.connection_file) == 0o600
        remote = json.loads(
            await run(
                kc,
                "import json, os\n"
                "from ipykernel.connect import get_connection_file\n"
                "f = get_connection_file()\n"
                "print(json.dumps([os.stat(f).st_mode & 0o777,"
                " os.stat(os.path.dirname(f)).st_mode & 0o777]))",
            )
        )
        assert remote == [0o600, 0o700]


async def test_secrets_never_reach_logs_files_or_the_instance(
    emulator, kernelspecs, flexai_env, api_key, tmp_path
):
    runtime, data = Path(flexai_env["JUPYTER_RUNTIME_DIR"]), Path(flexai_env["JUPYTER_DATA_DIR"])
    log_file = tmp_path / "debug.log"
    with debug_log(log_file):
        async with kernel("flexai-a100", log=logging.getLogger("jupyter")) as (km, kc):
            hmac_key = km.session.key.decode()
            pem = (runtime / f"flexai-{km.kernel_id}.key").read_bytes()
            connection_file = Path(km.connection_file).read_text()
            # What a server persists to reattach: it holds the connection info (HMAC key
            # included, as the connection file does), nothing more secret.
            provisioner_info = repr(await km.provisioner.get_provisioner_info())
            remote_env = json.loads(
                await run(kc, "import json, os; print(json.dumps({**os.environ}))")
            )
    log = log_file.read_text()
    assert "flexai_provisioner" in log and " DEBUG " in log, "the log must be a debug log"
    assert km.kernel_id in log and "FlexAI kernel" in log
    secret = {"the API key": api_key, "the HMAC key": hmac_key, **private_key_forms(pem)}
    for what, value in secret.items():
        assert value not in log, f"{what} is in the debug log"
        if what != "the HMAC key":
            assert value not in provisioner_info, f"{what} is in the persisted provisioner info"
    assert api_key not in connection_file
    # The API key stays on this machine: not in the kernel's environment on the instance.
    assert "FLEXAI_API_KEY" not in remote_env and api_key not in json.dumps(remote_env)
    ledger = data / "flexai" / "ledger.sqlite3"
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        assert api_key not in "\n".join(db.iterdump())
    # Kernelspecs installed with the key in the environment do not hold it either.
    subprocess.run(
        [JUPYTER_FLEXAI, "install", "--prefix", str(tmp_path / "prefix")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert list((tmp_path / "prefix").rglob("kernel.json"))
    assert files_holding(tmp_path, api_key) == []
    assert files_holding(emulator.state_dir, api_key) == []


def test_the_api_key_can_live_in_a_private_credentials_file(
    emulator, api_key, tmp_path, monkeypatch
):
    monkeypatch.delenv("FLEXAI_API_URL", raising=False)
    monkeypatch.delenv("FLEXAI_API_KEY", raising=False)
    credentials = tmp_path / "jupyter-config" / "flexai" / "credentials.json"
    credentials.parent.mkdir(parents=True)
    credentials.touch(mode=0o600)
    credentials.write_text(json.dumps({"api_url": emulator.url, "api_key": api_key}))
    with FlexAIClient() as client:
        assert client.api_url == emulator.url
        assert "A100" in {t.name for t in client.list_gpu_types()}
    # The environment wins over the file, an argument over both.
    credentials.write_text(json.dumps({"api_url": emulator.url, "api_key": "stale-key"}))
    monkeypatch.setenv("FLEXAI_API_KEY", api_key)
    with FlexAIClient() as client:
        client.list_gpu_types()
    monkeypatch.setenv("FLEXAI_API_KEY", "wrong-key")
    with FlexAIClient(api_key=api_key) as client:
        client.list_gpu_types()


@pytest.mark.parametrize(
    ("file_mode", "content", "says"),
    [
        (0o644, None, r"accessible by other users \(mode 0644\): run `chmod 600 "),
        (0o640, None, r"accessible by other users \(mode 0640\)"),
        (0o600, b"api_key = sk-in-toml", "must be a JSON object"),
        (0o600, b'{"api_key": 12345}', "must be a JSON object"),
        (0o600, b'{"api_key": "sk-x", "token": "sk-y"}', "must be a JSON object"),
    ],
    ids=["world-readable", "group-readable", "not-json", "not-a-string", "unknown-field"],
)
def test_an_unsafe_or_broken_credentials_file_is_refused(
    api_key, tmp_path, monkeypatch, file_mode, content, says
):
    monkeypatch.delenv("FLEXAI_API_KEY", raising=False)
    credentials = tmp_path / "jupyter-config" / "flexai" / "credentials.json"
    credentials.parent.mkdir(parents=True)
    credentials.write_bytes(content or json.dumps({"api_key": api_key}).encode())
    credentials.chmod(file_mode)
    with pytest.raises(ConfigurationError) as info:
        FlexAIClient("https://api.example.com")
    message = one_line_error(info.value)
    assert str(credentials) in message and re.search(says, message), message
    assert api_key not in message and "sk-" not in message, "an error never shows the file"


async def test_a_kernel_starts_with_the_key_only_in_the_credentials_file(
    emulator, kernelspecs, flexai_env, monkeypatch, tmp_path
):
    monkeypatch.delenv("FLEXAI_API_KEY")
    credentials = tmp_path / "jupyter-config" / "flexai" / "credentials.json"
    credentials.parent.mkdir(parents=True)
    credentials.touch(mode=0o600)
    credentials.write_text(json.dumps({"api_key": flexai_env["FLEXAI_API_KEY"]}))
    async with kernel("flexai-a100") as (_, kc):
        assert await run(kc, "print('ok')") == "ok\n"


# -- 5. the emulator's API, fuzzed from its OpenAPI document ------------------------------------

OPENAPI = Path(emulator_package.__file__).with_name("openapi.json")
FUZZ_KEY = "fuzz-key-" + secrets.token_hex(8)
FUZZ_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=True,  # the same cases on every run, so CI is repeatable
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,  # invalid input gets a 4xx
    ignored_auth,  # the same request without the token gets a 401
]
# PUT /_emulator/faults injects 500s and latency on purpose; its validation is in test_emulator.
schema = schemathesis.openapi.from_path(
    OPENAPI,
    config=schemathesis.Config.from_dict({"auth": {"openapi": {"bearer": {"bearer": FUZZ_KEY}}}}),
).exclude(method="PUT", path="/_emulator/faults")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """An emulator of its own (the fuzzer's key is fixed when this module is imported).

    Ends by checking that it still answers and that nothing the fuzz created is left.
    """
    with Emulator(api_keys=[FUZZ_KEY], state_dir=tmp_path_factory.mktemp("fuzzed")) as emu:
        yield emu
        answer = requests.get(
            emu.url + "/v1/gpu-types", headers={"Authorization": f"Bearer {FUZZ_KEY}"}, timeout=10
        )
        assert answer.status_code == 200, "the emulator must survive the fuzz"
        assert emu.live_instances() == [] and emu.processes() == []


def test_the_emulator_publishes_its_openapi_document_without_auth(emulator):
    answer = requests.get(emulator.url + "/openapi.json", timeout=10)
    assert answer.status_code == 200
    assert answer.json() == json.loads(OPENAPI.read_text())
    assert answer.headers["Content-Type"] == "application/json"


def test_the_openapi_document_covers_every_route():
    documented = {
        (method.upper(), path)
        for path, item in json.loads(OPENAPI.read_text())["paths"].items()
        for method in item
    }
    served = {
        (method, re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern))
        for method, pattern, _ in ROUTES
    }
    assert documented - {("GET", "/openapi.json")} == served


@schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_every_operation(case, fuzzed):
    """Valid and invalid requests alike: no 500, answers as documented, no stray instance."""
    before = set(fuzzed.live_instances())
    try:
        response = case.call(base_url=fuzzed.url, timeout=10)
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:
            assert set(fuzzed.live_instances()) <= before, "a rejected request made an instance"
    finally:
        fuzzed.delete_all()


def test_fuzz_instance_workflows():
    """Provision, then follow the document's links (get, stop, heartbeat, delete) at random.

    Each scenario runs on a platform of its own. Hypothesis builds a new scenario by replaying
    the steps of earlier ones, and the same steps must meet the same answers: on one shared
    emulator a replayed provision met the Idempotency-Key its first run had recorded (kept
    past the instance's deletion) and was answered 200, not 201, so the links that followed
    differed and Hypothesis stopped with FlakyStrategyDefinition.
    """
    answered: collections.Counter[tuple[str, int]] = collections.Counter()

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        emulator: Emulator
        live: set[str] = set()

        def setup(self) -> None:
            self.emulator = Emulator(api_keys=[FUZZ_KEY]).start()

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": self.emulator.url, "timeout": 10}

        def before_call(self, case: Any) -> None:
            self.live = set(self.emulator.live_instances())

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            answered[(case.operation.label, response.status_code)] += 1
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)
            if response.status_code >= 400:
                live = set(self.emulator.live_instances())
                assert live <= self.live, "a rejected request made one"

        def teardown(self) -> None:
            try:
                answer = requests.get(
                    self.emulator.url + "/v1/gpu-types",
                    headers={"Authorization": f"Bearer {FUZZ_KEY}"},
                    timeout=10,
                )
                assert answer.status_code == 200, "the emulator must survive the scenario"
                self.emulator.delete_all()
                assert self.emulator.processes() == [], "deleted instances left processes"
            finally:
                self.emulator.stop()

    # 40, not 15: the cases drawn differ with the tests run before in the same process, and
    # after the rest of this file none of the first 15 reached an instance.
    Workflow.run(settings=settings(FUZZ_SETTINGS, max_examples=40, stateful_step_count=6))
    # Some link reached a real instance.
    reached = {label for (label, status) in answered if status == 200 and "{id}" in label}
    assert reached, answered


# -- 6. bad input everywhere else ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "error", "says"),
    [
        ({"gpu_count": 0}, ConfigurationError, r"gpu_count must be an integer from 1 to 8, not 0"),
        ({"gpu_count": 10000}, ConfigurationError, r"from 1 to 8, not 10000"),
        ({"gpu_count": True}, ConfigurationError, r"from 1 to 8, not True"),
        ({"gpu_cuont": 2}, ConfigurationError, r"unknown key 'gpu_cuont'.*mean 'gpu_count'"),
        ({"gpu_count": "two"}, TraitError, r"'gpu_count' trait .* expected an int"),
        ({"provision_timeout": -1}, ConfigurationError, r"provision_timeout must be .* > 0"),
        ({"labels": ["team"]}, TraitError, r"'labels' trait .* expected a dict"),
        ({"api_key": "sk-pasted"}, ConfigurationError, r"holds api_key in its kernel\.json"),
    ],
    ids=[
        "gpu-count-0",
        "gpu-count-10000",
        "gpu-count-bool",
        "unknown-key",
        "wrong-type",
        "bad-timeout",
        "wrong-type-labels",
        "api-key-in-kernelspec",
    ],
)
@pytest.mark.filterwarnings("ignore:Passing unrecognized arguments:DeprecationWarning")
async def test_a_broken_kernelspec_is_refused_before_any_request(
    emulator, kernelspecs, monkeypatch, config, error, says
):
    kernelspecs.add("flexai-broken", config)
    with recorder(b"{}") as api:
        monkeypatch.setenv("FLEXAI_API_URL", api.url)
        km = AsyncKernelManager(kernel_name="flexai-broken")
        with pytest.raises(error) as info:
            await km.start_kernel()
        assert api.requests == [], "refused before anything was requested"
    message = one_line_error(info.value)
    assert re.search(says, message), message
    assert "sk-pasted" not in message
    assert not km.has_kernel


Setup = Callable[[pytest.MonkeyPatch, Emulator], contextlib.AbstractContextManager[object]]


@contextlib.contextmanager
def the_emulator(monkeypatch: pytest.MonkeyPatch, emulator: Emulator) -> Iterator[None]:
    yield


@contextlib.contextmanager
def unreachable(monkeypatch: pytest.MonkeyPatch, emulator: Emulator) -> Iterator[None]:
    port = closed_port()
    monkeypatch.setenv("FLEXAI_API_URL", f"http://127.0.0.1:{port}")
    yield
    with recorder(b"{}", port=port) as api:  # the API is back
        settle_owed_deletions(api)


@contextlib.contextmanager
def plain_http_remote(monkeypatch: pytest.MonkeyPatch, emulator: Emulator) -> Iterator[None]:
    # .invalid never resolves (RFC 6761): even a broken check could not reach anyone.
    monkeypatch.setenv("FLEXAI_API_URL", "http://api.flexai.invalid")
    yield


@contextlib.contextmanager
def banner_hang(monkeypatch: pytest.MonkeyPatch, emulator: Emulator) -> Iterator[None]:
    emulator.update_faults(banner_hang=True)
    yield


def answering(body: bytes, content_type: str) -> Setup:
    @contextlib.contextmanager
    def setup(monkeypatch: pytest.MonkeyPatch, emulator: Emulator) -> Iterator[None]:
        with recorder(body, content_type) as api:
            monkeypatch.setenv("FLEXAI_API_URL", api.url)
            yield
            settle_owed_deletions(api)

    return setup


@pytest.mark.parametrize(
    ("setup", "config", "error", "says", "within"),
    [
        (
            the_emulator,
            {"gpu_type": "Z999"},
            UnknownGPUTypeError,
            r"'Z999' is not offered.*offered GPU types: A100, H100",
            5,
        ),
        (
            unreachable,
            {},
            PlatformUnreachableError,
            r"cannot reach the FlexAI API at http://127\.0\.0\.1:\d+ \(Connection refused",
            30,
        ),
        (
            plain_http_remote,
            {},
            ConfigurationError,
            r"would send the API key unencrypted: use https",
            5,
        ),
        (
            answering(b"<html><body>Welcome to nginx!</body></html>", "text/html"),
            {},
            PlatformError,
            r"with HTTP 200 but not JSON \(text/html: .*is FLEXAI_API_URL the FlexAI API\?",
            5,
        ),
        (
            answering(b'{"id": 42, "state": "running"}', "application/json"),
            {},
            PlatformError,
            r"JSON that is not the FlexAI API's",
            5,
        ),
        pytest.param(
            banner_hang,
            {"ssh_connect_timeout": 1.0},
            SSHError,
            r"SSH server at \S+:\d+ did not complete the handshake within 1 s",
            10,
        ),
    ],
    ids=[
        "unknown-gpu-type",
        "unreachable-api",
        "http-to-remote-host",
        "garbage-html",
        "garbage-json",
        "ssh-banner-hang",
    ],
)
async def test_a_bad_platform_fails_fast_with_one_clear_line(
    emulator, kernelspecs, monkeypatch, setup, config, error, says, within
):
    kernelspecs.add("flexai-bad", config)
    started = time.monotonic()
    with setup(monkeypatch, emulator):
        km = AsyncKernelManager(kernel_name="flexai-bad")
        with pytest.raises(error) as info:
            await asyncio.wait_for(km.start_kernel(), timeout=within + 30)
        elapsed = time.monotonic() - started
    message = one_line_error(info.value)
    assert re.search(says, message), message
    assert elapsed < within, f"took {elapsed:.1f}s"
    assert emulator.live_instances() == []
    assert not km.has_kernel
