"""`nfactorctl demo`: the node on the built-in testbed, with real traffic.

testbed up -> node up -> UDP flows (echoed back by the sink) and TCP
connections (HTTP downloads) for a while, with a live table of what each
runtime does -> summary -> node down -> testbed down -> check that nothing
is left behind.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

from ..kern import netns
from ..formats import config as nodeconf
from ..control import node_client as nodectl
from ..control.processes import ISOLATED_CWD, module_command
from ..formats.config import NodeConfig
from . import live
from .testbed import Testbed, TestbedConfig

TCP_CLIENTS = 4
UDP_BASE_PORT = 43000
BLOCKED_UDP_FLOWS = 20  # the first flows' source ports are blocked by the firewall


def demo_policy(blocked: int) -> dict:
    """HTTP through the paper's full chain; UDP through monitor and firewall,
    which drops the first `blocked` UDP flows."""
    return {
        "default_chain": ["flow_monitor"],
        "rules": [
            {"proto": "tcp", "dport": "8080", "chain": ["flow_monitor", "firewall", "http_parser"]},
            {"proto": "udp", "chain": ["flow_monitor", "firewall"]},
        ],
        "nf_config": {"firewall": {"rules": [
            {"proto": "udp", "sport": f"{UDP_BASE_PORT}-{UDP_BASE_PORT + blocked - 1}", "action": "drop"},
        ]}},
    }


def _tool(ns: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *module_command("nfactor_xdp.tools.traffic", *args)],
                            cwd=ISOLATED_CWD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    lines = [ln for ln in out.splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"error": err.strip()[-300:]}


def _leftovers(tb_name: str, node: str) -> list[str]:
    left = [n for n in netns.listing() if n.startswith(f"{tb_name}-")]
    if os.path.exists(f"/sys/fs/bpf/nfactor/{node}"):
        left.append(f"/sys/fs/bpf/nfactor/{node}")
    if os.path.exists(f"/run/nfactor/{node}"):
        left.append(f"/run/nfactor/{node}")
    return left


def run_demo(name: str = "demo", runtimes: int = 2, duration: float = 10.0, udp_flows: int = 200,
             tcp_flows: int = 100, out=print, offload: str = "on") -> int:
    if os.geteuid() != 0:
        out("error: the demo needs root (namespaces, XDP)")
        return 1
    tb = Testbed(TestbedConfig(name=name))
    if tb.is_up():
        out(f"testbed {name} exists from an earlier run; removing it")
        nodectl.stop(name)
        tb.down()
    procs: list[subprocess.Popen] = []
    rc = 1
    try:
        out(f"[1/5] testbed {name}: hosts {name}-src and {name}-dst around node namespace {name}-node")
        tb.up()
        show = tb.show()
        src_ns, dst_ns = show["hosts"]["src"]["netns"], show["hosts"]["dst"]["netns"]
        dst_ip = show["hosts"]["dst"]["ipv4"].split("/")[0]
        blocked = min(BLOCKED_UDP_FLOWS, udp_flows // 2)
        policy_file = os.path.join(nodeconf.run_dir(name) + "-demo-policy.json")
        os.makedirs(nodeconf.RUN_ROOT, exist_ok=True)
        with open(policy_file, "w") as f:
            json.dump(demo_policy(blocked), f)
        out(f"[2/5] node {name}: XDP switch on ext0/ext1, {runtimes} runtimes; chains: TCP/8080 "
            f"flow_monitor->firewall->http_parser, UDP flow_monitor->firewall ({blocked} UDP flows blocked)")
        cfg = NodeConfig(name=name, netns=show["namespaces"]["node"], runtimes=runtimes, policy=policy_file,
                         offload=offload)
        nodectl.start(cfg)
        os.unlink(policy_file)

        pps = max(100.0, udp_flows * 20.0)
        packets = max(1, int(duration * pps / udp_flows))
        per_client = max(1, tcp_flows // TCP_CLIENTS)
        out(f"[3/5] traffic for ~{duration:.0f}s: {udp_flows} UDP flows x {packets} datagrams (echoed), "
            f"{per_client * TCP_CLIENTS} TCP connections (HTTP GET, 256 KiB each)")
        sink = _tool(dst_ns, "udp-sink", "--echo", "--brief", "--expect", str((udp_flows - blocked) * packets),
                     "--timeout", str(duration + 20))
        web = _tool(dst_ns, "http-serve", "--bind", dst_ip, "--timeout", str(duration + 20))
        procs += [sink, web]
        for p in (sink, web):
            p.stdout.readline()  # "ready"
        sender = _tool(src_ns, "udp-send", "--dst", dst_ip, "--flows", str(udp_flows), "--packets", str(packets),
                       "--pps", str(pps), "--echo", "--echo-wait", "5", "--brief",
                       "--base-port", str(UDP_BASE_PORT))
        procs.append(sender)
        clients = []
        for i in range(TCP_CLIENTS):
            c = _tool(src_ns, "http-get", "--host", dst_ip, "--size", str(256 << 10), "--count", str(per_client),
                      "--seed", str(1000 * i))
            clients.append(c)
            procs.append(c)

        start = last = time.monotonic()
        prev: dict = {}
        screen = live.Screen(out)
        seen_http: dict[str, dict] = {}  # TCP flows end and are released: keep what they parsed

        def note_http(flow_list):
            for f in flow_list:
                if "http_parser" in (f.get("nfs") or {}):
                    seen_http[f["key"]] = f["nfs"]["http_parser"]

        while sender.poll() is None or any(c.poll() is None for c in clients):
            time.sleep(1.0)  # the refresh period of the live table
            note_http(nodectl.flows(name)["flows"])
            now = time.monotonic()
            screen.show(live.table(nodectl.status(name), prev, now - last, f"t={now - start:5.1f}s"))
            last = now
            if now - start > duration + 60:
                out("traffic did not finish in time; stopping it")
                break

        sent = _result(sender, 30)
        got = _result(sink, 30)
        http = [_result(c, 30) for c in clients]
        st = nodectl.status(name)
        flows = nodectl.flows(name)["flows"]
        note_http(flows)
        out("[4/5] summary")
        echoes = sent.get("echoed", 0)
        in_order = all(f["in_order"] for f in got.get("flows", {}).values())
        drop_flows = [f for f in flows if (f.get("nfs") or {}).get("firewall", {}).get("verdict") == "drop"]
        expected = (udp_flows - blocked) * packets
        out(f"  UDP: {sent.get('sent', 0)} datagrams sent on {udp_flows} flows, {got.get('received', 0)} "
            f"received by the sink ({'each flow in order' if in_order else 'REORDERED'}), "
            f"{echoes} echoes back at the source")
        out(f"  firewall: {len(drop_flows)} flows blocked, {sum(f.get('dropped') or 0 for f in drop_flows)} "
            f"datagrams dropped; e.g. {drop_flows[0]['flow'] if drop_flows else '-'}")
        parsed = list(seen_http.values())
        out(f"  http_parser: {sum(h.get('n_requests', 0) for h in parsed)} requests and "
            f"{sum(h.get('n_responses', 0) for h in parsed)} responses parsed on {len(parsed)} connections "
            f"seen live (connections end and their actors are released within seconds)")
        ok = sum(h.get("ok", 0) for h in http)
        total = sum(h.get("requests", 0) for h in http)
        out(f"  TCP: {ok}/{total} HTTP downloads complete with the right SHA-256")
        for r in st["runtimes"]:
            off = r.get("offload") or {}
            handed = f", {off.get('offloaded', 0)} flows handed to the switch" if offload == "on" else ""
            out(f"  rt{r['id']} (core {r['core']}): {r['switch'].get('flows_placed', 0)} flows placed, "
                f"{r.get('frames', 0)} frames processed{handed}")
        if offload == "on":
            out(f"  offload: the switch forwarded {st['switch'].get('off_forward', 0)} frames and dropped "
                f"{st['switch'].get('off_drop', 0)} of offloaded flows on its own (their actors count them)")
        drops = {k: v for k, v in st["switch"].items() if k.startswith("drop_") and v}
        out(f"  switch: {st['switch'].get('flow_new', 0)} flows placed round-robin, "
            f"{st['switch'].get('other_forward', 0)} non-flow frames forwarded, drops: {drops or 'none'}, "
            f"failed redirects: {st['switch'].get('redirect_err', 0)}")
        complete = (got.get("received") == expected and echoes == expected and ok == total and in_order
                    and len(drop_flows) == blocked)
        out("  result: every datagram and download arrived" if complete
            else "  result: some traffic was lost (see the counters above)")
        rc = 0 if complete else 2
    except KeyboardInterrupt:
        out("interrupted")
        rc = 130
    except Exception as e:
        out(f"error: {e}")
        rc = 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        out("[5/5] node down, testbed down")
        nodectl.stop(name)
        tb.down()
        left = _leftovers(name, name)
        out("  nothing left behind (namespaces, XDP programs, pins, state)" if not left
            else f"  LEFT BEHIND: {left}")
        if left and rc == 0:
            rc = 1
    return rc
