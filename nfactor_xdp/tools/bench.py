"""Benchmarks on the built-in testbed, each with the XDP-only ceiling measured
in the same run (machines here are noisy: compare ratios).

  forward   pass-through rate (no NF) with 1 and 2 runtimes, offered as fast
            as one CPU can generate
  chains    zero-loss rate per service chain (each NF alone, the three
            together) with 1 and 2 runtimes, found by a binary search over
            the offered rate (paper Fig. 6a)
  migration every flow of runtime 0 migrated to runtime 1 under live traffic,
            per flow count and per-flow rate, and per cap on concurrent
            migrations (paper Fig. 7-8)

Load: an XDP program on the source host's eth0, run with BPF_PROG_TEST_RUN in
live-frames mode (XDP_TX) on CPU 0, rotating the source port over N flows;
in `tcp-http` mode every frame carries a complete HTTP request with the
flow's next sequence number (each packet is a new request to parse: the
parser's worst case).  Count: an XDP program on the sink's eth0 that counts
and drops.  Ceiling: the switch in bypass mode (ext0 -> ext1 in XDP).
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
import time

from ..kern import layouts as L
from ..kern import netns
from ..control import node_client as nodectl
from ..kern.bpfsys import BpfMap
from ..kern.maps import NodeMaps
from ..formats import config as nodeconf
from ..formats.config import NodeConfig
from ..dataplane.rules import Policy, parse_chain
from .testbed import Testbed, TestbedConfig

GEN_CPU = 0
CALL_SECONDS = 0.25  # length of one generator call: setting up live frames costs ~20 ms a call
HTTP_REQUEST = b"GET /bench HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: nfactor-bench\r\n\r\n"

_GEN_PROG = r"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
struct params { u32 base; u32 flows; u32 tcp; u32 step; u64 gap_ns; };
struct pace { u64 next_ns; u64 sent; u32 seq; u32 pad; };
BPF_PERCPU_ARRAY(pace, struct pace, 1);
BPF_ARRAY(params, struct params, 1);
int gen(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    void *l4 = data + sizeof(struct ethhdr) + sizeof(struct iphdr);
    u32 zero = 0, n, f;
    struct pace *s = pace.lookup(&zero);
    struct params *p = params.lookup(&zero);
    if (!s || !p || p->flows == 0)
        return XDP_ABORTED;
    if (p->gap_ns) {
        /* paced: frames leave evenly spaced; the loop spins through the rest */
        u64 now = bpf_ktime_get_ns();
        if (now < s->next_ns)
            return XDP_DROP;
        s->next_ns += p->gap_ns;
        if (s->next_ns + 32 * p->gap_ns < now)  /* fell behind: catch up by 32 frames at most */
            s->next_ns = now - 32 * p->gap_ns;
    }
    s->sent++;
    n = s->seq++;
    f = n % p->flows;
    if (p->tcp) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > end)
            return XDP_ABORTED;
        th->source = bpf_htons(p->base + f);
        th->seq = bpf_htonl(1 + (n / p->flows) * p->step);
    } else {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > end)
            return XDP_ABORTED;
        uh->source = bpf_htons(p->base + f);
    }
    return XDP_TX;
}
"""

_SINK_PROG = r"""
BPF_PERCPU_ARRAY(rx, u64, 1);
int sink(struct xdp_md *ctx) {
    u32 zero = 0; u64 *c = rx.lookup(&zero);
    if (c) *c += 1;
    return XDP_DROP;
}
"""


def _frame(show: dict, size: int, tcp_http: bool) -> bytes:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether
    src, dst = show["hosts"]["src"], show["hosts"]["dst"]
    l3 = Ether(src=src["mac"], dst=dst["mac"]) / IP(src=src["ipv4"].split("/")[0], dst=dst["ipv4"].split("/")[0])
    if tcp_http:
        raw = bytes(l3 / TCP(sport=10000, dport=80, flags="PA", seq=1, ack=1) / HTTP_REQUEST)
        return raw[:50] + b"\0\0" + raw[52:]  # checksum left 0: the sink does not check it
    raw = bytes(l3 / UDP(sport=10000, dport=9))
    raw += b"\0" * max(0, size - len(raw))
    return raw[:40] + b"\0\0" + raw[42:]  # UDP checksum 0: none, valid for IPv4


