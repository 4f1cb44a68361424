"""The switch agent on a real veth pair with pinned maps: the grace period,
a move rewriting the flow entry and injecting the marker into the runtime
port's receive ring, batching, bad requests, counters, signals."""
from __future__ import annotations

import itertools
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid

import pytest

from nfactor_xdp.kern import layouts as L
from nfactor_xdp.kern import netns
from nfactor_xdp.formats import config as nodeconf
from nfactor_xdp.kern.bpfsys import BPF_NOEXIST
from nfactor_xdp.formats.messages import ClusterKey, Endpoint, MessageTimeout, MsgType
from nfactor_xdp.dataplane.packet import FLOW, classify
from nfactor_xdp.formats.flowkey import KEY_SIZE
from nfactor_xdp.control.switch_agent import MARKER_TAG, MarkerInjector, SwitchAgent
from nfactor_xdp.formats import marker
from nfactor_xdp.formats.config import NodeConfig
from nfactor_xdp.formats.flowkey import HI_TO_LO, LO_TO_HI
from nfactor_xdp.kern import grace
from tests.helpers import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETH_P_ALL = 0x0003
_sports = itertools.count(20000)  # a new flow per use


def netns_test(f):
    return pytest.mark.root(pytest.mark.netns(f))


# --- frames -------------------------------------------------------------------

def _frame(sport: int, payload: bytes) -> bytes:
    from scapy.all import IP, UDP, Ether, raw
    return raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
               / IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=sport, dport=9000) / payload)


def _marker(sport: int, nonce: int) -> bytes:
    return _frame(sport, marker.payload(nonce))


# --- environment -----------------------------------------------------------------

class Env:
    def __init__(self, ns: str, node: str, maps, client: Endpoint, agent: subprocess.Popen, log: str):
        self.ns, self.node, self.maps, self.client, self.agent, self.log = ns, node, maps, client, agent, log
        self.addr = nodeconf.control_socket(node, "switch")

    def call(self, msg_type, body: dict, timeout: float = 5.0) -> dict:
        # no retries: a re-sent MOVE would inject its marker twice and skew the counters
        try:
            return self.client.call(self.addr, msg_type, body, timeout=timeout, retries=0).body
        except MessageTimeout:
            raise AssertionError(f"agent did not answer; its log: {open(self.log).read()}") from None

    def move(self, key: bytes, to: int, src: int = 0, marker: bytes | None = None, **extra) -> dict:
        body = {"key": key.hex(), "to": to, "from": src, "marker": marker.hex() if marker else None}
        body.update(extra)
        return self.call(MsgType.MIGRATE_MOVE, body)

    def status(self) -> dict:
        return self.call(MsgType.STATUS, {})

    def add_flow(self, runtime: int = 0) -> tuple[bytes, int]:
        """A flow placed on `runtime`; returns (key, source port)."""
        sport = next(_sports)
        kind, key, direction, _ = classify(_frame(sport, b"data"))
        assert kind == FLOW
        self.maps["flows"].set(L.FlowKeyStruct.from_buffer_copy(key),
                               L.Flow(runtime=runtime, orig_dir=direction, created_ns=123456789), BPF_NOEXIST)
        return key, sport

    def entry(self, key: bytes):
        return self.maps["flows"].get(L.FlowKeyStruct.from_buffer_copy(key))

    def xdp_packets(self, ifname: str = "rt0") -> int:
        """Frames the receive queue's NAPI handed to the XDP program of `ifname`."""
        out = netns.run(self.ns, ["ethtool", "-S", ifname]).stdout
        for line in out.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "rx_queue_0_xdp_packets":
                return int(value)
        raise AssertionError(f"ethtool -S {ifname} has no rx_queue_0_xdp_packets:\n{out}")


def _make_port(ns: str) -> None:
    """sw-rt0/rt0 like the node makes them (one queue, no IPv6), with XDP on rt0:
    its NAPI is the receive ring the switch's redirects go to."""
    from pyroute2 import IPRoute

    from nfactor_xdp.kern.loader import attach_pass
    with netns.entered(ns), IPRoute() as ipr:
        ipr.link("add", ifname="sw-rt0", kind="veth", num_tx_queues=1, num_rx_queues=1,
                 peer={"ifname": "rt0", "num_tx_queues": 1, "num_rx_queues": 1})
        for name in ("sw-rt0", "rt0"):
            with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
                f.write("1")
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")  # control messages
    attach_pass("rt0", ns)


