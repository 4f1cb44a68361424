"""IP fragments in a runtime: NFs see a fragmented datagram as its real flow.

The switch cannot see the ports of a fragment, so it keys every fragment of a
host pair (protocol, VLANs) without them: they all reach one runtime.  There
`Reassembler` holds them per datagram (IPv4: addresses, protocol, id; IPv6:
addresses, id; and the VLANs) until the datagram is whole, under bounds like
the kernel's defragmenter:
  - at most `max_datagrams` datagrams in flight and `max_bytes` of frames
    held; a fragment over either bound is refused (full_datagrams,
    full_bytes), as Linux drops fragments over ipfrag_high_thresh; a datagram
    of more than MAX_FRAGMENTS is dropped (too_many_fragments);
  - a datagram not complete `timeout` seconds after its first fragment is
    dropped with its fragments (timed_out);
  - a fragment overlapping another drops the whole datagram (overlapping), as
    Linux does for IPv6 (RFC 5722) and for IPv4 since 4.19; an exact
    duplicate (inside one held fragment) is dropped alone (duplicate);
  - a datagram beyond 65535 bytes (oversized), or whose fragments disagree on
    its end (inconsistent), is dropped whole; a fragment other than the last
    whose length is not a multiple of 8, or an empty one, alone (malformed).

`FragmentPath` runs the chain: the whole datagram is classified with its real
key, handed to that flow's actor in this runtime, and if the chain lets it
through the original fragments are sent on, in arrival order (what the
receiver reassembles is what the chain saw); else all of them are dropped.
With the policy's "fragments": "drop", every fragment is dropped at once.

Limit: the actor that sees a datagram is the one of its 5-tuple *in this
runtime*.  If the flow's unfragmented packets are placed on another runtime,
its datagrams update a separate actor here ("side" actors: not migrated, not
replicated, released when idle, at most MAX_SIDE_FLOWS: the oldest goes
first); rules still apply to every datagram, but per-flow NF state is split
between the two.  A side actor becomes the flow's own actor if the switch
later places the flow's unfragmented packets here.
"""
from __future__ import annotations

import struct

from .packet import FLOW, classify, ipv6_walk, l3_offset

MAX_FRAGMENTS = 128      # per datagram: 64 KB in 512-byte fragments; tiny-fragment floods stop here
MAX_DATAGRAM = 65535     # IPv4 total length / IPv6 payload length
MAX_SIDE_FLOWS = 65536   # fragments-only actors; evicting one loses NF state, never a rule

# frames: fragments (received), held (kept for a datagram), dropped (at once: policy_dropped,
# malformed, duplicate, full_*), processed (held, their datagram through the chain: sent,
# tx_failed or chain_dropped), discarded (held, dropped unseen); the rest count datagrams
_COUNTERS = ("fragments", "held", "dropped", "policy_dropped", "reassembled", "processed", "discarded",
             "sent", "tx_failed", "chain_dropped", "chain_dropped_datagrams", "timed_out", "overlapping",
             "oversized", "inconsistent", "bad_datagram", "duplicate", "malformed", "full_datagrams",
             "full_bytes", "too_many_fragments", "side_flows_created", "side_flows_adopted", "side_flows_expired",
             "side_flows_evicted")


class _Datagram:
    __slots__ = ("frames", "pieces", "head", "total", "size", "deadline")

    def __init__(self, deadline: float):
        self.frames: list[bytes] = []   # every fragment, in arrival order
        self.pieces: list[tuple] = []   # (start, end, frame, payload offset in the frame)
        self.head = None                # the offset-0 fragment: (frame,) + _fragment()'s head
        self.total = -1                 # end of the datagram's payload, once the last fragment came
        self.size = 0                   # bytes of frames held
        self.deadline = deadline        # the first fragment's arrival + the timeout, as Linux times a queue


def _fragment(frame, key: bytes):
    """(datagram id, offset, end, more, payload offset, head, largest end) of
    a fragment the parser accepted, or None if its payload is malformed.
    head: (headers end, offset of the byte naming the next header or -1 for
    IPv4, its new value) to rebuild the datagram's headers from this
    fragment if it is the first."""
    l3 = l3_offset(frame)
    if frame[l3] >> 4 == 4:
        ihl = (frame[l3] & 0x0F) * 4
        length = ((frame[l3 + 2] << 8) | frame[l3 + 3]) - ihl
        offset = (((frame[l3 + 6] & 0x1F) << 8) | frame[l3 + 7]) * 8
        more = bool(frame[l3 + 6] & 0x20)
        ident = b"4" + bytes(frame[l3 + 12:l3 + 20]) + bytes(frame[l3 + 9:l3 + 10]) + bytes(frame[l3 + 4:l3 + 6])
        start, head, limit = l3 + ihl, (l3 + ihl, -1, 0), MAX_DATAGRAM - ihl
    else:
        nxt, _, fh, prev = ipv6_walk(frame, l3, len(frame))
        length = l3 + 40 + ((frame[l3 + 4] << 8) | frame[l3 + 5]) - (fh + 8)
        offset = ((frame[fh + 2] << 8) | frame[fh + 3]) & 0xFFF8
        more = bool(frame[fh + 3] & 1)
        ident = b"6" + bytes(frame[l3 + 8:l3 + 40]) + bytes(frame[fh + 4:fh + 8])
        start, head, limit = fh + 8, (fh, prev, nxt), MAX_DATAGRAM - (fh - l3 - 40)
    if length <= 0 or (more and length % 8):
        return None
    return ident + key[40:44], offset, offset + length, more, start, head, limit


