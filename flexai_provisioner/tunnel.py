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

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
RETRY_INTERVAL = 0.002  # how soon to retry a send into a full SSH channel window


class _Pipe:
    """One relayed connection: a local socket and its SSH channel."""

    def __init__(self, sock: socket.socket, chan: paramiko.Channel):
        self.sock = sock
        self.chan = chan
        self.to_chan = b""  # read from the socket, not yet accepted by the channel window
        self.to_sock = b""  # read from the channel, not yet accepted by the socket buffer
        self.sock_eof = False
        self.chan_eof = False
        self.on_sock: Callable[[int], None] = lambda _events: None
        self.on_chan: Callable[[int], None] = lambda _events: None


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
            self._calls.append(fn)
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

    # -- relaying (relay thread only) --------------------------------------------------

    def add_pipe(self, pipe: _Pipe, on_close: Callable[[_Pipe], None]) -> None:
        pipe.sock.setblocking(False)
        pipe.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe.chan.settimeout(0.0)

        def on_sock(events: int) -> None:
            if events & selectors.EVENT_READ:
                self._sock_readable(pipe)
            if events & selectors.EVENT_WRITE:
                self._flush_to_sock(pipe)
            self._maybe_close(pipe, on_close)

        def on_chan(_events: int) -> None:
            self._chan_readable(pipe)
            self._maybe_close(pipe, on_close)

        pipe.on_sock, pipe.on_chan = on_sock, on_chan
        self._sel.register(pipe.sock, selectors.EVENT_READ, on_sock)
        self._sel.register(pipe.chan.fileno(), selectors.EVENT_READ, on_chan)

    def _interest(self, pipe: _Pipe) -> None:
        """Read only what there is room to pass on: back-pressure in both directions."""
        sock_events = 0
        if not pipe.to_chan and not pipe.sock_eof:
            sock_events |= selectors.EVENT_READ
        if pipe.to_sock:
            sock_events |= selectors.EVENT_WRITE
        chan_events = selectors.EVENT_READ if not pipe.to_sock and not pipe.chan_eof else 0
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
        try:
            data = pipe.chan.recv(CHUNK)
        except TimeoutError:
            return
        except (OSError, EOFError):
            data = b""
        if not data:
            pipe.chan_eof = True
            with contextlib.suppress(OSError):
                pipe.sock.shutdown(socket.SHUT_WR)
        else:
            pipe.to_sock = data
            self._flush_to_sock(pipe)
        self._interest(pipe)

    def _flush_to_sock(self, pipe: _Pipe) -> None:
        try:
            sent = pipe.sock.send(pipe.to_sock)
        except BlockingIOError:
            sent = 0
        except OSError:
            pipe.to_sock = b""
            pipe.sock_eof = pipe.chan_eof = True
            return
        pipe.to_sock = pipe.to_sock[sent:]
        self._interest(pipe)

    def _maybe_close(self, pipe: _Pipe, on_close: Callable[[_Pipe], None]) -> None:
        done_in = pipe.sock_eof and not pipe.to_chan
        done_out = pipe.chan_eof and not pipe.to_sock
        if (done_in and done_out) or pipe.chan.closed:
            self.close_pipe(pipe)
            on_close(pipe)

    def close_pipe(self, pipe: _Pipe) -> None:
        self._stalled.discard(pipe)
        for fileobj in (pipe.sock, pipe.chan.fileno()):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fileobj)
        pipe.sock.close()
        pipe.chan.close()

    def add_listener(self, sock: socket.socket, on_accept: Callable[[int], None]) -> None:
        self._sel.register(sock, selectors.EVENT_READ, on_accept)

    def remove_listener(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        sock.close()


class Tunnel:
    """Fixed local ports forwarded to a (re-targetable) set of ports on the instance."""

    def __init__(
        self,
        names: list[str],
        ports: dict[str, int] | None = None,
        forwarder: Forwarder | None = None,
    ):
        self._fwd = forwarder or Forwarder.instance()
        self._transport: paramiko.Transport | None = None
        self._targets: dict[str, int] = {}
        self._pipes: set[_Pipe] = set()
        self._listeners: dict[str, socket.socket] = {}
        self.local_ports: dict[str, int] = {}
        for name in names:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # Reclaiming a dead server's ports must not fail on its TIME_WAIT leftovers.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", (ports or {}).get(name, 0)))
            except OSError:  # taken by someone else meanwhile: any port will do
                sock.bind(("127.0.0.1", 0))
            sock.listen(16)
            sock.setblocking(False)
            self._listeners[name] = sock
            self.local_ports[name] = sock.getsockname()[1]
        for name, sock in self._listeners.items():
            self._fwd.call(lambda n=name, s=sock: self._fwd.add_listener(s, self._acceptor(n, s)))

    def retarget(self, transport: paramiko.Transport, remote_ports: dict[str, int]) -> None:
        """Send new connections to these ports via this transport; drop the old ones."""
        self._transport = transport
        self._targets = dict(remote_ports)
        self._fwd.call(self._drop_pipes)

    def disconnect(self) -> None:
        """The transport died: close relayed connections now, so clients notice and wait.

        Until :meth:`retarget` supplies a new transport, new connections are refused.
        """
        self._transport = None
        self._fwd.call(self._drop_pipes)

    def close(self) -> None:
        """Stop listening and close every relayed connection."""
        self._transport = None

        def close_all() -> None:
            for sock in self._listeners.values():
                self._fwd.remove_listener(sock)
            self._drop_pipes()

        self._fwd.call(close_all)

    def _drop_pipes(self) -> None:
        for pipe in list(self._pipes):
            self._fwd.close_pipe(pipe)
        self._pipes.clear()

    def _acceptor(self, name: str, listener: socket.socket) -> Callable[[int], None]:
        def on_accept(_events: int) -> None:
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, OSError):
                return
            transport, port = self._transport, self._targets.get(name)
            if transport is None or port is None or not transport.is_active():
                sock.close()  # disconnected: the ZeroMQ client retries on its own
                return
            self._fwd.open_channel(lambda: self._open(sock, peer, transport, port))

        return on_accept

    def _open(
        self, sock: socket.socket, peer: tuple[str, int], transport: paramiko.Transport, port: int
    ) -> None:
        try:
            chan = transport.open_channel("direct-tcpip", ("127.0.0.1", port), peer, timeout=10)
        except (paramiko.SSHException, OSError, EOFError) as e:
            log.debug("cannot open a channel to remote port %s: %s", port, e)
            sock.close()
            return

        def attach() -> None:
            if self._transport is not transport:  # closed or reconnected meanwhile
                sock.close()
                chan.close()
                return
            pipe = _Pipe(sock, chan)
            self._pipes.add(pipe)
            self._fwd.add_pipe(pipe, self._pipes.discard)

        self._fwd.call(attach)