def _start_agent(ns: str, node: str, log: str) -> subprocess.Popen:
    # Forked from inside the namespace, like the supervisor does: `ip netns exec`
    # would mount the namespace's own /sys, without the bpffs holding the pins.
    with open(log, "ab") as out, netns.entered(ns):
        cfg = NodeConfig(name=node)
        return subprocess.Popen([sys.executable, "-m", "nfactor_xdp.control.switch_agent",
                                 "--config-json", cfg.to_json()],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from nfactor_xdp.kern.loader import Programs, remove_pins
    from nfactor_xdp.kern.maps import NodeMaps
    tag = uuid.uuid4().hex[:6]
    ns, node = f"nfxsa-{tag}", f"s{tag}"
    log = str(tmp_path_factory.mktemp("switchagent") / "agent.log")
    progs = maps = client = agent = e = None
    netns.create(ns)
    try:
        _make_port(ns)
        progs = Programs(node, flow_table_size=4096, tracer=False)
        progs.load()
        maps = NodeMaps(node)
        for rt_id in range(L.C["NFX_MAX_RUNTIMES"]):  # the agent only moves flows to running runtimes
            maps.set_runtime(rt_id, L.C["NFX_RT_RUNNING"], 0)
        agent = _start_agent(ns, node, log)
        client = Endpoint(nodeconf.control_socket(node, "test"), ClusterKey.load_or_create(nodeconf.cluster_key_path()),
                          "test")
        e = Env(ns, node, maps, client, agent, log)

        def pong():
            assert agent.poll() is None, f"agent exited: {open(log).read()}"
            try:
                return client.call(e.addr, MsgType.PING, {}, timeout=0.2, retries=0).body.get("ok")
            except MessageTimeout:
                return False
        wait_for(pong, timeout=15, what="the switch agent to answer PING")
        yield e
    finally:
        for proc in {agent, e and e.agent} - {None}:  # a test may have replaced the agent
            _stop(proc)
        if client is not None:
            client.close()
        if maps is not None:
            maps.close()
        if progs is not None:
            progs.close()
        remove_pins(node)
        netns.remove(ns)
        shutil.rmtree(nodeconf.run_dir(node), ignore_errors=True)
    assert not os.path.exists(f"/sys/fs/bpf/nfactor/{node}"), "pins left behind"


class Capture:
    """Every frame the stack of `ifname` receives (after its XDP_PASS)."""

    def __init__(self, ns: str, ifname: str = "rt0"):
        with netns.entered(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.sock.setblocking(False)

    def expect(self, frames: list[bytes], timeout: float = 5.0) -> list[bytes]:
        """Read until every frame of `frames` was seen (or the deadline); returns what was read.
        Markers come with the agent's ingress tag in front, like every frame for a runtime."""
        want = {MARKER_TAG + f for f in frames}
        seen: list[bytes] = []
        deadline = time.monotonic() + timeout
        while want - set(seen) and time.monotonic() < deadline:
            select.select([self.sock], [], [], 0.05)
            try:
                while True:
                    seen.append(self.sock.recv(65535))
            except BlockingIOError:
                pass
        missing = want - set(seen)
        assert not missing, f"{len(missing)} of {len(want)} frames never arrived"
        return seen

    def close(self):
        self.sock.close()


# --- no root needed ----------------------------------------------------------------

def test_a_move_to_a_runtime_that_is_not_running_is_refused(env):
    env.maps.set_runtime(5, L.C["NFX_RT_FAILED"], 0)
    try:
        body = {"key": bytes(KEY_SIZE).hex(), "to": 5, "from": 0, "marker": None}
        reply = env.client.call(env.addr, MsgType.MIGRATE_MOVE, body, timeout=1.0)
        assert reply.body["ok"] is False and "not running" in reply.body["error"]
    finally:
        env.maps.set_runtime(5, L.C["NFX_RT_RUNNING"], 0)


@pytest.mark.parametrize("proto", ["udp", "tcp"])
@pytest.mark.parametrize("orig_dir", [LO_TO_HI, HI_TO_LO])
def test_the_runtime_recognises_its_marker_and_nothing_else(proto, orig_dir):
    """marker.frame builds what the source asks the switch agent to inject;
    marker.is_marker is the check the source runtime runs on its frames."""
    from scapy.all import IP, TCP, UDP, Ether, raw
    l4 = TCP(sport=5000, dport=80, flags="A") if proto == "tcp" else UDP(sport=5000, dport=80)
    real = raw(Ether() / IP(src="10.1.0.1", dst="10.2.0.1") / l4 / b"payload of real traffic!")
    kind, key, _, _ = classify(real)
    p = marker.payload(42)
    assert len(p) == marker.PAYLOAD_SIZE and p[:8] == marker.MAGIC.to_bytes(8, "big")
    frame = marker.frame(key, orig_dir, p)
    mkind, mkey, mdir, ml4 = classify(frame)
    assert (mkind, mkey, mdir) == (FLOW, key, orig_dir)  # filed under the flow, in its first frame's direction
    assert marker.is_marker(frame, ml4, p) and marker.is_marker(memoryview(frame), ml4, p)
    assert not marker.is_marker(frame, ml4, marker.payload(43))       # another migration's marker
    assert not marker.is_marker(frame, -1, p)                         # no L4 header (a fragment)
    assert not marker.is_marker(real, classify(real)[3], p)           # real traffic of the flow
    assert not marker.is_marker(frame + b"\0", ml4, p)                # the payload must end the frame
    assert not marker.is_marker(frame[:ml4 + 8], ml4, p)              # headers only


def test_grace_period_is_a_real_wait_and_takes_reasonable_time():
    grace.check()
    times = [grace.wait() for _ in range(20)]
    ms = sorted(t * 1000 for t in times)
    print(f"\nMEASURED grace period (membarrier GLOBAL, {os.cpu_count()} CPUs): min {ms[0]:.2f} ms, "
          f"median {statistics.median(ms):.2f} ms, max {ms[-1]:.2f} ms")
    assert ms[-1] < 1000


# --- on a veth pair ------------------------------------------------------------------

@netns_test
def test_move_rewrites_the_entry_and_the_marker_arrives_through_the_ring(env):
    key, sport = env.add_flow(runtime=0)
    before = env.entry(key)
    marker = _marker(sport, 7)
    cap = Capture(env.ns)
    napi = env.xdp_packets()
    try:
        r = env.move(key, to=3, src=0, marker=marker)
        assert r["ok"] and r["batch"] == 1 and r["grace_us"] >= 0, r
        after = env.entry(key)
        assert after.runtime == 3
        assert (after.orig_dir, after.created_ns) == (before.orig_dir, before.created_ns)
        seen = cap.expect([marker])
        assert MARKER_TAG + marker in seen
        # it went through rt0's NAPI ring (the one redirected frames take), not the backlog
        assert env.xdp_packets() > napi
        # a repeat is idempotent and re-sends the marker
        again = _marker(sport, 8)
        assert env.move(key, to=3, src=0, marker=again)["ok"]
        assert env.entry(key).runtime == 3
        cap.expect([again])
        # no marker (a rollback): still a grace period, nothing injected
        r = env.move(key, to=0, src=3)
        assert r["ok"] and env.entry(key).runtime == 0
    finally:
        cap.close()
    print(f"\nMEASURED grace period in the agent: {r['grace_us']} us")


@netns_test
def test_fifty_moves_at_once_are_batched(env):
    flows = [env.add_flow(runtime=0) for _ in range(50)]
    markers = [_marker(sport, i) for i, (_, sport) in enumerate(flows)]
    st0 = env.status()["stats"]
    cap = Capture(env.ns)
    replies: dict[int, dict] = {}
    try:
        for (key, _), marker in zip(flows, markers):
            body = {"key": key.hex(), "to": 1, "from": 0, "marker": marker.hex()}
            env.client.request(env.addr, MsgType.MIGRATE_MOVE, body, timeout=5.0, retries=0,
                               on_reply=lambda m: replies.__setitem__(m.rid, m.body))

        def all_replied():
            select.select([env.client.sock], [], [], 0.05)
            env.client.receive()
            return len(replies) == 50
        wait_for(all_replied, timeout=10, interval=0, what="50 replies")
        cap.expect(markers)
    finally:
        cap.close()
    assert all(r["ok"] for r in replies.values()), [r for r in replies.values() if not r["ok"]]
    assert all(env.entry(key).runtime == 1 for key, _ in flows)
    st = env.status()["stats"]
    batches = st["batches"] - st0["batches"]
    sizes = sorted({r["batch"] for r in replies.values()}, reverse=True)
    print(f"\nMEASURED 50 moves sent at once: {batches} batches (sizes seen {sizes})")
    assert 1 <= batches < 50
    assert st["moves"] - st0["moves"] == 50 and st["markers_sent"] - st0["markers_sent"] == 50


@netns_test
def test_waiting_moves_share_one_grace_period_in_process(env):
    """Deterministic: with 20 requests already queued, one serve_once is one batch."""
    flows = [env.add_flow(runtime=0) for _ in range(20)]
    with netns.entered(env.ns):
        agent = SwitchAgent(env.node, env.client.key, path=nodeconf.control_socket(env.node, "switch-in-process"))
    try:
        replies = []
        for key, sport in flows:
            env.client.request(agent.ep.address, MsgType.MIGRATE_MOVE,
                               {"key": key.hex(), "to": 2, "from": 0, "marker": _marker(sport, 1).hex()},
                               timeout=5.0, retries=0, on_reply=lambda m: replies.append(m.body))
        wait_for(lambda: select.select([agent.ep.sock], [], [], 0.05)[0], timeout=5, what="requests queued")
        with netns.entered(env.ns):  # marker sockets are opened in the namespace
            assert agent.serve_once() == 20
        wait_for(lambda: env.client.receive() == [] and len(replies) == 20, timeout=5, what="replies")
        assert all(r["ok"] and r["batch"] == 20 for r in replies)
        assert agent.stats["batches"] == 1 and agent.stats["membarriers"] == 1
        assert agent.stats["markers_sent"] == 20
    finally:
        agent.close()


@netns_test
def test_bad_requests_get_an_error_and_the_agent_keeps_serving(env):
    st0 = env.status()
    key, sport = env.add_flow(runtime=0)
    _, other_sport = env.add_flow(runtime=0)
    unknown = classify(_frame(next(_sports), b"x"))[1]
    cases = [
        ("no_such_flow", dict(key=unknown, to=1), "no such flow"),
        ("bad_runtime", dict(key=key, to=64), "'to'"),
        ("bad_runtime", dict(key=key, to=-1), "'to'"),
        ("bad_runtime", dict(key=key, to=True), "'to'"),
        ("bad_runtime", dict(key=key, to=1, src="0"), "'from'"),
        ("bad_marker", dict(key=key, to=1, marker=_marker(other_sport, 1)), "not a frame of this flow"),
        ("bad_marker", dict(key=key, to=1, marker=os.urandom(40)), "not a frame of this flow"),
        ("bad_marker", dict(key=key, to=1, marker=_frame(sport, b"x" * 1473)), "limit 1514"),
    ]
    for reason, kw, text in cases:
        r = env.move(**kw)
        assert not r["ok"] and text in r["error"], (reason, r)
    assert env.entry(key).runtime == 0  # none of them moved anything
    raw = [
        ("bad_marker", {"key": key.hex(), "to": 1, "from": 0, "marker": "zz"}),
        ("bad_request", {"key": "abcd", "to": 1, "from": 0, "marker": None}),
        ("bad_request", {"to": 1, "from": 0}),
        ("bad_request", {"key": 5, "to": 1, "from": 0}),
    ]
    for reason, body in raw:
        r = env.call(MsgType.MIGRATE_MOVE, body)
        assert not r["ok"], (reason, r)
    # a source runtime without a port: the flow moved, the marker could not be sent
    r = env.move(key, to=5, src=9, marker=_marker(sport, 3))
    assert not r["ok"] and r["moved"] and "sw-rt9" in r["error"], r
    assert env.entry(key).runtime == 5
    # a message the agent does not handle, and a frame that is not ours at all
    assert not env.call(MsgType.HEARTBEAT, {})["ok"]
    junk = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    junk.sendto(b"not a control frame" * 3, env.addr)
    junk.close()
    assert env.call(MsgType.PING, {})["ok"] and env.agent.poll() is None
    st = env.status()
    want = {"no_such_flow": 1, "bad_runtime": 4, "bad_marker": 4, "bad_request": 3, "unexpected_type": 1}
    for reason, n in want.items():
        assert st["rejected"].get(reason, 0) - st0["rejected"].get(reason, 0) == n, (reason, st["rejected"])
    assert st["stats"]["marker_errors"] - st0["stats"]["marker_errors"] == 1
    wait_for(lambda: env.status()["endpoint"]["rejected"].get("bad_magic", 0)
             > st0["endpoint"]["rejected"].get("bad_magic", 0), timeout=5, what="junk counted")


@netns_test
def test_status_counters_add_up(env):
    st0 = env.status()["stats"]
    flows = [env.add_flow(runtime=0) for _ in range(6)]
    grace = []
    for i, (key, sport) in enumerate(flows):
        marker = _marker(sport, i) if i % 2 == 0 else None
        r = env.move(key, to=4, src=0, marker=marker)
        assert r["ok"] and r["batch"] == 1
        grace.append(r["grace_us"])
    st = env.status()["stats"]
    d = {k: st[k] - st0[k] for k in st if k != "membarrier_us_max"}
    assert d["moves"] == 6 and d["batches"] == 6 and d["membarriers"] == 6
    assert d["markers_sent"] == 3 and d["marker_errors"] == 0 and d["internal_errors"] == 0
    assert d["membarrier_us_total"] == sum(grace)
    assert st["membarrier_us_max"] >= max(grace) and st["membarrier_us_total"] >= st["membarrier_us_max"]


@netns_test
def test_marker_socket_is_reopened_when_the_port_comes_back(env):
    key, sport = env.add_flow(runtime=0)
    assert env.move(key, to=1, src=0, marker=_marker(sport, 1))["ok"]  # the socket is cached now
    reopens = env.status()["marker_socket_reopens"]
    from pyroute2 import IPRoute
    with netns.entered(env.ns), IPRoute() as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname="sw-rt0")[0])
    _make_port(env.ns)
    cap = Capture(env.ns)
    try:
        marker = _marker(sport, 2)
        r = env.move(key, to=0, src=0, marker=marker)
        assert r["ok"], r
        cap.expect([marker])
    finally:
        cap.close()
    assert env.status()["marker_socket_reopens"] == reopens + 1


