"""A fault-injecting TCP proxy for gRPC (HTTP/2 over cleartext): forwards bytes both ways and, while armed,
flips one byte in the middle of the next large gRPC message a client sends (a KV chunk on its way to a decode
worker), leaving the HTTP/2 and gRPC framing intact so only the receiver's checksum can notice."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, PADDED = 0x0, 0x8


@dataclass(slots=True)
class _Msg:
    """Where one HTTP/2 stream is in its gRPC message sequence (5-byte prefix, then the body)."""

    header: bytes = b""
    left: int = 0  # body bytes still to come
    size: int = 0


class CorruptingProxy:
    """`listen` -> `target`; `arm(n)` corrupts the next `n` client messages of at least `min_bytes`."""

    def __init__(self, target: str, min_bytes: int = 512) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.min_bytes = min_bytes
        self.armed = 0
        self.corrupted = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, name="faultproxy", daemon=True).start()

    def arm(self, n: int = 1) -> None:
        with self._lock:
            self.armed += n

    def _take(self) -> bool:
        with self._lock:
            if self.armed <= 0:
                return False
            self.armed -= 1
            self.corrupted += 1
            return True

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._client_to_server, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()

    def _client_to_server(self, src: socket.socket, dst: socket.socket) -> None:
        streams: dict[int, _Msg] = {}
        try:
            dst.sendall(_read_exact(src, len(PREFACE)))
            while True:
                head = _read_exact(src, 9)
                length = int.from_bytes(head[:3], "big")
                kind, flags, stream = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = bytearray(_read_exact(src, length))
                if kind == DATA and not flags & PADDED:
                    self._walk(streams.setdefault(stream, _Msg()), payload)
                dst.sendall(head + bytes(payload))
        except OSError:
            pass
        finally:
            _close(src, dst)

    def _walk(self, msg: _Msg, payload: bytearray) -> None:
        """Follow gRPC message boundaries through one DATA payload; flip the middle byte of a chosen message."""
        i = 0
        while i < len(payload):
            if msg.left == 0:
                take = min(5 - len(msg.header), len(payload) - i)
                msg.header += bytes(payload[i:i + take])
                i += take
                if len(msg.header) == 5:
                    msg.size = msg.left = int.from_bytes(msg.header[1:5], "big")
                    msg.header = b""
                continue
            take = min(msg.left, len(payload) - i)
            middle = msg.size // 2  # position in the body
            pos = msg.size - msg.left  # body position of payload[i]
            if msg.size >= self.min_bytes and pos <= middle < pos + take and self._take():
                payload[i + middle - pos] ^= 0xFF
            msg.left -= take
            i += take

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise OSError("closed")
        buf += part
    return bytes(buf)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(src, dst)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
