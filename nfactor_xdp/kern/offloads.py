"""The offloads array (docs/offload.md) from Python: a runtime's view of the
slots in which it hands flows to the switch.

The pinned array is mmap-ed (it is created BPF_F_MMAPABLE), so the runtime
reads counts and writes slots in place, without a system call and without
replacing an element under a CPU that still counts into it.

Ordering: write() stores the parameters first and the action last, and the
switch reads the action first, so it never acts on a half-written slot (x86
keeps stores in program order, and loads too).  Revoking clears the action in
place; the switch may still be handling a frame that read the old action
until a grace period (kern/grace.py) has passed, so a slot's final counts are
read, and the slot is zeroed or written anew, only after one.

Time stamps are bpf_ktime_get_ns(): CLOCK_MONOTONIC, time.monotonic_ns() here.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import time
from dataclasses import dataclass

from . import layouts as L
from .bpfsys import BpfError, map_info, obj_get
from .maps import pin_dir

Slot = L.HEADER.structs["nfx_offload"]
ACTIONS = {k[len("NFX_OFF_"):].lower(): v for k, v in L.HEADER.enums["nfx_offload_action"].items()}
NONE, FORWARD, DROP = ACTIONS["none"], ACTIONS["forward"], ACTIONS["drop"]
PER_RUNTIME = L.C["NFX_OFFLOADS_PER_RUNTIME"]
NANOTOKENS = L.C["NFX_NANOTOKENS"]
BPF_MAP_TYPE_ARRAY = 2
BPF_F_MMAPABLE = 1 << 10
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
_COUNTS = ("packets", "bytes", "bucket_dropped", "bucket_dropped_bytes", "observed", "observe_lost")
OBSERVE = {k[len("NFX_OBSERVE_"):].lower(): v for k, v in L.HEADER.enums["nfx_observe"].items()}


@dataclass(frozen=True)
class SlotCounts:
    """What the switch counted in a slot: per canonical direction ([0] lo ->
    hi, [1] hi -> lo) the frames it handled and their bytes (forwarded or
    dropped, by the action or a bucket), the frames a bucket dropped and
    their bytes, and (observe mode) the forwarded frames copied to the
    runtime's observe ring and those the ring had no room for."""
    packets: tuple[int, int] = (0, 0)
    bytes: tuple[int, int] = (0, 0)
    bucket_dropped: tuple[int, int] = (0, 0)
    bucket_dropped_bytes: tuple[int, int] = (0, 0)
    observed: tuple[int, int] = (0, 0)
    observe_lost: tuple[int, int] = (0, 0)
    last_seen_ns: int = 0

    def __sub__(self, other: "SlotCounts") -> "SlotCounts":
        """What was counted since `other` (an earlier read); the later last_seen_ns."""
        diff = {f: tuple(a - b for a, b in zip(getattr(self, f), getattr(other, f))) for f in _COUNTS}
        return SlotCounts(**diff, last_seen_ns=self.last_seen_ns)

    def __bool__(self) -> bool:
        return any(any(getattr(self, f)) for f in _COUNTS)


def action_value(action) -> int:
    """An action given as its number, its name ("forward") or an enum member."""
    if isinstance(action, str):
        return ACTIONS[action.lower()]
    name = getattr(action, "name", None)
    if isinstance(name, str) and name.lower() in ACTIONS:
        return ACTIONS[name.lower()]
    value = int(action)
    if value not in ACTIONS.values():
        raise ValueError(f"unknown offload action {action!r}")
    return value


def observe_value(observe) -> int:
    """Observe mode as the kernel takes it: 0/None/"none", "all", "payload" or the number."""
    if not observe:
        return 0
    if isinstance(observe, str):
        if observe.lower() not in OBSERVE:
            raise ValueError(f"unknown observe mode {observe!r} (one of {', '.join(OBSERVE)})")
        return OBSERVE[observe.lower()]
    value = int(observe)
    if value not in OBSERVE.values():
        raise ValueError(f"unknown observe mode {observe!r}")
    return value


def _whole(value, what: str) -> int:
    """A whole number (an integral float too: rate_limiter keeps floats)."""
    value = value or 0
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"offload {what} {value!r}: the kernel takes whole numbers")
        value = int(value)
    return int(value)


def _bucket(rate, size, what: str) -> tuple[int, int]:
    """(rate, size) as the kernel takes them: whole tokens per second and a
    size, both 32 bits (a size's nanotokens then fit 64).  (0, 0): no bucket."""
    rate, size = _whole(rate, f"{what} rate"), _whole(size, f"{what} burst")
    if rate == 0:
        return 0, 0
    if not (0 < rate <= U32_MAX and 1 <= size <= U32_MAX):
        raise ValueError(f"offload {what} bucket: rate {rate}, size {size} (each in 1..{U32_MAX})")
    return rate, size


