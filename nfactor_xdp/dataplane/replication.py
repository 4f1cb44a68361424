"""Flow-state replication and recovery (paper 4.3).

Every K packets (and when a flow is created) an actor's wire form (every NF
state, NF API serialize) is sent to its replica: the least loaded running
peer, chosen at its first snapshot; a peer that refuses is avoided for a
while, and the actor then tries the next.  Placement follows the view: when a
peer stops running (failed, leaving, gone) the actors it held are placed anew,
and when a peer runs again (restarted: a new address, an empty store) its
refusal is forgotten and the actors it held, or that had no replica, send it
their snapshot at once, without waiting for K more packets.  Each runtime
keeps one store per peer holding the latest snapshot per flow (versioned: an
old one never overwrites a newer one).

A restarted runtime registers as `starting` (it keeps its flows in the
switch, gets no new ones), fetches its snapshots from every peer, recreates
the actors, replays what arrived meanwhile, and only then reports running.
With takeover on (takeover.py), its peers will usually have taken its flows
already: it then recovers only what they left (offloaded flows), and asks a
peer still taking them again later.

Weak consistency, by design: NF state since a flow's last snapshot is lost in
a crash, at most K-1 packets' worth per flow.
"""
from __future__ import annotations

import bisect
import collections
import os
import time

import msgpack

from ..formats.messages import MessageError, MsgType
from .histogram import RECOVERY_SECONDS, SNAPSHOT_BYTES, Histogram
from .view import LEAVING, RUNNING

MAX_PENDING = 50_000      # actors waiting to be snapshotted; beyond that, shed (counted)
MAX_STORE = 200_000       # snapshots this runtime holds for its peers before it refuses more
MESSAGE_BUDGET = 40_000   # bytes of encoded snapshots per control message (frames are capped at 60,000)
FETCH_TIMEOUT = 0.5
MAX_RECOVERY_BUFFER = 50_000
BUSY_RETRY = 0.02         # seconds before asking again a peer still taking our flows over (takeover.py)
REFUSAL_HOLD = 10.0       # seconds a peer that refused snapshots (full) is avoided, unless it runs again
RESYNC_SLICE = 250        # actors re-sent per flush after a view change: the packet loop never waits long
VERIFY_SLICE = 2000       # recovered flows whose switch entry is checked per housekeeping turn


def _encoded_size(snap: dict) -> int:
    return len(msgpack.packb(snap, use_bin_type=True)) + 8


