"""Replication, recovery and takeover: kill -9 a runtime under traffic.  With
takeover off it comes back with its flows' state from its peers; with
takeover on (the default) its peers take its flows at once and it comes back
empty.  Either way every flow keeps its NF state within K-1 packets, its
datagrams stay in order and exactly once, and the other runtimes never stop."""
from __future__ import annotations

import os
import signal
import time

import pytest

from nfactor_xdp.control import node_client as nodectl
from tests.helpers import Proc, check_taken_flows, run_tool, wait_for, warm_and_snapshotted

pytestmark = [pytest.mark.root, pytest.mark.netns]

K = 10
POLICY = {"default_chain": ["flow_monitor", "firewall"],
          "nf_config": {"firewall": {"rules": [{"proto": "udp", "dport": "9001", "action": "drop"}]}}}


def _port(flow: dict) -> int:
    return int(flow["flow"].split()[1].rsplit(":", 1)[1])


def test_killed_runtime_recovers_its_flows_from_snapshots(node_factory):
    n = node_factory(2, POLICY, takeover="off")
    flows, packets = 20, 1200
    sink = Proc(n.dst_ns, "udp-sink", "--echo", "--idle", "3", "--timeout", "60").wait_ready()
    sender = Proc(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets", str(packets),
                  "--pps", "2000", "--echo", "--echo-wait", "3", "--base-port", "51000")
    blocked = run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--port", "9001", "--flows", "6", "--packets", "3",
                       "--base-port", "52000")
    assert blocked["sent"] == 18
    wait_for(lambda: len(n.flows()["flows"]) == flows + 6, timeout=10, what="flows placed")
    # let every flow get snapshots, then crash runtime 0
    wait_for(lambda: all(f.get("snapshot_version", 0) >= 2 for f in n.flows()["flows"]
                         if _port(f) >= 51000 and _port(f) < 52000), timeout=20, what="snapshots taken")
    before = {f["key"]: f for f in n.flows()["flows"]}

    on0 = {k for k, f in before.items() if f["runtime"] == 0}
    on1 = {_port(f) for f in before.values() if f["runtime"] == 1 and _port(f) < 52000}
    victim = next(r for r in n.status()["runtimes"] if r["id"] == 0)
    t_kill = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: next(r for r in n.status()["runtimes"] if r["id"] == 0)["restarts"] == 1,
             timeout=30, interval=0.02, what="runtime 0 restarted")
    wait_for(lambda: next(r for r in n.status()["runtimes"] if r["id"] == 0)["state"] == "running",
             timeout=30, interval=0.02, what="runtime 0 recovered and running")
    back = time.monotonic() - t_kill
    from nfactor_xdp.formats import config as nodeconf, query as rtctl
    rec = rtctl.request(nodeconf.runtime_socket(n.name, 0), "status")["replication"]["recovery"]
    assert rec["phase"] == "done" and rec["actors"] >= len(on0), rec

    # every flow of runtime 0 exists again, with its state
    after = {f["key"]: f for f in n.flows()["flows"]}
    for k in on0:
        assert k in after, before[k]["flow"]
        assert after[k]["runtime"] == after[k]["switch_runtime"] == 0  # the switch never moved it
    for k in on0:  # firewall verdicts kept: blocked flows stay blocked
        if _port(before[k]) >= 52000:
            assert after[k]["nfs"]["firewall"]["verdict"] == "drop"
    sent = sender.result()
    got = sink.result()
    assert sent["sent"] == flows * packets
    # the other runtime never stopped: its flows lost nothing, in order
    for peer, seqs in got["flows"].items():
        if int(peer.rsplit(":", 1)[1]) in on1:
            assert seqs == list(range(packets)), peer
    # runtime 0's flows: exactly once and in order, with one gap at most (what reached
    # runtime 0 while it was down, or sat in the killed process), then every datagram
    # up to the last one sent: traffic resumed through the recovered runtime
    on0_ports = sorted(_port(before[k]) for k in on0 if _port(before[k]) < 52000)
    assert on0_ports, "round-robin put no streaming flow on runtime 0"
    lost0 = 0
    for port in on0_ports:
        seqs = got["flows"].get(f"{n.src_ip}:{port}", [])
        lost0 += packets - len(seqs)
        gaps = [i for i in range(1, len(seqs)) if seqs[i] != seqs[i - 1] + 1]
        assert seqs and seqs[0] == 0 and seqs[-1] == packets - 1 and len(gaps) <= 1, (port, gaps, len(seqs))
        assert seqs == sorted(set(seqs)), port
    mid = {f["key"]: f for f in n.flows()["flows"]}

    # Then new traffic on the same flows: every datagram sent now must come through
    # runtime 0's recovered actors, exactly once and in order, and be counted by them.
    more = 100
    sink = Proc(n.dst_ns, "udp-sink", "--echo", "--expect", str(flows * more), "--timeout", "30").wait_ready()
    sent2 = run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets", str(more),
                     "--pps", "2000", "--echo", "--echo-wait", "5", "--base-port", "51000")
    got2 = sink.result()
    assert sent2["sent"] == got2["received"] == flows * more
    assert sorted(got2["flows"]) == sorted(f"{n.src_ip}:{51000 + i}" for i in range(flows))
    assert all(seqs == list(range(more)) for seqs in got2["flows"].values())
    assert sorted(map(int, sent2["echoes"])) == [51000 + i for i in range(flows)]
    assert all(seqs == list(range(more)) for seqs in sent2["echoes"].values())
    # flow monitor counters within K-1 packets of the truth, per flow: the datagrams that
    # reached the sink before (a frame lost while runtime 0 was down never reached an
    # actor) plus every one sent since, which runtime 0 counted once each way
    final = {f["key"]: f for f in n.flows()["flows"]}
    for k in on0:
        f = final[k]
        port = _port(f)
        if port >= 52000:
            continue
        assert f["runtime"] == f["switch_runtime"] == 0, f
        fm, was = f["nfs"]["flow_monitor"]["packets"], mid[k]["nfs"]["flow_monitor"]["packets"]
        assert fm == {"orig": was["orig"] + more, "reply": was["reply"] + more}, (f["flow"], fm, was)
        truth = len(got["flows"][f"{n.src_ip}:{port}"]) + more
        assert truth - (K - 1) <= fm["orig"] <= truth, (f["flow"], fm, truth)
    print(f"\nMEASURED kill to recovered and running {back * 1000:.0f} ms; recovery itself {rec['seconds'] * 1000:.0f} ms "
          f"for {rec['actors']} flows ({rec['snapshots']} snapshots fetched, {rec['buffered']} frames held); "
          f"its {len(on0_ports)} streaming flows lost {lost0} datagrams while it was down")


