"""One actor per flow (paper 3.3): the flow's execution context in a runtime.

It is created on the flow's first frame with the flow's service chain (from
the rules), holds one state per NF of the chain, and passes every packet
through the chain in order, stopping at the first NF that returns False (the
packet is dropped and counted).  Packets are handled inline by `on_packet` (a
function call, as in the paper); migration and replication handle the actor
from the same event loop, and move it between runtimes in one wire format
(`to_wire` / `load_wire`).

Offload (docs/offload.md): `offload_decision` asks the chain what it still
needs; while the switch handles the flow by that decision (kept in
`offload`), `absorb` folds the switch's counts into the actor and its NFs.
"""
from __future__ import annotations

from dataclasses import replace

from ..formats.flowkey import describe
from .nf import MAX_STATE_BYTES, NetworkFunction
from .offload_spec import DROP, ChainOffload, KernelCounts, combine
from .packet import TCP, TCP_FIN, TCP_RST, Packet

MAX_ERRORS_KEPT = 4


class Actor:
    __slots__ = ("key", "proto", "orig_dir", "chain", "rule_id", "nfs", "states", "packets", "bytes",
                 "dropped", "nf_errors", "errors", "first_seen", "last_seen", "fin", "closed_at",
                 "fast_keys", "migration", "replicator", "replica", "snap_count", "snap_version", "too_big",
                 "clock", "offload", "offload_base", "offload_reason", "ask_at", "offload_saved", "observing",
                 "copies")

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
        self.offload: ChainOffload | None = None  # the decision the switch applies now (None: inline)
        self.offload_base = None          # the switch's counts folded in so far (offloader.py)
        self.offload_reason: str | None = None  # why the chain last refused offload
        self.ask_at = 0                   # ask the chain after this many packets (0: never; offloader.py)
        self.offload_saved: ChainOffload | None = None  # the decision a snapshot was taken under (recovery)
        self.observing: tuple | None = None  # observe mode: the NFs fed copies, while copies may still come
        self.copies = 0                   # copies those NFs saw (observe mode)

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

    def observe(self, frame, direction: int, l4: int, now: float) -> None:
        """A copy of a frame the switch forwarded (observe mode): only the NFs
        that observe see it, and their verdicts do not count (the frame has
        left).  The flow's counters come from the switch's counts (absorb)."""
        observers = self.observing
        if observers is None:
            return
        self.copies += 1
        if self.replicator is not None:
            self.snap_count += 1
            if self.snap_count >= self.replicator.every:
                self.snap_count = 0
                self.replicator.due(self)
        pkt = Packet(frame, 0 if direction == self.orig_dir else 1, l4, self.proto, now)
        nfs, states = self.nfs, self.states
        for i in observers:
            try:
                nfs[i].process_packet(pkt, states[i])
            except Exception as e:
                self.nf_errors += 1
                if len(self.errors) < MAX_ERRORS_KEPT:
                    self.errors.append(f"{nfs[i].name} (observing): {type(e).__name__}: {e}")

    def offload_decision(self, observe_ok: bool = False) -> ChainOffload:
        """The chain's combined answer (offload_spec.combine) from each NF's
        offload(state).  Asked after a packet went through the chain; changes
        nothing.  An NF that raises counts as needing every packet.  Punt
        flags are cleared for a flow that is not TCP (they mean nothing there).
        observe_ok: the flow's rule asks for observe mode."""
        answers, names = [], []
        for nf, state in zip(self.nfs, self.states):
            names.append(nf.name)
            try:
                answer = nf.offload(state)
            except Exception as e:
                return ChainOffload(None, f"{nf.name}.offload() raised {type(e).__name__}: {e}")
            answers.append(answer)
            if answer is not None and getattr(answer, "action", None) == DROP:
                break  # the NFs after a drop never see the flow's frames
        decision = combine(answers, names, observe_ok)
        spec = decision.spec
        if spec is not None and spec.punt_tcp_flags and self.proto != TCP:
            decision = replace(decision, spec=replace(spec, punt_tcp_flags=0))
        return decision

    def absorb(self, counts: KernelCounts, decision: ChainOffload | None = None) -> None:
        """Fold counts the switch made under `decision` (by default
        `self.offload`, set by the runtime when it offloaded the flow; a flow
        being taken back is inline again when its last counts come), given
        only once each: the actor's own
        counters take every frame the switch saw, and each NF absorbs the
        frames as it would have seen them inline (ChainOffload.counts_for).
        An NF that raises is counted as an NF error; the others still absorb."""
        decision = decision or self.offload
        if decision is None or decision.spec is None:
            raise ValueError("absorb: the flow is not offloaded")
        if not counts:
            return
        for d in (0, 1):
            self.packets[d] += counts.packets[d]
            self.bytes[d] += counts.bytes[d]
        self.dropped += sum(counts.packets if decision.spec.action == DROP else counts.bucket_dropped)
        if counts.last_seen is not None:
            self.last_seen = max(self.last_seen, counts.last_seen / 1e9)
        for i, (nf, state) in enumerate(zip(self.nfs, self.states)):
            mine = decision.counts_for(i, counts)
            if not mine:
                continue
            try:
                nf.absorb(state, mine)
            except Exception as e:
                self.nf_errors += 1
                if len(self.errors) < MAX_ERRORS_KEPT:
                    self.errors.append(f"{nf.name}.absorb: {type(e).__name__}: {e}")

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
                "states": [nf.serialize(st) for nf, st in zip(self.nfs, self.states)],
                # offloaded: how, and the switch's counts already in the states (a recovering runtime
                # takes the flow's slot back and folds the rest)
                "offload": _offload_to_wire(self.offload, self.offload_base) if self.offload is not None else None}

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
        self.offload_saved, self.offload_base = _offload_from_wire(wire.get("offload"))

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
        if self.offload is not None:
            out["offload"] = self.offload.describe()
            if self.offload.observers:
                out["observed_copies"] = self.copies
        elif self.offload_reason:
            out["offload_reason"] = self.offload_reason
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


_BASE_PAIRS = ("packets", "bytes", "bucket_dropped", "bucket_dropped_bytes", "observed", "observe_lost")


_SPEC_FIELDS = ("action", "punt_tcp_flags", "pps", "burst", "bps", "byte_burst", "observe")


def _offload_to_wire(decision: ChainOffload, base) -> dict:
    spec = decision.spec
    return {"spec": [int(getattr(spec, f)) for f in _SPEC_FIELDS], "owner": decision.owner,
            "observers": list(decision.observers),
            "base": {**{n: list(getattr(base, n)) for n in _BASE_PAIRS}, "last_seen_ns": base.last_seen_ns}}


def _offload_from_wire(wire) -> tuple:
    """A snapshot's offload: (ChainOffload, kern/offloads.SlotCounts), or
    (None, None); malformed: ValueError."""
    if wire is None:
        return None, None
    from ..kern.offloads import SlotCounts  # only a recovering runtime on a node needs it
    from .offload_spec import Action, Offload
    try:
        fields = dict(zip(_SPEC_FIELDS, (int(x) for x in wire["spec"])))
        fields["action"] = Action(fields["action"])
        decision = ChainOffload(Offload(**fields), owner=int(wire["owner"]),
                                observers=tuple(int(i) for i in wire.get("observers", ())))
        base = wire["base"]
        pairs = {n: (int(base[n][0]), int(base[n][1])) for n in _BASE_PAIRS if n in base}
        return decision, SlotCounts(**pairs, last_seen_ns=int(base.get("last_seen_ns", 0)))
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"bad offload in the wire: {e}") from None
