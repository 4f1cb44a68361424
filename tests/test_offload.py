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


# --- observe mode: http_parser fed copies while the switch forwards ------------------------------
OBSERVED = {"rules": [{"proto": "tcp", "dport": "8082", "chain": ["flow_monitor", "firewall", "http_parser"],
                       "observe": True}], "default_chain": []}


def _observing(n) -> int:
    return sum((r["offload"] or {}).get("observing", 0) for r in n.status()["runtimes"])


def _load(n, **kw) -> tuple[Proc, Proc]:
    server = Proc(n.dst_ns, "http-serve", "--bind", n.dst_ip, "--port", "8082", "--timeout", "90").wait_ready()
    args = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    load = Proc(n.src_ns, "http-load", "--host", n.dst_ip, "--port", "8082", *args).wait_ready()
    return server, load


def _done(load: Proc) -> dict:
    import json
    line = load.p.stdout.readline()
    assert line, f"http-load died: {load.p.stderr.read()}"
    return json.loads(line)


def _copies_read(n) -> int:
    return sum(f.get("observed_copies", 0) for f in n.flows()["flows"])


def test_observe_mode_parses_every_request_while_the_switch_forwards(node_factory):
    """A real keep-alive HTTP load through flow_monitor, firewall and an
    observing http_parser: every request and response parsed, from copies,
    while the switch forwards the traffic; each copy made was read."""
    n = node_factory(1, OBSERVED, offload="on")
    # 2,000 requests/s, 6,000 copies/s: well within what one runtime reads (the benchmark finds the most)
    server, load = _load(n, connections=4, duration=3, size=100, rate=2000, hold=30)
    try:
        done = _done(load)
        assert done["requests"] == done["ok"] > 2000 and not done["errors"], done
        wait_for(lambda: _copies_read(n) == n.status()["switch"]["off_observed"], timeout=10,
                 what="every copy read")
        fl = n.flows()["flows"]
        st = n.status()
    finally:
        load.kill()
        server.kill()
    assert len(fl) == 4 and all("observe payload" in f["offload"] for f in fl), fl
    hp = [f["nfs"]["http_parser"] for f in fl]
    assert sorted(h["n_requests"] for h in hp) == sorted(done["per_connection"]), (hp, done)
    assert all(h["n_responses"] == h["n_requests"] and h["n_errors"] == 0 and all(h["in_sync"].values())
               and h["observe_gaps"] == 0 for h in hp), hp
    sw = st["switch"]
    frames = sum(f["packets"]["orig"] + f["packets"]["reply"] for f in fl)
    assert sw["off_observe_lost"] == 0 and sw["off_observed"] >= done["ok"]  # a request and a response each
    assert _in_python(n) <= 0.2 * frames, (_in_python(n), frames)
    assert sw["off_forward"] >= 0.8 * frames
    print(f"\nMEASURED observe: {done['ok']} requests in {done['elapsed']} s, {frames} frames, "
          f"{sw['off_forward']} forwarded by the switch, {sw['off_observed']} copies read, "
          f"{_in_python(n)} frames through Python")


def test_copies_a_stalled_runtime_cannot_take_are_counted_and_the_traffic_loses_nothing(node_factory):
    """The runtime stopped (SIGSTOP) under an observed HTTP load until its
    observe ring overflows: the copies past it are counted as lost (in the
    switch and as gaps in the parser's state), and every request still gets
    its whole response: observation loss, never traffic loss."""
    n = node_factory(1, OBSERVED, offload="on", heartbeat=1.0, miss_limit=30)  # a stop is not a failure here
    server, load = _load(n, connections=4, duration=6, size=4000, hold=30)
    try:
        wait_for(lambda: _observing(n) == 4, timeout=5, what="the 4 connections observed")
        pid = n.status()["runtimes"][0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: n.status()["switch"].get("off_observe_lost", 0) > 0, timeout=10,
                     what="copies lost to the full ring")
        finally:
            os.kill(pid, signal.SIGCONT)
        done = _done(load)
        assert done["requests"] == done["ok"] and not done["errors"], done
        wait_for(lambda: _copies_read(n) == n.status()["switch"]["off_observed"], timeout=10,
                 what="every copy in the ring read")
        fl = n.flows()["flows"]
        sw = n.status()["switch"]
    finally:
        load.kill()
        server.kill()
    gaps = sum(f["nfs"]["http_parser"]["observe_gaps"] for f in fl)
    assert sw["off_observe_lost"] > 0 and gaps == sw["off_observe_lost"], (gaps, sw)
    assert sum(f["observed_copies"] for f in fl) == sw["off_observed"]
    print(f"\nMEASURED a stall under {done['ok']} requests: {sw['off_observed']} copies read, "
          f"{sw['off_observe_lost']} lost (gaps in the parsers' states), no request failed")


