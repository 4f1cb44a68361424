"""Flow-state replication and recovery (paper 4.3).

Every K packets (and when a flow ends) an actor's NF states are snapshotted
(NF API serialize) and sent to its replica: the least loaded running peer,
chosen when the actor is created; a peer may refuse, and the actor then
tries the next.  Each runtime keeps one store per peer holding the latest
snapshot per flow (versioned: an old one never overwrites a newer one).

A restarted runtime registers as `starting` (it keeps its flows in the
switch, gets no new ones), fetches its snapshots from every peer, recreates
the actors, replays what arrived meanwhile, and only then reports running.

Weak consistency, by design: NF state since a flow's last snapshot is lost in
a crash, at most K-1 packets' worth per flow.
"""
from __future__ import annotations

import time

import msgpack

from . import nf as nf_api
from ..formats.messages import MsgType

SNAPSHOT_EVERY = 10       # K: packets between snapshots (paper: 10)
MAX_PENDING = 50_000      # actors waiting to be snapshotted; beyond that, shed (counted)
MAX_STORE = 200_000       # snapshots this runtime holds for its peers before it refuses more
MESSAGE_BUDGET = 40_000   # bytes of encoded snapshots per control message (frames are capped at 60,000)
FETCH_TIMEOUT = 0.5
MAX_RECOVERY_BUFFER = 50_000


def _encoded_size(snap: dict) -> int:
    return len(msgpack.packb(snap, use_bin_type=True)) + 8


