"""The XDP programs on crafted frames with BPF_PROG_TEST_RUN: the verdict and
counter for every kind of frame, canonical keys, round-robin placement over
running runtimes, the return path, pinned maps surviving a reload."""
import ctypes
import errno
import os
import random
import uuid

import pytest

from nfactor_xdp.kern import layouts as L
from nfactor_xdp.kern import netns
from nfactor_xdp.kern.bpfsys import BpfError, possible_cpus, prog_test_run, xdp_md
from nfactor_xdp.kern.loader import Programs
from nfactor_xdp.control.supervisor import Node, teardown
from nfactor_xdp.formats.config import NodeConfig
from nfactor_xdp.dataplane.packet import DROP, FLOW, OTHER, classify
from tests.frames import cases

pytestmark = [pytest.mark.root, pytest.mark.netns]

XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4
CASES = cases()


class Harness:
    def __init__(self, node: Node):
        self.node = node
        self.maps = node.maps
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            self.ifindex = {name: ipr.link_lookup(ifname=name)[0]
                            for name in ("ext0", "ext1", "sw-rt0", "sw-rt1", "rt0", "rt1")}

    def run(self, frame: bytes, port: str = "ext0", prog: str = "vswitch") -> int:
        fd = self.node.progs.fns[prog].fd
        return prog_test_run(fd, frame, ctx=xdp_md(len(frame), self.ifindex[port]))["retval"]

    def counters(self) -> dict:
        return self.maps.counters()

    def placement(self) -> dict:
        return {f["key"]: f for f in self.maps.flows()}

    def clear_flows(self):
        for k in list(self.maps["flows"].keys()):
            self.maps["flows"].delete(k)

    def reset(self):
        """Empty the flow table, zero the counters, default config."""
        for k in list(self.maps["flows"].keys()):
            self.maps["flows"].delete(k)
        ncpu = possible_cpus()
        for i in range(len(L.COUNTER_NAMES)):
            self.maps["counters"].set(i, (ctypes.c_uint64 * ncpu)())
        for i in range(2):
            self.maps["rt_stats"].set(i, (L.RtStats * ncpu)())
        self.maps.write_config(other_action="forward", mode=L.C["NFX_MODE_FLOWS"])
        self.set_running(0, 1)

    def set_running(self, *ids):
        for rt in range(2):
            state = "NFX_RT_RUNNING" if rt in ids else "NFX_RT_FAILED"
            self.maps.set_runtime_state(rt, L.C[state])


@pytest.fixture(scope="module")
def loaded_switch():
    """One switch (programs compiled once) for the module; `switch` resets it."""
    tag = uuid.uuid4().hex[:6]
    ns, name = f"nfxt-{tag}", f"t{tag}"
    netns.create(ns)
    old_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})  # per-CPU round-robin cursor: stay on one CPU
    try:
        with netns.entered(ns):
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                ipr.link("add", ifname="ext0", kind="veth", peer="h0")
                ipr.link("add", ifname="ext1", kind="veth", peer="h1")
            node = Node(NodeConfig(name=name, runtimes=2))
            try:
                node.setup_switch()
                yield Harness(node)
            finally:
                node.maps.close()
                node.progs.close()
                teardown(node.cfg)
    finally:
        os.sched_setaffinity(0, old_cpus)
        netns.remove(ns)
    assert not os.path.exists(f"/sys/fs/bpf/nfactor/{name}")


