"""Local query channel of a runtime: a UNIX stream socket per runtime in the
node's run directory (root only), one msgpack request and one reply per
connection, each framed by a 4-byte big-endian length.

Served from the runtime's own event loop between packet batches; a client
that stalls is cut off after a short timeout, a malformed request gets an
error reply, and neither stops packet processing for long.
"""
from __future__ import annotations

import os
import socket
import struct

import msgpack
from ..errors import NFactorError

MAX_REQUEST = 64 * 1024
MAX_REPLY = 256 * 1024 * 1024
SERVE_TIMEOUT = 0.2


class QueryError(NFactorError):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise QueryError("connection closed mid-message")
        buf += chunk
    return bytes(buf)


def _send(sock: socket.socket, obj) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv(sock: socket.socket, limit: int):
    (n,) = struct.unpack("!I", _recv_exact(sock, 4))
    if n > limit:
        raise QueryError(f"message of {n} bytes is over the {limit} limit")
    return msgpack.unpackb(_recv_exact(sock, n), raw=False)


class Server:
    def __init__(self, path: str, handler):
        self.path = path
        self.handler = handler  # dict request -> dict reply
        self.errors = 0
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(16)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve_pending(self, max_n: int | None = None) -> int:
        """Answer the connections waiting to be accepted (at most `max_n`:
        the rest wait for the next call, so a client asking page after page
        gets one per call); never raises."""
        served = 0
        while max_n is None or served < max_n:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return served
            except OSError:
                self.errors += 1
                return served
            served += 1
            with conn:
                conn.settimeout(SERVE_TIMEOUT)
                try:
                    req = _recv(conn, MAX_REQUEST)
                    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                        raise QueryError("request must be a map with a string 'op'")
                    reply = self.handler(req)
                except Exception as e:  # a bad request must not stop the runtime
                    self.errors += 1
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                try:
                    _send(conn, reply)
                except OSError:
                    self.errors += 1
        return served

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def request(path: str, op: str, timeout: float = 2.0, **args) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            _send(s, {"op": op, **args})
            reply = _recv(s, MAX_REPLY)
        except (OSError, QueryError) as e:
            raise QueryError(f"{path}: {e}") from None
    if not isinstance(reply, dict):
        raise QueryError(f"{path}: malformed reply")
    if reply.get("ok") is False:
        raise QueryError(f"{path}: {reply.get('error')}")
    return reply
