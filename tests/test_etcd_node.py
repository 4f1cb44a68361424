"""A node whose cluster state lives in etcd (a real 3-member cluster): two
controllers, one leading; the leader killed with -9 under traffic, the other
takes over from etcd's state (view and rules), and an etcd member killed
costs nothing.  The data plane never waits for either: every datagram
arrives once and in order throughout."""
from __future__ import annotations

import os
import signal
import time

import pytest

from nfactor_xdp.control import node_client as nodectl
from nfactor_xdp.control.cluster_store import Members
from nfactor_xdp.formats.messages import MsgType
from nfactor_xdp.kern import netns
from nfactor_xdp.tools.etcd_cluster import EtcdCluster
from tests.helpers import EchoTraffic, wait_for

pytestmark = [pytest.mark.root, pytest.mark.netns]


def controller(n) -> dict | None:
    try:
        return nodectl.control_call(n.name, "control", MsgType.STATUS, {}, timeout=0.3)
    except nodectl.NodeCtlError:
        return None


def test_the_standby_controller_takes_over_from_etcd_and_a_lost_member_changes_nothing(testbed, node_factory):
    def keys(prefix_or_key: str, get_prefix=False):
        """What etcd holds, asked from the node's namespace (where its members listen)."""
        with netns.entered(ns):
            return Members(etcd.endpoints[1:]).call(
                lambda c: c.get_prefix(prefix_or_key) if get_prefix else c.get(prefix_or_key))

    ns = testbed.show()["namespaces"]["node"]  # the node's processes reach etcd on its loopback
    with EtcdCluster(3, name="node", netns=ns) as etcd:
        n = node_factory(2, {"default_chain": ["flow_monitor"]}, store="etcd", offload="off",
                         etcd_endpoints=",".join(etcd.endpoints), controllers=2, leader_ttl=1)
        first = controller(n)
        assert first["log"]["store"] == "etcd" and first["log"]["me"].endswith(f":{first['pid']}"), first["log"]
        pids = {r["id"]: r["pid"] for r in n.status()["runtimes"]}
        # a rule, through the leader, into etcd
        r = n.cli("rules", "add", "--name", n.name, "--proto", "udp", "--dport", "9999", "--chain", "firewall")
        assert r.returncode == 0, r.stderr
        traffic = EchoTraffic(n, flows=10, packets=1500, pps=1500, base=56000)

        # the leader dies: the standby (or the leader's restarted process) leads within the lease's TTL
        os.kill(first["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        after = wait_for(lambda: (c := controller(n)) and c["pid"] != first["pid"] and c, timeout=15,
                         interval=0.05, what="another controller leading")
        took = time.monotonic() - t0
        view = {e["id"]: e for e in after["view"]["runtimes"]}
        assert {i: e["state"] for i, e in view.items()} == {0: "running", 1: "running"}, view
        assert {i: e["pid"] for i, e in view.items()} == pids  # the runtimes never noticed
        assert [r["dport"] for r in nodectl.get_policy(n.name).to_dict()["rules"]] == ["9999"]
        assert after["log"]["me"] != first["log"]["me"]

        # one etcd member gone: the node's changes still go through and are kept
        etcd.kill(0)
        r = n.cli("rules", "add", "--name", n.name, "--proto", "udp", "--dport", "9998", "--chain", "firewall")
        assert r.returncode == 0, r.stderr
        state = keys(f"/nfactor/{n.name}/state")
        assert b'"9998"' in state[0] and b'"9999"' in state[0]
        assert traffic.running(), "the traffic ended before the faults were over: make it longer"
        traffic.check()  # every datagram once, in order, counted by flow_monitor
        print(f"\nMEASURED controller failover through etcd: {took:.2f}s from kill -9 to another controller "
              f"answering (lease ttl 1 s); an etcd member killed, rules still changed")
        n.stop()
        assert not keys(f"/nfactor/{n.name}/", get_prefix=True), \
            "down leaves the node's keys in etcd"
