"""Flow migration (paper 5): the three passes, driven by the source actor.

    source S                        target T                 switch agent
    1. MIGRATE_CREATE  ───────────► actor, buffering
    2. MIGRATE_MOVE  ─────────────────────────────────────► entry -> T, grace period,
                                                             marker into S's port
       ... frames of the flow keep coming to S, then the marker
    3. MIGRATE_STATE (NF states) ─► replay buffer, go on
       release the actor

Every request has a timeout and retries (messages.Endpoint).  A marker that
does not come back in time is asked for again (the MOVE is idempotent).  A
failure before the move leaves the flow where it was; after it, this first
version rolls the switch entry back to S when the target or the agent does
not answer (see the issue notes for what is still missing).
"""
from __future__ import annotations

import os
import struct
import time

from ..formats.messages import MessageError, MsgType
from .packet import HI_TO_LO, TCP

MARKER_TIMEOUT = 0.3   # seconds to wait for the marker before asking for it again
MARKER_RESENDS = 5
MAX_BUFFER = 20000     # frames a target buffers per flow before it drops (counted)


def marker_frame(key: bytes, orig_dir: int, payload: bytes) -> bytes:
    """A frame of the flow (its first packet's direction) carrying `payload`:
    enough for the runtime's parser to file it under the flow."""
    lo, hi = key[0:16], key[16:32]
    lo_port, hi_port, proto = key[32:34], key[34:36], key[36]
    src, dst, sport, dport = (hi, lo, hi_port, lo_port) if orig_dir == HI_TO_LO else (lo, hi, lo_port, hi_port)
    if proto == TCP:
        l4 = sport + dport + struct.pack("!IIBBHHH", 0, 0, 5 << 4, 0x10, 65535, 0, 0)
    else:
        l4 = sport + dport + struct.pack("!HH", 8 + len(payload), 0)
    l4 += payload
    eth = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01"
    if src[:12] == b"\0" * 10 + b"\xff\xff":
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, src[12:], dst[12:])
        return eth + b"\x08\x00" + ip + l4
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src, dst)
    return eth + b"\x86\xdd" + ip6 + l4


def new_nonce() -> int:
    return int.from_bytes(os.urandom(8), "big")


class Outgoing:
    """One flow leaving this runtime."""
    __slots__ = ("key", "target", "nonce", "payload", "step", "started", "deadline", "resends", "batch",
                 "marker_seen")

    def __init__(self, key: bytes, target: int, batch: int, payload: bytes, nonce: int):
        self.key, self.target, self.batch = key, target, batch
        self.nonce, self.payload = nonce, payload
        self.step = "create"
        self.started = time.monotonic()
        self.deadline = 0.0
        self.resends = 0
        self.marker_seen = False


class Batch:
    """One `nfactorctl migrate` request: how its flows fared."""

    def __init__(self, bid: int, target: int, keys: list[bytes]):
        self.id, self.target = bid, target
        self.total = len(keys)
        self.waiting = list(keys)       # not started yet (concurrency cap)
        self.succeeded = self.failed = self.retried = 0
        self.durations: list[float] = []
        self.started = time.monotonic()
        self.finished: float | None = None

    def report(self) -> dict:
        done = self.succeeded + self.failed
        avg = sum(self.durations) / len(self.durations) if self.durations else 0.0
        return {"batch": self.id, "to": self.target, "total": self.total, "succeeded": self.succeeded,
                "failed": self.failed, "retried": self.retried, "in_progress": self.total - done,
                "done": done == self.total,
                "seconds": round((self.finished or time.monotonic()) - self.started, 6),
                "avg_flow_us": round(avg * 1e6, 1)}



