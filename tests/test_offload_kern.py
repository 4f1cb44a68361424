"""The kernel half of offload (docs/offload.md) with BPF_PROG_TEST_RUN: a
flow placed by a first frame, a slot written through the mmap-ed offloads
array, the flow entry pointed at it; then what the switch does with the
flow's frames (forward to the opposite port, drop, punt, buckets, stale
slots) and what it counts in the slot."""
import contextlib
import os
import time
from types import SimpleNamespace

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from nfactor_xdp.kern import layouts as L
from nfactor_xdp.kern.bpfsys import map_info, obj_get
from nfactor_xdp.kern.offloads import BPF_F_MMAPABLE, DROP, FORWARD, NONE, OffloadSlots
from nfactor_xdp.dataplane.packet import classify
from tests.test_vswitch import XDP_DROP, XDP_REDIRECT, _switch_in_netns

pytestmark = [pytest.mark.root, pytest.mark.netns]

A4, B4 = "10.78.0.1", "10.78.0.2"   # A4 < B4: A4's frames go lo -> hi (direction 0)
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
TAG = L.C["NFX_INGRESS_TAG"]


def tcp(flags: str = "A", reply: bool = False, payload: bytes = b"") -> bytes:
    ip = IP(src=B4, dst=A4) if reply else IP(src=A4, dst=B4)
    sport, dport = (80, 41000) if reply else (41000, 80)
    return bytes(Ether(src="02:78:00:00:00:01", dst="02:78:00:00:00:02") / ip
                 / TCP(sport=sport, dport=dport, flags=flags) / payload)


def udp(reply: bool = False, payload: bytes = b"u") -> bytes:
    ip = IP(src=B4, dst=A4) if reply else IP(src=A4, dst=B4)
    sport, dport = (53, 5300) if reply else (5300, 53)
    return bytes(Ether(src="02:78:00:00:00:01", dst="02:78:00:00:00:02") / ip / UDP(sport=sport, dport=dport) / payload)


def spec(action=FORWARD, punt=0, pps=0, burst=0, bps=0, byte_burst=0):
    return SimpleNamespace(action=action, punt_tcp_flags=punt, pps=pps, burst=burst, bps=bps, byte_burst=byte_burst)


class Offloaded:
    """The switch with the offloads array open, and one flow at a time."""

    def __init__(self, sw, slots: OffloadSlots):
        self.sw, self.slots = sw, slots

    def reset(self):
        self.sw.reset()
        for rt in (0, 1):
            for i in self.slots.range(rt)[:4]:
                self.slots.clear_action(i)
                self.slots.zero(i)

    def place(self, frame: bytes) -> tuple[bytes, int]:
        """Place the frame's flow with it (it goes to a runtime); its key and runtime."""
        assert self.sw.run(frame) == XDP_REDIRECT
        key = classify(frame)[1]
        return key, self.sw.placement()[key.hex()]["runtime"]

    def offload(self, frame: bytes, s, owner: int | None = None, nth: int = 1) -> tuple[bytes, int, int]:
        """Place the flow, write the nth slot of its runtime's range (for
        `owner`: the runtime by default), point the entry at it."""
        key, rt = self.place(frame)
        slot = self.slots.range(rt)[nth]
        self.slots.write(slot, s, rt if owner is None else owner)
        assert self.sw.maps.set_offload(key, slot + 1)
        return key, rt, slot

    def counters(self) -> dict:
        return self.sw.counters()

    @contextlib.contextmanager
    def only_port(self, name: str):
        """Empty every devmap slot but external port `name`'s: a redirect
        that succeeds went there."""
        tx = self.sw.maps["tx_ports"]
        saved = {k.value: v.value for k, v in tx.items()}
        keep = L.C[f"NFX_SLOT_{name.upper()}"]
        try:
            for slot in saved:
                if slot != keep:
                    tx.delete(slot)
            yield
        finally:
            for slot, ifindex in saved.items():
                self.sw.maps.set_slot(slot, ifindex)


