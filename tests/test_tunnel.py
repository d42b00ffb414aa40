"""The tunnel on its own: bytes through a real sshd, checked end to end.

The emulator's instances are sshd processes on this host, so a TCP server in this test
process stands in for a kernel port "on the instance". Every test over a connection runs
twice: with the channel data handed over through paramiko's internals (the default) and
with paramiko's public API only (``_paramiko.PUBLIC_API_ONLY``, the tunnel's fallback).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator

import paramiko
import pytest
from conftest import running_instance
from paramiko.common import MSG_CHANNEL_DATA, MSG_CHANNEL_EOF

from flexai_provisioner import _paramiko
from flexai_provisioner.errors import LocalPortError, SSHTimeoutError
from flexai_provisioner.relay import CHUNK
from flexai_provisioner.ssh import WINDOW_SIZE, SSHConnection, connect, generate_keypair, set_sink
from flexai_provisioner.tunnel import Tunnel

Handler = Callable[[socket.socket], None]


@pytest.fixture(params=["internals", "public-api"])
def link(request, emulator, api_key, monkeypatch) -> Iterator[SSHConnection]:
    """An SSH connection to a fresh instance, deleted afterwards, on either path."""
    public = request.param == "public-api"
    monkeypatch.setattr(_paramiko, "PUBLIC_API_ONLY", public)
    key = generate_keypair()
    with running_instance(emulator, api_key, key.public_openssh) as endpoint:
        conn = connect(endpoint, key, connect_timeout=10)
        try:
            chan = conn.exec("true")
            try:  # the path asked for is the path taken
                assert set_sink(chan, lambda _data: None) is not public
                assert (type(conn.transport) is paramiko.Transport) is public
            finally:
                chan.close()
            yield conn
        finally:
            conn.close()


class Server:
    """A one-connection TCP server on loopback running ``handler`` in a thread."""

    def __init__(self, handler: Handler):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, args=(handler,), daemon=True)
        self._thread.start()

    def _serve(self, handler: Handler) -> None:
        try:
            self._listener.settimeout(30)
            conn, _ = self._listener.accept()
            with conn:
                conn.settimeout(30)
                handler(conn)
        except BaseException as e:  # reported by close()
            self.error = e

    def close(self) -> None:
        self._listener.close()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the server thread did not finish"
        if self.error is not None:
            raise self.error


@pytest.fixture
def forward(link: SSHConnection) -> Iterator[Callable[[Handler], socket.socket]]:
    """Serve ``handler`` behind a one-port tunnel; return a client socket connected to it."""
    tunnel = Tunnel(["port"])
    servers: list[Server] = []
    clients: list[socket.socket] = []

    def _forward(handler: Handler) -> socket.socket:
        server = Server(handler)
        servers.append(server)
        tunnel.retarget(link.transport, {"port": server.port})
        sock = socket.create_connection(("127.0.0.1", tunnel.local_ports["port"]), timeout=30)
        clients.append(sock)
        return sock

    try:
        yield _forward
    finally:
        for sock in clients:
            sock.close()
        tunnel.close()
        for server in servers:
            server.close()


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def test_bulk_output_arrives_whole_and_before_the_end_of_stream(forward):
    # More than one SSH window (8 MiB), so it only arrives if window credit flows back;
    # the remote close must not overtake data still being passed on.
    payload = os.urandom(20 * 1024 * 1024)
    sock = forward(lambda conn: conn.sendall(payload))
    received = recv_all(sock)
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def _after_go(payload: bytes) -> Handler:
    """Send ``payload`` once the client says go (by then its channel has its sink)."""

    def send(conn: socket.socket) -> None:
        assert conn.recv(2) == b"go"
        conn.sendall(payload)

    return send


def test_a_sinks_data_skips_the_transports_dispatch_loop(link, forward, monkeypatch):
    """AES-GCM packets are decrypted out of the read-ahead buffer and a sink's data held at
    once: none of it goes through paramiko's Message dispatch (the slow path)."""
    if type(link.transport) is paramiko.Transport:
        pytest.skip("paramiko's own transport has no fast path")
    assert link.transport.remote_cipher == "aes128-gcm@openssh.com"
    dispatched = []
    handler = _paramiko._SinkTransport._channel_handler_table[MSG_CHANNEL_DATA]
    monkeypatch.setitem(
        _paramiko._SinkTransport._channel_handler_table,
        MSG_CHANNEL_DATA,
        lambda chan, m: (dispatched.append(chan), handler(chan, m)),
    )
    payload = os.urandom(4 * 1024 * 1024)
    sock = forward(_after_go(payload))
    sock.sendall(b"go")
    assert recv_all(sock) == payload
    assert dispatched == []


def test_key_exchanges_in_the_middle_of_bulk_output_lose_nothing(link, forward, monkeypatch):
    """Key exchanges (paramiko's path) between fast-path packets: one asked for after each
    MiB received, so several, however much the sender has in flight meanwhile."""
    packetizer = link.transport.packetizer
    keys: list[object] = []
    set_inbound_cipher = packetizer.set_inbound_cipher
    monkeypatch.setattr(packetizer, "REKEY_BYTES", 1024 * 1024)
    monkeypatch.setattr(
        packetizer,
        "set_inbound_cipher",
        lambda *a, **kw: (keys.append(a), set_inbound_cipher(*a, **kw)),
    )
    payload = os.urandom(24 * 1024 * 1024)
    sock = forward(_after_go(payload))
    sock.sendall(b"go")
    received = recv_all(sock)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert len(keys) >= 2, f"{len(keys)} key exchanges for 24 MiB"


