"""The XDP programs on crafted frames with BPF_PROG_TEST_RUN: the verdict and
counter for every kind of frame, canonical keys, round-robin placement over
running runtimes, the return path, pinned maps surviving a reload."""
import ctypes
import errno
import os
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
    else:  # random bytes: any documented verdict, and the Python parser agrees on the class
        kind = classify(case.frame)[0]
        expected = {FLOW: XDP_REDIRECT, OTHER: XDP_REDIRECT, DROP: XDP_DROP}[kind]
        assert verdict == expected


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