@netns_test
def test_injector_reports_a_missing_interface(env):
    inj = MarkerInjector()
    try:
        with netns.entered(env.ns), pytest.raises(OSError):
            inj.send("sw-rt63", _marker(1, 1))
        assert not inj.socks
    finally:
        inj.close()


@netns_test
def test_sigterm_stops_the_agent(env):
    """The node has one agent (one socket name): this stops it and starts its successor,
    which takes over the name the first one left."""
    t0 = time.monotonic()
    env.agent.send_signal(signal.SIGTERM)
    assert env.agent.wait(timeout=5) == 0, open(env.log).read()
    print(f"\nMEASURED SIGTERM to exit: {(time.monotonic() - t0) * 1000:.0f} ms")
    assert not os.path.exists(env.addr)  # it took its socket with it
    env.agent = _start_agent(env.ns, env.node, env.log)

    def pong():
        try:
            return env.client.call(env.addr, MsgType.PING, {}, timeout=0.2, retries=0).body["ok"]
        except MessageTimeout:
            assert env.agent.poll() is None, open(env.log).read()
            return False
    wait_for(pong, timeout=15, what="the next agent up")


# --- ordering on the real path -----------------------------------------------------

# Sends one flow's frames into h0 (-> ext0 -> switch) at a paced rate from CPU 0,
# an 8-byte sequence number at the end of each frame.
_SENDER = r"""
import os, socket, struct, sys, time
os.sched_setaffinity(0, {0})
tmpl = bytearray(bytes.fromhex(sys.argv[1]))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind(("h0", 0))
seq = 0
while True:
    for _ in range(16):
        seq += 1
        struct.pack_into("!Q", tmpl, len(tmpl) - 8, seq)
        try:
            s.send(tmpl)
        except OSError:
            pass
    time.sleep(0.0005)
"""


