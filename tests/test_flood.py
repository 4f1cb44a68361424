"""Live flows through a flood of new ones (issue item 9), end to end: the
switch's flow table holds live flows only (ended flows lose their entry), the
runtimes give up a flood's one-packet flows for new ones (never flows with
traffic, even silent ones) and delete their entries, so the switch's LRU
never has to evict and no live flow is ever placed anew."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import PY, Proc, run_tool

pytestmark = [pytest.mark.root, pytest.mark.netns]

TABLE = 4096        # the switch's flow table
MAX_FLOWS = 1536    # per runtime: 2 x 1536 leave the LRU room (it keeps up to 128 free entries per CPU)
LIVE, PACKETS, BASE = 1000, 15, 20000


_FLOOD = """
import socket, struct, sys, time
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
t = bytearray(bytes(Ether(dst="02:00:00:00:00:99") / IP(src=src, dst=dst) / UDP(dport=7, chksum=0) / b"f"))
for i in range(n):
    struct.pack_into("!H", t, 34, 1024 + i)  # a new source port: a new flow
    while True:
        try:
            s.send(t)
            break
        except OSError:  # ENOBUFS: the veth's queue is full
            time.sleep(0.001)
    if i % 32 == 31:
        time.sleep(0.008)  # ~4,000 new flows a second: well within what the runtimes take besides the live flows
"""


def _flood(ns: str, src: str, dst: str, n: int) -> None:
    """n one-packet UDP flows from `ns`, sent to no host's MAC (the flood only
    has to cross the node)."""
    subprocess.run(["ip", "netns", "exec", ns, PY, "-c", _FLOOD, src, dst, str(n)], check=True, timeout=60)


def _live_keys(node) -> set[str]:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from nfactor_xdp.dataplane.packet import classify
    return {classify(bytes(Ether() / IP(src=node.src_ip, dst=node.dst_ip) / UDP(sport=BASE + i, dport=9000)))[1].hex()
            for i in range(LIVE)}


def _live_traffic(node) -> None:
    """PACKETS datagrams on each live flow (same source ports each time), each echoed back."""
    sink = Proc(node.dst_ns, "udp-sink", "--echo", "--brief", "--expect", str(LIVE * PACKETS),
                "--timeout", "60").wait_ready()
    try:
        sent = run_tool(node.src_ns, "udp-send", "--dst", node.dst_ip, "--flows", str(LIVE), "--packets",
                        str(PACKETS), "--pps", "5000", "--base-port", str(BASE), "--echo", "--echo-wait", "10",
                        "--brief", timeout=60)
        got = sink.result(timeout=60)
    finally:
        sink.kill()
    assert got["received"] == LIVE * PACKETS and got["bad"] == 0
    assert sent["echoed"] == LIVE * PACKETS, sent["echoed"]


def test_a_thousand_live_flows_keep_their_runtime_and_state_through_a_flood_twice_the_table(node_factory):
    """The live flows run both ways, fall silent while a flood of one-packet
    flows twice the table's size comes, then run again: the same actors go on
    counting, on the same runtimes, and the switch placed each flow once."""
    from nfactor_xdp.control import node_client as nodectl
    from nfactor_xdp.kern.maps import NodeMaps
    node = node_factory(2, {"default_chain": ["flow_monitor"]}, flow_table_size=TABLE, max_flows=MAX_FLOWS)
    flood = 2 * TABLE
    _live_traffic(node)
    _flood(node.src_ns, node.src_ip, node.dst_ip, flood)
    _live_traffic(node)

    st = node.status()
    sw = st["switch"]
    # each flow was placed once: no live flow lost its entry and was placed anew
    assert sw["flow_new"] == LIVE + flood and sw["flow_replaced"] == 0 and sw["drop_map_full"] == 0
    runtimes = {r["id"]: nodectl.runtime_query(node.name, r["id"], "status") for r in st["runtimes"]}
    evicted = sum(r["flows_evicted"] for r in runtimes.values())
    deleted = sum(r["switch_entries_deleted"] for r in runtimes.values())
    assert all(r["flows"] <= MAX_FLOWS for r in runtimes.values())
    assert evicted >= LIVE + flood - 2 * MAX_FLOWS and deleted == evicted
    # the switch's LRU evicted nothing: every entry it placed is there, but those the runtimes deleted
    with NodeMaps(node.name) as maps:
        entries = sum(1 for _ in maps["flows"].keys())
    assert entries == sw["flow_new"] - deleted

    # each live flow: one actor, on the runtime the switch names, its NF state whole
    live = _live_keys(node)
    actors: dict[str, list] = {}
    for rt in runtimes:
        for a in nodectl.runtime_flows(node.name, rt, timeout=5.0) or []:
            actors.setdefault(a["key"], []).append((rt, a))
    with NodeMaps(node.name) as maps:
        placed = {f["key"]: f["runtime"] for f in maps.flows()}
    for key in live:
        assert len(actors.get(key, [])) == 1, (key, actors.get(key))
        (rt, a), = actors[key]
        assert placed[key] == rt
        assert a["packets"] == {"orig": 2 * PACKETS, "reply": 2 * PACKETS}, a
        assert a["nfs"]["flow_monitor"]["packets"] == {"orig": 2 * PACKETS, "reply": 2 * PACKETS}, a
    print(f"\nMEASURED flood of {flood} one-packet flows: runtimes evicted {evicted} and deleted their entries; "
          f"switch table {entries}/{TABLE} entries; 0 live flows placed anew "
          f"({json.dumps({rt: r['flows'] for rt, r in runtimes.items()})} actors per runtime)")