@pytest.fixture
def switch(loaded_switch):
    loaded_switch.reset()
    return loaded_switch


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verdict_and_counter_per_frame(switch, case):
    if len(case.frame) < 14:
        # The kernel refuses frames shorter than an Ethernet header before any
        # XDP program sees them (here: BPF_PROG_TEST_RUN; on veth: the sender).
        with pytest.raises(BpfError) as e:
            switch.run(case.frame)
        assert e.value.errno == errno.EINVAL
        return
    before = switch.counters()
    verdict = switch.run(case.frame)
    after = switch.counters()
    moved = {k for k in after if after[k] != before[k]}
    assert after["rx_ext"] == before["rx_ext"] + 1
    if case.kind == FLOW:
        assert verdict == XDP_REDIRECT
        assert case.counter in moved and "to_runtime" in moved
        assert len(switch.placement()) == 1
    elif case.kind == OTHER:
        assert verdict == XDP_REDIRECT  # default: forwarded untouched to ext1
        assert {case.counter, "other_forward"} <= moved
        assert not switch.placement()
    elif case.kind == DROP:
        assert verdict == XDP_DROP
        assert case.counter in moved
        assert after[case.counter] == before[case.counter] + 1
        assert not switch.placement()
    else:  # random bytes: the class the switch decided is the Python parser's
        switch.clear_flows()
        assert decided(switch, case.frame) == python_class(case.frame)


PARSE_DROPS = {"drop_short_eth", "drop_bad_ip", "drop_bad_l4", "drop_bad_ipv6_ext"}
OTHER_CLASSES = {"cls_arp", "cls_icmp", "cls_vlan", "cls_non_ip", "cls_other_proto"}


def python_class(frame: bytes) -> tuple:
    """packet.classify's decision: (class, key hex, direction, fragment) for a
    flow, (class, None, None, None) otherwise."""
    kind, key, direction, l4 = classify(frame)
    if kind == FLOW:
        return FLOW, key.hex(), direction, l4 == -1
    return kind, None, None, None


def decided(switch, frame: bytes) -> tuple:
    """The switch's decision for one frame, as python_class() puts it, read
    from what the program recorded for it alone: the counters that moved and
    the flow table entry it made (the table must be empty before)."""
    assert not switch.placement()
    before = switch.counters()
    verdict = switch.run(frame)
    after = switch.counters()
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    flows = list(switch.placement().values())
    drops, others = PARSE_DROPS & moved.keys(), OTHER_CLASSES & moved.keys()
    if moved.get("flow_new"):
        assert verdict == XDP_REDIRECT and not drops and not others, moved
        assert moved["flow_new"] == moved["to_runtime"] == 1 and len(flows) == 1, (moved, flows)
        return FLOW, flows[0]["key"], flows[0]["orig_dir"], "cls_fragment" in moved
    assert not flows, flows
    if drops:
        assert verdict == XDP_DROP and len(drops) == 1 and not others, moved
        return DROP, None, None, None
    assert verdict == XDP_REDIRECT and moved.get("other_forward") == 1 and len(others) == 1, moved
    return OTHER, None, None, None


def _mutants(n: int, seed: int = 11) -> list[bytes]:
    """Frames near the parsers' edges: crafted IPv4/IPv6 frames with a few
    header bytes replaced, truncated, or both (half of them with the IP length
    field made to fit again, so the L4 and extension header checks are
    reached); and random bytes behind an IPv4 or IPv6 ethertype."""
    rnd = random.Random(seed)
    bases = [c.frame for c in CASES if len(c.frame) >= 34 and c.frame[12:14] in (b"\x08\x00", b"\x86\xdd")]
    out = []
    while len(out) < n:
        how = rnd.randrange(4)
        if how == 3:
            body = rnd.randbytes(rnd.randrange(0, 100))
            out.append(rnd.choice(bases)[:12] + rnd.choice((b"\x08\x00", b"\x86\xdd")) + body)
            continue
        f = bytearray(rnd.choice(bases))
        if how in (0, 2):
            for _ in range(rnd.randrange(1, 4)):  # IP and L4 header bytes
                f[rnd.randrange(14, min(len(f), 94))] = rnd.randrange(256)
        if how in (1, 2):
            f = f[:rnd.randrange(14, len(f) + 1)]
        if rnd.randrange(2):
            if f[12:14] == b"\x08\x00" and len(f) >= 18:
                f[16:18] = (len(f) - 14).to_bytes(2, "big")
            elif f[12:14] == b"\x86\xdd" and len(f) >= 54:
                f[18:20] = (len(f) - 54).to_bytes(2, "big")
        out.append(bytes(f))
    return out


