"""`nfactorctl bench forward`: the node's pass-through rate, measured on the
built-in testbed with the XDP-only ceiling from the same run.

Load: an XDP program on the source host's eth0 run with BPF_PROG_TEST_RUN in
live-frames mode (XDP_TX), rotating the UDP source port over N flows, on
CPU 0.  Count: an XDP program on the sink's eth0 that counts and drops.
Ceiling: the switch in bypass mode (ext0 -> ext1 in XDP, no runtime).
Each runtime count is a fresh node; CPU time of the runtimes is split into
user (Python) and system (kernel: AF_XDP copy, veth, TX path).
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
import time

from . import layouts as L
from . import netns, nodectl
from .bpfsys import BpfMap
from .maps import NodeMaps
from .nodeconf import NodeConfig
from .testbed import Testbed, TestbedConfig

GEN_CPU = 0
CHUNK = 1_000_000

_GEN_PROG = r"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>
BPF_PERCPU_ARRAY(seq, u32, 1);
int gen(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct udphdr *uh = data + sizeof(struct ethhdr) + sizeof(struct iphdr);
    u32 zero = 0, *s = seq.lookup(&zero);
    if ((void *)(uh + 1) > end || !s)
        return XDP_ABORTED;
    uh->source = bpf_htons(BASE_PORT + (*s)++ % FLOWS);
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


def _frame(show: dict, size: int) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    src, dst = show["hosts"]["src"], show["hosts"]["dst"]
    pkt = Ether(src=src["mac"], dst=dst["mac"]) / IP(src=src["ipv4"].split("/")[0],
                                                      dst=dst["ipv4"].split("/")[0]) / UDP(sport=10000, dport=9)
    raw = bytes(pkt)
    raw += b"\0" * max(0, size - len(raw))
    # UDP checksum 0 (none, valid for IPv4): the generator rewrites the port
    return raw[:40] + b"\0\0" + raw[42:]


def generate(ns: str, ifname: str, frame: bytes, flows: int, duration: float) -> dict:
    """Runs in the source namespace: send as fast as one CPU can for `duration`."""
    from bcc import BPF

    from .bpfsys import BPF_F_TEST_XDP_LIVE_FRAMES, prog_test_run, xdp_md
    os.sched_setaffinity(0, {GEN_CPU})
    b = BPF(text=_GEN_PROG, cflags=[f"-DFLOWS={flows}", "-DBASE_PORT=10000"])
    fn = b.load_func("gen", BPF.XDP)
    netns.enter(ns)
    import socket
    ifindex = socket.if_nametoindex(ifname)
    # compiled: tell the parent, and start when it has taken its readings
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    sent = 0
    start = time.monotonic()
    while time.monotonic() - start < duration:
        prog_test_run(fn.fd, frame, repeat=CHUNK // 10, ctx=xdp_md(len(frame), ifindex),
                      flags=BPF_F_TEST_XDP_LIVE_FRAMES, data_out_size=0, batch_size=64)
        sent += CHUNK // 10
    return {"sent": sent, "seconds": time.monotonic() - start}


class _Sink:
    def __init__(self, ns: str, ifname: str):
        from bcc import BPF

        from .loader import detach
        self.ns, self.ifname = ns, ifname
        self.bpf = BPF(text=_SINK_PROG)
        fn = self.bpf.load_func("sink", BPF.XDP)
        with netns.entered(ns):
            detach(ifname)
            BPF.attach_xdp(ifname.encode(), fn, 1 << 2)

        self.rx = BpfMap(self.bpf["rx"].map_fd, ctypes.c_uint32, ctypes.c_uint64, owned=False)

    def count(self) -> int:
        return sum(v.value for v in self.rx.get(0))

    def close(self) -> None:
        from .loader import attach_pass, detach
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


def _cpu_split() -> list[list[int]]:
    """Per CPU: user+nice, system, softirq, idle+iowait, in clock ticks."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:]]
                out.append([v[0] + v[1], v[2], v[6], v[3] + v[4], sum(v[:8])])
    return out


def _cpu_shares(before: list, after: list) -> list[dict]:
    shares = []
    for b, a in zip(before, after):
        total = max(1, a[4] - b[4])
        shares.append({k: round((a[i] - b[i]) / total, 3)
                       for i, k in enumerate(("user", "system", "softirq", "idle"))})
    return shares