@pytest.fixture(scope="module")
def loaded():
    with _switch_in_netns() as sw:
        slots = OffloadSlots(sw.node.cfg.name)
        try:
            yield Offloaded(sw, slots)
        finally:
            slots.close()


@pytest.fixture
def off(loaded):
    loaded.reset()
    return loaded


def test_the_offloads_array_is_mmapable_and_shared_with_the_syscall_view(off):
    fd = obj_get(f"{off.sw.node.maps.dir}/offloads")
    try:
        info = map_info(fd)
    finally:
        os.close(fd)
    assert info["flags"] & BPF_F_MMAPABLE and info["max_entries"] == L.C["NFX_MAX_OFFLOADS"]
    assert off.slots.size == L.C["NFX_MAX_OFFLOADS"]
    slot = off.slots.range(1)[2]
    assert slot == L.C["NFX_OFFLOADS_PER_RUNTIME"] + 2
    off.slots.write(slot, spec(DROP, punt=FIN | RST, pps=7, burst=3), 1)
    seen = off.sw.maps["offloads"].get(slot)   # the bpf(2) lookup sees the mmap's stores
    assert (seen.action, seen.runtime, seen.punt_tcp_flags, seen.pps, seen.burst) == (DROP, 1, FIN | RST, 7, 3)
    assert seen.tokens == 3 * L.C["NFX_NANOTOKENS"]
    seen.packets[1] = 9
    off.sw.maps["offloads"].set(slot, seen)     # and the mmap sees the syscall's
    assert off.slots.read(slot).packets == (0, 9)
    assert off.slots.active(1) == [slot]
    with pytest.raises(ValueError, match="in use"):
        off.slots.write(slot, spec(), 1)
    off.slots.clear_action(slot)
    assert off.slots.active(1) == []


@pytest.mark.parametrize("first", ["ext0", "ext1"])
def test_forward_goes_out_of_the_opposite_port_and_counts_each_direction(off, first):
    """Both directions, whichever side placed the flow: each frame leaves
    opposite its ingress, untouched (no tag), counted in its canonical
    direction (A4's frames lo -> hi) with its exact length."""
    orig = [tcp(payload=b"x" * n) for n in (0, 10, 100)]
    reply = [tcp(reply=True, payload=b"y" * n) for n in (1, 2, 3, 4)]
    placing = orig[0] if first == "ext0" else reply[0]
    key, rt, slot = off.offload(placing, spec())
    before = off.counters()
    t0 = time.monotonic_ns()
    with off.only_port("ext1"):
        for f in orig:
            r = off.sw.run_full(f, "ext0")
            assert (r["retval"], r["data"]) == (XDP_REDIRECT, f)
    with off.only_port("ext0"):
        for f in reply:
            r = off.sw.run_full(f, "ext1")
            assert (r["retval"], r["data"]) == (XDP_REDIRECT, f)
    after = off.counters()
    counts = off.slots.read(slot)
    assert counts.packets == (3, 4)
    assert counts.bytes == (sum(map(len, orig)), sum(map(len, reply)))
    assert counts.bucket_dropped == counts.bucket_dropped_bytes == (0, 0)
    assert t0 <= counts.last_seen_ns <= time.monotonic_ns()
    assert after["off_forward"] - before["off_forward"] == 7
    assert after["to_runtime"] == before["to_runtime"] and after["drop_no_port"] == before["drop_no_port"]
    assert off.sw.placement()[key.hex()]["offload"] == slot + 1
    assert off.sw.maps.runtime_table()[rt]["switch"]["to_rt_packets"] == 1  # the placing frame only


def test_drop_drops_and_counts(off):
    _, _, slot = off.offload(udp(), spec(DROP))
    for f, port in ((udp(), "ext0"), (udp(payload=b"abc"), "ext0"), (udp(reply=True), "ext1")):
        assert off.sw.run(f, port) == XDP_DROP
    counts = off.slots.read(slot)
    assert counts.packets == (2, 1) and counts.bytes == (len(udp()) + len(udp(payload=b"abc")), len(udp(reply=True)))
    c = off.counters()
    assert c["off_drop"] == 3 and c["off_forward"] == 0 and c["to_runtime"] == 1


