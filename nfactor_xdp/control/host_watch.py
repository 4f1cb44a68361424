"""A worker host's failure (docs/architecture.md, Hosts), as the controller
sees it.  A runtime's death on a live host is reported by that host's
supervisor (RUNTIME_EXITED); a dead host reports nothing.  Its supervisor
says HOST_ALIVE every heartbeat; when it has been silent for the host
timeout and every runtime of the host has failed (missed heartbeats), the
host is failed:

1. fenced in the ingress switch (a flag in its hosts entry): whatever it
   still sends is dropped, nothing is sent to it;
2. only then its runtimes are marked exited in the view, which makes the
   peers holding their flows' snapshots take the flows over (takeover.py).

A fenced host is lifted when its supervisor is heard again and none of the
runtime processes of the fencing is still alive there; while one is, the
supervisor is told to kill it (HOST_FENCED).  Runtimes of a fenced host are
not let register meanwhile.
"""
from __future__ import annotations

import time

from .. import logs
from ..formats import fabric
from ..formats.messages import MsgType

log = logs.get("controller")


class HostWatch:
    def __init__(self, ctl, hosts: int, timeout: float):
        """ctl: the controller (view, maps, _change, push_view, ep);
        hosts: how many hosts the node has (0: one host, nothing to watch)."""
        self.ctl = ctl
        self.hosts = hosts
        self.timeout = timeout
        self.alive: dict[int, float] = {}            # host -> last HOST_ALIVE (monotonic)
        self.fenced: dict[int, dict[int, object]] = {}  # host -> {runtime id: pid at the fencing}
        self.stats = {"hosts_fenced": 0, "hosts_unfenced": 0, "fenced_kills_asked": 0}

    def recover(self) -> None:
        """After a restart: the fences the switch still has, with the pids
        the view recorded for their runtimes."""
        now = time.monotonic()
        for host in range(1, self.hosts):
            self.alive[host] = now  # a grace period, as for the runtimes
        try:
            table = self.ctl.maps.host_table()
        except OSError:
            return
        for host, h in table.items():
            if host and h["fenced"]:
                self.fenced[host] = {rt: e.get("pid") for rt, e in self.ctl.view.items() if fabric.host_of(rt) == host}

    def is_fenced(self, rt: int) -> bool:
        return bool(self.hosts) and fabric.host_of(rt) in self.fenced

    def on_alive(self, body: dict, addr) -> None:
        host = body.get("host")
        if not isinstance(host, int) or not 1 <= host < self.hosts:
            return
        self.alive[host] = time.monotonic()
        fence = self.fenced.get(host)
        if fence is None:
            return
        pids = body.get("runtimes") if isinstance(body.get("runtimes"), dict) else {}
        stale = [{"id": int(i), "pid": p} for i, p in pids.items()
                 if str(i).isdigit() and p is not None and fence.get(int(i)) == p]
        if stale:
            self.stats["fenced_kills_asked"] += 1
            self.ctl.ep.send(addr, MsgType.HOST_FENCED, {"kill": stale})
            return
        self.ctl.maps.fence_host(host, False)
        del self.fenced[host]
        self.stats["hosts_unfenced"] += 1
        log.warning("host %d is back (none of its fenced runtime processes runs): fence lifted", host)

    def detect(self, now: float) -> None:
        for host in range(1, self.hosts):
            if host in self.fenced:
                continue
            rts = [rt for rt in self.ctl.view if fabric.host_of(rt) == host]
            if not rts or any(self.ctl.view[rt].get("state") != "failed" for rt in rts):
                continue
            silent = now - self.alive.get(host, self.ctl.started)
            if silent > self.timeout:
                self.fence(host, rts, silent)

    def fence(self, host: int, rts: list[int], silent: float) -> None:
        view = self.ctl.view
        self.fenced[host] = {rt: view[rt].get("pid") for rt in rts}
        self.stats["hosts_fenced"] += 1
        log.warning("host %d failed: its supervisor silent for %.2f s and its runtimes %s failed; fencing it, "
                    "then its runtimes are marked exited (their peers take their flows)", host, silent, rts)
        # first: nothing of it passes the switch from then on
        self.ctl.maps.fence_host(host, then=lambda: self._exited(host, rts))

    def _exited(self, host: int, rts: list[int]) -> None:
        view = self.ctl.view
        for rt in rts:
            if rt in view and not view[rt].get("exited"):
                self.ctl._change({"op": "state", "id": rt, "state": "failed", "why": f"host {host} failed",
                                  "exited": True})
        self.ctl.push_view()
