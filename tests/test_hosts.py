"""A node across three hosts (the testbed's namespaces on a fabric bridge):
the ingress host runs the switch, the controller and runtime 0; worker hosts
1 and 2 run runtimes 8 and 16.  Flows cross runtimes on every host exactly
once and in order, TCP downloads stay intact, every flow can migrate from any
host to any other under traffic, bad frames on the fabric are dropped and
counted, and a worker host's failure (its processes killed, its link down)
loses only what was in flight on it: its flows go on on the other hosts with
their NF state."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import socket
import subprocess
import uuid

import pytest

from nfactor_xdp.control import node_client as nodectl
from nfactor_xdp.formats import config as nodeconf
from nfactor_xdp.formats import fabric
from nfactor_xdp.formats.messages import MsgType
from nfactor_xdp.kern import layouts as L
from nfactor_xdp.kern import netns
from nfactor_xdp.kern.maps import NodeMaps
from nfactor_xdp.tools.etcd_cluster import EtcdCluster
from nfactor_xdp.tools.testbed import Testbed, TestbedConfig
from tests.helpers import (EchoTraffic, Proc, RunningNode, check_taken_flows, run_tool, wait_for,
                           warm_and_snapshotted)

pytestmark = [pytest.mark.root, pytest.mark.netns]

K = 10
POLICY = {"default_chain": ["flow_monitor", "firewall"],
          "nf_config": {"firewall": {"rules": [{"proto": "udp", "dport": "9001", "action": "drop"}]}}}
RUNTIMES = (0, 8, 16)  # one per host


@contextlib.contextmanager
def three_hosts(tmp_path, etcd: bool = False, **settings):
    """A node on a testbed with 2 worker hosts, runtime 0 on the ingress host
    and one on each worker (8, 16); etcd: a member on each host's fabric
    address (yielded as n.etcd)."""
    tb = Testbed(TestbedConfig(name=f"m{uuid.uuid4().hex[:5]}", hosts=2))
    tb.up()
    n = cluster = None
    try:
        policy = tmp_path / "policy.json"
        policy.write_text(json.dumps(POLICY))
        fab = tb.show()["fabric"]
        if etcd:
            cluster = EtcdCluster(name="hosts", places=[(h["netns"], h["ipv4"]) for h in fab["hosts"]]).start()
            cluster.wait_healthy()
            settings.update(store="etcd", etcd_endpoints=",".join(cluster.endpoints))
        n = RunningNode(tb, f"n{uuid.uuid4().hex[:5]}", 1, str(policy), snapshot_every=K,
                        hosts=",".join(h["ipv4"] for h in fab["hosts"]), fabric_port="fab0", **settings)
        n.fabric, n.etcd = fab, cluster
        n.workers = [nodectl.start_worker(n.cfg, h, fab["hosts"][h]["netns"]) for h in (1, 2)]
        yield n
    finally:
        if n is not None:
            n.stop()
            for name in (n.name, fabric.worker_name(n.name, 1), fabric.worker_name(n.name, 2)):
                assert not os.path.exists(f"/sys/fs/bpf/nfactor/{name}"), f"pins of {name} left behind"
                subprocess.run(["rm", "-rf", f"/var/lib/nfactor/{name}"], check=False)
        if cluster is not None:
            cluster.stop()
        tb.down()


@pytest.fixture
def hosts_node(tmp_path):
    with three_hosts(tmp_path) as n:
        yield n


def _kill_host(n, host: int) -> None:
    """Every process of the host killed with -9, its fabric link down."""
    ns = n.fabric["hosts"][host]["netns"]
    for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "-n", ns, "link", "set", "fab0", "down"], check=True)


def _controller(n) -> dict | None:
    try:
        return nodectl.control_call(n.name, "control", MsgType.STATUS, {}, timeout=0.3)
    except nodectl.NodeCtlError:
        return None


def _download(n, size: int, count: int) -> dict:
    server = Proc(n.dst_ns, "http-serve", "--bind", n.dst_ip, "--timeout", "120").wait_ready()
    try:
        return run_tool(n.src_ns, "http-get", "--host", n.dst_ip, "--size", str(size), "--count", str(count),
                        timeout=120)
    finally:
        server.kill()


def test_flows_cross_runtimes_on_every_host_once_and_in_order(hosts_node):
    n = hosts_node
    st = n.status()
    assert sorted((r["id"], r["host"], r["state"]) for r in st["runtimes"]) == \
        [(0, 0, "running"), (8, 1, "running"), (16, 2, "running")]
    traffic = EchoTraffic(n, flows=30, packets=200, pps=3000, base=41000)
    traffic.check()  # every datagram once and in order both ways, flow_monitor counted each
    placed = {f["runtime"] for f in n.flows()["flows"]}
    assert placed == set(RUNTIMES), placed  # round-robin put flows on every host
    assert {f["host"] for f in n.flows()["flows"]} == {0, 1, 2}
    got = _download(n, 4 << 20, 6)  # 6 connections: on every host too
    assert got["ok"] == 6, got
    # closed, their actors go, and the switch entries with them, those of the workers' runtimes
    # too (asked of the switch agent): only the UDP flows are left in the switch
    wait_for(lambda: len(NodeMaps(n.name).flows()) == 30, timeout=20, what="the downloads' entries deleted")
    asked = sum(nodectl.runtime_query(n.name, rt, "status")["switch_entries_asked"] for rt in (8, 16))
    assert asked >= 1
    sw = n.status()["switch"]
    assert sw["to_fabric"] > 0 and sw["rx_fabric"] > 0 and sw["drop_fabric_bad"] == 0
    # the operator's commands reach a worker's runtime through its own host's supervisor
    r = n.cli("runtime", "kill", "--name", n.name, "--id", "16")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: next(x for x in n.status()["runtimes"] if x["id"] == 16).get("restarts") == 1, timeout=15,
             what="runtime 16 restarted by host 2's supervisor")
    assert sw["drop_fabric_runtime"] == 0 and sw["drop_no_host"] == 0 and sw["redirect_err"] == 0


def test_every_flow_migrates_between_hosts_under_traffic(tmp_path):
    """From a worker to a worker, a worker to the ingress, the ingress to a
    worker: the marker goes over the fabric behind the flow's frames.
    Offload off: a worker's runtimes do not offload, and the ingress host's
    hand-over race (an open issue, test_migration.py) is not what this tests."""
    with three_hosts(tmp_path, offload="off") as n:
        _migrate_around(n)


def _migrate_around(n) -> None:
    traffic = EchoTraffic(n, flows=30, packets=1500, pps=3000, base=42000)
    server = Proc(n.dst_ns, "http-serve", "--bind", n.dst_ip, "--timeout", "120").wait_ready()
    download = Proc(n.src_ns, "http-get", "--host", n.dst_ip, "--size", str(60 << 20), "--count", "1")
    moved = {}
    try:
        for src, dst in ((8, 16), (16, 0), (0, 8)):
            wait_for(lambda s=src: any(f["runtime"] == s for f in n.flows()["flows"]), timeout=10,
                     what=f"flows on runtime {src}")
            out = nodectl.migrate(n.name, src, dst)
            assert out["failed"] == 0, out
            moved[(src, dst)] = out["succeeded"]
        got = download.result(timeout=120)
    finally:
        server.kill()
    assert got["ok"] == 1, got
    assert all(moved.values()), moved
    traffic.check()
    markers = {r["id"]: r["markers"] for r in n.status()["runtimes"]}
    assert markers[8] > 0 and markers[16] > 0, markers  # markers reached the workers' runtimes
    print(f"\nMEASURED cross-host migration under 3,000 datagrams/s and a TCP download: {moved}")


def _send_raw(ns: str, ifname: str, frames: list[bytes]) -> None:
    with netns.entered(ns):
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((ifname, 0))
            for f in frames:
                s.send(f)


def test_bad_frames_on_the_fabric_are_dropped_and_counted(hosts_node):
    n = hosts_node
    h = n.fabric["hosts"]
    ingress, me, other = ((x["ipv4"], x["mac"]) for x in h)  # "me": host 1, where the frames come from
    inner = bytes([L.C["NFX_INGRESS_TAG"]]) + bytes.fromhex(h[0]["mac"].replace(":", "")) * 2 + b"\x08\x00" + \
        bytes(46)
    good = fabric.encap(me, ingress, 8, inner)  # what host 1 may send: runtime 8 is its own
    hdr = fabric.ENCAP_LEN - 1
    bad = [
        good[:hdr - 3] + b"\x00" + good[hdr - 2:],                      # bad magic
        good[:hdr - 2] + b"\x09" + good[hdr - 1:],                      # bad version
        good[:16] + (len(good)).to_bytes(2, "big") + good[18:],         # IP length beyond the frame
        good[:20] + b"\x20\x00" + good[22:],                            # a fragment (MF)
        good[:hdr],                                                      # nothing inside
    ]
    wrong_rt = [
        fabric.encap(me, ingress, 63, inner),   # no such runtime
        fabric.encap(me, ingress, 0, inner),    # the ingress's own runtime
        fabric.encap(me, ingress, 16, inner),   # host 2's runtime, sent by host 1
    ]
    # the IP checksum of the tampered ones is left wrong too: the switch never reads it
    sink = Proc(n.dst_ns, "udp-sink", "--idle", "1", "--timeout", "5").wait_ready()
    before = n.status()["switch"]
    _send_raw(h[1]["netns"], "fab0", bad + wrong_rt)
    wait_for(lambda: n.status()["switch"]["drop_fabric_runtime"] >= before["drop_fabric_runtime"] + len(wrong_rt),
             timeout=5, what="the frames counted")
    after = n.status()["switch"]
    assert after["drop_fabric_bad"] - before["drop_fabric_bad"] == len(bad)
    assert after["drop_fabric_runtime"] - before["drop_fabric_runtime"] == len(wrong_rt)
    assert after["to_ext"] == before["to_ext"] and after["rx_fabric"] == before["rx_fabric"]
    # a worker takes frames only from the ingress, and only for its own runtimes
    with NodeMaps(fabric.worker_name(n.name, 2)) as maps:
        w_before = maps.counters()
        _send_raw(h[1]["netns"], "fab0", [fabric.encap(me, other, 16, inner), fabric.encap(me, other, 8, inner)])
        wait_for(lambda: maps.counters()["drop_fabric_runtime"] >= w_before["drop_fabric_runtime"] + 2,
                 timeout=5, what="the worker counted them")
        assert maps.counters()["to_runtime"] == w_before["to_runtime"]
    assert sink.result()["received"] == 0  # nothing got through to the sink


def test_a_worker_hosts_failure_loses_only_what_was_on_it(tmp_path):
    """All of host 1's processes killed with -9 and its fabric link down,
    under 30 UDP flows at 3,000 datagrams/s: the controller fences the host
    and marks its runtime exited; the runtimes holding its flows' snapshots
    (on the other hosts) take them.  Its flows lose what was in flight on it
    and during the detection (one gap each), keep their NF state within
    K-1; the other flows lose nothing."""
    with three_hosts(tmp_path, offload="off") as n:  # (offloaded, a flow is snapshotted seldom)
        flows, packets = 30, 1500
        before = warm_and_snapshotted(n, flows, 45000, 3000)
        on1 = {k for k, f in before.items() if f["host"] == 1}
        assert on1 and len(on1) < flows
        replicas = {f["replica"] for k, f in before.items() if k in on1}
        assert not replicas & {8}, replicas  # replicas on other hosts
        sink = Proc(n.dst_ns, "udp-sink", "--echo", "--idle", "3", "--timeout", "60").wait_ready()
        sender = Proc(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets", str(packets),
                      "--pps", "3000", "--echo", "--echo-wait", "3", "--base-port", "45000")
        wait_for(lambda: sum(f["packets"]["orig"] for f in n.flows()["flows"] if f["key"] in on1)
                 > sum(f["packets"]["orig"] for k, f in before.items() if k in on1) + 10 * len(on1),
                 timeout=10, interval=0.01, what="traffic on host 1's flows")
        _kill_host(n, 1)
        sent, got = sender.result(timeout=120), sink.result(timeout=120)
        assert sent["sent"] == flows * packets
        ctl = _controller(n)
        assert ctl["stats"]["hosts_fenced"] == 1, ctl["stats"]
        assert NodeMaps(n.name).host_table()[1]["fenced"]
        after = {f["key"]: f for f in n.flows()["flows"]}
        for k in on1:
            assert after[k]["runtime"] == after[k]["switch_runtime"] in (0, 16), after[k]
        lost = check_taken_flows(before, on1, sent, got, n.src_ip, packets, after, 20, K)
        print(f"\nMEASURED host failure: host 1's {len(on1)} flows lost {lost} of {len(on1) * packets} datagrams "
              f"at 100/s each (detection: supervisor silent for twice the runtime failure time); "
              f"the other {flows - len(on1)} flows none")


def test_the_leading_controllers_host_dies_and_a_controller_on_another_host_leads(tmp_path):
    """Controllers on the ingress host and on worker host 1, the state in a
    3-member etcd cluster with a member on each host.  Host 1's controller
    is made the leader (the ingress one stopped, then killed: restarted, it
    stands by); then host 1 dies (its controller, its runtime and its etcd
    member).  The ingress host's controller leads from etcd's state, fences
    host 1, and runtime 8's flows are taken over; the flows of the other
    hosts never notice, at any point."""
    with three_hosts(tmp_path, etcd=True, controller_hosts=[0, 1], leader_ttl=1, offload="off") as n:
        first = _controller(n)
        worker1 = nodeconf.read_state(fabric.worker_name(n.name, 1))
        assert first["pid"] == n.state["controller"]["pid"]  # the ingress host's leads, host 1's stands by
        traffic_flows, packets = 30, 2400
        before = warm_and_snapshotted(n, traffic_flows, 47000, 3000)
        on1 = {k for k, f in before.items() if f["host"] == 1}
        sink = Proc(n.dst_ns, "udp-sink", "--echo", "--idle", "3", "--timeout", "60").wait_ready()
        sender = Proc(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(traffic_flows), "--packets",
                      str(packets), "--pps", "3000", "--echo", "--echo-wait", "3", "--base-port", "47000")
        # 1. host 1's controller takes the lead: the ingress one stops refreshing its lease
        os.kill(first["pid"], signal.SIGSTOP)
        lead1 = wait_for(lambda: (c := _controller(n)) and c["pid"] == worker1["controller"]["pid"] and c,
                         timeout=15, what="host 1's controller leading")
        os.kill(first["pid"], signal.SIGKILL)  # (stopped: it dies without a word) restarted, it stands by
        assert {e["id"]: e["state"] for e in lead1["view"]["runtimes"]} == {0: "running", 8: "running",
                                                                            16: "running"}
        # 2. host 1 dies: its controller, runtime, supervisor and etcd member
        t0 = time.monotonic()
        _kill_host(n, 1)
        lead0 = wait_for(lambda: (c := _controller(n)) and c["pid"] not in (first["pid"], lead1["pid"]) and c,
                         timeout=15, what="the ingress host's controller leading again")
        wait_for(lambda: (_controller(n) or {}).get("stats", {}).get("hosts_fenced") == 1, timeout=15,
                 what="host 1 fenced")
        failover = time.monotonic() - t0
        sent, got = sender.result(timeout=120), sink.result(timeout=120)
        assert sent["sent"] == traffic_flows * packets
        after = {f["key"]: f for f in n.flows()["flows"]}
        for k in on1:
            assert after[k]["runtime"] == after[k]["switch_runtime"] in (0, 16), after[k]
        lost = check_taken_flows(before, on1, sent, got, n.src_ip, packets, after, 20, K)
        assert lead0["log"]["store"] == "etcd"
        print(f"\nMEASURED controller host failure: host 1 (leading controller, runtime 8, an etcd member) killed; "
              f"the ingress host's controller led, fenced it and its flows were taken in {failover:.2f} s; "
              f"host 1's {len(on1)} flows lost {lost} of {len(on1) * packets} datagrams, the others none")
