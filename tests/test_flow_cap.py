"""A runtime holds at most max_flows actors (no root: a runtime without
sockets, fed frame by frame): a flood of new 5-tuples gives up flows seen
once, never flows with traffic, in O(1) per new flow, with bounded memory;
what is given up is counted, forgotten by its replica, and its switch entry
deleted (only while it still places the flow on this runtime)."""
from __future__ import annotations

import os
import struct
import time

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from nfactor_xdp.dataplane.packet import classify
from nfactor_xdp.dataplane.rules import Policy
from nfactor_xdp.dataplane.runtime import Runtime
from nfactor_xdp.formats.config import NodeConfig

SRC = 26  # offset of the IPv4 source address in an untagged frame


def runtime(max_flows: int, chain=("flow_monitor",)) -> Runtime:
    return Runtime(NodeConfig(name="t", max_flows=max_flows), 0,
                   policy=Policy.from_dict({"default_chain": list(chain)}))


def template() -> bytearray:
    return bytearray(bytes(Ether() / IP(src="10.0.0.1", dst="10.9.9.9") / UDP(sport=4000, dport=53) / b"x"))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_half_a_million_new_tuples_keep_the_runtime_at_its_cap_and_flows_with_traffic_keep_their_state():
    cap, total, chunk = 2000, 500_000, 50_000
    rt = runtime(cap)
    buf = template()
    frame = memoryview(buf)
    live = [bytearray(buf) for _ in range(50)]
    for i, f in enumerate(live):  # 50 flows with traffic (src 11.0.0.i), two frames before the flood
        struct.pack_into("!I", f, SRC, 0x0B000000 + i)
        assert rt.handle(memoryview(f)) and rt.handle(memoryview(f))
    sent = [2] * len(live)
    started, marks = time.perf_counter(), []
    for start in range(0, total, chunk):
        for i in range(start, start + chunk):
            struct.pack_into("!I", buf, SRC, 0x0C000000 + i)  # a tuple never seen before
            assert rt.handle(frame)
            if i % 100 == 0:
                j = (i // 100) % len(live)
                assert rt.handle(memoryview(live[j]))
                sent[j] += 1
        assert len(rt.flows) <= cap, (start, len(rt.flows))
        marks.append(rss())
    took = time.perf_counter() - started
    assert len(rt.flows) == cap
    assert rt.stats["flows_created"] == total + len(live)
    assert rt.stats["flows_evicted"] == total + len(live) - cap
    assert rt.limits()["flows"] == {"limit": cap, "unit": "flows (actors) in this runtime",
                                    "evicted": total + len(live) - cap, "refused": 0}
    assert len(rt.fast) <= 2 * cap  # the evicted flows' fast-path entries went with them
    assert len(rt.flows.probation) + len(rt.flows.protected) <= 2 * cap + 1024
    # the flows with traffic were never given up for the flood: one actor each, every frame counted
    for f, n in zip(live, sent):
        actor = rt.flows.get(classify(f)[1])
        assert actor is not None and actor.packets == [n, 0] and actor.states[0]["packets"] == [n, 0]
    # memory: flat from the first chunk on (each actor is ~1.3 KB: unbounded, the
    # last 450,000 tuples would have added ~600 MB)
    grown = marks[-1] - marks[0]
    print(f"\nMEASURED {total} new tuples in {took:.1f} s ({took / total * 1e6:.1f} us each, eviction "
          f"included); RSS after each 50,000: {[m >> 20 for m in marks]} MiB")
    assert grown < 16 << 20, [m >> 20 for m in marks]


class Socket:
    """What packet_counts() reads of the AF_XDP socket: frames fed one at a time."""

    def __init__(self):
        self.stats = dict.fromkeys(("rx_packets", "tx_packets", "dropped_by_handler", "frames_injected",
                                    "handler_error_frames", "tx_dropped_ring_full"), 0)

    def feed(self, rt: Runtime, frame) -> bool:
        ok = rt.handle(frame)
        self.stats["rx_packets"] += 1
        self.stats["tx_packets" if ok else "dropped_by_handler"] += 1
        return ok

    def statistics(self) -> dict:
        return self.stats


def test_a_runtime_full_of_migrating_flows_refuses_new_ones_and_counts_them():
    rt = runtime(16)
    rt.xsk = sock = Socket()
    buf = template()
    for i in range(16):
        struct.pack_into("!I", buf, SRC, 0x0C000000 + i)
        sock.feed(rt, memoryview(buf))
    for actor in rt.flows.values():
        actor.migration = object()  # leaving: its state is on its way, it cannot be given up
    struct.pack_into("!I", buf, SRC, 0x0D000000)
    assert not sock.feed(rt, memoryview(buf))
    assert len(rt.flows) == 16 and rt.stats["dropped_flow_cap"] == 1
    assert rt.limits()["flows"]["refused"] == 1
    assert rt.packet_counts()["dropped"]["flow_cap"] == 1


class SwitchEntries:
    """The runtime's NodeMaps as the flow table's entries: key -> runtime."""

    def __init__(self):
        self.entries: dict[bytes, int] = {}

    def delete_flow(self, key: bytes, runtime: int) -> bool:
        if self.entries.get(key) != runtime:
            return False
        del self.entries[key]
        return True


def test_flows_given_up_are_forgotten_by_their_replica_and_lose_their_switch_entry():
    rt = runtime(16)
    rt.lifetime.maps = sw = SwitchEntries()
    forgotten = []
    rt.replicator.flow_ended = forgotten.append  # what tells the flow's replica to drop it
    buf = template()
    keys = []
    for i in range(17):
        struct.pack_into("!I", buf, SRC, 0x0C000000 + i)
        keys.append(classify(buf)[1])
        sw.entries[keys[-1]] = 0  # placed here by the switch
        rt.handle(memoryview(buf))
    assert keys[0] not in rt.flows and rt.stats["flows_evicted"] == 1
    assert [a.key for a in forgotten] == [keys[0]]
    assert keys[0] in sw.entries  # deleted after the packet batch
    rt.lifetime.flush()
    assert keys[0] not in sw.entries and rt.stats["switch_entries_deleted"] == 1
    # a flow that ended here but was placed anew elsewhere keeps that placement
    sw.entries[keys[1]] = 3
    rt.lifetime.release(rt.flows.get(keys[1]))
    # and one that a late frame started again here keeps its entry too
    rt.lifetime.release(rt.flows.get(keys[2]))
    struct.pack_into("!I", buf, SRC, 0x0C000000 + 2)
    rt.handle(memoryview(buf))
    rt.lifetime.flush()
    assert sw.entries[keys[1]] == 3 and sw.entries[keys[2]] == 0
    assert rt.stats["switch_entries_kept"] == 2


def test_closed_and_idle_flows_lose_their_switch_entry():
    from scapy.layers.inet import TCP
    rt = Runtime(NodeConfig(name="t", idle_timeout=10.0), 0, policy=Policy.from_dict({}))
    rt.lifetime.maps = sw = SwitchEntries()
    idle = template()
    tcp = [bytes(Ether() / IP(src=a, dst=b) / TCP(sport=s, dport=d, flags=f))
           for a, b, s, d, f in (("10.0.0.1", "10.0.0.2", 4000, 80, "S"), ("10.0.0.1", "10.0.0.2", 4000, 80, "FA"),
                                 ("10.0.0.2", "10.0.0.1", 80, 4000, "FA"))]
    keys = [classify(idle)[1], classify(tcp[0])[1]]
    for key in keys:
        sw.entries[key] = 0
    rt.now = 100.0
    for f in [idle] + tcp:
        rt.handle(memoryview(bytearray(f)))
    rt.now = 103.0  # past the close's linger
    rt.expire_idle()
    assert keys[0] in sw.entries and keys[1] not in sw.entries and keys[1] not in rt.flows
    rt.now = 111.0  # past the idle timeout
    rt.expire_idle()
    assert not sw.entries and not rt.flows and rt.stats["switch_entries_deleted"] == 2