def test_a_slow_reader_holds_the_sender_back_and_loses_nothing(forward):
    payload = os.urandom(64 * 1024 * 1024)
    accepted = 0  # bytes the remote side's socket took while nobody read locally
    stalled, done = threading.Event(), threading.Event()

    def send(conn: socket.socket) -> None:
        nonlocal accepted
        view = memoryview(payload)
        conn.settimeout(3)  # no progress for this long: the sender is held back
        while accepted < len(payload):
            try:
                accepted += conn.send(view[accepted : accepted + CHUNK])
            except TimeoutError:
                stalled.set()
                conn.settimeout(30)
        done.set()

    sock = forward(send)
    assert stalled.wait(60), "64 MiB were accepted with nobody reading: no back-pressure"
    # Held back within one SSH window plus what the socket buffers on the way hold
    # (both ends of two loopback connections, sshd's own buffer): not the whole payload.
    held = accepted
    assert WINDOW_SIZE <= held <= 40 * 1024 * 1024, f"{held} bytes taken before the stall"
    received = recv_all(sock)
    assert done.is_set() and accepted == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_both_directions_and_a_half_close(forward):
    def echo(conn: socket.socket) -> None:
        while data := conn.recv(1 << 16):
            conn.sendall(data)

    payload = os.urandom(3 * 1024 * 1024)
    sock = forward(echo)
    written = threading.Event()
    writer = threading.Thread(
        target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR), written.set()),
        daemon=True,
    )
    writer.start()
    received = recv_all(sock)
    writer.join(30)
    assert written.is_set(), "the client could not send all its data"
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_each_small_message_is_passed_on_at_once(forward):
    """Nothing waits for more data to arrive: every request gets its reply by itself."""

    def answer(conn: socket.socket) -> None:
        while data := conn.recv(64):
            conn.sendall(data.upper())

    sock = forward(answer)
    sock.settimeout(5)
    for i in range(200):
        message = f"ping {i:03}".encode()
        sock.sendall(message)
        reply = b""
        while len(reply) < len(message):
            reply += sock.recv(64)
        assert reply == message.upper()


def test_held_data_reaches_the_sink_before_the_end_of_its_channel():
    """Data is held until the transport has handled its read; an EOF read with it must not
    overtake it (checked on the handler table itself, no network timing involved; the
    public-API path holds nothing)."""
    ours, theirs = socket.socketpair()
    transport = _paramiko._SinkTransport(ours)
    try:
        chan = paramiko.Channel(7)
        chan._set_transport(transport)
        seen: list[tuple[bytes, bool]] = []
        assert set_sink(chan, lambda data: seen.append((data, chan.eof_received)))
        for part in (b"one ", b"two"):
            m = paramiko.Message()
            m.add_string(part)
            m.rewind()
            transport._channel_handler_table[MSG_CHANNEL_DATA](chan, m)
        assert seen == [], "passed on before the transport finished its read"
        transport._channel_handler_table[MSG_CHANNEL_EOF](chan, paramiko.Message())
        assert seen == [(b"one two", False)]
        assert chan.eof_received
    finally:
        ours.close()
        theirs.close()


def test_closing_a_connection_ends_its_thread_at_once(link):
    transport = link.transport
    link.exec("cat")  # an open session, as the kernel agent's: sshd then sends nothing more
    assert transport.is_alive()
    link.close()
    transport.join(2)
    assert not transport.is_alive(), "the transport thread is still blocked reading"


def test_a_connection_before_the_first_target_waits_for_it(link):
    """A frontend that chose the ports connects while the instance still boots."""
    tunnel = Tunnel(["port"])
    server = Server(lambda conn: conn.sendall(b"hello"))
    try:
        sock = socket.create_connection(("127.0.0.1", tunnel.local_ports["port"]), timeout=30)
        with sock:
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):  # held open, neither refused nor answered
                sock.recv(1)
            sock.settimeout(30)
            tunnel.retarget(link.transport, {"port": server.port})
            assert recv_all(sock) == b"hello"
    finally:
        tunnel.close()
        server.close()


def test_exact_ports_that_are_taken_are_an_error_and_hold_nothing():
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        taken = squatter.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        with pytest.raises(LocalPortError, match=f"127.0.0.1:{taken} \\(b\\)"):
            Tunnel(["a", "b"], {"a": free, "b": taken}, exact=True)
    with socket.create_server(("127.0.0.1", free)):  # the failed tunnel let go of "a"
        pass


@pytest.mark.parametrize("public", [False, True], ids=["internals", "public-api"])
def test_a_hung_handshake_is_a_timeout(emulator, api_key, monkeypatch, public):
    """An sshd that never sends its banner is reported as a timeout, not a failure."""
    monkeypatch.setattr(_paramiko, "PUBLIC_API_ONLY", public)
    key = generate_keypair()
    emulator.update_faults(banner_hang=True)
    with (
        running_instance(emulator, api_key, key.public_openssh) as endpoint,
        pytest.raises(SSHTimeoutError, match="did not complete the handshake within 1 s"),
    ):
        connect(endpoint, key, connect_timeout=1)