class Migrator:
    """The migration side of one runtime: its outgoing flows (it is the
    source) and the messages it answers as a target."""

    def __init__(self, runtime, switch_agent: tuple | None, max_concurrent: int = 1000):
        self.rt = runtime
        self.switch_agent = switch_agent
        self.max_concurrent = max_concurrent
        self.out: dict[bytes, Outgoing] = {}
        self.batches: dict[int, Batch] = {}
        self.next_batch = 1
        self.recent: dict[bytes, float] = {}  # marker payloads of finished migrations -> expiry
        # failure injection for tests: lose the next N replies of a step / ignore N creates
        self.faults = {"drop_reply_create": 0, "drop_reply_move": 0, "drop_reply_state": 0, "ignore_create": 0}
        self.stats = {"late_markers": 0, "out_started": 0, "out_succeeded": 0, "out_failed": 0, "marker_resends": 0,
                      "in_created": 0, "in_completed": 0, "in_refused": 0, "replayed": 0,
                      "replay_tx_fail": 0, "buffer_overflow": 0, "after_marker": 0}

    # --- source side -----------------------------------------------------------
    def peer(self, rt_id: int) -> tuple | None:
        for e in (self.rt.view or {}).get("runtimes", []):
            if e.get("id") == rt_id and e.get("state") == "running" and e.get("addr"):
                return tuple(e["addr"])
        return None

    def start_batch(self, target: int, keys: list[bytes]) -> Batch:
        if target == self.rt.id:
            raise ValueError("a flow cannot migrate to its own runtime")
        if self.peer(target) is None:
            raise ValueError(f"runtime {target} is not running (or not in this runtime's view)")
        if self.switch_agent is None:
            raise ValueError("no switch agent configured")
        b = Batch(self.next_batch, target, [k for k in keys if k in self.rt.flows])
        self.next_batch += 1
        self.batches[b.id] = b
        self.pump()
        if not b.total:
            b.finished = time.monotonic()
        return b

    def pump(self) -> None:
        """Start waiting migrations while under the concurrency cap."""
        for b in self.batches.values():
            while b.waiting and len(self.out) < self.max_concurrent:
                key = b.waiting.pop(0)
                actor = self.rt.flows.get(key)
                if actor is None or actor.migration is not None:
                    self._finish(b, None, ok=False)
                    continue
                self._begin(b, key, actor)

    def _begin(self, b: Batch, key: bytes, actor) -> None:
        from ..control.switch_agent import marker_payload
        nonce = new_nonce()
        m = Outgoing(key, b.target, b.id, marker_payload(nonce), nonce)
        self.out[key] = m
        actor.migration = m
        self.rt.drop_fast_path(actor)  # its frames now take the slow path, which looks for the marker
        self.stats["out_started"] += 1
        body = {"key": key.hex(), "chain": actor.chain, "rule": actor.rule_id, "orig_dir": actor.orig_dir}
        self.rt.ep.request(self.peer(b.target), MsgType.MIGRATE_CREATE, body,
                           lambda msg, m=m: self._created(m, msg), timeout=0.5, retries=3,
                           on_timeout=lambda rid, m=m: self._timed_out(m, "create", "target did not answer create"))

    def _lost(self, fault: str) -> bool:
        if self.faults.get(fault, 0) > 0:
            self.faults[fault] -= 1
            self.stats["injected_faults"] = self.stats.get("injected_faults", 0) + 1
            return True
        return False

    def _current(self, m: Outgoing) -> bool:
        return self.out.get(m.key) is m

    def _created(self, m: Outgoing, msg) -> None:
        if not self._current(m) or m.step != "create":
            return  # a duplicate reply
        if self._lost("drop_reply_create"):
            m.resends += 1
            actor = self.rt.flows[m.key]
            body = {"key": m.key.hex(), "chain": actor.chain, "rule": actor.rule_id, "orig_dir": actor.orig_dir}
            self.rt.ep.request(self.peer(m.target), MsgType.MIGRATE_CREATE, body,
                               lambda msg, m=m: self._created(m, msg), timeout=0.2, retries=3,
                               on_timeout=lambda rid, m=m: self._timed_out(m, "create", "target did not answer create"))
            return
        if not msg.body.get("ok"):
            self._fail(m, f"target refused: {msg.body.get('error')}")
            return
        m.step = "move"
        self._move(m)

    def _move(self, m: Outgoing) -> None:
        actor = self.rt.flows[m.key]
        marker = marker_frame(m.key, actor.orig_dir, m.payload)
        body = {"key": m.key.hex(), "to": m.target, "from": self.rt.id, "marker": marker.hex()}
        m.deadline = time.monotonic() + MARKER_TIMEOUT
        self.rt.ep.request(self.switch_agent, MsgType.MIGRATE_MOVE, body,
                           lambda msg, m=m: self._moved(m, msg), timeout=0.3, retries=3,
                           on_timeout=lambda rid, m=m: self._timed_out(m, "move", "switch agent did not answer"))

    def _moved(self, m: Outgoing, msg) -> None:
        if not self._current(m):
            return
        if self._lost("drop_reply_move"):
            m.resends += 1
            self._move(m)
            return
        if msg.body.get("ok") or msg.body.get("moved"):
            # moved; if the marker could not be sent, the marker timer asks again
            if m.step == "move":
                m.step = "marker"
        else:
            self._rollback(m, f"switch agent refused: {msg.body.get('error')}")

    def on_frame(self, actor, frame, l4: int) -> bool:
        """A frame of a flow that is leaving.  True: it was the marker (or a
        re-sent copy of it), which is consumed here."""
        m = actor.migration
        if m.step != "create" and l4 >= 0 and len(frame) >= l4 + 8 and \
                bytes(frame[-len(m.payload):]) == m.payload:
            if not m.marker_seen:
                m.marker_seen = True
                try:
                    self._send_state(m, actor)
                except MessageError as e:  # e.g. a state too big for one message: keep the flow here
                    self._rollback(m, f"cannot send the state: {e}")
            return True
        if m.marker_seen:
            self.stats["after_marker"] += 1  # cannot happen by construction: counted to show it does not
        return False

    def _send_state(self, m: Outgoing, actor) -> None:
        m.step = "state"
        body = {"key": m.key.hex(), "states": [nf.serialize(st) for nf, st in zip(actor.nfs, actor.states)],
                "packets": actor.packets, "bytes": actor.bytes, "dropped": actor.dropped,
                "first_seen_age": time.monotonic() - actor.first_seen}
        self.rt.ep.request(self.peer(m.target) or ("127.0.0.1", 9), MsgType.MIGRATE_STATE, body,
                           lambda msg, m=m: self._done(m, msg), timeout=0.2, retries=5,
                           on_timeout=lambda rid, m=m: self._timed_out(m, "state", "target did not take the state"))

    def late_marker(self, frame) -> bool:
        """A re-sent marker that arrives after its migration ended: drop it
        rather than take it for the first frame of a new flow."""
        if not self.recent or len(frame) < 16:
            return False
        tail = bytes(frame[-16:])
        if tail in self.recent:
            self.stats["late_markers"] += 1
            return True
        return False

    def _remember(self, m: Outgoing) -> None:
        now = time.monotonic()
        self.recent = {p: t for p, t in self.recent.items() if t > now}
        self.recent[m.payload] = now + 5.0

    def _done(self, m: Outgoing, msg) -> None:
        if not self._current(m):
            return
        if self._lost("drop_reply_state"):
            m.resends += 1
            self._send_state(m, self.rt.flows[m.key])
            return
        if not msg.body.get("ok"):
            self._fail(m, f"target refused the state: {msg.body.get('error')}")
            return
        self._remember(m)
        actor = self.rt.flows.pop(m.key, None)
        if actor is not None:
            self.rt.drop_fast_path(actor)
            self.rt.replicator.flow_ended(actor)  # the target's actor replicates from now on
        self.out.pop(m.key, None)
        self.stats["out_succeeded"] += 1
        self._finish(self.batches.get(m.batch), m, ok=True)

    def _timed_out(self, m: Outgoing, step: str, why: str) -> None:
        """A request of step `step` got no answer after its retries.  Only acts
        if the migration is still at that step: a MOVE whose replies were lost
        but whose marker came has moved on, and must not be rolled back."""
        if not self._current(m) or m.step != step and not (step == "move" and m.step == "marker"):
            return
        if step == "create":
            self._fail(m, why)
            peer = self.peer(m.target)  # it may have created the actor: let it go
            if peer is not None:
                self.rt.ep.send(peer, MsgType.MIGRATE_DONE, {"key": m.key.hex(), "abort": True})
        else:
            self._rollback(m, why)

    def _rollback(self, m: Outgoing, why: str) -> None:
        """The switch may point at the target: point it back (no marker
        needed), and take back what the target buffered meanwhile."""
        if self.switch_agent is not None:
            body = {"key": m.key.hex(), "to": self.rt.id, "from": m.target, "marker": None}
            self.rt.ep.request(self.switch_agent, MsgType.MIGRATE_MOVE, body,
                               lambda msg, m=m: self._abort_target(m), timeout=0.3, retries=5)
        self._fail(m, why)

    def _abort_target(self, m: Outgoing) -> None:
        peer = self.peer(m.target)
        if peer is not None:
            self.rt.ep.request(peer, MsgType.MIGRATE_DONE, {"key": m.key.hex(), "abort": True},
                               lambda msg, m=m: self._take_back(m, msg), timeout=0.2, retries=3)

    def _take_back(self, m: Outgoing, msg) -> None:
        """Frames the target held for an aborted migration: process them here
        (after a rollback they may come after newer frames: no loss, but
        order is only kept on the migration's normal path)."""
        actor = self.rt.flows.get(m.key)
        for hexframe, direction, l4 in msg.body.get("frames", []):
            frame = bytearray.fromhex(hexframe)
            self.stats["taken_back"] = self.stats.get("taken_back", 0) + 1
            if actor is not None and actor.on_packet(memoryview(frame), direction, l4, self.rt.now):
                self.rt.transmit(frame)

    def _fail(self, m: Outgoing, why: str) -> None:
        if not self._current(m):
            return  # finished already: count each flow once
        self._remember(m)
        actor = self.rt.flows.get(m.key)
        if actor is not None and actor.migration is m:
            actor.migration = None  # the flow stays here with its state intact
        self.out.pop(m.key, None)
        self.stats["out_failed"] += 1
        self.rt.last_migration_error = why
        self._finish(self.batches.get(m.batch), m, ok=False)

    def _finish(self, b: Batch | None, m: Outgoing | None, ok: bool) -> None:
        if b is None:
            return
        if ok:
            b.succeeded += 1
            b.durations.append(time.monotonic() - m.started)
        else:
            b.failed += 1
        if m is not None and m.resends:
            b.retried += 1
        if b.succeeded + b.failed == b.total:
            b.finished = time.monotonic()
        self.pump()

    def tick(self, now: float) -> None:
        """Ask again for markers that are late (they travel the data plane and can be dropped)."""
        for m in list(self.out.values()):
            if m.step == "marker" and now > m.deadline:
                if m.resends >= MARKER_RESENDS:
                    self._rollback(m, "marker never arrived")
                    continue
                m.resends += 1
                self.stats["marker_resends"] += 1
                m.step = "move"
                self._move(m)

    # --- target side -------------------------------------------------------------
    def on_create(self, msg, addr) -> None:
        from . import nf as nf_api
        from .actor import Actor
        if self._lost("ignore_create"):
            return
        b = msg.body
        try:
            key = bytes.fromhex(b["key"])
            chain, rule, orig_dir = int(b["chain"]), int(b["rule"]), int(b["orig_dir"])
            if len(key) != 40:
                raise ValueError("bad key")
            if key in self.rt.flows:
                existing = self.rt.flows[key]
                if existing.migration == "in":
                    self.rt.ep.send(addr, MsgType.REPLY, {"ok": True}, rid=msg.rid)  # a retry
                    return
                raise ValueError("this runtime already has the flow")
            if self.rt.leaving:
                raise ValueError("runtime is leaving")
            nfs = [self.rt.nf_instance(t) for t in nf_api.decode_chain(chain)]
        except (KeyError, ValueError, TypeError, nf_api.NFError) as e:
            self.stats["in_refused"] += 1
            self.rt.ep.send(addr, MsgType.REPLY, {"ok": False, "error": str(e)}, rid=msg.rid)
            return
        actor = Actor(key, orig_dir, self.rt.now, chain, nfs, rule, replicator=self.rt.replicator)
        actor.migration = "in"
        actor.buffer = []
        self.rt.flows[key] = actor
        self.stats["in_created"] += 1
        self.rt.ep.send(addr, MsgType.REPLY, {"ok": True}, rid=msg.rid)

    def on_abort(self, msg, addr) -> None:
        """The source gave up: hand back what was buffered and forget the flow."""
        try:
            key = bytes.fromhex(msg.body["key"])
        except (KeyError, ValueError, TypeError):
            self.rt.ep.send(addr, MsgType.REPLY, {"ok": False, "error": "bad key"}, rid=msg.rid)
            return
        actor = self.rt.flows.get(key)
        frames = []
        if actor is not None and actor.migration == "in":
            room = 50_000  # what fits in one control message
            for d, direction, l4 in actor.buffer:
                room -= 2 * len(d) + 16
                if room < 0:
                    self.stats["abort_overflow"] = self.stats.get("abort_overflow", 0) + 1
                    continue
                frames.append([d.hex(), direction, l4])
            del self.rt.flows[key]
            self.stats["in_aborted"] = self.stats.get("in_aborted", 0) + 1
        self.rt.ep.send(addr, MsgType.REPLY, {"ok": True, "frames": frames}, rid=msg.rid)

    def buffer(self, actor, frame, direction: int, l4: int) -> None:
        if len(actor.buffer) >= MAX_BUFFER:
            self.stats["buffer_overflow"] += 1
            return
        actor.buffer.append((bytes(frame), direction, l4))

    def on_state(self, msg, addr) -> None:
        b = msg.body
        try:
            key = bytes.fromhex(b["key"])
            actor = self.rt.flows[key]
        except (KeyError, ValueError, TypeError):
            self.rt.ep.send(addr, MsgType.REPLY, {"ok": False, "error": "no such incoming flow"}, rid=msg.rid)
            return
        if actor.migration != "in":
            self.rt.ep.send(addr, MsgType.REPLY, {"ok": True}, rid=msg.rid)  # a retry: done already
            return
        try:
            states = [nf.deserialize(s) for nf, s in zip(actor.nfs, b["states"])]
            if len(states) != len(actor.nfs):
                raise ValueError("state count does not match the chain")
        except Exception as e:  # a peer's bad state must not crash us
            self.rt.ep.send(addr, MsgType.REPLY, {"ok": False, "error": f"bad state: {e}"}, rid=msg.rid)
            return
        actor.states = states
        actor.packets = list(b.get("packets", actor.packets))
        actor.bytes = list(b.get("bytes", actor.bytes))
        actor.dropped = int(b.get("dropped", 0))
        actor.first_seen = self.rt.now - float(b.get("first_seen_age", 0.0))
        actor.migration = None
        # replay what arrived meanwhile, in order, then carry on as usual
        for data, direction, l4 in actor.buffer:
            frame = bytearray(data)
            if actor.on_packet(memoryview(frame), direction, l4, self.rt.now):
                if not self.rt.transmit(frame):
                    self.stats["replay_tx_fail"] += 1
            self.stats["replayed"] += 1
        actor.buffer = None
        self.stats["in_completed"] += 1
        self.rt.ep.send(addr, MsgType.REPLY, {"ok": True}, rid=msg.rid)
