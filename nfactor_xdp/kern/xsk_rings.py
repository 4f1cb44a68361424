"""AF_XDP's shared-memory rings from Python: the kernel's constants
(linux/if_xdp.h) and `Ring`, the index arithmetic over one ring's mmap.
The socket that owns four of them is in xsk.py."""
from __future__ import annotations

from array import array

# --- UAPI constants (linux/if_xdp.h) ---------------------------------------
AF_XDP = 44
SOL_XDP = 283

XDP_SHARED_UMEM = 1 << 0
XDP_COPY = 1 << 1
XDP_ZEROCOPY = 1 << 2
XDP_USE_NEED_WAKEUP = 1 << 3

XDP_RING_NEED_WAKEUP = 1 << 0

XDP_MMAP_OFFSETS = 1
XDP_RX_RING = 2
XDP_TX_RING = 3
XDP_UMEM_REG = 4
XDP_UMEM_FILL_RING = 5
XDP_UMEM_COMPLETION_RING = 6
XDP_STATISTICS = 7
XDP_OPTIONS = 8
XDP_MAX_TX_SKB_BUDGET = 9

XDP_OPTIONS_ZEROCOPY = 1 << 0

XDP_PGOFF_RX_RING = 0
XDP_PGOFF_TX_RING = 0x80000000
XDP_UMEM_PGOFF_FILL_RING = 0x100000000
XDP_UMEM_PGOFF_COMPLETION_RING = 0x180000000

# The kernel puts received data XDP_PACKET_HEADROOM bytes into the chunk (copy
# mode), after the UMEM headroom.
XDP_PACKET_HEADROOM = 256

U32 = 0xFFFFFFFF


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- rings -----------------------------------------------------------------
class Ring:
    """One AF_XDP ring: index arithmetic over shared memory.

    `buf` is anything exporting a writable buffer (the ring's mmap, or a
    bytearray in tests); `producer`, `consumer`, `desc` and `flags` are byte
    offsets into it (`flags` may be None).  `words` is the size of an entry in
    u64: 1 for FILL/COMPLETION (an address), 2 for RX/TX (a descriptor
    {u64 addr; u32 len; u32 options}, read as addr, then len | options << 32).

    Indices are free-running u32 counters: the number of entries in the ring is
    (producer - consumer) mod 2**32, the slot of index i is i & (size - 1).

    The user side of a ring is either its producer (FILL, TX: `free`, `push`)
    or its consumer (RX, COMPLETION: `available`, `peek`, `release`).  It keeps
    its own index cached in `.cached` and publishes it with one store per
    batch; the kernel's index is read from memory every time.
    """

    __slots__ = ("size", "mask", "words", "prod", "cons", "flags", "desc", "cached",
                 "_views")

    def __init__(self, buf, size: int, producer: int, consumer: int, desc: int,
                 flags: int | None = None, *, words: int = 1, user_produces: bool):
        if not is_pow2(size):
            raise ValueError(f"ring size must be a power of two, not {size}")
        if words not in (1, 2):
            raise ValueError("words must be 1 or 2")
        whole = memoryview(buf)
        self.size = size
        self.mask = size - 1
        self.words = words
        self.prod = whole[producer:producer + 4].cast("I")
        self.cons = whole[consumer:consumer + 4].cast("I")
        self.flags = whole[flags:flags + 4].cast("I") if flags is not None else None
        self.desc = whole[desc:desc + size * words * 8].cast("Q")
        whole.release()
        self._views = [v for v in (self.prod, self.cons, self.flags, self.desc) if v is not None]
        self.cached = self.prod[0] if user_produces else self.cons[0]

    # producer side (FILL, TX) ---------------------------------------------
    def free(self) -> int:
        """Entries the user may still produce."""
        return self.size - ((self.cached - self.cons[0]) & U32)

    def outstanding(self) -> int:
        """Entries produced by the user and not yet consumed by the kernel."""
        return (self.cached - self.cons[0]) & U32

    def push(self, words) -> int:
        """Write the entries in `words` (a flat sequence of u64, `words` per
        entry) at the producer index and publish them with one store.  The
        caller checks `free()` first; returns the number of entries."""
        n = len(words) // self.words
        if not n:
            return 0
        start = self.cached
        self._write(start, words, n)
        self.cached = (start + n) & U32
        self.prod[0] = self.cached
        return n

    def _write(self, start: int, words, n: int) -> None:
        w = self.words
        i = (start & self.mask) * w
        end = i + n * w
        limit = self.size * w
        if not isinstance(words, array):
            words = array("Q", words)
        if end <= limit:
            self.desc[i:end] = words
        else:
            first = limit - i
            self.desc[i:limit] = words[:first]
            self.desc[0:end - limit] = words[first:]

    def push_from(self, src: "Ring", n: int) -> None:
        """Produce the next `n` entries of consumer ring `src` (not consumed
        from it: call src.release) with memory-to-memory copies, no Python
        ints.  Both rings must have the same entry size; the caller checks
        `free()` and `src.available()`."""
        w = self.words
        si, di = src.cached, self.cached
        left = n
        while left:
            s_slot, d_slot = si & src.mask, di & self.mask
            k = min(left, src.size - s_slot, self.size - d_slot)
            self.desc[d_slot * w:(d_slot + k) * w] = src.desc[s_slot * w:(s_slot + k) * w]
            si += k
            di += k
            left -= k
        self.cached = di & U32
        self.prod[0] = self.cached

    # consumer side (RX, COMPLETION) ---------------------------------------
    def available(self) -> int:
        """Entries the kernel produced that the user has not consumed."""
        return (self.prod[0] - self.cached) & U32

    def peek(self, n: int) -> list[int]:
        """The next `n` entries (n <= available()) as a flat list of u64,
        without consuming them."""
        w = self.words
        i = (self.cached & self.mask) * w
        end = i + n * w
        limit = self.size * w
        if end <= limit:
            return self.desc[i:end].tolist()
        return self.desc[i:limit].tolist() + self.desc[0:end - limit].tolist()

    def release(self, n: int) -> None:
        """Hand `n` consumed entries back to the kernel (one store)."""
        self.cached = (self.cached + n) & U32
        self.cons[0] = self.cached

    def consume(self, n: int) -> list[int]:
        """peek + release."""
        words = self.peek(n)
        self.release(n)
        return words

    def needs_wakeup(self) -> bool:
        return self.flags is not None and bool(self.flags[0] & XDP_RING_NEED_WAKEUP)

    def close(self) -> None:
        for v in self._views:
            v.release()
        self._views = []
