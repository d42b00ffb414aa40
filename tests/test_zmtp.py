"""ZeroMQ's greeting sent ahead on the channels opened ahead: the check alone, then real
pyzmq sockets through the real forwarder and sshd (the emulator's instances run on this
host, so a socket bound here stands in for a kernel port on the instance), on both SSH
paths."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import zmq
from conftest import until
from test_tunnel import link  # noqa: F401 (a fixture)
from zmq.auth.thread import ThreadAuthenticator

from flexai_provisioner import zmtp
from flexai_provisioner.ssh import SSHConnection
from flexai_provisioner.tunnel import Tunnel

TIMEOUT_MS = 20_000


def greeting(minor: int = 1, mechanism: bytes = b"NULL", routing_id: bytes = b"") -> bytes:
    """A greeting as libzmq writes it (its signature's length field from the routing id)."""
    signature = b"\xff" + (len(routing_id) + 1).to_bytes(8, "big") + b"\x7f"
    return signature + bytes([3, minor]) + mechanism.ljust(20, b"\0") + bytes(32)


def ready(socket_type: bytes, identity: bytes | None = None) -> bytes:
    """A short READY command (RFC 37), with an Identity as libzmq's DEALER sends one."""
    props = {b"Socket-Type": socket_type, **({} if identity is None else {b"Identity": identity})}
    body = b"\x05READY" + b"".join(
        bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value
        for name, value in props.items()
    )
    return bytes([0x04, len(body)]) + body


def frame(data: bytes) -> bytes:
    return bytes([0, len(data)]) + data


# -- the check ---------------------------------------------------------------------------


def test_a_libzmq_greeting_is_whole_at_its_last_byte():
    client = greeting(routing_id=b"shell-client") + ready(b"DEALER")
    whole = [zmtp.check_greeting(client[: i + 1]) for i in range(len(client))]
    assert whole == [False] * (zmtp.GREETING_SIZE - 1) + [True] * (len(whole) - 63)
    assert greeting() == zmtp.GREETING


@pytest.mark.parametrize(
    ("client", "why"),
    [
        (greeting(minor=0), "ZMTP 3.0"),
        (greeting(mechanism=b"PLAIN"), "mechanism PLAIN"),
        (b"\xff" + bytes(8) + b"\x7f\x02\x05", "ZMTP 2"),
        (b"GET / HTTP/1.1\r\n", "not a ZMTP 3 greeting"),
        (b"\xff" + bytes(9), "not a ZMTP 3 greeting"),  # ZMTP 1.0's routing id
    ],
)
def test_a_greeting_unlike_the_one_sent_ahead_is_a_mismatch(client, why):
    with pytest.raises(zmtp.Mismatch, match=why):
        zmtp.check_greeting(client)


# -- through the forwarder ----------------------------------------------------------------


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    context.setsockopt(zmq.LINGER, 0)
    context.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    context.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
    yield context
    context.destroy(linger=0)


@pytest.fixture
def tunnel() -> Iterator[Tunnel]:
    tunnel = Tunnel(["port"])
    yield tunnel
    tunnel.close()


def ahead(tunnel: Tunnel, conn: SSHConnection, port: int) -> str:
    """Target ``port`` through a channel opened ahead, as a standby's kernel; the local URL."""
    tunnel.preopen(conn.transport, {"port": port})
    until(lambda: "port" in tunnel._spare, "the channel opened ahead")
    tunnel.retarget(conn.transport, {"port": port})
    return f"tcp://127.0.0.1:{tunnel.local_ports['port']}"


def test_dealer_and_router(link, tunnel, ctx):  # noqa: F811
    router = ctx.socket(zmq.ROUTER)
    url = ahead(tunnel, link, router.bind_to_random_port("tcp://127.0.0.1"))
    dealer = ctx.socket(zmq.DEALER)
    dealer.identity = b"shell-client"
    dealer.connect(url)
    dealer.send_multipart([b"", b"kernel_info_request"])
    # The kernel sees the client's own READY (its identity) behind the greeting sent ahead.
    assert router.recv_multipart() == [b"shell-client", b"", b"kernel_info_request"]
    router.send_multipart([b"shell-client", b"", b"kernel_info_reply"])
    assert dealer.recv_multipart() == [b"", b"kernel_info_reply"]
    assert tunnel._greet


@pytest.mark.parametrize("kind", [zmq.XPUB, zmq.PUB], ids=["xpub", "pub"])
def test_sub_and_pub(link, tunnel, ctx, kind):  # noqa: F811
    pub = ctx.socket(kind)
    url = ahead(tunnel, link, pub.bind_to_random_port("tcp://127.0.0.1"))
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"status")
    sub.connect(url)
    if kind == zmq.XPUB:  # ipykernel's iopub
        assert pub.recv() == b"\x01status"
    until(lambda: pub.send(b"status: idle") or sub.poll(100), "a subscribed message")
    pub.send(b"other: not subscribed")
    pub.send(b"status: busy")
    while (message := sub.recv()) == b"status: idle":
        pass
    assert message == b"status: busy"


def test_req_and_router_heartbeat_echo(link, tunnel, ctx):  # noqa: F811
    router = ctx.socket(zmq.ROUTER)
    url = ahead(tunnel, link, router.bind_to_random_port("tcp://127.0.0.1"))
    req = ctx.socket(zmq.REQ)
    req.connect(url)
    for i in range(5):
        req.send(b"ping %d" % i)
        router.send_multipart(router.recv_multipart())  # ipykernel's heartbeat: an echo
        assert req.recv() == b"ping %d" % i