@pytest.fixture
def live_switch(tmp_path):
    """A node's switch (programs attached, two runtime ports) in a namespace,
    the agent running, an AF_XDP socket standing in for runtime 0."""
    from pyroute2 import IPRoute

    from nfactor_xdp.control.supervisor import Node, teardown
    from nfactor_xdp.formats.config import NodeConfig
    from nfactor_xdp.kern.xsk import XskSocket
    tag = uuid.uuid4().hex[:6]
    ns, name = f"nfxso-{tag}", f"o{tag}"
    log = str(tmp_path / "agent.log")
    node = agent = xsk = client = None
    netns.create(ns)
    try:
        with netns.entered(ns), IPRoute() as ipr:
            for ext, host in (("ext0", "h0"), ("ext1", "h1")):
                ipr.link("add", ifname=ext, kind="veth", num_tx_queues=1, num_rx_queues=1,
                         peer={"ifname": host, "num_tx_queues": 1, "num_rx_queues": 1})
            for dev in ("lo", "h0", "h1"):
                ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], state="up")
            node = Node(NodeConfig(name=name, runtimes=2))
            node.setup_switch()
            for rt in (0, 1):
                node.maps.set_runtime_state(rt, L.C["NFX_RT_RUNNING"])
            xsk = XskSocket(socket.if_nametoindex("rt0"), 0)
            node.maps["xsks"].set(0, xsk.fd)
        client = Endpoint(nodeconf.control_socket(name, "test"), ClusterKey.load_or_create(nodeconf.cluster_key_path()),
                          "test")
        agent = _start_agent(ns, name, log)
        addr = nodeconf.control_socket(name, "switch")

        def pong():
            assert agent.poll() is None, open(log).read()
            try:
                return client.call(addr, MsgType.PING, {}, timeout=0.2, retries=0).body["ok"]
            except MessageTimeout:
                return False
        wait_for(pong, timeout=15, what="the switch agent")
        yield ns, node, xsk, client, addr
    finally:
        if agent is not None:
            _stop(agent)
        if client is not None:
            client.close()
        if xsk is not None:
            xsk.close()
        if node is not None:
            node.maps.close()
            node.progs.close()
            teardown(node.cfg)
        netns.remove(ns)
    assert not os.path.exists(f"/sys/fs/bpf/nfactor/{name}"), "pins left behind"


