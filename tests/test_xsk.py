"""Tests of nfactor_xdp.xsk.

Unit tests of the ring arithmetic run anywhere.  The root/netns tests build a
veth pair a<->b in a private namespace, redirect frames of a test ethertype
arriving on `a` into an AF_XDP socket and talk to it from `b` through
AF_PACKET sockets.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import time
import uuid

import pytest

from nfactor_xdp import xsk
from nfactor_xdp.xsk import U32, Ring, XskError, XskSocket

# --------------------------------------------------------------------------
# unit tests: ring index arithmetic on bytearray-backed memory
# --------------------------------------------------------------------------
PROD, CONS, FLAGS, DESC = 0, 64, 128, 192


def fake_ring(size=8, words=1, user_produces=True, start=0):
    mem = bytearray(DESC + size * words * 8)
    struct.pack_into("I", mem, PROD, start)
    struct.pack_into("I", mem, CONS, start)
    r = Ring(mem, size, PROD, CONS, DESC, FLAGS, words=words, user_produces=user_produces)
    return mem, r


def kernel_index(mem, off):
    return struct.unpack_from("I", mem, off)[0]


def set_kernel_index(mem, off, value):
    struct.pack_into("I", mem, off, value & U32)


def slot_words(mem, words, slot):
    return list(struct.unpack_from(f"{words}Q", mem, DESC + slot * words * 8))


def test_ring_rejects_non_power_of_two():
    with pytest.raises(ValueError):
        Ring(bytearray(4096), 6, PROD, CONS, DESC, None, words=1, user_produces=True)


def test_producer_ring_empty_full_and_free():
    mem, r = fake_ring(size=8)
    assert r.free() == 8 and r.outstanding() == 0
    assert r.push(list(range(100, 105))) == 5
    assert kernel_index(mem, PROD) == 5            # one store publishes the batch
    assert r.free() == 3 and r.outstanding() == 5
    r.push([1, 2, 3])
    assert r.free() == 0 and r.outstanding() == 8  # full
    set_kernel_index(mem, CONS, 8)                 # kernel consumed everything
    assert r.free() == 8 and r.outstanding() == 0
    assert [slot_words(mem, 1, i)[0] for i in range(8)] == [100, 101, 102, 103, 104, 1, 2, 3]


def test_consumer_ring_available_peek_release():
    mem, r = fake_ring(size=8, words=2, user_produces=False)
    assert r.available() == 0
    for i in range(3):   # the kernel produces three descriptors
        struct.pack_into("QQ", mem, DESC + i * 16, 4096 * i + 256, (60 + i) | (7 << 32))
    set_kernel_index(mem, PROD, 3)
    assert r.available() == 3
    assert r.peek(2) == [256, 60 | 7 << 32, 4352, 61 | 7 << 32]
    assert r.available() == 3                       # peek does not consume
    assert kernel_index(mem, CONS) == 0
    r.release(2)
    assert kernel_index(mem, CONS) == 2 and r.available() == 1
    assert r.consume(1) == [8448, 62 | 7 << 32]
    assert r.available() == 0 and kernel_index(mem, CONS) == 3


@pytest.mark.parametrize("start", [2**32 - 3, 2**32 - 1, 2**32 - 8])
def test_producer_wraps_at_2_32(start):
    size = 8
    mem, r = fake_ring(size=size, words=2, start=start)
    assert r.free() == size
    descs = [w for i in range(6) for w in (1000 + i, 60 + i)]
    assert r.push(descs) == 6
    assert kernel_index(mem, PROD) == (start + 6) & U32
    assert r.cached == (start + 6) & U32
    assert r.outstanding() == 6 and r.free() == 2
    for i in range(6):
        assert slot_words(mem, 2, (start + i) & (size - 1)) == [1000 + i, 60 + i]
    set_kernel_index(mem, CONS, start + 4)
    assert r.free() == 6 and r.outstanding() == 2


@pytest.mark.parametrize("start", [2**32 - 2, 2**32 - 5, 5])
def test_consumer_wraps_at_2_32(start):
    size = 8
    mem, r = fake_ring(size=size, words=1, user_produces=False, start=start)
    for i in range(7):
        struct.pack_into("Q", mem, DESC + ((start + i) & (size - 1)) * 8, 5000 + i)
    set_kernel_index(mem, PROD, start + 7)
    assert r.available() == 7
    assert r.peek(7) == [5000 + i for i in range(7)]
    r.release(7)
    assert kernel_index(mem, CONS) == (start + 7) & U32
    assert r.available() == 0


def test_batches_across_wrap_keep_order():
    """Many batches of odd sizes through a small ring whose indices start just
    below 2**32: what the consumer sees is exactly what the producer wrote."""
    size = 16
    mem = bytearray(DESC + size * 16)
    start = 2**32 - 37
    struct.pack_into("II", mem, 0, start, 0)
    struct.pack_into("I", mem, CONS, start)
    # one memory, two views on it: user as producer and a "kernel" consumer
    prod = Ring(mem, size, PROD, CONS, DESC, None, words=2, user_produces=True)
    cons = Ring(mem, size, PROD, CONS, DESC, None, words=2, user_produces=False)
    seq_out = seq_in = 0
    for batch in [1, 5, 16, 3, 7, 11, 16, 2, 9, 13] * 5:
        n = min(batch, prod.free())
        words = [w for i in range(seq_out, seq_out + n) for w in (i * 2048, i & 0xFFF)]
        prod.push(words)
        seq_out += n
        got = cons.consume(cons.available())
        for i in range(0, len(got), 2):
            assert got[i] == seq_in * 2048 and got[i + 1] == seq_in & 0xFFF
            seq_in += 1
    assert seq_in == seq_out > 2 * size
    assert kernel_index(mem, PROD) == (start + seq_out) & U32


def test_needs_wakeup_flag():
    mem, r = fake_ring()
    assert not r.needs_wakeup()
    set_kernel_index(mem, FLAGS, xsk.XDP_RING_NEED_WAKEUP)
    assert r.needs_wakeup()
    r2 = Ring(bytearray(4096), 8, PROD, CONS, DESC, None, words=1, user_produces=True)
    assert not r2.needs_wakeup()


def test_constructor_validates_arguments():
    with pytest.raises(ValueError):
        XskSocket(1, frame_size=3000)
    with pytest.raises(ValueError):
        XskSocket(1, ring_size=1000)


# --------------------------------------------------------------------------
# root tests: a real AF_XDP socket on a veth in a private namespace
# --------------------------------------------------------------------------
ETH_TYPE = 0x88B5                     # IEEE local experimental
MARK = b"NFXSKTEST"
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
DEADLINE = 5.0

XDP_SRC = r"""
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>