def test_bulk_output_after_the_handshake_arrives(link, tunnel, ctx):  # noqa: F811
    """More than one SSH window (8 MiB) behind the handshake: the window credit flows."""
    router = ctx.socket(zmq.ROUTER)
    url = ahead(tunnel, link, router.bind_to_random_port("tcp://127.0.0.1"))
    dealer = ctx.socket(zmq.DEALER)
    dealer.identity = b"client"
    dealer.connect(url)
    dealer.send(b"go")
    assert router.recv_multipart() == [b"client", b"go"]
    chunk = bytes(range(256)) * 4096  # 1 MiB
    for _ in range(20):
        router.send_multipart([b"client", chunk])
    assert all(dealer.recv() == chunk for _ in range(20))


class RawKernel:
    """A TCP server standing in for a kernel port, speaking ZMTP by hand."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(30)
        self.port = self._listener.getsockname()[1]

    def accept(self) -> socket.socket:
        conn, _ = self._listener.accept()
        conn.settimeout(30)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def close(self) -> None:
        self._listener.close()


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, f"the connection ended after {data!r}"
        data += chunk
    return data


def test_the_kernel_answers_ahead_and_the_client_never_waits(link, tunnel, ctx):  # noqa: F811
    """The greeting reaches the kernel before any client; the kernel's answer, sent then one
    byte at a time, completes a client's handshake with no exchange after it connects: all
    the kernel gets from it is its READY and message, the greeting dropped."""
    kernel = RawKernel()
    try:
        url = ahead(tunnel, link, kernel.port)
        conn = kernel.accept()
        assert recv_exactly(conn, zmtp.GREETING_SIZE) == zmtp.GREETING
        for byte in greeting() + ready(b"ROUTER"):
            conn.sendall(bytes([byte]))
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(url)
        dealer.send(b"hello")
        expected = ready(b"DEALER", identity=b"") + frame(b"hello")
        assert recv_exactly(conn, len(expected)) == expected
        conn.sendall(frame(b"world"))
        assert dealer.recv() == b"world"
        conn.close()
    finally:
        kernel.close()


def test_a_client_greeting_unlike_the_one_ahead_closes_and_the_next_go_verbatim(
    link,  # noqa: F811
    tunnel,
):
    """A ZMTP 3.0 client (the kernel would frame for 3.1, as told ahead): its connection is
    closed, nothing of it passed on; later channels opened ahead relay whatever comes."""
    kernel = RawKernel()
    try:
        ahead(tunnel, link, kernel.port)
        conn = kernel.accept()
        with socket.create_connection(("127.0.0.1", tunnel.local_ports["port"]), 30) as client:
            client.sendall(greeting(minor=0) + ready(b"DEALER"))
            while client.recv(4096):  # the kernel's answer, if it came, then the end
                pass
        assert recv_exactly(conn, zmtp.GREETING_SIZE) == zmtp.GREETING
        assert conn.recv(4096) == b""
        conn.close()
        ahead(tunnel, link, kernel.port)
        conn = kernel.accept()
        with socket.create_connection(("127.0.0.1", tunnel.local_ports["port"]), 30) as raw:
            raw.sendall(b"ping")
            assert recv_exactly(conn, 4) == b"ping"  # no greeting before it
            conn.sendall(b"pong")
            assert recv_exactly(raw, 4) == b"pong"
        conn.close()
    finally:
        kernel.close()


def test_a_client_greeting_by_the_byte_is_dropped_whole(link, tunnel):  # noqa: F811
    kernel = RawKernel()
    try:
        ahead(tunnel, link, kernel.port)
        conn = kernel.accept()
        assert recv_exactly(conn, zmtp.GREETING_SIZE) == zmtp.GREETING
        with socket.create_connection(("127.0.0.1", tunnel.local_ports["port"]), 30) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for byte in greeting(routing_id=b"x"):
                client.sendall(bytes([byte]))
            client.sendall(ready(b"DEALER") + frame(b"after"))
            expected = ready(b"DEALER") + frame(b"after")
            assert recv_exactly(conn, len(expected)) == expected
        conn.close()
    finally:
        kernel.close()


def test_a_kernel_not_on_null_refuses_the_greeting_and_its_client_goes_verbatim(
    request,
    link,  # noqa: F811
    tunnel,
    ctx,
):
    """A PLAIN kernel closes the channel that brought it a NULL greeting; its client gets a
    channel opened for it and does its whole handshake itself."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    request.addfinalizer(auth.stop)
    auth.configure_plain(passwords={"user": "secret"})
    router = ctx.socket(zmq.ROUTER)
    router.plain_server = True
    url = ahead(tunnel, link, router.bind_to_random_port("tcp://127.0.0.1"))
    dealer = ctx.socket(zmq.DEALER)
    dealer.plain_username, dealer.plain_password = b"user", b"secret"
    dealer.identity = b"plain"
    dealer.connect(url)
    dealer.send(b"over PLAIN")
    assert router.recv_multipart() == [b"plain", b"over PLAIN"]
    router.send_multipart([b"plain", b"back"])
    assert dealer.recv() == b"back"
