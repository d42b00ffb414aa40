"""Local port forwards over SSH: the fixed local ports of one kernel.

Each kernel gets a :class:`Tunnel`: five listening sockets on 127.0.0.1 whose accepted
connections are relayed (by :mod:`~flexai_provisioner.relay`'s one thread) to the kernel's
ports on the instance through ``direct-tcpip`` channels of the instance's one SSH transport.

The local ports stay the same for the kernel's whole life: a restart re-targets them at the
new kernel's remote ports, a reconnect swaps in the new transport, and ZeroMQ clients just
reconnect to the same addresses.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import paramiko

from . import relay, zmtp
from .errors import LocalPortError, SSHChannelRefusedError, SSHError
from .relay import Forwarder, Pipe
from .ssh import close_quietly, open_forward

log = logging.getLogger(__name__)

MAX_PARKED = 4  # refused connections kept per port until the next retarget


class Tunnel:
    """Fixed local ports forwarded to a (re-targetable) set of ports on the instance.

    A connection whose remote port refuses it (the kernel is being restarted, nothing
    listens yet) is not closed but parked until the next :meth:`retarget`, and relayed to
    the new kernel the moment it is known: the client need not wait out its reconnect
    interval (100 ms for ZeroMQ) after a restart. So is a connection that comes before the
    first :meth:`retarget`, from a frontend that chose the ports while the instance boots.

    A channel opened ahead (:meth:`preopen`) is sent a ZeroMQ client's greeting at once, so
    that the client it goes to completes its handshake locally (:mod:`.zmtp`); only there,
    where the kernel's port listens and the kernel answers it while it starts. After a client
    whose greeting was unlike it, the tunnel sends none ahead any more.
    """

    def __init__(
        self,
        names: list[str],
        ports: dict[str, int] | None = None,
        forwarder: Forwarder | None = None,
        *,
        exact: bool = False,
    ):
        """Listen on ``ports`` (by name) where free, elsewhere on any free port; with
        ``exact``, on exactly ``ports`` or raise :class:`LocalPortError`."""
        self._fwd = forwarder or relay.forwarder()
        self._transport: paramiko.Transport | None = None
        self._targets: dict[str, int] = {}
        self._generation = 0  # bumped by every retarget, disconnect and close
        self._pipes: set[Pipe] = set()
        self._parked: list[tuple[str, socket.socket, tuple[str, int]]] = []
        # Channels opened ahead (preopen), by name: (transport, remote port, channel, whether
        # it was sent the ZeroMQ greeting).
        self._spare: dict[str, tuple[paramiko.Transport, int, paramiko.Channel, bool]] = {}
        self._closed = False
        self._greet = True  # send the greeting ahead (until a client's was unlike it)
        self._listeners: dict[str, socket.socket] = {}
        self.local_ports: dict[str, int] = {}
        try:
            for name in names:
                self._listeners[name] = _listen(name, (ports or {}).get(name, 0), exact)
                self.local_ports[name] = self._listeners[name].getsockname()[1]
        except BaseException:
            for sock in self._listeners.values():
                sock.close()
            raise
        for name, sock in self._listeners.items():
            self._fwd.call(lambda n=name, s=sock: self._fwd.add_listener(s, self._acceptor(n, s)))

    def retarget(self, transport: paramiko.Transport, remote_ports: dict[str, int]) -> None:
        """Send new connections to these ports via this transport; drop the old ones."""
        self._transport = transport
        self._targets = dict(remote_ports)
        self._generation += 1
        self._fwd.call(self._drop_pipes)
        self._fwd.call(self._unpark)

    def preopen(self, transport: paramiko.Transport, remote_ports: dict[str, int]) -> None:
        """Open a channel to each of ``remote_ports`` now, for the first connection to that
        port once it is the target, and send it a ZeroMQ client's greeting. A standby agent
        listens on its kernel's ports before the kernel runs (connections wait in the
        backlog), so the forwards open and the kernel answers the greetings while ipykernel
        starts instead of after."""
        for name, port in remote_ports.items():
            self._fwd.open_channel(lambda n=name, p=port: self._open_spare(transport, n, p))

    def _open_spare(self, transport: paramiko.Transport, name: str, port: int) -> None:
        try:
            chan = open_forward(transport, port, ("127.0.0.1", 0), timeout=10)
        except SSHError as e:
            log.debug("no channel opened ahead: %s", e)
            return
        greeted = self._greet
        if greeted:
            try:
                chan.sendall(zmtp.GREETING)
            except (OSError, EOFError, paramiko.SSHException) as e:
                log.debug("no ZeroMQ greeting sent ahead: %s", e)
                close_quietly(chan)
                return

        def keep() -> None:
            self._drop_spare(name)
            if self._closed:
                close_quietly(chan)
            else:
                self._spare[name] = (transport, port, chan, greeted)

        self._fwd.call(keep)

    def _drop_spare(self, name: str) -> None:
        spare = self._spare.pop(name, None)
        if spare is not None:
            close_quietly(spare[2])

    def hold(self) -> None:
        """The kernel is about to exit: park new connections until the next :meth:`retarget`
        (or :meth:`close`) instead of opening channels that its closing ports would refuse."""
        self._targets = {}

    def disconnect(self) -> None:
        """The transport died: close relayed connections now, so clients notice and wait.

        Until :meth:`retarget` supplies a new transport, new connections are refused.
        """
        self._transport = None
        self._generation += 1
        self._fwd.call(self._drop_pipes)
        self._fwd.call(self._drop_parked)
        self._fwd.call(lambda: [self._drop_spare(name) for name in list(self._spare)])

    def close(self) -> None:
        """Stop listening and close every relayed connection."""
        self._transport = None
        self._generation += 1

        def close_all() -> None:
            self._closed = True
            for sock in self._listeners.values():
                self._fwd.remove_listener(sock)
            self._drop_pipes()
            self._drop_parked()
            for name in list(self._spare):
                self._drop_spare(name)

        self._fwd.call(close_all)

    def _drop_pipes(self) -> None:
        for pipe in list(self._pipes):
            self._fwd.close_pipe(pipe)
        self._pipes.clear()

    def _drop_parked(self) -> None:
        parked, self._parked = self._parked, []
        for _name, sock, _peer in parked:
            sock.close()

    def _unpark(self) -> None:
        parked, self._parked = self._parked, []
        for name, sock, peer in parked:
            self._connect(name, sock, peer)

    def _acceptor(self, name: str, listener: socket.socket) -> Callable[[int], None]:
        def on_accept(_events: int) -> None:
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, OSError):
                return
            self._connect(name, sock, peer)

        return on_accept

    def _connect(self, name: str, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Relay an accepted connection to the current target (relay thread)."""
        transport, port = self._transport, self._targets.get(name)
        if not self._targets:  # the kernel is still starting: the first retarget relays it
            self._park(name, sock, peer, self._generation)
            return
        if transport is None or port is None or not transport.is_active():
            sock.close()  # disconnected: the ZeroMQ client retries on its own
            return
        generation = self._generation
        spare = self._spare.pop(name, None)
        if spare is not None:
            chan = spare[2]
            if spare[:2] == (transport, port) and not (chan.closed or chan.eof_received):
                self._attach(name, sock, peer, chan, generation, greeted=spare[3])
                return
            close_quietly(chan)
        self._fwd.open_channel(lambda: self._open(name, sock, peer, transport, port, generation))

    def _open(
        self,
        name: str,
        sock: socket.socket,
        peer: tuple[str, int],
        transport: paramiko.Transport,
        port: int,
        generation: int,
    ) -> None:
        try:
            chan = open_forward(transport, port, peer, timeout=10)
        except SSHChannelRefusedError as e:
            log.debug("remote port %s refused a connection (%s): parked", port, e)
            self._fwd.call(lambda: self._park(name, sock, peer, generation))
            return
        except SSHError as e:
            log.debug("%s", e)
            sock.close()
            return
        self._fwd.call(lambda: self._attach(name, sock, peer, chan, generation))

    def _attach(
        self,
        name: str,
        sock: socket.socket,
        peer: tuple[str, int],
        chan: paramiko.Channel,
        generation: int,
        greeted: bool = False,
    ) -> None:
        """Relay ``sock`` over ``chan`` (relay thread); ``greeted``: see :meth:`preopen`."""
        if self._generation != generation:  # retargeted, reconnected or closed meanwhile
            close_quietly(chan)
            self._connect(name, sock, peer)  # to the current target, or closed if none
            return
        pipe = Pipe(sock, chan, greeted)
        self._pipes.add(pipe)
        self._fwd.add_pipe(pipe, self._pipes.discard, self._stop_greeting)

    def _stop_greeting(self) -> None:
        self._greet = False

    def _park(self, name: str, sock: socket.socket, peer: tuple[str, int], generation: int) -> None:
        if generation != self._generation:  # retargeted meanwhile: try the new kernel now
            self._connect(name, sock, peer)
            return
        # A client whose handshake stalls reconnects (ZeroMQ: after 30 s); keep the newest.
        same = [p for p in self._parked if p[0] == name]
        if len(same) >= MAX_PARKED:
            self._parked.remove(same[0])
            same[0][1].close()
        self._parked.append((name, sock, peer))


def _listen(name: str, port: int, exact: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Reclaiming a dead server's ports must not fail on its TIME_WAIT leftovers.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            if exact:
                raise LocalPortError(
                    f"cannot listen on 127.0.0.1:{port} ({name}): {e.strerror or e}; "
                    "another process holds it, so start the kernel again with free ports"
                ) from None
            sock.bind(("127.0.0.1", 0))  # taken by someone else meanwhile: any port will do
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
