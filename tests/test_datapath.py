"""End to end through real namespaces, veths, XDP programs, AF_XDP sockets
and runtime processes: every datagram accounted for, replies through the
same runtime, a real TCP download, bad input, restarts, clean shutdown."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter

import pytest

from nfactor_xdp.kern import netns
from nfactor_xdp.control.processes import pid_alive
from nfactor_xdp.dataplane.packet import DROP, FLOW, classify
from tests.frames import cases
from tests.helpers import PY, Proc, run_tool, wait_for

pytestmark = [pytest.mark.root, pytest.mark.netns]


def _udp_exchange(node, flows=40, packets=50, pps=3000, v6=False, base_port=0):
    dst = node.dst_ip6 if v6 else node.dst_ip
    sink = Proc(node.dst_ns, "udp-sink", "--bind", "::" if v6 else "0.0.0.0", "--echo",
                "--expect", str(flows * packets), "--timeout", "30").wait_ready()
    try:
        sent = run_tool(node.src_ns, "udp-send", "--dst", dst, "--flows", str(flows), "--packets", str(packets),
                        "--pps", str(pps), "--echo", "--echo-wait", "10",
                        *(["--base-port", str(base_port)] if base_port else []))
        got = sink.result()
    finally:
        sink.kill()
    return sent, got


def _snmp(ns: str) -> dict:
    out = netns.run(ns, ["cat", "/proc/net/snmp"]).stdout.splitlines()
    table = {}
    for head, vals in zip(out[::2], out[1::2]):
        proto, names = head.split(":", 1)
        table[proto] = dict(zip(names.split(), map(int, vals.split(":", 1)[1].split())))
    return table


def _placements(name: str) -> tuple[list[int], list[int], dict[int, list[int]]]:
    """The switch's round-robin list, new flows per CPU (counter flow_new) and
    flows placed per runtime per CPU (rt_stats flows_placed), from the pins."""
    from nfactor_xdp.kern import layouts as L
    from nfactor_xdp.kern.maps import NodeMaps
    with NodeMaps(name) as maps:
        order = maps.running_runtimes()
        new = [c.value for c in maps["counters"].get(L.COUNTER_NAMES.index("flow_new"))]
        placed = {rt: [s.flows_placed for s in maps["rt_stats"].get(rt)] for rt in order}
    return order, new, placed


def test_udp_flows_arrive_exactly_once_in_order_and_replies_return(node_factory):
    node = node_factory(2, offload="off")  # every frame through the runtimes: their accounting is checked
    flows, packets = 40, 50
    sent, got = _udp_exchange(node, flows, packets)
    assert sent["sent"] == flows * packets
    # the sink saw every datagram of every flow exactly once, in order
    assert got["received"] == flows * packets and got["bad"] == 0
    assert len(got["flows"]) == flows
    for peer, seqs in got["flows"].items():
        assert seqs == list(range(packets)), peer
    # and every echo came back to the sender, in order
    assert len(sent["echoes"]) == flows
    for port, seqs in sent["echoes"].items():
        assert seqs == list(range(packets)), port

    # the node's own accounting matches what was sent
    st = node.status()
    sw = st["switch"]
    total = 2 * flows * packets
    assert sw["flow_new"] == flows
    assert sw["to_runtime"] == total and sw["to_ext"] == total
    assert sw["redirect_err"] == 0 and sw["xmit_drop"] == 0 and sw["socket_full"] == 0
    per_rt = {r["id"]: r for r in st["runtimes"]}
    assert sum(r["frames"] for r in per_rt.values()) == total
    assert sum(r["forwarded"] for r in per_rt.values()) == total
    # round-robin: a cursor per CPU (rr_cursor), starting at 0 in the freshly
    # loaded program and moved once per pick.  Every pick here placed a new
    # flow (no insert race, re-placement, full table or missed pick), so CPU
    # c's n_c placements went to the running runtimes in rr_table order, one
    # each in turn: position j got n_c // R, plus one if j < n_c % R.
    assert sw["flow_race"] == sw["flow_replaced"] == sw["drop_map_full"] == sw["drop_no_runtime"] == 0
    order, new_per_cpu, placed = _placements(node.name)
    assert sorted(order) == sorted(per_rt)
    R = len(order)
    assert sum(new_per_cpu) == flows
    for cpu, n in enumerate(new_per_cpu):
        want = {rt: n // R + (j < n % R) for j, rt in enumerate(order)}
        assert {rt: placed[rt][cpu] for rt in order} == want, (cpu, new_per_cpu, placed)
    # so the runtimes' shares differ by at most one flow per CPU that placed
    # flows, and each runtime holds the actors of the flows placed on it
    busy_cpus = sum(1 for n in new_per_cpu if n)
    shares = {rt: sum(placed[rt]) for rt in order}
    assert max(shares.values()) - min(shares.values()) <= busy_cpus
    assert {i: r["flows"] for i, r in per_rt.items()} == shares
    for r in per_rt.values():
        assert r["switch"]["to_rt_packets"] == r["frames"] == r["switch"]["from_rt_packets"]
        assert r["xsk"]["rx_dropped"] == 0

    # both directions of each flow were handled by one actor in one runtime
    fl = node.flows()["flows"]
    assert len(fl) == flows
    for f in fl:
        assert f["runtime"] == f["switch_runtime"]
        assert f["packets"] == {"orig": packets, "reply": packets}


def test_udp_over_ipv6(node):
    sent, got = _udp_exchange(node, flows=10, packets=30, v6=True)
    assert got["received"] == 300
    assert all(seqs == list(range(30)) for seqs in got["flows"].values())
    assert sum(map(len, sent["echoes"].values())) == 300


def test_tcp_download_completes_with_valid_checksums(node):
    before = _snmp(node.dst_ns)
    server = Proc(node.dst_ns, "http-serve", "--bind", node.dst_ip, "--timeout", "60").wait_ready()
    try:
        got = run_tool(node.src_ns, "http-get", "--host", node.dst_ip, "--size", str(20 << 20), "--count", "1")
    finally:
        server.kill()
    assert got["ok"] == 1, got
    after = _snmp(node.dst_ns)
    for proto in ("Tcp", "Udp"):
        assert after[proto]["InCsumErrors"] == before[proto]["InCsumErrors"], proto
    st = node.status()
    assert st["switch"]["redirect_err"] == 0
    assert st["switch"]["flow_new"] == 1
    # every frame of the download (MTU-sized ones too) took the ingress tag and came back with it
    assert st["switch"]["drop_no_headroom"] == st["switch"]["drop_rt_no_tag"] == 0


def test_status_and_flows_cli_json(node_factory):
    node = node_factory(2, offload="off")  # every frame through the runtimes (counted below)
    _udp_exchange(node, flows=6, packets=10)
    r = node.cli("status", "--name", node.name, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert [rt["state"] for rt in st["runtimes"]] == ["running", "running"]
    assert all(rt["pid"] and rt["core"] is not None for rt in st["runtimes"])
    assert st["switch"]["to_runtime"] == 120
    r = node.cli("flows", "--name", node.name, "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["flows"]) == 6
    r = node.cli("status", "--name", node.name)
    assert r.returncode == 0 and "running" in r.stdout


def test_a_redirect_into_a_veth_without_napi_is_counted_not_silent(node):
    """The platform's trap: a veth without XDP or GRO on the receiving end
    drops redirected frames while every XDP counter looks fine.  The tracer
    must count them, and the testbed's host ends must not have the problem."""
    _udp_exchange(node, flows=4, packets=10)
    assert node.status()["switch"]["redirect_err"] == 0
    # take NAPI away from the sink's interface: its XDP program and GRO
    from nfactor_xdp.kern.loader import detach
    with netns.entered(node.dst_ns):
        detach("eth0")
    netns.run(node.dst_ns, ["ethtool", "-K", "eth0", "gro", "off"])
    sink = Proc(node.dst_ns, "udp-sink", "--idle", "1", "--timeout", "3").wait_ready()
    run_tool(node.src_ns, "udp-send", "--dst", node.dst_ip, "--flows", "2", "--packets", "10")
    got = sink.result()
    st = node.status()["switch"]
    lost = 20 - got["received"]
    assert lost > 0
    assert st["redirect_err"] + st["xmit_drop"] >= lost


