"""``jupyter flexai`` as a real subprocess, against the emulator."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexai_provisioner.cli import build_parser
from flexai_provisioner.client import FlexAIClient
from flexai_provisioner.gpu_platform import Instance, wait_deleted, wait_running
from flexai_provisioner.kernelspecs import kernelspec_dict
from flexai_provisioner.ssh import generate_keypair

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "flexai_provisioner.cli"]
SUBCOMMANDS = ["install", "gpus", "instances", "emulator"]


def flexai(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit status 1, nothing on stdout, and exactly one ``jupyter flexai: error:`` line."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jupyter flexai: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def without_api(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in ("FLEXAI_API_URL", "FLEXAI_API_KEY")}


def columns(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


@pytest.fixture
def env(flexai_env: dict[str, str]) -> dict[str, str]:
    """The whole environment, pointed at the session's emulator by ``flexai_env``."""
    return dict(os.environ)


@pytest.fixture
def closed_port() -> int:
    """A 127.0.0.1 port nobody listens on (it was bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def running_instance(emulator, api_key) -> Iterator[Instance]:
    with FlexAIClient(emulator.url, api_key) as client:
        created = client.provision("A100", ssh_public_key=generate_keypair().public_openssh)
        try:
            yield wait_running(client, created.id, timeout=60)
        finally:
            client.delete_instance(created.id)
            wait_deleted(client, created.id, timeout=60)


# -- help and usage ----------------------------------------------------------------------


def test_help_lists_every_subcommand(env) -> None:
    result = flexai("--help", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: jupyter flexai")
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s", result.stdout, re.MULTILINE), name


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_subcommand_has_help(subcommand: str, env) -> None:
    result = flexai(subcommand, "--help", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: jupyter flexai {subcommand}")


@pytest.mark.parametrize(
    "args",
    [[], ["frobnicate"], ["install", "--user", "--prefix", "x"], ["--log-level", "LOUD", "gpus"]],
    ids=["no-subcommand", "unknown-subcommand", "user-and-prefix", "bad-log-level"],
)
def test_usage_errors_exit_2(args: list[str], env) -> None:
    result = flexai(*args, env=env)
    assert result.returncode == 2
    assert "usage: jupyter flexai" in result.stderr
    assert "Traceback" not in result.stderr


# -- gpus and instances ------------------------------------------------------------------


def test_gpus_prints_the_catalog_as_a_table(env) -> None:
    result = flexai("gpus", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert columns(lines[0]) == ["NAME", "MEMORY", "PRICE/H", "AVAILABLE"]
    rows = {columns(line)[0]: columns(line) for line in lines[1:]}
    assert sorted(rows) == ["A100", "H100", "L4", "L40S"]
    assert rows["A100"] == ["A100", "80 GB", "$1.89", "8"]


def test_global_options_work_before_and_after_the_subcommand(emulator, api_key, env):
    env = without_api(env)
    options = ["--api-url", emulator.url, "--api-key", api_key]
    before = flexai(*options, "gpus", env=env)
    after = flexai("gpus", *options, env=env)
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert before.stdout == after.stdout
    assert "A100" in before.stdout


def test_debug_logging_goes_to_stderr_only(env) -> None:
    quiet = flexai("gpus", env=env)
    loud = flexai("--log-level", "debug", "gpus", env=env)
    assert loud.returncode == 0, loud.stderr
    assert loud.stdout == quiet.stdout
    assert "DEBUG" in loud.stderr


def test_instances_lists_what_the_api_lists(emulator, api_key, env) -> None:
    with FlexAIClient(emulator.url, api_key) as client:
        expected = sorted(i.id for i in client.list_instances())
    table = flexai("instances", env=env)
    listed = flexai("instances", "--json", env=env)
    assert table.returncode == listed.returncode == 0, (table.stderr, listed.stderr)
    assert sorted(columns(line)[0] for line in table.stdout.splitlines()[1:]) == expected
    assert sorted(i["id"] for i in json.loads(listed.stdout)) == expected


def test_instances_lists_a_running_instance(running_instance: Instance, env) -> None:
    ssh = running_instance.ssh
    assert ssh is not None
    result = flexai("instances", env=env)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert columns(header) == [
        "ID", "STATE", "GPU", "COUNT", "CREATED", "SSH", "PRICE/H", "COST", "PARKED"
    ]  # fmt: skip
    (row,) = [columns(r) for r in rows if r.startswith(running_instance.id + " ")]
    id_, state, gpu, count, created, endpoint, price, cost, parked = row
    assert (id_, state, gpu, count) == (running_instance.id, "running", "A100", "1")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", created)
    assert endpoint == f"{ssh.user}@{ssh.host}:{ssh.port}"
    assert price == "$1.89" and re.fullmatch(r"\$\d+\.\d{4}", cost)
    assert parked == "-"


def test_instances_json_carries_the_instance_fields(running_instance: Instance, env):
    result = flexai("instances", "--json", env=env)
    assert result.returncode == 0, result.stderr
    (listed,) = [i for i in json.loads(result.stdout) if i["id"] == running_instance.id]
    assert listed["id"] == running_instance.id
    assert listed["state"] == "running"
    assert listed["gpu_type"] == "A100"
    assert listed["gpu_count"] == 1
    assert listed["price_per_hour"] == pytest.approx(1.89)
    assert listed["labels"] == {}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", listed["created_at"])
    assert listed["ssh"]["port"] == running_instance.ssh.port
    assert listed["parked"] is None


# -- install -----------------------------------------------------------------------------


def installed_spec(prefix: Path, name: str) -> dict:
    return json.loads((prefix / "share/jupyter/kernels" / name / "kernel.json").read_text())


def test_install_without_gpu_installs_every_offered_type(tmp_path: Path, env) -> None:
    prefix = tmp_path / "prefix"
    result = flexai("install", "--prefix", str(prefix), env=env)
    assert result.returncode == 0, result.stderr
    rows = [columns(line) for line in result.stdout.splitlines()]
    kernels = prefix / "share" / "jupyter" / "kernels"
    assert sorted(rows) == sorted(
        [f"flexai-{t.lower()}", f"FlexAI {t}", str(kernels / f"flexai-{t.lower()}")]
        for t in ("A100", "H100", "L40S", "L4")
    )
    for gpu_type in ("A100", "H100", "L40S", "L4"):
        assert installed_spec(prefix, f"flexai-{gpu_type.lower()}") == kernelspec_dict(gpu_type)


def test_install_gpu_takes_the_platform_spelling(tmp_path: Path, env) -> None:
    result = flexai("install", "--gpu", "l40s", "--prefix", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert columns(result.stdout)[:2] == ["flexai-l40s", "FlexAI L40S"]
    assert installed_spec(tmp_path, "flexai-l40s") == kernelspec_dict("L40S")


def test_install_gpu_needs_no_api(tmp_path: Path, env) -> None:
    result = flexai(
        "install", "--gpu", "B200", "--gpu", "A100", "--prefix", str(tmp_path),
        env=without_api(env),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [columns(line)[0] for line in result.stdout.splitlines()] == [
        "flexai-b200",
        "flexai-a100",
    ]
    assert installed_spec(tmp_path, "flexai-b200") == kernelspec_dict("B200")


def test_install_gpu_with_an_unreachable_api_installs_unchecked(
    tmp_path: Path, env, closed_port: int
) -> None:
    env = {**env, "FLEXAI_API_URL": f"http://127.0.0.1:{closed_port}"}
    result = flexai("install", "--gpu", "A100", "--prefix", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert "installing unchecked" in result.stderr
    assert installed_spec(tmp_path, "flexai-a100") == kernelspec_dict("A100")


def test_install_sys_prefix_means_this_pythons_prefix() -> None:
    args = build_parser().parse_args(["install", "--sys-prefix"])
    assert (args.prefix, args.user) == (sys.prefix, False)


# -- every bad input is one line and exit status 1 ---------------------------------------


def test_unknown_gpu_type_is_rejected_and_nothing_installed(tmp_path: Path, env):
    prefix = tmp_path / "prefix"
    result = flexai("install", "--gpu", "A100", "--gpu", "B200", "--prefix", str(prefix),
                    env=env)  # fmt: skip
    assert_one_line_error(result, "B200", "A100, H100, L40S, L4")
    assert not prefix.exists()


def test_malformed_gpu_type_is_rejected(tmp_path: Path, env) -> None:
    result = flexai("install", "--gpu", "../a100", "--prefix", str(tmp_path), env=env)
    assert_one_line_error(result, "invalid GPU type '../a100'")


@pytest.mark.parametrize("args", [["gpus"], ["instances"], ["instances", "--json"], ["install"]])
def test_unreachable_api(args: list[str], env, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    env = {**env, "FLEXAI_API_URL": url}
    assert_one_line_error(flexai(*args, env=env), "cannot reach", url)


@pytest.mark.parametrize("args", [["gpus"], ["instances"], ["install"]])
def test_wrong_api_key(args: list[str], env) -> None:
    env = {**env, "FLEXAI_API_KEY": "wrong-key-0123"}
    line = assert_one_line_error(flexai(*args, env=env), "rejected the API key")
    assert "wrong-key-0123" not in line


@pytest.mark.parametrize("missing", ["FLEXAI_API_URL", "FLEXAI_API_KEY"])
def test_missing_configuration(missing: str, env) -> None:
    env = {k: v for k, v in env.items() if k != missing}
    assert_one_line_error(flexai("gpus", env=env), missing)


def test_bad_api_url(env) -> None:
    result = flexai("--api-url", "ftp://example.com", "gpus", env=env)
    assert_one_line_error(result, "not an http(s) URL")


def test_unwritable_prefix(tmp_path: Path, env) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = flexai("install", "--gpu", "A100", "--prefix", str(blocker), env=env)
    assert_one_line_error(result, "cannot install kernelspec flexai-a100")


# -- emulator ----------------------------------------------------------------------------


@pytest.mark.parametrize("key_first", [False, True], ids=["own-api-key", "global-api-key"])
def test_emulator_subcommand_serves_until_sigterm(key_first: bool, env) -> None:
    key = "cli-test-key"
    args = ["--api-key", key, "emulator", "--port", "0"]
    if not key_first:
        args = ["emulator", "--port", "0", "--api-key", key]
    proc = subprocess.Popen(
        [*CLI, *args],
        env=without_api(env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = None
        deadline = time.monotonic() + 60
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while url is None and time.monotonic() < deadline and proc.poll() is None:
                if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    line = proc.stdout.readline()
                    found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
                    url = found and found.group(1)
        assert url, "the emulator never said where it listens"
        options = ["--api-url", url, "--api-key", key]
        gpus = flexai(*options, "gpus", env=without_api(env))
        assert gpus.returncode == 0, gpus.stderr
        assert "A100" in gpus.stdout
        table = flexai(*options, "instances", env=without_api(env))
        header = "ID  STATE  GPU  COUNT  CREATED  SSH  PRICE/H  COST  PARKED"
        assert table.stdout.splitlines() == [header]
        listed = flexai(*options, "instances", "--json", env=without_api(env))
        assert json.loads(listed.stdout) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        proc.stdout.close()
    assert status == 0