class Reassembler:
    """Fragments held per datagram, bounded (see the module's doc)."""

    def __init__(self, max_datagrams: int, max_bytes: int, timeout: float):
        self.max_datagrams, self.max_bytes, self.timeout = max_datagrams, max_bytes, timeout
        self.pending: dict[bytes, _Datagram] = {}  # oldest first (timeouts run in creation order)
        self.bytes_held = 0
        self.frames_held = 0
        self.stats = dict.fromkeys(_COUNTERS, 0)

    def add(self, frame, key: bytes, now: float, tag: bytes = b""):
        """Hold one fragment (`key`: the switch's key for it; `tag`: the
        switch's ingress tag that came in front of it, sent on with it).
        Returns the datagram's fragments, as they are to be sent, and its
        reassembled frame when it is complete, else None (held, or dropped
        and counted)."""
        st = self.stats
        self.expire(now)
        info = _fragment(frame, key)
        if info is None:
            st["malformed"] += 1
            st["dropped"] += 1
            return None
        ident, start, end, more, data_at, head, limit = info
        dg = self.pending.get(ident)
        n = len(tag) + len(frame)
        full = ("full_datagrams" if dg is None and len(self.pending) >= self.max_datagrams else
                "full_bytes" if self.bytes_held + n > self.max_bytes else None)
        if full:
            st[full] += 1
            st["dropped"] += 1
            return None
        if dg is not None:
            for s, e, _, _ in dg.pieces:
                if start < e and s < end:
                    if s <= start and end <= e:  # all of it is held already: a copy, dropped alone
                        st["duplicate"] += 1
                        st["dropped"] += 1
                        return None
                    return self._discard(ident, frame, "overlapping")
        else:
            dg = self.pending[ident] = _Datagram(now + self.timeout)
        frame = bytes(frame)  # the UMEM frame is only ours during the handler
        dg.frames.append(tag + frame)
        dg.size += n
        self.bytes_held += n
        self.frames_held += 1
        st["held"] += 1
        if end > limit:
            return self._discard(ident, None, "oversized")
        if (not more and (dg.total >= 0 and end != dg.total)) or (0 <= dg.total < end) or \
                (not more and any(e > end for _, e, _, _ in dg.pieces)):
            return self._discard(ident, None, "inconsistent")
        if len(dg.frames) > MAX_FRAGMENTS:
            return self._discard(ident, None, "too_many_fragments")
        if not more:
            dg.total = end
        if start == 0:
            dg.head = (frame,) + head
        dg.pieces.append((start, end, frame, data_at))
        if dg.head is None or dg.total < 0 or sum(e - s for s, e, _, _ in dg.pieces) != dg.total:
            return None
        self._release(ident)
        st["reassembled"] += 1
        return dg.frames, _rebuild(dg)

    def _release(self, ident: bytes) -> _Datagram:
        dg = self.pending.pop(ident)
        self.bytes_held -= dg.size
        self.frames_held -= len(dg.frames)
        return dg

    def _discard(self, ident: bytes, extra, why: str | None) -> None:
        """Drop a whole datagram (and `extra`, the fragment that doomed it)."""
        dg = self._release(ident)
        n = len(dg.frames) + (extra is not None)
        self.stats["held"] += extra is not None
        self.stats["discarded"] += n
        if why:
            self.stats[why] += 1

    def expire(self, now: float) -> int:
        """Drop the datagrams whose time is up; returns how many."""
        n = 0
        while self.pending:
            ident, dg = next(iter(self.pending.items()))
            if dg.deadline > now:
                break
            self._discard(ident, None, "timed_out")
            n += 1
        return n


