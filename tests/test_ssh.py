"""The SSH login and channel data out against a real sshd (an emulator instance), on both of
``_paramiko``'s paths.

With paramiko's internals, the service request, the userauth request and the first
command's session channel go out in one flight (two round trips fewer than paramiko's
own way), and the exec of a command named at the connect behind them (one more); with its
public API only, each waits for the answer before. Channel data out is
encrypted by our own AES-GCM fast path (``_packetizer``) or by paramiko's: sshd accepting
it, and a hash of what it passed on, checks the bytes on the wire.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator

import paramiko
import pytest
from conftest import running_instance
from paramiko.common import (
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_OPEN,
    MSG_CHANNEL_REQUEST,
    MSG_SERVICE_ACCEPT,
    MSG_SERVICE_REQUEST,
    MSG_USERAUTH_REQUEST,
    MSG_USERAUTH_SUCCESS,
)

from flexai_provisioner import _packetizer, _paramiko
from flexai_provisioner.errors import SSHAuthenticationError, SSHError, SSHTimeoutError
from flexai_provisioner.gpu_platform import SSHEndpoint
from flexai_provisioner.ssh import KeyPair, SSHConnection, connect, generate_keypair, send_data

WATCHED = {
    MSG_SERVICE_REQUEST: "service request",
    MSG_SERVICE_ACCEPT: "service accept",
    MSG_USERAUTH_REQUEST: "userauth request",
    MSG_USERAUTH_SUCCESS: "userauth success",
    MSG_CHANNEL_OPEN: "channel open",
    MSG_CHANNEL_REQUEST: "channel request",
}


@pytest.fixture(params=["internals", "public-api"])
def public(request, monkeypatch) -> bool:
    monkeypatch.setattr(_paramiko, "PUBLIC_API_ONLY", request.param == "public-api")
    return request.param == "public-api"


@pytest.fixture
def instance(emulator, api_key) -> Iterator[tuple[SSHEndpoint, KeyPair]]:
    """A running instance's SSH endpoint and the key it accepts; deleted afterwards.

    50 ms each way, so that what is sent in one flight is sent before any answer can come.
    """
    emulator.update_faults(link_latency_ms=50)
    key = generate_keypair()
    with running_instance(emulator, api_key, key.public_openssh) as endpoint:
        yield endpoint, key


@pytest.fixture
def packets(monkeypatch) -> list[str]:
    """The login's messages in the order this process sent (->) and read (<-) them."""
    seen: list[str] = []
    send, read = paramiko.Packetizer.send_message, paramiko.Packetizer.read_message

    def send_message(self, data):
        raw = data.asbytes()
        if raw[0] in WATCHED:
            seen.append("-> " + WATCHED[raw[0]])
        return send(self, data)

    def read_message(self):
        ptype, m = read(self)
        if ptype in WATCHED and ptype != MSG_CHANNEL_REQUEST:  # not sshd's exit-status
            seen.append("<- " + WATCHED[ptype])
        return ptype, m

    monkeypatch.setattr(paramiko.Packetizer, "send_message", send_message)
    monkeypatch.setattr(paramiko.Packetizer, "read_message", read_message)
    return seen


def run(conn, command: str, status: int = 0) -> bytes:
    chan = conn.exec(command)
    try:
        chan.settimeout(30)
        out = b""
        while data := chan.recv(65536):
            out += data
        assert chan.recv_exit_status() == status
        return out
    finally:
        chan.close()


def test_the_login_and_the_first_channel_go_in_one_flight(instance, public, packets):
    endpoint, key = instance
    conn = connect(endpoint, key, connect_timeout=10)
    try:
        assert run(conn, "echo first") == b"first\n"
        assert run(conn, "echo second") == b"second\n"  # a channel of its own
    finally:
        conn.close()
    sent_first = ["-> service request", "-> userauth request", "-> channel open"]
    if public:  # paramiko's way: each request once the one before is answered
        assert packets[:7] == [
            "-> service request",
            "<- service accept",
            "-> userauth request",
            "<- userauth success",
            "-> channel open",
            "-> channel request",
            "-> channel open",
        ]
    else:
        assert packets[:3] == sent_first
        assert packets[3:5] == ["<- service accept", "<- userauth success"]
        assert packets.count("-> channel open") == 2