class Replicator:
    """The replication side of one runtime.

    flows: its FlowTable; view: its View; every: K (0: no replication);
    make_actor(key, orig_dir, chain, rule): a fresh actor; replay(frame):
    handle a held frame as if it had just arrived, True to transmit it;
    transmit(frame); on_recovered(): recovery is over (register as running).
    The control channel comes with `attach`."""

    def __init__(self, flows, view, every: int, *, make_actor, replay, transmit, on_recovered):
        self.flows, self.view, self.every = flows, view, every
        self.make_actor, self.replay, self.transmit, self.on_recovered = make_actor, replay, transmit, on_recovered
        self.before_replay = lambda: None
        self.busy = lambda peer: False  # still taking `peer`'s flows over (takeover.py): its fetches wait
        self.pid = os.getpid()
        # (peer, pid) of processes known dead whose flows were taken over: a snapshot of theirs still on its
        # way is stale (its flow lives here or on another taker now), never stored for a restarted peer to use
        self.dead: set = set()
        # the runtime a flow's switch entry names (None: no entry): a recovered flow placed elsewhere
        # moved on (taken over, or migrated with its replica's drop lost) and is let go (verify)
        self.owner = lambda key: None
        self.unverified: collections.deque[bytes] = collections.deque()
        self.ep = None
        self.pending: dict[bytes, object] = {}            # key -> actor due for a snapshot
        self.stores: dict[int, dict[str, dict]] = {}      # peer id -> key hex -> snapshot
        self.fetch_order: dict[int, list[str]] = {}       # peer id -> its keys, sorted, while it fetches them
        self.refused_by: dict[int, float] = {}            # peer id -> avoided until (monotonic)
        self.peers_seen: dict[int, object] = {}           # running peer id -> its control address
        self.resync: collections.deque[bytes] = collections.deque()  # keys of actors to snapshot again
        view.listeners.append(self.view_changed)
        self.recovering = False
        self.waiting: set[int] = set()
        self.later: dict[int, tuple] = {}  # peer -> (address, after, when): it asked us to come back
        self.recovery = {"phase": "none", "peers_asked": 0, "peers_answered": 0, "snapshots": 0,
                         "actors": 0, "buffered": 0, "replayed": 0, "taken_over": 0, "peers_busy": 0,
                         "placed_elsewhere": 0, "replay_tx_fail": 0, "buffer_overflow": 0, "bad": 0, "seconds": 0.0}
        self.buffer: list[bytes] = []
        self.stats = {"snapshots_sent": 0, "snapshot_messages": 0, "shed": 0, "refused": 0, "too_big": 0,
                      "stored": 0, "stale_ignored": 0, "dropped_on_end": 0, "store_refused": 0, "bad_state": 0,
                      "from_dead": 0}
        self.snapshot_bytes = Histogram(SNAPSHOT_BYTES)      # each snapshot sent, encoded
        self.recovery_seconds = Histogram(RECOVERY_SECONDS)  # one per start: every runtime recovers when it starts

    def attach(self, ep) -> None:
        self.ep = ep

    @property
    def active(self) -> bool:
        """Actors replicate: K > 0 and a control channel to reach peers."""
        return self.every > 0 and self.ep is not None

    # --- sending ----------------------------------------------------------------
    def choose_replica(self, exclude=()) -> int | None:
        peers = self.view.peers((RUNNING,), exclude=exclude)
        if not peers:
            return None
        # on another host first (paper section 4): a host's failure then loses no replica
        mine = (self.view.entries.get(self.view.me) or {}).get("host", 0)
        return min(peers, key=lambda e: (e.get("host", 0) == mine, self.view.cpu(e, 0.0), e["id"]))["id"]

    def _refusing(self) -> set[int]:
        now = time.monotonic()
        return {p for p, until in self.refused_by.items() if until > now}

    def view_changed(self) -> None:
        """A new view.  A peer that stopped running or restarted (its address
        changed) no longer holds our snapshots: its actors are placed anew.  A
        peer that runs (again) is asked again, and every actor it held or
        that had no replica sends a snapshot now (idle flows included)."""
        seen = {e["id"]: self.view.addr(e["id"]) for e in self.view.peers((RUNNING,))}
        gone = {p for p, addr in self.peers_seen.items() if seen.get(p) != addr}
        new = {p for p, addr in seen.items() if self.peers_seen.get(p) != addr}
        self.peers_seen = seen
        for p in gone | new:
            self.refused_by.pop(p, None)
        if not (gone or new) or not self.active:
            return
        for key, actor in self.flows.items():
            if actor.replicator is None:
                continue
            if actor.replica in gone:
                actor.replica = None
            if actor.replica is None:
                self.resync.append(key)
        self._refill()

    def _refill(self) -> None:
        """Move the next actors to snapshot again into `pending`, up to a slice."""
        while self.resync and len(self.pending) < RESYNC_SLICE:
            actor = self.flows.get(self.resync.popleft())
            if actor is not None:
                self.pending.setdefault(actor.key, actor)

    def due(self, actor) -> None:
        """Called by an actor every K packets (and once when it is created)."""
        if len(self.pending) >= MAX_PENDING and actor.key not in self.pending:
            self.stats["shed"] += 1  # never stall packets: the next K will try again
            return
        self.pending[actor.key] = actor

    def flush(self) -> None:
        """Send the due snapshots, grouped per replica, in bounded messages."""
        if not self.pending or self.ep is None:
            return
        now = time.monotonic()
        refusing = self._refusing()
        batches: dict[int, list[dict]] = {}
        for key, actor in self.pending.items():
            if self.flows.get(key) is not actor or actor.migration is not None:
                continue
            if actor.replica is None or actor.replica in refusing or self.view.addr(actor.replica) is None:
                actor.replica = self.choose_replica(exclude=refusing)
                if actor.replica is None:
                    continue  # no peer to hold it now: the next view with one sends it
            try:
                snap = self.snapshot(actor, now)
            except Exception:  # an NF that cannot serialize this state: skip the flow, not the others
                self.stats["bad_state"] += 1
                continue
            actor.snap_version += 1
            snap["v"] = actor.snap_version
            batches.setdefault(actor.replica, []).append(snap)
        self.pending.clear()
        self._refill()
        for replica, snaps in batches.items():
            self.send(replica, snaps)

    @staticmethod
    def snapshot(actor, now: float) -> dict:
        return {"key": actor.key.hex(), "v": actor.snap_version, "actor": actor.to_wire(now)}

    def send(self, replica: int, snaps: list[dict], drop: list[str] = ()) -> None:
        addr = self.view.addr(replica)
        if addr is None:
            return  # not running: its actors are placed anew (view_changed)
        chunk, size = [], 0
        for s in snaps:
            n = _encoded_size(s)  # one larger than the budget goes alone (nf.MAX_STATE_BYTES fits a message)
            self.snapshot_bytes.observe(n)
            if chunk and size + n > MESSAGE_BUDGET:
                self._send_chunk(replica, addr, chunk, [])
                chunk, size = [], 0
            chunk.append(s)
            size += n
        if chunk or drop:
            self._send_chunk(replica, addr, chunk, list(drop))

    def _send_chunk(self, replica: int, addr, snaps: list[dict], drop: list[str]) -> None:
        try:
            self.ep.request(addr, MsgType.SNAPSHOT, {"from": self.view.me, "pid": self.pid, "snaps": snaps,
                                                     "drop": drop},
                            lambda msg, r=replica, s=snaps: self._stored(r, s, msg), timeout=0.3, retries=2,
                            on_timeout=lambda rid, s=snaps: self._again(s))
        except MessageError:  # a state too big for any message (over nf.MAX_STATE_BYTES): not replicated
            self.stats["too_big"] += len(snaps)
            return
        self.stats["snapshots_sent"] += len(snaps)
        self.stats["snapshot_messages"] += 1

    def _stored(self, replica: int, snaps: list[dict], msg) -> None:
        if not msg.body.get("ok"):
            self.stats["refused"] += 1
            self.refused_by[replica] = time.monotonic() + REFUSAL_HOLD
            self._again(snaps)  # to another replica now, if there is one

    def _again(self, snaps: list[dict]) -> None:
        """Snapshots that did not get stored (no answer, refused): their actors send again."""
        self.resync.extend(bytes.fromhex(s["key"]) for s in snaps)
        self._refill()

    def flow_ended(self, actor) -> None:
        """The flow ended or left: its replica forgets it."""
        self.pending.pop(actor.key, None)
        if actor.replica is not None and self.ep is not None:
            self.stats["dropped_on_end"] += 1
            self.send(actor.replica, [], drop=[actor.key.hex()])

    # --- holding peers' snapshots -------------------------------------------------
    def on_snapshot(self, msg, addr) -> None:
        b = msg.body
        peer = b.get("from")
        if not isinstance(peer, int) or not isinstance(b.get("snaps"), list):
            self.ep.reply(msg, addr, {"ok": False, "error": "bad snapshot message"})
            return
        if (peer, b.get("pid")) in self.dead:
            self.stats["from_dead"] += len(b["snaps"])
            self.ep.reply(msg, addr, {"ok": True})  # (the sender is dead: nobody waits for the answer)
            return
        held = sum(len(s) for s in self.stores.values())
        if self.view.leaving or held + len(b["snaps"]) > MAX_STORE:
            self.stats["store_refused"] += len(b["snaps"])
            self.ep.reply(msg, addr, {"ok": False, "error": "refused: leaving or full"})
            return
        store = self.stores.setdefault(peer, {})
        for s in b["snaps"]:
            if not isinstance(s, dict) or not isinstance(s.get("key"), str) or not isinstance(s.get("v"), int):
                continue
            old = store.get(s["key"])
            if old is not None and old["v"] >= s["v"]:
                self.stats["stale_ignored"] += 1  # never let an old snapshot overwrite a newer one
                continue
            store[s["key"]] = s
            self.stats["stored"] += 1
        for k in b.get("drop") or []:
            store.pop(k, None)
        self.ep.reply(msg, addr, {"ok": True})

    def on_fetch(self, msg, addr) -> None:
        """A restarted peer asks for its snapshots, a message-sized page at a
        time, in key order.  The order is sorted once, on the first page, and
        each next page found by bisection: a page costs what it carries, not
        the whole store (which, sorted again for every page of 25,000 flows,
        held this runtime's packet loop long enough to overflow its ring)."""
        b = msg.body
        peer = b.get("id")
        if self.busy(peer):
            # taking its flows over: none of its snapshots may go back to it before that is done
            self.ep.reply(msg, addr, {"ok": True, "busy": True, "snaps": [], "more": True})
            return
        store = self.stores.get(peer, {})
        start = b.get("after")
        keys = self.fetch_order.get(peer)
        if not isinstance(start, str) or keys is None:
            keys = self.fetch_order[peer] = sorted(store)
        at = bisect.bisect_right(keys, start) if isinstance(start, str) else 0
        page, size, i = [], 0, at
        while i < len(keys):
            s = store.get(keys[i])
            if s is not None:  # (ended since the order was taken: skipped)
                n = _encoded_size(s)
                if page and size + n > MESSAGE_BUDGET:
                    break
                page.append(s)
                size += n
            i += 1
        more = i < len(keys)
        if not more:
            self.fetch_order.pop(peer, None)
        self.ep.reply(msg, addr, {"ok": True, "snaps": page, "more": more})

    # --- recovery -------------------------------------------------------------------
    def start_recovery(self) -> None:
        self.recovering = True
        self.recovery.update(phase="fetching", started=time.monotonic())
        peers = self.view.peers((RUNNING, LEAVING))
        self.waiting = {e["id"] for e in peers}
        self.recovery["peers_asked"] = len(peers)
        for e in peers:  # in parallel: one request per peer, pages follow
            self._fetch(e["id"], self.view.addr(e["id"], (RUNNING, LEAVING)), None)
        if not peers:
            self.finish_recovery()

    def _fetch(self, peer: int, addr, after: str | None) -> None:
        self.ep.request(addr, MsgType.SNAPSHOT_FETCH, {"id": self.view.me, "after": after},
                        lambda msg, p=peer, a=addr, at=after: self._fetched(p, a, msg, at), timeout=FETCH_TIMEOUT,
                        retries=3, on_timeout=lambda rid, p=peer: self._peer_done(p))

    def tick(self, now: float) -> None:
        """Ask again the peers that were busy taking our flows over."""
        for peer, (addr, after, when) in list(self.later.items()):
            if now >= when:
                del self.later[peer]
                self._fetch(peer, addr, after)

    def _fetched(self, peer: int, addr, msg, after: str | None = None) -> None:
        if msg.body.get("busy"):
            self.recovery["peers_busy"] += 1
            self.later[peer] = (addr, after, time.monotonic() + BUSY_RETRY)
            return
        snaps = msg.body.get("snaps") or []
        more = bool(msg.body.get("more") and snaps)
        if more:  # the next page first: the peer prepares it while these are rebuilt here
            self._fetch(peer, addr, snaps[-1]["key"])
        for s in snaps:
            try:
                self.restore(s, peer)
            except Exception:  # one bad snapshot must not stop the recovery of the others
                self.recovery["bad"] += 1
        self.recovery["snapshots"] += len(snaps)
        if not more:
            self._peer_done(peer)

    def restore(self, s: dict, peer: int) -> None:
        """A snapshot from `peer`.  Two peers may hold one flow (its replica
        changed): the newest version wins.  The actor's replica is the peer
        that held it, so it is told when the flow ends."""
        key = bytes.fromhex(s["key"])
        wire, version = s["actor"], int(s["v"])
        actor = self.flows.get(key)
        if actor is None:
            actor = self.make_actor(key, int(wire["orig_dir"]), int(wire["chain"]), int(wire["rule"]))
        elif actor.snap_version >= version:
            return
        actor.load_wire(wire, time.monotonic())
        actor.snap_version, actor.replica = version, peer
        if key not in self.flows:
            self.flows.add(actor)
            self.recovery["actors"] += 1
            self.unverified.append(key)

    def _peer_done(self, peer: int) -> None:
        self.waiting.discard(peer)
        self.recovery["peers_answered"] = self.recovery["peers_asked"] - len(self.waiting)
        if not self.waiting and self.recovering:
            self.finish_recovery()

    def verify(self) -> None:
        """After a recovery, a slice of the recovered flows at a time (not
        during it: a map lookup per flow would slow the recovery by a third):
        one whose switch entry names another runtime moved on, and its actor
        is let go quietly (no NF callback, its entry untouched), before
        anything here (a migration to shed load) could act on it."""
        for _ in range(min(VERIFY_SLICE, len(self.unverified))):
            key = self.unverified.popleft()
            owner = self.owner(key)
            if owner is not None and owner != self.view.me:
                actor = self.flows.get(key)
                if actor is not None and actor.migration is None:
                    self.flows.remove(key)
                    self.pending.pop(key, None)
                    self.recovery["placed_elsewhere"] += 1

    def hold(self, frame) -> None:
        """A frame that arrived while recovering: kept until its actor is back."""
        if len(self.buffer) >= MAX_RECOVERY_BUFFER:
            self.recovery["buffer_overflow"] += 1
            return
        self.buffer.append(bytes(frame))
        self.recovery["buffered"] += 1

    def finish_recovery(self) -> None:
        self.recovering = False
        self.before_replay()  # the actors are back: the runtime takes its offloaded flows back
        held, self.buffer = self.buffer, []
        for data in held:
            frame = bytearray(data)
            if self.replay(memoryview(frame)) and not self.transmit(frame):
                self.recovery["replay_tx_fail"] += 1
            self.recovery["replayed"] += 1
        self.recovery["phase"] = "done"
        took = time.monotonic() - self.recovery.get("started", time.monotonic())
        self.recovery["seconds"] = round(took, 4)
        self.recovery_seconds.observe(took)
        self.on_recovered()

    def status(self) -> dict:
        return {**self.stats, "pending": len(self.pending), "snapshot_bytes": self.snapshot_bytes.to_dict(),
                "recovery_seconds": self.recovery_seconds.to_dict(),
                "holding": {str(p): len(s) for p, s in self.stores.items()},
                "recovery": {k: v for k, v in self.recovery.items() if k != "started"}}