@netns_test
def test_no_frame_of_the_flow_reaches_the_old_runtime_after_its_marker(live_switch):
    """Migrations back and forth while the flow streams through the switch:
    runtime 0's AF_XDP socket must never see a frame of the flow after a marker."""
    ns, node, xsk, client, addr = live_switch
    from scapy.all import IP, UDP, Ether, raw
    hdr = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.2.0.1") \
        / UDP(sport=5555, dport=9000, chksum=0)  # no checksum: the sender rewrites the payload
    template = raw(hdr / (b"\0" * 8))
    kind, key, direction, _ = classify(template)
    node.maps["flows"].set(L.FlowKeyStruct.from_buffer_copy(key),
                           L.Flow(runtime=0, orig_dir=direction, created_ns=1), BPF_NOEXIST)
    seen: list[tuple[str, int]] = []  # ("data", seq), ("marker", nonce) or ("other", length), in socket order
    replies: dict[int, dict] = {}

    def to_runtime(rt: int) -> int:
        """Frames the switch has redirected to runtime rt's port, all CPUs."""
        return sum(s.to_rt_packets for s in node.maps["rt_stats"].get(rt) or [])

    def ring_drops() -> int:
        """Frames runtime 0's socket could not take (RX ring full, no FILL buffer)."""
        st = xsk.statistics()
        return st["rx_dropped"] + st["rx_ring_full"]

    def pump():
        """Read what runtime 0's socket received, and replies."""
        descs = xsk.recv_batch(256)
        for a, ln in descs:
            # every frame comes behind the switch's ingress tag (the marker too, from the agent)
            payload = bytes(xsk.frame(a, ln)[L.C["NFX_INGRESS_TAG_LEN"] + 42:])
            if len(payload) == 16 and payload[:8] == marker.MAGIC.to_bytes(8, "big"):
                seen.append(("marker", int.from_bytes(payload[8:], "big")))
            elif len(payload) == 8:
                seen.append(("data", int.from_bytes(payload[:8], "big")))
            else:
                seen.append(("other", len(payload)))
        if descs:
            xsk.recycle([a for a, _ in descs])
        client.receive()

    def until(pred, timeout=5.0, what="condition"):
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            xsk.wait(1)
            pump()

    def move(to, src, marker):
        body = {"key": key.hex(), "to": to, "from": src, "marker": marker.hex() if marker else None}
        return client.request(addr, MsgType.MIGRATE_MOVE, body, timeout=5.0, retries=0,
                              on_reply=lambda m: replies.__setitem__(m.rid, m.body))

    base = to_runtime(0)
    with netns.entered(ns):
        sender = subprocess.Popen([sys.executable, "-c", _SENDER, template.hex()])
    rounds, late, in_flight = 100, 0, []
    try:
        for k in range(rounds):
            start = len(seen)
            until(lambda: any(e[0] == "data" for e in seen[start:]), what="the flow at runtime 0")
            marker_frame = raw(hdr / marker.payload(k))
            to_1 = to_runtime(1)
            rid = move(1, 0, marker_frame)
            until(lambda: rid in replies and ("marker", k) in seen[start:], what=f"marker {k}")
            assert replies[rid]["ok"], replies[rid]
            # Read on until runtime 0's socket has given us every frame the old entry
            # sent it: the sender is pinned to CPU 0, so the switch looks its frames up
            # one after the other on that CPU, in send order; once it has sent one to
            # runtime 1, it sends none to runtime 0 any more (until the move back), and
            # to_runtime(0) is final.  Whatever of them comes after the marker is late.
            until(lambda: to_runtime(1) > to_1, what="the flow's frames going to runtime 1")
            sent_0 = to_runtime(0) - base
            until(lambda: sum(1 for e in seen if e[0] != "marker") + ring_drops() >= sent_0,
                  what=f"runtime 0's socket to give up all {sent_0} frames the switch sent it")
            # a frame lost in the socket's ring could have been a late one: none may be
            assert ring_drops() == 0, xsk.statistics()
            assert sum(1 for e in seen if e[0] != "marker") == sent_0
            at = seen.index(("marker", k), start)
            late += sum(1 for e in seen[at + 1:] if e[0] != "marker")
            in_flight.append(sum(1 for e in seen[start:at] if e[0] == "data"))
            rid = move(0, 1, None)  # back to runtime 0 for the next round
            until(lambda: rid in replies, what="the move back")
            assert replies[rid]["ok"], replies[rid]
    finally:
        sender.kill()
        sender.wait()
    stats = xsk.statistics()
    print(f"\nMEASURED {rounds} migrations with the flow streaming: {late} frames after a marker; "
          f"frames read between request and marker median {statistics.median(in_flight)}, "
          f"max {max(in_flight)}; socket rx {stats['rx_packets']}, dropped {stats['rx_dropped']}, "
          f"ring full {stats['rx_ring_full']}")
    assert late == 0
    assert stats["rx_dropped"] == stats["rx_ring_full"] == 0