def test_the_first_command_named_goes_with_the_login(instance, public, packets):
    endpoint, key = instance
    conn = connect(endpoint, key, connect_timeout=10, first_command="echo first")
    try:
        assert run(conn, "echo first") == b"first\n"
    finally:
        conn.close()
    login = ["-> service request", "-> userauth request", "-> channel open"]
    if public:  # paramiko's way: the exec once the channel is confirmed
        assert packets.index("-> channel request") > packets.index("<- userauth success")
    else:
        assert packets[:4] == [*login, "-> channel request"]
    assert packets.count("-> channel open") == 1


def test_other_commands_get_channels_of_their_own(instance, public):
    """The channel whose exec went with the login is the first command's alone, whenever it
    runs; a command that fails there reports its status as anywhere else."""
    endpoint, key = instance
    conn = connect(endpoint, key, connect_timeout=10, first_command="echo first; exit 3")
    try:
        assert run(conn, "echo other") == b"other\n"
        assert run(conn, "echo first; exit 3", status=3) == b"first\n"
        assert run(conn, "echo first; exit 3", status=3) == b"first\n"  # a new channel
    finally:
        conn.close()


def test_a_first_channel_numbered_otherwise_fails_without_waiting(instance, monkeypatch):
    """OpenSSH numbers a connection's first channel 0, where the exec sent with the login
    goes; a server that did otherwise would end the connection (as sshd does for an exec to
    another number, even before the login's answer): the connect or the exec fails then, it
    does not wait for an answer."""
    monkeypatch.setattr(_paramiko, "_FIRST_CHANNEL", 1)
    endpoint, key = instance
    with pytest.raises(SSHError) as caught:
        conn = connect(endpoint, key, connect_timeout=10, first_command="echo first")
        try:
            conn.exec("echo first")
        finally:
            conn.close()
    assert not isinstance(caught.value, SSHTimeoutError)


def test_a_key_the_instance_does_not_know_is_refused_clearly(instance, public, packets):
    endpoint, _ = instance
    with pytest.raises(SSHAuthenticationError, match="refused our SSH key: the platform did not"):
        connect(endpoint, generate_keypair(), connect_timeout=10)
    assert "<- userauth success" not in packets
    # The channel sent ahead of the failed login gave up with its connection.
    for thread in threading.enumerate():
        if thread.name.endswith("(_open_ahead)"):
            thread.join(10)
            assert not thread.is_alive()


def test_after_a_refused_key_the_right_one_still_logs_in(instance, public):
    endpoint, key = instance
    with pytest.raises(SSHAuthenticationError):
        connect(endpoint, generate_keypair(), connect_timeout=10)
    conn = connect(endpoint, key, connect_timeout=10)
    try:
        assert run(conn, "echo ok") == b"ok\n"
    finally:
        conn.close()


def test_a_link_lost_during_the_login_is_not_called_a_refused_key(instance, public, monkeypatch):
    endpoint, key = instance
    send = paramiko.Packetizer.send_message

    def cut_after_userauth(self, data):
        send(self, data)
        if data.asbytes()[0] == MSG_USERAUTH_REQUEST:  # the link dies before any answer
            self._Packetizer__socket.shutdown(socket.SHUT_RDWR)

    monkeypatch.setattr(paramiko.Packetizer, "send_message", cut_after_userauth)
    with pytest.raises(SSHError, match="closed during the login") as caught:
        connect(endpoint, key, connect_timeout=10)
    assert not isinstance(caught.value, SSHAuthenticationError)