def test_replication_resumes_after_a_peer_restarts_then_the_other_runtime_recovers(node_factory):
    """kill -9 runtime 1 under traffic, it comes back, more packets on the same
    flows, then kill -9 runtime 0: every flow of runtime 0 comes back from
    runtime 1 (the restarted peer is a replica again), within K-1 packets."""
    n = node_factory(2, {"default_chain": ["flow_monitor"]}, takeover="off")
    flows, first, more = 100, 150, 30

    def runtime(i):
        return next(r for r in n.status()["runtimes"] if r["id"] == i)

    def kill_and_wait(i, restarts):
        os.kill(runtime(i)["pid"], signal.SIGKILL)
        wait_for(lambda: runtime(i)["restarts"] == restarts and runtime(i)["state"] == "running",
                 timeout=30, interval=0.05, what=f"runtime {i} restarted and running")

    sink = Proc(n.dst_ns, "udp-sink", "--idle", "3", "--timeout", "90").wait_ready()
    sender = Proc(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets", str(first),
                  "--pps", "3000", "--base-port", "53000")
    wait_for(lambda: len(n.flows()["flows"]) == flows, timeout=10, what="flows placed")
    kill_and_wait(1, 1)  # while the flows run
    assert sender.result()["sent"] == flows * first
    got = sink.result()["flows"]
    sink = Proc(n.dst_ns, "udp-sink", "--idle", "3", "--timeout", "60").wait_ready()
    assert run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets", str(more),
                    "--pps", "3000", "--base-port", "53000")["sent"] == flows * more
    for peer, seqs in sink.result()["flows"].items():  # the same flows: what reached the sink, per flow
        got.setdefault(peer, []).extend(seqs)
    before = {f["key"]: f for f in n.flows()["flows"]}
    on0 = {k: f for k, f in before.items() if f["runtime"] == 0}
    assert on0, "round-robin put no flow on runtime 0"
    time.sleep(0.5)  # the last snapshots on their way
    kill_and_wait(0, 1)
    rec = nodectl.runtime_query(n.name, 0, "status")["replication"]["recovery"]
    after = {f["key"]: f for f in n.flows()["flows"]}
    lost = [f["flow"] for k, f in on0.items() if k not in after or after[k]["runtime"] != 0]
    assert not lost, f"{len(lost)} of runtime 0's {len(on0)} flows not recovered ({rec}): {lost[:5]}"
    for k, f in on0.items():
        truth = len(got[f"{n.src_ip}:{_port(f)}"])
        counted = after[k]["nfs"]["flow_monitor"]["packets"]["orig"]
        assert truth - (K - 1) <= counted <= truth, (f["flow"], counted, truth)
    print(f"\nMEASURED runtime 0 recovered {rec['actors']} flows in {rec['seconds'] * 1000:.0f} ms after its peer's "
          f"restart; {len(on0)} were its own")