def _rebuild(dg: _Datagram) -> bytes:
    """The whole datagram as one frame, for the chain only (never sent):
    the first fragment's headers, then every fragment's payload in order;
    IPv4 length and fragment fields, IPv6 payload length and the fragment
    header's removal fixed (checksums are not recomputed)."""
    frame, hdr_end, prev, nxt = dg.head
    data = b"".join(bytes(f[at:at + e - s]) for s, e, f, at in sorted(dg.pieces, key=lambda p: p[0]))
    out = bytearray(frame[:hdr_end]) + data
    l3 = l3_offset(frame)
    if prev < 0:  # IPv4: total length, no MF, no offset (DF kept)
        struct.pack_into("!H", out, l3 + 2, hdr_end - l3 + len(data))
        out[l3 + 6] &= 0x40
        out[l3 + 7] = 0
    else:  # IPv6: the header before the fragment header names what followed it
        out[prev] = nxt
        struct.pack_into("!H", out, l3 + 4, hdr_end - l3 - 40 + len(data))
    return bytes(out)


class FragmentPath:
    """A runtime's fragments: reassembly, the chain of the datagram's own
    flow, and what is sent on.  `lookup(key)` finds the runtime's actor of a
    flow, `new_actor(frame, key, direction, l4, replicate)` makes one,
    `transmit(frame)` sends a frame out."""

    def __init__(self, reassembler: Reassembler, lookup, new_actor, transmit, replicator=None):
        self.r = reassembler
        self.stats = reassembler.stats
        self.lookup, self.new_actor, self.transmit = lookup, new_actor, transmit
        self.replicator = replicator
        self.side: dict = {}  # key -> actor of a flow seen here only in fragments

    def on_fragment(self, frame, key: bytes, now: float, mode: str = "reassemble", tag: bytes = b"") -> bool:
        """One fragment (`tag`: what came in front of it, the switch's ingress
        tag); always False (held, or dropped): the fragments of a datagram the
        chain allows are sent, tags and all, when the datagram is complete."""
        st = self.stats
        st["fragments"] += 1
        if mode == "drop":
            st["policy_dropped"] += 1
            st["dropped"] += 1
            return False
        done = self.r.add(frame, key, now, tag)
        if done is not None:
            self._datagram(*done, now)
        return False

    def _datagram(self, frames: list[bytes], whole: bytes, now: float) -> None:
        st = self.stats
        kind, key, direction, l4 = classify(whole)
        if kind != FLOW or l4 < 0:  # e.g. a cut TCP header, ICMPv6 behind a destination option
            st["bad_datagram"] += 1
            st["discarded"] += len(frames)
            return
        st["processed"] += len(frames)
        actor = self.lookup(key) or self.side.get(key)
        if actor is None:
            if len(self.side) >= MAX_SIDE_FLOWS:  # the oldest goes: a flood of datagrams cannot grow this
                self.side.pop(next(iter(self.side))).end()
                st["side_flows_evicted"] += 1
            actor = self.side[key] = self.new_actor(whole, key, direction, l4, False)
            st["side_flows_created"] += 1
        if not actor.on_packet(whole, direction, l4, now):
            st["chain_dropped"] += len(frames)
            st["chain_dropped_datagrams"] += 1
            return
        for f in frames:
            if self.transmit(f):
                st["sent"] += 1
            else:
                st["tx_failed"] += 1

    def adopt(self, key: bytes):
        """The side actor of `key` (None if there is none), handed over to
        become the flow's own: the switch now brings its packets here."""
        actor = self.side.pop(key, None)
        if actor is not None:
            self.stats["side_flows_adopted"] += 1
            if self.replicator is not None and self.replicator.active:
                actor.replicator = self.replicator
                self.replicator.due(actor)
        return actor

    def expire(self, now: float, idle_before: float) -> None:
        """Housekeeping: timed-out datagrams, idle side actors."""
        self.r.expire(now)
        for key in [k for k, a in self.side.items() if a.last_seen < idle_before]:
            self.side.pop(key).end()
            self.stats["side_flows_expired"] += 1

    def status(self) -> dict:
        return {**self.stats, "in_flight": len(self.r.pending), "frames_held": self.r.frames_held,
                "bytes_held": self.r.bytes_held, "side_flows": len(self.side)}

    def limits(self) -> dict:
        r = self.r
        return {"fragment_datagrams": {"limit": r.max_datagrams, "unit": "datagrams being reassembled",
                                       "refused": self.stats["full_datagrams"]},
                "fragment_bytes": {"limit": r.max_bytes, "unit": "bytes of fragments held",
                                   "refused": self.stats["full_bytes"]},
                "fragment_timeout": {"limit": r.timeout, "unit": "seconds to complete a datagram",
                                     "dropped": self.stats["timed_out"]},
                "fragment_side_flows": {"limit": MAX_SIDE_FLOWS, "unit": "flows seen here only in fragments",
                                        "evicted": self.stats["side_flows_evicted"]}}