@pytest.fixture
def link(emulator, api_key, public) -> Iterator[SSHConnection]:
    """A connection to a fresh instance (no added latency), on the path ``public`` chose."""
    key = generate_keypair()
    with running_instance(emulator, api_key, key.public_openssh) as endpoint:
        conn = connect(endpoint, key, connect_timeout=10)
        try:
            yield conn
        finally:
            conn.close()


@pytest.fixture
def data_out(monkeypatch) -> dict[str, int]:
    """Channel data packets sent, by whose encryption: ours (fast) or paramiko's."""
    count = {"fast": 0, "paramiko": 0}
    send, fast = paramiko.Packetizer.send_message, _packetizer.Packetizer._send_fast

    def send_message(self, data):
        count["paramiko"] += data.asbytes()[0] == MSG_CHANNEL_DATA
        return send(self, data)

    def send_fast(self, *args):
        count["fast"] += (sent := fast(self, *args))
        return sent

    monkeypatch.setattr(paramiko.Packetizer, "send_message", send_message)
    monkeypatch.setattr(_packetizer.Packetizer, "_send_fast", send_fast)
    return count


def hashed_remotely(conn: SSHConnection, payload: bytes, chunk: int) -> tuple[bytes, list[int]]:
    """``payload`` sent by ``send_data`` in pieces of ``chunk`` bytes to ``sha256sum`` on the
    instance, which reads nothing for its first second (the window runs out meanwhile): the
    digest it printed, and what each send took (checked against the largest packet's data)."""
    chan = conn.exec("sleep 1; sha256sum")
    largest = chan.out_max_packet_size - 64  # paramiko's limit, which ours keeps
    try:
        chan.settimeout(60)
        view, sent, takes = memoryview(payload), 0, []
        while sent < len(payload):
            takes.append(send_data(chan, view[sent : sent + chunk]))
            sent += takes[-1]
        chan.shutdown_write()
        out = b""
        while data := chan.recv(4096):
            out += data
        assert chan.recv_exit_status() == 0
        assert min(takes) > 0 and max(takes) <= largest
        return bytes.fromhex(out.split()[0].decode()), takes
    finally:
        chan.close()


def test_channel_data_out_reaches_the_instance_intact_on_either_path(link, public, data_out):
    """Pieces larger than the largest packet, and sends cut short by the window left."""
    payload = os.urandom(8 * 1024 * 1024 + 12345)
    digest, takes = hashed_remotely(link, payload, 100 * 1024 + 7)
    assert digest == hashlib.sha256(payload).digest()
    assert len(set(takes[:-1])) > 1, "every send took a whole packet: none met the window's end"
    if public:
        assert data_out == {"fast": 0, "paramiko": len(takes)}
    else:
        assert link.transport.local_cipher == "aes128-gcm@openssh.com"
        assert data_out == {"fast": len(takes), "paramiko": 0}


def test_key_exchanges_in_the_middle_of_channel_data_out_lose_nothing(link, public, data_out):
    """A rekey asked for after each MiB sent: the packet that asks goes paramiko's way, the
    others ours, and sshd takes them all under the keys of their turn."""
    packetizer = link.transport.packetizer
    keys: list[object] = []
    set_outbound_cipher = packetizer.set_outbound_cipher
    packetizer.REKEY_BYTES = 1024 * 1024  # an instance attribute: this connection's only
    packetizer.set_outbound_cipher = lambda *a, **kw: (
        keys.append(a),
        set_outbound_cipher(*a, **kw),
    )
    payload = os.urandom(16 * 1024 * 1024)
    digest, takes = hashed_remotely(link, payload, 64 * 1024)
    assert digest == hashlib.sha256(payload).digest()
    assert len(keys) >= 3, f"{len(keys)} key exchanges for 16 MiB"
    assert data_out["fast"] + data_out["paramiko"] == len(takes)
    if public:
        assert data_out["fast"] == 0
    else:
        assert data_out["paramiko"] >= len(keys) - 1 and data_out["fast"] > len(takes) // 2
