"""flow_monitor: per-flow packet and byte counters in each direction, and
when the flow was first and last seen (wall clock)."""
from __future__ import annotations

import time

from nfactor_xdp.dataplane.nf import NetworkFunction, register


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

    def summary(self, state) -> dict:
        return {"packets": {"orig": state["packets"][0], "reply": state["packets"][1]},
                "bytes": {"orig": state["bytes"][0], "reply": state["bytes"][1]},
                "first_seen": state["first_seen"], "last_seen": state["last_seen"]}
