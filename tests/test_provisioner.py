"""The spine: kernels started through the provisioner run on emulated instances over SSH.

Everything is real: the emulator's HTTP API, sshd, ipykernel on the "instance", paramiko,
and jupyter_client/nbclient/``jupyter execute`` on the local side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from flexai_provisioner.errors import (
    HostKeyMismatchError,
    ProvisioningError,
    ProvisioningTimeoutError,
    SSHAuthenticationError,
    SSHError,
    UnknownGPUTypeError,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
JUPYTER = str(Path(sys.executable).with_name("jupyter"))


def notebook(*sources: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])


def cell_text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


async def test_kernel_runs_on_the_instance_over_ssh(emulator, kernelspecs):
    km = AsyncKernelManager(kernel_name="flexai-a100")
    await km.start_kernel()
    try:
        instance_id = km.provisioner.instance_id
        assert instance_id in emulator.live_instances()
        kc = km.client()
        kc.start_channels()
        outputs: list[dict] = []
        await kc.wait_for_ready(timeout=60)
        reply = await kc.execute_interactive(
            "import os; print(os.environ['FLEXAI_INSTANCE_ID'], 'SSH_CONNECTION' in os.environ)",
            output_hook=outputs.append,
            timeout=30,
        )
        assert reply["content"]["status"] == "ok"
        text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        assert text.split() == [instance_id, "True"]
        conn = json.loads(Path(km.connection_file).read_text())
        assert conn["ip"] == "127.0.0.1"
        kc.stop_channels()
    finally:
        await km.shutdown_kernel()
    assert instance_id not in emulator.live_instances()


def test_nbclient_executes_a_notebook(emulator, kernelspecs):
    nb = notebook(
        "import os\nprint(os.environ['FLEXAI_GPU_TYPE'])", "print(sum(i * i for i in range(10)))"
    )
    NotebookClient(nb, kernel_name="flexai-a100", timeout=60).execute()
    assert cell_text(nb.cells[0]).strip() == "A100"
    assert cell_text(nb.cells[1]).strip() == "285"
    assert emulator.live_instances() == []


def test_jupyter_execute_runs_the_example_headless(emulator, kernelspecs, flexai_env, tmp_path):
    source = EXAMPLES / "where-am-i.ipynb"
    probe = tmp_path / "probe.ipynb"
    nb = nbformat.read(source, as_version=4)
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import os\nprint('SSH', os.environ['SSH_CONNECTION'].split()[2])"
        )
    )
    nbformat.write(nb, probe)
    result = subprocess.run(
        [JUPYTER, "execute", "--kernel_name=flexai-a100", "--inplace", str(probe)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    executed = nbformat.read(probe, as_version=4)
    assert cell_text(executed.cells[-1]).strip() == "SSH 127.0.0.1"
    assert emulator.live_instances() == []


@pytest.mark.parametrize(
    ("fault", "config", "error"),
    [
        ({}, {"gpu_type": "Z999"}, UnknownGPUTypeError),
        ({"stuck": True}, {"provision_timeout": 1.0}, ProvisioningTimeoutError),
        ({"fail_provisioning": True}, {}, ProvisioningError),
        ({"wrong_authorized_key": True}, {}, SSHAuthenticationError),
        ({"wrong_host_key": True}, {}, HostKeyMismatchError),
        ({"banner_hang": True}, {"ssh_connect_timeout": 1.0}, SSHError),
    ],
    ids=[
        "unknown-gpu",
        "never-running",
        "failed",
        "key-refused",
        "host-key-mismatch",
        "banner-hang",
    ],
)
async def test_failed_start_raises_and_leaves_no_instance(
    emulator, kernelspecs, fault, config, error
):
    kernelspecs.add("flexai-faulty", config)
    emulator.update_faults(**fault)
    km = AsyncKernelManager(kernel_name="flexai-faulty")
    with pytest.raises(error) as info:
        await km.start_kernel()
    assert str(info.value)
    assert emulator.live_instances() == []
    assert not km.has_kernel