def test_observed_flows_migrate_with_every_copy_parsed(node_factory):
    """Observed HTTP connections migrated back and forth under load: each
    migration takes the flow back from the switch, its copies still in the
    ring are parsed before its next frames inline, and the state moves with
    them; the parsers end up with every request and response, in sync."""
    n = node_factory(2, OBSERVED, offload="on")
    server, load = _load(n, connections=6, duration=5, size=100, rate=1200, hold=30)
    try:
        wait_for(lambda: _observing(n) == 6, timeout=5, what="the connections observed")
        for src, dst in ((0, 1), (1, 0), (0, 1)):
            moved = nodectl.migrate(n.name, src, dst, timeout=30)
            assert moved["failed"] == 0, moved
        done = _done(load)
        assert done["requests"] == done["ok"] and not done["errors"], done
        fl = n.flows()["flows"]
    finally:
        load.kill()
        server.kill()
    hp = [f["nfs"]["http_parser"] for f in fl]
    assert len(fl) == 6
    assert sorted(h["n_requests"] for h in hp) == sorted(done["per_connection"]), (hp, done)
    assert all(h["n_responses"] == h["n_requests"] and h["n_errors"] == 0 and h["observe_gaps"] == 0
               for h in hp), hp
    st = n.status()
    assert all(r["migration"]["after_marker"] == 0 for r in st["runtimes"])
    assert sum(r["offload"]["revoked"] for r in st["runtimes"]) >= 6


def test_observed_flows_keep_flowing_while_their_runtime_is_killed(node_factory):
    """kill -9 of the runtime that observes 4 HTTP connections under load:
    the switch forwards them all along (no request fails), the new process
    adopts the observed slots, and the copies its predecessor never read are
    gaps in the parsers' states, never a wrong count."""
    n = node_factory(2, OBSERVED, offload="on")
    server, load = _load(n, connections=4, duration=4, size=100, rate=800, hold=30)
    try:
        wait_for(lambda: _observing(n) == 4, timeout=5, what="the connections observed")
        # snapshots go every K (10) copies: several since each flow was handed over
        wait_for(lambda: all(f.get("observed_copies", 0) >= 30 for f in n.flows()["flows"]), timeout=5,
                 what="snapshots of the observed flows")
        rts = n.status()["runtimes"]
        victim = max(rts, key=lambda r: (r["offload"] or {}).get("observing", 0))
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: (r := n.status()["runtimes"][victim["id"]]).get("pid") not in (None, victim["pid"])
                 and r["state"] == "running", timeout=30, what="the runtime back")
        assert load.p.poll() is None, "the load ended before the runtime was back: the test proves nothing"
        done = _done(load)
        assert done["requests"] == done["ok"] and not done["errors"], done
        fl = n.flows()["flows"]
        back = n.status()["runtimes"][victim["id"]]["offload"]
    finally:
        load.kill()
        server.kill()
    assert len(fl) == 4 and all("observe" in f["offload"] for f in fl), fl
    assert back["adopted"] == victim["offload"]["observing"] and back["observing"] == back["adopted"]
    hp = {f["key"]: f["nfs"]["http_parser"] for f in fl}
    recovered = [f for f in fl if f["runtime"] == victim["id"]]
    assert all(hp[f["key"]]["observe_gaps"] > 0 for f in recovered), hp  # copies nobody read
    assert all(h["n_requests"] <= done["requests"] for h in hp.values())