def generator_main(ns: str, ifname: str) -> None:
    """The generator process, in the source namespace, pinned to GEN_CPU.
    Reads JSON commands on stdin, answers one JSON line each."""
    import socket

    from bcc import BPF

    from ..kern.bpfsys import BPF_F_TEST_XDP_LIVE_FRAMES, prog_test_run, xdp_md
    os.sched_setaffinity(0, {GEN_CPU})
    b = BPF(text=_GEN_PROG)
    fn = b.load_func("gen", BPF.XDP)
    params = b["params"]
    netns.enter(ns)
    ifindex = socket.if_nametoindex(ifname)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") != "run":
            break
        frame = bytes.fromhex(cmd["frame"])
        p = params[ctypes.c_int(0)]
        p.base, p.flows, p.tcp, p.step = cmd["base"], cmd["flows"], int(cmd["tcp"]), len(HTTP_REQUEST)
        p.gap_ns = int(1e9 / cmd["rate"]) if cmd["rate"] else 0
        params[ctypes.c_int(0)] = p
        pace_map = BpfMap(b["pace"].map_fd, ctypes.c_uint32, type(b["pace"].Leaf._type_()), owned=False)

        def sent_so_far():
            return sum(v.sent for v in pace_map.get(0))
        ctx = xdp_md(len(frame), ifindex)
        sent0, start = sent_so_far(), time.monotonic()
        repeat = 100_000
        while True:
            left = cmd["seconds"] - (time.monotonic() - start)
            if left <= 0:
                break
            t0 = time.monotonic()
            prog_test_run(fn.fd, frame, repeat=repeat, ctx=ctx, flags=BPF_F_TEST_XDP_LIVE_FRAMES,
                          data_out_size=0, batch_size=64)
            took = max(1e-4, time.monotonic() - t0)
            # size the next call to about CALL_SECONDS (or what is left of the trial)
            repeat = max(10_000, int(repeat * min(CALL_SECONDS, max(0.02, left - took)) / took))
        print(json.dumps({"sent": sent_so_far() - sent0, "seconds": time.monotonic() - start}), flush=True)


