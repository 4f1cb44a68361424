"""flow_monitor: per-flow packet and byte counters in each direction, and
when the flow was first and last seen (wall clock).

Offload: it only counts, so the switch may forward the flow; TCP FIN and RST
frames still come inline so that the flow's end reaches the runtime.  The
switch's counts are added to its own (its last frame's time too)."""
from __future__ import annotations

import time

from nfactor_xdp.dataplane.nf import NetworkFunction, register
from nfactor_xdp.dataplane.offload_spec import FORWARD, TCP_FIN, TCP_RST, KernelCounts, Offload

# the punt mask applies to TCP frames only: a UDP flow is forwarded whole
_OFFLOAD = Offload(FORWARD, punt_tcp_flags=TCP_FIN | TCP_RST)


@register
class FlowMonitor(NetworkFunction):
    name = "flow_monitor"
    type_id = 1

    def allocate_flow_state(self) -> dict:
        now = time.time()
        # index 0: the direction of the flow's first packet, 1: replies
        return {"packets": [0, 0], "bytes": [0, 0], "first_seen": now, "last_seen": now}

    def process_packet(self, pkt, state) -> bool:
        d = pkt.direction
        state["packets"][d] += 1
        state["bytes"][d] += len(pkt.frame)
        state["last_seen"] = time.time()
        return True

    def offload(self, state) -> Offload:
        return _OFFLOAD

    def absorb(self, state, counts: KernelCounts) -> None:
        for d in (0, 1):
            state["packets"][d] += counts.packets[d]
            state["bytes"][d] += counts.bytes[d]
        seen = counts.last_seen_wall()
        if seen is not None and seen > state["last_seen"]:
            state["last_seen"] = seen

    def summary(self, state) -> dict:
        return {"packets": {"orig": state["packets"][0], "reply": state["packets"][1]},
                "bytes": {"orig": state["bytes"][0], "reply": state["bytes"][1]},
                "first_seen": state["first_seen"], "last_seen": state["last_seen"]}
