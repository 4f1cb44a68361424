"""Taking a crashed peer's flows over, at once (adoption on detection).

Without it, a runtime killed with -9 loses every frame of its flows until a
new process has started and recovered them from the snapshots its peers hold
(replication.py): half a second and more.  With it, the peers that hold those
snapshots make the actors themselves and have the switch point the flows'
entries at them, tens of milliseconds after the death; the restarted runtime
comes back empty.

When: the view marks a peer failed *and* `exited`: the supervisor saw its
process die (controller.on_exited).  A runtime failed by missed heartbeats
may be alive, starved of CPU, with frames in its ring: taking its flows
would give them two actors, so it is left to register again.

How, per peer, in slices (the packet loop never waits long):
1. the peer's store is taken out of the replicator whole, so a restarted
   peer asking for its snapshots meanwhile gets none of them (it is told to
   ask again later, `busy`, until the takeover is over: it must not start
   handling frames of flows whose entries are still being moved);
2. each snapshot becomes an actor here, *before* its entry is moved, so the
   first frame steered here finds it;
3. FLOW_TAKE to the switch agent, the one writer of placement changes: it
   moves the entries that still name the dead runtime and are not forwarded
   from an active offload slot (those go on in XDP without a runtime; the
   restarted runtime recovers them, so their snapshots go back to the store).
   Two peers holding one flow (its replica changed) cannot both get it: the
   agent serialises, the second finds it elsewhere and lets its actor go.
4. the moved flows replicate from here (a first snapshot to a running peer).
If the agent does not answer, the entries themselves say which flows are ours.

NF state is the snapshot's: within K-1 packets of what crossed, as after a
recovery.  Frames that reached the dead runtime are lost with it; frames
held by its restarted process for flows taken meanwhile are dropped there
and counted (Runtime.replay_held), never made into a second actor.
"""
from __future__ import annotations

import collections
import time

from ..formats.messages import MsgType
from .view import FAILED

SLICE = 256          # flows made into actors per step (20-30 us each, their entries moved after)
IN_FLIGHT = 4        # FLOW_TAKE requests outstanding at once
TAKE_TIMEOUT = 0.2   # seconds per try; the agent may be in a migration's grace period
TAKE_RETRIES = 4


