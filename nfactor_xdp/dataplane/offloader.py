"""A runtime's offloaded flows (docs/offload.md): when to ask a flow's chain,
which slot of the switch's offloads array each offloaded flow uses, handing a
flow to the switch, and taking it back with exact counts.

The runtime owns a fixed range of slots.  Offloading writes the slot (its
parameters, then its action) and then names it in the flow's switch entry.
Revoking unnames the slot in the flow's entry and clears its action in place:
from then on the flow's frames come here again and its actor handles them
inline.  The slot's last counts are final only after a grace period (after
it, no XDP program that read the old entry or the old action is still
running); the grace period is waited by a thread of its own (kern/grace.py
Background), so the packet loop never stalls on one.  When it has passed,
poll() folds the slot's last counts into the actor, frees the slot, and calls
the revocation's `then` (an expiry ends its actors only then, so their NFs
see their final counts).  Revocations are batched: one grace period for many
flows.  A flow taken back is not offloaded again before its slot is free;
a migration takes its state only after its counts are final (settle).

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
sent (counted: `late`), and counted again (`late_behind`) if by then the
switch had already handled a frame of the flow, which may have overtaken it.
Because grace periods never block the loop, such a frame is sent within
microseconds of its arrival.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from .offload_spec import KernelCounts
from .packet import TCP, classify

OBSERVE_BATCH = 512  # copies read from the observe ring per loop turn (then a packet batch)

NEVER = 0
FIRST_ASK = 2
QUIET = 0.001     # seconds without a frame of the flow: none is on its way to the runtime any more
PATIENCE = 0.1    # seconds a flow waits for a quiet moment before it is handed over anyway


class Offloads:
    """slots: kern/offloads.OffloadSlots (or a stand-in); entries: an object
    with set_offload(key, value, runtime) -> bool (kern/maps.NodeMaps);
    grace: kern/grace.Background (or Inline)."""

    def __init__(self, rt_id: int, slots, entries, grace, enabled: bool = True):
        self.rt_id, self.slots, self.entries, self.grace = rt_id, slots, entries, grace
        self.enabled = enabled and slots is not None
        self.free = list(reversed(slots.range(rt_id))) if slots is not None else []
        self.slot_of: dict[bytes, int] = {}   # flow key -> slot
        self.actors: dict[bytes, object] = {}  # flow key -> actor, while offloaded
        self.candidates: dict = {}             # key -> (actor, since): to ask at a quiet moment
        self.revoking: list = []               # taken back after this packet batch
        self.returning: dict[bytes, object] = {}  # key -> actor: taken back, its counts final after the grace period
        self.pending: list = []                # (ticket, [(actor or None, slot, decision)], then), oldest first
        self.observe_rules = frozenset()       # rule ids whose flows may be observed (rules.Policy.observe_rules)
        self.ring = None                       # the runtime's observe ring (kern/observe.ObserveRing), if any
        self.watching: dict[int, object] = {}  # slot -> actor, while copies of its flow may come
        self.now = 0.0                         # the runtime's clock, for the copies
        self.stats = {"offloaded": 0, "revoked": 0, "no_slot": 0, "entry_gone": 0, "grace_periods": 0,
                      "punted": 0, "late": 0, "late_behind": 0, "busy": 0, "not_offloadable": 0, "adopted": 0,
                      "dropped_slots": 0, "settled_early": 0, "copies": 0, "copies_stale": 0,
                      "no_ring": 0, "copies_before_recovery": 0}

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
                if not actor.closed_at and self._decision(actor).spec != actor.offload.spec:
                    self.revoking.append(actor)
            else:
                self.stats["late"] += 1  # it left the switch before the flow was offloaded
                if self.slots.read(self.slot_of[actor.key]):
                    self.stats["late_behind"] += 1  # the switch has handled a frame of the flow since
            return
        if actor.packets[0] + actor.packets[1] >= actor.ask_at:
            actor.ask_at *= 2
            if actor.key in self.candidates:
                return
            decision = self._decision(actor)
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
            if key in self.returning:
                continue  # its last slot is not free yet: offloaded again once it is
            if now - actor.last_seen < QUIET:
                if now - since < PATIENCE:
                    continue  # a frame of it may still be on its way: at the next quiet moment
                self.stats["busy"] += 1
            del self.candidates[key]
            if actor.offload is not None or actor.ask_at == NEVER or not eligible(actor):
                continue
            decision = self._decision(actor)
            if decision.spec is None:
                self.stats["not_offloadable"] += 1
                actor.offload_reason = decision.reason
                continue
            self.offload(actor, decision)

    def _decision(self, actor):
        return actor.offload_decision(actor.rule_id in self.observe_rules)

    def offload(self, actor, decision) -> bool:
        if actor.key in self.slot_of or actor.key in self.returning:  # (an earlier actor of the flow's)
            return False
        if decision.observers and self.ring is None:
            self.stats["no_ring"] += 1
            actor.offload_reason = "observe mode without an observe ring (an older node?)"
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
            self._after_grace([(None, slot, None)], None)  # nothing may still count into it when reused
            self.stats["entry_gone"] += 1
            return False
        actor.offload, actor.offload_reason, actor.offload_base = decision, None, base
        if decision.observers:
            actor.observing = decision.observers
            self.watching[slot] = actor
        self.slot_of[actor.key] = slot
        self.actors[actor.key] = actor
        self.stats["offloaded"] += 1
        if actor.replicator is not None:
            actor.replicator.due(actor)  # its replica learns it is offloaded (the base) now
        return True

    # --- observe mode: the copies --------------------------------------------------
    def on_copy(self, slot: int, direction: int, frame) -> None:
        actor = self.watching.get(slot)
        if actor is None:  # (cannot happen: a slot is watched until its copies are read)
            self.stats["copies_stale"] += 1
            return
        self.stats["copies"] += 1
        if frame[12] == 8 and frame[13] == 0 and frame[14] == 0x45:  # IPv4 without options
            l4 = 34
        else:
            l4 = classify(frame)[3]
        actor.observe(frame, direction, l4, self.now)

    def drain(self, now: float, limit: int = OBSERVE_BATCH) -> int:
        """Copies from the observe ring to their actors (up to `limit`)."""
        self.now = now
        return self.ring.drain(self.on_copy, limit)

    def drain_all(self) -> None:
        """Every copy in the ring, before a frame of an observed flow is
        handled inline (a punted FIN after its data) or a slot is freed."""
        if self.ring is not None:
            self.ring.drain(self.on_copy)

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
    def revoke(self, actors: Iterable, then: Callable | None = None) -> int:
        """Take these actors' flows back from the switch (those offloaded):
        inline at once, their last counts folded after one grace period for
        all, when `then(actors)` is called (at once if none was offloaded).
        Returns how many were offloaded."""
        batch = [a for a in actors if a.key in self.slot_of]
        if not batch:
            if then is not None:
                then([])
            return 0
        items = []
        for actor in batch:
            slot = self.slot_of.pop(actor.key)
            del self.actors[actor.key]
            # the entry first: once the grace period is over, no frame can reach the slot through
            # it, so the slot may serve another flow at once
            self.entries.set_offload(actor.key, 0, self.rt_id)  # (gone with the flow is fine)
            self.slots.clear_action(slot)
            items.append((actor, slot, actor.offload))
            self.returning[actor.key] = actor
            actor.offload = None  # its next frames are handled here
            if actor.ask_at != NEVER:
                actor.ask_at = actor.packets[0] + actor.packets[1] + 1  # decided again on its next packet
        self._after_grace(items, then)
        return len(batch)

    def _after_grace(self, items: list, then) -> None:
        self.pending.append((self.grace.request(), items, then))
        self.stats["grace_periods"] += 1
        self.poll()

    def poll(self) -> None:
        """Finish the revocations whose grace period has passed (cheap: call
        it every loop turn while `pending`)."""
        while self.pending and self.grace.done(self.pending[0][0]):
            _, items, then = self.pending.pop(0)
            self._finish(items, then)

    def _finish(self, items: list, then) -> None:
        if any(slot in self.watching for _, slot, _ in items):
            self.drain_all()  # every copy the slots made is in the ring now: to their actors first
        actors = []
        for actor, slot, decision in items:
            if actor is not None and self.watching.get(slot) is actor:
                del self.watching[slot]
                actor.observing = None
            if actor is not None:
                final = self.slots.read(slot) - actor.offload_base
                if final:
                    actor.absorb(KernelCounts.from_slot(final, actor.orig_dir), decision)
                actor.offload_base = None
                if self.returning.get(actor.key) is actor:
                    del self.returning[actor.key]
                actors.append(actor)
            self.slots.zero(slot)
            self.free.append(slot)
        self.stats["revoked"] += len(actors)
        if then is not None:
            then(actors)

    def settle(self, keys: Iterable[bytes]) -> None:
        """Make the counts of these flows, if being taken back, final now (a
        migration's state must carry them).  Normally their grace period is
        long over: a migration sends the state after the switch agent's own
        grace period, which began after the revocation."""
        want = [k for k in keys if k in self.returning]
        if not want:
            return
        tickets = [t for t, items, _ in self.pending if any(a is not None and a.key in want for a, _, _ in items)]
        if tickets and not self.grace.done(max(tickets)):
            self.stats["settled_early"] += 1
            self.grace.wait_for(max(tickets))
        self.poll()

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
        (its flow comes back inline, from its snapshot or anew).  An observed
        flow's copies since its snapshot count as lost (the dead process never
        read them), those already in this process's ring too: the ring is
        read from the moment the slots' counts were taken on."""
        mark = self.ring.producer() if self.ring is not None else None
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
            if decision.observers and self.ring is None:
                stale.append((slot, key))
                continue
            actor.offload, actor.offload_saved = decision, None
            self.slot_of[key], self.actors[key] = slot, actor
            self.free.remove(slot)
            if decision.observers:
                # the copies made since the snapshot went to the dead process's ring: a gap
                actor.observing = decision.observers
                self.watching[slot] = actor
                now = self.slots.read(slot)
                delta, actor.offload_base = now - actor.offload_base, now
                if delta:
                    actor.absorb(KernelCounts.from_slot(delta, actor.orig_dir).unseen())
            else:
                self.fold(actor)
            self.stats["adopted"] += 1
        for slot, key in stale:
            if key is not None:
                self.entries.set_offload(key, 0, self.rt_id)
            self.slots.clear_action(slot)
        if stale:
            self.grace.wait_for(self.grace.request())  # (recovering: nothing is forwarded yet)
            for slot, key in stale:
                actor = flows.get(key) if key is not None else None
                if actor is not None:
                    actor.offload_base = actor.offload_saved = None
                self.slots.zero(slot)
            self.stats["dropped_slots"] += len(stale)
        if mark is not None:
            self.stats["copies_before_recovery"] = self.ring.skip_to(mark)

    def status(self) -> dict:
        return {"enabled": self.enabled, "flows": len(self.slot_of), "free_slots": len(self.free),
                "returning": len(self.returning), "observing": len(self.watching), **self.stats,
                **({"ring_most_behind": self.ring.stats["most_behind"]} if self.ring is not None else {})}
