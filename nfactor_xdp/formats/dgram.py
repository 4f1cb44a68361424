"""The datagram sockets control messages travel on: UNIX sockets bound to a
path in the node's run directory between the processes of one node (only
who may enter that directory, root, can send to them), UDP between hosts."""
from __future__ import annotations

import errno
import os
import socket
import stat

SO_RCVBUFFORCE = 33  # Linux; Python's socket module does not name them
SO_SNDBUFFORCE = 32
DGRAM_QLEN = 8192
_QLEN_SYSCTL = "/proc/sys/net/unix/max_dgram_qlen"


def raise_dgram_qlen() -> None:
    """A UNIX datagram socket queues at most net.unix.max_dgram_qlen datagrams
    (10 by default, per network namespace, read when the socket is made);
    beyond that senders get EAGAIN.  A burst of migrations needs far more, so
    root raises it (as systemd does, to 512); the bytes queued stay bounded
    by each sender's send buffer."""
    try:
        with open(_QLEN_SYSCTL) as f:
            if int(f.read()) >= DGRAM_QLEN:
                return
        with open(_QLEN_SYSCTL, "w") as f:
            f.write(str(DGRAM_QLEN))
    except (OSError, ValueError):
        pass  # not root: the default queue


def bind_unix(sock: socket.socket, path: str) -> None:
    """Bind at `path`.  A socket file left by a process that died is
    replaced; one a live process is bound to is not (two controllers of one
    node would steal each other's messages)."""
    old = os.umask(0o077)
    try:
        try:
            sock.bind(path)
            return
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EADDRINUSE, "exists and is not a socket", path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # nobody is bound to it any more
                sock.bind(path)
                return
        raise OSError(errno.EADDRINUSE, "in use by a running process", path)
    finally:
        os.umask(old)


def open_socket(bind: str | tuple[str, int], buffer: int) -> socket.socket:
    """A non-blocking datagram socket bound to `bind`: a path (UNIX) or (host, port) (UDP)."""
    if isinstance(bind, str):
        raise_dgram_qlen()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # what waits in a receiver's queue is charged to the sender's buffer
        opts = (SO_SNDBUFFORCE, socket.SO_SNDBUF)
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in bind[0] else socket.AF_INET, socket.SOCK_DGRAM)
        opts = (SO_RCVBUFFORCE, socket.SO_RCVBUF)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, opts[0], buffer)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, opts[1], buffer)
        if isinstance(bind, str):
            bind_unix(sock, bind)
        else:
            sock.bind(bind)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