class Generator:
    def __init__(self, ns: str, ifname: str = "eth0"):
        self.p = subprocess.Popen([sys.executable, "-m", "nfactor_xdp.tools.bench", "--gen", ns, ifname],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not self.p.stdout.readline():
            raise RuntimeError(f"generator failed: {self.p.stderr.read()[-500:]}")

    def run(self, frame: bytes, *, rate: float, seconds: float, base: int, flows: int, tcp: bool) -> dict:
        self.p.stdin.write(json.dumps({"cmd": "run", "frame": frame.hex(), "rate": rate, "seconds": seconds,
                                       "base": base, "flows": flows, "tcp": tcp}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"generator died: {self.p.stderr.read()[-500:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.p.kill()


class Sink:
    def __init__(self, ns: str, ifname: str):
        from bcc import BPF

        from ..kern.loader import detach
        self.ns, self.ifname = ns, ifname
        self.bpf = BPF(text=_SINK_PROG)
        fn = self.bpf.load_func("sink", BPF.XDP)
        with netns.entered(ns):
            detach(ifname)
            BPF.attach_xdp(ifname.encode(), fn, 1 << 2)
        self.rx = BpfMap(self.bpf["rx"].map_fd, ctypes.c_uint32, ctypes.c_uint64, owned=False)

    def count(self) -> int:
        return sum(v.value for v in self.rx.get(0))

    def settle(self, timeout: float = 2.0) -> int:
        """Frames still in flight drain within milliseconds: poll until the count stops moving."""
        last, deadline = self.count(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.05)  # polling interval while the count settles
            now = self.count()
            if now == last:
                return now
            last = now
        return last

    def close(self) -> None:
        from ..kern.loader import attach_pass, detach
        with netns.entered(self.ns):
            detach(self.ifname)
        attach_pass(self.ifname, self.ns)
        self.bpf.cleanup()


def _cpu_times(pids: list[int]) -> tuple[float, float]:
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11]) / tick
            system += int(fields[12]) / tick
        except OSError:
            pass
    return user, system


class Bench:
    """A testbed, a generator, a sink, and a node restarted per runtime count."""

    def __init__(self, name: str = "bench", flows: int = 64, size: int = 64, batch: int = 64):
        if os.geteuid() != 0:
            raise SystemExit("error: benchmarks need root")
        self.name, self.flows, self.size, self.batch = name, flows, size, batch
        self.tb = Testbed(TestbedConfig(name=name))
        if self.tb.is_up():
            nodectl.stop(name)
            self.tb.down()
        self.gen = self.sink = None
        self.base = 10000
        self.tb.up()
        try:
            self.show = self.tb.show()
            self.sink = Sink(self.show["hosts"]["dst"]["netns"], self.show["hosts"]["dst"]["ifname"])
            self.gen = Generator(self.show["hosts"]["src"]["netns"])
        except Exception:
            self.close()
            raise
        self.pids: list[int] = []

    def machine(self) -> dict:
        cpu = platform.processor()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        except OSError:
            pass
        return {"cpus": os.cpu_count(), "kernel": platform.release(), "cpu": cpu}

    def node_up(self, runtimes: int, bypass: bool = False, max_migrations: int | None = None,
                snapshot_every: int | None = None) -> None:
        nodectl.stop(self.name)
        cores = [1] if runtimes == 1 else []  # one runtime: keep it off the generator's CPU
        extra = {} if max_migrations is None else {"max_migrations": max_migrations}
        if snapshot_every is not None:
            extra["snapshot_every"] = snapshot_every
        cfg = NodeConfig(name=self.name, netns=self.show["namespaces"]["node"], runtimes=runtimes, cores=cores,
                         batch=self.batch, **extra)
        nodectl.put_policy(self.name, Policy())
        state = nodectl.start(cfg)
        self.pids = [r["pid"] for r in state["runtimes"]]
        with NodeMaps(self.name) as maps:
            maps.write_config(mode=L.C["NFX_MODE_BYPASS" if bypass else "NFX_MODE_FLOWS"])

    def set_chain(self, chain: list[str]) -> None:
        """New flows (a fresh source-port range) get this chain."""
        p = Policy(default_chain=parse_chain(chain))
        nodectl.put_policy(self.name, p)
        self.base += self.flows

    def trial(self, rate: float, seconds: float, tcp: bool) -> dict:
        frame = _frame(self.show, self.size, tcp)
        c0 = self.sink.count()
        u0, s0 = _cpu_times(self.pids)
        g = self.gen.run(frame, rate=rate, seconds=seconds, base=self.base, flows=self.flows, tcp=tcp)
        got = self.sink.settle() - c0
        u1, s1 = _cpu_times(self.pids)
        return {"offered": g["sent"], "forwarded": got, "seconds": g["seconds"],
                "offered_mpps": g["sent"] / g["seconds"] / 1e6, "forwarded_mpps": got / g["seconds"] / 1e6,
                "lost": g["sent"] - got,
                "runtime_cpu_user_s": round(u1 - u0, 3), "runtime_cpu_system_s": round(s1 - s0, 3)}

    def zero_loss(self, tcp: bool, seconds: float = 1.0, steps: int = 7) -> dict:
        """Binary search of the highest offered rate with no loss."""
        top = self.trial(0, seconds, tcp)  # as fast as possible: an upper bound
        lo, hi = 0.0, top["forwarded"] / top["seconds"] * 1.3
        best = None
        for _ in range(steps):
            mid = (lo + hi) / 2
            t = self.trial(mid, seconds, tcp)
            if t["lost"] == 0:
                lo, best = mid, t
            else:
                hi = mid
        return {"zero_loss_mpps": (best["offered_mpps"] if best else 0.0), "max_forwarded_mpps":
                top["forwarded_mpps"], "search_steps": steps, "trial_seconds": seconds}

    def status(self) -> dict:
        st = nodectl.status(self.name)
        return {"socket_full": st["switch"]["socket_full"], "redirect_err": st["switch"]["redirect_err"],
                "xmit_drop": st["switch"]["xmit_drop"],
                "switch_drops": {k: v for k, v in st["switch"].items() if k.startswith("drop_") and v},
                "runtime_idle_waits": sum(r.get("idle_waits") or 0 for r in st["runtimes"]),
                "nf_errors": sum((r.get("nf_errors") or 0) for r in st["runtimes"])}

    def close(self) -> None:
        if self.gen:
            self.gen.close()
        if self.sink:
            self.sink.close()
        nodectl.stop(self.name)
        self.tb.down()


def run_forward_bench(counts: list[int], duration: float = 5.0, flows: int = 64, size: int = 64,
                      name: str = "bench", batch: int = 64) -> dict:
    b = Bench(name, flows, size, batch)
    try:
        result = {"benchmark": "forward", "machine": b.machine(),
                  "load": {"flows": flows, "frame_bytes": size, "generator_cpu": GEN_CPU, "duration_s": duration,
                           "mode": "UDP, XDP live frames, as fast as one CPU can", "runtime_batch": batch},
                  "measurements": []}
        ceiling = None
        for label, n, bypass in [("xdp-ceiling (bypass)", 1, True)] + \
                [(f"{n} runtime{'s' if n > 1 else ''}", n, False) for n in counts]:
            b.node_up(n, bypass)
            m = b.trial(0, duration, tcp=False)
            m.update(b.status(), label=label, runtimes=0 if bypass else n)
            ceiling = ceiling or m["forwarded_mpps"]
            m["ratio_to_ceiling"] = m["forwarded_mpps"] / ceiling
            result["measurements"].append(m)
        return result
    finally:
        b.close()


CHAINS = [[], ["flow_monitor"], ["firewall"], ["http_parser"], ["flow_monitor", "firewall", "http_parser"]]


def run_chain_bench(counts: list[int], trial: float = 1.0, steps: int = 7, flows: int = 64,
                    name: str = "bench") -> dict:
    b = Bench(name, flows)
    try:
        result = {"benchmark": "chains", "machine": b.machine(),
                  "load": {"flows": flows, "generator_cpu": GEN_CPU,
                           "mode": "TCP, every frame a full HTTP request with the flow's next sequence number",
                           "frame_bytes": len(_frame(b.show, 64, True)),
                           "zero_loss": "binary search over the offered rate, no frame lost in a trial"},
                  "measurements": []}
        b.node_up(1, bypass=True)
        ceiling = b.zero_loss(tcp=True, seconds=trial, steps=steps)
        ceiling.update(label="xdp-ceiling (bypass)", runtimes=0, chain=[])
        result["measurements"].append(ceiling)
        for n in counts:
            b.node_up(n)
            for chain in CHAINS:
                b.set_chain(chain)
                m = b.zero_loss(tcp=True, seconds=trial, steps=steps)
                m.update(b.status(), label=f"{n} runtime{'s' if n > 1 else ''}: {'->'.join(chain) or 'no NF'}",
                         runtimes=n, chain=chain,
                         ratio_to_ceiling=m["zero_loss_mpps"] / ceiling["zero_loss_mpps"])
                result["measurements"].append(m)
        return result
    finally:
        b.close()



# --- migration (paper Fig. 7-8) ------------------------------------------------------

MIGRATION_PAPER_US = 636        # the paper's average per-flow migration time
MIGRATION_MAX_OFFERED = 150_000  # frames/s two runtimes carry here with flow_monitor (measured in the run)
_POLL = 0.02                    # polling interval while waiting for flows / policy (always with a deadline)


def _rt_status(name: str, rt_id: int) -> dict:
    return nodectl.runtime_query(name, rt_id, "status", timeout=1.0) or {}


def _switch_agent_stats(name: str) -> dict:
    """The switch agent's STATUS counters (moves, batches, membarrier_us_*)."""
    from ..formats.messages import MsgType
    try:
        return dict(nodectl.control_call(name, "switch", MsgType.STATUS, {}, timeout=0.5).get("stats") or {})
    except nodectl.NodeCtlError as e:
        return {"error": str(e)}


def _udp_counters(ns: str) -> dict:
    """UDP counters of the node's namespace (control messages travel its loopback)."""
    try:
        with netns.entered(ns), open("/proc/thread-self/net/snmp") as f:
            rows = [ln.split() for ln in f if ln.startswith("Udp:")]
        return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:])}
    except (OSError, IndexError, ValueError):
        return {}