class Takeover:
    """replicator: the runtime's Replicator (its stores, due());
    flows: FlowTable; view: View; make_actor(key, orig_dir, chain, rule);
    entry_runtime(key): the runtime the switch entry names (None: no entry);
    agent: the switch agent's control address (ep comes with attach)."""

    def __init__(self, replicator, flows, view, *, make_actor, entry_runtime, arrivals=None, enabled: bool = True):
        """arrivals: the runtime's Migrator (arriving_from, complete): a flow the
        dead runtime was migrating here is completed from its snapshot."""
        self.replicator, self.flows, self.view = replicator, flows, view
        self.make_actor, self.entry_runtime, self.arrivals = make_actor, entry_runtime, arrivals
        self.enabled = enabled
        self.ep = self.agent = None
        self.queue: dict[int, collections.deque] = {}   # dead peer -> its snapshots still to take
        self.in_flight: dict[int, int] = {}              # dead peer -> FLOW_TAKE requests outstanding
        self.seen: set[tuple[int, object]] = replicator.dead  # (peer, pid) whose death was acted on
        self.stats = {"peers": 0, "snapshots": 0, "taken": 0, "offloaded": 0, "elsewhere": 0, "gone": 0,
                      "had_actor": 0, "arrivals_completed": 0, "bad": 0, "agent_timeouts": 0, "refused": 0,
                      "seconds": 0.0}
        self.started: dict[int, float] = {}
        # called as a takeover starts and ends: the runtime freezes what exists for the cyclic
        # collector, which would otherwise walk every actor and snapshot while thousands are made
        self.freeze = lambda: None
        view.listeners.append(self.view_changed)

    def attach(self, ep, agent) -> None:
        self.ep, self.agent = ep, agent

    def busy(self, peer: int) -> bool:
        """Still taking `peer`'s flows: its snapshots must not be handed out."""
        return peer in self.queue or self.in_flight.get(peer, 0) > 0

    # --- when ----------------------------------------------------------------
    def view_changed(self) -> None:
        if not self.enabled or self.ep is None or self.view.leaving or self.replicator.recovering:
            return
        for rt, e in self.view.entries.items():
            if rt == self.view.me or e.get("state") != FAILED or not e.get("exited"):
                continue
            death = (rt, e.get("pid"))
            if death not in self.seen:
                self.seen.add(death)
                self.start(rt)

    def start(self, peer: int) -> None:
        store = self.replicator.stores.pop(peer, None)
        self.replicator.fetch_order.pop(peer, None)
        if not store:
            return
        self.freeze()
        self.queue[peer] = collections.deque(store.values())
        self.in_flight.setdefault(peer, 0)
        self.started[peer] = time.monotonic()
        self.stats["peers"] += 1
        self.stats["snapshots"] += len(store)

    # --- how -----------------------------------------------------------------
    def step(self, now: float) -> None:
        """Take the next slice of each dead peer's flows (called by the packet loop)."""
        for peer in list(self.queue):
            if self.in_flight[peer] >= IN_FLIGHT:
                continue
            q = self.queue[peer]
            made = []
            while q and len(made) < SLICE:
                snap = q.popleft()
                actor = self._actor(snap, now, peer)
                if actor is not None:
                    made.append((actor, snap))
            if not q:
                del self.queue[peer]
            if made:
                self._take(peer, made)
            else:
                self._maybe_done(peer)

    def _actor(self, snap: dict, now: float, peer: int):
        try:
            key = bytes.fromhex(snap["key"])
            wire = snap["actor"]
            arriving = self.arrivals.arriving_from(key, f"rt{peer}") if self.arrivals is not None else None
            if arriving is not None:
                # the dead runtime was migrating it here: its state will never come, its last
                # snapshot completes the migration (what arrived meanwhile is replayed after it)
                self.arrivals.complete(arriving, wire, now)
                self.stats["arrivals_completed"] += 1
                actor = arriving
            elif self.flows.get(key) is not None:
                self.stats["had_actor"] += 1  # (a flow that came here meanwhile: its actor is the live one)
                return None
            else:
                actor = self.make_actor(key, int(wire["orig_dir"]), int(wire["chain"]), int(wire["rule"]))
                actor.load_wire(wire, now)
                self.flows.add(actor)  # before the entry moves: the first frame steered here finds it
        except Exception:  # one bad snapshot must not stop the others
            self.stats["bad"] += 1
            return None
        # the dead runtime's offload slot is not ours: the agent moves only flows not forwarded from one
        actor.offload_base = actor.offload_saved = None
        actor.snap_version, actor.replica = int(snap.get("v", 0)), None
        return actor

    def _take(self, peer: int, made: list) -> None:
        self.in_flight[peer] += 1
        keys = [a.key.hex() for a, _ in made]
        self.ep.request(self.agent, MsgType.FLOW_TAKE, {"from": peer, "to": self.view.me, "keys": keys},
                        lambda msg, p=peer, m=made: self._taken(p, m, msg), timeout=TAKE_TIMEOUT,
                        retries=TAKE_RETRIES, on_timeout=lambda rid, p=peer, m=made: self._no_answer(p, m))

    def _taken(self, peer: int, made: list, msg) -> None:
        b = msg.body if isinstance(msg.body, dict) else {}
        if not b.get("ok"):
            # the agent refused the whole request (the peer runs again, or we do not): nothing moved
            self.stats["refused"] += 1
            self._settle(peer, made, moved=set(), back=set(range(len(made))))
            return
        kept = b.get("kept") or {}
        back = set(kept.get("offloaded") or [])
        for why in ("offloaded", "elsewhere", "gone"):
            self.stats[why] += len(kept.get(why) or [])
        self._settle(peer, made, moved=set(b.get("moved") or []), back=back)

    def _no_answer(self, peer: int, made: list) -> None:
        """The agent never answered: the entries say which flows are ours now."""
        self.stats["agent_timeouts"] += 1
        moved = set()
        for i, (actor, _) in enumerate(made):
            try:
                if self.entry_runtime(actor.key) == self.view.me:
                    moved.add(i)
            except OSError:
                pass
        self._settle(peer, made, moved=moved, back=set(range(len(made))) - moved)

    def _settle(self, peer: int, made: list, moved: set, back: set) -> None:
        """Keep the moved flows' actors, let the others go (the flow is not
        ours: no NF callback, no switch entry touched); snapshots of flows
        that stay with the dead runtime go back to its store for its recovery."""
        store = None
        for i, (actor, snap) in enumerate(made):
            if i in moved:
                self.stats["taken"] += 1
                if actor.replicator is not None:
                    actor.replicator.due(actor)  # a replica of its own, from here
                continue
            if self.flows.get(actor.key) is actor:
                self.flows.remove(actor.key)
            if i in back:
                if store is None:
                    store = self.replicator.stores.setdefault(peer, {})
                old = store.get(snap["key"])
                if old is None or old["v"] < snap["v"]:
                    store[snap["key"]] = snap
        self.in_flight[peer] -= 1
        self._maybe_done(peer)

    def _maybe_done(self, peer: int) -> None:
        if peer not in self.queue and not self.in_flight.get(peer):
            self.in_flight.pop(peer, None)
            started = self.started.pop(peer, None)
            if started is not None:
                self.stats["seconds"] = round(time.monotonic() - started, 4)
                self.freeze()

    def status(self) -> dict:
        return {"enabled": self.enabled, "working": sorted(set(self.queue) | set(self.in_flight)), **self.stats}