def test_tcp_frames_with_a_punt_flag_go_to_the_runtime(off):
    _, _, slot = off.offload(tcp("S"), spec(punt=FIN | RST | SYN))
    punted = [(tcp("FA"), "ext0"), (tcp("R"), "ext0"), (tcp("S"), "ext0"),
              (tcp("SA", reply=True), "ext1"), (tcp("RA", reply=True), "ext1")]
    for f, port in punted:
        r = off.sw.run_full(f, port)
        # to the runtime: the ingress tag in front
        assert r["retval"] == XDP_REDIRECT and r["data"] == bytes([TAG | (port == "ext1")]) + f
    for f, port in ((tcp("A"), "ext0"), (tcp("PA", payload=b"data"), "ext0"), (tcp("A", reply=True), "ext1")):
        r = off.sw.run_full(f, port)
        assert (r["retval"], r["data"]) == (XDP_REDIRECT, f)
    c = off.counters()
    assert c["off_punt"] == 5 and c["off_forward"] == 3 and c["to_runtime"] == 1 + 5
    assert off.slots.read(slot).packets == (2, 1)   # punted frames are the runtime's to count


def test_a_udp_flow_is_never_punted(off):
    off.offload(udp(), spec(punt=0xFF))
    assert off.sw.run_full(udp(), "ext0")["data"] == udp()
    assert off.counters()["off_punt"] == 0 and off.counters()["off_forward"] == 1


@pytest.mark.parametrize("why", ["other runtime", "action none"])
def test_a_stale_slot_sends_the_frame_to_the_runtime(off, why):
    key, rt = off.place(udp())
    slot = off.slots.range(rt)[1]
    off.slots.write(slot, spec(), 1 - rt if why == "other runtime" else rt)
    if why == "action none":
        off.slots.clear_action(slot)
    assert off.sw.maps.set_offload(key, slot + 1)
    r = off.sw.run_full(udp(), "ext0")
    assert r["retval"] == XDP_REDIRECT and r["data"] == bytes([TAG]) + udp()
    c = off.counters()
    assert c["off_stale"] == 1 and c["off_forward"] == 0 and c["to_runtime"] == 2
    assert not off.slots.read(slot)


def test_clearing_the_action_in_place_revokes_at_the_next_frame(off):
    _, _, slot = off.offload(tcp(), spec())
    assert off.sw.run_full(tcp(), "ext0")["data"] == tcp()
    off.slots.clear_action(slot)
    assert off.sw.run_full(tcp(), "ext0")["data"] == bytes([TAG]) + tcp()
    assert off.slots.read(slot).packets == (1, 0)
    c = off.counters()
    assert c["off_forward"] == 1 and c["off_stale"] == 1


def test_a_packet_bucket_passes_its_burst_then_drops(off):
    """1 packet per second: no token comes back during the test, so exactly
    `burst` frames pass (both directions share the bucket)."""
    burst, sent = 5, 12
    _, _, slot = off.offload(udp(), spec(pps=1, burst=burst))
    verdicts = []
    for i in range(sent):
        reply = i % 3 == 2
        verdicts.append(off.sw.run(udp(reply=reply), "ext1" if reply else "ext0"))
    assert verdicts == [XDP_REDIRECT] * burst + [XDP_DROP] * (sent - burst)
    counts = off.slots.read(slot)
    assert sum(counts.packets) == sent and counts.packets == (8, 4)
    assert sum(counts.bucket_dropped) == sent - burst and counts.bucket_dropped == (4, 3)
    assert counts.bucket_dropped_bytes == (4 * len(udp()), 3 * len(udp(reply=True)))
    c = off.counters()
    assert c["off_forward"] == burst and c["off_bucket_drop"] == sent - burst


