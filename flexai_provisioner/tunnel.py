"""Local port forwards over SSH, all served by one selector thread per process.

Each kernel gets a :class:`Tunnel`: five listening sockets on 127.0.0.1 whose accepted
connections are relayed to the kernel's ports on the instance through ``direct-tcpip``
channels of the instance's one SSH transport. One thread relays every connection of every
tunnel with large reads and no per-message thread hops; only opening a channel (a round
trip) happens in a small worker pool so that it never stalls the relay.

The local ports stay the same for the kernel's whole life: a restart re-targets them at the
new kernel's remote ports, a reconnect swaps in the new transport, and ZeroMQ clients just
reconnect to the same addresses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import paramiko

from .errors import LocalPortError, SSHChannelRefusedError, SSHError
from .ssh import close_quietly, consumed, grant, open_forward, set_sink

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
RETRY_INTERVAL = 0.002  # how soon to retry a send into a full SSH channel window
MAX_PARKED = 4  # refused connections kept per port until the next retarget


class _Pipe:
    """One relayed connection: a local socket and its SSH channel.

    Socket to channel runs on the relay thread. Channel to socket runs in the SSH
    transport's own thread when the transport supports it (:func:`ssh.set_sink`): a message
    goes straight from decryption to ``send()``, and only what the socket cannot take at
    once waits in ``to_sock`` for the relay thread. ``lock`` guards ``to_sock`` and
    ``closed``, the state both threads touch.
    """

    def __init__(self, sock: socket.socket, chan: paramiko.Channel):
        self.sock = sock
        self.chan = chan
        self.lock = threading.Lock()
        self.to_chan = b""  # read from the socket, not yet accepted by the channel window
        self.to_sock = bytearray()  # from the channel, not yet accepted by the socket buffer
        self.sock_eof = False
        self.chan_eof = False
        self.closed = False
        self.direct = False  # channel data arrives through the sink, not chan.recv()
        self.events = (selectors.EVENT_READ, selectors.EVENT_READ)  # (socket's, channel's)
        self.on_sock: Callable[[int], None] = lambda _events: None
        self.on_chan: Callable[[int], None] = lambda _events: None
        self.on_close: Callable[[_Pipe], None] = lambda _pipe: None


class Forwarder:
    """The process-wide relay thread. Use :meth:`instance`."""

    _instance: Forwarder | None = None
    _instance_lock = threading.Lock()

    @classmethod
    def instance(cls) -> Forwarder:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._calls: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stalled: set[_Pipe] = set()
        self._opener = ThreadPoolExecutor(max_workers=4, thread_name_prefix="flexai-chan-open")
        threading.Thread(target=self._run, name="flexai-forwarder", daemon=True).start()

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the relay thread (all selector state is touched only there)."""
        with self._lock:
            wake = not self._calls
            self._calls.append(fn)
        if wake:
            os.write(self._wake_w, b"x")

    def open_channel(self, fn: Callable[[], None]) -> None:
        self._opener.submit(fn)

    def _run(self) -> None:
        while True:
            timeout = RETRY_INTERVAL if self._stalled else None
            for key, events in self._sel.select(timeout):
                if key.data is None:
                    self._drain_calls()
                else:
                    try:
                        key.data(events)
                    except Exception:
                        log.exception("port forward failed")
            for pipe in list(self._stalled):
                self._flush_to_chan(pipe)

    def _drain_calls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        with self._lock:
            calls, self._calls = self._calls, []
        for fn in calls:
            try:
                fn()
            except Exception:
                log.exception("port forward bookkeeping failed")

    # -- relaying (relay thread only, but for _deliver) ---------------------------------

    def add_pipe(self, pipe: _Pipe, on_close: Callable[[_Pipe], None]) -> None:
        pipe.sock.setblocking(False)
        pipe.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe.chan.settimeout(0.0)
        pipe.on_close = on_close

        def on_sock(events: int) -> None:
            if events & selectors.EVENT_READ:
                self._sock_readable(pipe)
            if events & selectors.EVENT_WRITE:
                self._flush_to_sock(pipe)
            self._maybe_close(pipe)

        def on_chan(_events: int) -> None:
            self._chan_readable(pipe)
            self._maybe_close(pipe)

        pipe.on_sock, pipe.on_chan = on_sock, on_chan
        self._sel.register(pipe.sock, selectors.EVENT_READ, on_sock)
        # Readable on data only without a sink; with one, on end of file and close.
        self._sel.register(pipe.chan.fileno(), selectors.EVENT_READ, on_chan)
        pipe.direct = set_sink(pipe.chan, lambda data: self._deliver(pipe, data))

    def _interest(self, pipe: _Pipe) -> None:
        """Read only what there is room to pass on: back-pressure in both directions."""
        if pipe.closed:
            return
        with pipe.lock:
            backlog = bool(pipe.to_sock)
        sock_events = 0
        if not pipe.to_chan and not pipe.sock_eof:
            sock_events |= selectors.EVENT_READ
        if backlog:
            sock_events |= selectors.EVENT_WRITE
        chan_events = selectors.EVENT_READ if not backlog and not pipe.chan_eof else 0
        if (sock_events, chan_events) != pipe.events:  # the common case costs nothing
            pipe.events = (sock_events, chan_events)
            self._set(pipe.sock, sock_events, pipe.on_sock)
            self._set(pipe.chan.fileno(), chan_events, pipe.on_chan)

    def _set(self, fileobj: socket.socket | int, events: int, data: Callable[[int], None]) -> None:
        registered = fileobj in self._sel.get_map()
        if events and registered:
            self._sel.modify(fileobj, events, data)
        elif events:
            self._sel.register(fileobj, events, data)
        elif registered:
            self._sel.unregister(fileobj)

    def _sock_readable(self, pipe: _Pipe) -> None:
        try:
            data = pipe.sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            pipe.sock_eof = True
            with contextlib.suppress(OSError, EOFError):
                pipe.chan.shutdown_write()
        else:
            pipe.to_chan = data
            self._flush_to_chan(pipe)
        self._interest(pipe)

    def _flush_to_chan(self, pipe: _Pipe) -> None:
        while pipe.to_chan:
            try:
                sent = pipe.chan.send(pipe.to_chan)
            except TimeoutError:
                sent = 0
            except (OSError, EOFError):
                pipe.to_chan = b""
                pipe.sock_eof = pipe.chan_eof = True
                break
            if sent == 0:
                self._stalled.add(pipe)
                return
            pipe.to_chan = pipe.to_chan[sent:]
        if pipe in self._stalled:
            self._stalled.discard(pipe)
            self._interest(pipe)

    def _chan_readable(self, pipe: _Pipe) -> None:
        with pipe.lock:
            backlog = bool(pipe.to_sock)
        if backlog:  # the end of file must not overtake it: _interest re-arms the channel
            self._interest(pipe)
            return
        try:
            data = pipe.chan.recv(CHUNK)  # with a sink, only ever end of file
        except TimeoutError:
            return
        except (OSError, EOFError):
            data = b""
        if not data:
            pipe.chan_eof = True
            with contextlib.suppress(OSError):
                pipe.sock.shutdown(socket.SHUT_WR)
        else:
            self._deliver(pipe, data, credited=True)
        self._interest(pipe)

    def _deliver(self, pipe: _Pipe, data: bytes, credited: bool = False) -> None:
        """Pass channel data on to the socket. Runs in the transport's thread with a sink.

        Never blocks: what the socket does not take now is queued for the relay thread.
        The window is credited only for bytes the socket took, so a slow reader holds the
        remote side back instead of growing our queue without bound.
        """
        sent, error = 0, False
        with pipe.lock:
            if pipe.closed:
                return
            if pipe.to_sock:
                pipe.to_sock += data
                return
            try:
                sent = pipe.sock.send(data)
            except BlockingIOError:
                pass
            except OSError:
                error = True
            if sent < len(data) and not error:
                pipe.to_sock += data[sent:]
        credit = 0 if credited else consumed(pipe.chan, sent)
        if error:
            self.call(lambda: self._broken(pipe))
        elif sent < len(data) or credit:
            self.call(lambda: self._after_delivery(pipe, credit))

    def _after_delivery(self, pipe: _Pipe, credit: int) -> None:
        if credit and not pipe.closed:
            grant(pipe.chan, credit)
        self._interest(pipe)

    def _flush_to_sock(self, pipe: _Pipe) -> None:
        with pipe.lock:
            if pipe.closed:
                return
            try:
                sent = pipe.sock.send(pipe.to_sock)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = -1
            if sent > 0:
                del pipe.to_sock[:sent]
        if sent < 0:
            self._broken(pipe)
            return
        credit = consumed(pipe.chan, sent) if pipe.direct else 0
        self._after_delivery(pipe, credit)

    def _broken(self, pipe: _Pipe) -> None:
        with pipe.lock:
            pipe.to_sock.clear()
        pipe.to_chan = b""
        pipe.sock_eof = pipe.chan_eof = True
        self._maybe_close(pipe)

    def _maybe_close(self, pipe: _Pipe) -> None:
        if pipe.closed:
            return
        done_in = pipe.sock_eof and not pipe.to_chan
        done_out = pipe.chan_eof and not pipe.to_sock
        if (done_in and done_out) or (pipe.chan.closed and not pipe.to_sock):
            self.close_pipe(pipe)
            pipe.on_close(pipe)

    def close_pipe(self, pipe: _Pipe) -> None:
        with pipe.lock:
            if pipe.closed:
                return
            pipe.closed = True
        self._stalled.discard(pipe)
        for fileobj in (pipe.sock, pipe.chan.fileno()):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fileobj)
        pipe.sock.close()
        close_quietly(pipe.chan)

    def add_listener(self, sock: socket.socket, on_accept: Callable[[int], None]) -> None:
        self._sel.register(sock, selectors.EVENT_READ, on_accept)

    def remove_listener(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        sock.close()


class Tunnel:
    """Fixed local ports forwarded to a (re-targetable) set of ports on the instance.

    A connection whose remote port refuses it (the kernel is being restarted, nothing
    listens yet) is not closed but parked until the next :meth:`retarget`, and relayed to
    the new kernel the moment it is known: the client need not wait out its reconnect
    interval (100 ms for ZeroMQ) after a restart. So is a connection that comes before the
    first :meth:`retarget`, from a frontend that chose the ports while the instance boots.
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
        self._fwd = forwarder or Forwarder.instance()
        self._transport: paramiko.Transport | None = None
        self._targets: dict[str, int] = {}
        self._generation = 0  # bumped by every retarget, disconnect and close
        self._pipes: set[_Pipe] = set()
        self._parked: list[tuple[str, socket.socket, tuple[str, int]]] = []
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

    def close(self) -> None:
        """Stop listening and close every relayed connection."""
        self._transport = None
        self._generation += 1

        def close_all() -> None:
            for sock in self._listeners.values():
                self._fwd.remove_listener(sock)
            self._drop_pipes()
            self._drop_parked()

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

        def attach() -> None:
            if self._generation != generation:  # retargeted, reconnected or closed meanwhile
                close_quietly(chan)
                self._connect(name, sock, peer)  # to the current target, or closed if none
                return
            pipe = _Pipe(sock, chan)
            self._pipes.add(pipe)
            self._fwd.add_pipe(pipe, self._pipes.discard)

        self._fwd.call(attach)

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
