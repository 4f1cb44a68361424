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
import socket
import struct
import subprocess
import sys
import time

from ...control.processes import ISOLATED_CWD, module_command
from ...kern import netns
from ...kern.bpfsys import BpfMap
from ...kern.layouts import BPF_DIR

GEN_CPU = 0
# The paced generator spins in the kernel between frames (bench_gen.c drops the runs that
# come early), taking its CPU whatever the rate.  At the lowest priority it yields that CPU to
# a runtime placed there (2 CPUs: runtime 1) whenever the runtime has work, and its
# frames still go out on time while it waits less than the pacing's catch-up allows; a trial's
# rates are always the frames it really sent.
GEN_NICE = 19
CALL_SECONDS = 0.25  # length of one generator call: setting up live frames costs ~20 ms a call
HTTP_REQUEST = b"GET /bench HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: nfactor-bench\r\n\r\n"
IPPROTO_TCP, IPPROTO_UDP = 6, 17
TCP_PSH_ACK = 0x18
ETH_IP_UDP = 14 + 20 + 8


def _compile(name: str):
    from bcc import BPF
    return BPF(src_file=str(BPF_DIR / name), cflags=[f"-I{BPF_DIR}"])


def _checksum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def make_frame(src: dict, dst: dict, *, tcp: bool, dport: int, size: int = 64) -> bytes:
    """The template frame from host `src` to host `dst` (the testbed's `show`
    entries); the generator rewrites its source port and TCP sequence number.
    UDP: `size` bytes in all (without FCS), the IP and UDP lengths saying so;
    TCP: one HTTP request, whatever `size`.  L4 checksums are 0: UDP's means
    none, TCP's is checked by nobody on the way (the sink drops in XDP)."""
    if tcp:
        proto = IPPROTO_TCP
        l4 = struct.pack("!HHIIBBHHH", 0, dport, 1, 1, 5 << 4, TCP_PSH_ACK, 65535, 0, 0) + HTTP_REQUEST
    else:
        proto = IPPROTO_UDP
        pad = max(0, size - ETH_IP_UDP)
        l4 = struct.pack("!HHHH", 0, dport, 8 + pad, 0) + bytes(pad)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0,
                               _addr(src), _addr(dst)))
    ip[10:12] = struct.pack("!H", _checksum(bytes(ip)))
    eth = bytes.fromhex(dst["mac"].replace(":", "")) + bytes.fromhex(src["mac"].replace(":", "")) + b"\x08\x00"
    return eth + bytes(ip) + l4


def _addr(host: dict) -> bytes:
    return socket.inet_aton(host["ipv4"].split("/")[0])


def generator_main(ns: str, ifname: str) -> None:
    """The generator process, in the source namespace, pinned to GEN_CPU.
    Reads JSON commands on stdin, answers one JSON line each."""
    from bcc import BPF

    from ...kern import bpfsys
    os.sched_setaffinity(0, {GEN_CPU})
    os.setpriority(os.PRIO_PROCESS, 0, GEN_NICE)
    b = _compile("bench_gen.c")
    fn = b.load_func("gen", BPF.XDP)
    params = b["params"]
    pace_type = type(b["pace"].Leaf._type_())
    pace_map = BpfMap(b["pace"].map_fd, ctypes.c_uint32, pace_type, owned=False)
    prog_id = bpfsys.prog_info(fn.fd)["id"]
    netns.enter(ns)
    ifindex = socket.if_nametoindex(ifname)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") != "run":
            break
        frame = bytes.fromhex(cmd["frame"]) + b"\0"  # a spare byte, cut by the program on every run (bench_gen.c)
        p = params[ctypes.c_int(0)]
        p.base, p.flows, p.tcp, p.step = cmd["base"], cmd["flows"], int(cmd["tcp"]), len(HTTP_REQUEST)
        p.gap_ns = int(1e9 / cmd["rate"]) if cmd["rate"] else 0
        p.prog_id, p.ifindex, p.tgid = prog_id, ifindex, os.getpid()
        params[ctypes.c_int(0)] = p
        # each run from a clean state, pacing from now: flow 0, sequence number 1, or (first) where a run
        # of the same flows left off (a warm-up's flows go on with the next request, not a retransmission)
        fresh = (pace_type * bpfsys.possible_cpus())()
        for v in fresh:
            v.seq = cmd.get("first", 0)
        pace_map.set(0, fresh)
        ctx = bpfsys.xdp_md(len(frame), ifindex)
        cpu0, start = os.times(), time.monotonic()
        repeat = 100_000
        while True:
            left = cmd["seconds"] - (time.monotonic() - start)
            if left <= 0:
                break
            t0 = time.monotonic()
            bpfsys.prog_test_run(fn.fd, frame, repeat=repeat, ctx=ctx, flags=bpfsys.BPF_F_TEST_XDP_LIVE_FRAMES,
                                 data_out_size=0, batch_size=64)
            took = max(1e-4, time.monotonic() - t0)
            # size the next call to about CALL_SECONDS (or what is left of the trial)
            repeat = max(10_000, int(repeat * min(CALL_SECONDS, max(0.02, left - took)) / took))
        seconds, cpu1 = time.monotonic() - start, os.times()
        pace = pace_map.get(0)
        print(json.dumps({"sent": sum(v.sent for v in pace), "failed": sum(v.failed for v in pace), "seconds": seconds,
                          "cpu_user_s": round(cpu1.user - cpu0.user, 3),
                          "cpu_system_s": round(cpu1.system - cpu0.system, 3)}), flush=True)


class Generator:
    """The generator process, driven from the benchmark."""

    def __init__(self, ns: str, ifname: str = "eth0"):
        self.p = subprocess.Popen(module_command("nfactor_xdp.tools.bench.load", "--gen", ns, ifname),
                                  cwd=ISOLATED_CWD, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        if not self.p.stdout.readline():
            raise RuntimeError(f"generator failed: {self.p.stderr.read()[-500:]}")

    def run(self, frame: bytes, *, rate: float, seconds: float, base: int, flows: int, tcp: bool,
            first: int = 0) -> dict:
        """first: frames of these flows sent by an earlier run (their streams go on)."""
        self.p.stdin.write(json.dumps({"cmd": "run", "frame": frame.hex(), "rate": rate, "seconds": seconds,
                                       "base": base, "flows": flows, "tcp": tcp, "first": first}) + "\n")
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
    """Counts what reaches the sink host's `ifname`: frames of the trial's
    flows (set by `expect`) and, apart, everything else.  Gives the host its
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

    def expect(self, daddr: str, proto: int, dport: int, sport_lo: int, sport_hi: int) -> None:
        """From now on, count frames to daddr:dport from source ports sport_lo..sport_hi as the trial's."""
        t = self.bpf["match"]
        t[t.Key(0)] = t.Leaf(struct.unpack("=I", socket.inet_aton(daddr))[0], dport, sport_lo, sport_hi, proto, 0)

    def counts(self) -> tuple[int, int]:
        """(frames of the trial's flows, other frames) so far."""
        return tuple(sum(v.value for v in self.rx.get(i)) for i in (0, 1))

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