class Replicator:
    def __init__(self, runtime, every: int = SNAPSHOT_EVERY):
        self.rt = runtime
        self.every = every
        self.pending: dict[bytes, object] = {}            # key -> actor due for a snapshot
        self.stores: dict[int, dict[str, dict]] = {}      # peer id -> key hex -> snapshot
        self.refused_by: set[int] = set()
        self.recovering = False
        self.recovery = {"phase": "none", "peers_asked": 0, "peers_answered": 0, "snapshots": 0,
                         "actors": 0, "buffered": 0, "replayed": 0, "buffer_overflow": 0, "seconds": 0.0}
        self.buffer: list[tuple[bytes, int, int]] = []
        self.stats = {"snapshots_sent": 0, "snapshot_messages": 0, "shed": 0, "refused": 0,
                      "stored": 0, "stale_ignored": 0, "dropped_on_end": 0}

    # --- sending ----------------------------------------------------------------
    def choose_replica(self, exclude=()) -> int | None:
        peers = [e for e in self.rt.view.get("runtimes", [])
                 if e.get("state") == "running" and e.get("id") != self.rt.id and e.get("addr")
                 and e.get("id") not in exclude]
        if not peers:
            return None
        return min(peers, key=lambda e: ((e.get("load") or {}).get("cpu", 0.0), e["id"]))["id"]

    def due(self, actor) -> None:
        """Called by an actor every K packets."""
        if len(self.pending) >= MAX_PENDING and actor.key not in self.pending:
            self.stats["shed"] += 1  # never stall packets: the next K will try again
            return
        self.pending[actor.key] = actor

    def flush(self) -> None:
        """Send the due snapshots, grouped per replica, in bounded messages."""
        if not self.pending or self.rt.ep is None:
            return
        batches: dict[int, list[dict]] = {}
        for key, actor in self.pending.items():
            if self.rt.flows.get(key) is not actor or actor.migration is not None:
                continue
            if actor.replica is None or actor.replica in self.refused_by:
                actor.replica = self.choose_replica(exclude=self.refused_by)
                if actor.replica is None:
                    continue
            actor.snap_version += 1
            batches.setdefault(actor.replica, []).append(self.snapshot(actor))
        self.pending.clear()
        for replica, snaps in batches.items():
            self.send(replica, snaps)

    def snapshot(self, actor) -> dict:
        return {"key": actor.key.hex(), "v": actor.snap_version, "chain": actor.chain, "rule": actor.rule_id,
                "orig_dir": actor.orig_dir, "packets": actor.packets, "bytes": actor.bytes,
                "dropped": actor.dropped, "states": [nf.serialize(st) for nf, st in zip(actor.nfs, actor.states)]}

    def send(self, replica: int, snaps: list[dict], drop: list[str] = ()) -> None:
        addr = self.rt.migrator.peer(replica)
        if addr is None:
            self.refused_by.add(replica)
            return
        chunk, size = [], 0
        for s in snaps:
            n = _encoded_size(s)
            if n > MESSAGE_BUDGET:
                self.stats["too_big"] = self.stats.get("too_big", 0) + 1  # a state too big for one message
                continue
            if chunk and size + n > MESSAGE_BUDGET:
                self._send_chunk(replica, addr, chunk, [])
                chunk, size = [], 0
            chunk.append(s)
            size += n
        if chunk or drop:
            self._send_chunk(replica, addr, chunk, list(drop))

    def _send_chunk(self, replica: int, addr, snaps: list[dict], drop: list[str]) -> None:
        self.stats["snapshots_sent"] += len(snaps)
        self.stats["snapshot_messages"] += 1
        self.rt.ep.request(addr, MsgType.SNAPSHOT, {"from": self.rt.id, "snaps": snaps, "drop": drop},
                           lambda msg, r=replica: self._stored(r, msg), timeout=0.3, retries=2)

    def _stored(self, replica: int, msg) -> None:
        if not msg.body.get("ok"):
            self.stats["refused"] += 1
            self.refused_by.add(replica)  # its actors pick another replica at their next snapshot

    def flow_ended(self, actor) -> None:
        """The flow ended or left: its replica forgets it."""
        if actor.replica is not None:
            self.stats["dropped_on_end"] += 1
            self.send(actor.replica, [], drop=[actor.key.hex()])

    # --- holding peers' snapshots -------------------------------------------------
    def on_snapshot(self, msg, addr) -> None:
        b = msg.body
        peer = b.get("from")
        if not isinstance(peer, int) or not isinstance(b.get("snaps"), list):
            self.rt.ep.send(addr, MsgType.REPLY, {"ok": False, "error": "bad snapshot message"}, rid=msg.rid)
            return
        held = sum(len(s) for s in self.stores.values())
        if self.rt.leaving or held + len(b["snaps"]) > MAX_STORE:
            self.rt.ep.send(addr, MsgType.REPLY, {"ok": False, "error": "refused: leaving or full"}, rid=msg.rid)
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
        self.rt.ep.send(addr, MsgType.REPLY, {"ok": True}, rid=msg.rid)

    def on_fetch(self, msg, addr) -> None:
        """A restarted peer asks for its snapshots, a message-sized page at a time."""
        b = msg.body
        store = self.stores.get(b.get("id"), {})
        keys = sorted(store)
        start = b.get("after")
        if isinstance(start, str):
            keys = [k for k in keys if k > start]
        page, size = [], 0
        for k in keys:
            s = store[k]
            n = _encoded_size(s)
            if page and size + n > MESSAGE_BUDGET:
                break
            page.append(s)
            size += n
        more = len(page) < len(keys)
        self.rt.ep.send(addr, MsgType.REPLY, {"ok": True, "snaps": page, "more": more}, rid=msg.rid)

    # --- recovery -------------------------------------------------------------------
    def start_recovery(self, view: dict) -> None:
        self.recovering = True
        self.recovery.update(phase="fetching", started=time.monotonic())
        peers = [e for e in view.get("runtimes", [])
                 if e.get("id") != self.rt.id and e.get("state") in ("running", "leaving") and e.get("addr")]
        self.waiting = {e["id"] for e in peers}
        self.recovery["peers_asked"] = len(peers)
        for e in peers:  # in parallel: one request per peer, pages follow
            self._fetch(e["id"], tuple(e["addr"]), None)
        if not peers:
            self.finish_recovery()

    def _fetch(self, peer: int, addr, after: str | None) -> None:
        self.rt.ep.request(addr, MsgType.SNAPSHOT_FETCH, {"id": self.rt.id, "after": after},
                           lambda msg, p=peer, a=addr: self._fetched(p, a, msg), timeout=FETCH_TIMEOUT, retries=3,
                           on_timeout=lambda rid, p=peer: self._peer_done(p))

    def _fetched(self, peer: int, addr, msg) -> None:
        snaps = msg.body.get("snaps") or []
        for s in snaps:
            try:
                self.restore(s)
            except Exception:  # one bad snapshot must not stop the recovery of the others
                self.recovery["bad"] = self.recovery.get("bad", 0) + 1
        self.recovery["snapshots"] += len(snaps)
        if msg.body.get("more") and snaps:
            self._fetch(peer, addr, snaps[-1]["key"])
        else:
            self._peer_done(peer)

    def restore(self, s: dict) -> None:
        from .actor import Actor
        key = bytes.fromhex(s["key"])
        if key in self.rt.flows:
            return
        nfs = [self.rt.nf_instance(t) for t in nf_api.decode_chain(int(s["chain"]))]
        actor = Actor(key, int(s["orig_dir"]), self.rt.now, int(s["chain"]), nfs, int(s["rule"]),
                      replicator=self)
        actor.states = [nf.deserialize(st) for nf, st in zip(nfs, s["states"])]
        actor.packets, actor.bytes = list(s["packets"]), list(s["bytes"])
        actor.dropped = int(s.get("dropped", 0))
        actor.snap_version = int(s["v"])
        self.rt.flows[key] = actor
        self.recovery["actors"] += 1

    def _peer_done(self, peer: int) -> None:
        self.waiting.discard(peer)
        self.recovery["peers_answered"] = self.recovery["peers_asked"] - len(self.waiting)
        if not self.waiting and self.recovering:
            self.finish_recovery()

    def hold(self, frame, direction: int, l4: int) -> None:
        """A frame that arrived while recovering: kept until its actor is back."""
        if len(self.buffer) >= MAX_RECOVERY_BUFFER:
            self.recovery["buffer_overflow"] += 1
            return
        self.buffer.append((bytes(frame), direction, l4))
        self.recovery["buffered"] += 1

    def finish_recovery(self) -> None:
        self.recovering = False
        held, self.buffer = self.buffer, []
        for data, _direction, _l4 in held:
            frame = bytearray(data)
            if self.rt.handle_slow(memoryview(frame)):
                self.rt.transmit(frame)
            self.recovery["replayed"] += 1
        self.recovery["phase"] = "done"
        self.recovery["seconds"] = round(time.monotonic() - self.recovery.get("started", time.monotonic()), 4)
        self.rt.register()  # now running

    def status(self) -> dict:
        return {**self.stats, "pending": len(self.pending),
                "holding": {str(p): len(s) for p, s in self.stores.items()},
                "recovery": {k: v for k, v in self.recovery.items() if k != "started"}}