BPF_XSKMAP(xsks, 4);

int xsk_redirect(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return XDP_PASS;
    if (eth->h_proto != htons(0x88B5))
        return XDP_PASS;
    return xsks.redirect_map(0, XDP_DROP);
}

int xdp_pass(struct xdp_md *ctx)
{
    return XDP_PASS;
}
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


class Bed:
    """veth a<->b in namespace `ns`, XDP redirect on a, XDP_PASS on b."""

    def __init__(self, ns, bpf, idx_a, idx_b, mac_a, mac_b):
        self.ns, self.bpf = ns, bpf
        self.idx_a, self.idx_b = idx_a, idx_b
        self.mac_a, self.mac_b = mac_a, mac_b
        self.xsks = bpf[b"xsks"]

    def socket(self, **kw) -> XskSocket:
        from nfactor_xdp import netns
        with netns.entered(self.ns):
            s = XskSocket(self.idx_a, 0, **kw)
        self.xsks[ctypes.c_int(0)] = ctypes.c_int(s.fd)
        return s

    def packet_socket(self, dev="b") -> socket.socket:
        from nfactor_xdp import netns
        with netns.entered(self.ns):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TYPE))
            s.bind((dev, 0))
        s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)        # SO_RCVBUFFORCE
        s.setblocking(False)
        return s

    def frame(self, seq: int, tag: bytes = b"F", size: int = 96) -> bytes:
        hdr = self.mac_a + self.mac_b + struct.pack("!H", ETH_TYPE)
        body = MARK + tag + struct.pack("!I", seq)
        body += bytes((seq + i) & 0xFF for i in range(size - len(hdr) - len(body)))
        return hdr + body


def _mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


@pytest.fixture(scope="module")
def bed():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from bcc import BPF
    from pyroute2 import IPRoute
    from nfactor_xdp import netns

    ns = f"xsk-{uuid.uuid4().hex[:8]}"
    bpf = None
    attached = []
    netns.create(ns)
    try:
        with netns.entered(ns):
            with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as f:
                f.write("1")
            with IPRoute() as ipr:
                ipr.link("add", ifname="a", kind="veth", peer={"ifname": "b"})
                idx_a = ipr.link_lookup(ifname="a")[0]
                idx_b = ipr.link_lookup(ifname="b")[0]
                ipr.link("set", index=idx_a, state="up")
                ipr.link("set", index=idx_b, state="up")
                mac_a = _mac(ipr.get_links(idx_a)[0].get_attr("IFLA_ADDRESS"))
                mac_b = _mac(ipr.get_links(idx_b)[0].get_attr("IFLA_ADDRESS"))
            bpf = BPF(text=XDP_SRC.encode())
            BPF.attach_xdp(b"a", bpf.load_func(b"xsk_redirect", BPF.XDP), 0)
            attached.append(b"a")
            BPF.attach_xdp(b"b", bpf.load_func(b"xdp_pass", BPF.XDP), 0)
            attached.append(b"b")
        yield Bed(ns, bpf, idx_a, idx_b, mac_a, mac_b)
    finally:
        try:
            with netns.entered(ns):
                for dev in attached:
                    BPF.remove_xdp(dev, 0)
        finally:
            if bpf is not None:
                bpf.cleanup()
            netns.remove(ns)
    assert ns not in netns.listing()