def _edge_frames(n: int, seed: int = 12) -> list[bytes]:
    """Frames built field by field around every check of the two parsers:
    IPv4 version, IHL, options, length, fragment bits, protocol; IPv6 length
    and chains of hop-by-hop, routing, fragment, AH and destination options
    headers (fragment offset and M bit, lengths); TCP data offset, UDP
    length; the frame cut anywhere."""
    rnd = random.Random(seed)
    pick = rnd.choice

    def l4(proto: int) -> bytes:
        ports = rnd.randbytes(4)
        if proto == 6:
            doff = pick((5, 5, 5, 4, 6, 15, rnd.randrange(16)))
            return ports + rnd.randbytes(8) + bytes([doff << 4]) + rnd.randbytes(7 + max(0, doff - 5) * 4)
        if proto == 17:
            return ports + pick((8, 12, 3, 0, 0xFFFF, rnd.randrange(1 << 16))).to_bytes(2, "big") + b"\0\0"
        return rnd.randbytes(pick((0, 4, 8, 20)))

    def length(real: int) -> int:
        return max(0, min(0xFFFF, real + pick((0, 0, 0, 0, -1, 1, -8, 40, rnd.randrange(-64, 64)))))

    out = []
    while len(out) < n:
        if rnd.randrange(2):
            ihl = pick((5, 5, 5, 6, 15, 4, rnd.randrange(16)))
            version = pick((4, 4, 4, 4, 6, rnd.randrange(16)))
            proto = pick((6, 17, 6, 17, 1, 47, 58, rnd.randrange(256)))
            frag = pick((0, 0, 0, 0x2000, 0x4000, 1, 0x1FFF, rnd.randrange(1 << 16)))
            rest = rnd.randbytes(max(0, ihl - 5) * 4) + l4(proto) + rnd.randbytes(pick((0, 0, 3, 16)))
            tot = length(20 + len(rest))
            ip = (bytes([version << 4 | ihl, 0]) + tot.to_bytes(2, "big") + b"\0\0" + frag.to_bytes(2, "big")
                  + bytes([64, proto]) + b"\0\0" + rnd.randbytes(8))
            f = bytes(6) + bytes(6) + b"\x08\x00" + ip + rest
        else:
            kinds = [pick((0, 43, 44, 51, 60)) for _ in range(pick((0, 0, 1, 1, 2, 3, 5, 6, 7)))]
            final = pick((6, 17, 6, 17, 58, 59, rnd.randrange(256)))
            chain = b""
            for kind, nxt in zip(kinds, kinds[1:] + [final]):
                if kind == 44:  # offset and M bit: none (atomic), M only, offset only, both...
                    frag = pick((0, 1, 8, 9, 6, rnd.randrange(1 << 16)))
                    chain += bytes([nxt, 0]) + frag.to_bytes(2, "big") + rnd.randbytes(4)
                else:  # hdr ext len in 8-byte units (AH: 4-byte units, minus 2); big ones overrun
                    hlen = pick((0, 0, 0, 1, 2, rnd.randrange(256)))
                    size = (hlen + 2) * 4 if kind == 51 else (hlen + 1) * 8
                    chain += bytes([nxt, hlen]) + rnd.randbytes(min(size, 72) - 2)
            rest = chain + l4(final) + rnd.randbytes(pick((0, 0, 5)))
            plen = length(len(rest))
            ip6 = (bytes([pick((0x60, 0x60, 0x60, 0x40)), 0, 0, 0]) + plen.to_bytes(2, "big")
                   + bytes([kinds[0] if kinds else final, 64]) + rnd.randbytes(32))
            f = bytes(6) + bytes(6) + b"\x86\xdd" + ip6 + rest
        if rnd.randrange(4) == 0:
            f = f[:rnd.randrange(14, len(f) + 1)]
        out.append(f)
    return out


