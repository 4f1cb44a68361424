"""A runtime's offloaded flows (docs/offload.md): when to ask a flow's chain,
which slot of the switch's offloads array each offloaded flow uses, handing a
flow to the switch, and taking it back with exact counts.

The runtime owns a fixed range of slots.  Offloading writes the slot (its
parameters, then its action) and then names it in the flow's switch entry.
Revoking unnames the slot in the flow's entry, clears its action in place,
waits one grace period (after it, no XDP program that read the old entry or
the old action is still running: nothing more is counted, and the slot may
serve another flow), then folds the slot's last counts into the actor and
frees the slot.  Revocations are batched: one grace period for many flows.

The actor's NF states and `actor.offload_base` (the slot's counts folded so
far) always change together, so a snapshot or a migration taken at any time
carries a consistent pair: a runtime recovering the flow folds exactly what
the switch counted after that snapshot.

A flow's chain is asked after its 2nd, 4th, 8th... packet (never for every
packet: an http_parser chain would pay on each).  The hand-over keeps the
flow's frames in order if none of them is queued for the runtime when the
switch starts forwarding the flow itself: so it happens after a packet batch
that emptied the receive ring (everything received was sent), once the flow
has been quiet for QUIET seconds (no frame of it still on its way).  A flow
that is never quiet (a steady fast one) is handed over after PATIENCE
seconds anyway; a frame of it that was on its way is still processed and
sent, after the switch's own (counted: `late`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from .offload_spec import KernelCounts
from .packet import TCP

NEVER = 0
FIRST_ASK = 2
QUIET = 0.001     # seconds without a frame of the flow: none is on its way to the runtime any more
PATIENCE = 0.1    # seconds a flow waits for a quiet moment before it is handed over anyway


class Offloads:
    """slots: kern/offloads.OffloadSlots (or a stand-in); entries: an object
    with set_offload(key, value, runtime) -> bool (kern/maps.NodeMaps);
    grace: waits one grace period (kern/grace.wait)."""

    def __init__(self, rt_id: int, slots, entries, grace: Callable[[], float], enabled: bool = True):
        self.rt_id, self.slots, self.entries, self.grace = rt_id, slots, entries, grace
        self.enabled = enabled and slots is not None
        self.free = list(reversed(slots.range(rt_id))) if slots is not None else []
        self.slot_of: dict[bytes, int] = {}   # flow key -> slot
        self.actors: dict[bytes, object] = {}  # flow key -> actor, while offloaded
        self.candidates: dict = {}             # key -> (actor, since): to ask at a quiet moment
        self.revoking: list = []               # taken back after this packet batch
        self.stats = {"offloaded": 0, "revoked": 0, "no_slot": 0, "entry_gone": 0, "grace_periods": 0,
                      "punted": 0, "late": 0, "busy": 0, "not_offloadable": 0, "adopted": 0, "dropped_slots": 0}

    def __len__(self) -> int:
        return len(self.slot_of)

    # --- deciding ----------------------------------------------------------
    def watch(self, actor) -> None:
        """A new actor: ask its chain after its second packet (a flow of one
        packet, a scan's or a flood's, never takes a slot)."""
        actor.ask_at = FIRST_ASK if self.enabled else NEVER

    def after_packet(self, actor, frame, l4: int) -> None:
        """Called after a frame of a watched actor (ask_at set) went through its chain."""
        if actor.offload is not None:
            if actor.proto == TCP and l4 >= 0 and frame[l4 + 13] & actor.offload.spec.punt_tcp_flags:
                self.stats["punted"] += 1
                # a punted frame may change what the chain needs (a closing flow is released soon anyway)
                if not actor.closed_at and actor.offload_decision().spec != actor.offload.spec:
                    self.revoking.append(actor)
            else:
                self.stats["late"] += 1  # it left the switch before the flow was offloaded
            return
        if actor.packets[0] + actor.packets[1] >= actor.ask_at:
            actor.ask_at *= 2
            if actor.key in self.candidates:
                return
            decision = actor.offload_decision()
            if decision.spec is None:
                self.stats["not_offloadable"] += 1
                actor.offload_reason = decision.reason
            else:  # handed over at a quiet moment (asked again then: a packet may change the answer)
                self.candidates[actor.key] = (actor, actor.last_seen)

    def flush(self, eligible: Callable, now: float, drained: bool) -> None:
        """Between packet batches: take back the flows whose chain changed its
        answer, and offload the candidates whose chain agrees, once the ring
        is drained and each is quiet (see above).  eligible(actor): the
        runtime's say (not migrating, not recovering)."""
        if self.revoking:
            revoking, self.revoking = self.revoking, []
            self.revoke(revoking)
        if not drained:
            return
        for key, (actor, since) in list(self.candidates.items()):
            if now - actor.last_seen < QUIET:
                if now - since < PATIENCE:
                    continue  # a frame of it may still be on its way: at the next quiet moment
                self.stats["busy"] += 1
            del self.candidates[key]
            if actor.offload is not None or actor.ask_at == NEVER or not eligible(actor):
                continue
            decision = actor.offload_decision()
            if decision.spec is None:
                self.stats["not_offloadable"] += 1
                actor.offload_reason = decision.reason
                continue
            self.offload(actor, decision)

    def offload(self, actor, decision) -> bool:
        if actor.key in self.slot_of:  # an earlier actor of the flow's, released, is still being revoked
            return False
        if not self.free:
            self.stats["no_slot"] += 1
            return False
        slot = self.free.pop()
        self.slots.zero(slot)
        self.slots.write(slot, decision.spec, self.rt_id)   # its action last
        base = self.slots.read(slot)  # zero: nothing reaches the slot before the entry names it
        if not self.entries.set_offload(actor.key, slot + 1, self.rt_id):  # gone, or placed elsewhere now
            self.slots.clear_action(slot)
            self.grace()  # the slot may be written again at once: nothing may still count into it
            self.free.append(slot)
            self.stats["entry_gone"] += 1
            return False
        actor.offload, actor.offload_reason, actor.offload_base = decision, None, base
        self.slot_of[actor.key] = slot
        self.actors[actor.key] = actor
        self.stats["offloaded"] += 1
        if actor.replicator is not None:
            actor.replicator.due(actor)  # its replica learns it is offloaded (the base) now
        return True

    # --- counting ------------------------------------------------------------
    def fold(self, actor) -> bool:
        """Fold what the switch counted since the last fold; True if anything."""
        slot = self.slot_of.get(actor.key)
        if slot is None:
            return False
        now = self.slots.read(slot)
        delta = now - actor.offload_base
        actor.offload_base = now
        if not delta:
            return False
        actor.absorb(KernelCounts.from_slot(delta, actor.orig_dir))
        return True

    def fold_all(self) -> list:
        """Fold every offloaded flow; the actors whose counts moved."""
        return [a for a in list(self.actors.values()) if self.fold(a)]

    # --- taking flows back ------------------------------------------------------
    def revoke(self, actors: Iterable) -> int:
        """Take these actors' flows back from the switch (those offloaded),
        with one grace period; returns how many were."""
        batch = [a for a in actors if a.key in self.slot_of]
        if not batch:
            return 0
        for actor in batch:
            # the entry first: once the grace period is over, no frame can reach the slot through
            # it, so the slot may serve another flow at once
            self.entries.set_offload(actor.key, 0, self.rt_id)  # (gone with the flow is fine)
            self.slots.clear_action(self.slot_of[actor.key])
        self.grace()
        self.stats["grace_periods"] += 1
        for actor in batch:
            self.fold(actor)
            slot = self.slot_of.pop(actor.key)
            del self.actors[actor.key]
            self.slots.zero(slot)
            self.free.append(slot)
            actor.offload = actor.offload_base = None
            if actor.ask_at != NEVER:
                actor.ask_at = actor.packets[0] + actor.packets[1] + 1  # decided again on its next packet
        self.stats["revoked"] += len(batch)
        return len(batch)

    def revoke_keys(self, keys: Iterable[bytes]) -> int:
        return self.revoke([self.actors[k] for k in keys if k in self.actors])

    def revoke_all(self) -> int:
        return self.revoke(list(self.actors.values()))

    # --- after a crash -------------------------------------------------------------
    def adopt(self, flows, entries: Iterable[tuple[bytes, int]]) -> None:
        """A recovering runtime takes its slots back.  entries: (key, offload)
        of the switch entries placing flows here.  A slot whose flow came back
        from a snapshot taken while it was offloaded keeps going: the counts
        since that snapshot are folded in.  Any other slot of ours is cleared
        (its flow comes back inline, from its snapshot or anew)."""
        mine = self.slots.range(self.rt_id)
        named = {}
        for key, value in entries:
            if value and value - 1 in mine:
                named[value - 1] = key
        stale = []
        for slot in mine:
            if not self.slots.action(slot):
                continue
            key = named.get(slot)
            actor = flows.get(key) if key is not None else None
            # the decision the snapshot was taken under (the NFs' own answer may need a packet
            # first: a restored firewall re-checks its rules on the next one)
            decision = actor.offload_saved if actor is not None and actor.offload_base is not None else None
            if decision is None or self.slots.owner(slot) != self.rt_id:
                stale.append((slot, key))
                continue
            actor.offload, actor.offload_saved = decision, None
            self.slot_of[key], self.actors[key] = slot, actor
            self.free.remove(slot)
            self.fold(actor)
            self.stats["adopted"] += 1
        for slot, key in stale:
            if key is not None:
                self.entries.set_offload(key, 0, self.rt_id)
            self.slots.clear_action(slot)
        if stale:
            self.grace()
            for slot, key in stale:
                actor = flows.get(key) if key is not None else None
                if actor is not None:
                    actor.offload_base = actor.offload_saved = None
                self.slots.zero(slot)
            self.stats["dropped_slots"] += len(stale)

    def status(self) -> dict:
        return {"enabled": self.enabled, "flows": len(self.slot_of), "free_slots": len(self.free), **self.stats}
