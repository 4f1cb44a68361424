"""The control plane on a live node: failure detection and restart of a
killed runtime, a killed controller coming back with its view and rules
while the runtimes keep forwarding, hostile control frames, runtime add and
stop, scale-out."""
from __future__ import annotations

import collections
import json
import os
import random
import signal
import socket
import time

import pytest

from nfactor_xdp.kern import netns
from nfactor_xdp.formats import config as nodeconf
from nfactor_xdp.formats.messages import ClusterKey, MessageError, MsgType, decode, encode
from tests.helpers import Proc, run_tool, wait_for

pytestmark = [pytest.mark.root, pytest.mark.netns]

POLICY = {"default_chain": ["flow_monitor"],
          "rules": [{"proto": "udp", "dport": "9000", "chain": ["flow_monitor", "firewall"]}]}


def _rt(node, rt_id):
    return next(r for r in node.status()["runtimes"] if r["id"] == rt_id)


def _view_entry(node, rt_id) -> dict:
    """The controller's view alone (no runtime is asked: a hung one would stall the answer)."""
    from nfactor_xdp.control import node_client as nodectl
    view = nodectl.control_call(node.name, "control", MsgType.STATUS, {}, timeout=0.3)["view"]["runtimes"]
    return next(e for e in view if e["id"] == rt_id)


def _view_state(node, rt_id):
    return _view_entry(node, rt_id)["state"]


def test_killed_runtime_is_failed_in_time_restarted_and_rejoins(node_factory):
    n = node_factory(2, POLICY)
    before = _rt(n, 0)
    sink = Proc(n.dst_ns, "udp-sink", "--idle", "2", "--timeout", "30").wait_ready()
    t_kill = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    # detection: the view says failed, and the switch table with it
    wait_for(lambda: _view_state(n, 0) == "failed", timeout=5, interval=0.01, what="runtime 0 marked failed")
    detected = time.monotonic() - t_kill
    # failed on the supervisor's report of the exit, not by waiting for missed heartbeats
    assert _view_entry(n, 0)["why"] == "process exited"
    wait_for(lambda: _rt(n, 0)["state"] == "running" and _rt(n, 0)["restarts"] == 1, timeout=20,
             interval=0.01, what="runtime 0 running again")
    back = time.monotonic() - t_kill
    after = _rt(n, 0)
    assert after["pid"] != before["pid"] and after["switch_state"] == "running"
    sink.kill()
    # the restarted runtime got the rules from the controller
    st = n.status()
    hb, miss = st["config"]["heartbeat"], st["config"]["miss_limit"]
    print(f"\nMEASURED detection {detected * 1000:.0f} ms (heartbeat {hb}s x {miss}), kill to running "
          f"{back * 1000:.0f} ms")
    sent = run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", "8", "--packets", "5", "--port", "9000")
    assert sent["sent"] == 40
    chains = {tuple(f.get("chain") or []) for f in n.flows()["flows"] if f["flow"].endswith(":9000")}
    assert chains == {("flow_monitor", "firewall")}


def test_hung_runtime_is_failed_by_missed_heartbeats_and_gets_no_new_flows(node_factory):
    n = node_factory(2)
    pid = _rt(n, 0)["pid"]
    t_stop = time.monotonic()
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only the heartbeats can tell
    try:
        wait_for(lambda: _view_state(n, 0) == "failed", timeout=5, interval=0.01, what="failed")
        detected = time.monotonic() - t_stop
        st = n.status()
        hb, miss = st["config"]["heartbeat"], st["config"]["miss_limit"]
        # failed by the heartbeat rule, and only once the runtime had been silent for the whole window
        entry = _view_entry(n, 0)
        assert entry["why"].startswith("no heartbeat") and entry["silent_s"] > hb * miss, entry
        print(f"\nMEASURED heartbeat-only detection {detected * 1000:.0f} ms (heartbeat {hb}s x {miss})")
        sink = Proc(n.dst_ns, "udp-sink", "--expect", "18", "--timeout", "10").wait_ready()
        run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", "6", "--packets", "3", "--base-port", "45000")
        assert sink.result()["received"] == 18
        placed = [f for f in n.flows()["flows"] if f["switch_runtime"] is not None]
        assert len(placed) == 6 and {f["switch_runtime"] for f in placed} == {1}
    finally:
        os.kill(pid, signal.SIGCONT)
    # it wakes up, heartbeats, is told to register again, and is running again
    wait_for(lambda: _rt(n, 0)["state"] == "running" and _rt(n, 0)["switch_state"] == "running",
             timeout=10, what="runtime 0 running again")
    assert _rt(n, 0)["pid"] == pid and _rt(n, 0)["restarts"] == 0


