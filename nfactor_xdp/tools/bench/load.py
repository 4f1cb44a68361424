"""The benchmarks' load and count: the generator (bpf/bench_gen.c run with
BPF_PROG_TEST_RUN in live-frames mode, in its own process pinned to GEN_CPU)
and the sink (bpf/bench_sink.c on the sink host's eth0).

The generator process is this module run as a program:
    python -m nfactor_xdp.tools.bench.load --gen NETNS IFNAME
It reads one JSON command a line on stdin and answers one JSON line each.
It only imports from kern/, so that it starts quickly.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time

from ...kern import netns
from ...kern.bpfsys import BpfMap
from ...kern.layouts import BPF_DIR

GEN_CPU = 0
CALL_SECONDS = 0.25  # length of one generator call: setting up live frames costs ~20 ms a call
HTTP_REQUEST = b"GET /bench HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: nfactor-bench\r\n\r\n"


def _compile(name: str):
    from bcc import BPF
    return BPF(src_file=str(BPF_DIR / name), cflags=[f"-I{BPF_DIR}"])


def make_frame(show: dict, size: int, tcp_http: bool) -> bytes:
    """The template frame from the testbed's src host to its dst host (the
    generator rewrites its source port and TCP sequence number)."""
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

    from ...kern.bpfsys import BPF_F_TEST_XDP_LIVE_FRAMES, prog_test_run, xdp_md
    os.sched_setaffinity(0, {GEN_CPU})
    b = _compile("bench_gen.c")
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
    """The generator process, driven from the benchmark."""

    def __init__(self, ns: str, ifname: str = "eth0"):
        self.p = subprocess.Popen([sys.executable, "-m", "nfactor_xdp.tools.bench.load", "--gen", ns, ifname],
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
    """Counts what reaches the sink host's `ifname`; gives the host its
    XDP_PASS program back on close."""

    def __init__(self, ns: str, ifname: str):
        from bcc import BPF

        from ...kern.loader import XDP_FLAGS_DRV_MODE, detach
        self.ns, self.ifname = ns, ifname
        self.bpf = _compile("bench_sink.c")
        fn = self.bpf.load_func("sink", BPF.XDP)
        with netns.entered(ns):
            detach(ifname)
            BPF.attach_xdp(ifname.encode(), fn, XDP_FLAGS_DRV_MODE)
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
        from ...kern.loader import attach_pass, detach
        with netns.entered(self.ns):
            detach(self.ifname)
        attach_pass(self.ifname, self.ns)
        self.bpf.cleanup()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--gen":
        sys.exit("usage: python -m nfactor_xdp.tools.bench.load --gen NETNS IFNAME")
    generator_main(sys.argv[2], sys.argv[3])