def _placement(name: str) -> dict:
    """After a migration: does the switch send each flow to the runtime holding its actor?"""
    with NodeMaps(name) as maps:
        placed = {f["key"]: f["runtime"] for f in maps.flows()}
    where: dict[str, list[int]] = {}
    for i in (0, 1):
        for a in (nodectl.runtime_query(name, i, "flows", timeout=10.0, detail=False) or {}).get("flows", []):
            where.setdefault(a["key"], []).append(i)
    return {"switch_flows": len(placed),
            "switch_not_at_actor": sum(1 for k, rt in placed.items() if k in where and rt not in where[k]),
            "actor_on_both_runtimes": sum(1 for v in where.values() if len(v) > 1),
            "switch_entry_without_actor": sum(1 for k in placed if k not in where)}


def _migration_node(b: Bench, chain: list[str], max_migrations: int | None = None, timeout: float = 10.0) -> None:
    """A fresh 2-runtime node (no flows of earlier trials), `chain` in force on both
    runtimes and runtime 1 running in runtime 0's view (a migration target)."""
    b.node_up(2, max_migrations=max_migrations)
    before = [_rt_status(b.name, i).get("policy_version") or 0 for i in (0, 1)]
    b.set_chain(chain)
    deadline = time.monotonic() + timeout
    while True:
        sts = [_rt_status(b.name, i) for i in (0, 1)]
        if all((st.get("policy_version") or 0) > v and st.get("registered") for st, v in zip(sts, before)):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"runtimes did not take the policy within {timeout}s: {sts}")
        time.sleep(_POLL)


