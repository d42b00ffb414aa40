"""scripts/system-deps decides what to install, and how, without installing anything.

Each test runs the real script with a PATH of its own: the few real tools the script uses,
plus stand-ins for ``apt-get``, ``sudo`` and ``id`` that record how they were called.
``SYSTEM_DEPS_ROOT`` puts ``/usr/sbin`` (where sshd and policy-rc.d live) in a tmp dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "system-deps"
REAL_TOOLS = ("bash", "env", "tee", "chmod", "rm", "mktemp", "printf")

# The stand-in apt-get "installs" openssh-server by creating $ROOT/usr/sbin/sshd, and notes
# what the policy-rc.d said at that moment (exit 101: services must not start).
APT_GET = """#!/bin/bash
echo "apt-get $*" >> "$CALLS"
if [[ " $* " == *" install "* ]]; then
    if [[ -x $SYSTEM_DEPS_ROOT/usr/sbin/policy-rc.d ]]; then
        "$SYSTEM_DEPS_ROOT/usr/sbin/policy-rc.d"; echo "policy-rc.d exit $?" >> "$CALLS"
    else
        echo "no policy-rc.d" >> "$CALLS"
    fi
    echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> "$CALLS"
    if [[ " $* " == *" openssh-server "* ]]; then
        printf '#!/bin/sh\\n' > "$SYSTEM_DEPS_ROOT/usr/sbin/sshd"
        chmod +x "$SYSTEM_DEPS_ROOT/usr/sbin/sshd"
    fi
fi
exit 0
"""
SUDO = """#!/bin/bash
echo "sudo $1" >> "$CALLS"
exec "$@"
"""


class Machine:
    """A stand-in system: its PATH directory, its / and the log of stand-in calls."""

    def __init__(self, tmp_path: Path, *, uid: int = 0, apt: bool = True, sudo: bool = True):
        self.bin = tmp_path / "bin"
        self.root = tmp_path / "root"
        self.calls = tmp_path / "calls.log"
        self.bin.mkdir()
        (self.root / "usr" / "sbin").mkdir(parents=True)
        self.calls.touch()
        for tool in REAL_TOOLS:
            found = shutil.which(tool)
            if found:
                (self.bin / tool).symlink_to(found)
        self.stub("id", f"#!/bin/sh\necho {uid}\n")
        if apt:
            self.stub("apt-get", APT_GET)
        if sudo:
            self.stub("sudo", SUDO)

    def stub(self, name: str, text: str) -> None:
        path = self.bin / name
        path.write_text(text)
        path.chmod(0o755)

    @property
    def policy(self) -> Path:
        return self.root / "usr" / "sbin" / "policy-rc.d"

    def run(self, *needs: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": str(self.bin), "SYSTEM_DEPS_ROOT": str(self.root), "CALLS": str(self.calls)}
        return subprocess.run(
            [str(self.bin / "bash"), str(SCRIPT), *needs],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def log(self) -> list[str]:
        return self.calls.read_text().splitlines()


def test_as_root_sshd_is_installed_with_the_service_kept_from_starting(tmp_path):
    machine = Machine(tmp_path)
    result = machine.run("sshd")
    assert result.returncode == 0, result.stderr
    assert machine.log() == [
        "apt-get update",
        "apt-get install -y --no-install-recommends openssh-server",
        "policy-rc.d exit 101",
        "DEBIAN_FRONTEND=noninteractive",
    ]
    assert not machine.policy.exists(), "the policy-rc.d written for the install was left"


def test_not_root_every_change_goes_through_sudo(tmp_path):
    machine = Machine(tmp_path, uid=1000)
    result = machine.run("sshd")
    assert result.returncode == 0, result.stderr
    assert machine.log() == [
        "sudo tee",  # writes policy-rc.d
        "sudo chmod",
        "sudo apt-get",
        "apt-get update",
        "sudo env",
        "apt-get install -y --no-install-recommends openssh-server",
        "policy-rc.d exit 101",
        "DEBIAN_FRONTEND=noninteractive",
        "sudo rm",
    ]
    assert not machine.policy.exists()


def test_a_policy_already_in_place_is_left_as_it_was(tmp_path):
    machine = Machine(tmp_path)
    machine.policy.write_text("#!/bin/sh\nexit 101  # the administrator's\n")
    machine.policy.chmod(0o755)
    assert machine.run("sshd").returncode == 0
    assert machine.policy.read_text() == "#!/bin/sh\nexit 101  # the administrator's\n"


def test_sshd_in_usr_sbin_is_found_though_not_on_path(tmp_path):
    machine = Machine(tmp_path)
    sshd = machine.root / "usr" / "sbin" / "sshd"
    sshd.write_text("#!/bin/sh\n")
    sshd.chmod(0o755)
    result = machine.run("sshd")
    assert result.returncode == 0
    assert "sshd found" in result.stdout
    assert machine.log() == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"apt": False},
            "system-deps: sshd is missing and this system has no apt-get: install "
            "openssh-server with its package manager",
        ),
        (
            {"uid": 1000, "sudo": False},
            "system-deps: sshd is missing and sudo is not installed: as root, run "
            "apt-get install openssh-server",
        ),
    ],
    ids=["no-apt", "no-sudo"],
)
def test_without_a_way_to_install_one_line_names_the_package(tmp_path, options, message):
    machine = Machine(tmp_path, **options)
    result = machine.run("sshd")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [message]
    assert machine.log() == []
    assert not machine.policy.exists()


def test_commands_already_there_install_nothing(tmp_path):
    machine = Machine(tmp_path)
    for name in ("make", "chromium", "node"):
        machine.stub(name, "#!/bin/sh\n")
    result = machine.run("make", "chromium", "node")
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["==> make found", "==> chromium found", "==> node found"]
    assert machine.log() == []


def test_missing_commands_are_installed_after_one_update(tmp_path):
    machine = Machine(tmp_path)
    assert machine.run("make", "node").returncode == 0
    installs = [line for line in machine.log() if line.startswith("apt-get")]
    assert installs == [
        "apt-get update",
        "apt-get install -y --no-install-recommends make",
        "apt-get install -y --no-install-recommends nodejs npm",
    ]


def test_an_unknown_need_is_refused(tmp_path):
    result = Machine(tmp_path).run("sshd-server")
    assert result.returncode == 1
    assert "unknown need 'sshd-server'" in result.stderr


def test_the_makefile_and_ci_use_the_script_and_the_demo_installs_no_test_tools():
    """One script for both: neither the Makefile nor .ci/run installs packages itself."""
    repo = SCRIPT.parent.parent
    makefile = (repo / "Makefile").read_text()
    ci = (repo / ".ci" / "run").read_text()
    for text in (makefile, ci):
        assert "apt-get install" not in text and "apt-get update" not in text
    assert "scripts/system-deps" in makefile and "scripts/system-deps" in ci
    demo_marker = makefile.split("$(VENV)/.demo-installed:", 1)[1].split("\n\n", 1)[0]
    assert "'.[demo]'" in demo_marker and "[test]" not in demo_marker


def test_the_script_is_executable():
    assert os.access(SCRIPT, os.X_OK)