def _measure(tb_show: dict, sink: _Sink, frame: bytes, flows: int, duration: float, pids: list[int]) -> dict:
    src_ns = tb_show["hosts"]["src"]["netns"]
    gen = subprocess.Popen([sys.executable, "-m", "nfactor_xdp.bench", "--gen", src_ns, str(flows),
                            str(duration), frame.hex()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    if not gen.stdout.readline():
        raise RuntimeError(f"generator failed: {gen.stderr.read()[-500:]}")
    c0 = sink.count()
    u0, s0 = _cpu_times(pids)
    cpu0 = _cpu_split()
    out, err = gen.communicate("go\n", timeout=duration + 60)
    if gen.returncode != 0:
        raise RuntimeError(f"generator failed: {err[-500:]}")
    g = json.loads(out.strip().splitlines()[-1])
    # frames still in flight drain within a few ms; poll until the count settles
    last, deadline = sink.count(), time.monotonic() + 2
    while time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval while the count settles
        now = sink.count()
        if now == last:
            break
        last = now
    u1, s1 = _cpu_times(pids)
    cpu1 = _cpu_split()
    got = last - c0
    return {"offered": g["sent"], "forwarded": got, "seconds": g["seconds"],
            "offered_mpps": g["sent"] / g["seconds"] / 1e6, "forwarded_mpps": got / g["seconds"] / 1e6,
            "runtime_cpu_user_s": round(u1 - u0, 3), "runtime_cpu_system_s": round(s1 - s0, 3),
            "cpu_shares": _cpu_shares(cpu0, cpu1)}


def run_forward_bench(counts: list[int], duration: float = 5.0, flows: int = 64, size: int = 64,
                      name: str = "bench", batch: int = 64) -> dict:
    if os.geteuid() != 0:
        raise SystemExit("error: the benchmark needs root")
    tb = Testbed(TestbedConfig(name=name))
    if tb.is_up():
        nodectl.stop(name)
        tb.down()
    tb.up()
    result = {"benchmark": "forward", "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                                  "cpu": _cpu_model()},
              "load": {"flows": flows, "frame_bytes": size, "generator_cpu": GEN_CPU,
                       "duration_s": duration, "mode": "XDP live frames, as fast as one CPU can",
                       "runtime_batch": batch},
              "measurements": []}
    sink = None
    try:
        show = tb.show()
        frame = _frame(show, size)
        sink = _Sink(show["hosts"]["dst"]["netns"], show["hosts"]["dst"]["ifname"])
        node_ns = show["namespaces"]["node"]
        runs = [("xdp-ceiling (bypass)", 1, True)] + [(f"{n} runtime{'s' if n > 1 else ''}", n, False)
                                                        for n in counts]
        ceiling = None
        for label, n, bypass in runs:
            cores = [1] if n == 1 else []  # one runtime: keep it off the generator's CPU
            cfg = NodeConfig(name=name, netns=node_ns, runtimes=n, cores=cores, batch=batch)
            state = nodectl.start(cfg)
            try:
                with NodeMaps(name) as maps:
                    maps.write_config(mode=L.C["NFX_MODE_BYPASS" if bypass else "NFX_MODE_FLOWS"])
                pids = [r["pid"] for r in state["runtimes"]]
                m = _measure(show, sink, frame, flows, duration, pids)
                st = nodectl.status(name)
                m["runtime_idle_waits"] = sum(r.get("idle_waits") or 0 for r in st["runtimes"])
                m["runtime_kicks"] = sum((r.get("xsk") or {}).get("tx_kicks", 0) for r in st["runtimes"])
                m["runtime_kick_errors"] = sum((r.get("xsk") or {}).get("tx_kick_errors", 0) for r in st["runtimes"])
                m["xsk_rx_dropped"] = sum((r.get("xsk") or {}).get("rx_dropped", 0) for r in st["runtimes"])
                m["switch_drops"] = {k: v for k, v in st["switch"].items() if k.startswith("drop_") and v}
                m["redirect_err"] = st["switch"]["redirect_err"]
                m["socket_full"] = st["switch"]["socket_full"]
                m["xmit_drop"] = st["switch"]["xmit_drop"]
            finally:
                nodectl.stop(name)
            m.update(label=label, runtimes=0 if bypass else n, cores=cores or "all")
            if bypass:
                ceiling = m["forwarded_mpps"]
            m["ratio_to_ceiling"] = m["forwarded_mpps"] / ceiling if ceiling else 0.0
            result["measurements"].append(m)
    finally:
        if sink:
            sink.close()
        nodectl.stop(name)
        tb.down()
    return result


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--gen":
    _, _, ns, nflows, dur, frame_hex = sys.argv
    print(json.dumps(generate(ns, "eth0", bytes.fromhex(frame_hex), int(nflows), float(dur))))
