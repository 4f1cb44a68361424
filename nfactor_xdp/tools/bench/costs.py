"""Where a runtime's time goes per frame, in Python: nanoseconds per frame
for the AF_XDP ring handling, the parser, the flow lookup and actor (fast
and slow path), and each NF alone and the full chain.  No kernel, no root:
the rings are bytearrays and the frames are fed to the runtime's own code.

What the kernel costs per frame (the copy-mode transmit path, ~70% of a
runtime's CPU) is not here: `bench forward` reports each runtime's user and
system CPU seconds for that.  Each figure is the median of several rounds;
an NF's cost is the chain's time minus the no-NF baseline on the same frames.
"""
from __future__ import annotations

import os
import platform
import statistics
import struct
import time

from ...dataplane.packet import classify
from ...dataplane.rules import Policy
from ...dataplane.runtime import Runtime
from ...formats.config import NodeConfig
from ...formats.headers import ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_PSH, V4_L4
from ...kern.xsk import XskSocket
from ...kern.xsk_rings import XDP_PACKET_HEADROOM, Ring
from .load import HTTP_REQUEST
NFS = ("flow_monitor", "firewall", "http_parser", "rate_limiter")
FULL_CHAIN = ("flow_monitor", "firewall", "http_parser")
_ETH = bytes(12)


def _ipv4(proto: int, l4: bytes) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return _ETH + struct.pack("!H", ETH_P_IP) + ip + l4


def udp_frame(size: int = 64) -> bytearray:
    l4 = struct.pack("!HHHH", 5000, 53, 8, 0) + bytes(max(0, size - V4_L4 - 8))
    return bytearray(_ipv4(IPPROTO_UDP, l4))


def udp6_frame() -> bytearray:
    l4 = struct.pack("!HHHH", 5000, 53, 8 + 16, 0) + bytes(16)
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(l4), IPPROTO_UDP, 64, bytes(15) + b"\1", bytes(15) + b"\2")
    return bytearray(_ETH + struct.pack("!H", ETH_P_IPV6) + ip6 + l4)


def http_frame() -> bytearray:
    """A TCP segment carrying a whole HTTP request; its sequence number is
    advanced before each use, so every frame is a new request to parse."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 1, 5 << 4, TCP_PSH | TCP_ACK, 65535, 0, 0)
    return bytearray(_ipv4(IPPROTO_TCP, tcp + HTTP_REQUEST))


def _rounds(fn, rounds: int) -> float:
    """Median ns per frame of `fn()` (which returns the frames it handled)."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        n = fn()
        out.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(out)


def ring_cost(frames: int, rounds: int, batch: int = 64) -> float:
    """ns per frame of XskSocket.forward_batch moving received frames to TX
    with a handler that forwards everything (the socket's own work)."""
    size, fs = 2048, 2048

    def pair(words: int, user_produces: bool):
        mem = bytearray(64 * 4 + size * words * 8)
        user = Ring(mem, size, 0, 64, 128 + 64, 128, words=words, user_produces=user_produces)
        kern = Ring(mem, size, 0, 64, 128 + 64, 128, words=words, user_produces=not user_produces)
        return user, kern
    (rx, k_rx), (tx, k_tx) = pair(2, False), pair(2, True)
    (fill, k_fill), (comp, k_comp) = pair(1, True), pair(1, False)
    sock = XskSocket._over_rings(bytearray(4096 * fs), rx, tx, fill, comp, frame_size=fs)
    forward = sock.forward_batch
    handler = bool  # forwards every (non-empty) frame

    def run() -> int:
        done, spent = 0, 0
        while done < frames:
            n = min(batch, k_fill.available(), k_rx.free())
            addrs = k_fill.consume(n)          # the kernel's receive: FILL -> RX (not timed)
            k_rx.push([w for a in addrs for w in (a + XDP_PACKET_HEADROOM, 64)])
            t0 = time.perf_counter_ns()
            done += forward(handler, batch)
            spent += time.perf_counter_ns() - t0
            sent = k_tx.consume(k_tx.available())  # the kernel's transmit: TX -> COMPLETION (not timed)
            k_comp.push(sent[0::2])
        run.spent = spent
        return done

    out = []
    for _ in range(rounds):
        n = run()
        out.append(run.spent / n)
    return statistics.median(out)