def test_a_killed_runtimes_flows_are_taken_over_by_its_peers_at_once(node_factory):
    """kill -9 runtime 0 of 3 under 100 UDP flows at 10,000 datagrams/s (echoed):
    runtimes 1 and 2 take its flows from the snapshots they hold, before it
    has restarted; it comes back empty.  Its flows lose only what reached it
    before that (one gap at most each), keep their NF state within K-1, and
    the other runtimes' flows lose nothing.  Offload off: an offloaded flow
    needs no runtime to flow (test_offload.py kills its runtime too)."""
    n = node_factory(3, POLICY, offload="off")
    flows, packets = 100, 300
    PPS = 10_000  # three runtimes and the traffic tools on two CPUs: a rate none of them drops at

    def runtime(i):
        return next(r for r in n.status()["runtimes"] if r["id"] == i)

    before = warm_and_snapshotted(n, flows, 54000, 4000)
    on0 = {k for k, f in before.items() if f["runtime"] == 0}
    assert on0 and len(on0) < flows, "round-robin put no flow (or every flow) on runtime 0"
    victim = runtime(0)
    sink = Proc(n.dst_ns, "udp-sink", "--echo", "--idle", "3", "--timeout", "60").wait_ready()
    sender = Proc(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets", str(packets),
                  "--pps", str(PPS), "--echo", "--echo-wait", "3", "--base-port", "54000")
    wait_for(lambda: sum(f["packets"]["orig"] for f in n.flows()["flows"] if f["key"] in on0)
             > sum(f["packets"]["orig"] for k, f in before.items() if k in on0) + 10 * len(on0),
             timeout=10, interval=0.01, what="traffic on runtime 0's flows")
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: runtime(0)["restarts"] == 1 and runtime(0)["state"] == "running",
             timeout=30, interval=0.02, what="runtime 0 restarted and running")
    sent, got = sender.result(), sink.result()
    assert sent["sent"] == flows * packets

    peers = [nodectl.runtime_query(n.name, i, "status") for i in (1, 2)]
    taken = sum(p["takeover"]["taken"] for p in peers)
    rec = nodectl.runtime_query(n.name, 0, "status")["replication"]["recovery"]
    assert taken == len(on0), [p["takeover"] for p in peers]
    assert rec["phase"] == "done" and rec["actors"] == 0, rec  # it came back empty: nothing left to recover
    after = {f["key"]: f for f in n.flows()["flows"]}
    for k in on0:
        f = after[k]
        assert f["runtime"] == f["switch_runtime"] in (1, 2), f
    # the other runtimes' flows never noticed; runtime 0's: in order, once, one gap at most, and
    # through to the last datagram sent (traffic resumed on the taker), their NF state within K-1
    lost0 = check_taken_flows(before, on0, sent, got, n.src_ip, packets, after, 20, K)
    sw = n.status()
    print(f"\nMEASURED takeover: {taken} flows of runtime 0 taken by its peers in "
          f"{max(p['takeover']['seconds'] for p in peers) * 1000:.1f} ms (the slowest peer's own work); "
          f"its {len(on0)} flows lost {lost0} of {len(on0) * packets} datagrams at {PPS}/s in all; "
          f"recovery after the restart: {rec['actors']} actors, {rec['taken_over']} held frames dropped; "
          f"runtimes: {[(r['id'], r['state']) for r in sw['runtimes']]}")


