"""How flows end in a runtime, and the bound on how many it holds.

A flow's actor is released when the flow ends: TCP close (FIN both ways, or
RST) after CLOSE_LINGER, no frame for idle_timeout, or given up to make room
for a new flow once the runtime holds max_flows actors (the flow table picks
which: one-packet flows first, see flowtable.py; O(1) amortized per new flow).
Releasing a flow lets its NFs see the state one last time, makes its replica
forget it, and deletes its switch entry: the switch's LRU table then holds
live flows only, and with flow_table_size above runtimes x max_flows it never
has to evict one.  A flow that migrates away is not released here: its actor
lives on at the target, and its entry points there.

Switch entries are deleted after the packet batch, and only if the entry still
places the flow here and no new actor took the key meanwhile: a late frame may
have placed the ended flow anew (here or elsewhere), and that placement stays.
"""
from __future__ import annotations

CLOSE_LINGER = 2.0  # seconds an actor outlives its TCP close (last ACKs, retransmits)


class Lifetime:
    """The end of a runtime's flows.  flows: its FlowTable; replicator: its
    Replicator; stats: the runtime's stats dict (counted in place); maps: its
    NodeMaps once it runs on a node (None: no switch entries to delete here);
    on a worker host, ask_agent(keys) asks the switch agent to delete them."""

    def __init__(self, rt_id: int, flows, replicator, stats: dict, *, max_flows: int, idle_timeout: float):
        self.rt_id, self.flows, self.replicator, self.stats = rt_id, flows, replicator, stats
        self.max_flows, self.idle_timeout = max_flows, idle_timeout
        self.maps = None
        self.ask_agent = None
        self.revoke = lambda actors, then=None: 0  # takes offloaded flows back from the switch first (offloader.py)
        self.ended: list[bytes] = []  # keys whose switch entry is still to delete
        self.evicted_offloaded: list = []  # given up while the switch handled them: revoked in flush()
        for name in ("flows_expired", "flows_evicted", "dropped_flow_cap",
                     "switch_entries_deleted", "switch_entries_kept", "switch_delete_errors",
                     "switch_entries_asked"):
            stats.setdefault(name, 0)

    def admit(self) -> bool:
        """Before a new flow's actor: room for it, giving up flows if needed.
        False if none could be given up (every one looked at is migrating):
        the caller refuses the new flow (counted: dropped_flow_cap)."""
        return len(self.flows) < self.max_flows or self.make_room()

    def make_room(self) -> bool:
        flows = self.flows
        while len(flows) >= self.max_flows:
            victim = flows.victim()
            if victim is None:
                self.stats["dropped_flow_cap"] += 1
                return False
            if victim.offload is not None:
                self.evicted_offloaded.append(victim)  # taken back from the switch with the batch's others
            self.release(victim, end=victim.offload is None)
            self.stats["flows_evicted"] += 1
        return True

    def expire(self, now: float) -> None:
        """Release actors idle for idle_timeout, or closed for CLOSE_LINGER."""
        idle, closed = now - self.idle_timeout, now - CLOSE_LINGER
        gone = [a for a in self.flows.values()
                if a.migration is None and (a.last_seen < idle or (a.closed_at and a.closed_at < closed))]
        # (an offloaded flow's last_seen is the switch's, folded in before); its NFs see
        # their state for the last time once the switch's last counts are in
        offloaded = [a for a in gone if a.offload is not None]
        for actor in gone:
            self.release(actor, end=actor.offload is None)
        self.revoke(offloaded, then=_end_all)
        self.stats["flows_expired"] += len(gone)
        self.flows.compact()
        self.flush()

    def release(self, actor, end: bool = True) -> None:
        """end=False: the caller ends the actor later (after its last counts)."""
        self.flows.remove(actor.key)
        if end:
            actor.end()
        self.replicator.flow_ended(actor)
        if self.maps is not None or self.ask_agent is not None:
            self.ended.append(actor.key)

    def flush(self) -> None:
        """Delete the switch entries of the flows that ended here (those the
        switch handled alone taken back first, one grace period for all)."""
        if self.evicted_offloaded:
            evicted, self.evicted_offloaded = self.evicted_offloaded, []
            self.revoke(evicted, then=_end_all)
        ended, self.ended = self.ended, []
        st = self.stats
        if self.maps is None and ended:  # a worker host: the agent deletes those that still name us
            asked = [key for key in ended if key not in self.flows]
            st["switch_entries_kept"] += len(ended) - len(asked)
            st["switch_entries_asked"] += len(asked)
            if asked:
                self.ask_agent(asked)
            return
        for key in ended:
            if key in self.flows:  # a frame came after the end: the flow started again here
                st["switch_entries_kept"] += 1
                continue
            try:
                deleted = self.maps.delete_flow(key, self.rt_id)
            except OSError:
                st["switch_delete_errors"] += 1
                continue
            st["switch_entries_deleted" if deleted else "switch_entries_kept"] += 1

    def limit(self) -> dict:
        return {"limit": self.max_flows, "unit": "flows (actors) in this runtime",
                "evicted": self.stats["flows_evicted"], "refused": self.stats["dropped_flow_cap"]}


def _end_all(actors) -> None:
    for actor in actors:
        actor.end()