@pytest.mark.parametrize("corpus", ["edge", "mutated"])
def test_python_and_xdp_decide_the_same_class_and_key(switch, corpus):
    """Frames built field by field around every parser check (edge), and
    crafted frames mutated at random (mutated)."""
    frames = _edge_frames(2000) if corpus == "edge" else _mutants(1000)
    seen = set()
    for f in frames:
        switch.clear_flows()
        want = python_class(f)
        assert decided(switch, f) == want, f.hex()
        seen.add(want[0] if want[0] != FLOW else ("fragment" if want[3] else FLOW))
    assert seen == {FLOW, "fragment", OTHER, DROP}  # the corpus reaches every class


def test_python_and_xdp_agree_on_keys(switch):
    for case in CASES:
        if case.kind != FLOW:
            continue
        key = classify(case.frame)[1]
        switch.run(case.frame)
        assert key.hex() in switch.placement(), case.name


def test_both_directions_one_entry_one_runtime(switch):
    tcp = next(c for c in CASES if c.name == "tcp4")
    assert switch.run(tcp.frame, "ext0") == XDP_REDIRECT
    assert switch.run(tcp.reverse, "ext1") == XDP_REDIRECT
    flows = list(switch.placement().values())
    assert len(flows) == 1
    assert flows[0]["in_port"] == 0
    c = switch.counters()
    assert c["flow_new"] == 1 and c["to_runtime"] == 2
    stats = switch.maps.runtime_table()
    assert stats[flows[0]["runtime"]]["switch"]["to_rt_packets"] == 2


def _udp_flows(n):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    return [bytes(Ether() / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=10000 + i, dport=53)) for i in range(n)]


def test_round_robin_over_running_runtimes(switch):
    for f in _udp_flows(10):
        assert switch.run(f) == XDP_REDIRECT
    per_rt = [f["runtime"] for f in switch.placement().values()]
    assert sorted(per_rt) == [0] * 5 + [1] * 5


def test_only_running_runtimes_get_new_flows(switch):
    first = _udp_flows(4)
    for f in first:
        switch.run(f)
    before = {k: f["runtime"] for k, f in switch.placement().items()}
    switch.set_running(0)  # runtime 1 failed
    for f in _udp_flows(12)[4:]:
        switch.run(f)
    for f in first:  # existing flows keep their runtime, failed or not
        assert switch.run(f) == XDP_REDIRECT
    after = {k: f["runtime"] for k, f in switch.placement().items()}
    assert all(after[k] == rt for k, rt in before.items())
    assert all(rt == 0 for k, rt in after.items() if k not in before)


def test_no_running_runtime_drops_and_counts(switch):
    switch.set_running()
    assert switch.run(_udp_flows(1)[0]) == XDP_DROP
    assert switch.counters()["drop_no_runtime"] == 1
    assert not switch.placement()


def test_flow_on_emptied_slot_is_replaced(switch):
    f = _udp_flows(1)[0]
    switch.run(f)
    (entry,) = switch.placement().values()
    gone = entry["runtime"]
    switch.maps.set_runtime_state(gone, L.C["NFX_RT_NONE"])
    assert switch.run(f) == XDP_REDIRECT
    (entry,) = switch.placement().values()
    assert entry["runtime"] == 1 - gone
    assert switch.counters()["flow_replaced"] == 1


@pytest.mark.parametrize("action,verdict", [("forward", XDP_REDIRECT), ("pass", XDP_PASS), ("drop", XDP_DROP)])
def test_other_traffic_policy(switch, action, verdict):
    switch.maps.write_config(other_action=action)
    arp = next(c for c in CASES if c.name == "arp")
    assert switch.run(arp.frame) == verdict
    assert switch.counters()[f"other_{action}"] == 1