def _runtime(chain) -> Runtime:
    # a bucket no benchmark empties: the rate limiter's work, never its drops
    limits = {"rate_limiter": {"pps": 1e12, "burst": 10**12}}
    return Runtime(NodeConfig(name="costs"), 0,
                   policy=Policy.from_dict({"default_chain": list(chain), "nf_config": limits}))


def nf_check(rt: Runtime, expected: int) -> list[str]:
    """Did every NF of the runtime's one flow do its work on all `expected`
    frames?  The problems found (empty: valid)."""
    (actor,) = rt.flows.values()
    bad = []
    if sum(actor.packets) != expected or actor.dropped or actor.nf_errors:
        bad.append(f"actor saw {actor.packets}, dropped {actor.dropped}, nf_errors {actor.nf_errors}")
    for nf, state in zip(actor.nfs, actor.states):
        s = nf.summary(state)
        if nf.name == "http_parser" and (s["n_requests"] != expected or s["n_errors"]
                                         or not all(s["in_sync"].values())):
            bad.append(f"http_parser parsed {s['n_requests']} requests, {s['n_errors']} errors, in sync {s['in_sync']}")
        if nf.name == "flow_monitor" and sum(s["packets"].values()) != expected:
            bad.append(f"flow_monitor counted {s['packets']}")
    return bad


def handle_cost(chain, make_frame, frames: int, rounds: int, *, advance_seq: bool = False,
                problems: list | None = None) -> float:
    """ns per frame of Runtime.handle for one flow's frames through `chain`;
    what `nf_check` finds wrong afterwards goes to `problems`."""
    rt = _runtime(chain)
    frame = make_frame()
    view = memoryview(frame)
    handle = rt.handle
    seq_at = V4_L4 + 4
    step = len(HTTP_REQUEST)
    rt.handle(view)  # the flow's first frame: actor created, fast path learnt

    def run() -> int:
        seq = int.from_bytes(frame[seq_at:seq_at + 4], "big")
        for _ in range(frames):
            if advance_seq:
                seq = (seq + step) & 0xFFFFFFFF
                frame[seq_at:seq_at + 4] = seq.to_bytes(4, "big")
            handle(view)
        return frames
    ns = _rounds(run, rounds)
    if problems is not None:
        problems += [f"{'->'.join(chain) or 'no NF'}: {p}" for p in nf_check(rt, 1 + frames * rounds)]
    return ns


def run_costs_bench(frames: int = 50_000, rounds: int = 5) -> dict:
    problems: list[str] = []
    parse = _rounds(lambda: [classify(f) for f in [udp_frame()] * frames] and frames, rounds)
    udp_fast = handle_cost((), udp_frame, frames, rounds, problems=problems)
    udp_slow = handle_cost((), udp6_frame, frames, rounds, problems=problems)  # IPv6: the full parser every frame
    tcp_base = handle_cost((), http_frame, frames, rounds, advance_seq=True, problems=problems)
    nf_ns = {}
    for nf in NFS:
        tcp = nf == "http_parser"
        total = handle_cost((nf,), http_frame if tcp else udp_frame, frames, rounds, advance_seq=tcp,
                            problems=problems)
        nf_ns[nf] = {"frame": "tcp, a full HTTP request" if tcp else "udp, 64 bytes",
                     "total_ns": round(total, 1), "nf_ns": round(total - (tcp_base if tcp else udp_fast), 1)}
    chain_total = handle_cost(FULL_CHAIN, http_frame, frames, rounds, advance_seq=True, problems=problems)
    return {
        "valid": not problems, "problems": problems,
        "benchmark": "costs",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "method": {"frames_per_round": frames, "rounds": rounds, "figure": "median ns per frame over the rounds",
                   "not_included": "the kernel's work (copy-mode AF_XDP receive and transmit, veth, XDP): "
                                   "see bench forward's runtime_cpu_system_s"},
        "ns_per_frame": {
            "ring_handling": round(ring_cost(frames, rounds), 1),
            "parse_full": round(parse, 1),
            "lookup_and_actor_fast_path": round(udp_fast, 1),
            "lookup_and_actor_full_parser": round(udp_slow, 1),
            "tcp_baseline_no_nf": round(tcp_base, 1),
            "nfs": nf_ns,
            "full_chain": {"chain": list(FULL_CHAIN), "total_ns": round(chain_total, 1),
                           "nfs_ns": round(chain_total - tcp_base, 1)},
        },
    }
