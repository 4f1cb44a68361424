"""A pure-Python AF_XDP socket (socket + ctypes + mmap, no libxdp).

One `XskSocket` owns one UMEM and the four rings of one socket bound to one
(device, queue).  Frames cycle through the UMEM without ever being copied in
Python:

    FILL --kernel--> RX --forward_batch/handler--> TX --kernel--> COMPLETION
      ^                          | handler returned False                |
      +--------------------------+---------------------------------------+

plus a small reserve of frames kept out of FILL (`_free`) for `send_frame`,
which injects frames the node builds itself (e.g. migration markers).

Memory ordering: the rings are single-producer/single-consumer queues shared
with the kernel.  On x86 (TSO) stores are not reordered with older stores and
loads are not reordered with older loads, so writing descriptors and then the
producer index, or reading the producer index and then the descriptors, with
plain loads and stores through memoryview casts is enough.  A weakly ordered
architecture (arm64, ...) would need acquire/release barriers around the index
accesses; this module does not provide them.

The socket binds to the device in the network namespace the socket was
*created* in, so create `XskSocket` while inside the namespace of the device.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import select
import socket
import struct
import time
from array import array
from itertools import chain, compress
from operator import not_

from ..errors import NFactorError
from .libc import libc
from .xsk_rings import (AF_XDP, SOL_XDP, U32, XDP_COPY, XDP_MAX_TX_SKB_BUDGET, XDP_MMAP_OFFSETS, XDP_OPTIONS,
                        XDP_OPTIONS_ZEROCOPY, XDP_PACKET_HEADROOM, XDP_PGOFF_RX_RING, XDP_PGOFF_TX_RING,
                        XDP_RING_NEED_WAKEUP, XDP_RX_RING, XDP_STATISTICS, XDP_TX_RING, XDP_UMEM_COMPLETION_RING,
                        XDP_UMEM_FILL_RING, XDP_UMEM_PGOFF_COMPLETION_RING, XDP_UMEM_PGOFF_FILL_RING, XDP_UMEM_REG,
                        XDP_USE_NEED_WAKEUP, XDP_ZEROCOPY, Ring, is_pow2)

__all__ = ["XskError", "XskSocket", "Ring", "U32"]

_SOCKADDR_XDP = struct.Struct("HHIII")       # family, flags, ifindex, queue_id, shared_umem_fd
_UMEM_REG = struct.Struct("QQIIII")          # addr, len, chunk_size, headroom, flags, tx_metadata_len
_MMAP_OFFSETS_LEN = 16 * 8                   # 4 x {producer, consumer, desc, flags}
_MMAP_OFFSETS_V1_LEN = 12 * 8                # before 5.4: no flags
_STATS_FIELDS = ("rx_dropped", "rx_invalid_descs", "tx_invalid_descs",
                 "rx_ring_full", "rx_fill_ring_empty_descs", "tx_ring_empty_descs")


# errnos the copy-mode TX kick may return without anything being wrong:
# EAGAIN (skb budget used up, completion ring full, device busy: kick again),
# EBUSY (skb dropped by the device), ENOBUFS, ENETDOWN (device/peer down).
_KICK_TOLERATED = {
    _errno.EAGAIN: "tx_kick_eagain",
    _errno.EBUSY: "tx_kick_ebusy",
    _errno.ENOBUFS: "tx_kick_enobufs",
    _errno.ENETDOWN: "tx_kick_enetdown",
}
_KICK_RETRIES = 8



class XskError(NFactorError, OSError):
    """Setting up or binding an AF_XDP socket failed."""


# --- the socket ------------------------------------------------------------
class XskSocket:
    """An AF_XDP socket with its own UMEM, bound to (ifindex, queue).

    frame_size: UMEM chunk size (power of two, 2048..page size); the largest
    frame received is frame_size - 256.  num_frames: chunks in the UMEM.
    ring_size: entries of each of the four rings (power of two).
    copy_mode: True forces XDP_COPY (the only mode veth has), False forces
    XDP_ZEROCOPY, None lets the kernel choose.  tx_budget: descriptors one
    copy-mode TX kick may send (XDP_MAX_TX_SKB_BUDGET, kernel >= 6.17; the
    kernel accepts 32..ring_size and answers EACCES otherwise, so it is
    clamped to ring_size; kernel default 32), 0 to leave the kernel's default.
    bind_timeout: how long to retry a bind that fails with EBUSY (the queue
    of a socket closed just before is released asynchronously).
    """

    def __init__(self, ifindex: int, queue: int = 0, *, frame_size: int = 2048,
                 num_frames: int = 4096, ring_size: int = 2048,
                 copy_mode: bool | None = True, tx_budget: int = 256,
                 bind_timeout: float = 1.0):
        if not is_pow2(frame_size) or not 2048 <= frame_size <= mmap.PAGESIZE:
            raise ValueError(f"frame_size must be a power of two in 2048..{mmap.PAGESIZE}")
        if not is_pow2(ring_size):
            raise ValueError(f"ring_size must be a power of two, not {ring_size}")
        if num_frames < 8:
            raise ValueError("num_frames must be at least 8")
        self._closed = True          # until fully set up; close() is then a no-op
        self._init_state(ifindex, queue, frame_size, num_frames, ring_size)
        try:
            self._setup(copy_mode, tx_budget, bind_timeout)
        except BaseException:
            self._closed = False
            self.close()
            raise
        self._closed = False

    def _init_state(self, ifindex, queue, frame_size, num_frames, ring_size) -> None:
        self._sock = None
        self._umem = None
        self._view = None
        self._maps: list[mmap.mmap] = []
        self._rings: list[Ring] = []
        self._anchor = None
        self.fd = -1
        self.ifindex = ifindex
        self.queue = queue
        self.frame_size = frame_size
        self.num_frames = num_frames
        self.ring_size = ring_size
        self.max_frame_len = frame_size - XDP_PACKET_HEADROOM
        self.tx_budget = 32
        self.tx_budget_set = False
        self.need_wakeup = False
        self.zero_copy = False
        # counters (plain attributes: cheap to bump in the hot loop)
        self.rx_packets = self.rx_bytes = 0
        self.tx_packets = self.tx_bytes = 0
        self.dropped_by_handler = 0
        self.handler_errors = 0
        self.handler_error_frames = 0
        self.tx_dropped_ring_full = 0
        self.tx_ring_full_waits = 0
        self.tx_kicks = self.tx_kick_errors = 0
        self.rx_wakeups = 0
        self.frames_injected = 0
        self.inject_no_frame = 0
        self._kick_errno = dict.fromkeys(_KICK_TOLERATED.values(), 0)

    def _prime(self, umem) -> None:
        """Give FILL its frames; keep a reserve (and whatever FILL cannot
        hold) in the free pool for send_frame."""
        self._view = memoryview(umem)
        self._reserve = max(1, min(64, self.num_frames // 16))
        addrs = [i * self.frame_size for i in range(self.num_frames)]
        n_fill = min(self._fill.size, self.num_frames - self._reserve)
        self._fill.push(addrs[:n_fill])
        self._free = addrs[n_fill:]
        self._frame_mask = ~(self.frame_size - 1)

    @classmethod
    def _over_rings(cls, umem, rx: Ring, tx: Ring, fill: Ring, comp: Ring, *,
                    frame_size: int = 2048, kick=None) -> "XskSocket":
        """An XskSocket without a kernel socket, over rings and UMEM the
        caller provides (bytearrays): for unit tests and benchmarks of the
        ring logic.  `kick` replaces the TX kick (default: nothing)."""
        self = cls.__new__(cls)
        self._closed = True
        self._init_state(0, 0, frame_size, len(umem) // frame_size, rx.size)
        self._rx, self._tx, self._fill, self._comp = rx, tx, fill, comp
        self._rings = [rx, tx, fill, comp]
        self._kick = kick or (lambda: None)
        self._prime(umem)
        self._closed = False
        return self

    # setup ------------------------------------------------------------------
    def _setup(self, copy_mode, tx_budget, bind_timeout) -> None:
        sock = self._sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
        self.fd = sock.fileno()
        size = self.num_frames * self.frame_size

        # UMEM: anonymous mmap is page aligned.  The ctypes anchor pins the
        # buffer (mmap.close() refuses while it is exported) for as long as the
        # kernel has it registered.
        umem = self._umem = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
                                      | getattr(mmap, "MAP_POPULATE", 0))
        self._anchor = ctypes.c_char.from_buffer(umem)
        self.umem_addr = ctypes.addressof(self._anchor)
        sock.setsockopt(SOL_XDP, XDP_UMEM_REG,
                        _UMEM_REG.pack(self.umem_addr, size, self.frame_size, 0, 0, 0))

        rs = self.ring_size
        for opt in (XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_RX_RING, XDP_TX_RING):
            sock.setsockopt(SOL_XDP, opt, struct.pack("I", rs))

        # More than 32 descriptors per copy-mode kick (kernel >= 6.17).
        tx_budget = min(tx_budget, rs)
        if tx_budget > 32:
            try:
                sock.setsockopt(SOL_XDP, XDP_MAX_TX_SKB_BUDGET, struct.pack("I", tx_budget))
                self.tx_budget = tx_budget
                self.tx_budget_set = True
            except OSError:
                pass

        raw = sock.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, _MMAP_OFFSETS_LEN)
        if len(raw) >= _MMAP_OFFSETS_LEN:
            off = struct.unpack_from("16Q", raw)
            rx_off, tx_off, fr_off, cr_off = (off[i:i + 4] for i in range(0, 16, 4))
        elif len(raw) >= _MMAP_OFFSETS_V1_LEN:
            off = struct.unpack_from("12Q", raw)
            rx_off, tx_off, fr_off, cr_off = (off[i:i + 3] + (None,) for i in range(0, 12, 3))
        else:
            raise XskError(_errno.EINVAL, f"XDP_MMAP_OFFSETS returned {len(raw)} bytes")

        def ring(offs, pgoff, words, user_produces):
            length = offs[2] + rs * words * 8
            m = mmap.mmap(self.fd, length, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                          prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=pgoff)
            self._maps.append(m)
            r = Ring(m, rs, offs[0], offs[1], offs[2], offs[3], words=words,
                     user_produces=user_produces)
            self._rings.append(r)
            return r

        self._rx = ring(rx_off, XDP_PGOFF_RX_RING, 2, False)
        self._tx = ring(tx_off, XDP_PGOFF_TX_RING, 2, True)
        self._fill = ring(fr_off, XDP_UMEM_PGOFF_FILL_RING, 1, True)
        self._comp = ring(cr_off, XDP_UMEM_PGOFF_COMPLETION_RING, 1, False)

        self._prime(umem)
        self._bind(copy_mode, rx_off[3] is not None, bind_timeout)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def _bind(self, copy_mode, have_flags: bool, bind_timeout: float) -> None:
        mode = {True: XDP_COPY, False: XDP_ZEROCOPY, None: 0}[copy_mode]
        attempts = [mode | XDP_USE_NEED_WAKEUP, mode] if have_flags else [mode]
        deadline = time.monotonic() + bind_timeout
        err = 0
        for flags in attempts:
            addr = _SOCKADDR_XDP.pack(AF_XDP, flags, self.ifindex, self.queue, 0)
            while libc.bind(self.fd, addr, len(addr)) != 0:
                err = ctypes.get_errno()
                # A socket closed a moment ago keeps its (device, queue) until
                # the kernel's deferred release has run (~20 ms measured).
                if err != _errno.EBUSY or time.monotonic() >= deadline:
                    break
                time.sleep(0.005)
            else:
                self.bind_flags = flags
                self.need_wakeup = bool(flags & XDP_USE_NEED_WAKEUP)
                break
            if err != _errno.EINVAL:      # only an unknown flag is worth a retry
                self._bind_failed(mode, err)
        else:
            self._bind_failed(mode, err)
        try:
            opt = self._sock.getsockopt(SOL_XDP, XDP_OPTIONS, 4)
            self.zero_copy = bool(struct.unpack("I", opt)[0] & XDP_OPTIONS_ZEROCOPY)
        except OSError:
            self.zero_copy = False

    def _bind_failed(self, mode: int, err: int):
        try:
            name = socket.if_indextoname(self.ifindex)
        except OSError:
            name = "?"
        what = {XDP_COPY: "copy", XDP_ZEROCOPY: "zero-copy", 0: "any"}[mode]
        raise XskError(err, f"AF_XDP bind to {name} (ifindex {self.ifindex}) queue {self.queue} "
                            f"in {what} mode failed: [errno {err}] {os.strerror(err)}")

    # hot path ---------------------------------------------------------------
    def forward_batch(self, handler, max_n: int = 64) -> int:
        """Take up to max_n received frames; call handler(frame) for each
        (a writable memoryview into the UMEM, valid only during the call);
        frames for which it returns True are queued for TX on this socket,
        the others go back to FILL.  Then kick TX once and reclaim completions.
        Returns the number of frames received (0 if none).

        If the handler raises, the whole batch is recycled to FILL (counted in
        dropped_by_handler and handler_errors) and the exception propagates.
        A kick error other than EAGAIN/EBUSY/ENOBUFS/ENETDOWN (e.g. ENXIO:
        the device went away and the kernel unbound the socket) raises
        OSError."""
        rx = self._rx
        cons = rx.cached
        n = (rx.prod[0] - cons) & U32
        if not n:
            self._idle()
            return 0
        if n > max_n:
            n = max_n
        words = rx.peek(n)
        view = self._view
        drop = None
        # RX descriptors carry options == 0 (we never bind with XDP_USE_SG),
        # so the second word is the length and the descriptor can go to TX
        # unchanged.
        it = iter(words)
        try:
            for addr, ln in zip(it, it):
                if not handler(view[addr:addr + ln]):
                    if drop is None:
                        drop = [addr]
                    else:
                        drop.append(addr)
        except BaseException:
            # keep the rings consistent: the whole batch goes back to FILL
            self._abort_batch(words, n)
            raise
        self.rx_packets += n
        nbytes = sum(words[1::2])
        self.rx_bytes += nbytes

        tx = self._tx
        if drop is None:
            k = n
            # common case: every frame forwarded, copy the descriptors ring to ring
            if (tx.cached - tx.cons[0]) & U32 > tx.size - k:
                k = self._tx_make_room(k)
            if k == n:
                tx.push_from(rx, n)
            else:
                tx.push(words[:2 * k])
                drop = words[2 * k::2]
                self.tx_dropped_ring_full += n - k
                nbytes = sum(words[1:2 * k:2])
        else:
            self.dropped_by_handler += len(drop)
            k = n - len(drop)
            if k:
                # the descriptors not dropped, in order (addresses are unique)
                addrs = words[0::2]
                keep = map(not_, map(set(drop).__contains__, addrs))
                fwd = array("Q", chain.from_iterable(compress(zip(addrs, words[1::2]), keep)))
                if (tx.cached - tx.cons[0]) & U32 > tx.size - k:
                    room = self._tx_make_room(k)
                    if room < k:
                        self.tx_dropped_ring_full += k - room
                        drop.extend(fwd[2 * room::2])
                        del fwd[2 * room:]
                        k = room
                if k:
                    tx.push(fwd)
                nbytes = sum(fwd[1::2])
            else:
                nbytes = 0
        rx.cached = cons = (cons + n) & U32
        rx.cons[0] = cons
        if drop:
            self._to_fill(drop)
        if k:
            self.tx_packets += k
            self.tx_bytes += nbytes
            self._kick()
        self.reclaim()
        return n

    def _abort_batch(self, words, n: int) -> None:
        rx = self._rx
        self.rx_packets += n
        self.rx_bytes += sum(words[1::2])
        self.handler_errors += 1
        self.handler_error_frames += n
        self.dropped_by_handler += n
        rx.release(n)
        self._to_fill(words[0::2])

    def _tx_make_room(self, k: int) -> int:
        """TX has fewer than k free slots: let the kernel send and complete,
        then return how many of the k fit."""
        self.tx_ring_full_waits += 1
        self._kick()
        self.reclaim()
        return min(k, self._tx.free())

    def _idle(self) -> None:
        """Nothing received: keep TX moving, reclaim, wake the driver if asked."""
        tx = self._tx
        if tx.cached != tx.cons[0]:
            self._kick()
        self.reclaim()
        fill = self._fill
        if self.need_wakeup and fill.flags[0] & XDP_RING_NEED_WAKEUP:
            self.rx_wakeups += 1
            try:
                self._sock.recv(0, socket.MSG_DONTWAIT)
            except OSError:
                pass

    def _kick(self) -> None:
        """Make the kernel send what is queued on TX (copy mode sends only on
        sendmsg; one call sends at most tx_budget descriptors)."""
        tx = self._tx
        if self.need_wakeup and not tx.flags[0] & XDP_RING_NEED_WAKEUP:
            return
        for _ in range(_KICK_RETRIES):
            self.tx_kicks += 1
            try:
                self._sock.send(b"", socket.MSG_DONTWAIT)
                return
            except OSError as e:
                key = _KICK_TOLERATED.get(e.errno)
                if key is None:
                    raise
                self.tx_kick_errors += 1
                self._kick_errno[key] += 1
                if e.errno != _errno.EAGAIN or tx.cached == tx.cons[0]:
                    return
                # budget used up or completion ring full: make room, go again
                self.reclaim()

    def _to_fill(self, addrs) -> None:
        """Give frames to FILL; what does not fit goes to the free pool."""
        fill = self._fill
        free = fill.free()
        if len(addrs) <= free:
            fill.push(addrs)
        else:
            if free:
                fill.push(addrs[:free])
            mask = self._frame_mask
            self._free.extend(a & mask for a in addrs[free:])

    def reclaim(self) -> int:
        """Move completed TX frames to FILL (topping up the send_frame reserve
        first, and feeding FILL from surplus free frames).  Returns the number
        of completions."""
        comp = self._comp
        n = (comp.prod[0] - comp.cached) & U32
        free = self._free
        if n:
            fill = self._fill
            want = self._reserve - len(free)
            if want <= 0 and n <= fill.free():
                fill.push_from(comp, n)         # common case: memory to memory
                comp.release(n)
            else:
                addrs = comp.peek(n)
                comp.release(n)
                if want > 0:
                    mask = self._frame_mask
                    free.extend(a & mask for a in addrs[:want])
                    addrs = addrs[want:]
                if addrs:
                    self._to_fill(addrs)
        if len(free) > self._reserve:
            fill = self._fill
            room = fill.free()
            if room:
                k = min(room, len(free) - self._reserve)
                fill.push(free[-k:])
                del free[-k:]
        return n

    # lower-level API ----------------------------------------------------------
    def recv_batch(self, max_n: int = 64) -> list[tuple[int, int]]:
        """Consume up to max_n descriptors from RX as (addr, len).  The caller
        owns the frames: hand each to transmit() or recycle()."""
        rx = self._rx
        n = rx.available()
        if not n:
            return []
        if n > max_n:
            n = max_n
        words = rx.consume(n)
        self.rx_packets += n
        out = [(words[i], words[i + 1] & U32) for i in range(0, 2 * n, 2)]
        self.rx_bytes += sum(ln for _, ln in out)
        return out

    def frame(self, addr: int, length: int) -> memoryview:
        """A writable view of `length` bytes of the UMEM at `addr`."""
        return self._view[addr:addr + length]

    def transmit(self, descs) -> int:
        """Queue (addr, len) descriptors on TX and kick.  Returns how many were
        queued (from the front); the caller still owns the others."""
        tx = self._tx
        k = len(descs)
        if not k:
            return 0
        free = tx.free()
        if free < k:
            self.tx_ring_full_waits += 1
            self._kick()
            self.reclaim()
            free = tx.free()
            k = min(k, free)
        if k:
            words = array("Q")
            nbytes = 0
            for addr, ln in descs[:k]:
                words.append(addr)
                words.append(ln)
                nbytes += ln
            tx.push(words)
            self.tx_packets += k
            self.tx_bytes += nbytes
        self._kick()
        return k

    def recycle(self, addrs) -> None:
        """Give frames (addresses) back to FILL."""
        self._to_fill([a & self._frame_mask for a in addrs])

    def send_frame(self, data) -> bool:
        """Copy `data` into a free frame and transmit it.  False if there is no
        free frame or no room on TX (nothing is sent then)."""
        ln = len(data)
        if not ln:
            raise ValueError("empty frame")
        if ln > self.frame_size:
            raise ValueError(f"frame of {ln} bytes does not fit a {self.frame_size}-byte chunk")
        free = self._free
        if not free:
            self.reclaim()
        tx = self._tx
        if free and not tx.free():
            self._kick()
            self.reclaim()
        if not free or not tx.free():
            self.inject_no_frame += 1
            return False
        addr = free.pop()
        self._view[addr:addr + ln] = data
        tx.push((addr, ln))
        self.tx_packets += 1
        self.tx_bytes += ln
        self.frames_injected += 1
        self._kick()
        return True

    def rx_pending(self) -> int:
        rx = self._rx
        return (rx.prod[0] - rx.cached) & U32

    def wait(self, timeout_ms: int) -> bool:
        """Wait up to timeout_ms for received frames; True if RX has some."""
        rx = self._rx
        if (rx.prod[0] - rx.cached) & U32:
            return True
        tx = self._tx
        if tx.cached != tx.cons[0]:
            self._kick()
        try:
            self._poll.poll(timeout_ms)
        except InterruptedError:   # pragma: no cover - PEP 475 retries for us
            pass
        return bool((rx.prod[0] - rx.cached) & U32)

    def statistics(self) -> dict:
        """Kernel XDP_STATISTICS (the fields this kernel has) and this
        socket's own counters and ring levels."""
        stats: dict = {}
        if self._sock is not None and not self._closed:
            raw = self._sock.getsockopt(SOL_XDP, XDP_STATISTICS, len(_STATS_FIELDS) * 8)
            stats.update(zip(_STATS_FIELDS, struct.unpack_from(f"{len(raw) // 8}Q", raw)))
        stats.update(
            rx_packets=self.rx_packets, rx_bytes=self.rx_bytes,
            tx_packets=self.tx_packets, tx_bytes=self.tx_bytes,
            dropped_by_handler=self.dropped_by_handler, handler_errors=self.handler_errors,
            handler_error_frames=self.handler_error_frames,
            tx_dropped_ring_full=self.tx_dropped_ring_full,
            tx_ring_full_waits=self.tx_ring_full_waits,
            tx_kicks=self.tx_kicks, tx_kick_errors=self.tx_kick_errors,
            **self._kick_errno,
            rx_wakeups=self.rx_wakeups,
            frames_injected=self.frames_injected, inject_no_frame=self.inject_no_frame,
            tx_budget=self.tx_budget, tx_budget_set=self.tx_budget_set,
            need_wakeup=self.need_wakeup, zero_copy=self.zero_copy,
        )
        if not self._closed:          # ring levels: frames in FILL, in flight on TX
            stats.update(free_frames=len(self._free), fill_queued=self._fill.outstanding(),
                         tx_queued=self._tx.outstanding(), rx_pending=self.rx_pending())
        return stats

    # lifetime -----------------------------------------------------------------
    def close(self) -> None:
        """Close the socket and unmap rings and UMEM.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._sock is not None:
            self._sock.close()      # unbinds; the kernel drops its UMEM pin
        for r in self._rings:
            r.close()
        self._rings = []
        self._rx = self._tx = self._fill = self._comp = None
        for m in self._maps:
            m.close()
        self._maps = []
        view = getattr(self, "_view", None)
        if view is not None:
            view.release()
            self._view = None
        self._anchor = None
        if self._umem is not None:
            try:
                self._umem.close()
            except BufferError:
                # someone still holds a frame view: the mapping goes when it does
                pass
            self._umem = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "XskSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