@netns_test
def test_take_moves_a_dead_runtimes_flows_to_the_taker_and_nothing_else(env):
    """FLOW_TAKE (a crashed runtime's flows, taken over by a peer): only
    entries still naming the dead runtime move, an offloaded one stays (the
    switch forwards it without a runtime), a repeat is idempotent, and
    nothing moves while the dead one runs again or to a taker not running."""
    from types import SimpleNamespace

    from nfactor_xdp.kern.offloads import OffloadSlots
    dead, taker = 6, 7
    env.maps.set_runtime(dead, L.C["NFX_RT_FAILED"], 0)
    slots = OffloadSlots(env.node)
    slot = slots.range(dead)[0]
    try:
        mine = [env.add_flow(runtime=dead)[0] for _ in range(3)]
        elsewhere = env.add_flow(runtime=2)[0]
        offloaded = env.add_flow(runtime=dead)[0]
        slots.write(slot, SimpleNamespace(action="forward"), dead)
        cur = env.entry(offloaded)
        cur.offload = slot + 1
        env.maps["flows"].set(L.FlowKeyStruct.from_buffer_copy(offloaded), cur)
        revoked = env.add_flow(runtime=dead)[0]  # names a slot whose action was cleared: taken, offload unnamed
        cur = env.entry(revoked)
        cur.offload = slot + 2
        env.maps["flows"].set(L.FlowKeyStruct.from_buffer_copy(revoked), cur)
        gone = classify(_frame(next(_sports), b"x"))[1]
        keys = mine + [elsewhere, offloaded, revoked, gone]
        st0 = env.status()["stats"]["taken"]
        r = env.call(MsgType.FLOW_TAKE, {"from": dead, "to": taker, "keys": [k.hex() for k in keys]})
        assert r["ok"] and r["moved"] == [0, 1, 2, 5], r
        assert r["kept"] == {"elsewhere": [3], "offloaded": [4], "gone": [6]}, r
        for k in mine + [revoked]:
            assert env.entry(k).runtime == taker and env.entry(k).offload == 0
        assert env.entry(elsewhere).runtime == 2
        assert env.entry(offloaded).runtime == dead and env.entry(offloaded).offload == slot + 1
        assert env.status()["stats"]["taken"] - st0 == 4
        again = env.call(MsgType.FLOW_TAKE, {"from": dead, "to": taker, "keys": [k.hex() for k in mine]})
        assert again["ok"] and again["moved"] == [0, 1, 2], again  # a re-sent request: the same answer
        # never from a runtime that runs (its flows are its own), never to one that does not
        live = env.add_flow(runtime=1)[0]
        r = env.call(MsgType.FLOW_TAKE, {"from": 1, "to": taker, "keys": [live.hex()]})
        assert not r["ok"] and "is running" in r["error"] and env.entry(live).runtime == 1
        env.maps.set_runtime(taker, L.C["NFX_RT_STARTING"], 0)
        r = env.call(MsgType.FLOW_TAKE, {"from": dead, "to": taker, "keys": [offloaded.hex()]})
        assert not r["ok"] and "not running" in r["error"]
        for body in ({"from": dead, "to": dead, "keys": []}, {"from": dead, "to": taker, "keys": ["zz"]},
                     {"from": dead, "to": taker, "keys": "ab"}, {"from": dead, "to": taker, "keys": ["ab"] * 513},
                     {"from": dead, "to": taker, "keys": ["abcd"]}):
            r = env.call(MsgType.FLOW_TAKE, body)
            assert not r["ok"] and r["error"], body
    finally:
        slots.clear_action(slot)
        slots.close()
        env.maps.set_runtime(dead, L.C["NFX_RT_RUNNING"], 0)
        env.maps.set_runtime(taker, L.C["NFX_RT_RUNNING"], 0)