def test_killed_controller_comes_back_with_view_and_rules_forwarding_never_stops(node_factory):
    n = node_factory(2, POLICY)
    r = n.cli("rules", "add", "--name", n.name, "--proto", "tcp", "--dport", "443", "--chain", "firewall")
    assert r.returncode == 0, r.stderr
    st0 = n.status()
    view0 = [(r["id"], r["state"]) for r in st0["runtimes"]]
    rules0 = json.loads(n.cli("rules", "list", "--name", n.name, "--json").stdout)["rules"]
    ctl0 = st0["controller"]["pid"]
    packets = 1500
    sink = Proc(n.dst_ns, "udp-sink", "--expect", str(10 * packets), "--timeout", "40").wait_ready()
    sender = Proc(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", "10", "--packets", str(packets),
                  "--pps", "5000", "--base-port", "46000")
    # the kill must land while traffic is under way: wait until the runtimes
    # have handled a tenth of it, and check it is not all through yet
    total = 10 * packets

    def frames():  # frames from the sender the switch took, whether a runtime or the switch forwarded them
        return n.status()["switch"]["rx_ext"]
    wait_for(lambda: frames() >= total // 10, timeout=20, what="traffic under way")
    assert frames() < total, "all traffic was through before the kill: nothing tested"
    t_kill = time.monotonic()
    os.kill(ctl0, signal.SIGKILL)
    wait_for(lambda: n.status()["controller"].get("alive") and n.status()["controller"]["pid"] != ctl0,
             timeout=10, interval=0.01, what="controller restarted")
    back = time.monotonic() - t_kill
    sent = sender.result()
    got = sink.result()
    assert got["received"] == sent["sent"] == 10 * packets  # forwarding never stopped
    assert all(seqs == list(range(packets)) for seqs in got["flows"].values())
    st1 = n.status()
    assert [(r["id"], r["state"]) for r in st1["runtimes"]] == view0
    assert st1["controller"]["restarts"] == 1
    assert st1["controller"]["stats"]["replayed_ops"] >= 1
    assert json.loads(n.cli("rules", "list", "--name", n.name, "--json").stdout)["rules"] == rules0
    # no runtime was marked failed by the comeback
    assert st1["controller"]["stats"]["failures_detected"] == 0
    print(f"\nMEASURED controller kill to answering again {back * 1000:.0f} ms")


def test_hostile_control_frames_are_counted_and_ignored(node_factory):
    n = node_factory(1)
    path = nodeconf.control_socket(n.name, "controller")
    key = ClusterKey.load_or_create(nodeconf.cluster_key_path())
    rnd = random.Random(3)
    frames = [rnd.randbytes(rnd.randrange(0, 300)) for _ in range(2000)]
    frames += [encode(MsgType.HEARTBEAT, 1, "evil", {"id": 0}, b"k" * 32)] * 200      # wrong key
    frames += [encode(MsgType.REGISTER, 2, "old", {"id": 0}, key, ts_ms=1)] * 100      # stale replay
    frames += [encode(MsgType.HEARTBEAT, 3, "odd", {"id": "zero", "load": []}, key)] * 100  # valid, nonsense
    frames += [encode(MsgType.MIGRATE_STATE, 4, "odd", {"x": 1}, key)] * 100           # a type it does not serve
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for f in frames:
            s.sendto(f, path)  # blocks while the controller's queue is full: none is lost

    # what the controller must reject, and why: the same decoder, run here
    expected = collections.Counter()
    for f in frames:
        try:
            decode(f, key)
        except MessageError as e:
            expected[e.reason] += 1
    assert expected["bad_mac"] >= 200 and expected["stale"] == 100

    def counted():
        c = n.status()["controller"]
        return c.get("alive") and sum(c["rejected"].values()) >= sum(expected.values()) and c
    c = wait_for(counted, timeout=10, what="rejections counted")
    assert c["rejected"] == dict(expected)  # every frame rejected for its own reason, nothing else
    assert c["restarts"] == 0 and c["stats"]["failures_detected"] == 0
    assert [r["state"] for r in n.status()["runtimes"]] == ["running"]
    sink = Proc(n.dst_ns, "udp-sink", "--expect", "20", "--timeout", "10").wait_ready()
    run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", "2", "--packets", "10")
    assert sink.result()["received"] == 20


def test_runtime_add_and_stop(node_factory):
    n = node_factory(1)
    r = n.cli("runtime", "add", "--name", n.name)
    assert r.returncode == 0 and "added runtime 1" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: len(n.status()["runtimes"]) == 2 and n.status()["runtimes"][1]["state"] == "running",
             timeout=20, what="runtime 1 running")
    run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", "10", "--packets", "2", "--base-port", "47000")
    placed = {f["switch_runtime"] for f in n.flows()["flows"]}
    assert placed == {0, 1}
    r = n.cli("runtime", "stop", "--name", n.name, "--id", "1")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: [x["id"] for x in n.status()["runtimes"]] == [0], timeout=10, what="runtime 1 gone")
    node_ns = n.status()["config"]["netns"]
    assert "sw-rt1" not in netns.run(node_ns, ["ip", "-o", "link"]).stdout
    # its flows are placed anew on runtime 0 when their next packet comes
    sink = Proc(n.dst_ns, "udp-sink", "--expect", "20", "--timeout", "10").wait_ready()
    run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", "10", "--packets", "2", "--base-port", "47000")
    assert sink.result()["received"] == 20
    assert {f["switch_runtime"] for f in n.flows()["flows"]} == {0}
    r = n.cli("runtime", "kill", "--name", n.name, "--id", "7")
    assert r.returncode == 1 and "no runtime 7" in r.stderr


def test_scale_out_under_load(testbed):
    from nfactor_xdp.control import node_client as nodectl
    from nfactor_xdp.formats.config import NodeConfig
    show = testbed.show()
    name = "s" + testbed.name[-4:]
    # offload off: the load that triggers the scale-out is the runtime's (offloaded flows leave it idle)
    cfg = NodeConfig(name=name, netns=show["namespaces"]["node"], runtimes=1, max_runtimes=2,
                     scale_threshold=0.05, scale_window=0.5, offload="off")
    nodectl.start(cfg)
    try:
        src_ns = show["hosts"]["src"]["netns"]
        load = Proc(src_ns, "udp-send", "--dst", show["hosts"]["dst"]["ipv4"], "--flows", "50",
                    "--packets", "400", "--pps", "8000")
        wait_for(lambda: len(nodectl.status(name)["runtimes"]) == 2, timeout=30, what="a second runtime")
        load.result()
        st = nodectl.status(name)
        assert st["controller"]["stats"]["scale_outs"] == 1
        wait_for(lambda: nodectl.status(name)["runtimes"][1]["state"] == "running", timeout=20,
                 what="the new runtime running")
    finally:
        nodectl.stop(name)
