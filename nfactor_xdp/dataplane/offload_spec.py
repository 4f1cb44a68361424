"""What an NF still needs of an offloaded flow (docs/offload.md, "NF API").

`Offload` is one NF's answer (or the chain's combined one): the action the
switch applies to the flow's frames, the TCP flags whose frames must still
reach Python, at most one token bucket, and whether the NF only observes
(it is fed copies of the forwarded frames: observe mode).  `KernelCounts` is what the
switch did with the flow's frames meanwhile.  `combine` turns a chain's
answers into one `ChainOffload`: a spec, or the reason there is none.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum

from ..formats.headers import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN

__all__ = ["Action", "FORWARD", "DROP", "OBSERVE_ALL", "OBSERVE_PAYLOAD", "TCP_FIN", "TCP_SYN", "TCP_RST", "TCP_PSH", "TCP_ACK",
           "Offload", "KernelCounts", "ChainOffload", "combine", "flag_names", "OffloadError"]

MAX_TCP_FLAGS = 0xFF        # the flags byte of the TCP header
MAX_RATE = 0xFFFF_FFFF      # 32 bits: a burst in the kernel's nanotokens (x 1e9) fits 64
U64_MAX = (1 << 64) - 1     # the kernel's counters
_FLAG_NAMES = ((TCP_FIN, "FIN"), (TCP_SYN, "SYN"), (TCP_RST, "RST"), (TCP_PSH, "PSH"), (TCP_ACK, "ACK"))


class OffloadError(ValueError):
    pass


class Action(IntEnum):
    """The values of the kernel's NFX_OFF_FORWARD / NFX_OFF_DROP."""
    FORWARD = 1
    DROP = 2


FORWARD, DROP = Action.FORWARD, Action.DROP
# observe modes (the kernel's enum nfx_observe): copies of every forwarded frame, or only of those
# with TCP/UDP payload bytes
OBSERVE_NONE, OBSERVE_ALL, OBSERVE_PAYLOAD = 0, 1, 2
_OBSERVE_NAMES = {OBSERVE_ALL: "observe", OBSERVE_PAYLOAD: "observe payload"}


