"""Offload on a node, with real traffic (docs/offload.md): decided flows are
forwarded or dropped by the switch in XDP, and the actors still own their
state: counts exact in `flows --json`, through migration, a runtime's kill -9
and a policy change; TCP ends still reach the actor."""
from __future__ import annotations

import os
import signal

import pytest

from nfactor_xdp.control import node_client as nodectl
from nfactor_xdp.dataplane.rules import Policy
from tests.helpers import EchoTraffic, Proc, run_tool, wait_for

pytestmark = [pytest.mark.root, pytest.mark.netns]

MONITORED = {"rules": [{"proto": "udp", "chain": ["flow_monitor", "firewall"]},
                       {"proto": "tcp", "dport": "8080", "chain": ["flow_monitor", "firewall"]},
                       {"proto": "tcp", "dport": "8081", "chain": ["flow_monitor", "firewall", "http_parser"]}],
             "default_chain": []}


def _offloaded(n) -> int:
    """The node's flows the switch handles alone now."""
    return sum((r["offload"] or {}).get("flows", 0) for r in n.status()["runtimes"])


def _in_python(n) -> int:
    """Frames the runtimes received (the rest the switch handled alone)."""
    return sum(r["frames"] for r in n.status()["runtimes"])


def test_udp_flows_are_offloaded_and_their_counts_stay_exact(node_factory):
    n = node_factory(2, MONITORED, offload="on")
    flows, packets = 10, 400
    t = EchoTraffic(n, flows=flows, packets=packets, pps=2000, base=42000)
    t.check()  # every datagram once and in order, both ways; flow_monitor's counts exact
    st = n.status()
    total = 2 * flows * packets
    assert st["switch"]["off_forward"] >= total * 0.9, st["switch"]
    assert _in_python(n) <= total * 0.1
    assert _offloaded(n) == flows
    for f in n.flows()["flows"]:
        assert f["offload"].startswith("forward"), f
    print(f"\nMEASURED {total} datagrams, {st['switch']['off_forward']} forwarded by the switch alone, "
          f"{_in_python(n)} through Python")


def test_a_dropped_flow_is_dropped_in_xdp_and_counted(node_factory):
    policy = dict(MONITORED, nf_config={"firewall": {"rules": [{"proto": "udp", "dport": "9000",
                                                                   "action": "drop"}]}})
    n = node_factory(2, policy, offload="on")
    sink = Proc(n.dst_ns, "udp-sink", "--idle", "2", "--timeout", "30").wait_ready()
    sent = run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", "5", "--packets", "300", "--pps", "1500",
                    "--brief")
    got = sink.result()
    assert sent["sent"] == 1500 and got["received"] == 0
    fl = n.flows()["flows"]
    assert len(fl) == 5
    for f in fl:
        assert f["offload"].startswith("drop") and f["dropped"] == 300 and f["packets"]["orig"] == 300, f
        assert f["nfs"]["flow_monitor"]["packets"]["orig"] == 300
    st = n.status()
    assert st["switch"]["off_drop"] >= 1400 and _in_python(n) <= 100


def test_a_rate_limit_is_enforced_in_xdp(node_factory):
    pps, burst = 300, 30
    policy = {"rules": [{"proto": "udp", "chain": ["flow_monitor", "rate_limiter"]}], "default_chain": [],
              "nf_config": {"rate_limiter": {"pps": pps, "burst": burst}}}
    n = node_factory(1, policy, offload="on")
    sink = Proc(n.dst_ns, "udp-sink", "--idle", "2", "--timeout", "60").wait_ready()
    sent = run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", "1", "--packets", "6000", "--pps", "2000",
                    "--brief")
    got = sink.result()
    expected = burst + pps * sent["elapsed"]
    assert abs(got["received"] - expected) <= 0.05 * expected, (got["received"], expected)
    (f,) = n.flows()["flows"]
    rl = f["nfs"]["rate_limiter"]
    assert rl["passed"] == got["received"] and rl["passed"] + rl["dropped"] == sent["sent"], rl
    assert n.status()["switch"]["off_bucket_drop"] > 0
    print(f"\nMEASURED rate limit {pps} pps: {got['received']} of {sent['sent']} passed in {sent['elapsed']:.2f} s "
          f"(expected {expected:.0f})")


def test_migrating_offloaded_flows_under_traffic_loses_nothing(node_factory):
    n = node_factory(2, MONITORED, offload="on")
    t = EchoTraffic(n, flows=20, packets=600, pps=2000, base=43000)  # 6 s
    try:
        wait_for(lambda: _offloaded(n) == 20, timeout=10,
                 what="every flow offloaded")
        for src, dst in ((0, 1), (1, 0)):
            moved = nodectl.migrate(n.name, src, dst, timeout=30)
            assert moved["failed"] == 0, moved
            assert t.running(), "the traffic ended before the migration: the test proves nothing"
            # handed to the switch again by their new runtime (docs/offload.md: Limits, on hand-overs)
            wait_for(lambda: (n.status()["runtimes"][dst]["offload"] or {}).get("flows") == 20, timeout=10,
                     what="the migrated flows offloaded again")
        t.check()  # nothing lost, duplicated or reordered; counts exact
    finally:
        t.kill()
    st = n.status()
    assert all(r["migration"]["after_marker"] == 0 for r in st["runtimes"])
    assert sum(r["offload"]["revoked"] for r in st["runtimes"]) >= 20


