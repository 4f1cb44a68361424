"""One actor per flow (paper 3.3): the flow's execution context in a runtime.

It is created on the flow's first frame with the flow's service chain (from
the rules), holds one state per NF of the chain, and passes every packet
through the chain in order, stopping at the first NF that returns False (the
packet is dropped and counted).  Packets are handled inline by `on_packet` (a
function call, as in the paper); migration and replication handle the actor
from the same event loop, and move it between runtimes in one wire format
(`to_wire` / `load_wire`).
"""
from __future__ import annotations

from ..formats.flowkey import describe
from .nf import MAX_STATE_BYTES, NetworkFunction
from .packet import TCP, TCP_FIN, TCP_RST, Packet

MAX_ERRORS_KEPT = 4


class Actor:
    __slots__ = ("key", "proto", "orig_dir", "chain", "rule_id", "nfs", "states", "packets", "bytes",
                 "dropped", "nf_errors", "errors", "first_seen", "last_seen", "fin", "closed_at",
                 "fast_keys", "migration", "replicator", "replica", "snap_count", "snap_version", "too_big",
                 "clock")

    def __init__(self, key: bytes, orig_dir: int, now: float, chain: int = 0,
                 nfs: tuple[NetworkFunction, ...] | list = (), rule_id: int = 0, replicator=None):
        self.key = key
        self.proto = key[36]
        self.orig_dir = orig_dir       # canonical direction (LO_TO_HI/HI_TO_LO) of the first frame
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
        self.fast_keys: list[bytes] = []  # the flow table's fast-path entries for this flow
        self.migration = None             # migration.Outgoing (leaving) or arrivals.Incoming (arriving)
        self.replicator = replicator      # snapshots every K packets go through it (None: no replication)
        self.replica = None               # the peer runtime holding this flow's snapshots
        self.snap_count = 0
        self.snap_version = 0
        self.too_big = 0                  # its state's encoded size if a migration found it too big (-1: unencodable)
        self.clock = now                  # last_seen when the flow table's clock hand last passed it

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

    def state_bytes(self) -> int:
        """Encoded size of the flow's NF states (NF API), what a migration
        carries; over nf.MAX_STATE_BYTES the flow cannot move."""
        return sum(nf.state_bytes(st) for nf, st in zip(self.nfs, self.states))

    # --- the wire format: migration and replication both move an actor this way
    def to_wire(self, now: float) -> dict:
        """Everything another runtime needs to go on with this flow: its chain,
        counters and every NF's state (NF API serialize)."""
        return {"chain": self.chain, "rule": self.rule_id, "orig_dir": self.orig_dir,
                "packets": list(self.packets), "bytes": list(self.bytes), "dropped": self.dropped,
                "age": now - self.first_seen,
                "states": [nf.serialize(st) for nf, st in zip(self.nfs, self.states)]}

    def load_wire(self, wire: dict, now: float) -> None:
        """Take the state of `wire` (from `to_wire` on another runtime); the
        actor must have the same chain.  Raises ValueError, TypeError or
        KeyError on a malformed wire, leaving the actor as it was."""
        if int(wire["chain"]) != self.chain:
            raise ValueError(f"chain {wire['chain']} does not match this actor's {self.chain}")
        if len(wire["states"]) != len(self.nfs):
            raise ValueError("state count does not match the chain")
        states = [nf.deserialize(s) for nf, s in zip(self.nfs, wire["states"])]
        packets, nbytes = [int(x) for x in wire["packets"]], [int(x) for x in wire["bytes"]]
        if len(packets) != 2 or len(nbytes) != 2:
            raise ValueError("packets and bytes are [orig, reply] pairs")
        self.states, self.packets, self.bytes = states, packets, nbytes
        self.dropped = int(wire.get("dropped", 0))
        self.first_seen = now - float(wire.get("age", 0.0))

    def summary(self, detail: bool = True) -> dict:
        out = {
            "key": self.key.hex(),
            "flow": describe(self.key),
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
            out["migrating"] = self.migration.describe()
        if detail:
            try:
                out["state_bytes"] = self.state_bytes()
                out["migratable"] = out["state_bytes"] <= MAX_STATE_BYTES
            except Exception:
                out["migratable"] = False
        elif self.too_big:
            out["migratable"] = False
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