def _start(tokens, size: int) -> int:
    """A bucket's first nanotokens: full, or `tokens` (a float) if given."""
    if tokens is None:
        return size * NANOTOKENS
    return max(0, min(size * NANOTOKENS, int(tokens * NANOTOKENS)))


class OffloadSlots:
    """The node's pinned offloads array, mmap-ed."""

    def __init__(self, node: str, path: str | None = None):
        path = path or os.path.join(pin_dir(node), "offloads")
        try:
            fd = obj_get(path)
        except BpfError as e:
            raise BpfError(e.errno, f"cannot open pinned map {path}: {e.strerror}") from None
        try:
            info = map_info(fd)
            if info["type"] != BPF_MAP_TYPE_ARRAY or info["value_size"] != ctypes.sizeof(Slot) \
                    or not info["flags"] & BPF_F_MMAPABLE:
                raise BpfError(0, f"{path}: not an mmap-able array of struct nfx_offload ({info}; ABI mismatch)")
            self.size = info["max_entries"]
            length = -(-ctypes.sizeof(Slot) * self.size // mmap.PAGESIZE) * mmap.PAGESIZE
            self._mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping holds the map
        self.slots = (Slot * self.size).from_buffer(self._mm)

    def close(self) -> None:
        if self._mm is not None:
            del self.slots  # the mapping cannot close while ctypes points into it
            self._mm.close()
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def range(self, rt_id: int) -> range:
        """Runtime `rt_id`'s slots: the only ones it may write."""
        return range(rt_id * PER_RUNTIME, (rt_id + 1) * PER_RUNTIME)

    def _slot(self, slot: int):
        if not 0 <= slot < self.size:
            raise IndexError(f"offload slot {slot} out of range")
        return self.slots[slot]

    def write(self, slot: int, spec, runtime: int) -> None:
        """Hand slot `slot` to the switch for `runtime`: spec's action,
        punt_tcp_flags, observe, pps, burst, bps and byte_burst (missing: 0; rates
        and sizes whole numbers), the buckets full or holding spec's tokens
        and btokens (in tokens and bytes) if it has them; the action last.
        The slot must be free (action NONE, and a grace period passed since
        it was cleared)."""
        s = self._slot(slot)
        if s.action != NONE:
            raise ValueError(f"offload slot {slot} is in use (action {s.action}): revoke it first")
        action = action_value(spec.action)
        pps, burst = _bucket(getattr(spec, "pps", 0), getattr(spec, "burst", 0), "packet")
        bps, byte_burst = _bucket(getattr(spec, "bps", 0), getattr(spec, "byte_burst", 0), "byte")
        s.runtime = runtime
        s.punt_tcp_flags = int(getattr(spec, "punt_tcp_flags", 0) or 0) & 0xFF
        s.observe = observe_value(getattr(spec, "observe", 0))
        s.pps, s.burst, s.tokens = pps, burst, _start(getattr(spec, "tokens", None), burst)
        s.bps, s.byte_burst, s.btokens = bps, byte_burst, _start(getattr(spec, "btokens", None), byte_burst)
        s.stamp_ns = time.monotonic_ns()
        s.action = action  # last: from here on the switch may use the slot

    def clear_action(self, slot: int) -> None:
        """Revoke in place (one store); the counts are final after a grace period."""
        self._slot(slot).action = NONE

    def action(self, slot: int) -> int:
        return self._slot(slot).action

    def owner(self, slot: int) -> int:
        return self._slot(slot).runtime

    def read(self, slot: int) -> SlotCounts:
        """The slot's counts so far (each counter read atomically on its own)."""
        s = self._slot(slot)
        return SlotCounts(**{f: tuple(getattr(s, f)) for f in _COUNTS}, last_seen_ns=s.last_seen_ns)

    def bucket(self, slot: int) -> dict:
        """The buckets as the last frame left them: tokens and btokens (in
        tokens and bytes, not refilled since) and that frame's stamp_ns."""
        s = self._slot(slot)
        return {"tokens": s.tokens / NANOTOKENS, "btokens": s.btokens / NANOTOKENS, "stamp_ns": s.stamp_ns}

    def zero(self, slot: int) -> None:
        """Zero a free slot's counters (not while the switch may count into it)."""
        s = self._slot(slot)
        for f in _COUNTS:
            getattr(s, f)[0] = getattr(s, f)[1] = 0
        s.last_seen_ns = 0

    def active(self, rt_id: int) -> list[int]:
        """Runtime `rt_id`'s slots with an action set (what a recovering runtime adopts)."""
        return [i for i in self.range(rt_id) if self.slots[i].action != NONE and self.slots[i].runtime == rt_id]


__all__ = ["OffloadSlots", "SlotCounts", "Slot", "ACTIONS", "NONE", "FORWARD", "DROP", "PER_RUNTIME", "NANOTOKENS", "OBSERVE"]