def drain_rx(s: XskSocket, want: int) -> list[bytes]:
    """Receive (and recycle) until `want` frames arrived or the deadline."""
    got: list[bytes] = []
    deadline = time.monotonic() + DEADLINE
    while len(got) < want and time.monotonic() < deadline:
        if not s.wait(50):
            continue
        descs = s.recv_batch(64)
        got.extend(bytes(s.frame(a, n)) for a, n in descs)
        s.recycle(a for a, _ in descs)
    return got


def capture(p: socket.socket, want: int, *, pump=None, tag: bytes | None = None) -> list[bytes]:
    """Frames arriving on b (not the ones b sent) carrying MARK, until `want`
    or the deadline; `pump()` runs between reads (e.g. forward_batch)."""
    got: list[bytes] = []
    deadline = time.monotonic() + DEADLINE
    while len(got) < want and time.monotonic() < deadline:
        if pump is not None:
            pump()
        while True:
            try:
                data, addr = p.recvfrom(4096)
            except BlockingIOError:
                break
            if addr[2] == PACKET_OUTGOING or MARK not in data[:32]:
                continue
            if tag is not None and data[14 + len(MARK):15 + len(MARK)] != tag:
                continue
            got.append(data)
        if pump is None and len(got) < want:
            time.sleep(0.001)        # polling interval, not synchronisation
    return got


@pytest.mark.root
@pytest.mark.netns
@needs_root
def test_receive_exact_bytes_and_counts(bed):
    tx = bed.packet_socket()
    with bed.socket() as s:
        st = s.statistics()
        assert st["tx_budget_set"] in (True, False)
        frames = [bed.frame(i, size=60 + (i * 7) % 1400) for i in range(1000)]
        got: list[bytes] = []
        for i in range(0, len(frames), 100):     # interleave: exercise FILL recycling
            for f in frames[i:i + 100]:
                tx.send(f)
            got.extend(drain_rx(s, i + 100 - len(got)))
        assert len(got) == len(frames)
        assert got == frames
        st = s.statistics()
        assert st["rx_packets"] == 1000
        assert st["rx_bytes"] == sum(map(len, frames))
        assert st["rx_dropped"] == 0 and st["rx_ring_full"] == 0
        assert st["rx_fill_ring_empty_descs"] == 0 and st["rx_invalid_descs"] == 0
        assert s.rx_pending() == 0
    tx.close()


@pytest.mark.root
@pytest.mark.netns
@needs_root
def test_forward_batch_roundtrip(bed):
    tx, cap = bed.packet_socket(), bed.packet_socket()
    # A small UMEM: 1000 frames only get through if frames cycle
    # RX -> TX -> COMPLETION -> FILL.
    with bed.socket(num_frames=128, ring_size=64) as s:
        seen: list[int] = []

        def handler(frame: memoryview) -> bool:
            seen.append(len(frame))
            return True

        frames = [bed.frame(i, size=64 + i % 900) for i in range(1000)]
        out: list[bytes] = []
        for i in range(0, 1000, 40):
            for f in frames[i:i + 40]:
                tx.send(f)
            out.extend(capture(cap, i + 40 - len(out), pump=lambda: s.forward_batch(handler)))
        assert len(out) == 1000
        assert out == frames
        st = s.statistics()
        assert st["rx_packets"] == st["tx_packets"] == 1000
        assert st["rx_bytes"] == st["tx_bytes"] == sum(map(len, frames))
        assert st["dropped_by_handler"] == 0 and st["tx_dropped_ring_full"] == 0
        assert st["rx_dropped"] == 0 and st["tx_invalid_descs"] == 0
        assert st["tx_kicks"] >= 1
        assert len(seen) == 1000
        # every frame comes back: completions are reclaimed into FILL / the reserve
        deadline = time.monotonic() + DEADLINE
        while st["tx_queued"] or st["fill_queued"] + st["free_frames"] < 128:
            assert time.monotonic() < deadline, st
            s.forward_batch(handler)
            st = s.statistics()
    tx.close(), cap.close()