PARSE_DROPS = ("drop_short_eth", "drop_bad_ip", "drop_bad_l4", "drop_bad_ipv6_ext", "drop_vlan_deep")


def _raw_sender(ns: str, frames: list[bytes]) -> None:
    code = ("import socket,sys,json; s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('eth0',0)); "
            "[s.send(bytes.fromhex(h)) for h in json.load(sys.stdin)]")
    subprocess.run(["ip", "netns", "exec", ns, PY, "-c", code], input=json.dumps([f.hex() for f in frames]),
                   text=True, check=True, timeout=30)


_SPOOFER = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
frame, end = bytes.fromhex(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    s.send(frame)
    time.sleep(0.001)
"""


def test_spoofed_frames_from_one_side_never_steer_the_other_sides_frames(node):
    """Issue item 8, end to end: before a flow starts, its source side sends a
    frame of the flow's reply direction (as if from the destination); then the
    flow runs both ways (MTU-sized datagrams, echoed) while each side keeps
    sending frames of the other side's direction.  Every datagram and every
    echo arrives, in order: each frame left by the port opposite its ingress."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    sport, packets, nobody = 33000, 300, "02:00:00:00:00:99"  # spoofed frames: for no host's MAC
    reply_dir = bytes(Ether(dst=nobody) / IP(src=node.dst_ip, dst=node.src_ip) / UDP(sport=9000, dport=sport) / b"s")
    orig_dir = bytes(Ether(dst=nobody) / IP(src=node.src_ip, dst=node.dst_ip) / UDP(sport=sport, dport=9000) / b"s")
    _raw_sender(node.src_ns, [reply_dir])  # the flow's first frame: spoofed, from the wrong side
    spoofers = [subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", _SPOOFER, frame.hex(), "30"])
                for ns, frame in ((node.src_ns, reply_dir), (node.dst_ns, orig_dir))]
    sink = Proc(node.dst_ns, "udp-sink", "--echo", "--expect", str(packets), "--timeout", "30").wait_ready()
    try:
        sent = run_tool(node.src_ns, "udp-send", "--dst", node.dst_ip, "--flows", "1", "--packets", str(packets),
                        "--pps", "200", "--size", "1472", "--base-port", str(sport), "--echo", "--echo-wait", "10")
        got = sink.result()
    finally:
        sink.kill()
        for p in spoofers:
            p.kill()
            p.wait()
    assert got["received"] == packets and got["flows"] == {f"{node.src_ip}:{sport}": list(range(packets))}
    assert sent["echoes"] == {str(sport): list(range(packets))}
    sw = node.status()["switch"]
    assert sw["flow_new"] == 1  # the spoofed frames and the real ones: one flow, one runtime
    assert sw["drop_no_headroom"] == sw["drop_rt_no_tag"] == 0


def test_bad_input_is_counted_and_good_traffic_keeps_flowing(node):
    corpus = [c for c in cases() if len(c.frame) >= 14]
    bad = [c for c in corpus if c.kind not in (FLOW,)]
    sink = Proc(node.dst_ns, "udp-sink", "--expect", "400", "--timeout", "30").wait_ready()
    sender = Proc(node.src_ns, "udp-send", "--dst", node.dst_ip, "--flows", "4", "--packets", "100",
                  "--pps", "400")
    for _ in range(3):
        _raw_sender(node.src_ns, [c.frame for c in bad])
    sent = sender.result()
    got = sink.result()
    assert sent["sent"] == 400 and got["received"] == 400
    assert all(seqs == list(range(100)) for seqs in got["flows"].values())
    sw = node.status()["switch"]
    # every bad frame went through the switch 3 times: each counter moved at
    # least 3 times per case naming it (the cls_* ones also count the hosts'
    # own ARP and ND), and the parser's drop counters moved exactly once per
    # malformed frame sent, random ones included (their class: packet.classify)
    need = Counter(c.counter for c in bad if c.counter)
    for counter, n in need.items():
        assert sw[counter] >= 3 * n, counter
    malformed = [c for c in bad if classify(c.frame)[0] == DROP]
    assert sum(sw[k] for k in PARSE_DROPS) == 3 * len(malformed)
    # the runtimes are the same processes as before: nothing crashed
    assert all(r["restarts"] == 0 and r["live"] for r in node.status()["runtimes"])


def test_killed_runtime_is_restarted_and_its_flows_come_back(node_factory):
    from nfactor_xdp.control import node_client as nodectl
    node = node_factory(2, {"default_chain": ["flow_monitor"]})
    k = node.cfg.snapshot_every  # K: replication is on, a snapshot every K packets per flow
    flows, packets, base = 8, 13, 32000  # 26 packets per flow: its last snapshot is behind by up to K-1

    def actors():
        """The node's flows by key, once each is listed with its actor (a runtime
        that does not answer the query in time is left out of the listing)."""
        def listed():
            fl = {f["key"]: f for f in node.flows()["flows"]}
            return fl if all(f.get("nfs") for f in fl.values()) else None
        return wait_for(listed, timeout=10, what="every flow listed with its actor")

    _udp_exchange(node, flows, packets, base_port=base)
    before = actors()
    assert len(before) == flows
    assert all(f["nfs"]["flow_monitor"]["packets"] == {"orig": packets, "reply": packets} for f in before.values())
    victim = node.status()["runtimes"][0]
    assert victim["id"] == 0
    on0 = {key for key, f in before.items() if f["runtime"] == f["switch_runtime"] == 0}
    assert on0, "round-robin put no flow on runtime 0"
    # every snapshot that fell due has gone to the replica: from here the K-1 bound holds
    def snapshots_sent():
        st = nodectl.runtime_query(node.name, 0, "status")
        return st is not None and st["replication"]["pending"] == 0
    wait_for(snapshots_sent, timeout=5, what="runtime 0's due snapshots sent")
    os.kill(victim["pid"], signal.SIGKILL)

    def restarted():
        rt = node.status()["runtimes"][0]
        return rt["restarts"] == 1 and rt["switch_state"] == "running"
    wait_for(restarted, timeout=20, what="runtime restart")
    # the same flows, still placed on the restarted runtime by the switch (none placed anew)
    after = actors()
    assert set(after) == set(before)
    for key in on0:
        assert after[key]["switch_runtime"] == after[key]["runtime"] == 0, after[key]
        # recovered from its snapshot: NF state within K-1 packets of what it had seen
        fm = after[key]["nfs"]["flow_monitor"]["packets"]
        assert fm["orig"] <= packets and fm["reply"] <= packets, (after[key]["flow"], fm)
        assert fm["orig"] + fm["reply"] >= 2 * packets - (k - 1), (after[key]["flow"], fm, k)
    # traffic of the same flows (same source ports) flows again, end to end and back
    sent, got = _udp_exchange(node, flows, packets, base_port=base)
    assert got["received"] == flows * packets and got["bad"] == 0
    assert sorted(got["flows"]) == sorted(f"{node.src_ip}:{base + i}" for i in range(flows))
    assert all(seqs == list(range(packets)) for seqs in got["flows"].values())
    assert sorted(map(int, sent["echoes"])) == [base + i for i in range(flows)]
    assert all(seqs == list(range(packets)) for seqs in sent["echoes"].values())
    # through the recovered actors, which went on from their recovered state
    final = actors()
    assert set(final) == set(before) and node.status()["switch"]["flow_new"] == flows
    for key in on0:
        assert final[key]["switch_runtime"] == final[key]["runtime"] == 0
        fm, rec = final[key]["nfs"]["flow_monitor"]["packets"], after[key]["nfs"]["flow_monitor"]["packets"]
        assert fm == {"orig": rec["orig"] + packets, "reply": rec["reply"] + packets}, (final[key]["flow"], fm, rec)


def test_supervisor_restart_keeps_every_flow_in_place(node):
    from nfactor_xdp.control import node_client as nodectl
    sent, _ = _udp_exchange(node, flows=10, packets=5, base_port=31000)
    placed = {f["key"]: f["switch_runtime"] for f in node.flows()["flows"]}
    supervisor = node.status()["supervisor_pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not pid_alive(supervisor), timeout=10, what="the supervisor to die")
    # with the supervisor dead, the attached programs and the runtimes still forward
    sent, got = _udp_exchange(node, flows=10, packets=5, base_port=31000)
    assert got["received"] == 50
    nodectl.start(node.cfg)  # a new supervisor, same pins
    sent, got = _udp_exchange(node, flows=10, packets=5, base_port=31000)
    assert got["received"] == 50
    again = {f["key"]: f["switch_runtime"] for f in node.flows()["flows"]}
    assert again == placed
    assert node.status()["switch"]["flow_new"] == 10


def test_down_leaves_nothing_behind(testbed, node_factory):
    n = node_factory(2)
    _udp_exchange(n, flows=2, packets=5)
    node_ns = testbed.show()["namespaces"]["node"]
    # this node's programs (other nodes on the machine may run their own)
    from nfactor_xdp.kern.maps import NodeMaps
    with NodeMaps(n.name) as maps:
        ids = maps.config().prog_ids
    progs = {ids & 0xFFFFFFFF, ids >> 32}  # vswitch, steer
    assert 0 not in progs and progs <= _loaded_prog_ids()
    n.stop()
    links = netns.run(node_ns, ["ip", "-o", "link", "show"]).stdout
    assert "xdp" not in links and "sw-rt" not in links and " rt0" not in links
    assert not os.path.exists(f"/sys/fs/bpf/nfactor/{n.name}")
    assert not os.path.exists(f"/run/nfactor/{n.name}")
    # programs are freed after an RCU grace period
    wait_for(lambda: not progs & _loaded_prog_ids(), timeout=10, what=f"programs {progs} unloaded")


def _loaded_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out or "[]")}


