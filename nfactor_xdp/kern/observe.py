"""A runtime's observe ring (docs/offload.md, "Observe mode"): a BPF ring
buffer into which the switch copies the forwarded frames of the runtime's
flows in observe mode, read here from its mmap-ed pages.

The runtime creates its ring and puts it in the node's pinned `observers`
map (array of maps) under its id; the switch looks the ring up by the flow's
runtime.  A ring that is full (the runtime is slow, stopped or dead) only
costs copies, counted as observation losses in the flow's slot: the frames
themselves are forwarded all the same.  A runtime that dies leaves its ring
in the map; the next process of that runtime replaces it.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (ours to
write), page 1 the producer position, then the data pages, mapped twice in a
row so that a record that wraps reads as one piece.  Each record is an
8-byte header (length with BUSY and DISCARD bits, page offset), then the
record, padded to 8 bytes.  A record still BUSY stops the reader: records
come out in the order they were reserved.

The positions are read and written whole, with one 8-byte access each
(memoryview items, not struct, whose standard sizes go byte by byte): the
kernel reads the consumer position while we write it, and a torn value
(a carry half written) makes it see a full ring and refuse copies.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct

from . import layouts as L
from .bpfsys import BpfError, BpfMap, bpf, map_info
from .maps import pin_dir

BPF_MAP_CREATE = 0
BPF_MAP_TYPE_RINGBUF = 27
BUSY, DISCARD = 1 << 31, 1 << 30
RING_BYTES = L.C["NFX_OBSERVE_RING_BYTES"]
COPY = struct.Struct("=IHBx")   # struct nfx_copy's slot, len, dir (pad): read by struct, faster than ctypes
_C = L.HEADER.structs["nfx_copy"]
assert (COPY.size, _C.slot.offset, _C.len.offset, _C.dir.offset) == (ctypes.sizeof(_C), 0, 4, 6), \
    "struct nfx_copy changed in nfactor_shared.h: update COPY"


def _create_ring(size: int) -> int:
    attr = bytearray(struct.pack("=IIIII", BPF_MAP_TYPE_RINGBUF, 0, 0, size, 0) + bytes(108))
    try:
        return bpf(BPF_MAP_CREATE, attr)
    except BpfError as e:
        raise BpfError(e.errno, f"cannot create an observe ring of {size} bytes: {e.strerror}") from None


class ObserveRing:
    """Runtime `rt_id`'s observe ring on node `node` (created and put in the
    observers map here)."""

    def __init__(self, node: str, rt_id: int, size: int = RING_BYTES):
        self.rt_id, self.size, self.mask = rt_id, size, size - 1
        self._outer = BpfMap.open_pinned(os.path.join(pin_dir(node), "observers"), ctypes.c_uint32, ctypes.c_uint32)
        self.fd = -1
        try:
            self.fd = _create_ring(size)
            self.id = map_info(self.fd)["id"]
            page = mmap.PAGESIZE
            self._cons = mmap.mmap(self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._prod = mmap.mmap(self.fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
            self._data = memoryview(self._prod)[page:]
            self._cons_pos = memoryview(self._cons).cast("Q")   # [0]: one 8-byte load or store
            self._prod_pos = memoryview(self._prod).cast("Q")
            self._words = self._data.cast("I")                 # record headers' length words
            self._outer.set(rt_id, self.fd)
        except BaseException:
            self._close_fds()
            self._outer.close()
            raise
        self.pos = self._cons_pos[0]
        self.stats = {"discarded": 0, "most_behind": 0}

    def fileno(self) -> int:
        """Readable when copies wait (the kernel wakes a reader that has caught up)."""
        return self.fd

    def producer(self) -> int:
        """The ring's producer position now (a mark for skip_to)."""
        return self._prod_pos[0]

    def skip_to(self, mark: int) -> int:
        """Drop the records before `mark` unread; how many there were."""
        return self.drain(lambda *copy: None, stop=mark) if mark > self.pos else 0

    def pending(self) -> bool:
        return self._prod_pos[0] != self.pos

    def drain(self, handle, limit: int = 1 << 30, stop: int | None = None) -> int:
        """handle(slot, direction, frame) for each copy, oldest first, up to
        `limit` (and up to position `stop`); frame is a memoryview into the
        ring, valid only during the call.  Returns how many were handled."""
        prod = self._prod_pos[0] if stop is None else min(stop, self._prod_pos[0])
        pos, data, words, mask, n = self.pos, self._data, self._words, self.mask, 0
        if prod - pos > self.stats["most_behind"]:
            self.stats["most_behind"] = prod - pos
        copy = COPY.unpack_from
        while pos < prod and n < limit:
            at = pos & mask
            length = words[at >> 2]  # (written by the kernel's commit in one store)
            if length & BUSY:
                break  # reserved, not yet written: later records wait behind it
            if length & DISCARD:
                self.stats["discarded"] += 1
            else:
                slot, flen, direction = copy(data, at + 8)
                handle(slot, direction, data[at + 16:at + 16 + flen])
                n += 1
            pos += ((length & ~(BUSY | DISCARD)) + 8 + 7) & ~7
        if pos != self.pos:
            self.pos = pos
            self._cons_pos[0] = pos  # the kernel may reuse the space from here
        return n

    def _close_fds(self) -> None:
        for name in ("_words", "_cons_pos", "_prod_pos", "_data"):
            v = getattr(self, name, None)
            if v is not None:
                v.release()
                setattr(self, name, None)
        for name in ("_cons", "_prod"):
            m = getattr(self, name, None)
            if m is not None:
                m.close()
                setattr(self, name, None)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self, unregister: bool = True) -> None:
        """Take the ring out of the observers map (unless another process of
        this runtime has put its own there since) and free it."""
        if unregister and self._outer.fd >= 0:
            try:
                if self._outer.get(self.rt_id) == self.id:  # (a lookup gives the inner map's id)
                    self._outer.delete(self.rt_id)
            except OSError:
                pass
        self._outer.close()
        self._close_fds()


__all__ = ["ObserveRing", "RING_BYTES", "COPY"]