@netns_test
def test_end_deletes_a_worker_runtimes_ended_flows_that_are_still_its_own(env):
    """FLOW_END (a worker host's runtime ended these flows): an entry still
    naming it goes, one placed elsewhere meanwhile stays; a bad request is
    refused and counted, nothing deleted."""
    mine = [env.add_flow(runtime=3)[0] for _ in range(3)]
    elsewhere = env.add_flow(runtime=2)[0]
    before = env.status()
    env.client.send(env.addr, MsgType.FLOW_END, {"runtime": 3, "keys": [k.hex() for k in mine + [elsewhere]]})
    wait_for(lambda: env.status()["stats"]["ended_deleted"] - before["stats"]["ended_deleted"] == 3,
             what="the ended entries deleted")
    assert all(env.entry(k) is None for k in mine)
    assert env.entry(elsewhere).runtime == 2
    assert env.status()["stats"]["ended_kept"] - before["stats"]["ended_kept"] == 1
    for body in ({"runtime": 99, "keys": [elsewhere.hex()]}, {"runtime": 2, "keys": ["zz"]},
                 {"runtime": 2, "keys": ["abcd"]}, {"runtime": 2, "keys": 5}):
        env.client.send(env.addr, MsgType.FLOW_END, body)
    wait_for(lambda: env.status()["rejected"].get("bad_end", 0) - before["rejected"].get("bad_end", 0) == 4,
             what="the bad requests counted")
    assert env.entry(elsewhere).runtime == 2