def test_a_hung_runtime_is_killed_and_its_flows_taken_over(node_factory):
    """SIGSTOP runtime 0 under traffic (as an NF stuck in a loop would hang
    it): failed after the missed heartbeats, killed by the supervisor at the
    hang timeout, its flows taken by runtime 1 with their state, restarted
    empty.  Before the watchdog its flows stayed dark for as long as it lived."""
    n = node_factory(2, POLICY, offload="off", hang_timeout=1.0)
    flows, packets = 20, 1500

    def runtime(i):
        return next(r for r in n.status()["runtimes"] if r["id"] == i)

    sink = Proc(n.dst_ns, "udp-sink", "--echo", "--expect", str(flows * 5), "--timeout", "30").wait_ready()
    assert run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets", "5",
                    "--pps", "2000", "--echo", "--echo-wait", "3", "--base-port", "55000")["sent"] == flows * 5
    assert sink.result()["received"] == flows * 5
    wait_for(lambda: all(f.get("snapshot_version", 0) >= 1 and f.get("replica") is not None
                         for f in n.flows()["flows"]), timeout=20, what="every flow snapshotted")
    before = {f["key"]: f for f in n.flows()["flows"]}
    on0 = {k for k, f in before.items() if f["runtime"] == 0}
    assert on0, "round-robin put no flow on runtime 0"
    pid = runtime(0)["pid"]
    sink = Proc(n.dst_ns, "udp-sink", "--echo", "--idle", "4", "--timeout", "60").wait_ready()
    sender = Proc(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets", str(packets),
                  "--pps", "4000", "--echo", "--echo-wait", "3", "--base-port", "55000")
    wait_for(lambda: sum(f["packets"]["orig"] for f in n.flows()["flows"] if f["key"] in on0)
             > sum(before[k]["packets"]["orig"] for k in on0) + 20, timeout=10, interval=0.01,
             what="traffic on runtime 0's flows")
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: runtime(0)["restarts"] == 1 and runtime(0)["state"] == "running", timeout=30,
                 interval=0.05, what="runtime 0 killed as hung, restarted and running")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # (it is gone unless the watchdog failed)
        except ProcessLookupError:
            pass
    sent, got = sender.result(), sink.result()
    from nfactor_xdp.formats.messages import MsgType
    ctl = nodectl.control_call(n.name, "control", MsgType.STATUS, {}, timeout=1.0)
    assert ctl["stats"]["hung_killed"] == 1, ctl["stats"]
    assert nodectl.runtime_query(n.name, 1, "status")["takeover"]["taken"] == len(on0)
    after = {f["key"]: f for f in n.flows()["flows"]}
    lost0 = 0
    for k, f in before.items():
        port = _port(f)
        seqs = got["flows"].get(f"{n.src_ip}:{port}", [])
        assert after[k]["runtime"] == after[k]["switch_runtime"] == 1, after[k]
        if k not in on0:
            assert seqs == list(range(packets)), port
            continue
        lost0 += packets - len(seqs)
        gaps = [i for i in range(1, len(seqs)) if seqs[i] != seqs[i - 1] + 1]
        assert seqs and seqs[-1] == packets - 1 and len(gaps) <= 1 and seqs == sorted(set(seqs)), (port, gaps)
        truth = 5 + len(seqs)
        counted = after[k]["nfs"]["flow_monitor"]["packets"]["orig"]
        assert truth - (K - 1) <= counted <= truth, (after[k]["flow"], counted, truth)
    assert sent["sent"] == flows * packets
    print(f"\nMEASURED hung runtime: its {len(on0)} flows lost {lost0} of {len(on0) * packets} datagrams at "
          f"{4000 // flows} per flow per second (the hang timeout, 1 s, and the takeover)")


