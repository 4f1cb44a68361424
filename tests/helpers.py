"""Helpers shared by the netns tests, in the style of the kernel's selftests:
polling with deadlines, traffic tools run in a namespace, a node under test.
Fixtures live in conftest.py; these are plain functions and classes."""
from __future__ import annotations

import json
import subprocess
import sys
import time

PY = sys.executable


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll `pred` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # polling interval, not synchronisation


class Proc:
    """A traffic tool running in a namespace; it prints JSON lines."""

    def __init__(self, ns: str, *args: str):
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-m", "nfactor_xdp.tools.traffic", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 10.0):
        line = self.p.stdout.readline()
        if not line:
            raise AssertionError(f"traffic tool died: {self.p.stderr.read()}")
        assert json.loads(line).get("ready")
        return self

    def result(self, timeout: float = 60.0) -> dict:
        out, err = self.p.communicate(timeout=timeout)
        if self.p.returncode != 0:
            raise AssertionError(f"traffic tool failed ({self.p.returncode}): {err}")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def run_tool(ns: str, *args: str, timeout: float = 60.0) -> dict:
    return Proc(ns, *args).result(timeout)


class RunningNode:
    """A node started on a testbed (the `node` and `node_factory` fixtures)."""

    def __init__(self, tb, name: str, runtimes: int, policy: str | None = None, **settings):
        from nfactor_xdp.control import node_client as nodectl
        from nfactor_xdp.formats.config import NodeConfig
        show = tb.show()
        self.tb = tb
        self.show = show
        self.name = name
        self.src_ns = show["hosts"]["src"]["netns"]
        self.dst_ns = show["hosts"]["dst"]["netns"]
        self.src_ip = show["hosts"]["src"]["ipv4"].split("/")[0]
        self.dst_ip = show["hosts"]["dst"]["ipv4"].split("/")[0]
        self.src_ip6 = show["hosts"]["src"]["ipv6"].split("/")[0]
        self.dst_ip6 = show["hosts"]["dst"]["ipv6"].split("/")[0]
        self.cfg = NodeConfig(name=name, netns=show["namespaces"]["node"], runtimes=runtimes, policy=policy,
                              **settings)
        self.state = nodectl.start(self.cfg)

    def status(self) -> dict:
        from nfactor_xdp.control import node_client as nodectl
        return nodectl.status(self.name)

    def flows(self) -> dict:
        from nfactor_xdp.control import node_client as nodectl
        return nodectl.flows(self.name)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "nfactor_xdp.cli", *args], capture_output=True, text=True, timeout=60)

    def stop(self):
        from nfactor_xdp.control import node_client as nodectl
        nodectl.stop(self.name)


class EchoTraffic:
    """`flows` UDP flows of `packets` sequence-numbered datagrams each, echoed
    back by the sink, running while the test restarts things."""

    def __init__(self, n, flows: int, packets: int, pps: int, base: int):
        self.n, self.flows, self.packets = n, flows, packets
        self.sink = Proc(n.dst_ns, "udp-sink", "--echo", "--expect", str(flows * packets),
                         "--timeout", "120").wait_ready()
        self.sender = Proc(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets",
                           str(packets), "--pps", str(pps), "--echo", "--echo-wait", "10", "--base-port", str(base))
        wait_for(lambda: len(n.flows()["flows"]) == flows, timeout=10, what="every flow placed")

    def running(self) -> bool:
        return self.sender.p.poll() is None

    def check(self) -> tuple[dict, dict]:
        """Every datagram exactly once and in order, both ways; each flow's
        flow_monitor counted every packet of it, once."""
        sent, got = self.sender.result(timeout=180), self.sink.result(timeout=180)
        total = self.flows * self.packets
        assert sent["sent"] == total and got["received"] == total and got["bad"] == 0, (sent["sent"], got["received"])
        assert len(got["flows"]) == self.flows and len(sent["echoes"]) == self.flows
        for peer, seqs in got["flows"].items():
            assert seqs == list(range(self.packets)), (peer, _disorder(seqs, self.packets))
        for port, seqs in sent["echoes"].items():
            assert seqs == list(range(self.packets)), (port, _disorder(seqs, self.packets))
        fl = self.n.flows()["flows"]
        assert len(fl) == self.flows
        for f in fl:
            assert f["runtime"] == f["switch_runtime"], f
            assert f["nfs"]["flow_monitor"]["packets"] == {"orig": self.packets, "reply": self.packets}, f
            assert f["packets"] == {"orig": self.packets, "reply": self.packets}, f
        return sent, got

    def kill(self):
        self.sender.kill()
        self.sink.kill()


