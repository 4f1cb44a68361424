"""Restarts and upgrades under traffic keep every flow and its NF state: a
new supervisor adopts the running runtimes (same processes), and a rolling
restart replaces every process, the runtimes' flows migrated away first.
Every datagram exactly once and in order per flow, both ways; flow_monitor's
counts exact."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from nfactor_xdp.control import node_client as nodectl
from nfactor_xdp.control.processes import pid_alive
from tests.helpers import EchoTraffic as Traffic
from tests.helpers import wait_for

pytestmark = [pytest.mark.root, pytest.mark.netns]

POLICY = {"rules": [{"proto": "udp", "chain": ["flow_monitor", "firewall"]}], "default_chain": []}


def _pids(n) -> dict:
    st = n.status()
    return {"supervisor": st["supervisor_pid"], "controller": st["controller"].get("pid"),
            "runtimes": {r["id"]: r.get("pid") for r in st["runtimes"]}}


def _agent_pid(name: str) -> int:
    from nfactor_xdp.formats import config as nodeconf
    return nodeconf.read_state(name)["switch_agent"]["pid"]


def _nothing_dropped_on_the_way(n) -> None:
    """No frame behind a marker, none at a port without its socket (a
    runtime replaced while frames still came), none lost by a redirect."""
    st = n.status()
    for r in st["runtimes"]:
        assert r["live"] and r["migration"]["after_marker"] == 0, r["id"]
        assert r["switch"]["no_socket"] == 0, r["id"]
    assert st["switch"]["redirect_err"] == 0 and st["switch"]["socket_full"] == 0


def test_a_new_supervisor_adopts_the_runtimes_a_killed_one_left_with_their_nf_state(node_factory):
    n = node_factory(2, POLICY)
    t = Traffic(n, flows=20, packets=400, pps=1000, base=41000)  # 8 s
    try:
        before, agent = _pids(n), _agent_pid(n.name)
        counted = {f["key"]: f["nfs"]["flow_monitor"]["packets"]["orig"] for f in n.flows()["flows"]}
        os.kill(before["supervisor"], signal.SIGKILL)
        wait_for(lambda: not pid_alive(before["supervisor"]), timeout=10, what="the supervisor to die")
        state = nodectl.start(n.cfg)  # `nfactorctl up` again: takes the runtimes over
        assert t.running(), "the traffic ended before the new supervisor was up: the test proves nothing"
        after = _pids(n)
        assert state["adoption"]["from"] == "dead supervisor" and state["adoption"]["adopted"] == [0, 1]
        assert after["runtimes"] == before["runtimes"]  # the very same processes
        assert all(pid_alive(p) for p in before["runtimes"].values())
        assert after["supervisor"] != before["supervisor"] and after["controller"] != before["controller"]
        assert _agent_pid(n.name) != agent
        # the NF state went on counting in the same actors
        for f in n.flows()["flows"]:
            assert f["nfs"]["flow_monitor"]["packets"]["orig"] >= counted[f["key"]], f["flow"]
        sent, got = t.check()
    finally:
        t.kill()
    st = n.status()
    assert st["switch"]["flow_new"] == t.flows  # no flow placed anew
    assert all(r["restarts"] == 0 and r["adopted"] for r in st["runtimes"])
    _nothing_dropped_on_the_way(n)
    print(f"\nMEASURED supervisor {before['supervisor']} killed, {after['supervisor']} adopted runtimes "
          f"{before['runtimes']} (same pids after); {sent['sent']} datagrams sent, {got['received']} received, "
          f"{sum(len(s) for s in sent['echoes'].values())} echoes, elapsed {sent['elapsed']}")


def test_restart_all_replaces_every_process_under_traffic_losing_nothing(node_factory):
    n = node_factory(2, POLICY)
    t = Traffic(n, flows=20, packets=600, pps=1000, base=42000)  # 12 s
    try:
        before, agent = _pids(n), _agent_pid(n.name)
        took = time.monotonic()
        r = n.cli("restart", "--name", n.name, "--all", "--json")
        took = time.monotonic() - took
        assert r.returncode == 0, r.stderr
        assert t.running(), "the traffic ended before the restart did: the test proves nothing"
        report = json.loads(r.stdout)
        sent, got = t.check()
    finally:
        t.kill()
    after = _pids(n)
    sup = report["supervisor"]
    # the supervisor re-executed itself (same pid, the installed code) and took the node over
    assert sup["pid"] == before["supervisor"] == after["supervisor"]
    assert sup["adoption"]["from"] == "exec" and sup["adoption"]["adopted"] == [0, 1]
    assert after["controller"] not in (None, before["controller"]) and _agent_pid(n.name) != agent
    # every runtime replaced by a new process, one at a time, on the same port
    assert [s["id"] for s in report["runtimes"]] == [0, 1]
    assert set(after["runtimes"]) == {0, 1}
    for s in report["runtimes"]:
        assert s["old_pid"] == before["runtimes"][s["id"]] and s["new_pid"] == after["runtimes"][s["id"]]
        assert s["new_pid"] != s["old_pid"] and not pid_alive(s["old_pid"])
    st = n.status()
    assert st["switch"]["flow_new"] == t.flows
    _nothing_dropped_on_the_way(n)
    print(f"\nMEASURED restart --all under traffic in {took:.1f} s: supervisor {before['supervisor']} re-executed, "
          f"controller {before['controller']} -> {after['controller']}, runtimes {before['runtimes']} -> {after['runtimes']} "
          f"({[s['seconds'] for s in report['runtimes']]} s each); {sent['sent']} datagrams sent, "
          f"{got['received']} received, {sum(len(s) for s in sent['echoes'].values())} echoes")


def test_a_runtime_alone_is_restarted_through_a_temporary_one(node_factory):
    n = node_factory(1, POLICY)
    t = Traffic(n, flows=10, packets=800, pps=800, base=43000)  # 10 s
    try:
        old = _pids(n)["runtimes"][0]
        r = n.cli("restart", "--name", n.name, "--runtime", "0", "--json")
        assert r.returncode == 0, r.stderr
        assert t.running(), "the traffic ended before the restart did: the test proves nothing"
        (step,) = json.loads(r.stdout)["runtimes"]
        sent, got = t.check()
    finally:
        t.kill()
    assert step["old_pid"] == old and step["new_pid"] != old and step["through"] == 1
    assert [x["id"] for x in n.status()["runtimes"]] == [0]  # the temporary one is gone
    assert all(f["runtime"] == 0 for f in n.flows()["flows"])  # its flows came back
    _nothing_dropped_on_the_way(n)
    print(f"\nMEASURED a lone runtime restarted through runtime {step['through']}: pid {old} -> {step['new_pid']} "
          f"in {step['seconds']} s; {sent['sent']} datagrams sent, {got['received']} received")