def test_return_path_from_runtime(switch):
    tcp = next(c for c in CASES if c.name == "tcp4")
    switch.run(tcp.frame, "ext0")
    rt = next(iter(switch.placement().values()))["runtime"]
    assert switch.run(tcp.frame, f"sw-rt{rt}") == XDP_REDIRECT
    assert switch.run(tcp.reverse, f"sw-rt{rt}") == XDP_REDIRECT
    c = switch.counters()
    assert c["rx_runtime"] == 2 and c["to_ext"] == 2
    assert switch.maps.runtime_table()[rt]["switch"]["from_rt_packets"] == 2
    # a runtime sending a frame of a flow the switch does not know, or a non-flow
    udp = next(c for c in CASES if c.name == "udp4")
    assert switch.run(udp.frame, "sw-rt0") == XDP_DROP
    arp = next(c for c in CASES if c.name == "arp")
    assert switch.run(arp.frame, "sw-rt0") == XDP_DROP
    c = switch.counters()
    assert c["drop_rt_no_flow"] == 1 and c["drop_rt_other"] == 1


def test_bypass_mode_forwards_everything(switch):
    switch.maps.write_config(mode=L.C["NFX_MODE_BYPASS"])
    for case in CASES[:3]:
        assert switch.run(case.frame) == XDP_REDIRECT
    assert switch.counters()["bypass"] == 3
    assert not switch.placement()


def test_lookup_mode_places_flows_and_forwards_to_the_other_port(switch):
    """The benchmarks' fair ceiling: the flow path (parse, lookup, placement)
    without a runtime.  The target is told by emptying devmap slots: with no
    runtime port the frames still go out, with no ext1 they drop."""
    switch.maps.write_config(mode=L.C["NFX_MODE_LOOKUP"])
    flows = _udp_flows(4)
    slots = {s: switch.ifindex[p] for s, p in ((L.C["NFX_SLOT_EXT1"], "ext1"),
                                               (L.C["NFX_SLOT_RT_BASE"], "sw-rt0"),
                                               (L.C["NFX_SLOT_RT_BASE"] + 1, "sw-rt1"))}
    try:
        for s in (L.C["NFX_SLOT_RT_BASE"], L.C["NFX_SLOT_RT_BASE"] + 1):
            switch.maps["tx_ports"].delete(s)
        for f in flows + flows[:1]:
            assert switch.run(f) == XDP_REDIRECT
        placed = switch.placement()
        assert len(placed) == 4 and sorted(f["runtime"] for f in placed.values()) == [0, 0, 1, 1]
        c = switch.counters()
        assert c["flow_new"] == 4 and c["bypass"] == 5 and c["to_runtime"] == 0 and c["drop_no_port"] == 0
        assert all(s["switch"]["to_rt_packets"] == 0 for s in switch.maps.runtime_table().values())
        switch.maps["tx_ports"].delete(L.C["NFX_SLOT_EXT1"])
        assert switch.run(flows[0]) == XDP_DROP
        assert switch.counters()["drop_no_port"] == 1
    finally:
        for s, ifindex in slots.items():
            switch.maps.set_slot(s, ifindex)
    # no running runtime: no placement, as in flows mode
    switch.set_running()
    assert switch.run(_udp_flows(5)[4]) == XDP_DROP
    assert switch.counters()["drop_no_runtime"] == 1


def test_steer_without_socket_drops_and_counts(switch):
    tcp = next(c for c in CASES if c.name == "tcp4")
    assert switch.run(tcp.frame, "rt0", prog="steer") == XDP_DROP
    assert switch.maps.runtime_table()[0]["switch"]["no_socket"] == 1


def test_pinned_flows_survive_a_program_reload(switch):
    for f in _udp_flows(6):
        switch.run(f)
    before = {k: f["runtime"] for k, f in switch.placement().items()}
    fresh = Programs(switch.node.cfg.name, flow_table_size=switch.node.cfg.flow_table_size, tracer=False)
    fresh.load()
    try:
        for f in _udp_flows(6):  # the new program sees the same table
            assert prog_test_run(fresh.fns["vswitch"].fd, f, ctx=xdp_md(len(f), switch.ifindex["ext0"]))["retval"] \
                == XDP_REDIRECT
        after = {k: f["runtime"] for k, f in switch.placement().items()}
        assert after == before
        assert switch.counters()["flow_new"] == 6
    finally:
        fresh.close()