def _migration_trial(b: Bench, flows: int, rate: float, budget: float, tail: float = 0.5,
                     fill_timeout: float = 10.0) -> dict:
    """Traffic on `flows` new UDP flows at `rate` frames/s each; once every flow has
    its actor, migrate all flows of runtime 0 to runtime 1 while the traffic goes
    on.  The generator runs for the fill time + `budget` + `tail` seconds (it
    cannot be stopped early)."""
    import threading
    base = b.base
    b.base += flows  # fresh source ports: new flows
    frame = _frame(b.show, b.size, False)
    fill = 1.0 / rate  # one turn of the source-port rotation: every flow has sent once
    seconds = round(fill + 0.3 + budget + tail, 2)
    box: dict = {}

    def run_gen():
        try:
            box["gen"] = b.gen.run(frame, rate=flows * rate, seconds=seconds, base=base, flows=flows, tcp=False)
        except Exception as e:  # reported with the trial
            box["error"] = repr(e)

    c0 = b.sink.count()
    t0 = time.monotonic()
    th = threading.Thread(target=run_gen, name="bench-generator", daemon=True)
    th.start()
    out = {"flows": flows, "rate_per_flow_pps": rate, "offered_pps": flows * rate, "generator_seconds": seconds,
           "source_ports": [base, base + flows - 1]}
    try:
        deadline = t0 + fill + fill_timeout
        while True:
            actors = [_rt_status(b.name, i).get("flows") or 0 for i in (0, 1)]
            if sum(actors) >= flows or time.monotonic() > deadline or not th.is_alive():
                break
            time.sleep(_POLL)
        with NodeMaps(b.name) as maps:
            out["switch_flows"] = sum(1 for _ in maps["flows"].keys())
        t_ready = time.monotonic()
        out.update(fill_seconds=round(t_ready - t0, 3), actors_before=actors, on_source=actors[0])
        if sum(actors) < flows:
            raise RuntimeError(f"only {sum(actors)} of {flows} flows reached the runtimes in {t_ready - t0:.1f}s")
        sa0, udp0 = _switch_agent_stats(b.name), _udp_counters(b.show["namespaces"]["node"])
        s_start = b.sink.count()
        try:
            report = nodectl.migrate(b.name, 0, 1, timeout=10.0 + 2 * budget)
        except nodectl.NodeCtlError as e:
            # not finished in time: keep what the source runtime says (a fresh node: its first batch)
            out["error"] = str(e)[:300]
            report = nodectl.runtime_query(b.name, 0, "migrate_status", batch=1) or {}
        t_done = time.monotonic()
        s_done = b.sink.count()
        sa1, udp1 = _switch_agent_stats(b.name), _udp_counters(b.show["namespaces"]["node"])
    finally:
        th.join(seconds + 30)
    got = b.sink.settle() - c0
    if "error" in box:
        raise RuntimeError(f"generator: {box['error']}")
    g = box["gen"]
    sts = [_rt_status(b.name, i) for i in (0, 1)]
    window = t_done - t_ready
    sa = {k: sa1.get(k, 0) - sa0.get(k, 0) for k in ("moves", "batches", "membarriers", "membarrier_us_total",
                                                     "markers_sent", "marker_errors", "grace_errors")}
    grace_us = sa["membarrier_us_total"] / sa["membarriers"] if sa["membarriers"] else 0.0
    mig = {k: sum((st.get("migration") or {}).get(k, 0) for st in sts)
           for k in ("marker_resends", "late_markers", "buffer_overflow", "replayed", "replay_tx_fail",
                     "after_marker", "in_refused")}
    out.update({
        "migrated": report.get("succeeded"), "failed": report.get("failed"), "retried": report.get("retried"),
        "total": report.get("total"), "in_progress": report.get("in_progress"), "seconds": report.get("seconds"),
        "avg_flow_us": report.get("avg_flow_us"),
        "flows_per_second": round(report["succeeded"] / report["seconds"], 1) if report.get("seconds") else None,
        "last_error": report.get("last_error") or None,
        "traffic_throughout": window + (t_ready - t0) < g["seconds"],  # the generator outlasted the migration
        "offered": g["sent"], "forwarded": got, "lost": g["sent"] - got, "sink_lost_frames": g["sent"] != got,
        "offered_pps_measured": round(g["sent"] / g["seconds"], 1),
        "sink_pps_during_migration": round((s_done - s_start) / window, 1) if window > 0 else None,
        "actors_after": [st.get("flows") for st in sts],
        "switch_agent": {**sa, "grace_us_avg": round(grace_us, 1), "grace_us_max": sa1.get("membarrier_us_max"),
                         "moves_per_grace": round(sa["moves"] / sa["membarriers"], 1) if sa["membarriers"] else None,
                         "grace_share_of_batch": round(sa["membarrier_us_total"] / 1e6 / report["seconds"], 3)
                         if report.get("seconds") else None},
        "runtime_migration": mig,
        "node_udp": {k: udp1.get(k, 0) - udp0.get(k, 0) for k in ("InDatagrams", "RcvbufErrors", "InErrors")},
        "xsk_rx_dropped": sum(((st.get("xsk") or {}).get("rx_dropped") or 0) for st in sts),
    })
    out["placement_after"] = _placement(b.name)
    out.update(b.status())
    return out