def _disorder(seqs: list[int], n: int) -> dict:
    """What is wrong with a flow's sequence numbers: missing, repeated, out of order (first few)."""
    seen = set(seqs)
    return {"missing": [i for i in range(n) if i not in seen][:10], "repeated": len(seqs) - len(seen),
            "out_of_order": [(i, a, b) for i, (a, b) in enumerate(zip(seqs, seqs[1:])) if b < a][:5]}


def making_testbeds(unique_name, make_config):
    """The body of a `make_testbed` fixture: yields make(*args, up=True), which
    builds Testbed(make_config(name, *args)) under a fresh name; afterwards
    every one is torn down, and none may leave a namespace behind."""
    from nfactor_xdp.kern import netns
    from nfactor_xdp.tools.testbed import Testbed
    made = []

    def make(*args, up: bool = True):
        tb = Testbed(make_config(unique_name(), *args))
        made.append(tb)
        if up:
            tb.up()
        return tb

    yield make
    errors = []
    for tb in made:
        try:
            tb.down()
        except Exception as e:  # keep tearing down the others
            errors.append(f"{tb.name}: {e}")
    assert errors == [], errors
    leftovers = [ns for ns in netns.listing() if any(ns.startswith(f"{tb.name}-") for tb in made)]
    assert leftovers == [], f"namespaces left behind: {leftovers}"


def flow_port(flow: dict) -> int:
    """The source port of a `flows` entry's flow (the sender's side)."""
    return int(flow["flow"].split()[1].rsplit(":", 1)[1])


def check_taken_flows(before: dict, taken: set, sent: dict, got: dict, src_ip: str, packets: int,
                      after: dict, warm: int, k: int) -> int:
    """After a runtime's (or host's) death under echoed traffic: the other
    flows lost nothing; each taken flow is in order, once, with one gap at
    most, through to its last datagram (traffic resumed on the taker), and
    its flow_monitor count within k-1 of what crossed (`warm` datagrams
    before).  Returns the taken flows' datagrams lost."""
    lost = 0
    for key, f in before.items():
        port = flow_port(f)
        seqs = got["flows"].get(f"{src_ip}:{port}", [])
        echoes = sent["echoes"].get(str(port), [])
        if key not in taken:
            assert seqs == list(range(packets)) and echoes == list(range(packets)), port
            continue
        lost += packets - len(seqs)
        gaps = [i for i in range(1, len(seqs)) if seqs[i] != seqs[i - 1] + 1]
        assert seqs and seqs[-1] == packets - 1 and len(gaps) <= 1, (port, gaps)
        assert seqs == sorted(set(seqs)), port
        truth = warm + len(seqs)
        assert "flow_monitor" in (after[key].get("nfs") or {}), after[key]
        counted = after[key]["nfs"]["flow_monitor"]["packets"]["orig"]
        assert truth - (k - 1) <= counted <= truth, (f["flow"], counted, truth)
    return lost


def remove_namespaces(prefix: str) -> list[str]:
    """Namespaces whose name starts with `prefix`, removed; returns them."""
    from nfactor_xdp.kern import netns
    left = [ns for ns in netns.listing() if ns.startswith(prefix)]
    for ns in left:
        netns.remove(ns)
    return left


WARM = 20  # datagrams per flow before the fault: every flow snapshotted (K=10) twice


def warm_and_snapshotted(n, flows: int, base: int, pps: int) -> dict:
    """`flows` echoed UDP flows of WARM datagrams each (source ports from
    `base`), until every flow's state is snapshotted twice; returns the
    node's flows then, by key."""
    sink = Proc(n.dst_ns, "udp-sink", "--echo", "--expect", str(flows * WARM), "--timeout", "30").wait_ready()
    warm = run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets", str(WARM),
                    "--pps", str(pps), "--echo", "--echo-wait", "3", "--base-port", str(base))
    assert warm["sent"] == sink.result()["received"] == flows * WARM
    deadline = time.monotonic() + 20
    while True:
        flows = n.flows()["flows"]
        behind = [f for f in flows if f.get("snapshot_version", 0) < 2]
        if not behind:
            return {f["key"]: f for f in flows}
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(behind)} of {len(flows)} flows not snapshotted twice after 20 s: "
                                 + "; ".join(f"{f['flow']} rt {f.get('runtime')} replica {f.get('replica')} "
                                             f"v {f.get('snapshot_version')}" for f in behind[:5]))
        time.sleep(0.05)  # polling the runtimes with a deadline
