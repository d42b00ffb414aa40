"""The process-wide relay thread: every forwarded connection of every tunnel, one selector.

One thread relays every connection with large reads and no per-message thread hops; only
opening a channel (a round trip) happens in the process's worker pool (:mod:`.executor`)
so that it never stalls the relay. Channel data reaches the local socket in the SSH
transport's own thread where the transport supports it (:func:`ssh.set_sink`), else
through ``chan.fileno()`` and ``recv()`` on this thread.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import selectors
import socket
import threading
from collections.abc import Callable

import paramiko

from . import executor, zmtp
from .ssh import close_quietly, consumed, grant, send_data, set_sink

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
RETRY_INTERVAL = 0.002  # how soon to retry a send into a full SSH channel window


class Pipe:
    """One relayed connection: a local socket and its SSH channel.

    Socket to channel runs on the relay thread. Channel to socket runs in the SSH
    transport's own thread when the transport supports it (:func:`ssh.set_sink`): a message
    goes straight from decryption to ``send()``, and only what the socket cannot take at
    once waits in ``to_sock`` for the relay thread. ``lock`` guards ``to_sock`` and
    ``closed``, the state both threads touch.

    A channel that was sent a ZeroMQ greeting ahead (``greeted``, see :mod:`.zmtp`) does not
    get the client's: it is read into ``greeting``, checked and dropped, then the socket side
    falls back to the plain path.
    """

    def __init__(self, sock: socket.socket, chan: paramiko.Channel, greeted: bool = False):
        self.sock = sock
        self.chan = chan
        self.greeting = bytearray() if greeted else None  # the client's, until it is whole
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
        self.on_close: Callable[[Pipe], None] = lambda _pipe: None
        self.on_mismatch: Callable[[], None] = lambda: None


class Forwarder:
    """The relay thread and its selector; :data:`forwarder` gives the process's one."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._calls: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stalled: set[Pipe] = set()
        threading.Thread(target=self._run, name="flexai-forwarder", daemon=True).start()

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the relay thread (all selector state is touched only there)."""
        with self._lock:
            wake = not self._calls
            self._calls.append(fn)
        if wake:
            os.write(self._wake_w, b"x")

    def open_channel(self, fn: Callable[[], None]) -> None:
        """Run ``fn``, which opens a channel (a round trip), off the relay thread."""
        executor.submit(fn)

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

    def add_pipe(
        self,
        pipe: Pipe,
        on_close: Callable[[Pipe], None],
        on_mismatch: Callable[[], None] = lambda: None,
    ) -> None:
        """Relay ``pipe``; ``on_mismatch`` if its client's greeting is not the one sent ahead."""
        pipe.sock.setblocking(False)
        pipe.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe.chan.settimeout(0.0)
        pipe.on_close, pipe.on_mismatch = on_close, on_mismatch

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
        if pipe.greeting is not None:
            pipe.on_sock = functools.partial(self._client_greeting, pipe, on_sock)
        self._sel.register(pipe.sock, selectors.EVENT_READ, pipe.on_sock)
        # Readable on data only without a sink; with one, on end of file and close.
        self._sel.register(pipe.chan.fileno(), selectors.EVENT_READ, on_chan)
        pipe.direct = set_sink(pipe.chan, lambda data: self._deliver(pipe, data))

    def _client_greeting(self, pipe: Pipe, on_sock: Callable[[int], None], _events: int) -> None:
        """Read the client's greeting; once whole and like the one sent ahead, drop it, send
        on what followed it and hand the socket to the plain path (``on_sock``)."""
        assert pipe.greeting is not None
        if (data := _recv(pipe.sock)) is None:
            return
        if not data and not pipe.greeting:  # gone before a word: nothing to pass on
            self._broken(pipe)
            return
        pipe.greeting += data
        try:
            if not data:  # as libzmq refuses the kernel's answer (another mechanism)
                raise zmtp.Mismatch("the client left during its greeting")
            whole = zmtp.check_greeting(pipe.greeting)
        except zmtp.Mismatch as e:
            # The kernel has the greeting sent ahead, not this one: the connection is lost
            # (the ZeroMQ client reconnects by itself), and the next ones go verbatim.
            log.info("ZeroMQ client unlike the greeting sent ahead (%s): reconnecting it", e)
            self.close_pipe(pipe)
            pipe.on_close(pipe)
            pipe.on_mismatch()
            return
        if whole:
            pipe.to_chan = bytes(pipe.greeting[zmtp.GREETING_SIZE :])
            pipe.greeting = None
            pipe.on_sock = on_sock
            self._sel.modify(pipe.sock, selectors.EVENT_READ, on_sock)
            self._flush_to_chan(pipe)
            self._interest(pipe)
            self._maybe_close(pipe)

    def _interest(self, pipe: Pipe) -> None:
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

    def _sock_readable(self, pipe: Pipe) -> None:
        if (data := _recv(pipe.sock)) is None:
            return
        if not data:
            pipe.sock_eof = True
            with contextlib.suppress(OSError, EOFError):
                pipe.chan.shutdown_write()
        else:
            pipe.to_chan = data
            self._flush_to_chan(pipe)
        self._interest(pipe)

    def _flush_to_chan(self, pipe: Pipe) -> None:
        while pipe.to_chan:
            try:
                sent = send_data(pipe.chan, pipe.to_chan)
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

    def _chan_readable(self, pipe: Pipe) -> None:
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

    def _deliver(self, pipe: Pipe, data: bytes, credited: bool = False) -> None:
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

    def _after_delivery(self, pipe: Pipe, credit: int) -> None:
        if credit and not pipe.closed:
            grant(pipe.chan, credit)
        self._interest(pipe)

    def _flush_to_sock(self, pipe: Pipe) -> None:
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

    def _broken(self, pipe: Pipe) -> None:
        with pipe.lock:
            pipe.to_sock.clear()
        pipe.to_chan = b""
        pipe.sock_eof = pipe.chan_eof = True
        self._maybe_close(pipe)

    def _maybe_close(self, pipe: Pipe) -> None:
        if pipe.closed:
            return
        done_in = pipe.sock_eof and not pipe.to_chan
        done_out = pipe.chan_eof and not pipe.to_sock
        # A channel closed by the remote side may still hold data for chan.recv() (without
        # a sink): that is passed on first.
        drained = not pipe.to_sock and (pipe.direct or not pipe.chan.recv_ready())
        if (done_in and done_out) or (pipe.chan.closed and drained):
            self.close_pipe(pipe)
            pipe.on_close(pipe)

    def close_pipe(self, pipe: Pipe) -> None:
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


#: The process's one relay thread, started on first use.
forwarder = executor.one_per_process(Forwarder)


def _recv(sock: socket.socket) -> bytes | None:
    """What a non-blocking socket has now: None if nothing yet, ``b""`` at its end or on an
    error (both end the socket's side of the pipe)."""
    try:
        return sock.recv(CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""
