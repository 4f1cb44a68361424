"""Service chains end to end: real HTTP over real TCP through
flow_monitor -> firewall -> http_parser, UDP flows counted exactly, firewall
drops, two chains side by side, hostile payloads."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import PY, Proc, run_tool

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


def _mem_kb(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Documentation/filesystems/proc.rst)


# The hostile test states the parser's limits (tighter than the defaults, so
# the bound below is small next to the hostile bytes) and derives its memory
# bound from them.
HTTP_LIMITS = {"max_header_bytes": 4096, "max_records": 8, "max_errors": 4, "max_field_bytes": 128}
HOSTILE_POLICY = {**POLICY, "nf_config": {**POLICY["nf_config"], "http_parser": HTTP_LIMITS}}
# Per flow besides the parser: the actor, flow_monitor and firewall state.
ACTOR_BYTES = 16 << 10
# Per runtime: allocator slack (pymalloc arenas and the C heap are touched page
# by page) and the parser's transient copies of one segment and one header
# block.  Measured growth on this workload: tens of KiB.
MARGIN_BYTES = 512 << 10


def _parser_state_bound(lim: dict) -> int:
    """Bytes of http_parser state one flow can hold at most under `lim`: the
    two directions' incomplete header blocks (max_header_bytes each), the
    last max_records requests, responses and special requests (at most three
    fields of max_field_bytes each, plus 1 KiB of Python objects), and
    max_errors errors (512 B each)."""
    return (2 * lim["max_header_bytes"]
            + 3 * lim["max_records"] * (3 * lim["max_field_bytes"] + 1024)
            + lim["max_errors"] * 512)


# Reads everything a connection sends (unlike http-serve, which gives up on a
# line longer than 64 KiB and resets the connection, so most of a big hostile
# payload never crosses the node), answers 400 and closes.
_SINK = r"""
import json, socket, sys
host, sizes = sys.argv[1], json.loads(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, 8080))
srv.listen(4)
print("ready", flush=True)
got = []
for want in sizes:
    c, _ = srv.accept()
    n = 0
    while n < want and (b := c.recv(1 << 16)):
        n += len(b)
    c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    c.shutdown(socket.SHUT_WR)
    while b := c.recv(1 << 16):
        n += len(b)
    c.close()
    got.append(n)
print(json.dumps(got), flush=True)
"""


def _new_tcp_flow(n, before: set) -> dict:
    """The one TCP flow that appeared since `before`, as its runtime sees it.
    Asked right after its connection ended: a closed flow's actor lingers
    (lifetime.CLOSE_LINGER) before it is released."""
    new = [f for f in n.flows()["flows"] if f["flow"].startswith("tcp") and f["key"] not in before]
    assert len(new) == 1 and "nfs" in new[0], new
    before.add(new[0]["key"])
    return new[0]


def test_hostile_payloads_neither_crash_nor_bloat_a_runtime(node_factory):
    n = node_factory(2, HOSTILE_POLICY)
    pids = [r["pid"] for r in n.status()["runtimes"]]
    for p in pids:
        _reset_peak(p)
    rss0 = {p: _mem_kb(p)["VmRSS"] for p in pids}
    runs = [("huge-header", 1_000_000, i) for i in range(4)] + [("junk", 500_000, i) for i in range(4)]
    sink = subprocess.Popen(["ip", "netns", "exec", n.dst_ns, PY, "-c", _SINK, n.dst_ip,
                             json.dumps([size for _, size, _ in runs])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set = set()
    hostile: dict[str, list] = {"huge-header": [], "junk": []}
    try:
        assert sink.stdout.readline().strip() == "ready", sink.stderr.read()
        sent = 0
        for mode, size, seed in runs:
            r = run_tool(n.src_ns, "tcp-hostile", "--host", n.dst_ip, "--mode", mode, "--size", str(size),
                         "--seed", str(seed))
            assert r["status_line"] == "HTTP/1.1 400 Bad Request", r
            sent += r["sent"]
            hostile[mode].append(_new_tcp_flow(n, seen))
        out, err = sink.communicate(timeout=30)
        assert sum(json.loads(out.splitlines()[-1])) == sent >= 6_000_000  # every hostile byte crossed the node
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    server = Proc(n.dst_ns, "http-serve", "--bind", n.dst_ip, "--timeout", "60").wait_ready()
    try:
        bw = run_tool(n.src_ns, "tcp-hostile", "--host", n.dst_ip, "--mode", "bytewise")
        bytewise = _new_tcp_flow(n, seen)
    finally:
        server.kill()
    assert bw["status_line"].startswith("HTTP/1.")
    st = n.status()
    assert all(r["restarts"] == 0 and r["live"] for r in st["runtimes"])
    assert [r["pid"] for r in st["runtimes"]] == pids

    # Memory: the runtimes' peak (VmHWM, so a buffer that grew and was freed
    # counts too) grew by no more than the state the parser's limits allow
    # for every flow at once, plus the stated overheads.
    flows = len(seen)
    bound = flows * (_parser_state_bound(HTTP_LIMITS) + ACTOR_BYTES) + len(pids) * MARGIN_BYTES
    growth = {p: (_mem_kb(p)["VmHWM"] - rss0[p]) << 10 for p in pids}
    assert sum(growth.values()) <= bound, (growth, bound)

    # The parser's own account: it gave up on each hostile stream at its
    # limit, keeping nothing of it (a desynchronised direction holds no buffer).
    for f in hostile["huge-header"]:
        hp = f["nfs"]["http_parser"]
        assert hp["errors"] == ["orig: header too large"] and hp["n_requests"] == 0, hp
        assert hp["in_sync"] == {"orig": False, "reply": True} and hp["n_responses"] == 1, hp
    for f in hostile["junk"]:
        hp = f["nfs"]["http_parser"]
        assert hp["errors"] == ["orig: not http"] and hp["n_requests"] == 0, hp
        assert hp["in_sync"]["orig"] is False, hp
    hp = bytewise["nfs"]["http_parser"]
    assert hp["last_requests"] == ["GET /bytewise/path"] and hp["n_errors"] == 0, hp
    assert hp["in_sync"] == {"orig": True, "reply": True}, hp
    for f in hostile["huge-header"] + hostile["junk"] + [bytewise]:
        assert f["chain"] == FULL and "nf_errors" not in f, f
