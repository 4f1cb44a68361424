"""systemd's readiness protocol (sd_notify(3)) without libsystemd: one
datagram of `KEY=value` lines to the socket named by $NOTIFY_SOCKET, which
systemd sets for a Type=notify service (absent: nothing is sent)."""
from __future__ import annotations

import os
import socket

from .. import logs

log = logs.get("supervisor")


class Notifier:
    def __init__(self) -> None:
        # Left in the environment: a supervisor that re-executes itself (same
        # pid, the service's main process) tells systemd again.  Children
        # inherit it too but never notify (and NotifyAccess=main ignores them).
        name = os.environ.get("NOTIFY_SOCKET")
        self.sock = None
        if name:
            addr = "\0" + name[1:] if name.startswith("@") else name  # '@': an abstract socket
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                # connected now: the address stays reachable after the process enters another namespace
                self.sock.connect(addr)
            except OSError as e:  # as sd_notify(3): not fatal (systemd then says the start timed out)
                self.sock.close()
                self.sock = None
                log.warning("cannot tell systemd the node's state: NOTIFY_SOCKET %s: %s", name, e.strerror)

    def notify(self, *fields: str) -> bool:
        """Send `fields` (e.g. READY=1); False if there is no one to tell or it failed."""
        if self.sock is None:
            return False
        try:
            self.sock.send("\n".join(fields).encode())
            return True
        except OSError:
            return False
