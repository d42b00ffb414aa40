"""A distant network in front of an instance's SSH endpoint: a TCP relay on loopback that
delays each direction by a one-way latency and, optionally, paces it to a bandwidth.

On loopback every exchange is free; a real GPU instance is 10-80 ms away, and what a
protocol costs there is the number of serial round trips it makes. The relay makes that
visible here. Its shape is read for every chunk, so a change at run time applies to
connections already open, as when a real route degrades.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable

from .sockets import accepted, close_now

log = logging.getLogger("flexai_provisioner.emulator.link")
_ids = itertools.count(1)

Shape = Callable[[], tuple[float, float]]
"""Returns (one-way latency in seconds, bandwidth in bytes per second or 0 for unlimited)."""

_READ = 256 * 1024
# A slow reader must push back on the sender, as a real link's window does, instead of
# letting the relay buffer without bound.
_MAX_QUEUED = 4 * 1024 * 1024


class DelayedLink:
    """Listens on ``127.0.0.1:port`` and relays each connection to ``target_port``."""

    def __init__(self, target_port: int, shape: Shape):
        self._target_port = target_port
        self._shape = shape
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._spawn(self._accept, "link-accept")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        for downstream in accepted(self._listener):
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target_port), timeout=5)
            except OSError:
                downstream.close()  # as a route to a dead host would: the client sees a reset
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._stopped:
                    downstream.close()
                    upstream.close()
                    return
                self._connections.add(
                    _Connection(downstream, upstream, self._shape, self._spawn, self._ended)
                )

    def stop(self, grace: float = 3.0) -> None:
        """Close the listener and every relayed connection; wait for the relay's threads."""
        with self._lock:
            self._stopped = True
            connections, self._connections = list(self._connections), set()
        close_now(self._listener)
        for connection in connections:
            connection.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(grace)

    def _ended(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)


class _Connection:
    """One relayed connection: a delay line each way; closed once both have ended."""

    def __init__(
        self,
        downstream: socket.socket,
        upstream: socket.socket,
        shape: Shape,
        spawn: Callable[[Callable[[], None], str], None],
        ended: Callable[[_Connection], None],
    ):
        self._ended = ended
        self.sockets = pair = (downstream, upstream)
        self._running = 2
        self._lock = threading.Lock()
        self._id = next(_ids)
        self._t0 = time.monotonic()
        self._flight: list = [None, 0.0, 0]  # direction, start, bytes of the flight in the air
        self.flights = 0
        for sock in self.sockets:
            # The relay must not add Nagle's wait to the delay it models.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lines = [
            _DelayLine(src, dst, shape, self, way)
            for (src, dst), way in ((pair, "up"), (pair[::-1], "down"))
        ]
        for line in self._lines:
            spawn(line.read, "link-read")
            spawn(line.write, "link-write")

    def saw(self, way: str, size: int) -> None:
        """Count serial flights (a run of data one way, ended by data the other way): the
        round trips a protocol makes are what the link shows; DEBUG logs each flight."""
        with self._lock:
            flight = self._flight
            if flight[0] != way:
                if flight[0] is not None:
                    self._log_flight()
                self.flights += 1
                flight[:] = [way, time.monotonic() - self._t0, 0]
            flight[2] += size

    def _log_flight(self) -> None:
        way, start, size = self._flight
        log.debug(
            "link %d flight %d %s at %.1f ms: %d bytes",
            self._id,
            self.flights,
            way,
            start * 1000,
            size,
        )

    def line_ended(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            with self._lock:
                if self._flight[0] is not None:
                    self._log_flight()
            log.debug("link %d closed after %d flights", self._id, self.flights)
            self.close()
            self._ended(self)

    def abort(self) -> None:
        """A broken side ends the whole connection, as a reset would; both lines then end."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """At once: what is still in flight is dropped, as when a host goes away."""
        for line in self._lines:
            line.halt()
        for sock in self.sockets:
            close_now(sock)


class _DelayLine:
    """One direction of one connection: a reader that stamps each chunk with the time it is
    due at the far end, and a writer that hands it on then, in order."""

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        shape: Shape,
        connection: _Connection,
        way: str,
    ):
        self._src, self._dst, self._shape, self._connection = src, dst, shape, connection
        self._way = way
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._queued = 0
        self._ready = threading.Condition()
        self._done = False
        self._link_free = 0.0  # when the modelled wire has sent everything queued so far

    def _due(self, size: int) -> float:
        one_way, rate = self._shape()
        now = time.monotonic()
        if rate <= 0:
            return now + one_way
        self._link_free = max(now, self._link_free) + size / rate
        return self._link_free + one_way

    def read(self) -> None:
        try:
            while data := self._src.recv(_READ):
                self._connection.saw(self._way, len(data))
                with self._ready:
                    while self._queued > _MAX_QUEUED and not self._done:
                        self._ready.wait()
                    self._queue.append((self._due(len(data)), data))
                    self._queued += len(data)
                    self._ready.notify_all()
            with self._ready:  # EOF travels with the same delay as the data before it
                self._queue.append((self._due(0), b""))
                self._ready.notify_all()
        except OSError:
            self._fail()

    def write(self) -> None:
        try:
            while True:
                with self._ready:
                    while not self._queue and not self._done:
                        self._ready.wait()
                    if self._done:
                        break
                    due, data = self._queue[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        self._ready.wait(wait)  # a new chunk or a failure may wake it early
                        continue
                    self._queue.popleft()
                    self._queued -= len(data)
                    self._ready.notify_all()
                if not data:
                    self._dst.shutdown(socket.SHUT_WR)
                    break
                self._dst.sendall(data)
        except OSError:
            self._fail()
        self._connection.line_ended()

    def halt(self) -> None:
        with self._ready:
            self._done = True
            self._ready.notify_all()

    def _fail(self) -> None:
        self.halt()
        self._connection.abort()