def run_migration_bench(flow_counts=(100, 1000, 10000), rates=(10, 50, 100), caps=(100, 500, 1000, 2000),
                        cap_flows: int = 2000, cap_rate: float = 10.0, max_offered_pps: float | None = None,
                        tail: float = 0.5, ceiling_seconds: float = 2.0, name: str = "bench") -> dict:
    """Flow migration under live traffic (paper Fig. 7-8): every flow of runtime 0
    migrated to runtime 1, (1) per flow count and per-flow rate, (2) per cap on
    concurrent migrations.  Each trial has a fresh node, so runtime 0 holds about
    half of that trial's flows and nothing else."""
    t_start = time.monotonic()
    b = Bench(name)
    try:
        result = {"benchmark": "migration", "machine": b.machine(),
                  "load": {"mode": "UDP, XDP live frames, paced, source port rotating over the trial's flows",
                           "frame_bytes": len(_frame(b.show, b.size, False)), "generator_cpu": GEN_CPU,
                           "chain": ["flow_monitor"], "runtimes": 2,
                           "what": "a fresh node per trial; once every flow has its actor, nfactorctl migrate "
                                   "--from 0 --to 1 --all while the traffic goes on; seconds: the whole batch, "
                                   "avg_flow_us: each flow's migration from its start to its completion "
                                   "(queueing behind the concurrency cap excluded)",
                           "tail_s": tail},
                  "paper_reference": {"avg_per_flow_us": MIGRATION_PAPER_US}}
        # context: the XDP-only ceiling and what two runtimes carry with flow_monitor
        ctx = []
        b.node_up(1, bypass=True)
        ceiling = b.trial(0, ceiling_seconds, tcp=False)
        ceiling.update(label="xdp-ceiling (bypass)", runtimes=0, ratio_to_ceiling=1.0)
        ctx.append(ceiling)
        _migration_node(b, ["flow_monitor"])
        carry = b.trial(0, ceiling_seconds, tcp=False)
        carry.update(b.status(), label="2 runtimes: flow_monitor", runtimes=2,
                     ratio_to_ceiling=carry["forwarded_mpps"] / ceiling["forwarded_mpps"])
        ctx.append(carry)
        measured = carry["forwarded"] / carry["seconds"]
        limit = max_offered_pps if max_offered_pps is not None else min(MIGRATION_MAX_OFFERED, measured)
        result["context"] = ctx
        result["offered_limit_pps"] = {"limit": round(limit), "measured_2_runtimes_pps": round(measured),
                                       "nominal": MIGRATION_MAX_OFFERED, "given": max_offered_pps}

        def budget(n):  # seconds of traffic left for the migration itself (generous: ~2 ms per migrating flow)
            return 1.0 + n / 2 * 0.002

        def one(label, n, rate, cap=None):
            m = {"label": label, "flows": n, "rate_per_flow_pps": rate, "offered_pps": n * rate,
                 "max_migrations": cap if cap is not None else NodeConfig.max_migrations}
            if n * rate > limit:
                m.update(skipped=True, reason=f"offered {n * rate:.0f} frames/s exceeds what 2 runtimes carry "
                                              f"here ({limit:.0f}/s)")
                return m
            try:
                _migration_node(b, ["flow_monitor"], max_migrations=cap)
                m.update(_migration_trial(b, n, rate, budget(n), tail=tail), skipped=False)
            except (nodectl.NodeCtlError, RuntimeError) as e:
                m.update(skipped=False, error=str(e))
            return m

        result["fig7_flows_rates"] = [one(f"{n} flows x {r} pps", n, r) for n in flow_counts for r in rates]
        n2 = cap_flows
        if n2 * cap_rate > limit:
            n2 = int(limit // cap_rate)
        result["fig8_caps"] = {"flows": n2, "rate_per_flow_pps": cap_rate, "asked_flows": cap_flows,
                               "measurements": [one(f"{n2} flows, cap {c}", n2, cap_rate, cap=c) for c in caps]}
        result["run"] = {"flow_counts": list(flow_counts), "rates": list(rates), "caps": list(caps),
                         "seconds": round(time.monotonic() - t_start, 1)}
        return result
    finally:
        b.close()



# --- replication (paper Fig. 10) ------------------------------------------------------

REPLICATION_PAPER = {"throughput_lost_ratio": 0.60, "recovery_total_s": 3.3, "recovery_fetch_replay_s": 1.2}
REPLICATION_K = 10


def _chain_node(b: Bench, runtimes: int, chain: list[str], snapshot_every: int, timeout: float = 10.0) -> None:
    """A fresh node with `runtimes` runtimes and K=`snapshot_every`, `chain` in force on every runtime."""
    b.node_up(runtimes, snapshot_every=snapshot_every)
    ids = list(range(runtimes))
    before = [_rt_status(b.name, i).get("policy_version") or 0 for i in ids]
    b.set_chain(chain)
    deadline = time.monotonic() + timeout
    while True:
        sts = [_rt_status(b.name, i) for i in ids]
        if all((st.get("policy_version") or 0) > v and st.get("registered") for st, v in zip(sts, before)):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"runtimes did not take the policy within {timeout}s: {sts}")
        time.sleep(_POLL)


def _replication_totals(name: str, runtimes: int) -> dict:
    keys = ("snapshots_sent", "snapshot_messages", "shed", "refused", "stored", "stale_ignored")
    reps = [(_rt_status(name, i).get("replication") or {}) for i in range(runtimes)]
    return {k: sum(r.get(k, 0) for r in reps) for k in keys}


def _view_state(name: str, rt_id: int) -> str | None:
    """Runtime rt_id's state in the controller's view (None: no answer)."""
    from ..formats.messages import MsgType
    try:
        ctl = nodectl.control_call(name, "control", MsgType.STATUS, {}, timeout=0.2)
    except nodectl.NodeCtlError:
        return None
    for e in ctl["view"]["runtimes"]:
        if e.get("id") == rt_id:
            return e.get("state")
    return "absent"