def test_a_runtime_killed_while_migrating_all_its_flows_loses_none_of_them(node_factory):
    """kill -9 runtime 0 while it migrates its 100 flows to runtime 1, under
    traffic: flows already moved stay, flows arriving at runtime 1 (their state
    never coming) are completed from their snapshots, the rest are taken over.
    Every flow ends with one actor, on runtime 1, in order, within K-1."""
    n = node_factory(2, {"default_chain": ["flow_monitor"]}, offload="off", max_migrations=20)
    flows, packets = 100, 400

    def runtime(i):
        return next(r for r in n.status()["runtimes"] if r["id"] == i)

    sink = Proc(n.dst_ns, "udp-sink", "--echo", "--expect", str(flows * 5), "--timeout", "30").wait_ready()
    assert run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets", "5",
                    "--pps", "5000", "--echo", "--echo-wait", "3", "--base-port", "57000")["sent"] == flows * 5
    assert sink.result()["received"] == flows * 5
    wait_for(lambda: all(f.get("replica") is not None for f in n.flows()["flows"]), timeout=20,
             what="every flow snapshotted")
    on0 = {f["key"] for f in n.flows()["flows"] if f["runtime"] == 0}
    assert len(on0) > 20, "too few flows on runtime 0 to catch migrations in every stage"
    pid = runtime(0)["pid"]
    sink = Proc(n.dst_ns, "udp-sink", "--echo", "--idle", "4", "--timeout", "60").wait_ready()
    sender = Proc(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets", str(packets),
                  "--pps", "5000", "--echo", "--echo-wait", "3", "--base-port", "57000")
    wait_for(lambda: nodectl.runtime_query(n.name, 0, "status")["frames"] > 1000, timeout=10, interval=0.01,
             what="traffic through runtime 0")
    from nfactor_xdp.formats import config as nodeconf, query as rtctl
    rtctl.request(nodeconf.runtime_socket(n.name, 0), "migrate", to=1, timeout=5.0)
    wait_for(lambda: nodectl.runtime_query(n.name, 1, "status")["migration"]["in_created"] >= 5, timeout=10,
             interval=0.002, what="migrations under way")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: runtime(0)["restarts"] == 1 and runtime(0)["state"] == "running", timeout=30,
             interval=0.05, what="runtime 0 restarted")
    sent, got = sender.result(), sink.result()
    st1 = nodectl.runtime_query(n.name, 1, "status")
    listed = n.flows()["flows"]
    keys = [f["key"] for f in listed]
    assert len(keys) == len(set(keys)) == flows, "a flow with no actor, or with two"
    assert all(f["runtime"] == f["switch_runtime"] == 1 for f in listed), [f for f in listed if f["runtime"] != 1][:3]
    lost = 0
    for f in listed:
        seqs = got["flows"].get(f"{n.src_ip}:{_port(f)}", [])
        gaps = [i for i in range(1, len(seqs)) if seqs[i] != seqs[i - 1] + 1]
        assert seqs and seqs[-1] == packets - 1 and len(gaps) <= 1 and seqs == sorted(set(seqs)), (f["flow"], gaps)
        lost += packets - len(seqs)
        truth = 5 + len(seqs)
        counted = f["nfs"]["flow_monitor"]["packets"]["orig"]
        assert truth - (K - 1) <= counted <= truth, (f["flow"], counted, truth)
    assert sent["sent"] == flows * packets
    mig, took = st1["migration"], st1["takeover"]
    print(f"\nMEASURED killed mid-migration: of runtime 0's {len(on0)} flows, {mig['in_completed']} migrations "
          f"finished or completed from snapshots ({took['arrivals_completed']} of those), {took['taken']} taken "
          f"over; {lost} of {flows * packets} datagrams lost")
