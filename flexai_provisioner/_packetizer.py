"""paramiko's Packetizer with fast paths for AES-GCM channel data, both ways (``_paramiko.py``
is the only importer; the names of paramiko's private state it uses are listed below).

Once the connection is up, a data packet in is decrypted straight out of the read-ahead
buffer and a data packet out is built and encrypted in one step, under paramiko's own locks
and with its sequence numbers, IVs and rekey counters. Key exchanges, packet dumps,
compression, other ciphers and read timeouts go paramiko's way."""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paramiko
from paramiko.common import MSG_CHANNEL_DATA

if TYPE_CHECKING:
    from ._paramiko import _SinkTransport, _Socket

READ_AHEAD = 256 * 1024  # one recv() serves several packets of bulk output

# The Packetizer state the fast paths use: paramiko's mangled names, interned (found by identity).
(_SOCK, _AEAD, _ENGINE, _IV, _SEQ, _BYTES, _PACKETS, _MAC, _CLOSED, _REKEY, _ZIP, _DUMP, _DONE) = (
    sys.intern(f"_Packetizer__{name}")
    for name in (
        *("socket", "aead_in", "block_engine_in", "iv_in", "sequence_number_in"),
        *("received_bytes", "received_packets", "mac_size_in", "closed", "need_rekey"),
        *("compress_engine_in", "dump_packets", "handshake_complete"),
    )
)
_AEAD_OUT, _ENGINE_OUT, _IV_OUT, _SEQ_OUT, _BLOCK_OUT, _ZIP_OUT, _LOCK_OUT, _SENT, _SENT_N = (
    sys.intern(f"_Packetizer__{name}")
    for name in (
        *("aead_out", "block_engine_out", "iv_out", "sequence_number_out", "block_size_out"),
        *("compress_engine_out", "write_lock", "sent_bytes", "sent_packets"),
    )
)
_HEADER = struct.Struct(">IBBII")  # packet length, padding length, type, channel, data length
# Padding sealed under a nonce used once needs no randomness: RFC 4253 asks for random bytes
# with chained (CBC) modes in mind, and AES-GCM is not one.
_PADDING = bytes(32)


class Packetizer(paramiko.Packetizer):
    """paramiko's, with :meth:`read_message` and :meth:`send_data` fast for AES-GCM."""

    transport: Callable[[], _SinkTransport | None] = staticmethod(lambda: None)  # a weakref

    def complete_handshake(self) -> None:  # once: paramiko's takes a lock and notifies per packet
        if not self.__dict__[_DONE]:
            super().complete_handshake()

    def read_message(self) -> tuple[int, paramiko.Message]:
        """paramiko's, but a sink's channel data is held for it at once (~30 % less CPU here
        under bulk output): no ``read_all`` loops, ``Message``, dispatch or copies."""
        d = self.__dict__
        sock: _Socket = d[_SOCK]
        while (transport := self.transport()) and not transport.in_kex and d[_AEAD]:
            if d[_REKEY] or d[_ZIP] or d[_DUMP]:
                break
            buf, pos = sock.buf, sock.pos
            size = int.from_bytes(buf[pos : pos + 4], "big") if len(buf) - pos >= 4 else -1
            end = pos + 4 + size + d[_MAC]
            if size < 0 or end > len(buf):
                if sock.gettimeout() is not None or end - pos > 2 * READ_AHEAD:
                    break  # read_all handles timeouts; a bogus length is its to refuse
                sock.fill(lambda: d[_CLOSED])
                continue
            if d[_BYTES] + end - pos >= self.REKEY_BYTES or d[_PACKETS] + 1 >= self.REKEY_PACKETS:
                break  # paramiko's path asks for the rekey
            view, iv = memoryview(buf), d[_IV]
            plain = d[_ENGINE].decrypt(iv, view[pos + 4 : end], view[pos : pos + 4])
            sock.pos, d[_IV] = end, self._inc_iv_counter(iv)
            seqno, d[_SEQ] = d[_SEQ], (d[_SEQ] + 1) & 0xFFFFFFFF
            d[_BYTES], d[_PACKETS] = d[_BYTES] + end - pos, d[_PACKETS] + 1
            if plain[1] == MSG_CHANNEL_DATA:  # padding length, type, channel, data length
                chan = transport._channels.get(int.from_bytes(plain[2:6], "big"))
                if chan is not None and "flexai_sink" in chan.__dict__:
                    n = min(int.from_bytes(plain[6:10], "big"), size - plain[0] - 10)
                    transport.held.setdefault(chan, []).append(memoryview(plain)[10 : 10 + n])
                    continue
            m = paramiko.Message(plain[2 : size - plain[0]])
            m.seqno = seqno
            return plain[1], m
        return super().read_message()

    def send_data(self, transport: paramiko.Transport, chan: paramiko.Channel, data: bytes) -> int:
        """``chan.send(data)``: the same window and packet size rules and errors, the packet
        built and encrypted in one step (no ``Message``, ``_build_packet`` or urandom call)."""
        with chan.lock:
            if chan.closed:
                raise OSError("Socket is closed")  # as paramiko's
            if not (size := chan._wait_for_send_window(len(data))):
                return 0
        d = self.__dict__
        with transport.clear_to_send_lock:  # held: no key exchange starts meanwhile
            ready = d[_AEAD_OUT] and not (d[_ZIP_OUT] or d[_DUMP] or d[_REKEY])
            if ready and transport.clear_to_send.is_set() and transport.active:
                with d[_LOCK_OUT]:  # between paramiko's own packets
                    if self._send_fast(chan.remote_chanid, memoryview(data)[:size], d):
                        return size
        m = paramiko.Message()
        m.add_byte(bytes((MSG_CHANNEL_DATA,)))
        m.add_int(chan.remote_chanid)
        m.add_string(data[:size])
        transport._send_user_message(m)  # during a key exchange, with a rekey due, other ciphers
        return size

    def _send_fast(self, chanid: int, data: memoryview, d: dict[str, Any]) -> bool:
        """Encrypt and write one data packet as ``send_message`` would; False if it is the one
        that should ask for a rekey (paramiko's path then sends it and asks)."""
        block = d[_BLOCK_OUT]
        padding = 3 + block - ((len(data) + 13) % block)  # as _build_packet pads
        length = len(data) + 10 + padding
        if d[_SENT] + length + 20 >= self.REKEY_BYTES or d[_SENT_N] + 1 >= self.REKEY_PACKETS:
            return False
        head = _HEADER.pack(length, padding, MSG_CHANNEL_DATA, chanid, len(data))
        iv = d[_IV_OUT]
        sealed = d[_ENGINE_OUT].encrypt(
            iv, b"".join((head[4:], data, _PADDING[:padding])), head[:4]
        )
        d[_IV_OUT], d[_SEQ_OUT] = self._inc_iv_counter(iv), (d[_SEQ_OUT] + 1) & 0xFFFFFFFF
        self.write_all(head[:4] + sealed)  # also paramiko's keepalive clock
        d[_SENT], d[_SENT_N] = d[_SENT] + length + 20, d[_SENT_N] + 1
        return True