def _count(label: str, value, limit: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise OffloadError(f"{label}: {value!r} is not an integer in 0..{limit}")
    return value


def flag_names(mask: int) -> str:
    """'FIN|RST' for 0x05 (unnamed bits in hex); '' for 0."""
    names = [n for bit, n in _FLAG_NAMES if mask & bit]
    rest = mask & ~sum(bit for bit, _ in _FLAG_NAMES)
    return "|".join(names + ([hex(rest)] if rest else []))


@dataclass(frozen=True)
class Offload:
    """An answer: FORWARD (the switch may forward the flow's frames) or DROP
    (it drops them all from now on).  punt_tcp_flags: a TCP frame with any of
    these flags still goes to Python (ignored for other protocols).  pps/burst:
    a packet bucket, bps/byte_burst: a byte bucket (bytes per second, bucket
    size in bytes); 0/0 is none, and a bucket's rate and size are both set.
    A DROP has neither punts nor buckets.  observe (FORWARD only): the NF
    never drops nor rewrites the flow's frames and only needs to see them:
    the switch forwards them and feeds the NF copies (OBSERVE_ALL, or
    OBSERVE_PAYLOAD: only frames with payload bytes), if the flow's rule asks
    for observe mode; its verdicts on copies do not count.  Raises
    OffloadError when invalid."""
    action: Action = FORWARD
    punt_tcp_flags: int = 0
    pps: int = 0
    burst: int = 0
    bps: int = 0
    byte_burst: int = 0
    observe: int = OBSERVE_NONE

    def __post_init__(self) -> None:
        if self.action not in (FORWARD, DROP):
            raise OffloadError(f"offload.action: {self.action!r} is not FORWARD (1) or DROP (2)")
        object.__setattr__(self, "action", Action(self.action))
        _count("offload.punt_tcp_flags", self.punt_tcp_flags, MAX_TCP_FLAGS)
        for rate, size in (("pps", "burst"), ("bps", "byte_burst")):
            r = _count(f"offload.{rate}", getattr(self, rate), MAX_RATE)
            s = _count(f"offload.{size}", getattr(self, size), MAX_RATE)
            if bool(r) != bool(s):
                raise OffloadError(f"offload.{rate}/{size}: a bucket needs both (or neither), got {r}/{s}")
        if self.observe not in (OBSERVE_NONE, OBSERVE_ALL, OBSERVE_PAYLOAD):
            raise OffloadError(f"offload.observe: {self.observe!r} is not OBSERVE_NONE, OBSERVE_ALL or "
                               f"OBSERVE_PAYLOAD")
        if self.action == DROP and (self.punt_tcp_flags or self.has_bucket or self.observe):
            raise OffloadError("offload: a DROP takes no punt flags, no bucket and no observe")

    @property
    def has_bucket(self) -> bool:
        return bool(self.pps or self.bps)

    def describe(self) -> str:
        """For the operator: 'forward punt FIN|RST 1000pps/100'."""
        parts = [self.action.name.lower()]
        if self.punt_tcp_flags:
            parts.append("punt " + flag_names(self.punt_tcp_flags))
        if self.pps:
            parts.append(f"{self.pps}pps/{self.burst}")
        if self.bps:
            parts.append(f"{self.bps}B/s/{self.byte_burst}B")
        if self.observe:
            parts.append(_OBSERVE_NAMES[self.observe])
        return " ".join(parts)


def _pair(name: str, value) -> tuple[int, int]:
    try:
        orig, reply = value
    except (TypeError, ValueError):
        raise OffloadError(f"counts.{name}: {value!r} is not an (orig, reply) pair") from None
    for v in (orig, reply):
        if not isinstance(v, int) or isinstance(v, bool):
            raise OffloadError(f"counts.{name}: {value!r} is not a pair of integers")
    return orig, reply


_PAIRS = ("packets", "bytes", "bucket_dropped", "bucket_dropped_bytes", "observed", "observe_lost")


@dataclass(frozen=True)
class KernelCounts:
    """What the switch did with an offloaded flow's frames, per direction
    (index 0: orig, the direction of the flow's first frame; 1: reply), as
    struct nfx_offload counts them (see from_slot):

    packets, bytes        every frame the switch handled (forwarded, or
                          dropped by the action or a bucket), Ethernet lengths
    bucket_dropped        those of them a bucket dropped
    bucket_dropped_bytes  their bytes
    observed              (observe mode) forwarded frames copied for the NFs that observe
    observe_lost          forwarded frames those NFs should have seen but never will (the
                          copy found no room, or the runtime that was to read it died):
                          a gap in what they observed
    last_seen             the last frame's bpf_ktime_get_ns() (the clock of
                          time.monotonic_ns()); None: no frame

    A slot counts cumulatively: later - earlier is what came in between.
    Each counter is read on its own while the switch counts, so a live
    difference may split a bucket drop from its frame (forwarded off by one,
    even negative); the sum of the differences is exact."""
    packets: tuple[int, int] = (0, 0)
    bytes: tuple[int, int] = (0, 0)
    bucket_dropped: tuple[int, int] = (0, 0)
    bucket_dropped_bytes: tuple[int, int] = (0, 0)
    observed: tuple[int, int] = (0, 0)
    observe_lost: tuple[int, int] = (0, 0)
    last_seen: int | None = None

    def __post_init__(self) -> None:
        for name in _PAIRS:
            object.__setattr__(self, name, _pair(name, getattr(self, name)))
        if self.last_seen is not None:
            _count("counts.last_seen", self.last_seen, U64_MAX)

    @classmethod
    def from_slot(cls, slot, orig_dir: int) -> KernelCounts:
        """From kern/offloads.SlotCounts (per canonical direction, 0: lo -> hi)
        and the flow's orig_dir (formats.flowkey LO_TO_HI = 0 / HI_TO_LO = 1)."""
        def ours(pair):
            return tuple(pair) if orig_dir == 0 else (pair[1], pair[0])
        return cls(ours(slot.packets), ours(slot.bytes), ours(slot.bucket_dropped),
                   ours(getattr(slot, "bucket_dropped_bytes", (0, 0))), ours(getattr(slot, "observed", (0, 0))),
                   ours(getattr(slot, "observe_lost", (0, 0))), last_seen=slot.last_seen_ns or None)

    def unseen(self) -> KernelCounts:
        """The same counts with every copy made counted as lost too (copies in
        the ring of a runtime that died were never read)."""
        lost = tuple(a + b for a, b in zip(self.observe_lost, self.observed))
        return KernelCounts(self.packets, self.bytes, self.bucket_dropped, self.bucket_dropped_bytes,
                            (0, 0), lost, last_seen=self.last_seen)

    def __bool__(self) -> bool:
        return any(any(getattr(self, name)) for name in _PAIRS)

    def _zip(self, other: KernelCounts, op) -> dict:
        return {n: tuple(op(a, b) for a, b in zip(getattr(self, n), getattr(other, n))) for n in _PAIRS}

    def __add__(self, other: KernelCounts) -> KernelCounts:
        if not isinstance(other, KernelCounts):
            return NotImplemented
        seen = [t for t in (self.last_seen, other.last_seen) if t is not None]
        return KernelCounts(**self._zip(other, int.__add__), last_seen=max(seen) if seen else None)

    def __sub__(self, earlier: KernelCounts) -> KernelCounts:
        """The counts since `earlier` (a read of the same slot before this
        one); last_seen is None when nothing came since."""
        if not isinstance(earlier, KernelCounts):
            return NotImplemented
        pairs = self._zip(earlier, int.__sub__)
        if any(v < 0 for pair in pairs.values() for v in pair):
            raise OffloadError("counts went backwards: not a later read of the same slot")
        delta = KernelCounts(**pairs)
        return KernelCounts(**pairs, last_seen=self.last_seen) if delta else delta

    @property
    def forwarded(self) -> tuple[int, int]:
        """Frames per direction that got through (under FORWARD)."""
        return (self.packets[0] - self.bucket_dropped[0], self.packets[1] - self.bucket_dropped[1])

    @property
    def forwarded_bytes(self) -> tuple[int, int]:
        return (self.bytes[0] - self.bucket_dropped_bytes[0], self.bytes[1] - self.bucket_dropped_bytes[1])

    def last_seen_wall(self, wall: float | None = None, mono_ns: int | None = None) -> float | None:
        """last_seen as time.time() would have said it (the clocks default to now)."""
        if self.last_seen is None:
            return None
        wall = time.time() if wall is None else wall
        mono_ns = time.monotonic_ns() if mono_ns is None else mono_ns
        return wall - (mono_ns - self.last_seen) / 1e9


NO_COUNTS = KernelCounts()


@dataclass(frozen=True)
class ChainOffload:
    """A chain's combined answer: `spec` (None: not offloaded, `reason` says
    why) and `owner`, the index of the NF whose answer gave the DROP or the
    bucket (-1: none), which `counts_for` needs."""
    spec: Offload | None
    reason: str = ""
    owner: int = -1
    observers: tuple = ()   # the NFs (indices) fed copies in observe mode

    def describe(self) -> str:
        return self.spec.describe() if self.spec is not None else f"not offloaded: {self.reason}"

    def counts_for(self, index: int, counts: KernelCounts) -> KernelCounts:
        """The counts as NF `index` of the chain would have seen the frames
        inline: up to the owner, every frame reached it (only the owner's own
        bucket drops are its concern); after the owner, only the frames the
        owner passed (none after a DROP)."""
        if index in self.observers:  # it saw the frames as copies: only the ones it missed
            return KernelCounts(observe_lost=counts.observe_lost) if any(counts.observe_lost) else NO_COUNTS
        owner = self.owner
        if self.observers:
            counts = KernelCounts(counts.packets, counts.bytes, counts.bucket_dropped, counts.bucket_dropped_bytes,
                                  last_seen=counts.last_seen)
        if owner < 0 or index == owner:
            return counts
        if index < owner:
            return KernelCounts(counts.packets, counts.bytes, last_seen=counts.last_seen)
        if self.spec is not None and self.spec.action == DROP:
            return NO_COUNTS
        return KernelCounts(counts.forwarded, counts.forwarded_bytes, last_seen=counts.last_seen)


def combine(answers: list, names: list[str] | None = None, observe_ok: bool = False) -> ChainOffload:
    """One chain's answers, in chain order, combined:

    - an empty chain forwards everything (FORWARD, no punts);
    - a None (or anything not an Offload) before the first DROP: not
      offloaded, that NF needs every packet;
    - an answer that observes: that NF is fed copies if observe_ok (the
      flow's rule asks for observe mode), else it needs every packet; an
      observer before a bucket: not offloaded (it would miss the drops);
    - the first DROP decides: DROP (no punts, no bucket); the answers after
      it do not count, as those NFs never see a dropped frame inline.  A
      bucket before it: not offloaded (its drops would not be exact);
    - otherwise FORWARD, the punt masks OR-ed, and the bucket of the one NF
      that asks for one; two NFs with buckets: not offloaded."""
    names = list(names) if names is not None else [f"nf#{i}" for i in range(len(answers))]
    punts, bucket, observers, observe = 0, -1, [], OBSERVE_NONE
    for i, answer in enumerate(answers):
        name = names[i]
        if answer is None:
            return ChainOffload(None, f"{name} needs every packet")
        if not isinstance(answer, Offload):
            return ChainOffload(None, f"{name}.offload() returned a {type(answer).__name__}, not an Offload")
        if answer.action == DROP:
            if bucket >= 0:
                return ChainOffload(None, f"{names[bucket]}'s bucket comes before {name}'s drop")
            return ChainOffload(Offload(DROP), owner=i)
        if answer.observe:
            if not observe_ok:
                return ChainOffload(None, f"{name} needs every packet (its rule does not ask for observe mode)")
            observers.append(i)
            # copies of every frame if any observer wants them all
            observe = OBSERVE_ALL if OBSERVE_ALL in (observe, answer.observe) else OBSERVE_PAYLOAD
        if answer.has_bucket:
            if bucket >= 0:
                return ChainOffload(None, f"two buckets ({names[bucket]}, {name})")
            if observers and observers[0] < i:
                return ChainOffload(None, f"{names[observers[0]]} observes before {name}'s bucket")
            bucket = i
        punts |= answer.punt_tcp_flags
    if bucket < 0:
        return ChainOffload(Offload(FORWARD, punts, observe=observe), observers=tuple(observers))
    b = answers[bucket]
    return ChainOffload(Offload(FORWARD, punts, b.pps, b.burst, b.bps, b.byte_burst, observe), owner=bucket,
                        observers=tuple(observers))
