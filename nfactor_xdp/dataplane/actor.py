"""One actor per flow (paper 3.3): the flow's execution context in a runtime.

It is created on the flow's first frame with the flow's service chain (from
the rules), holds one state per NF of the chain, and passes every packet
through the chain in order, stopping at the first NF that returns False (the
packet is dropped and counted).  Packets are its main messages and are
handled inline by `on_packet` (a function call, as in the paper); other
messages (migration, replication) go through `mailbox` and are handled by the
same event loop.
"""
from __future__ import annotations

from collections import deque

from .packet import TCP, TCP_FIN, TCP_RST, Packet, describe_key

MAX_ERRORS_KEPT = 4


class Actor:
    __slots__ = ("key", "proto", "orig_dir", "chain", "rule_id", "nfs", "states", "packets", "bytes",
                 "dropped", "nf_errors", "errors", "first_seen", "last_seen", "fin", "closed_at",
                 "mailbox", "fast_keys", "migration", "buffer", "replicator", "replica", "snap_count",
                 "snap_version")

    def __init__(self, key: bytes, orig_dir: int, now: float, chain: int = 0, nfs=(), rule_id: int = 0,
                 replicator=None):
        self.key = key
        self.proto = key[36]
        self.orig_dir = orig_dir       # canonical direction (packet.LO_TO_HI/HI_TO_LO) of the first frame
        self.chain = chain
        self.rule_id = rule_id
        self.nfs = list(nfs)           # the runtime's NF instances, in chain order
        self.states = [nf.allocate_flow_state() for nf in self.nfs]
        self.packets = [0, 0]          # [orig, reply]
        self.bytes = [0, 0]
        self.dropped = 0
        self.nf_errors = 0
        self.errors: list[str] = []
        self.first_seen = now
        self.last_seen = now
        self.fin = 0                   # bit per direction that sent a FIN
        self.closed_at = 0.0           # when FIN both ways or RST was seen
        self.mailbox: deque = deque()
        self.fast_keys: list[bytes] = []  # the runtime's fast-path entries for this flow
        self.migration = None             # migration.Outgoing while leaving, "in" while arriving
        self.buffer = None                # frames held while arriving (until the state comes)
        self.replicator = replicator      # snapshots every K packets go through it (None: no replication)
        self.replica = None               # the peer runtime holding this flow's snapshots
        self.snap_count = 0
        self.snap_version = 0

    def on_packet(self, frame, direction: int, l4: int, now: float) -> bool:
        """Process one frame of the flow; True forwards it, False drops it."""
        d = 0 if direction == self.orig_dir else 1
        self.packets[d] += 1
        self.bytes[d] += len(frame)
        self.last_seen = now
        if self.replicator is not None:
            self.snap_count += 1
            if self.snap_count >= self.replicator.every:
                self.snap_count = 0
                self.replicator.due(self)  # sent after this batch, not in the packet's path
        if self.proto == TCP and l4 >= 0:
            flags = frame[l4 + 13]
            if flags & (TCP_FIN | TCP_RST):
                self._closing(flags, d, now)
        if not self.nfs:
            return True
        pkt = Packet(frame, d, l4, self.proto, now)
        try:
            for nf, state in zip(self.nfs, self.states):
                if not nf.process_packet(pkt, state):
                    self.dropped += 1
                    return False
        except Exception as e:  # an NF bug drops the packet, never the runtime
            self.nf_errors += 1
            self.dropped += 1
            if len(self.errors) < MAX_ERRORS_KEPT:
                self.errors.append(f"{type(e).__name__}: {e}")
            return False
        return True

    def _closing(self, flags: int, d: int, now: float) -> None:
        if flags & TCP_RST:
            self.closed_at = self.closed_at or now
        else:
            self.fin |= 1 << d
            if self.fin == 3:
                self.closed_at = self.closed_at or now

    def end(self) -> None:
        """The actor is released: let each NF see its state one last time."""
        for nf, state in zip(self.nfs, self.states):
            try:
                nf.flow_ended(state)
            except Exception:
                pass

    def summary(self, detail: bool = True) -> dict:
        out = {
            "key": self.key.hex(),
            "flow": describe_key(self.key),
            "chain": [nf.name for nf in self.nfs],
            "rule": self.rule_id,
            "packets": {"orig": self.packets[0], "reply": self.packets[1]},
            "bytes": {"orig": self.bytes[0], "reply": self.bytes[1]},
            "dropped": self.dropped,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "closed": bool(self.closed_at),
        }
        if self.replica is not None:
            out["replica"] = self.replica
            out["snapshot_version"] = self.snap_version
        if self.migration is not None:
            out["migrating"] = "in" if self.migration == "in" else f"out to {self.migration.target}"
        if self.nf_errors:
            out["nf_errors"] = self.nf_errors
            out["errors"] = self.errors
        if detail:
            nfs = {}
            for nf, state in zip(self.nfs, self.states):
                try:
                    nfs[nf.name] = nf.summary(state)
                except Exception as e:
                    nfs[nf.name] = {"error": f"{type(e).__name__}: {e}"}
            out["nfs"] = nfs
        return out
