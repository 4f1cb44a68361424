"""Service chains end to end: real HTTP over real TCP through
flow_monitor -> firewall -> http_parser, UDP flows counted exactly, firewall
drops, two chains side by side, hostile payloads."""
from __future__ import annotations

import json

import pytest

from tests.helpers import Proc, run_tool

pytestmark = [pytest.mark.root, pytest.mark.netns]

FULL = ["flow_monitor", "firewall", "http_parser"]
POLICY = {
    "default_chain": [],
    "rules": [
        {"proto": "tcp", "dport": "8080-8081", "chain": FULL},
        {"proto": "udp", "chain": ["flow_monitor", "firewall"]},
    ],
    "nf_config": {"firewall": {"rules": [
        {"proto": "udp", "dport": "9001", "action": "drop"},
        {"proto": "tcp", "dport": "8081", "action": "drop"},
    ]}},
}


@pytest.fixture
def chain_node(node_factory):
    return node_factory(2, POLICY)


def test_http_through_the_full_chain(chain_node):
    n = chain_node
    server = Proc(n.dst_ns, "http-serve", "--bind", n.dst_ip, "--timeout", "60").wait_ready()
    try:
        got = run_tool(n.src_ns, "http-get", "--host", n.dst_ip, "--size", "200000", "--count", "5", "--seed", "40")
    finally:
        server.kill()
    assert got["ok"] == 5
    tcp = [f for f in n.flows()["flows"] if f["flow"].startswith("tcp")]
    assert len(tcp) == 5
    paths = set()
    for f in tcp:
        assert f["chain"] == FULL
        fm = f["nfs"]["flow_monitor"]
        assert fm["packets"] == f["packets"] and fm["packets"]["orig"] > 0 and fm["packets"]["reply"] > 0
        assert f["nfs"]["firewall"]["verdict"] == "allow"
        hp = f["nfs"]["http_parser"]
        assert hp["n_requests"] == 1 and hp["n_responses"] == 1, hp
        paths.add(json.dumps(hp, sort_keys=True))
        text = json.dumps(hp)
        assert "GET" in text and "/200000/" in text and "200" in text
        assert f["dropped"] == 0
    assert len(paths) == 5  # five different requests recorded


def test_udp_counts_equal_packets_sent_each_way_and_firewall_drops(chain_node):
    n = chain_node
    ok_sink = Proc(n.dst_ns, "udp-sink", "--port", "9000", "--echo", "--expect", "200", "--timeout", "20").wait_ready()
    blocked = Proc(n.dst_ns, "udp-sink", "--port", "9001", "--echo", "--idle", "0", "--timeout", "4").wait_ready()
    try:
        sent = run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--port", "9000", "--flows", "10",
                        "--packets", "20", "--echo", "--base-port", "41000")
        sent_blocked = run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--port", "9001", "--flows", "4",
                                "--packets", "25", "--echo", "--echo-wait", "1", "--base-port", "42000")
        got = ok_sink.result()
        got_blocked = blocked.result()
    finally:
        ok_sink.kill()
        blocked.kill()
    assert got["received"] == 200 and sent["echoed"] == 200
    assert all(seqs == list(range(20)) for seqs in got["flows"].values())
    assert got_blocked["received"] == 0 and sent_blocked["echoed"] == 0
    flows = n.flows()["flows"]
    allowed = [f for f in flows if f["flow"].endswith(":9000")]
    dropped = [f for f in flows if f["flow"].endswith(":9001")]
    assert len(allowed) == 10 and len(dropped) == 4
    for f in allowed:
        assert f["chain"] == ["flow_monitor", "firewall"]
        assert f["nfs"]["flow_monitor"]["packets"] == {"orig": 20, "reply": 20}
    for f in dropped:
        assert f["nfs"]["firewall"]["verdict"] == "drop"
        assert f["dropped"] == 25
        assert f["nfs"]["flow_monitor"]["packets"] == {"orig": 25, "reply": 0}


def test_blocked_tcp_connection_never_reaches_the_server(chain_node):
    n = chain_node
    server = Proc(n.dst_ns, "http-serve", "--bind", n.dst_ip, "--port", "8081", "--timeout", "30").wait_ready()
    try:
        got = run_tool(n.src_ns, "http-get", "--host", n.dst_ip, "--port", "8081", "--count", "1",
                       "--timeout", "2")
    finally:
        server.kill()
    assert got["ok"] == 0
    (f,) = [f for f in n.flows()["flows"] if f["flow"].endswith(":8081")]
    assert f["nfs"]["firewall"]["verdict"] == "drop"
    assert f["packets"]["reply"] == 0 and f["dropped"] == f["packets"]["orig"] >= 1


def test_two_rules_two_chains_side_by_side(chain_node):
    n = chain_node
    r = n.cli("rules", "list", "--name", n.name, "--json")
    assert r.returncode == 0, r.stderr
    rules = json.loads(r.stdout)["rules"]
    assert [x["chain"] for x in rules] == [FULL, ["flow_monitor", "firewall"]]
    # a third rule added at run time applies to new flows only
    r = n.cli("rules", "add", "--name", n.name, "--proto", "udp", "--dport", "7000", "--chain", "flow_monitor")
    assert r.returncode == 0 and "pushed to runtimes 0, 1" in r.stdout, r.stdout + r.stderr
    sink = Proc(n.dst_ns, "udp-sink", "--port", "7000", "--expect", "10", "--timeout", "10").wait_ready()
    run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--port", "7000", "--flows", "2", "--packets", "5")
    assert sink.result()["received"] == 10
    chains = {tuple(f["chain"]) for f in n.flows()["flows"] if f["flow"].endswith(":7000")}
    assert chains == {("flow_monitor",)}
    r = n.cli("rules", "add", "--name", n.name, "--dport", "70000", "--chain", "flow_monitor")
    assert r.returncode == 1 and "dport" in r.stderr


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_hostile_payloads_neither_crash_nor_bloat_a_runtime(chain_node):
    n = chain_node
    pids = [r["pid"] for r in n.status()["runtimes"]]
    rss0 = sum(_rss_kb(p) for p in pids)
    server = Proc(n.dst_ns, "http-serve", "--bind", n.dst_ip, "--timeout", "60").wait_ready()
    try:
        for i in range(4):
            run_tool(n.src_ns, "tcp-hostile", "--host", n.dst_ip, "--mode", "huge-header", "--size", "300000",
                     "--seed", str(i))
            run_tool(n.src_ns, "tcp-hostile", "--host", n.dst_ip, "--mode", "junk", "--size", "500000",
                     "--seed", str(i))
        bw = run_tool(n.src_ns, "tcp-hostile", "--host", n.dst_ip, "--mode", "bytewise")
    finally:
        server.kill()
    assert bw["status_line"].startswith("HTTP/1.")
    st = n.status()
    assert all(r["restarts"] == 0 and r["live"] for r in st["runtimes"])
    assert [r["pid"] for r in st["runtimes"]] == pids
    rss1 = sum(_rss_kb(p) for p in pids)
    assert rss1 - rss0 < 30_000, (rss0, rss1)  # 3.2 MB of hostile bytes, bounded state
    flows = [f for f in n.flows()["flows"] if f["flow"].startswith("tcp")]
    texts = [json.dumps(f["nfs"]["http_parser"]) for f in flows]
    assert any("/bytewise/path" in t for t in texts)
    assert sum("too large" in t for t in texts) >= 4
    assert all(f.get("nf_errors", 0) == 0 for f in flows)