def test_a_byte_bucket_passes_what_its_bytes_allow(off):
    """1 byte per second: a byte_burst of 3.5 frames passes 3 of them; a
    smaller frame still fits in what is left."""
    big, small = udp(payload=b"b" * 200), udp(payload=b"s")
    _, _, slot = off.offload(udp(), spec(bps=1, byte_burst=3 * len(big) + len(big) // 2))
    verdicts = [off.sw.run(big, "ext0") for _ in range(5)]
    assert verdicts == [XDP_REDIRECT] * 3 + [XDP_DROP] * 2
    assert off.sw.run(small, "ext0") == XDP_REDIRECT
    counts = off.slots.read(slot)
    assert counts.packets == (6, 0) and counts.bytes == (5 * len(big) + len(small), 0)
    assert counts.bucket_dropped == (2, 0) and counts.bucket_dropped_bytes == (2 * len(big), 0)
    c = off.counters()
    assert c["off_forward"] == 4 and c["off_bucket_drop"] == 2


def test_both_buckets_a_frame_needs_both(off):
    """Bytes short (udp) or packets short (tcp): either bucket drops."""
    off.offload(udp(), spec(pps=1, burst=10, bps=1, byte_burst=2 * len(udp())), nth=1)
    assert [off.sw.run(udp(), "ext0") for _ in range(4)] == [XDP_REDIRECT] * 2 + [XDP_DROP] * 2
    off.offload(tcp(), spec(pps=1, burst=2, bps=1, byte_burst=100 * len(tcp())), nth=2)
    assert [off.sw.run(tcp(), "ext0") for _ in range(4)] == [XDP_REDIRECT] * 2 + [XDP_DROP] * 2
    assert off.counters()["off_bucket_drop"] == 4


def test_a_bucket_refills_with_time(off):
    """10 packets per second, burst 1: the second frame right after the first
    finds no token; 150 ms later there is one again."""
    _, _, slot = off.offload(udp(), spec(pps=10, burst=1))
    assert off.sw.run(udp(), "ext0") == XDP_REDIRECT
    assert off.sw.run(udp(), "ext0") == XDP_DROP
    time.sleep(0.15)
    assert off.sw.run(udp(), "ext0") == XDP_REDIRECT
    assert off.slots.read(slot).bucket_dropped == (1, 0)


def test_a_flow_replaced_from_a_gone_runtime_loses_its_offload(off):
    key, rt, slot = off.offload(udp(), spec(DROP))
    off.sw.maps.set_runtime_state(rt, L.C["NFX_RT_NONE"])
    try:
        r = off.sw.run_full(udp(), "ext0")
        assert r["retval"] == XDP_REDIRECT and r["data"] == bytes([TAG]) + udp()
        entry = off.sw.placement()[key.hex()]
        assert entry["runtime"] == 1 - rt and entry["offload"] == 0
        assert not off.slots.read(slot)
    finally:
        off.sw.maps.set_runtime_state(rt, L.C["NFX_RT_RUNNING"])


def test_set_offload_keeps_the_entry_and_never_recreates_it(off):
    key, rt = off.place(udp())
    before = off.sw.maps["flows"].get(L.FlowKeyStruct.from_buffer_copy(key))
    assert off.sw.maps.set_offload(key, 42)
    after = off.sw.maps["flows"].get(L.FlowKeyStruct.from_buffer_copy(key))
    assert (after.runtime, after.orig_dir, after.created_ns, after.offload) == \
        (before.runtime, before.orig_dir, before.created_ns, 42)
    assert not off.sw.maps.set_offload(key, 7, runtime=1 - rt)   # placed elsewhere: left alone
    assert off.sw.maps["flows"].get(L.FlowKeyStruct.from_buffer_copy(key)).offload == 42
    off.sw.clear_flows()
    assert not off.sw.maps.set_offload(key, 1)
    assert not off.sw.placement()


def test_a_slot_index_past_the_array_is_stale(off):
    key, _ = off.place(udp())
    assert off.sw.maps.set_offload(key, L.C["NFX_MAX_OFFLOADS"] + 1)
    assert off.sw.run_full(udp(), "ext0")["data"] == bytes([TAG]) + udp()
    assert off.counters()["off_stale"] == 1


def test_unknown_actions_and_bad_buckets_are_refused(off):
    slot = off.slots.range(0)[3]
    with pytest.raises(ValueError):
        off.slots.write(slot, spec(action=7), 0)
    with pytest.raises(ValueError):
        off.slots.write(slot, spec(pps=5, burst=0), 0)
    with pytest.raises(ValueError):
        off.slots.write(slot, spec(bps=1 << 32, byte_burst=1500), 0)
    off.slots.write(slot, spec(action="drop"), 0)
    assert off.slots.action(slot) == DROP
    off.slots.clear_action(slot)
    assert off.slots.action(slot) == NONE


def test_a_bucket_can_start_where_the_runtime_left_it(off):
    """An NF's bucket offloaded mid-flow keeps its tokens: 2.5 of 10 pass 2."""
    s = spec(pps=1, burst=10)
    s.tokens = 2.5
    _, _, slot = off.offload(udp(), s)
    assert [off.sw.run(udp(), "ext0") for _ in range(4)] == [XDP_REDIRECT] * 2 + [XDP_DROP] * 2
    assert 0.5 <= off.slots.bucket(slot)["tokens"] < 0.6


def test_fractional_rates_are_refused_whole_floats_taken(off):
    slot = off.slots.range(0)[3]
    with pytest.raises(ValueError, match="whole"):
        off.slots.write(slot, spec(pps=0.5, burst=1), 0)
    off.slots.write(slot, spec(pps=1000.0, burst=100.0), 0)
    assert (off.slots.slots[slot].pps, off.slots.slots[slot].burst) == (1000, 100)


def test_the_revoke_protocol_gives_exact_final_counts(off):
    """docs/offload.md's revoke, step by step with a real grace period: clear
    the action, wait, read the final counts (exactly the frames the switch
    handled), clear the entry, zero the slot; the flow is back inline."""
    from nfactor_xdp.kern import grace
    key, rt, slot = off.offload(tcp(), spec(punt=FIN | RST))
    for f, port in ((tcp(), "ext0"), (tcp(payload=b"12345"), "ext0"), (tcp(reply=True), "ext1")):
        assert off.sw.run_full(f, port)["data"] == f
    off.slots.clear_action(slot)
    grace.wait()
    final = off.slots.read(slot)
    assert (final.packets, final.bytes) == ((2, 1), (2 * len(tcp()) + 5, len(tcp(reply=True))))
    assert final - off.slots.read(slot) == type(final)(last_seen_ns=final.last_seen_ns) and not final - final
    assert off.sw.maps.set_offload(key, 0)
    off.slots.zero(slot)
    assert not off.slots.read(slot) and off.slots.read(slot).last_seen_ns == 0
    assert off.sw.run_full(tcp(), "ext0")["data"] == bytes([TAG]) + tcp()
    assert off.counters()["off_stale"] == 0  # an entry without a slot costs one branch, no lookup


# --- observe mode: copies of forwarded frames in the runtime's observe ring ------------------
def observe_spec(mode="all", **kw):
    return SimpleNamespace(**vars(spec(**kw)), observe=mode)


@contextlib.contextmanager
def ring_of(off, rt: int, size: int | None = None):
    from nfactor_xdp.kern.observe import ObserveRing
    ring = ObserveRing(off.sw.node.cfg.name, rt, **({"size": size} if size else {}))
    try:
        yield ring
    finally:
        ring.close()


def drained(ring) -> list:
    got = []
    ring.drain(lambda slot, d, frame: got.append((slot, d, bytes(frame))))
    return got


def test_observe_copies_each_forwarded_frame_in_order_and_still_forwards_it(off):
    """Observe mode: the original leaves by the opposite port untouched; an
    exact copy (no tag), with the slot and the canonical direction, lands in
    the owning runtime's ring, in the order the frames came; small and full
    sized frames alike."""
    frames = [udp(payload=bytes([i]) * n) for i, n in enumerate((1, 200, 1400, 3))] + [udp(reply=True)]
    key, rt, slot = off.offload(udp(), observe_spec("all"))
    with ring_of(off, rt) as ring:
        drained(ring)
        for f in frames:
            with off.only_port("ext0" if f is frames[-1] else "ext1"):
                r = off.sw.run_full(f, "ext1" if f is frames[-1] else "ext0")
            assert r["retval"] == XDP_REDIRECT and r["data"] == f
        got = drained(ring)
    assert [g[2] for g in got] == frames
    assert {g[0] for g in got} == {slot} and [g[1] for g in got] == [0, 0, 0, 0, 1]
    counts = off.slots.read(slot)
    assert counts.observed == (4, 1) and counts.observe_lost == (0, 0) and counts.packets == (4, 1)
    c = off.counters()
    assert c["off_observed"] == 5 and c["off_observe_lost"] == 0 and c["off_forward"] == 5


def test_observe_payload_copies_only_frames_with_payload(off):
    key, rt, slot = off.offload(tcp("S"), observe_spec("payload"))
    with ring_of(off, rt) as ring:
        drained(ring)
        for f in (tcp("A"), tcp("PA", payload=b"GET / HTTP/1.1\r\n\r\n"), tcp("A", reply=True),
                  tcp("PA", reply=True, payload=b"HTTP/1.1 200 OK\r\n\r\n")):
            assert off.sw.run(f, "ext1" if f[26:30] == bytes([10, 78, 0, 2]) else "ext0") == XDP_REDIRECT
        got = drained(ring)
    assert [g[2][-4:] for g in got] == [b"\r\n\r\n", b"\r\n\r\n"]
    assert off.slots.read(slot).observed == (1, 1) and off.slots.read(slot).packets == (2, 2)


def test_copies_a_ring_cannot_take_are_counted_lost_and_the_frames_still_forwarded(off):
    """No ring (the runtime never made one, or is gone): every copy lost,
    counted.  A full ring (a stalled runtime): the copies past its room lost,
    counted; every frame forwarded all the same; the ring's copies are the
    first ones, in order."""
    key, rt, slot = off.offload(udp(), observe_spec("all"))
    off.sw.maps["observers"].delete(rt)
    assert off.sw.run(udp(), "ext0") == XDP_REDIRECT
    assert off.slots.read(slot).observe_lost == (1, 0) and off.counters()["off_observe_lost"] == 1
    from nfactor_xdp.kern.bpfsys import prog_test_run as run, xdp_md as md
    with ring_of(off, rt, size=64 * 1024) as ring:
        n = 1000  # 1000 copies of 256 + 16 bytes: 272,000 bytes into a 64 KiB ring
        f = udp(payload=b"z" * 40)
        r = run(off.sw.node.progs.fns["vswitch"].fd, f, ctx=md(len(f), off.sw.ifindex["ext0"]), repeat=n)
        assert r["retval"] == XDP_REDIRECT
        got = drained(ring)
    counts = off.slots.read(slot)
    assert counts.packets == (1 + n, 0)
    assert counts.observed[0] == len(got) and 0 < len(got) < n
    assert counts.observe_lost[0] == 1 + n - len(got)
    assert off.counters()["off_forward"] == 1 + n


def test_observe_payload_filter_on_ipv6(off):
    from scapy.layers.inet6 import IPv6

    def tcp6(flags, payload=b""):
        return bytes(Ether(src="02:78:00:00:00:01", dst="02:78:00:00:00:02") / IPv6(src="fd78::1", dst="fd78::2")
                     / TCP(sport=41000, dport=80, flags=flags) / payload)
    key, rt, slot = off.offload(tcp6("S"), observe_spec("payload"))
    with ring_of(off, rt) as ring:
        drained(ring)
        for f in (tcp6("A"), tcp6("PA", b"GET / HTTP/1.1\r\n\r\n"), tcp6("A")):
            assert off.sw.run(f, "ext0") == XDP_REDIRECT
        got = drained(ring)
    assert [g[2] for g in got] == [tcp6("PA", b"GET / HTTP/1.1\r\n\r\n")]
    assert off.slots.read(slot).observed == (1, 0) and off.slots.read(slot).packets == (3, 0)