def test_offloaded_flows_keep_flowing_while_their_runtime_is_killed(node_factory):
    n = node_factory(2, MONITORED, offload="on")
    t = EchoTraffic(n, flows=10, packets=800, pps=1000, base=44000)  # 8 s
    try:
        wait_for(lambda: _offloaded(n) == 10, timeout=10,
                 what="every flow offloaded")
        wait_for(lambda: n.status()["switch"]["off_forward"] > 1000, timeout=10, what="the switch forwarding them")
        pid = n.status()["runtimes"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (r := n.status()["runtimes"][0]).get("pid") not in (None, pid) and r["state"] == "running",
                 timeout=30, what="runtime 0 back")
        assert t.running(), "the traffic ended before runtime 0 was back: the test proves nothing"
        t.check()  # every datagram of every flow, during the outage too; counts exact after recovery
    finally:
        t.kill()
    r0 = n.status()["runtimes"][0]
    assert r0["offload"]["adopted"] == r0["offload"]["flows"] >= 1, r0["offload"]  # taken back, not re-offloaded
    assert r0["offload"]["revoked"] == 0 and r0["offload"]["dropped_slots"] == 0, r0["offload"]


def test_a_policy_change_turns_an_offloaded_allow_into_a_drop_at_once(node_factory):
    n = node_factory(2, MONITORED, offload="on")
    sink = Proc(n.dst_ns, "udp-sink", "--idle", "3", "--timeout", "60").wait_ready()
    run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", "4", "--packets", "50", "--pps", "500",
             "--base-port", "45000", "--brief")
    wait_for(lambda: _offloaded(n) == 4, timeout=10,
             what="the flows offloaded")
    versions = [r["policy_version"] for r in (nodectl.runtime_query(n.name, i, "status") for i in (0, 1))]
    nodectl.put_policy(n.name, Policy.from_dict(dict(MONITORED, nf_config={"firewall": {"rules": [
        {"proto": "udp", "dport": "9000", "action": "drop"}]}})))
    wait_for(lambda: all(nodectl.runtime_query(n.name, i, "status")["policy_version"] > versions[i] for i in (0, 1)),
             timeout=10, what="the runtimes to take the new policy")
    run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", "4", "--packets", "50", "--pps", "500",
             "--base-port", "45000", "--brief")
    got = sink.result()
    assert got["received"] == 200, got["received"]  # the first 50 of each flow, none after the change
    for f in n.flows()["flows"]:
        assert f["dropped"] == 50 and f["packets"]["orig"] == 100, f


def test_tcp_connections_are_offloaded_and_released_when_they_end(node_factory):
    n = node_factory(2, MONITORED, offload="on")
    server = Proc(n.dst_ns, "http-serve", "--bind", n.dst_ip, "--port", "8080", "--timeout", "60").wait_ready()
    try:
        # big enough to outlast the hand-over of a connection that is never quiet (offloader.PATIENCE)
        got = run_tool(n.src_ns, "http-get", "--host", n.dst_ip, "--port", "8080", "--size", "60000000",
                       "--count", "3")
    finally:
        server.kill()
    assert got["ok"] == 3  # every byte, right SHA-256
    st = n.status()
    assert sum(r["offload"]["offloaded"] for r in st["runtimes"]) == 3
    assert st["switch"]["off_forward"] > 1000 and st["switch"]["off_punt"] >= 6  # FINs both ways
    # FIN both ways reached the actors: each is released (CLOSE_LINGER), and its switch entry with it
    wait_for(lambda: not n.flows()["flows"], timeout=15, what="the ended connections released")
    wait_for(lambda: n.status()["switch_flows"] == 0, timeout=5, what="their switch entries deleted")
    assert _offloaded(n) == 0


def test_a_chain_with_the_http_parser_stays_inline(node_factory):
    n = node_factory(1, MONITORED, offload="on")
    server = Proc(n.dst_ns, "http-serve", "--bind", n.dst_ip, "--port", "8081", "--timeout", "60").wait_ready()
    try:
        got = run_tool(n.src_ns, "http-get", "--host", n.dst_ip, "--port", "8081", "--size", "300000")
        fl = n.flows()["flows"]
    finally:
        server.kill()
    assert got["ok"] == 1
    (f,) = fl
    assert "offload" not in f and f["nfs"]["http_parser"]["n_responses"] == 1
    assert "http_parser" in (f.get("offload_reason") or ""), f
    assert n.status()["switch"]["off_forward"] == 0