@pytest.mark.root
@pytest.mark.netns
@needs_root
def test_handler_can_rewrite_frames(bed):
    tx, cap = bed.packet_socket(), bed.packet_socket()
    with bed.socket() as s:
        def swap_macs(frame: memoryview) -> bool:
            dst = bytes(frame[0:6])
            frame[0:6] = frame[6:12]
            frame[6:12] = dst
            return True

        frames = [bed.frame(i) for i in range(50)]
        for f in frames:
            tx.send(f)
        out = capture(cap, 50, pump=lambda: s.forward_batch(swap_macs))
        assert out == [f[6:12] + f[0:6] + f[12:] for f in frames]
    tx.close(), cap.close()


@pytest.mark.root
@pytest.mark.netns
@needs_root
def test_handler_false_drops(bed):
    tx, cap = bed.packet_socket(), bed.packet_socket()
    with bed.socket(num_frames=64, ring_size=32) as s:
        def only_keep(frame: memoryview) -> bool:
            return frame[14 + len(MARK)] == ord("K")

        # 300 frames to drop through a 64-frame UMEM, then 20 to keep.  The kept
        # ones follow the dropped ones down the same path, so a dropped frame
        # that leaked would be among the first 20 marked frames seen on b.
        n = 0
        for i in range(0, 300, 20):
            for j in range(20):
                tx.send(bed.frame(i + j, tag=b"D"))
            deadline = time.monotonic() + DEADLINE
            while n < i + 20 and time.monotonic() < deadline:
                s.wait(50)
                n += s.forward_batch(only_keep)
        assert n == 300
        keep = [bed.frame(i, tag=b"K") for i in range(20)]
        for f in keep:
            tx.send(f)
        out = capture(cap, 20, pump=lambda: s.forward_batch(only_keep))
        assert out == keep
        st = s.statistics()
        assert st["dropped_by_handler"] == 300
        assert st["rx_packets"] == 320 and st["tx_packets"] == 20
        assert st["rx_dropped"] == 0 and st["rx_fill_ring_empty_descs"] == 0
    tx.close(), cap.close()


@pytest.mark.root
@pytest.mark.netns
@needs_root
def test_send_frame_and_transmit(bed):
    tx, cap = bed.packet_socket(), bed.packet_socket()
    with bed.socket() as s:
        marker = bed.frame(7, tag=b"M", size=80)
        assert s.send_frame(marker) is True
        assert capture(cap, 1, pump=s.reclaim) == [marker]
        assert s.statistics()["frames_injected"] == 1

        # recv_batch / frame / transmit: forward 10 received frames by hand
        frames = [bed.frame(i, tag=b"T") for i in range(10)]
        for f in frames:
            tx.send(f)
        descs: list[tuple[int, int]] = []
        deadline = time.monotonic() + DEADLINE
        while len(descs) < 10 and time.monotonic() < deadline:
            s.wait(50)
            descs += s.recv_batch()
        assert [bytes(s.frame(a, n)) for a, n in descs] == frames
        assert s.transmit(descs) == 10
        assert capture(cap, 10, pump=s.reclaim, tag=b"T") == frames

        with pytest.raises(ValueError):           # larger than a chunk
            s.send_frame(bytes(s.frame_size + 1))
    tx.close(), cap.close()


@pytest.mark.root
@pytest.mark.netns
@needs_root
def test_send_frame_without_free_frame_returns_false(bed):
    with bed.socket(num_frames=16, ring_size=8) as s:
        # 16 frames: 8 go to FILL, 8 stay free (FILL cannot hold more)
        results = [s.send_frame(bed.frame(i, tag=b"X")) for i in range(64)]
        assert True in results
        if False in results:
            assert s.statistics()["inject_no_frame"] >= 1


@pytest.mark.root
@pytest.mark.netns
@needs_root
def test_wait_timeout_and_close_idempotent(bed):
    s = bed.socket()
    fd = s.fd
    t0 = time.monotonic()
    assert s.wait(30) is False
    assert time.monotonic() - t0 >= 0.02
    assert s.rx_pending() == 0
    s.close()
    s.close()
    assert s.closed
    with pytest.raises(OSError):      # the socket's fd is closed
        os.fstat(fd)


@pytest.mark.root
@pytest.mark.netns
@needs_root
def test_bind_failure_names_interface_queue_and_errno(bed):
    from nfactor_xdp import netns
    with netns.entered(bed.ns):
        with pytest.raises(XskError) as ei:
            XskSocket(bed.idx_a, 7)                 # veth a has one queue
    msg = str(ei.value)
    assert "a (ifindex" in msg and "queue 7" in msg and "errno" in msg
    assert ei.value.errno == errno.EINVAL
    with netns.entered(bed.ns):
        with pytest.raises(XskError) as ei:
            XskSocket(987654, 0)
    assert ei.value.errno == errno.ENODEV