def test_foreground_node_stops_cleanly_on_ctrl_c(testbed):
    from nfactor_xdp.formats import config as nodeconf
    name = "fg" + testbed.name[-4:]
    node_ns = testbed.show()["namespaces"]["node"]
    p = subprocess.Popen([PY, "-m", "nfactor_xdp.cli", "up", "--foreground", "--name", name, "--netns", node_ns,
                          "--runtimes", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (nodeconf.read_state(name) or {}).get("phase") == "running", timeout=30,
                 what="the foreground node to run")
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out
    assert "down" in out
    assert not os.path.exists(f"/sys/fs/bpf/nfactor/{name}")
    links = netns.run(node_ns, ["ip", "-o", "link", "show"]).stdout
    assert "xdp" not in links and "sw-rt" not in links


def test_probe_finds_everything_here():
    r = subprocess.run([PY, "-m", "nfactor_xdp.cli", "probe", "--json"], capture_output=True, text=True, timeout=120)
    checks = json.loads(r.stdout)
    assert r.returncode == 0, [c for c in checks if not c["ok"]]
    assert all(c["ok"] for c in checks)


_SEGMENT_SINK = r"""
import json, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1)
print(json.dumps({"ready": True}), flush=True)
conn, _ = srv.accept(); got = 0
while chunk := conn.recv(65536):
    got += len(chunk)
print(json.dumps({"received": got}), flush=True)
"""

_SEGMENT_SOURCE = r"""
import json, socket, sys, time
sizes = range(1, int(sys.argv[3]) + 1)
def retrans():
    rows = [l.split() for l in open("/proc/net/snmp") if l.startswith("Tcp:")]
    return int(dict(zip(rows[0], rows[1]))["RetransSegs"])
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
before = retrans()
for n in sizes:          # one segment of each size, each acked before the next goes
    s.sendall(b"x" * n)
    time.sleep(0.002)
s.close()
print(json.dumps({"sent": sum(sizes), "retransmitted": retrans() - before}), flush=True)
"""


def test_tcp_segments_of_every_size_cross_the_node_first_time(node):
    """Every frame for a runtime gets the switch's ingress tag; a host stack's
    skbs of some sizes have no tailroom, so a tag appended behind them was
    refused and those segments never crossed (an HTTP request of 127 bytes,
    each retransmission too).  Segments of every size from 1 to 1448 bytes
    arrive, none retransmitted, none dropped by the switch."""
    sink = subprocess.Popen(["ip", "netns", "exec", node.dst_ns, PY, "-c", _SEGMENT_SINK, node.dst_ip, "7070"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(sink.stdout.readline())["ready"]
        sent = json.loads(subprocess.run(["ip", "netns", "exec", node.src_ns, PY, "-c", _SEGMENT_SOURCE,
                                          node.dst_ip, "7070", "1448"],
                                         capture_output=True, text=True, timeout=120, check=True).stdout)
        got = json.loads(sink.communicate(timeout=30)[0])
    finally:
        sink.kill()
    sw = node.status()["switch"]
    assert got["received"] == sent["sent"] == 1448 * 1449 // 2
    assert sent["retransmitted"] == 0
    assert sw["drop_no_headroom"] == sw["drop_rt_no_tag"] == 0