def _proc_start_boottime(pid: int) -> float | None:
    """A process's start, in seconds since boot (10 ms resolution)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _recovery_trial(b: Bench, flows: int, total_pps: float, tail: float, fill_timeout: float,
                    out: dict | None = None) -> dict:
    """`flows` UDP flows at `total_pps` in all through a 2-runtime node with K=10;
    once the node holds them and runtime 1 holds a snapshot of each of runtime 0's
    flows, kill -9 runtime 0 and time its detection, restart and recovery."""
    import threading
    _chain_node(b, 2, ["flow_monitor"], REPLICATION_K)
    logs = {i: nodeconf.log_path(b.name, f"rt{i}") for i in (0, 1)}
    log_at = {i: os.path.getsize(path) for i, path in logs.items()}
    base = b.base
    b.base += flows
    frame = _frame(b.show, b.size, False)
    rotation = flows / total_pps  # seconds for every flow to send one frame
    snap_after = (REPLICATION_K + 1) * rotation  # every flow has sent K frames: a snapshot each
    seconds = round(snap_after + 1.0 + tail, 2)
    box: dict = {}

    def run_gen():
        try:
            box["gen"] = b.gen.run(frame, rate=total_pps, seconds=seconds, base=base, flows=flows, tcp=False)
        except Exception as e:  # reported with the trial
            box["error"] = repr(e)

    out = {} if out is None else out  # filled as the trial goes: kept when it fails
    out.update({"flows": flows, "offered_pps": total_pps, "rate_per_flow_pps": round(total_pps / flows, 2),
           "generator_seconds": seconds, "snapshot_every": REPLICATION_K})
    t0 = time.monotonic()
    th = threading.Thread(target=run_gen, name="bench-generator", daemon=True)
    th.start()
    try:
        # 1. the node holds every flow
        deadline = t0 + rotation + fill_timeout
        while True:
            held = nodectl.status(b.name)["switch_flows"]
            if held >= flows or time.monotonic() > deadline or not th.is_alive():
                break
            time.sleep(0.1)  # polling the switch's flow table with a deadline
        out.update(switch_flows=held, fill_seconds=round(time.monotonic() - t0, 2))
        if held < flows:
            raise RuntimeError(f"only {held} of {flows} flows in the switch after {time.monotonic() - t0:.1f}s")
        # 2. runtime 1 holds a snapshot of each flow of runtime 0, none pending
        deadline = t0 + snap_after + fill_timeout
        while True:
            s0, s1 = _rt_status(b.name, 0), _rt_status(b.name, 1)
            actors0 = s0.get("flows") or 0
            holding = int(((s1.get("replication") or {}).get("holding") or {}).get("0", 0))
            pending = (s0.get("replication") or {}).get("pending", 0)
            if (actors0 and holding >= actors0) or time.monotonic() > deadline \
                    or not th.is_alive():
                break
            time.sleep(0.1)  # polling the runtimes with a deadline
        out.update(snapshots_wait_seconds=round(time.monotonic() - t0, 2), actors_before=[actors0,
                   s1.get("flows")], peer_holding_before=holding, pending_before=pending,
                   replication_before=_replication_totals(b.name, 2))
        if not th.is_alive():
            raise RuntimeError(f"the generator ended before the snapshots were in place "
                               f"(peer holds {holding} of runtime 0's {actors0} flows)")
        if holding < actors0:
            out["snapshot_shortfall"] = actors0 - holding  # recorded, the trial goes on
        # 3. kill -9 runtime 0, time detection, restart, recovery
        rts = {r["id"]: r for r in nodectl.status(b.name)["runtimes"]}
        old_pid, peer_pid = rts[0]["pid"], rts[1]["pid"]
        t_kill = time.monotonic()
        boot_kill = time.clock_gettime(time.CLOCK_BOOTTIME)
        os.kill(old_pid, 9)
        t_failed = t_running = None
        states = []
        deadline = t_kill + 30.0
        while time.monotonic() < deadline:
            st = _view_state(b.name, 0)
            now = time.monotonic()
            if not states or states[-1][0] != st:
                states.append((st, round(now - t_kill, 4)))
            if t_failed is None and st not in ("running", None):
                t_failed = now
            if t_failed is not None and st == "running":
                t_running = now
                break
            time.sleep(0.005)  # polling the controller's view with a deadline
        rec = {}
        new_pid = None
        rdeadline = time.monotonic() + 10.0
        while time.monotonic() < rdeadline:  # the restarted runtime's own report
            s0 = _rt_status(b.name, 0)
            rec = (s0.get("replication") or {}).get("recovery") or {}
            new_pid = s0.get("pid")
            if rec.get("phase") == "done":
                break
            time.sleep(_POLL)
        start = _proc_start_boottime(new_pid) if new_pid else None
        time.sleep(1.0)  # does the recovered node stay up?
        rts = {r["id"]: r for r in nodectl.status(b.name)["runtimes"]}
        out.update(restarts_after={i: r.get("restarts") for i, r in rts.items()},
                   peer_restarted=rts[1].get("pid") != peer_pid or bool(rts[1].get("restarts")),
                   crashed_again=bool((rts[0].get("restarts") or 0) > 1 or rts[1].get("restarts")))
        out.update({
            "killed_pid": old_pid, "new_pid": new_pid,
            "detected_s": round(t_failed - t_kill, 4) if t_failed else None,
            "running_again_s": round(t_running - t_kill, 4) if t_running else None,
            # start of the process that reported the recovery, ~10 ms resolution
            "respawned_s": round(start - boot_kill, 2) if start is not None else None,
            "view_states": states,
            "recovery": rec, "recovery_seconds": rec.get("seconds"),
            "actors_recovered": rec.get("actors"), "actors_lost": actors0 - (rec.get("actors") or 0),
            "actors_after": [(_rt_status(b.name, i).get("flows")) for i in (0, 1)],
            "traffic_throughout": bool(t_running) and th.is_alive(),
        })
    finally:
        th.join(seconds + 30)
        errors = {}  # what the runtimes logged during the trial, besides their start lines
        for i, path in logs.items():
            try:
                with open(path, errors="replace") as f:
                    f.seek(log_at[i])
                    lines = [ln.strip() for ln in f if ln.strip() and " running on " not in ln]
            except OSError:
                lines = []
            if lines:
                errors[f"rt{i}"] = {"lines": len(lines), "last": lines[-3:]}
        out["runtime_log_errors"] = errors
        try:
            out["restarts_total"] = {r["id"]: r.get("restarts") for r in nodectl.status(b.name)["runtimes"]}
        except nodectl.NodeCtlError:
            pass
    if "error" in box:
        raise RuntimeError(f"generator: {box['error']}")
    g = box.get("gen") or {}
    b.sink.settle()
    out.update(offered=g.get("sent"), offered_pps_measured=round(g["sent"] / g["seconds"], 1) if g else None)
    out.update(b.status())
    return out


def run_replication_bench(counts=(1, 2), flow_counts=(1000, 10000, 50000), trial: float = 1.0, steps: int = 6,
                          recovery_pps: float = 40_000, tail: float = 4.0, fill_timeout: float = 15.0,
                          max_fill_seconds: float = 30.0, ceiling_seconds: float = 2.0,
                          name: str = "bench") -> dict:
    """State replication (paper Fig. 10): (1) the zero-loss and maximal rate with
    flow_monitor, with and without snapshots every K=10 packets, per runtime
    count; (2) the recovery of a runtime killed with -9 while its flows' traffic
    goes on, per flow count; the XDP-only ceiling from the same run."""
    t_start = time.monotonic()
    b = Bench(name)
    try:
        result = {"benchmark": "replication", "machine": b.machine(),
                  "load": {"mode": "UDP, XDP live frames, source port rotating over the flows",
                           "frame_bytes": len(_frame(b.show, b.size, False)), "generator_cpu": GEN_CPU,
                           "chain": ["flow_monitor"], "throughput_flows": b.flows, "snapshot_every": REPLICATION_K,
                           "zero_loss": "binary search over the offered rate, no frame lost in a trial",
                           "trial_s": trial, "search_steps": steps},
                  "paper_reference": REPLICATION_PAPER}
        b.node_up(1, bypass=True)
        ceiling = b.zero_loss(tcp=False, seconds=trial, steps=steps)
        ceiling.update(label="xdp-ceiling (bypass)", runtimes=0)
        result["ceiling"] = ceiling

        rows = []
        for n in counts:
            per_k = {}
            for k in (0, REPLICATION_K):
                m = {"label": f"{n} runtime{'s' if n > 1 else ''}, K={k or 'off'}", "runtimes": n,
                     "snapshot_every": k, "replica_peers": (n - 1) if k else 0}
                try:
                    _chain_node(b, n, ["flow_monitor"], k)
                    r0 = _replication_totals(b.name, n)
                    m.update(b.zero_loss(tcp=False, seconds=trial, steps=steps))
                    r1 = _replication_totals(b.name, n)
                    m["replication"] = {key: r1[key] - r0[key] for key in r1}
                    m.update(b.status())
                    m["ratio_to_ceiling"] = m["zero_loss_mpps"] / ceiling["zero_loss_mpps"] \
                        if ceiling["zero_loss_mpps"] else None
                    if k and n == 1:
                        m["note"] = "one runtime: no peer to replicate to, no snapshot leaves the runtime"
                except (nodectl.NodeCtlError, RuntimeError) as e:
                    m["error"] = str(e)[:300]
                per_k[k] = m
                rows.append(m)
            off, on = per_k[0], per_k[REPLICATION_K]
            if off.get("zero_loss_mpps") and on.get("zero_loss_mpps") is not None:
                on["zero_loss_lost_ratio"] = round(1 - on["zero_loss_mpps"] / off["zero_loss_mpps"], 3)
            if off.get("max_forwarded_mpps") and on.get("max_forwarded_mpps") is not None:
                on["max_forwarded_lost_ratio"] = round(1 - on["max_forwarded_mpps"] / off["max_forwarded_mpps"], 3)
        result["throughput"] = rows

        rec = []
        for n in flow_counts:
            m = {"label": f"{n} flows", "flows": n}
            need = (REPLICATION_K + 1) * n / recovery_pps
            if need > max_fill_seconds:
                m.update(skipped=True, reason=f"{need:.0f}s of traffic at {recovery_pps:.0f} pps before every flow "
                                              f"has a snapshot (limit {max_fill_seconds:.0f}s)")
            else:
                try:
                    m["skipped"] = False
                    _recovery_trial(b, n, recovery_pps, tail, fill_timeout, out=m)
                except (nodectl.NodeCtlError, RuntimeError) as e:
                    m.update(error=str(e)[:300])
            rec.append(m)
        result["recovery"] = rec
        result["run"] = {"counts": list(counts), "flow_counts": list(flow_counts), "recovery_pps": recovery_pps,
                         "seconds": round(time.monotonic() - t_start, 1)}
        return result
    finally:
        b.close()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--gen":
    generator_main(sys.argv[2], sys.argv[3])
