"""A runtime (paper 3.3): one process pinned to one core, one single-threaded
event loop over its AF_XDP socket and its query socket, one actor per flow.

    python -m nfactor_xdp.runtime --node NAME --id N --ifname rtN --core C
"""
from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import socket
import sys
import time

from . import nodeconf, rtctl
from .actor import Actor
from .maps import NodeMaps
from .packet import FLOW, classify
from .xsk import XskSocket

HOUSEKEEPING_INTERVAL = 1.0
IDLE_POLL_MS = 100


class Runtime:
    def __init__(self, node: str, rt_id: int, ifname: str, core: int | None,
                 idle_timeout: float = 30.0, batch: int = 64):
        self.node = node
        self.id = rt_id
        self.ifname = ifname
        self.core = core
        self.idle_timeout = idle_timeout
        self.batch = batch
        self.flows: dict[bytes, Actor] = {}
        self.fast: dict[bytes, tuple[Actor, int]] = {}  # raw IPv4 addresses+ports -> (actor, direction)
        self.stopping = False
        self.started = time.time()
        self.now = time.monotonic()
        self.stats = {"dropped_not_flow": 0, "flows_created": 0, "flows_expired": 0, "idle_waits": 0}
        self.xsk: XskSocket | None = None
        self.maps: NodeMaps | None = None
        self.ctl: rtctl.Server | None = None

    # --- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        if self.core is not None:
            os.sched_setaffinity(0, {self.core})
        ifindex = socket.if_nametoindex(self.ifname)
        self.xsk = XskSocket(ifindex, 0)
        self.maps = NodeMaps(self.node)
        self.ctl = rtctl.Server(nodeconf.runtime_socket(self.node, self.id), self.on_request)
        # Registering the socket is what makes frames flow to us.
        self.maps["xsks"].set(self.id, self.xsk.fd)

    def stop(self) -> None:
        if self.maps is not None:
            try:
                self.maps["xsks"].delete(self.id)
            except OSError:
                pass
            self.maps.close()
        if self.ctl is not None:
            self.ctl.close()
        if self.xsk is not None:
            self.xsk.close()

    # --- the per-packet path -------------------------------------------------
    def handle(self, frame) -> bool:
        """One frame: find its flow's actor and let it decide (True: transmit)."""
        # Fast path: IPv4 without options or fragmentation, flow already seen
        # in this direction; the raw address/port bytes find the actor.
        if frame[12] == 8 and frame[13] == 0 and frame[14] == 0x45 and not (frame[20] & 0x3F or frame[21]):
            hit = self.fast.get(frame[26:38].tobytes())
            if hit is not None and hit[0].proto == frame[23]:
                return hit[0].on_packet(frame, hit[1], 34, self.now)
        return self.handle_slow(frame)

    def handle_slow(self, frame) -> bool:
        kind, key, direction, l4 = classify(frame)
        if kind != FLOW:
            # The switch sends us flows only; anything else is counted and dropped.
            self.stats["dropped_not_flow"] += 1
            return False
        actor = self.flows.get(key)
        if actor is None:
            actor = self.flows[key] = Actor(key, direction, self.now)
            self.stats["flows_created"] += 1
        if l4 == 34 and frame[14] == 0x45:
            raw = frame[26:38].tobytes()
            if raw not in self.fast:
                self.fast[raw] = (actor, direction)
                actor.fast_keys.append(raw)
        return actor.on_packet(frame, direction, l4, self.now)

    def run(self) -> None:
        xsk, ctl, handle, batch = self.xsk, self.ctl, self.handle, self.batch
        poller = select.poll()
        poller.register(xsk.fd, select.POLLIN)
        poller.register(ctl.fileno(), select.POLLIN)
        next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL
        batches = 0
        while not self.stopping:
            self.now = time.monotonic()
            if xsk.forward_batch(handle, batch):
                batches += 1
                if batches & 63:
                    continue
                # Under load, still answer queries and do housekeeping.
                ctl.serve_pending()
            else:
                self.stats["idle_waits"] += 1
                for fd, _ in poller.poll(IDLE_POLL_MS):
                    if fd == ctl.fileno():
                        ctl.serve_pending()
            if self.now >= next_housekeeping:
                self.expire_idle()
                next_housekeeping = self.now + HOUSEKEEPING_INTERVAL

    def expire_idle(self) -> None:
        limit = self.now - self.idle_timeout
        idle = [k for k, a in self.flows.items() if a.last_seen < limit]
        for k in idle:
            for raw in self.flows.pop(k).fast_keys:
                self.fast.pop(raw, None)
        self.stats["flows_expired"] += len(idle)

    # --- queries -------------------------------------------------------------
    def on_request(self, req: dict) -> dict:
        op = req["op"]
        if op == "ping":
            return {"ok": True, "id": self.id, "state": "running"}
        if op == "status":
            return {"ok": True, **self.status()}
        if op == "flows":
            limit = req.get("limit")
            actors = list(self.flows.values())
            if isinstance(limit, int) and limit >= 0:
                actors = actors[:limit]
            return {"ok": True, "id": self.id, "flows": [a.summary() for a in actors]}
        raise ValueError(f"unknown op {op!r}")

    def packet_counts(self) -> dict:
        xs = self.xsk.statistics()
        return {"frames": xs["rx_packets"], "forwarded": xs["tx_packets"],
                "dropped": xs["dropped_by_handler"],
                "dropped_by_chain": sum(a.dropped for a in self.flows.values())}

    def status(self) -> dict:
        return {
            "id": self.id, "pid": os.getpid(), "core": self.core, "ifname": self.ifname,
            "state": "running", "uptime": round(time.time() - self.started, 3),
            "flows": len(self.flows), **self.stats, **self.packet_counts(),
            "xsk": self.xsk.statistics(), "query_errors": self.ctl.errors,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nfactor-runtime", description=__doc__)
    ap.add_argument("--node", required=True)
    ap.add_argument("--id", type=int, required=True)
    ap.add_argument("--ifname", required=True)
    ap.add_argument("--core", type=int)
    ap.add_argument("--idle-timeout", type=float, default=30.0)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args(argv)
    rt = Runtime(a.node, a.id, a.ifname, a.core, a.idle_timeout, a.batch)

    def on_signal(signum, frame):
        rt.stopping = True

    # The agent blocks these signals to wait for them; do not inherit that.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        rt.start()
        print(f"runtime {a.id}: running on {a.ifname}, core {a.core}, pid {os.getpid()}", flush=True)
        rt.run()
    except Exception as e:
        print(f"runtime {a.id}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        rt.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
