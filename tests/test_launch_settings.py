"""The argv launcher honours its kernelspec's provisioner config as the provisioner does: the
API it talks to, the time an API call may take and the SSH key, besides the session's settings
(those are in test_keep_alive.py and test_launch.py).

Real emulators (a second one started here, for the kernelspec that points at it), real sshd,
real kernels run by the launcher as a raw-kernel frontend runs it.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from test_keep_alive import launcher
from test_launch import run
from test_security import authorized_keys

from flexai_provisioner.emulator import Emulator


def test_the_launcher_uses_the_api_and_key_its_kernelspec_names(
    emulator, kernelspecs, api_key, tmp_path
):
    key = ed25519.Ed25519PrivateKey.generate()
    key_path = tmp_path / "id_ed25519"
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    key_path.with_suffix(".pub").write_bytes(public + b"\n")
    # The environment (flexai_env) still points at the session's emulator: the kernelspec wins.
    other = Emulator(api_keys=(api_key,), state_dir=tmp_path / "other-emulator").start()
    try:
        config = {"api_url": other.url, "api_timeout": 30.0, "ssh_key_file": str(key_path)}
        kernelspecs.add("flexai-elsewhere", config)
        fe = launcher(kernelspecs, "flexai-elsewhere", tmp_path / "nb")
        try:
            fe.start()
            _, out = run(fe.client(), "import os; print(os.environ['FLEXAI_INSTANCE_ID'])")
            instance_id = out.strip()
            assert other.live_instances() == [instance_id]
            assert emulator.live_instances() == []
            assert authorized_keys(other, instance_id) == [public.decode()]
            fe.clients[0].shutdown()
            assert fe.wait() == 0, fe.stderr()
        finally:
            fe.stop()
        assert other.live_instances() == []
    finally:
        other.stop()


def test_the_launcher_gives_up_on_a_silent_api_after_its_kernelspecs_api_timeout(
    emulator, kernelspecs, silent_api, tmp_path
):
    config = {"api_url": silent_api, "api_timeout": 1.0, "reap_orphans_at_start": False}
    kernelspecs.add("flexai-hung-api", config)
    fe = launcher(kernelspecs, "flexai-hung-api", tmp_path / "nb")
    try:
        fe.start()
        assert fe.wait() == 1
    finally:
        fe.stop()
    assert silent_api in fe.stderr() and "no answer within 1 s" in fe.stderr(), fe.stderr()
    assert emulator.live_instances() == []
